"""The document-state cache shared by training and the service: content keys, memory LRU, disk tier."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from grerank.decoder_reader import DecoderReader
from grerank.doc_state_cache import DocStateCache
from grerank.fid_reader import FiDReader
from grerank.passage import Passage

PASSAGES = [Passage("A", "alpha river"), Passage("B", "beta town glass"), Passage("C", "gamma rays decay")]


class CountingReader(DecoderReader):
    def encode_documents(self, passages, question=None, batch_size=1):
        self.encoded = getattr(self, "encoded", []) + [p.title for p in passages]
        return super().encode_documents(passages, question, batch_size)


@pytest.fixture(scope="module")
def reader(tiny_llama_dir: Path) -> CountingReader:
    return CountingReader.from_pretrained(tiny_llama_dir)


def nbytes(states: torch.Tensor) -> int:
    return states.numel() * states.element_size()


def test_each_passage_is_encoded_once_and_states_are_unchanged(reader: CountingReader) -> None:
    reader.encoded = []
    cache = DocStateCache(reader, memory_bytes=1 << 30)
    first = cache.states(PASSAGES)
    again = cache.states(PASSAGES[::-1])
    assert reader.encoded == ["A", "B", "C"] and cache.hits == 3 and cache.misses == 3
    assert all(torch.equal(a, b) for a, b in zip(first, again[::-1], strict=True))
    fresh = reader.encode_documents(PASSAGES[1:2])[0]
    assert torch.equal(first[1], fresh)


def test_memory_is_bounded_and_least_recently_used_leaves_first(reader: CountingReader) -> None:
    sizes = [nbytes(s) for s in reader.encode_documents(PASSAGES)]
    cache = DocStateCache(reader, memory_bytes=sizes[0] + sizes[1])
    cache.states(PASSAGES[:2])
    cache.states(PASSAGES[:1])  # A is now the most recently used
    reader.encoded = []
    cache.states(PASSAGES[2:])  # C pushes out B, not A
    assert len(cache) == 2 and cache.memory_bytes <= sizes[0] + sizes[1]
    cache.states(PASSAGES[:2])
    assert reader.encoded == ["C", "B"]


def test_disk_tier_survives_a_restart_and_respects_its_budget(reader: CountingReader, tmp_path: Path) -> None:
    cache = DocStateCache(reader, memory_bytes=0, disk_dir=tmp_path, disk_bytes=1 << 30)
    written = cache.states(PASSAGES)
    reader.encoded = []
    restarted = DocStateCache(reader, memory_bytes=0, disk_dir=tmp_path, disk_bytes=1 << 30)
    read = restarted.states(PASSAGES)
    assert reader.encoded == [] and restarted.disk_hits == 3
    assert all(torch.equal(a, b) for a, b in zip(written, read, strict=True))

    one_file = max(f.stat().st_size for f in tmp_path.rglob("*.pt"))
    small = DocStateCache(reader, memory_bytes=0, disk_dir=tmp_path / "small", disk_bytes=2 * one_file)
    small.states(PASSAGES)
    assert len(list((tmp_path / "small").rglob("*.pt"))) <= 2 and small.disk_bytes <= 2 * one_file


def test_keys_depend_on_the_reader_and_for_fid_on_the_question(
    reader: CountingReader, tiny_t5_dir: Path
) -> None:
    other = DecoderReader.from_pretrained(reader.model.config._name_or_path, max_document_tokens=8)
    mine, theirs = DocStateCache(reader, 0), DocStateCache(other, 0)
    assert mine.key(PASSAGES[0]) != theirs.key(PASSAGES[0])  # another input format, other states
    assert mine.key(PASSAGES[0], "q1") == mine.key(PASSAGES[0], "q2")  # decoder documents stand alone
    fid = DocStateCache(FiDReader.from_pretrained(tiny_t5_dir), 0)
    assert fid.key(PASSAGES[0], "q1") != fid.key(PASSAGES[0], "q2")


def test_keys_do_not_depend_on_the_thread_count_but_on_every_embedding_weight(tiny_llama_dir: Path) -> None:
    reader = DecoderReader.from_pretrained(tiny_llama_dir)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = DocStateCache(reader, 0).key(PASSAGES[0])
        torch.set_num_threads(2)
        assert DocStateCache(reader, 0).key(PASSAGES[0]) == one
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        weight = reader.model.get_input_embeddings().weight
        weight[-1, -1] = torch.nextafter(weight[-1, -1], torch.tensor(float("inf")))
    assert DocStateCache(reader, 0).key(PASSAGES[0]) != one  # a one-ulp change is another model
