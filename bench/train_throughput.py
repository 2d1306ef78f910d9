"""G-Rerank training examples/s with and without the document-state cache, and the memory autograd holds
per step.

Runs the real training step (default reader, MiniLM bi-encoder, the precision ``auto`` picks) over the same
questions twice. With the cache, the first pass fills it and the second reads it, as every epoch after the
first does; without it, every step re-encodes its documents through the reader. The second passes are
compared. Memory: the bytes of the distinct tensors autograd saved for the backward of one cached step
(what a step's peak grows with; the model's weights and the cached states are not counted).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from grerank import model_paths
from grerank.doc_state_cache import DocStateCache
from grerank.readers import load_reader
from grerank.reranker import build_reranker
from grerank.runtime import resolve_device, resolve_dtype, reuse_freed_memory
from training import train as training


@contextmanager
def saved_by_autograd() -> Iterator[dict[str, int]]:
    """Count the bytes of the distinct storages autograd saves for backward inside the block (``"bytes"``)."""
    seen: dict[int, int] = {}
    out = {"bytes": 0}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield out
    out["bytes"] = sum(seen.values())


def full_head_log_likelihood(
    reader, questions, answers, doc_states, mask
) -> tuple[torch.Tensor, torch.Tensor]:
    """``answer_log_likelihood`` as the earlier step computed it: the vocabulary head over every question
    and answer position, not only those that predict an answer token."""
    out, ids, target, _ = reader._answer_forward(questions, answers, doc_states, mask)
    logits = reader.model.get_output_embeddings()(out.last_hidden_state).float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, ids[:, 1:, None])[..., 0]
    return (logprobs * target).sum(dim=1), target.sum(dim=1)


def passes(
    questions: int, use_cache: bool, batch_size: int = 4, earlier: bool = False
) -> tuple[list[float], int]:
    """Examples/s of two passes over the same ``questions`` train questions, and the bytes autograd saved
    in the last step. ``earlier``: the step as it was before the reader's scaled-value attention and the
    reranker's length groups and precision-matched attention (eager attention in the reader, its vocabulary
    head over every position, every reranker text padded to the longest, the reranker's attention PyTorch's
    fused kernel whatever the precision), for comparison."""
    args = training.parse_args(["--anchor-weight", "0", "--batch-size", str(batch_size)])
    device = resolve_device("auto")
    dtype = resolve_dtype("auto", device)
    examples = training.load_split("train", questions, args.n)
    reranker = build_reranker("bi-encoder", model_paths.resolve("reranker")).to(device)
    reader = load_reader(model_paths.resolve("reader"), "auto", device, dtype)
    if earlier:
        reader.answer_attention, reranker.encoder.max_padding = "eager", float("inf")
        reranker.encoder.attention = "sdpa"
        reader.answer_log_likelihood = functools.partial(full_head_log_likelihood, reader)
    cache = DocStateCache(reader, memory_bytes=8 << 30) if use_cache else None
    generator = torch.Generator().manual_seed(0)
    autocast = dtype if dtype == torch.bfloat16 else None
    rates = []
    torch.set_grad_enabled(True)  # another benchmark of the same process may have turned it off
    for _ in range(2):
        start = time.perf_counter()
        for i in range(0, len(examples), batch_size):
            with saved_by_autograd() as saved:
                loss, _ = training.batch_loss(
                    examples[i : i + batch_size], reranker, reader, cache, args, generator, {}, {}, autocast
                )
            loss.backward()
            reranker.zero_grad(set_to_none=True)
        rates.append(len(examples) / (time.perf_counter() - start))
    return rates, saved["bytes"]


BATCH_SIZE = 4


def run(quick: bool) -> dict[str, Any]:
    questions = 8 if quick else 24
    reuse_freed_memory()  # as training does: without it every step faults its gigabytes in afresh
    (cached, saved), (uncached, _) = passes(questions, True, BATCH_SIZE), passes(questions, False, BATCH_SIZE)
    earlier, earlier_saved = passes(questions, True, BATCH_SIZE, earlier=True)
    return {
        "questions": questions,
        "batch_size": BATCH_SIZE,
        "dtype": str(resolve_dtype("auto", resolve_device("auto"))).removeprefix("torch."),
        "seconds_per_step": BATCH_SIZE / cached[1],
        "autograd_saved_gib_per_step": saved / (1 << 30),
        "earlier_step": {
            "examples_per_s": earlier[1],
            "seconds_per_step": BATCH_SIZE / earlier[1],
            "autograd_saved_gib_per_step": earlier_saved / (1 << 30),
        },
        "step_speedup_over_earlier": cached[1] / earlier[1],
        "with_cache_examples_per_s": {"first_pass": cached[0], "second_pass": cached[1]},
        "without_cache_examples_per_s": {"first_pass": uncached[0], "second_pass": uncached[1]},
        "cache_speedup": cached[1] / uncached[1],
    }


def markdown(result: dict[str, Any]) -> str:
    cached, uncached = result["with_cache_examples_per_s"], result["without_cache_examples_per_s"]
    return "\n".join(
        [
            f"{result['questions']} train questions, batches of {result['batch_size']}, two passes each"
            f" ({result.get('dtype', 'bfloat16')}).",
            "",
            "| document states | pass 1 (ex/s) | pass 2 (ex/s) |",
            "|---|---|---|",
            f"| cached (filled in pass 1) | {cached['first_pass']:.3f} | {cached['second_pass']:.3f} |",
            f"| recomputed every step | {uncached['first_pass']:.3f} | {uncached['second_pass']:.3f} |",
            "",
            f"Cache speed-up on later epochs: **{result['cache_speedup']:.2f}x**."
            + (
                f" A cached step: {result['seconds_per_step']:.2f} s, autograd saves "
                f"{result['autograd_saved_gib_per_step']:.2f} GiB for its backward."
                if "seconds_per_step" in result
                else ""
            ),
            *(
                [
                    "",
                    "| cached step | s/step | autograd saves (GiB) |",
                    "|---|---|---|",
                    f"| before (eager reader attention, reranker texts padded to the longest, fused reranker "
                    f"attention) | "
                    f"{e['seconds_per_step']:.2f} | {e['autograd_saved_gib_per_step']:.2f} |",
                    f"| now (scaled-value attention, length groups, reranker attention by pass) | "
                    f"{result['seconds_per_step']:.2f} | "
                    f"{result['autograd_saved_gib_per_step']:.2f} |",
                    "",
                    f"Step speed-up: **{result['step_speedup_over_earlier']:.2f}x** (target 2x).",
                ]
                if (e := result.get("earlier_step"))
                else []
            ),
        ]
    )
