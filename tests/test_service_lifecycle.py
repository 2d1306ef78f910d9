"""Service start-up and restarts under a real uvicorn: acknowledged writes survive a crash; a bad artifact
keeps the service unready (but alive) with the reason."""

from __future__ import annotations

from pathlib import Path

import httpx

from grerank.artifact import write_artifact
from grerank.reranker import build_reranker
from tests.uvicorn_server import Server, tiny_env

DOCS = [
    {"id": f"d{i}", "title": f"Title {i}", "text": text, "metadata": {"i": i}}
    for i, text in enumerate(
        [
            "The alpha river flows north to the cold sea.",
            "Beta is a small town known for its glass.",
            "Gamma rays are produced by radioactive decay of nuclei.",
            "Delta is the fourth letter of the Greek alphabet and names river mouths.",
            "Epsilon is small; mathematicians use it for tiny quantities.",
            "Zeta functions encode the distribution of prime numbers.",
        ]
    )
]


def test_acknowledged_writes_survive_a_crash(
    tiny_bert_dir: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    env = tiny_env(tiny_bert_dir, tiny_llama_dir, tmp_path / "index")
    query = {"query": "Which river flows north?", "top_k": 10}
    first = Server(env, tmp_path / "first.log").start().wait_ready()
    try:
        assert httpx.post(first.url + "/documents", json=DOCS).status_code == 200
        assert httpx.delete(first.url + "/documents/d2").status_code == 200
        changed = {**DOCS[0], "text": "The alpha river flows south to the warm sea."}
        assert httpx.post(first.url + "/documents", json=[changed]).status_code == 200
        before = httpx.post(first.url + "/retrieve", json=query).json()["results"]
    finally:
        first.stop(kill=True)  # SIGKILL right after the acknowledgements: a crash, no clean shutdown

    second = Server(env, tmp_path / "second.log").start().wait_ready()
    try:
        assert httpx.get(second.url + "/readyz").json()["documents_indexed"] == len(DOCS) - 1
        assert httpx.get(second.url + "/documents/d0").json() == changed
        assert httpx.get(second.url + "/documents/d5").json() == DOCS[5]
        assert httpx.get(second.url + "/documents/d2").status_code == 404
        after = httpx.post(second.url + "/retrieve", json=query).json()["results"]
        assert after == before
        assert httpx.post(second.url + "/answer", json={"query": "river?"}).status_code == 200
    finally:
        second.stop()


def test_a_tampered_artifact_keeps_the_service_unready(
    tiny_bert_dir: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    artifact = write_artifact(
        tmp_path / "artifact", build_reranker("bi-encoder", tiny_bert_dir), hyperparameters={}
    )
    with (artifact / "reranker.json").open("a") as fh:
        fh.write(" ")
    env = {**tiny_env(tiny_bert_dir, tiny_llama_dir, tmp_path / "index"), "GRERANK_ARTIFACT": str(artifact)}
    server = Server(env, tmp_path / "server.log").start()
    try:
        readyz = server.wait_failed()
        assert readyz.status_code == 503
        body = readyz.json()
        assert (
            "checksum mismatch for reranker.json" in body["reason"]
            and body["components"]["reranker"] == "failed"
        )
        rerank = httpx.post(server.url + "/rerank", json={"query": "q", "documents": ["a"]})
        assert rerank.status_code == 503 and "checksum" in rerank.json()["detail"]
        assert httpx.get(server.url + "/healthz").status_code == 200
        assert httpx.get(server.url + "/info").json()["status"] == "not ready"
    finally:
        server.stop()
