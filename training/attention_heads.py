"""Attention-based reranking from the reader itself, measured: ICR over every head (with and without its
"N/A" calibration) and static head sets chosen on train questions (QRHead-style), evaluated on dev with the
same ranking metrics as every other reranker (``training.evaluate``).

    python -m training.attention_heads --train 100 --out results/attention/heads.json

Heads are ranked by the mean supporting Recall@2 of each head's own calibrated per-document score (its
attention summed over the document's tokens, averaged over the question's) on the train questions; a set of
the top m is aggregated as ICR does (per token, summed over the set; low tokens dropped; summed per
document). Document states come from the shared cache (``runs/doc-states``); the question passes run the
served reader (the shipped adapter over the default base) unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from grerank.doc_state_cache import DEFAULT_DISK_GB, DocStateCache
from grerank.qa_data import Example
from grerank.question_attention import NULL_QUESTION, head_sums, icr_aggregate, question_attention
from grerank.reader_artifact import load_configured_reader
from grerank.runtime import resolve_device, resolve_dtype
from training.metrics import ranking_metrics
from training.train import load_split

CANDIDATES = 10  # questions with ten candidates, as training.evaluate counts them
SET_SIZES = (1, 4, 8, 16)
REPORTED = ("answer_recall@1", "support_recall@2", "support_recall@5", "bridge_recall@5")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=100, help="train questions the heads are chosen on")
    p.add_argument("--dev", type=int, default=None, help="dev questions evaluated (default: all)")
    p.add_argument("--reader-artifact", default="shipped", help="'shipped', 'none' (base reader) or a folder")
    p.add_argument("--state-cache-dir", default="runs/doc-states")
    p.add_argument("--cache-disk-gb", type=float, default=DEFAULT_DISK_GB)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def attention_of(cache: DocStateCache, example: Example) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per document ``[layers, heads, tokens]``: the question's attention, and the "N/A" question's."""
    states = cache.states(example.passages)
    asked = question_attention(cache.reader, example.question, states)  # type: ignore[arg-type]
    null = question_attention(cache.reader, NULL_QUESTION, states)  # type: ignore[arg-type]
    return asked, null


def head_recall(examples: list[Example], cache: DocStateCache) -> torch.Tensor:
    """``[layers, heads]``: mean supporting Recall@2 of each head's calibrated document scores."""
    total = None
    for example in tqdm(examples, desc="train: score heads", unit="q"):
        asked, null = attention_of(cache, example)
        per_head = head_sums([a - b for a, b in zip(asked, null, strict=True)])
        order = per_head.argsort(dim=-1, descending=True)[..., :2]  # [layers, heads, 2]
        gold = torch.as_tensor(example.supporting)
        hits = gold[order].float().sum(dim=-1) / max(int(gold.sum()), 1)
        total = hits if total is None else total + hits
    assert total is not None
    return total / len(examples)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    device = resolve_device("auto")
    dtype = resolve_dtype("auto", device)
    reader, _ = load_configured_reader(args.reader_artifact, "default", "auto", device, dtype)
    cache = DocStateCache(reader, 2 << 30, Path(args.state_cache_dir), int(args.cache_disk_gb * (1 << 30)))
    started = time.perf_counter()
    train = load_split("train", args.train, CANDIDATES)
    recall = head_recall(train, cache)
    ranked = recall.flatten().argsort(descending=True)
    sets = {}
    for m in SET_SIZES:
        chosen = torch.zeros(recall.numel(), dtype=torch.bool)
        chosen[ranked[:m]] = True
        sets[f"static top {m}"] = chosen.view_as(recall)
    dev = load_split("dev", args.dev, CANDIDATES)
    scores: dict[str, list[list[float]]] = {"ICR all heads": [], "ICR all heads, no calibration": []}
    scores.update({name: [] for name in sets})
    for example in tqdm(dev, desc="dev: rerank", unit="q"):
        asked, null = attention_of(cache, example)
        calibrated = [a - b for a, b in zip(asked, null, strict=True)]
        scores["ICR all heads"].append(icr_aggregate(calibrated).tolist())
        scores["ICR all heads, no calibration"].append(icr_aggregate(asked).tolist())
        for name, heads in sets.items():
            scores[name].append(icr_aggregate(calibrated, heads).tolist())
    heads = recall.shape[1]
    best = [
        (int(i) // heads, int(i) % heads, round(100 * float(recall.flatten()[i]), 1)) for i in ranked[:16]
    ]
    result = {
        "command": "python -m training.attention_heads " + shlex.join(sys.argv[1:] if argv is None else argv),
        "reader_artifact": args.reader_artifact,
        "adapter_sha256": reader.adapter_id,
        "train_questions": len(train),
        "dev_questions": len(dev),
        "best_train_heads": [{"layer": la, "head": h, "train_support_recall@2": r} for la, h, r in best],
        "ranking": {name: ranking_metrics(dev, rows) for name, rows in scores.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    for name, metrics in result["ranking"].items():
        shown = {k: metrics["all"][k]["value"] for k in REPORTED if k in metrics["all"]}
        print(f"{name:32s} " + "  ".join(f"{k} {v:.1f}" for k, v in shown.items()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
