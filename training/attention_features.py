"""What head selection and head routing learn from, computed once per reader and question and kept: per
candidate and head, the attention mass the question gives it and the mass the "N/A" question gives it
(``[layers, heads, n]`` each); the query representation (each layer's input pooled over the question's
tokens, ``[layers, hidden]``); and, for label-free routing, the reader's answer log-likelihood given each
candidate alone (the signal PDist distils).

    python -m training.attention_features --split dev
    python -m training.attention_features --split train --split extra --limit 300

Every question costs the encoding of its ten paragraphs (about 2 s on two cores) and three short passes;
nothing of the document states is kept, so the features of a thousand questions take about 60 MB. Files are
``runs/attention-features/<reader>/<split>.pt``, written every few questions, so a stopped run resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from grerank.decoder_reader import DecoderReader
from grerank.doc_state_cache import DocStateCache
from grerank.head_router import HeadRouter, aggregate, head_masses, select
from grerank.qa_data import Example
from grerank.reader_artifact import load_configured_reader
from grerank.router_artifact import load_router_artifact
from grerank.runtime import resolve_device, resolve_dtype
from training.reader_signals import one_example
from training.train import load_split

CANDIDATES = 10
DEFAULT_DIR = Path("runs/attention-features")
SAVE_EVERY = 10  # questions between saves


@dataclass
class Features:
    asked: torch.Tensor  # [layers, heads, n] attention mass of each candidate under the question
    null: torch.Tensor  # [layers, heads, n] ... under the "N/A" question
    pooled: torch.Tensor  # [layers, hidden] the question's pooled layer inputs (fp16 on disk)
    loglik: torch.Tensor | None  # [n] log P(answer | question, candidate alone), where asked for

    @property
    def calibrated(self) -> torch.Tensor:
        return self.asked - self.null


def split_examples(name: str, limit: int | None) -> list[Example]:
    """``train``/``dev`` (the shipped splits) or ``extra`` (the vendored extra train questions)."""
    return load_split(name, limit, CANDIDATES)


def example_key(example: Example) -> str:
    text = "\0".join([example.question, *(p.as_text() for p in example.passages)])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def reader_folder(reader: DecoderReader, root: Path) -> Path:
    return root / hashlib.sha256(reader.reading_signature().encode()).hexdigest()[:16]


@torch.no_grad()
def compute(reader: DecoderReader, states: list[torch.Tensor], example: Example, loglik: bool) -> Features:
    asked, null, pooled = head_masses(reader, example.question, states)
    return Features(
        asked=asked,
        null=null,
        pooled=pooled.half(),
        loglik=torch.tensor(one_example(reader, states, example, "loglik")) if loglik else None,
    )


def _save(rows: dict[str, Features], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({k: vars(v) for k, v in rows.items()}, tmp)
    os.replace(tmp, path)


def load_features(path: Path) -> dict[str, Features]:
    if not path.is_file():
        return {}
    return {k: Features(**v) for k, v in torch.load(path, weights_only=True).items()}


def features_for(
    examples: list[Example], cache: DocStateCache, path: Path, loglik: bool, desc: str
) -> list[Features]:
    """The features of ``examples`` in order, computing (and saving) those ``path`` lacks."""
    rows = load_features(path)
    todo = [
        ex
        for ex in examples
        if example_key(ex) not in rows or (loglik and rows[example_key(ex)].loglik is None)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    for i, example in enumerate(tqdm(todo, desc=desc, unit="q", disable=not todo)):
        states = cache.states(example.passages)
        rows[example_key(example)] = compute(cache.reader, states, example, loglik)  # type: ignore[arg-type]
        if (i + 1) % SAVE_EVERY == 0 or i + 1 == len(todo):
            _save(rows, path)
    return [rows[example_key(ex)] for ex in examples]


def routed_scores(
    router: HeadRouter, features: list[Features], top_m: int | None = None
) -> list[list[float]]:
    """Each question's candidate scores from the heads ``router`` picks (its own ``top_m`` unless given)."""
    pooled = torch.stack([f.pooled.float() for f in features])
    with torch.no_grad():
        heads = select(router(pooled), router.config.top_m if top_m is None else top_m)
    heads = heads.view(len(features), router.config.layers, router.config.heads)
    return [aggregate(f.calibrated, h).tolist() for f, h in zip(features, heads, strict=True)]


def router_scores(
    folder: Path, reader: DecoderReader, examples: list[Example], split: str
) -> list[list[float]]:
    """``training.evaluate``'s scores for a router artifact, from (and into) the features of ``split``."""
    router, _ = load_router_artifact(folder, reader)
    path = reader_folder(reader, DEFAULT_DIR) / f"{split}.pt"
    return routed_scores(router, features_for(examples, DocStateCache(reader, 1 << 30), path, False, split))


def open_reader(artifact: str) -> DecoderReader:
    torch.set_grad_enabled(False)
    device = resolve_device("auto")
    reader, _ = load_configured_reader(artifact, "default", "auto", device, resolve_dtype("auto", device))
    return reader  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", action="append", choices=("train", "extra", "dev"), required=True)
    p.add_argument("--limit", type=int, default=None, help="first N questions of each split")
    p.add_argument("--reader-artifact", default="shipped", help="'shipped', 'none' (base reader) or a folder")
    p.add_argument("--out", type=Path, default=DEFAULT_DIR)
    args = p.parse_args(argv)
    reader = open_reader(args.reader_artifact)
    cache = DocStateCache(reader, 1 << 30)  # states are used once per question: memory only, small
    folder = reader_folder(reader, args.out)
    for split in args.split:
        examples = split_examples(split, args.limit)
        features_for(examples, cache, folder / f"{split}.pt", loglik=split != "dev", desc=split)
        print(f"{split}: {len(examples)} questions in {folder / f'{split}.pt'}")


if __name__ == "__main__":
    main()
