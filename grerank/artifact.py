"""Versioned artifacts: the contract between training and the service (DESIGN.md section 6).

An artifact is a folder of model files beside ``manifest.json``: its ``kind`` (``reranker``, or ``reader`` for
a reader adapter, grerank.reader_artifact), the format version, the model's configuration and base model,
hyperparameters, data and code provenance, dev metrics and the sha256 of every other file. Loading refuses a
folder whose kind, format version or checksums do not match.

This module writes and verifies any kind, and loads the reranker kind: the reranker (weights or a LoRA
adapter over its base model, tokenizer, ``reranker.json``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grerank.checksums import ArtifactError, sha256_file, weights_checksum
from grerank.reranker import Reranker

__all__ = [
    "ArtifactError",
    "read_manifest",
    "sha256_file",
    "weights_checksum",
    "write_artifact",
    "write_folder",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# The trained default reranker, committed with the code (its manifest holds the command that reproduces it).
SHIPPED = Path(__file__).resolve().parent.parent / "models" / "reranker"


def code_version() -> dict[str, Any]:
    """The git commit of the code that wrote the artifact, and whether the tree had local changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True
            ).stdout.strip()
        )
        return {"git_commit": commit, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": None, "dirty": None}


def write_folder(folder: str | Path, kind: str, save: Callable[[Path], None], **sections: Any) -> Path:
    """``save(tmp)`` the model files, then a manifest of ``kind`` with ``sections`` and every file's sha256.

    Written into a temporary sibling folder and renamed into place, so a crash never leaves half an artifact.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        save(tmp)
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "kind": kind,
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "code": code_version(),
            **sections,
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        os.chmod(tmp, 0o755)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def write_artifact(folder: str | Path, reranker: Reranker, **sections: Any) -> Path:
    """Save ``reranker`` and a manifest with ``sections`` (hyperparameters, data, metrics, reader...)."""
    return write_folder(folder, "reranker", reranker.save, reranker=reranker.config(), **sections)


def read_manifest(folder: str | Path, verify: bool = True, kind: str = "reranker") -> dict[str, Any]:
    """The manifest, after checking its kind, the format version and (if ``verify``) every file's checksum."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder} is not a {kind} artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc
    found = manifest.get("kind", "reranker")  # artifacts written before kinds existed are rerankers
    if found != kind:
        raise ArtifactError(f"{folder} is a {found} artifact, not a {kind} artifact")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{folder} has format version {version!r}; this code reads version {FORMAT_VERSION}"
        )
    if verify:
        for name, expected in manifest.get("files", {}).items():
            file = folder / name
            if not file.is_file():
                raise ArtifactError(f"{folder}: {name} is listed in the manifest but missing")
            if sha256_file(file) != expected:
                raise ArtifactError(f"{folder}: checksum mismatch for {name} (corrupt or tampered)")
    return manifest


def load_artifact(folder: str | Path) -> tuple[Reranker, dict[str, Any]]:
    """Verify and load an artifact's reranker; returns ``(reranker, manifest)``."""
    manifest = read_manifest(folder)
    return Reranker.load(folder), manifest
