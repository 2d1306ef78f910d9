"""Every route of the service under a real uvicorn on a loopback port, with tiny models.

The reranker comes from a real (tiny) G-Rerank artifact, so the artifact path is what is exercised here; the
untrained default is exercised by ``test_service_real_models.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cohere
import httpx
import pytest
import torch

from grerank import qa_data
from grerank.artifact import load_artifact, write_artifact
from grerank.reranker import build_reranker
from tests.uvicorn_server import Server

API_KEY = "secret"
QUERY = "Which band released the album and where did they first perform?"


@pytest.fixture(scope="module")
def artifact_dir(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    reranker = build_reranker("bi-encoder", tiny_bert_dir)
    return write_artifact(
        tmp_path_factory.mktemp("artifact") / "reranker",
        reranker,
        hyperparameters={"k": 2, "tau": 0.5, "kappa": 1.0, "n": 20},
        metrics={"dev": {"recall@2": 0.5}},
    )


@pytest.fixture(scope="module")
def server(
    tiny_bert_dir: Path, tiny_llama_dir: Path, artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("service")
    env = {
        "GRERANK_EMBEDDER": str(tiny_bert_dir),
        "GRERANK_ARTIFACT": str(artifact_dir),
        "GRERANK_READER": str(tiny_llama_dir),
        "GRERANK_INDEX_DIR": str(tmp / "index"),
        "GRERANK_DEVICE": "cpu",
        "GRERANK_PRECISION": "fp32",
        "GRERANK_API_KEYS": f"{API_KEY},another-key",
        "GRERANK_MAX_DOCUMENTS": "64",
        "GRERANK_MAX_DOCUMENT_CHARS": "2000",
        "GRERANK_MAX_QUERY_CHARS": "500",
        "GRERANK_MAX_CANDIDATES": "50",
        "GRERANK_MAX_REQUEST_BYTES": "200000",
        "GRERANK_RERANK_BATCH_SIZE": "8",  # several chunks per request: chunking must not break determinism
        "GRERANK_READER_MAX_NEW_TOKENS": "8",
    }
    srv = Server(env, tmp / "server.log").start()
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def corpus() -> list[dict]:
    """Real HotpotQA paragraphs (mixed lengths) with metadata to filter on."""
    passages = [p for p in qa_data.corpus() if len(p.text) <= 1500][:40]
    return [
        {
            "id": f"p{i}",
            "title": p.title,
            "text": p.text,
            "metadata": {"parity": "even" if i % 2 == 0 else "odd"},
        }
        for i, p in enumerate(passages)
    ]


@pytest.fixture(scope="module")
def indexed(client: httpx.Client, corpus: list[dict]) -> list[dict]:
    response = client.post("/documents", json={"documents": corpus})
    assert response.status_code == 200, response.text
    assert response.json()["ids"] == [d["id"] for d in corpus]
    return corpus


def texts_of(corpus: list[dict], n: int, start: int = 0) -> list[str]:
    return [d["text"] for d in corpus[start : start + n]]


# ---- probes, info, docs, auth ----


def test_probes_info_and_openapi(client: httpx.Client, server: Server) -> None:
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready" and set(ready.json()["components"].values()) == {"loaded"}
    info = client.get("/info").json()
    reranker = info["models"]["reranker"]
    assert reranker["status"] == "trained artifact" and reranker["architecture"] == "bi-encoder"
    assert reranker["manifest"]["hyperparameters"]["k"] == 2 and "files" not in reranker["manifest"]
    assert info["default_top_k"] == 2 and info["models"]["precision"] == "fp32"
    assert httpx.get(server.url + "/docs").status_code == 200
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    for path in ("/rerank", "/v1/rerank", "/v2/rerank", "/answer", "/retrieve", "/documents", "/info"):
        assert path in paths


def test_api_key_is_required_except_for_probes(server: Server) -> None:
    body = {"query": "q", "documents": ["a"]}
    assert httpx.post(server.url + "/rerank", json=body).status_code == 401
    assert (
        httpx.post(server.url + "/rerank", json=body, headers={"Authorization": "Bearer nope"}).status_code
        == 401
    )
    assert (
        httpx.post(server.url + "/rerank", json=body, headers={"X-API-Key": "another-key"}).status_code == 200
    )
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(server.url + path).status_code == 200


# ---- rerank ----


def test_rerank_orders_by_the_artifact_scores(
    client: httpx.Client, corpus: list[dict], artifact_dir: Path
) -> None:
    texts = texts_of(corpus, 20)
    raw = client.post("/rerank", json={"query": QUERY, "documents": texts, "raw_scores": True}).json()
    reranker, _ = load_artifact(artifact_dir)
    expected = reranker.predict(QUERY, texts)
    got = torch.tensor([r["relevance_score"] for r in sorted(raw["results"], key=lambda r: r["index"])])
    assert torch.allclose(got, expected, atol=1e-5)
    assert [r["index"] for r in raw["results"]] == torch.sort(
        got, descending=True, stable=True
    ).indices.tolist()
    assert all("document" not in r for r in raw["results"])
    assert raw["meta"]["reranker"] == "trained artifact" and raw["id"]

    squashed = client.post("/rerank", json={"query": QUERY, "documents": texts, "top_n": 5}).json()["results"]
    assert [r["index"] for r in squashed] == [r["index"] for r in raw["results"][:5]]
    scores = [r["relevance_score"] for r in squashed]
    assert all(0 < s < 1 for s in scores) and scores == sorted(scores, reverse=True)


def test_rerank_aliases_document_objects_and_ties(client: httpx.Client) -> None:
    documents = ["the same text", {"text": "a different text", "id": "x"}, "the same text", "the same text"]
    body = {"query": "some text", "documents": documents, "return_documents": True, "model": "rerank-v3.5"}
    answers = [
        client.post(path, json=body).json()["results"] for path in ("/rerank", "/v1/rerank", "/v2/rerank")
    ]
    assert answers[0] == answers[1] == answers[2]
    results = answers[0]
    same = [r["index"] for r in results if r["document"]["text"] == "the same text"]
    assert same == [0, 2, 3]  # equal scores: input order
    assert len({r["relevance_score"] for r in results if r["index"] in same}) == 1
    assert next(r for r in results if r["index"] == 1)["document"] == {"text": "a different text", "id": "x"}


def test_cohere_sdk_gets_the_same_results(client: httpx.Client, server: Server, corpus: list[dict]) -> None:
    texts = texts_of(corpus, 12)
    co = cohere.ClientV2(api_key=API_KEY, base_url=server.url, timeout=120)
    response = co.rerank(model="rerank-v3.5", query=QUERY, documents=texts, top_n=4)
    ours = client.post("/v2/rerank", json={"query": QUERY, "documents": texts, "top_n": 4}).json()
    assert [(r.index, r.relevance_score) for r in response.results] == [
        (r["index"], r["relevance_score"]) for r in ours["results"]
    ]
    assert len(response.results) == 4


# ---- bad input: a clear 4xx, never a 500 ----


BAD_RERANK = [
    ({"query": "", "documents": ["a"]}, 422, "query must not be empty"),
    ({"query": "   ", "documents": ["a"]}, 422, "query must not be empty"),
    ({"query": "q", "documents": []}, 422, "documents must not be empty"),
    ({"query": "q"}, 422, "documents"),
    ({"documents": ["a"]}, 422, "query"),
    ({"query": 5, "documents": ["a"]}, 422, "string"),
    ({"query": "q", "documents": "a single string"}, 422, "list"),
    ({"query": "q", "documents": [1, 2]}, 422, "string"),
    ({"query": "q", "documents": [{"id": "no text"}]}, 422, "text"),
    ({"query": "q", "documents": ["a"], "top_n": 0}, 422, "greater than or equal to 1"),
    ({"query": "q", "documents": ["a"], "top_n": "many"}, 422, "integer"),
    ({"query": "q", "documents": ["a"] * 65}, 400, "65 documents; the limit is 64"),
    ({"query": "q", "documents": ["a", "b" * 2001]}, 400, "document 1 has 2001 characters"),
    ({"query": "q" * 501, "documents": ["a"]}, 400, "query has 501 characters"),
]


@pytest.mark.parametrize(("body", "status", "reason"), BAD_RERANK)
def test_bad_rerank_requests_get_a_clear_4xx(
    client: httpx.Client, body: dict, status: int, reason: str
) -> None:
    response = client.post("/rerank", json=body)
    assert response.status_code == status, response.text
    assert reason in response.text


def test_other_bad_requests(client: httpx.Client, indexed: list[dict]) -> None:
    cases = [
        ("post", "/rerank", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422),
        ("post", "/rerank", {"json": {"query": "q", "documents": ["x" * 1000] * 250}}, 413),
        ("post", "/answer", {"json": {"query": ""}}, 422),
        ("post", "/answer", {"json": {"query": "q", "candidates": 51}}, 400),
        ("post", "/answer", {"json": {"query": "q", "top_k": 0}}, 422),
        ("post", "/answer", {"json": {"query": "q", "filter": {'a"b': 1}}}, 422),
        ("post", "/answer", {"json": {"query": "q", "top_k": True}}, 422),
        ("post", "/answer", {"json": {"query": "q", "filter": {"a": [1]}}}, 422),
        ("post", "/retrieve", {"json": {"query": "q", "top_k": 51}}, 400),
        ("post", "/retrieve", {"json": {"query": "q", "unknown": 1}}, 422),
        ("post", "/documents", {"json": {"documents": []}}, 400),
        ("post", "/documents", {"json": [{"id": "a", "text": ""}]}, 422),
        ("post", "/documents", {"json": [{"id": "a", "text": "t" * 2001}]}, 400),
        ("post", "/documents", {"json": [{"id": 7, "text": "t"}]}, 422),
        ("get", "/documents/missing", {}, 404),
        ("delete", "/documents/missing", {}, 404),
        ("get", "/no-such-route", {}, 404),
        ("get", "/rerank", {}, 405),
    ]
    for method, path, kwargs, status in cases:
        response = client.request(method.upper(), path, **kwargs)
        assert response.status_code == status, (path, kwargs, response.text)
        assert response.json()["detail"], (path, response.text)


# ---- documents, retrieval, answers ----


def test_document_lifecycle(client: httpx.Client, indexed: list[dict]) -> None:
    count = client.get("/info").json()["index"]["documents"]
    doc = {
        "id": "notes/1",
        "title": "Glass",
        "text": "Beta is a small town known for its glass.",
        "metadata": {"k": 1},
    }
    added = client.post("/documents", json=[doc]).json()
    assert added["ids"] == ["notes/1"] and added["documents_indexed"] == count + 1
    assert client.get("/documents/notes/1").json() == doc

    anonymous = client.post("/documents", json=[{"text": "no id given"}]).json()["ids"][0]
    assert anonymous.startswith("doc-") and client.get(f"/documents/{anonymous}").status_code == 200

    replaced = {**doc, "text": "Beta is a town famous for blue glass and old bridges."}
    assert client.post("/documents", json={"documents": [replaced]}).json()["documents_indexed"] == count + 2
    assert client.get("/documents/notes/1").json()["text"] == replaced["text"]
    # An id given twice in one request is written once, as its last occurrence (upserts in order).
    twice = client.post("/documents", json=[{"id": "dup", "text": "first"}, {"id": "dup", "text": "second"}])
    assert twice.json()["ids"] == ["dup"] and twice.json()["documents_indexed"] == count + 3
    assert client.get("/documents/dup").json()["text"] == "second"
    assert client.delete("/documents/dup").status_code == 200
    # The replaced embedding is in the index: its own text is its nearest neighbour.
    hits = client.post("/retrieve", json={"query": "Glass: " + replaced["text"], "top_k": 3}).json()[
        "results"
    ]
    assert hits[0]["id"] == "notes/1" and hits[0]["retrieval_score"] == pytest.approx(1.0, abs=1e-4)

    for doc_id in ("notes/1", anonymous):
        assert client.delete(f"/documents/{doc_id}").json()["deleted"] == doc_id
        assert client.get(f"/documents/{doc_id}").status_code == 404
    hits = client.post("/retrieve", json={"query": "Glass: " + replaced["text"], "top_k": 50}).json()[
        "results"
    ]
    assert "notes/1" not in [h["id"] for h in hits] and len(hits) == count


def test_retrieve_ranks_and_filters(client: httpx.Client, indexed: list[dict]) -> None:
    response = client.post("/retrieve", json={"query": QUERY, "top_k": 10}).json()
    scores = [h["retrieval_score"] for h in response["results"]]
    assert len(scores) == 10 and scores == sorted(scores, reverse=True)
    assert set(response["timings_ms"]) == {"embed", "retrieve"}
    odd = client.post("/retrieve", json={"query": QUERY, "top_k": 10, "filter": {"parity": "odd"}}).json()
    assert len(odd["results"]) == 10 and {h["metadata"]["parity"] for h in odd["results"]} == {"odd"}
    none = client.post("/retrieve", json={"query": QUERY, "filter": {"parity": "prime"}}).json()
    assert none["results"] == []


def sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    events = []
    for block in response.text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_answer_and_its_stream(client: httpx.Client, indexed: list[dict]) -> None:
    body = {"query": QUERY, "candidates": 12}
    result = client.post("/answer", json=body).json()
    assert isinstance(result["answer"], str) and set(result["timings_ms"]) == {
        "embed",
        "retrieve",
        "rerank",
        "read",
    }
    citations = result["citations"]
    assert len(citations) == 2  # the artifact's k
    assert [c["rerank_score"] for c in citations] == sorted(
        (c["rerank_score"] for c in citations), reverse=True
    )
    retrieved = {
        h["id"]: h for h in client.post("/retrieve", json={"query": QUERY, "top_k": 12}).json()["results"]
    }
    for c in citations:
        assert c["retrieval_score"] == pytest.approx(retrieved[c["id"]]["retrieval_score"], abs=1e-6)
        assert c["text"] == retrieved[c["id"]]["text"]
    # Citations are the top rerank scores among the candidates, ties by candidate order.
    reranked = client.post(
        "/rerank",
        json={"query": QUERY, "documents": [f"{h['title']}: {h['text']}" for h in retrieved.values()]},
    ).json()["results"]
    assert [c["id"] for c in citations] == [list(retrieved)[r["index"]] for r in reranked[:2]]

    assert len(client.post("/answer", json={**body, "top_k": 4}).json()["citations"]) == 4
    odd = client.post("/answer", json={**body, "filter": {"parity": "odd"}}).json()["citations"]
    assert len(odd) == 2 and {c["metadata"]["parity"] for c in odd} == {"odd"}
    nothing = client.post("/answer", json={**body, "filter": {"parity": "prime"}})
    assert nothing.status_code == 200 and nothing.json()["citations"] == []  # the reader answers unaided

    with client.stream("POST", "/answer", json={**body, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        response.read()
    events = sse_events(response)
    assert events[-1][0] == "done" and all(kind == "token" for kind, _ in events[:-1])
    done = events[-1][1]
    assert "".join(data["text"] for _, data in events[:-1]).strip() == done["answer"] == result["answer"]
    assert done["citations"] == citations


# ---- determinism under concurrent traffic ----


def test_results_do_not_depend_on_concurrent_requests(client: httpx.Client, indexed: list[dict]) -> None:
    """Concurrent /rerank requests share forward passes (the batching queue); each still gets exactly the
    scores it gets alone, and so does /answer, which reranks inline between those passes."""
    raw = {"raw_scores": True}
    targets = [
        {"query": QUERY, "documents": texts_of(indexed, 30, 3) + ["short", "a bit longer text here"], **raw},
        {"query": "x", "documents": ["one", *texts_of(indexed, 5, 20)], **raw},
        {"query": "long " * 50, "documents": [d[:50] for d in texts_of(indexed, 7, 11)]},
    ]
    answer_body = {"query": "Where did the band first perform?", "candidates": 15, "top_k": 3}
    alone = [client.post("/rerank", json=target).json()["results"] for target in targets]
    answer_alone = client.post("/answer", json=answer_body).json()
    others = [
        {"query": QUERY[:20], "documents": texts_of(indexed, 60)},
        {"query": QUERY, "documents": texts_of(indexed, 31, 3)},  # almost the first target, one more document
        {"query": "y", "documents": ["two"]},
    ]
    jobs = []
    for i in range(6):
        jobs += [("/rerank", targets[i % len(targets)]), ("/rerank", others[i % len(others)])]
    jobs += [("/answer", answer_body), ("/answer", {**answer_body, "query": "another question"})]
    passes_before = metric_value(client, "grerank_forward_seconds_count")
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda job: client.post(job[0], json=job[1]), jobs))
    assert all(r.status_code == 200 for r in responses)
    for (_, body), response in zip(jobs, responses, strict=True):
        for target, results in zip(targets, alone, strict=True):
            if body is target:
                assert response.json()["results"] == results  # identical scores and order, bit for bit
        if body is answer_body:
            concurrent = response.json()
            assert concurrent["answer"] == answer_alone["answer"]
            assert concurrent["citations"] == answer_alone["citations"]
    assert metric_value(client, "grerank_forward_seconds_count") > passes_before  # passes were counted


def metric_value(client: httpx.Client, name: str) -> float:
    """Sum of a metric's samples (over all label sets)."""
    samples = [line.split()[-1] for line in client.get("/metrics").text.splitlines() if line.startswith(name)]
    return sum(float(v) for v in samples)


# ---- metrics (last: it reads the counters the tests above produced) ----


def test_metrics_follow_prometheus_conventions(
    client: httpx.Client, server: Server, indexed: list[dict]
) -> None:
    text = httpx.get(server.url + "/metrics").text
    for needle in (
        'grerank_requests_total{route="/rerank",status="200"}',
        'grerank_requests_total{route="/rerank",status="422"}',
        'grerank_requests_total{route="/documents/{doc_id:path}",status="404"}',
        'grerank_requests_total{route="unmatched",status="404"}',
        'grerank_stage_seconds_bucket{le="0.001",stage="rerank"}',
        'grerank_stage_seconds_count{stage="read"}',
        'grerank_batch_size_bucket{le="8.0",stage="rerank"}',
        "grerank_queue_depth 0.0",
        "grerank_ready 1.0",
        f"grerank_documents_indexed {float(len(indexed))}",
        'grerank_model_info{device="cpu",embedder=',
        'reranker_status="trained artifact"',
    ):
        assert needle in text, needle
