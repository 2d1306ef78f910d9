"""G-Rerank training throughput with and without the document-state cache.

Runs the real training step (default reader and MiniLM reranker unless told otherwise) over the same
questions for two passes. With the cache, the first pass fills it and the second reads it; without it, every
step re-encodes its documents through the reader. Reports examples/s of the second pass of each mode.

    python -m bench.train_throughput --questions 16 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from grerank import model_paths
from grerank.readers import load_reader
from grerank.reranker import build_reranker
from grerank.runtime import resolve_device, resolve_dtype
from training import train as training
from training.doc_state_cache import DocStateCache


def passes(args: argparse.Namespace, use_cache: bool) -> list[float]:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    examples = training.load_split("train", args.questions, 10)
    reranker = build_reranker("bi-encoder", model_paths.resolve("reranker")).to(device)
    reader = load_reader(model_paths.resolve("reader"), "auto", device, dtype)
    cache = DocStateCache(reader) if use_cache else None
    train_args = training.parse_args([])
    generator = torch.Generator().manual_seed(0)
    autocast = dtype if dtype == torch.bfloat16 else None
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        for i in range(0, len(examples), args.batch_size):
            batch = examples[i : i + args.batch_size]
            loss, _ = training.grerank_loss(
                batch, reranker, reader, cache, train_args, generator, {}, autocast
            )
            loss.backward()
            reranker.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    return [len(examples) / s for s in seconds]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    cached, uncached = passes(args, True), passes(args, False)
    result = {
        "benchmark": "grerank_training_examples_per_second",
        "command": "python -m bench.train_throughput "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": torch.get_num_threads(),
        },
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "with_cache_examples_per_s": {"first_pass": cached[0], "second_pass": cached[1]},
        "without_cache_examples_per_s": {"first_pass": uncached[0], "second_pass": uncached[1]},
        "cache_speedup_second_pass": cached[1] / uncached[1],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
