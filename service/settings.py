"""Service configuration, read from ``GRERANK_*`` environment variables (pydantic-settings).

Every field below is one variable: ``reranker`` is ``GRERANK_RERANKER``, ``api_keys`` is
``GRERANK_API_KEYS``, and so on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRERANK_", extra="ignore")

    # ---- models ----
    embedder: str = Field("default", description="FAISS embedder: 'default' (MiniLM) or a local HF folder.")
    reranker: str = Field(
        "default",
        description="Reranker when no artifact is set: 'default' (untrained MiniLM), a HF folder, "
        "or a saved reranker folder (with reranker.json).",
    )
    reranker_architecture: Literal["bi-encoder", "cross-encoder"] = Field(
        "bi-encoder", description="Architecture built around GRERANK_RERANKER when it is a plain HF folder."
    )
    artifact: Path | None = Field(
        None, description="Trained G-Rerank artifact folder; the service is never ready if it fails to load."
    )
    reader: str = Field("default", description="Reader: 'default' (SmolLM2-135M-Instruct) or a HF folder.")
    model_name: str = Field("grerank", description="Model name reported in rerank responses.")

    # ---- hardware ----
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on a GPU or a CPU with AVX512-BF16/AMX, fp32 otherwise."
    )

    # ---- storage ----
    index_dir: Path = Field(Path("var/index"), description="Folder of the SQLite store and the FAISS index.")

    # ---- request limits and defaults ----
    max_documents: int = Field(1000, ge=1, description="Documents per /rerank request.")
    max_document_chars: int = Field(20_000, ge=1, description="Characters per document.")
    max_query_chars: int = Field(2_000, ge=1, description="Characters per query.")
    max_upsert_documents: int = Field(1000, ge=1, description="Documents per POST /documents request.")
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Request body size limit.")
    default_candidates: int = Field(20, ge=1, description="Documents retrieved for /answer by default.")
    max_candidates: int = Field(200, ge=1, description="Upper bound of 'candidates' and /retrieve 'top_k'.")
    top_k: int | None = Field(
        None, ge=1, description="Documents the reader sees; default: the artifact's k, else 3."
    )
    default_top_k: int = Field(3, ge=1, description="top_k when neither the request nor an artifact sets it.")

    # ---- model work ----
    rerank_batch_size: int = Field(32, ge=1, description="Documents per reranker forward pass.")
    embed_batch_size: int = Field(32, ge=1, description="Texts per embedder forward pass when indexing.")
    reader_max_new_tokens: int = Field(32, ge=1, le=512)
    reader_cache_mb: int = Field(512, ge=0, description="Memory for cached per-document reader states.")

    # ---- access ----
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated keys; when set, API routes need 'Authorization: Bearer <key>' "
        "or 'X-API-Key'. Probes and /metrics stay open.",
    )

    @field_validator("artifact", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # GRERANK_ARTIFACT= (empty, as templates often leave it) means "no artifact", not the current folder.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value
