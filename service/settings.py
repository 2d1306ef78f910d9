"""Service configuration, read from ``GRERANK_*`` environment variables (pydantic-settings).

Every field below is one variable: ``reranker`` is ``GRERANK_RERANKER``, ``api_keys`` is
``GRERANK_API_KEYS``, and so on.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Routes for orchestrators and scrapers, which may be left open when API keys are set (GRERANK_OPEN_PATHS).
OPERATIONS_PATHS = ("/healthz", "/readyz", "/metrics")
# A configured key written as its sha256 digest, so the plain key need not be in the environment.
DIGEST_PREFIX = "sha256:"
# Generous on purpose: CPU inference of the largest allowed request must fit; tighten them per deployment.
DEFAULT_STAGE_TIMEOUTS = {"embed": 30.0, "retrieve": 30.0, "rerank": 120.0, "read": 120.0, "index": 600.0}


class Settings(BaseSettings):
    # hide_input_in_errors: a rejected setting is named, never echoed (it may hold or sit beside an API key).
    model_config = SettingsConfigDict(env_prefix="GRERANK_", extra="ignore", hide_input_in_errors=True)

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
    artifact: str = Field(
        "shipped",
        description="Trained reranker artifact: 'shipped' (the G-Rerank reranker in models/reranker, served "
        "when GRERANK_RERANKER is 'default'), a folder, or 'none' (serve GRERANK_RERANKER untrained). The "
        "service is never ready if it fails to load.",
    )
    reader: str = Field("default", description="Reader: 'default' (SmolLM2-135M-Instruct) or a HF folder.")
    reader_artifact: str = Field(
        "shipped",
        description="Trained reader adapter: 'shipped' (models/reader, trained for the default reader; "
        "another GRERANK_READER is served untrained), a reader artifact folder, or 'none'. Refused (never "
        "ready) if its checksums or its base model's weights do not match.",
    )
    attention_reranker: str = Field(
        "none",
        description="Rank documents (/rerank and /answer) by the reader's own attention heads instead of the "
        "reranker: 'shipped' (the head router in models/router), a router artifact folder, or 'none'. "
        "Refused (never ready) if the router was searched on another reader than the one served.",
    )
    model_name: str = Field("grerank", description="Model name reported in rerank responses.")

    # ---- hardware ----
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on a GPU or a CPU with AVX512-BF16/AMX, fp32 otherwise."
    )

    # ---- storage ----
    index_dir: Path = Field(Path("var/index"), description="Folder of the SQLite store and the FAISS index.")
    store_url: str | None = Field(
        None,
        description="postgresql://... : keep documents in this PostgreSQL database, shared by every replica, "
        "each replica's FAISS index following its change log; unset: the embedded SQLite store in index_dir.",
    )
    store_poll_ms: int = Field(
        1000, ge=10, description="With a PostgreSQL store: poll its change log this often besides LISTEN."
    )
    max_index_lag_s: float = Field(
        10.0, gt=0, description="With a PostgreSQL store: /readyz answers 503 while the index lags more."
    )

    # ---- request limits and defaults ----
    max_documents: int = Field(1000, ge=1, description="Documents per /rerank request.")
    max_attention_documents: int = Field(
        100,
        ge=1,
        description="Documents per ranking by the reader's attention (GRERANK_ATTENTION_RERANKER): all "
        "are read in one reader pass, about 3.5 MB of states each.",
    )
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
    rerank_batch_size: int = Field(
        64,
        ge=1,
        description="Texts per reranker forward pass at most; binds before GRERANK_MAX_BATCH_TOKENS "
        "for texts under 128 tokens (64 x 128 = 8192).",
    )
    max_batch_tokens: int = Field(
        8192,
        ge=256,
        description="Tokens per reranker forward pass; the rerank work of concurrent "
        "requests shares passes up to it. Larger: more throughput, a longer wait for other model work.",
    )
    rerank_cache_mb: int = Field(
        64,
        ge=0,
        description="Memory for reranker outputs of sequences read before (least recently used dropped "
        "first); a bi-encoder then encodes each document once, about 1.8 KB a document for the default "
        "MiniLM. 0: off.",
    )
    embed_batch_size: int = Field(32, ge=1, description="Texts per embedder forward pass when indexing.")
    reader_max_new_tokens: int = Field(32, ge=1, le=512)
    reader_cache_mb: int = Field(512, ge=0, description="Memory for cached per-document reader states.")
    reader_cache_disk_mb: int = Field(
        0,
        ge=0,
        description="Disk for per-document reader states, a tier that survives restarts (least recently "
        "used files removed first); 0: memory only. About 3.5 MB per 150-token document for the default "
        "reader in bf16.",
    )
    reader_cache_dir: Path | None = Field(
        None, description="Folder of that disk tier; default: GRERANK_INDEX_DIR/reader-states."
    )
    precompute_reader_states: bool = Field(
        False,
        description="Encode a document's reader states when it is indexed (POST /documents), so /answer "
        "pays only for its question and answer tokens; kept within the two budgets above. Decoder readers "
        "only: a FiD reader's states depend on the question.",
    )

    # ---- overload and timeouts ----
    max_queue: int = Field(
        32,
        ge=1,
        description="Requests for model work admitted at once (waiting for or on the model worker); "
        "beyond it 429 with Retry-After.",
    )
    max_wait_ms: int = Field(
        3000,
        ge=1,
        description="Admit a model request only if its predicted time to answer (from the recent service "
        "rate and the requests ahead of it) is within this; else 429 with Retry-After.",
    )
    shed_delay_ms: int = Field(
        1000,
        ge=0,
        description="Hold a refusal (429) this long before answering it, so clients that retry at once "
        "cannot spend the CPU on refusals; at most Retry-After.",
    )
    stage_timeouts: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=lambda: dict(DEFAULT_STAGE_TIMEOUTS),
        description="Seconds per pipeline stage, e.g. 'rerank=30,read=60' (unnamed stages keep their "
        "default); over it a 504 naming the stage.",
    )

    # ---- access ----
    # repr=False: the keys never appear in a printed or logged Settings.
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        repr=False,
        description="Comma-separated keys with full access, plain or as 'sha256:<hex digest>'; when any key "
        "is set, API routes need 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.",
    )
    read_api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        repr=False,
        description="Comma-separated read-only keys (plain or 'sha256:<hex>'): every API route but "
        "POST /documents and DELETE /documents/{id} (403).",
    )
    open_paths: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(OPERATIONS_PATHS),
        description="Which of /healthz, /readyz, /metrics answer without a key when keys are set "
        "(comma-separated; empty: none).",
    )

    # ---- logs ----
    log_format: Literal["json", "text"] = Field(
        "json", description="json: one JSON object per line, with the request id; text: Python's default."
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("artifact", "reader_artifact", mode="before")
    @classmethod
    def _empty_is_shipped(cls, value: object) -> object:
        # GRERANK_ARTIFACT= (empty, as templates often leave it) means unset, not the current folder;
        # None (from code) means no artifact.
        if value is None:
            return "none"
        return "shipped" if isinstance(value, str) and not value.strip() else value

    @field_validator("attention_reranker", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return "none" if value is None or (isinstance(value, str) and not value.strip()) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("api_keys", "read_api_keys", "open_paths", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("api_keys", "read_api_keys")
    @classmethod
    def _check_digests(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if key.startswith(DIGEST_PREFIX) and not re.fullmatch(r"[0-9a-f]{64}", key[len(DIGEST_PREFIX) :]):
                # Said without the value: a malformed entry may be a key pasted into the wrong place.
                raise ValueError(f"a '{DIGEST_PREFIX}' key must be followed by 64 lowercase hex digits")
        return keys

    @field_validator("open_paths")
    @classmethod
    def _check_open_paths(cls, paths: list[str]) -> list[str]:
        unknown = set(paths) - set(OPERATIONS_PATHS)
        if unknown:
            raise ValueError(f"only {', '.join(OPERATIONS_PATHS)} can be open, not {sorted(unknown)}")
        return paths

    @field_validator("stage_timeouts", mode="before")
    @classmethod
    def _parse_timeouts(cls, value: object) -> object:
        if isinstance(value, str):
            pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError("expected 'stage=seconds,...', e.g. 'rerank=30,read=60'")
            value = {name.strip(): seconds.strip() for name, seconds in pairs}
        return value

    @field_validator("stage_timeouts")
    @classmethod
    def _check_timeouts(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = set(value) - set(DEFAULT_STAGE_TIMEOUTS)
        if unknown:
            stages = ", ".join(DEFAULT_STAGE_TIMEOUTS)
            raise ValueError(f"unknown stages {sorted(unknown)}; the stages are {stages}")
        if any(not seconds > 0 for seconds in value.values()):
            raise ValueError("stage timeouts must be positive")
        return {**DEFAULT_STAGE_TIMEOUTS, **value}
