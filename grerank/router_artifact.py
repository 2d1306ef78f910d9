"""The head-router artifact: a head router (grerank.head_router: weights, head embeddings, the query layer and
the selection rule) and the reader whose heads it routes.

Heads are only meaningful in the reader they were searched on, so the manifest (kind ``router``) names that
reader by content: the checksum of its base weights, its adapter's checksum (or none) and its prompt format.
Loading verifies every file and refuses a router for any other reader: over another reader's heads it would
rank, just badly.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from grerank.artifact import ArtifactError, read_manifest, weights_checksum, write_folder
from grerank.decoder_reader import DecoderReader
from grerank.head_router import HeadRouter

KIND = "router"
# The trained default router, committed with the code (its manifest holds the command that reproduces it).
SHIPPED = Path(__file__).resolve().parent.parent / "models" / "router"


def reader_identity(reader: DecoderReader) -> dict[str, Any]:
    """What a router's heads depend on: base weights (by content), adapter, prompt format."""
    return {
        "base_weights_sha256": weights_checksum(reader.model.config._name_or_path),
        "adapter_sha256": reader.adapter_id,
        "prompt": asdict(reader.prompt),
    }


def write_router_artifact(
    folder: str | Path, router: HeadRouter, reader: DecoderReader, **sections: Any
) -> Path:
    return write_folder(
        folder, KIND, router.save, router=asdict(router.config), reader=reader_identity(reader), **sections
    )


def load_router_artifact(folder: str | Path, reader: DecoderReader) -> tuple[HeadRouter, dict[str, Any]]:
    """Verify ``folder`` against its checksums and against ``reader``; returns ``(router, manifest)``."""
    manifest = read_manifest(folder, kind=KIND)
    expected, found = manifest["reader"], reader_identity(reader)
    for key, what in (
        ("base_weights_sha256", "base weights"),
        ("adapter_sha256", "reader adapter"),
        ("prompt", "prompt format"),
    ):
        if expected.get(key) != found[key]:
            raise ArtifactError(
                f"router artifact {folder} was searched on another reader: its {what} "
                f"{_short(expected.get(key))} differ from the served reader's {_short(found[key])}; "
                "train a router for this reader (python -m training.train_router) or serve the one it names"
            )
    router = HeadRouter.load(folder)
    config = router.config
    layers, heads = reader.model.config.num_hidden_layers, reader.model.config.num_attention_heads
    if (config.layers, config.heads) != (layers, heads):
        raise ArtifactError(
            f"router artifact {folder} routes {config.layers}x{config.heads} heads, not {layers}x{heads}"
        )
    return router, manifest


def _short(value: Any) -> str:
    if isinstance(value, str):
        return value[:12] + "..."
    return "none" if value is None else "(another format)"
