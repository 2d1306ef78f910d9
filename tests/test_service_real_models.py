"""``/answer`` with the real default models on the CPU, as a fresh clone serves them (the MiniLM embedder, the
shipped G-Rerank reranker and the shipped reader adapter over SmolLM2): a HotpotQA dev question over a small
demo index holding its 10 paragraphs and other questions'."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from grerank import qa_data
from service.storage.build_index import hotpot_documents
from tests.uvicorn_server import Server

pytestmark = pytest.mark.real_models

QUESTION = 0  # the first dev question; its paragraphs plus those of the next OTHERS questions form the index
OTHERS = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("real-service")
    srv = Server({"GRERANK_INDEX_DIR": str(tmp / "index")}, tmp / "server.log").start()
    try:
        yield srv.wait_ready(timeout=300)
    finally:
        srv.stop()


def test_answer_cites_the_supporting_paragraphs(server: Server) -> None:
    examples = qa_data.load_examples(qa_data.split_path("dev"), limit=QUESTION + OTHERS + 1)
    example = examples[QUESTION]
    passages = [p for e in examples for p in e.passages]
    documents = {d.id: d for d in hotpot_documents(passages)}  # the ids build_index gives these paragraphs
    body = [
        {"id": d.id, "title": d.title, "text": d.text, "metadata": d.metadata} for d in documents.values()
    ]
    with httpx.Client(base_url=server.url, timeout=300) as client:
        info = client.get("/info").json()
        assert info["models"]["reranker"]["status"] == "trained artifact"
        assert info["models"]["reader"]["status"] == "trained artifact"
        assert info["models"]["reader"]["manifest"]["base_model"]["spec"] == "default"
        assert client.post("/documents", json=body).status_code == 200

        response = client.post("/answer", json={"query": example.question})
        assert response.status_code == 200, response.text
        result = response.json()

    supporting = {
        d.id for d, sup in zip(hotpot_documents(example.passages), example.supporting, strict=True) if sup
    }
    cited = [c["id"] for c in result["citations"]]
    print(f"\nQ: {example.question}\ngold: {example.answer}\nanswer: {result['answer']!r}")
    print(f"cited: {[c['title'] for c in result['citations']]}\ntimings_ms: {result['timings_ms']}")
    assert result["answer"].strip()
    assert len(result["answer"].split()) <= 6  # a span in the dataset's style, not a sentence
    assert len(cited) == info["default_top_k"]
    assert supporting & set(cited), f"none of the supporting paragraphs {supporting} is cited: {cited}"
