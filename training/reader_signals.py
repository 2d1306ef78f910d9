"""The frozen reader's per-candidate signals that the distillation baselines learn from.

* ``loglik``: ``log P(answer | question, d_i)`` with the reader given candidate ``i`` alone (PDist, EMDR);
* ``loo_loglik``: ``log P(answer | question, all candidates but d_i)`` (LOOP);
* ``subset_nll_k{K}``: the reader's answer NLL per token reading exactly each K-subset of the candidates
  (:func:`training.objectives.k_subsets` order), the constants of the exact expected loss (``expected``);
* ``attention_score``: the reader's attention logits on candidate ``i`` when it reads all of them, averaged
  over layers, heads and the candidate's tokens (ADist). (An earlier ``attention`` signal, the summed
  attention mass, ranked candidates by length; its stored rows are ignored.)

The reader is frozen, so these are constants: computed once per example and kept in a JSON-lines file
keyed by the reader's reading signature (its states' signature and its adapter) and the example's content,
shared by every run and seed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from grerank.doc_state_cache import DocStateCache
from grerank.qa_data import Example
from training import objectives

SIGNALS = ("loglik", "loo_loglik", "subset_nll_k{K}", "attention_score")


FORMAT = "alone-rows"  # a new tag when how a signal is computed changes: stored rows of the old are ignored


def _key(signature: str, example: Example) -> str:
    text = "\0".join(
        [FORMAT, signature, example.question, example.answer, *(p.as_text() for p in example.passages)]
    )
    return hashlib.sha256(text.encode()).hexdigest()


@torch.no_grad()
def one_example(
    reader, states: list[torch.Tensor], example: Example, kind: str, chunk: int = 15
) -> list[float]:
    n = len(states)
    if kind == "loglik":  # each row holds candidate i's states only: 5x faster than all ten masked
        total, _ = reader.answer_log_likelihood(
            [example.question] * n, [example.answer] * n, [[s] for s in states], torch.ones(n, 1)
        )
        return total.float().tolist()
    if kind == "loo_loglik":  # one row per candidate left out: the full set minus it
        total, _ = reader.answer_log_likelihood(
            [example.question] * n, [example.answer] * n, [states] * n, 1 - torch.eye(n)
        )
        return total.float().tolist()
    if kind.startswith("subset_nll_k"):  # each row holds its subset's states only, all visible
        subsets = objectives.k_subsets(n, int(kind.removeprefix("subset_nll_k"))).tolist()
        values: list[float] = []
        for start in range(0, len(subsets), chunk):
            part = subsets[start : start + chunk]
            nll = reader.answer_nll(
                [example.question] * len(part),
                [example.answer] * len(part),
                [[states[i] for i in subset] for subset in part],
                torch.ones(len(part), len(part[0])),
            )
            values += nll.float().tolist()
        return values
    if kind == "attention_score":
        if not hasattr(reader, "document_attention"):
            raise ValueError(f"attention distillation needs a decoder reader, not {reader.family!r}")
        return reader.document_attention([example.question], [example.answer], [states])[0].tolist()
    raise ValueError(f"unknown reader signal {kind!r}; expected one of {SIGNALS}")


def reader_signals(
    examples: list[Example], cache: DocStateCache, kind: str, store: Path | None, progress: bool = True
) -> dict[str, torch.Tensor]:
    """``{example id: signal [n]}``, reading what ``store`` already holds and appending what it lacks."""
    signature = cache.reader.reading_signature()
    known: dict[str, list[float]] = {}
    if store is not None and store.is_file():
        for line in store.read_text().splitlines():
            row = json.loads(line)
            if row["kind"] == kind:
                known[row["key"]] = row["values"]
    out: dict[str, torch.Tensor] = {}
    todo = [ex for ex in examples if _key(signature, ex) not in known]
    handle = None
    if todo and store is not None:
        store.parent.mkdir(parents=True, exist_ok=True)
        handle = store.open("a")
    for example in tqdm(todo, desc=f"reader {kind}", unit="q", disable=not progress):
        values = one_example(cache.reader, cache.states(example.passages, example.question), example, kind)
        known[_key(signature, example)] = values
        if handle is not None:
            handle.write(json.dumps({"key": _key(signature, example), "kind": kind, "values": values}) + "\n")
            handle.flush()
    if handle is not None:
        handle.close()
    for example in examples:
        out[example.id] = torch.tensor(known[_key(signature, example)])
    return out
