"""What a benchmark ran on: the machine, its load, the library versions and the command."""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from grerank.runtime import cpu_bf16_speedup, cpu_has_bf16

LIBRARIES = (
    "torch",
    "transformers",
    "tokenizers",
    "sentence-transformers",
    "faiss-cpu",
    "numpy",
    "fastapi",
    "uvicorn",
    "httpx",
    "pydantic",
)


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _physical_cores(cpuinfo: str) -> int | None:
    """Distinct (physical id, core id) pairs; None where /proc/cpuinfo does not say."""
    cores, physical = set(), "0"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            physical = value.strip()
        elif key.strip() == "core id":
            cores.add((physical, value.strip()))
    return len(cores) or None


def _ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _field(cpuinfo: str, name: str) -> str:
    """The first value of ``name`` in /proc/cpuinfo, or ''."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def machine() -> dict[str, Any]:
    cpuinfo = _cpuinfo()
    flags = set(_field(cpuinfo, "flags").split())
    out: dict[str, Any] = {
        "cpu": _field(cpuinfo, "model name") or platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": _physical_cores(cpuinfo),
        "ram_gb": _ram_gb(),
        "bf16": cpu_has_bf16(),
        # fp32 time / bf16 time of a reranker-shaped GEMM: what "auto" precision decides by (grerank.runtime)
        "bf16_gemm_speedup": round(cpu_bf16_speedup(), 2),
        # Family/model/stepping tell CPU generations apart that share a model name ("AMD EPYC": Zen 3 is
        # family 25 model 1, Zen 4 family 25 model 17).
        "cpu_id": "/".join(_field(cpuinfo, key) for key in ("cpu family", "model", "stepping")).strip("/")
        or None,
        "isa": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return out


# The widest matrix instructions a CPU has, widest first: what decides which precision is fast on it.
ISA_TIERS = (("amx_bf16", "amx"), ("avx512_bf16", "avx512-bf16"), ("avx512f", "avx512"), ("avx2", "avx2"))


def machine_slug() -> str:
    """The CPU model and its widest matrix instructions as a folder name ("amd-epyc-avx2" for a Zen 3,
    "amd-epyc-avx512-bf16" for a Zen 4: both call themselves "AMD EPYC"), with "-gpu" when a GPU is
    visible."""
    info = machine()
    slug = re.sub(r"[^a-z0-9]+", "-", re.sub(r"\((r|tm)\)", "", info["cpu"].lower())).strip("-") or "unknown"
    tier = next((name for flag, name in ISA_TIERS if flag in info["isa"]), None)
    return slug + (f"-{tier}" if tier else "") + ("-gpu" if info["gpu"] else "")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def command() -> str:
    """The command line this process was started with."""
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return shlex.join(argv)
