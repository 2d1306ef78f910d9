"""Head selection and routing (grerank.head_router, grerank.router_artifact, training.train_router) and the
service ranking by the reader's attention, on tiny random models."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import httpx
import pytest
import torch

from grerank.checksums import ArtifactError
from grerank.decoder_reader import DecoderReader
from grerank.head_router import HeadRouter, RouterConfig, aggregate, attention_scores, select
from grerank.passage import Passage
from grerank.question_attention import calibrated_attention, icr_aggregate
from grerank.router_artifact import load_router_artifact, write_router_artifact
from tests.test_reader_training import other_base, perturbed_lora
from tests.uvicorn_server import Server, tiny_env
from training.train_router import fit_sets, search_heads, set_quality

PASSAGES = [
    Passage("", "The alpha river flows north to the cold sea."),
    Passage("", "Beta is a small town known for its glass."),
    Passage("", "Gamma rays come from the decay of nuclei."),
]
QUESTION = "where does the river flow?"


@pytest.fixture(scope="module")
def reader(tiny_llama_dir: Path) -> DecoderReader:
    return DecoderReader.from_pretrained(tiny_llama_dir)


def every_head(reader: DecoderReader) -> torch.Tensor:
    config = reader.model.config
    return torch.ones(config.num_hidden_layers, config.num_attention_heads, dtype=torch.bool)


def hidden(reader: DecoderReader) -> int:
    return reader.model.config.hidden_size


def test_all_heads_static_aggregation_equals_icr(reader: DecoderReader) -> None:
    states = reader.encode_documents(PASSAGES)
    router = HeadRouter.fixed(every_head(reader), hidden(reader))
    routed = attention_scores(reader, router, QUESTION, states)
    icr = icr_aggregate(calibrated_attention(reader, QUESTION, states), token_filter=False)
    assert torch.allclose(routed, icr, atol=1e-7, rtol=1e-6)
    # One head: exactly that head's calibrated mass.
    one = torch.zeros_like(every_head(reader))
    one[1, 0] = True
    single = attention_scores(reader, HeadRouter.fixed(one, hidden(reader)), QUESTION, states)
    tokens = calibrated_attention(reader, QUESTION, states)
    assert torch.allclose(single, torch.stack([t[1, 0].sum() for t in tokens]), atol=1e-7)


def test_selection_by_top_m_or_by_probability() -> None:
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.5], [-3.0, -2.0, -1.0, -4.0]])
    assert select(logits, 2).tolist() == [[True, False, True, False], [False, True, True, False]]
    # Probability >= 0.5 (logit >= 0), and never an empty set.
    assert select(logits, 0).tolist() == [[True, False, True, True], [False, False, True, False]]
    masses = torch.arange(24.0).view(2, 3, 4)
    heads = torch.tensor([[True, False, False], [False, False, True]])
    assert aggregate(masses, heads).tolist() == (masses[0, 0] + masses[1, 2]).tolist()


def test_greedy_search_finds_a_head_set_that_ranks_the_gold_first() -> None:
    gold = torch.tensor([False, True, False, True, False])
    masses = torch.zeros(3, 4, 5)  # heads that tell the candidates apart in no way
    # Neither head alone ranks both gold candidates first (each puts another between them); together they do.
    masses[0, 1] = torch.tensor([0.0, 1.0, 0.8, 0.5, 0.0])
    masses[2, 3] = torch.tensor([0.0, 0.2, -0.8, 1.0, 0.6])
    chosen = search_heads(masses, gold, max_set=4)
    together = aggregate(masses, chosen)
    assert set(together.argsort(descending=True)[:2].tolist()) == {1, 3}
    assert set_quality(together[None], gold) > set_quality(masses[0, 1][None], gold)


def toy_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries of two kinds, each served by its own three heads of 4 x 4, which the per-query searches
    pick 95%, 75% and 60% of the time."""
    generator = torch.Generator().manual_seed(seed)
    kinds = torch.randint(0, 2, (400,), generator=generator)
    pooled = torch.randn(400, 2, 16, generator=generator) * 0.1
    pooled[:, 1, 0] += torch.where(kinds == 1, 1.0, -1.0)
    picked = torch.rand(400, 3, generator=generator) < torch.tensor([0.95, 0.75, 0.6])
    targets = torch.zeros(400, 4, 4, dtype=torch.bool)
    targets[kinds == 0, 0, :3] = picked[kinds == 0]
    targets[kinds == 1, 3, 1:] = picked[kinds == 1]
    allowed = torch.zeros_like(targets)
    allowed[kinds == 0, 0, :3] = True
    allowed[kinds == 1, 3, 1:] = True
    return pooled, targets, allowed


def test_the_router_learns_per_query_heads_and_sparsity_prunes_them() -> None:
    pooled, targets, allowed = toy_problem()
    config = RouterConfig(layers=4, heads=4, hidden=16, query_layer=1, dim=8, top_m=0)
    args = argparse.Namespace(lr=3e-2, epochs=300, sparsity=0.0)
    counts = []
    for sparsity in (0.0, 1.0, 3.0):
        args.sparsity = sparsity
        chosen = fit_sets(pooled, targets, config, args, seed=0).select(pooled)
        assert not bool((chosen & ~allowed).any())  # routed per query: only heads of the query's kind
        counts.append(int(chosen.sum()))
    per_query = [c / len(pooled) for c in counts]
    # Unpruned, about the 2.3 heads a query's search picks; strongly pruned, its one surest head.
    assert per_query[0] > 2.2 and per_query[2] == pytest.approx(1, abs=0.1), per_query
    assert counts[0] > counts[1] > counts[2], counts


def test_a_router_artifact_is_refused_for_another_reader(
    reader: DecoderReader, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    router = HeadRouter(RouterConfig(2, 4, hidden(reader), query_layer=1, top_m=2))
    folder = write_router_artifact(tmp_path / "router", router, reader, command="test")
    loaded, manifest = load_router_artifact(folder, reader)
    pooled = torch.randn(3, 2, hidden(reader))
    assert torch.equal(loaded(pooled), router(pooled)) and manifest["router"]["top_m"] == 2

    other = DecoderReader.from_pretrained(other_base(tiny_llama_dir, tmp_path / "other"))
    with pytest.raises(ArtifactError, match="searched on another reader: its base weights"):
        load_router_artifact(folder, other)
    adapted = DecoderReader.from_pretrained(tiny_llama_dir)
    perturbed_lora(adapted)
    adapted.adapter_id = "0" * 64
    with pytest.raises(ArtifactError, match="its reader adapter"):
        load_router_artifact(folder, adapted)
    with (folder / "router.json").open("a") as fh:
        fh.write(" ")
    with pytest.raises(ArtifactError, match="checksum mismatch for router.json"):
        load_router_artifact(folder, reader)


def test_the_service_ranks_by_the_routed_heads(
    reader: DecoderReader, tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    router = HeadRouter(RouterConfig(2, 4, hidden(reader), query_layer=1, top_m=3))
    torch.nn.init.normal_(router.head_embeddings)
    good = write_router_artifact(tmp_path / "router", router, reader, command="test")
    wrong_reader = tmp_path / "wrong"
    shutil.copytree(good, wrong_reader)
    manifest = (wrong_reader / "manifest.json").read_text()
    weights = load_router_artifact(good, reader)[1]["reader"]["base_weights_sha256"]
    (wrong_reader / "manifest.json").write_text(manifest.replace(weights, "f" * 64))

    env = tiny_env(tiny_bert_dir, tiny_llama_dir, tmp_path / "index") | {
        "GRERANK_ATTENTION_RERANKER": str(wrong_reader)
    }
    server = Server(env, tmp_path / "wrong.log").start()
    try:
        readyz = server.wait_failed()
        assert readyz.status_code == 503 and "searched on another reader" in readyz.json()["reason"]
    finally:
        server.stop()

    env = tiny_env(tiny_bert_dir, tiny_llama_dir, tmp_path / "index") | {
        "GRERANK_ATTENTION_RERANKER": str(good),
        "GRERANK_MAX_ATTENTION_DOCUMENTS": "5",
    }
    server = Server(env, tmp_path / "good.log").start()
    try:
        ready = server.wait_ready().wait_until("/readyz", 200).json()
        assert ready["attention_reranker"].startswith("RouteHead router")
        assert ready["models"]["attention_reranker"] == str(good)
        info = httpx.get(server.url + "/info").json()["models"]
        assert info["ranking"] == "attention heads of the reader" and info["attention_reranker"]["top_m"] == 3

        texts = [p.text for p in PASSAGES]
        body = {"query": QUESTION, "documents": texts, "raw_scores": True}
        first = httpx.post(server.url + "/rerank", json=body, timeout=60).json()
        again = httpx.post(server.url + "/rerank", json=body, timeout=60).json()
        assert first["results"] == again["results"]  # deterministic
        expected = attention_scores(reader, router, QUESTION, reader.encode_documents(PASSAGES))
        got = {r["index"]: r["relevance_score"] for r in first["results"]}
        assert torch.allclose(torch.tensor([got[i] for i in range(3)]), expected, atol=1e-5)
        assert [r["index"] for r in first["results"]] == expected.argsort(
            descending=True, stable=True
        ).tolist()
        assert first["meta"]["reranker"].startswith("RouteHead router")

        too_many = httpx.post(server.url + "/rerank", json={"query": QUESTION, "documents": texts * 2})
        assert too_many.status_code == 400 and "GRERANK_MAX_ATTENTION_DOCUMENTS" in too_many.text

        docs = [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)]
        assert httpx.post(server.url + "/documents", json={"documents": docs}, timeout=60).status_code == 200
        answer = httpx.post(server.url + "/answer", json={"query": QUESTION, "top_k": 2}, timeout=60).json()
        assert len(answer["citations"]) == 2 and "rerank" in answer["timings_ms"]
    finally:
        server.stop()
