"""Question-answering examples with candidate passages, read from the two layouts the project accepts.

* HotpotQA distractor JSON lines (the shipped data): ``question, answer, type, supporting_facts,
  context{title[], sentences[][]}``.
* FiD JSON / JSON lines (the paper's code): ``question, answers[], ctxs[{title, text}]``.

Also the standard HotpotQA answer normalisation, used for the answer-bearing and bridge labels.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from grerank.passage import Passage

DATA_DIR = Path(__file__).resolve().parent.parent / "training" / "data" / "hotpotqa"


@dataclass
class Example:
    id: str
    question: str
    answers: list[str]
    passages: list[Passage]
    type: str = ""
    supporting: list[bool] = field(default_factory=list)  # empty when the data carries no labels

    @property
    def answer(self) -> str:
        return self.answers[0]

    def supporting_indices(self) -> list[int]:
        return [i for i, s in enumerate(self.supporting) if s]

    def answer_bearing(self) -> list[bool]:
        """Passages whose normalised text contains a normalised answer (supporting ones, if labelled)."""
        answers = [normalize_answer(a) for a in self.answers]
        labels = self.supporting or [True] * len(self.passages)
        return [
            sup and any(a and a in normalize_answer(p.text) for a in answers)
            for p, sup in zip(self.passages, labels, strict=True)
        ]

    def indirect(self) -> list[bool]:
        """Bridge questions only: supporting passages that do not contain the answer."""
        if self.type != "bridge" or not self.supporting:
            return [False] * len(self.passages)
        bearing = self.answer_bearing()
        return [s and not b for s, b in zip(self.supporting, bearing, strict=True)]


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (the HotpotQA/SQuAD normalisation)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _from_hotpot(row: dict) -> Example:
    titles = row["context"]["title"]
    passages = [
        Passage(t, "".join(s).strip()) for t, s in zip(titles, row["context"]["sentences"], strict=True)
    ]
    gold = set(row["supporting_facts"]["title"])
    return Example(
        id=row["id"],
        question=row["question"],
        answers=[row["answer"]],
        passages=passages,
        type=row.get("type", ""),
        supporting=[t in gold for t in titles],
    )


def _from_fid(row: dict, index: int) -> Example:
    passages = [Passage(c.get("title", ""), c["text"]) for c in row["ctxs"]]
    supporting = (
        [bool(c["has_answer"]) for c in row["ctxs"]] if all("has_answer" in c for c in row["ctxs"]) else []
    )
    answers = row.get("answers") or [row["answer"]]
    return Example(
        str(row.get("id", index)), row["question"], list(answers), passages, row.get("type", ""), supporting
    )


def load_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    """Read a split in either layout (detected per row); ``limit`` keeps the first rows."""
    path = Path(path)
    text = path.read_text()
    rows = (
        json.loads(text)
        if text.lstrip().startswith("[")
        else [json.loads(line) for line in text.splitlines() if line.strip()]
    )
    examples = []
    for i, row in enumerate(rows[:limit]):
        if "context" in row and "supporting_facts" in row:
            examples.append(_from_hotpot(row))
        elif "ctxs" in row:
            examples.append(_from_fid(row, i))
        else:
            raise ValueError(
                f"{path}: row {i} is neither HotpotQA (context, supporting_facts) nor FiD (ctxs) layout"
            )
    return examples


EXTRA_TRAIN = DATA_DIR.parent / "hotpotqa-train-extra" / "train.jsonl"


def split_path(name: str) -> Path:
    """``train``/``dev`` name the shipped splits, ``extra`` the extra official-train questions (training
    only); anything else is a path."""
    if name == "extra":
        return EXTRA_TRAIN
    return DATA_DIR / f"{name}.jsonl" if name in ("train", "dev") else Path(name)


def corpus(paths: list[Path] | None = None) -> list[Passage]:
    """Every distinct passage of the given splits (default: shipped train and dev), in first-seen order."""
    seen: dict[tuple[str, str], None] = {}
    for path in paths or [split_path("train"), split_path("dev")]:
        for example in load_examples(path):
            for passage in example.passages:
                seen.setdefault((passage.title, passage.text), None)
    return [Passage(t, x) for t, x in seen]
