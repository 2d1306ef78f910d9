"""Checksums that tie artifacts to their files and to the base weights they were trained over."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import safe_open


class ArtifactError(RuntimeError):
    """An artifact is missing, of another kind or format version, does not match its checksums, or was
    trained over other base weights than the ones at hand."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_checksum(folder: str | Path) -> str:
    """sha256 of a Hugging Face folder's weights by content (tensor names, dtypes, shapes and bytes), so the
    same weights saved by another library version or in other shards give the same checksum."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ArtifactError(f"{folder} holds no .safetensors weights to check")
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as fh:
            where.update((name, file) for name in fh.keys())  # noqa: SIM118 (safe_open is not a mapping)
    digest = hashlib.sha256()
    for name in sorted(where):
        with safe_open(where[name], framework="pt") as fh:
            tensor = fh.get_tensor(name).contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
