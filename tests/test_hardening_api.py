"""The whole API against bad input and bad callers, on a real uvicorn with tiny models: property-based
fuzzing of every route from the OpenAPI schema (schemathesis) with no 5xx, API keys (401 and 403 distinct,
hashed keys, which routes stay open), request ids, no secret in the logs, chunked bodies over the limit,
and the truncation report.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.settings import Settings
from tests.uvicorn_server import Server, tiny_env

WRITE_KEY = "write-key-5f1d0c"
HASHED_WRITE_KEY = "hashed-write-key-93ab7e"  # configured only as its sha256 digest
READ_KEY = "read-key-c2e847"
WRONG_KEY = "wrong-key-77d0aa"
SECRETS = (WRITE_KEY, HASHED_WRITE_KEY, READ_KEY, WRONG_KEY)
MAX_REQUEST_BYTES = 100_000
# Enough for every route to see valid, invalid and edge-case input; about a minute for the whole API here.
EXAMPLES_PER_ROUTE = 100
# Small limits keep every fuzzed request cheap; the served schema states them, and what is over them is a 400.
LIMITS = {
    "max_documents": 16,
    "max_upsert_documents": 8,
    "max_document_chars": 2000,
    "max_query_chars": 300,
    "max_candidates": 10,
    "default_candidates": 5,
    "max_request_bytes": MAX_REQUEST_BYTES,
}


@pytest.fixture(scope="module")
def server(
    tiny_bert_dir: Path, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("hardening-api")
    env = {
        **tiny_env(tiny_bert_dir, tiny_llama_dir, tmp / "index"),
        "GRERANK_API_KEYS": f"{WRITE_KEY},sha256:{hashlib.sha256(HASHED_WRITE_KEY.encode()).hexdigest()}",
        "GRERANK_READ_API_KEYS": READ_KEY,
        **{f"GRERANK_{name.upper()}": str(value) for name, value in LIMITS.items()},
        "GRERANK_READER_MAX_NEW_TOKENS": "3",
        "OMP_NUM_THREADS": "1",
    }
    srv = Server(env, tmp / "server.log").start()
    try:
        srv.wait_ready()
        documents = [
            {"id": f"seed-{i}", "title": f"T{i}", "text": f"seed document {i} about rivers"} for i in range(6)
        ]
        response = httpx.post(srv.url + "/documents", json=documents, headers=bearer(WRITE_KEY), timeout=60)
        assert response.status_code == 200, response.text
        yield srv
    finally:
        srv.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def server_log(server: Server) -> str:
    return server.log_path.read_text(errors="replace")


# ---- fuzzing: every route, valid and invalid input, from the schema ----

# The schema the server serves, built here without loading a model (create_app loads models only when the
# app starts), so the tests can be generated at collection; test_the_served_schema_is_the_fuzzed_one
# checks it is the live one.
OPENAPI = create_app(Settings(log_format="text", **LIMITS)).openapi()


def fuzzing_schema(mode: GenerationMode, examples: int) -> schemathesis.BaseSchema:
    loaded = schemathesis.openapi.from_dict(OPENAPI)
    # deterministic: the same examples on every run, so a failure here reproduces
    loaded.config.generation.update(modes=[mode], max_examples=examples, deterministic=True)
    return loaded


valid_input = fuzzing_schema(GenerationMode.POSITIVE, EXAMPLES_PER_ROUTE)
# Routes without a body have no invalid input to generate (a document id may be any string).
invalid_input = fuzzing_schema(GenerationMode.NEGATIVE, EXAMPLES_PER_ROUTE // 2).exclude(
    path=["/healthz", "/readyz", "/metrics", "/info", "/documents/{doc_id}"]
)
HYPOTHESIS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failing example is reported as found
    suppress_health_check=list(HealthCheck),
)
CHECKS = [
    not_a_server_error,
    status_code_conformance,  # every status a route answers is documented in the schema
    content_type_conformance,
    response_schema_conformance,
]


def test_the_served_schema_is_the_fuzzed_one(server: Server) -> None:
    assert httpx.get(server.url + "/openapi.json").json() == OPENAPI


def test_the_schema_states_the_configured_limits_and_strict_types(server: Server) -> None:
    schemas = OPENAPI["components"]["schemas"]
    rerank = schemas["RerankRequest"]["properties"]
    assert rerank["documents"]["maxItems"] == LIMITS["max_documents"]
    assert rerank["query"]["maxLength"] == LIMITS["max_query_chars"]
    assert schemas["DocumentIn"]["properties"]["text"]["maxLength"] == LIMITS["max_document_chars"]
    assert (
        schemas["RetrieveRequest"]["properties"]["top_k"]["anyOf"][0]["maximum"] == LIMITS["max_candidates"]
    )
    assert schemas["DocumentsUpsert"]["properties"]["documents"]["maxItems"] == LIMITS["max_upsert_documents"]
    write = bearer(WRITE_KEY)
    for path, body in (
        ("/rerank", {"query": "q", "documents": ["a"], "raw_scores": 1}),
        ("/answer", {"query": "q", "stream": 1}),
        ("/rerank", {"query": "q", "documents": ["a"], "return_documents": "true"}),
    ):
        response = httpx.post(server.url + path, json=body, headers=write)
        assert response.status_code == 422, response.text  # booleans are JSON booleans, as the schema says
    # A top_k above the default candidates (5) but within the limit retrieves that many candidates.
    answer = httpx.post(
        server.url + "/answer", json={"query": "rivers", "top_k": 6}, headers=write, timeout=60
    )
    assert answer.status_code == 200 and len(answer.json()["citations"]) == 6
    # Allow lists every method a path serves, not only those of its first route.
    options = httpx.options(server.url + "/documents/seed-1", headers=write)
    assert options.status_code == 405 and options.headers["allow"] == "DELETE, GET"
    assert httpx.put(server.url + "/rerank", headers=write).headers["allow"] == "POST"


@valid_input.parametrize()
@HYPOTHESIS
def test_valid_input_never_gets_a_5xx(server: Server, case: schemathesis.Case) -> None:
    case.call_and_validate(base_url=server.url, headers=bearer(WRITE_KEY), timeout=60, checks=CHECKS)


@invalid_input.parametrize()
@HYPOTHESIS
def test_invalid_input_never_gets_a_5xx(server: Server, case: schemathesis.Case) -> None:
    response = case.call_and_validate(
        base_url=server.url, headers=bearer(WRITE_KEY), timeout=60, checks=CHECKS
    )
    assert response.status_code < 500


# Bodies found by hand to have given a 500 before: each now gets a clear 4xx (or is served).
AWKWARD_BODIES = [
    ("/rerank", b'{"query": "\\ud800", "documents": ["a"]}', 422),  # a lone surrogate: no tokenizer takes it
    ("/rerank", b'{"query": "q", "documents": [{"text": "\\udfff"}]}', 422),
    ("/documents", b'[{"text": "a", "metadata": {"x": NaN}}]', 422),  # Python's JSON reads NaN; JSON has none
    ("/documents", b'[{"text": "a", "metadata": {"\\ud800": 1}}]', 422),
    ("/documents", b'[{"text": "a", "metadata": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}]", 422),
    ("/retrieve", b'{"query": "q", "filter": {"a\\u0000b": 1}}', 422),  # SQLite JSON paths cannot hold NUL
    ("/retrieve", b'{"query": "q", "filter": {"a": 100000000000000000000000}}', 200),  # over int64: a float
    ("/answer", b'{"query": "q", "filter": {"a": Infinity}}', 422),
    ("/documents", b'[{"text": "a", "metadata": {"deep": ' + b"[" * 20_000 + b"]" * 20_000 + b"}}]", 400),
]


@pytest.mark.parametrize(("path", "body", "status"), AWKWARD_BODIES)
def test_awkward_bodies_get_a_clear_answer(server: Server, path: str, body: bytes, status: int) -> None:
    headers = {**bearer(WRITE_KEY), "content-type": "application/json"}
    response = httpx.post(server.url + path, content=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    assert response.json()  # a JSON body, even when the input cannot be echoed in one


# ---- API keys ----


def test_401_and_403_are_distinct(server: Server) -> None:
    rerank = {"query": "q", "documents": ["a", "b"]}
    no_key = httpx.post(server.url + "/rerank", json=rerank)
    assert no_key.status_code == 401 and no_key.headers["www-authenticate"] == "Bearer"
    assert httpx.post(server.url + "/rerank", json=rerank, headers=bearer(WRONG_KEY)).status_code == 401
    assert (
        httpx.post(server.url + "/rerank", json=rerank, headers={"X-API-Key": WRONG_KEY}).status_code == 401
    )
    # A read-only key reads everything, and may not write: 403, not 401.
    read = bearer(READ_KEY)
    assert httpx.post(server.url + "/rerank", json=rerank, headers=read).status_code == 200
    assert httpx.get(server.url + "/documents/seed-1", headers=read).status_code == 200
    assert httpx.get(server.url + "/info", headers=read).status_code == 200
    write = httpx.post(server.url + "/documents", json=[{"id": "x", "text": "t"}], headers=read)
    assert write.status_code == 403 and "read-only" in write.json()["detail"]
    assert httpx.delete(server.url + "/documents/seed-1", headers=read).status_code == 403
    assert httpx.get(server.url + "/documents/seed-1", headers=read).status_code == 200  # not deleted
    # An unknown key is 401 on a write route too: authentication comes before permission.
    assert httpx.delete(server.url + "/documents/seed-1", headers=bearer(WRONG_KEY)).status_code == 401
    # A key configured only as its digest works like a plain one.
    hashed = httpx.post(
        server.url + "/documents", json=[{"id": "h", "text": "hashed"}], headers=bearer(HASHED_WRITE_KEY)
    )
    assert hashed.status_code == 200
    assert (
        httpx.delete(server.url + "/documents/h", headers={"X-API-Key": HASHED_WRITE_KEY}).status_code == 200
    )
    # The digest itself is not a key.
    digest = hashlib.sha256(HASHED_WRITE_KEY.encode()).hexdigest()
    assert httpx.get(server.url + "/info", headers=bearer(digest)).status_code == 401
    for path in ("/healthz", "/readyz", "/metrics"):  # open by default (GRERANK_OPEN_PATHS)
        assert httpx.get(server.url + path).status_code == 200


def test_no_secret_is_ever_logged(server: Server) -> None:
    # Keys in every place a client may put them, valid and not, on routes that succeed and fail.
    for key in SECRETS:
        for headers in (bearer(key), {"X-API-Key": key}):
            httpx.post(server.url + "/rerank", json={"query": "q", "documents": ["a"]}, headers=headers)
            httpx.post(server.url + "/documents", json=[{"text": ""}], headers=headers)
            httpx.get(server.url + "/info", headers=headers)
    log = server_log(server)
    assert "/info" in log  # the access log is there...
    for secret in (*SECRETS, hashlib.sha256(HASHED_WRITE_KEY.encode()).hexdigest()):
        assert secret not in log  # ...and no key, nor a configured digest


# ---- request ids and structured logs ----


def test_request_id_is_echoed_and_logged(server: Server) -> None:
    given = httpx.get(server.url + "/info", headers={**bearer(READ_KEY), "X-Request-ID": "trace-42.a:b"})
    assert given.headers["x-request-id"] == "trace-42.a:b"
    generated = httpx.get(server.url + "/healthz").headers["x-request-id"]
    assert len(generated) == 32 and generated != httpx.get(server.url + "/healthz").headers["x-request-id"]
    # An id that could forge log lines is replaced, not echoed.
    forged = httpx.get(server.url + "/healthz", headers={"X-Request-ID": "a\tb" + "x" * 200})
    assert forged.headers["x-request-id"] != "a\tb" + "x" * 200 and len(forged.headers["x-request-id"]) == 32
    # Errors carry it too, including those answered by middleware before any route.
    assert (
        httpx.post(server.url + "/rerank", json={}, headers={"X-Request-ID": "r-401"}).headers["x-request-id"]
        == "r-401"
    )

    def logged() -> list[dict]:
        return [json.loads(line) for line in server_log(server).splitlines() if line.startswith("{")]

    # The access line is written once the response has gone out, so it may trail the response a little.
    deadline = time.monotonic() + 10
    lines = logged()
    while not any(line.get("request_id") == "r-401" for line in lines) and time.monotonic() < deadline:
        time.sleep(0.05)
        lines = logged()
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    access = [line for line in lines if line.get("request_id") == "trace-42.a:b"]
    assert len(access) == 1
    assert access[0]["path"] == "/info" and access[0]["status"] == 200 and access[0]["route"] == "/info"
    assert any(line.get("request_id") == "r-401" and line["status"] == 401 for line in lines)


# ---- limits ----


def test_a_chunked_body_over_the_limit_gets_413(server: Server) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the size is known only while reading
        yield b'{"query": "q", "documents": ["'
        for _ in range(MAX_REQUEST_BYTES // 10_000 + 2):
            yield b"x" * 10_000
        yield b'"]}'

    headers = {**bearer(READ_KEY), "content-type": "application/json"}
    response = httpx.post(server.url + "/rerank", content=chunks(), headers=headers)
    assert "content-length" not in response.request.headers
    assert response.status_code == 413 and "GRERANK_MAX_REQUEST_BYTES" in response.json()["detail"]
    declared = httpx.post(server.url + "/rerank", content=b"x" * (MAX_REQUEST_BYTES + 1), headers=headers)
    assert declared.status_code == 413


def test_truncation_is_reported(server: Server) -> None:
    documents = ["short", "word " * 400, "a few more words", "word " * 253, "word " * 255]
    body = {"query": "which word?", "documents": documents}
    meta = httpx.post(server.url + "/rerank", json=body, headers=bearer(READ_KEY)).json()["meta"]
    # A bi-encoder reads 256 tokens with [CLS] and [SEP]: 254 words of one token each fit, 255 do not.
    assert meta["truncation"] == {"max_tokens": 256, "query_truncated": False, "truncated_documents": [1, 4]}
    long_query = httpx.post(
        server.url + "/rerank", json={"query": "." * 260, "documents": ["a"]}, headers=bearer(READ_KEY)
    )
    assert long_query.status_code == 200 and long_query.json()["meta"]["truncation"]["query_truncated"]
    info = httpx.get(server.url + "/info", headers=bearer(READ_KEY)).json()
    assert info["truncation"]["reranker_max_tokens"] == 256
    assert info["truncation"]["reader_max_document_tokens"] == 256
    assert info["limits"]["max_queue"] == 32 and info["limits"]["stage_timeouts"]["rerank"] == 120


def test_operations_routes_can_be_closed(tmp_path: Path) -> None:
    # In process, with models that are never found: the probes and /metrics answer whether or not it loads.
    settings = Settings(
        embedder=str(tmp_path / "no-model"),
        index_dir=tmp_path / "index",
        api_keys=[WRITE_KEY],
        open_paths=["/healthz"],
        log_format="text",
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        for path in ("/readyz", "/metrics"):
            assert client.get(path).status_code == 401
        assert client.get("/metrics", headers=bearer(WRITE_KEY)).status_code == 200
        assert client.get("/readyz", headers=bearer(WRITE_KEY)).status_code in (200, 503)


def test_schemathesis_run_with_every_check_finds_nothing(server: Server, tmp_path: Path) -> None:
    # The command line a user would run, every check included: status codes, headers and bodies conform to
    # the schema, schema-invalid input is refused and schema-valid input accepted, Allow headers, auth.
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        server.url + "/openapi.json",
        "--checks", "all",
        "--max-examples", "25",
        "--seed", "1",
        "--generation-deterministic",
        "--header", f"Authorization: Bearer {WRITE_KEY}",
        "--request-timeout", "60",
        "--workers", "1",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-20_000:] + run.stderr[-4000:]
