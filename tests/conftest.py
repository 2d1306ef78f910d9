"""Shared fixtures: tiny randomly initialised models (Llama, BERT, T5) saved as Hugging Face folders.

They are built from configs in about a second and share the default MiniLM WordPiece tokenizer, so every
model-shaped code path can be tested fast; tests marked ``real_models`` use the real defaults instead.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from grerank import model_paths
from tests.postgres_server import PostgresServer


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real default MiniLM folder (embedder and reranker starting point)."""
    return model_paths.default_embedder_dir()


@pytest.fixture(scope="session")
def tokenizer_dir(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(default_model_dir).save_pretrained(folder)
    return folder


def _save(model: torch.nn.Module, tokenizer_dir: Path, folder: Path) -> Path:
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=30522,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=101,
        eos_token_id=102,
    )
    return _save(LlamaForCausalLM(config), tokenizer_dir, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=512,
    )
    return _save(BertModel(config), tokenizer_dir, tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_t5_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=30522,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=102,
        decoder_start_token_id=0,
    )
    return _save(T5ForConditionalGeneration(config), tokenizer_dir, tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(scope="session")
def copy_reader_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.synthetic_qa import build_copy_reader

    return build_copy_reader(tokenizer_dir, tmp_path_factory.mktemp("copy-reader"))


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL cluster for the session (initdb, a free loopback port), removed at the end."""
    # Directly under /tmp: as root the server runs as the postgres user, who cannot enter pytest's folders.
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="grerank-pg-"))).init()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def postgres_url(postgres: PostgresServer, request: pytest.FixtureRequest) -> str:
    """An empty database of its own for one test."""
    return postgres.fresh_database("t_" + uuid.uuid4().hex[:12])
