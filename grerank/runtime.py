"""Device and precision choices shared by training and the service."""

from __future__ import annotations

from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available")
    return device


def cpu_has_bf16() -> bool:
    """True on x86 CPUs with AVX-512 BF16 or AMX, where bf16 matmuls run several times faster than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 where the hardware runs it fast (CUDA with bf16, CPUs with AVX-512 BF16), else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def return_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``); a no-op elsewhere.

    Long-lived multi-megabyte tensors (cached document states) interleaved with transient ones fragment the
    heap, and RSS grows far past what is live. Trimming once per training step returns the holes; a fixed
    mmap threshold would too, but costs a page fault per large allocation (40-70% slower steps here).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc
        return


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
