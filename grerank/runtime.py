"""Device and precision choices shared by training and the service."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
log = logging.getLogger(__name__)
K = TypeVar("K")


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available")
    return device


def cpu_has_bf16() -> bool:
    """True on x86 CPUs with AVX-512 BF16 or AMX: bf16 matmuls can run there, not always faster (see
    :func:`cpu_bf16_speedup`)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def cpu_bf16_speedup(rows: int = 1024, inner: int = 384, cols: int = 1536) -> float:
    """fp32 time / bf16 time of one GEMM shaped like the reranker's feed-forward, on this CPU (0 where the
    CPU has no bf16 instructions).

    Measured, not read off the flags: on an AMD Zen 4 (AVX-512 BF16) bf16 ran 4x faster than fp32, on an
    Intel Xeon that shows AVX-512 BF16 but no AMX it ran 0.6x as fast (157 against 269 GFLOP/s), and the
    service there served bf16 at 0.6x its fp32 throughput. About 0.2 s, once per process.
    """
    if not cpu_has_bf16():
        return 0.0
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(rows, inner, generator=generator), torch.randn(inner, cols, generator=generator)
    x, y = a.bfloat16(), b.bfloat16()
    best = best_times({"fp32": lambda: a @ b, "bf16": lambda: x @ y}, rounds=8)
    return best["fp32"] / best["bf16"]


def best_times(calls: dict[K, Callable[[], object]], rounds: int) -> dict[K, float]:
    """The best wall time of each call over ``rounds`` interleaved rounds, after one untimed call each (which
    also builds oneDNN's kernels), in inference mode.

    Interleaved and best of each: a process starting beside others (the service loads its models on several
    threads) must not take a disturbed moment of one candidate for a gain of the other."""
    best = dict.fromkeys(calls, float("inf"))
    with torch.inference_mode():
        for call in calls.values():
            call()
        for _ in range(rounds):
            for key, call in calls.items():
                start = time.perf_counter()
                call()
                best[key] = min(best[key], time.perf_counter() - start)
    return best


# bf16 rounds more than fp32, so "auto" takes it only for a clear gain.
BF16_MIN_SPEEDUP = 1.25


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 where the hardware runs it clearly faster (CUDA with bf16; CPUs where a measured bf16
    GEMM beats fp32 by ``BF16_MIN_SPEEDUP``), else fp32 (fp16 on CUDA without bf16)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else torch.float32
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        # Emulated, bf16 GEMMs ran at 0.3-1.3 GFLOP/s against fp32's 160 on an AMD Zen 3: honoured, but said.
        log.warning(
            "precision bf16 on a CPU without bf16 instructions (AVX-512 BF16 or AMX): torch emulates it, "
            "about 100x slower than fp32; 'auto' would choose fp32 here"
        )
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def match_attention_to_pass(model: torch.nn.Module) -> None:
    """Give a BERT-style ``model`` on a CPU the faster attention for the pass it is about to run: eager
    (bf16 products, fp32 softmax) for a training pass under bf16, PyTorch's fused kernel otherwise.

    Measured on an AMD Zen 4 for a reranker training batch (22 texts of 147 tokens, 12 heads of 32): in bf16
    the fused kernel took 10 ms forward and 44 ms backward against eager's 6 and 8; at 256 tokens the two
    were level. Forward alone the fused kernel wins for long texts (14 against 23 ms at 256 tokens), and in
    fp32 it is the faster in both directions, so inference and fp32 passes keep it (and their bits).
    """
    device = next(model.parameters()).device
    if device.type != "cpu":
        return
    bf16 = model.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )
    wanted = "eager" if bf16 and torch.is_grad_enabled() else "sdpa"
    if model.config._attn_implementation != wanted:
        model.set_attn_implementation(wanted)


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


def reuse_freed_memory(trim_threshold: int = 512 << 20) -> None:
    """Serve large allocations from the heap and keep what is freed there for reuse (glibc ``mallopt``);
    a no-op elsewhere.

    glibc maps every block over its mmap threshold (at most 32 MB) afresh and unmaps it when freed; a
    training step allocates gigabytes of such blocks, so every step faulted all of their pages in again: a
    make-train run spent 1,150 of its 5,100 CPU seconds in the kernel. With a 1 GiB threshold, 8 steps
    took 6.2 instead of 8.2 s each, with 0.09M instead of 1.9M page faults per step.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, trim_threshold)  # free memory past it at the top of the heap goes back


def return_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``); a no-op elsewhere. Costly (the
    pages are faulted in again when next used), so done between phases, not every step."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


def available_memory_bytes() -> int:
    """Memory the kernel could hand out now (``MemAvailable``); half the physical memory where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
