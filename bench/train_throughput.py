"""G-Rerank training examples/s with and without the document-state cache.

Runs the real training step (default reader, MiniLM bi-encoder, bf16 where supported) over the same questions
twice. With the cache, the first pass fills it and the second reads it, as every epoch after the first does;
without it, every step re-encodes its documents through the reader. The second passes are compared.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from grerank import model_paths
from grerank.doc_state_cache import DocStateCache
from grerank.readers import load_reader
from grerank.reranker import build_reranker
from grerank.runtime import resolve_device, resolve_dtype
from training import train as training


def passes(questions: int, use_cache: bool, batch_size: int = 4) -> list[float]:
    """Examples/s of two passes over the same ``questions`` train questions."""
    args = training.parse_args(["--anchor-weight", "0", "--batch-size", str(batch_size)])
    device = resolve_device("auto")
    dtype = resolve_dtype("auto", device)
    examples = training.load_split("train", questions, args.n)
    reranker = build_reranker("bi-encoder", model_paths.resolve("reranker")).to(device)
    reader = load_reader(model_paths.resolve("reader"), "auto", device, dtype)
    cache = DocStateCache(reader, memory_bytes=8 << 30) if use_cache else None
    generator = torch.Generator().manual_seed(0)
    autocast = dtype if dtype == torch.bfloat16 else None
    rates = []
    torch.set_grad_enabled(True)  # another benchmark of the same process may have turned it off
    for _ in range(2):
        start = time.perf_counter()
        for i in range(0, len(examples), batch_size):
            loss, _ = training.batch_loss(
                examples[i : i + batch_size], reranker, reader, cache, args, generator, {}, {}, autocast
            )
            loss.backward()
            reranker.zero_grad(set_to_none=True)
        rates.append(len(examples) / (time.perf_counter() - start))
    return rates


def run(quick: bool) -> dict[str, Any]:
    questions = 8 if quick else 24
    cached, uncached = passes(questions, True), passes(questions, False)
    return {
        "questions": questions,
        "batch_size": 4,
        "with_cache_examples_per_s": {"first_pass": cached[0], "second_pass": cached[1]},
        "without_cache_examples_per_s": {"first_pass": uncached[0], "second_pass": uncached[1]},
        "cache_speedup": cached[1] / uncached[1],
    }


def markdown(result: dict[str, Any]) -> str:
    cached, uncached = result["with_cache_examples_per_s"], result["without_cache_examples_per_s"]
    return "\n".join(
        [
            f"{result['questions']} train questions, batches of {result['batch_size']}, two passes each.",
            "",
            "| document states | pass 1 (ex/s) | pass 2 (ex/s) |",
            "|---|---|---|",
            f"| cached (filled in pass 1) | {cached['first_pass']:.3f} | {cached['second_pass']:.3f} |",
            f"| recomputed every step | {uncached['first_pass']:.3f} | {uncached['second_pass']:.3f} |",
            "",
            f"Cache speed-up on later epochs: **{result['cache_speedup']:.2f}x**.",
        ]
    )
