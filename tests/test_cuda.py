"""The CUDA path: reranker backend, reader, a G-Rerank step and the service on ``cuda``, with tiny models.

Skipped where no CUDA device is visible, unless ``GRERANK_REQUIRE_CUDA`` is set (``bench/gpu_check.sh`` sets
it, so that a GPU check cannot pass by skipping). Self-contained: the tokenizer and models are built here
from configs, so nothing but this checkout has to reach the GPU machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from bench.gpu import save_word_level_models
from grerank.artifact import write_artifact
from grerank.decoder_reader import DecoderReader
from grerank.passage import Passage
from grerank.reranker import build_reranker
from service.engine.rerank_backend import RerankBackend
from tests.uvicorn_server import Server
from training import objectives

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available() and not os.environ.get("GRERANK_REQUIRE_CUDA"),
        reason="no CUDA device (bench/gpu_check.sh runs these on a GPU machine)",
    ),
]

TEXTS = [
    "The alpha river flows north to the cold sea.",
    "Beta is a small town known for its glass.",
    "Gamma rays are produced by radioactive decay of nuclei.",
    "Delta airlines flies from atlanta to many cities.",
    "The band released its debut album in a small city club.",
]
QUERY = "where does the alpha river flow?"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A word-level BERT vocabulary of the texts above, and a tiny BERT and Llama over it."""
    words = sorted({w.strip(".,?!").lower() for t in [*TEXTS, QUERY] for w in t.split()} | set("abcdefghij"))
    shapes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    models = {
        "bert": lambda vocab: BertModel(BertConfig(vocab_size=vocab, max_position_embeddings=512, **shapes)),
        "llama": lambda vocab: LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                num_key_value_heads=2,
                pad_token_id=0,
                eos_token_id=3,
                initializer_range=0.3,  # attention far from uniform: the answer depends on the documents
                **shapes,
            )
        ),
    }
    return save_word_level_models(tmp_path_factory.mktemp("cuda-models"), [*"?.,:", *words], models)


def test_rerank_backend_on_cuda_is_batch_invariant_and_matches_cpu(model_dirs: dict[str, Path]) -> None:
    reranker = build_reranker("bi-encoder", model_dirs["bert"])
    cpu = RerankBackend(reranker, torch.float32)
    cuda = RerankBackend(reranker.to("cuda"), torch.bfloat16)
    assert cuda.device.type == "cuda"
    sequences = cuda.encode(QUERY, TEXTS)
    together = cuda.forward(sequences)
    for i, sequence in enumerate(sequences):  # each output the same bits alone as in the mixed pass
        assert torch.equal(cuda.forward([sequence]), together[i : i + 1])
    expected = cpu.scores(cpu.forward(cpu.encode(QUERY, TEXTS)))
    assert torch.allclose(cuda.scores(together), expected, atol=0.05)


def test_reader_on_cuda_matches_cpu_with_its_mask_gradient(model_dirs: dict[str, Path]) -> None:
    passages = [Passage(f"t{i}", text) for i, text in enumerate(TEXTS[:3])]
    results = []
    for device in ("cpu", "cuda"):
        reader = DecoderReader.from_pretrained(model_dirs["llama"], device=device)
        mask = torch.tensor([[0.9, 0.2, 0.5]], requires_grad=True)
        nll = reader.answer_nll([QUERY], ["north"], [reader.encode_documents(passages)], mask)
        nll.sum().backward()
        results.append((nll.detach().cpu(), mask.grad))
        streamed = "".join(reader.stream_answer(QUERY, reader.encode_documents(passages[:1]), 4))
        assert isinstance(streamed, str)
    (cpu_nll, cpu_grad), (cuda_nll, cuda_grad) = results
    assert torch.allclose(cuda_nll, cpu_nll, atol=1e-3)
    assert torch.allclose(cuda_grad, cpu_grad, atol=1e-4, rtol=1e-2)


def test_grerank_step_on_cuda_gives_the_cpu_gradient(model_dirs: dict[str, Path]) -> None:
    """The reader's answer loss under a soft mask of the reranker's scores, back into the reranker: the same
    gradient on both devices; and a G-Rerank step (Gumbel draws from the device's own generator) on cuda."""
    grads = []
    for device in ("cpu", "cuda"):
        reranker = build_reranker("bi-encoder", model_dirs["bert"]).to(device).eval()  # no dropout
        reader = DecoderReader.from_pretrained(model_dirs["llama"], device=device)
        states = reader.encode_documents([Passage(f"t{i}", t) for i, t in enumerate(TEXTS)])
        scores = torch.stack(reranker([QUERY], [TEXTS])).float()
        mask = torch.sigmoid(50 * (scores - scores.mean()))  # the tiny encoder's cosines are close together
        reader.answer_nll([QUERY], ["north"], [states], mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten().cpu() for p in reranker.parameters() if p.grad is not None]))
    cpu, cuda = (g.double() for g in grads)
    assert cpu.abs().sum() > 0
    assert cpu @ cuda / (cpu.norm() * cuda.norm()) > 0.99  # F.cosine_similarity's eps would swamp small norms
    reranker.zero_grad()
    scores = torch.stack(reranker([QUERY], [TEXTS])).float()
    generator = torch.Generator(device=device).manual_seed(0)
    objectives.grerank_nll(scores, reader, [QUERY], ["north"], [states], 2, 0.5, 4.0, generator, 4).backward()
    step = torch.cat([p.grad.flatten() for p in reranker.parameters() if p.grad is not None])
    assert torch.isfinite(step).all() and step.abs().sum() > 0


@pytest.fixture(scope="module")
def server(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("cuda-service")
    artifact = write_artifact(
        tmp / "reranker", build_reranker("bi-encoder", model_dirs["bert"]), hyperparameters={}, metrics={}
    )
    env = {
        "GRERANK_EMBEDDER": str(model_dirs["bert"]),
        "GRERANK_ARTIFACT": str(artifact),
        "GRERANK_READER": str(model_dirs["llama"]),
        "GRERANK_INDEX_DIR": str(tmp / "index"),
        "GRERANK_DEVICE": "cuda",
        "GRERANK_READER_MAX_NEW_TOKENS": "4",
    }
    srv = Server(env, tmp / "server.log").start()
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def test_service_reranks_and_answers_on_cuda(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        assert client.get("/info").json()["models"]["device"].startswith("cuda")
        ranked = client.post("/rerank", json={"query": QUERY, "documents": TEXTS}).json()["results"]
        assert sorted(r["index"] for r in ranked) == list(range(len(TEXTS)))
        again = client.post("/rerank", json={"query": QUERY, "documents": TEXTS[::-1]}).json()["results"]
        scores = {TEXTS[r["index"]]: r["relevance_score"] for r in ranked}
        assert all(scores[TEXTS[::-1][r["index"]]] == r["relevance_score"] for r in again)
        docs = [{"id": f"d{i}", "title": f"t{i}", "text": t} for i, t in enumerate(TEXTS)]
        assert client.post("/documents", json={"documents": docs}).status_code in (200, 201)
        answer = client.post("/answer", json={"query": QUERY, "stream": False})
        assert answer.status_code == 200 and "answer" in answer.json()
