"""Exact inner-product search over L2-normalised embeddings (cosine), persisted atomically.

A FAISS ``IndexIDMap2`` over ``IndexFlatIP`` keyed by the document store's integer keys. The file holds a
small JSON header (format, dimension, count, the store generation it reflects, a sha256 of the payload) and
the serialised index; it is written to a temporary file, fsynced and renamed over the old one, so a reader
of the path sees the old index or the new one, never half of either.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

_MAGIC = b"GRERANK-FAISS\n"
_FORMAT = 1


class VectorIndexError(RuntimeError):
    """The index file is missing, truncated, corrupt or of another format."""


class VectorIndex:
    def __init__(self, dim: int, generation: int = 0, index: faiss.Index | None = None) -> None:
        self.dim = dim
        self.generation = generation
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    @classmethod
    def from_vectors(
        cls, keys: np.ndarray, vectors: np.ndarray | None, dim: int, generation: int
    ) -> VectorIndex:
        index = cls(dim, generation)
        if vectors is not None and len(keys):
            index.upsert(keys, vectors)
        return index

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def keys(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def upsert(self, keys: Sequence[int] | np.ndarray, vectors: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape [N, {self.dim}], got {vectors.shape}")
        self.remove(keys)
        self.index.add_with_ids(vectors, keys)

    def remove(self, keys: Sequence[int] | np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        if len(keys):
            self.index.remove_ids(faiss.IDSelectorBatch(keys))

    def search(
        self, query: np.ndarray, k: int, allowed: Sequence[int] | None = None
    ) -> list[tuple[int, float]]:
        """The ``k`` nearest keys with their inner products, best first, ties by key (insertion order)."""
        if k < 1 or len(self) == 0 or (allowed is not None and not len(allowed)):
            return []
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        k = min(k, len(self))
        params = None
        if allowed is not None:
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64)))
        scores, ids = self.index.search(query, k, params=params)
        hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
        return sorted(hits, key=lambda hit: (-hit[1], hit[0]))

    # ---- persistence ----

    def save(self, path: str | Path, **header: Any) -> None:
        """Write atomically: temp file in the same folder, fsync, rename, fsync the folder."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = faiss.serialize_index(self.index).tobytes()
        head = json.dumps(
            {
                **header,
                "format": _FORMAT,
                "dim": self.dim,
                "count": len(self),
                "generation": self.generation,
                "sha256": hashlib.sha256(payload).hexdigest(),
            }
        ).encode()
        tmp = _temporary(path, os.getpid())
        try:
            with tmp.open("wb") as fh:
                fh.write(_MAGIC + struct.pack("<Q", len(head)) + head)
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)

    @classmethod
    def load(cls, path: str | Path) -> tuple[VectorIndex, dict[str, Any]]:
        """The index and its header; raises :class:`VectorIndexError` on any inconsistency."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise VectorIndexError(f"cannot read {path}: {exc}") from exc
        if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 8:
            raise VectorIndexError(f"{path} is not a grerank vector index")
        (head_len,) = struct.unpack_from("<Q", data, len(_MAGIC))
        start = len(_MAGIC) + 8
        try:
            header = json.loads(data[start : start + head_len])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise VectorIndexError(f"{path}: unreadable header") from exc
        payload = data[start + head_len :]
        if header.get("format") != _FORMAT:
            raise VectorIndexError(f"{path}: format {header.get('format')!r}, expected {_FORMAT}")
        if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            raise VectorIndexError(f"{path}: checksum mismatch (truncated or corrupt)")
        index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
        loaded = cls(int(header["dim"]), int(header["generation"]), index)
        if len(loaded) != header.get("count") or index.d != loaded.dim:
            raise VectorIndexError(f"{path}: header does not match the index")
        return loaded, header


def _temporary(path: Path, pid: int | str) -> Path:
    return path.with_name(f".{path.name}.{pid}.tmp")


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete temporary files a killed writer left beside ``path`` (a process killed mid-``save`` never
    reaches its cleanup); those of a live process are kept. Returns the deleted paths."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(_temporary(path, "*").name):
        pid = tmp.name[len(path.name) + 2 : -len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    # The rename itself is durable only once the directory entry is on disk.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
