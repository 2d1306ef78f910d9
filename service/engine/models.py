"""Load the three served models (embedder, reranker, reader) on the configured device and precision.

By default the service serves the trained models shipped in ``models/``: the G-Rerank reranker artifact and
the reader adapter it was trained through. ``GRERANK_ARTIFACT`` / ``GRERANK_READER_ARTIFACT`` point at other
artifacts, or ``none`` serves ``GRERANK_RERANKER`` / ``GRERANK_READER`` untrained (``default``: the
untrained MiniLM bi-encoder, G-Rerank's starting point, and the off-the-shelf SmolLM2). With
``GRERANK_ATTENTION_RERANKER`` set, documents are ranked by the reader's own attention heads instead, chosen
by a head-router artifact searched on that very reader. Checksums are verified; any failure propagates, so
the service never becomes ready on a bad artifact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grerank import model_paths
from grerank.artifact import SHIPPED as SHIPPED_RERANKER
from grerank.artifact import load_artifact
from grerank.decoder_reader import DecoderReader
from grerank.head_router import HeadRouter
from grerank.reader_artifact import load_configured_reader
from grerank.reranker import CONFIG_FILE, Reranker, build_reranker
from grerank.router_artifact import SHIPPED as SHIPPED_ROUTER
from grerank.router_artifact import load_router_artifact
from grerank.runtime import resolve_device, resolve_dtype
from grerank.sentence_encoder import SentenceEncoder
from service.settings import Settings

log = logging.getLogger(__name__)

UNTRAINED = "untrained default reranker"
TRAINED = "trained artifact"


@dataclass
class ModelInfo:
    status: (
        str  # TRAINED, UNTRAINED, "untrained reranker", "untrained reader" or "reranker folder (no manifest)"
    )
    source: str
    config: dict[str, Any]
    manifest: dict[str, Any] | None = None

    @property
    def trained(self) -> bool:
        return self.manifest is not None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "source": self.source, **self.config}
        if self.manifest is not None:
            # Everything but the per-file checksums, which say nothing to a client.
            out["manifest"] = {k: v for k, v in self.manifest.items() if k != "files"}
        return out


@dataclass
class Models:
    device: torch.device
    bf16: bool
    embedder: SentenceEncoder
    embedder_source: str
    reranker: Reranker
    reranker_info: ModelInfo
    reader: DecoderReader
    reader_info: ModelInfo
    router: HeadRouter | None = None  # set: rank by the reader's attention heads, not by the reranker
    router_info: ModelInfo | None = None

    @property
    def ranking_info(self) -> ModelInfo:
        """What ranks documents: the head router when one is served, else the reranker."""
        return self.router_info or self.reranker_info

    def describe(self) -> dict[str, Any]:
        out = {
            "device": str(self.device),
            "precision": "bf16" if self.bf16 else "fp32",
            "embedder": {"source": self.embedder_source, "dim": self.embedder.dim},
            "reranker": self.reranker_info.summary(),
            "reader": self.reader_info.summary() | {"family": self.reader.family},
            "ranking": "attention heads of the reader" if self.router else "reranker",
        }
        if self.router_info is not None:
            out["attention_reranker"] = self.router_info.summary()
        return out


def resolve_bf16(setting: str, device: torch.device) -> bool:
    return resolve_dtype(setting, device) == torch.bfloat16


def load_embedder(settings: Settings, device: torch.device) -> tuple[SentenceEncoder, str]:
    path = model_paths.resolve("embedder", settings.embedder)
    return SentenceEncoder.from_pretrained(path).to(device).eval(), str(path)


def reranker_artifact(settings: Settings) -> Path | None:
    """The reranker artifact folder to serve, if any (see ``GRERANK_ARTIFACT``)."""
    if settings.artifact == "none":
        return None
    if settings.artifact == "shipped":
        return SHIPPED_RERANKER if settings.reranker == model_paths.DEFAULT else None
    return Path(settings.artifact)


def load_reranker(settings: Settings, device: torch.device) -> tuple[Reranker, ModelInfo]:
    artifact = reranker_artifact(settings)
    if artifact is not None:
        reranker, manifest = load_artifact(artifact)
        info = ModelInfo(TRAINED, str(artifact), reranker.config(), manifest)
    else:
        path = model_paths.resolve("reranker", settings.reranker)
        if isinstance(path, Path) and (path / CONFIG_FILE).is_file():
            reranker = Reranker.load(path)
            info = ModelInfo("reranker folder (no manifest)", str(path), reranker.config())
        else:
            reranker = build_reranker(settings.reranker_architecture, path)
            status = UNTRAINED if settings.reranker == model_paths.DEFAULT else "untrained reranker"
            info = ModelInfo(status, str(path), reranker.config())
    return reranker.to(device).eval(), info


def load_reader(settings: Settings, device: torch.device, bf16: bool) -> tuple[DecoderReader, ModelInfo]:
    dtype = torch.bfloat16 if bf16 else torch.float32
    reader, manifest = load_configured_reader(
        settings.reader_artifact, settings.reader, "decoder", device, dtype
    )
    if manifest is None:
        return reader, ModelInfo("untrained reader", str(model_paths.resolve("reader", settings.reader)), {})
    source = "models/reader (shipped)" if settings.reader_artifact == "shipped" else settings.reader_artifact
    config = {"base_model": manifest["base_model"]["name_or_path"], "adapter_sha256": reader.adapter_id}
    return reader, ModelInfo(TRAINED, source, config, manifest)


def load_router(settings: Settings, reader: DecoderReader) -> tuple[HeadRouter | None, ModelInfo | None]:
    """The head router of ``GRERANK_ATTENTION_RERANKER``, verified against the served reader."""
    if settings.attention_reranker == "none":
        return None, None
    shipped = settings.attention_reranker == "shipped"
    folder = SHIPPED_ROUTER if shipped else Path(settings.attention_reranker)
    router, manifest = load_router_artifact(folder, reader)
    status = "static head set" if router.config.static else "RouteHead router"
    source = "models/router (shipped)" if shipped else str(folder)
    return router, ModelInfo(f"{status} ({TRAINED})", source, manifest["router"], manifest)


def load_models(settings: Settings, on_loaded: Callable[[str], None] | None = None) -> Models:
    """Load embedder, reranker and reader in turn; ``on_loaded(role)`` reports progress (for /readyz)."""
    device = resolve_device(settings.device)
    bf16 = resolve_bf16(settings.precision, device)
    log.info("loading models on %s (%s)", device, "bf16" if bf16 else "fp32")
    report = on_loaded or (lambda role: None)
    embedder, embedder_source = load_embedder(settings, device)
    report("embedder")
    reranker, reranker_info = load_reranker(settings, device)
    report("reranker")
    reader, reader_info = load_reader(settings, device, bf16)
    router, router_info = load_router(settings, reader)
    report("reader")
    return Models(
        device,
        bf16,
        embedder,
        embedder_source,
        reranker,
        reranker_info,
        reader,
        reader_info,
        router,
        router_info,
    )
