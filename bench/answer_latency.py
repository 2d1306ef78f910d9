"""``/answer`` time to first token and total latency, with and without cached document states, against a
plain concatenated-prompt RAG baseline (Hugging Face ``generate`` on the same model and documents).

Workload: shipped HotpotQA dev questions against the demo index (``make index``), 20 candidates, k = 3, the
served reader (SmolLM2-135M-Instruct with the shipped adapter) and reranker, greedy answers of at most 32
tokens; the reader alone also without its adapter, for what the adapter costs. Medians over
repeated runs:

* end to end over HTTP, streamed (SSE), our service on loopback: time to the first ``token`` event and to the
  ``done`` event,
  - with document states cached (every question asked once beforehand; what
    ``GRERANK_PRECOMPUTE_READER_STATES`` gives for every indexed document): the reader's per-document
    states, and the reranker's document embeddings (:mod:`service.engine.rerank_cache`, kept from a document's
    first read),
  - computing both per query (``GRERANK_READER_CACHE_MB=0``, ``GRERANK_RERANK_CACHE_MB=0``);
* in process, the reader alone on the three documents ``/answer`` chose: first token and full answer from
  (a) cached document states: only the question and answer tokens run, (b) our parallel document encoding
  computed on the spot, (c) the baseline: the same prompt text concatenated and run through
  ``model.generate`` (greedy; its first token is the second ``streamer.put`` call). The baseline's end-to-end
  time to first token is (c) plus our service's median embed + retrieve + rerank time with caches: it would
  retrieve and rerank the same way.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.local_service import serving
from grerank import qa_data
from grerank.decoder_reader import DecoderReader
from grerank.passage import Passage
from grerank.router_artifact import SHIPPED as ROUTER
from service.engine.models import load_reader, resolve_bf16
from service.settings import Settings
from service.storage.document_index import STORE_FILE
from tests.uvicorn_server import ROOT

CANDIDATES = 20
TOP_K = 3
MAX_NEW_TOKENS = 32


def index_dir() -> Path:
    return Path(os.environ.get("GRERANK_INDEX_DIR", ROOT / "var" / "index"))


def service(folder: Path, **env: str) -> AbstractContextManager[str]:
    base = {"GRERANK_INDEX_DIR": str(index_dir()), "GRERANK_READER_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS)}
    return serving({**base, **env}, folder / "server.log")


def ask(client: httpx.Client, question: str) -> dict[str, Any]:
    """One streamed /answer: seconds to the first token and to the end, and the final response."""
    body = {"query": question, "candidates": CANDIDATES, "top_k": TOP_K, "stream": True}
    start = time.perf_counter()
    first = None
    event = None
    with client.stream("POST", "/answer", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
                if event == "token" and first is None:
                    first = time.perf_counter() - start
            elif line.startswith("data: ") and event in ("done", "error"):
                data = json.loads(line.removeprefix("data: "))
                if event == "error":
                    raise RuntimeError(f"/answer failed: {data}")
                total = time.perf_counter() - start
                return {"ttft": first if first is not None else total, "total": total, "response": data}
    raise RuntimeError("/answer stream ended without a done event")


def rerank_retrieved(client: httpx.Client, question: str) -> float:
    """Seconds of one ``/rerank`` of the question's ``CANDIDATES`` retrieved documents."""
    hits = client.post("/retrieve", json={"query": question, "top_k": CANDIDATES}).raise_for_status()
    documents = [
        h["text"] if not h["title"] else f"{h['title']}: {h['text']}" for h in hits.json()["results"]
    ]
    start = time.perf_counter()
    client.post("/rerank", json={"query": question, "documents": documents}).raise_for_status()
    return time.perf_counter() - start


def http_runs(url: str, questions: list[str], passes: int, warm_first: bool) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=600) as client:
        ask(client, "warm-up question about nothing in particular")
        if warm_first:
            for question in questions:
                ask(client, question)
                rerank_retrieved(client, question)
        runs = [[ask(client, q) for q in questions] for _ in range(passes)]
        rerank_s = [rerank_retrieved(client, q) for _ in range(passes) for q in questions]
    flat = [r for run in runs for r in run]
    stages = ("embed", "retrieve", "rerank")
    pre_read = [sum(r["response"]["timings_ms"].get(s, 0.0) for s in stages) for r in flat]
    return {
        "ttft_ms": 1000 * statistics.median(r["ttft"] for r in flat),
        "total_ms": 1000 * statistics.median(r["total"] for r in flat),
        "retrieve_rerank_ms": statistics.median(pre_read),
        "rerank_stage_ms": statistics.median(r["response"]["timings_ms"].get("rerank", 0.0) for r in flat),
        "rerank_request_ms": 1000 * statistics.median(rerank_s),
        "requests": len(flat),
        "citations": [r["response"]["citations"] for r in runs[0]],
    }


class FirstTokenClock:
    """A ``generate`` streamer noting when the first new token arrives (its first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def concatenated_ids(reader: DecoderReader, question: str, passages: list[Passage]) -> torch.Tensor:
    """The same prompt as the parallel reader's, as one ordinary causal sequence."""
    ids = list(reader.prefix_ids)
    for passage in passages:
        ids += reader.document_ids(passage)
    ids += reader._question_ids(question)
    return torch.tensor([ids], device=reader.device)


@torch.no_grad()
def reader_alone(
    reader: DecoderReader, untrained: DecoderReader, cases: list[tuple[str, list[Passage]]], repeats: int
) -> dict:
    """``reader`` (the served, trained one) against the baseline; ``untrained``: the base reader without the
    adapter, on the same cached states, for the adapter's cost."""
    Seconds = tuple[float, float]  # to the first token, to the end

    def ours(
        question: str,
        passages: list[Passage],
        states: list[torch.Tensor] | None,
        model: DecoderReader = reader,
    ) -> Seconds:
        start = time.perf_counter()
        first = None
        if states is None:
            states = model.encode_documents(passages)
        for _ in model.stream_answer(question, states, MAX_NEW_TOKENS):
            first = first or time.perf_counter()
        end = time.perf_counter()
        return (first or end) - start, end - start

    def baseline(question: str, passages: list[Passage]) -> Seconds:
        clock = FirstTokenClock()
        ids = concatenated_ids(reader, question, passages)
        start = time.perf_counter()
        reader.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=sorted(reader.eos_ids),
            pad_token_id=reader.tokenizer.pad_token_id or 0,
            streamer=clock,
        )
        end = time.perf_counter()
        return (clock.first or end) - start, end - start

    cached = {q: reader.encode_documents(p) for q, p in cases}
    measures: dict[str, list[Seconds]] = {"cached": [], "cached_untrained": [], "encoded": [], "baseline": []}
    ours(*cases[0], None), ours(*cases[0], None, untrained), baseline(*cases[0])  # warm-up
    for _ in range(repeats):
        for question, passages in cases:
            measures["cached"].append(ours(question, passages, cached[question]))
            measures["cached_untrained"].append(ours(question, passages, cached[question], untrained))
            measures["encoded"].append(ours(question, passages, None))
            measures["baseline"].append(baseline(question, passages))
    prompt_tokens = [concatenated_ids(reader, q, p).shape[1] for q, p in cases]
    return {
        "prompt_tokens_median": statistics.median(prompt_tokens),
        **{
            name: {
                "ttft_ms": 1000 * statistics.median(t for t, _ in values),
                "total_ms": 1000 * statistics.median(t for _, t in values),
            }
            for name, values in measures.items()
        },
    }


def run(quick: bool) -> dict[str, Any]:
    if not (index_dir() / STORE_FILE).is_file():
        raise RuntimeError(f"no index in {index_dir()}: run `make index` first")
    count, passes = (6, 1) if quick else (20, 2)
    questions = [ex.question for ex in qa_data.load_examples(qa_data.split_path("dev"), count)]
    with tempfile.TemporaryDirectory(prefix="grerank-bench-") as tmp:
        with service(Path(tmp)) as url:
            warm = http_runs(url, questions, passes, warm_first=True)
        with service(Path(tmp), GRERANK_READER_CACHE_MB="0", GRERANK_RERANK_CACHE_MB="0") as url:
            cold = http_runs(url, questions, passes, warm_first=False)
        attention = None
        if (ROUTER / "manifest.json").is_file():  # ranking by the reader's heads (RouteHead), states cached
            # Every candidate's states are kept, not only the top k's: 20 questions x 20 candidates, for
            # /answer and for /rerank (whose texts carry the title inline), at about 3.5 MB each.
            with service(
                Path(tmp), GRERANK_ATTENTION_RERANKER="shipped", GRERANK_READER_CACHE_MB="4096"
            ) as url:
                attention = http_runs(url, questions, passes, warm_first=True)
    torch.set_num_threads(os.cpu_count() or 1)
    settings = Settings()
    device = torch.device("cpu")
    reader, _ = load_reader(settings, device, resolve_bf16(settings.precision, device))
    untrained, _ = load_reader(
        settings.model_copy(update={"reader_artifact": "none"}), device, reader.dtype == torch.bfloat16
    )
    cases = [
        (q, [Passage(c["title"], c["text"]) for c in citations])
        for q, citations in zip(questions, warm["citations"], strict=True)
    ]
    alone = reader_alone(reader, untrained, cases, passes)
    baseline_ttft = warm["retrieve_rerank_ms"] + alone["baseline"]["ttft_ms"]
    for result in (warm, cold, attention):
        if result is not None:
            result.pop("citations")
    return {
        "workload": {
            "questions": count,
            "passes": passes,
            "candidates": CANDIDATES,
            "top_k": TOP_K,
            "max_new_tokens": MAX_NEW_TOKENS,
            "dtype": str(reader.dtype).removeprefix("torch."),
        },
        "http": {"cached_states": warm, "states_per_query": cold, "attention_reranker_cached": attention},
        "reader_alone": alone,
        "summary": {
            "baseline_end_to_end_ttft_ms": baseline_ttft,
            "ttft_speedup_end_to_end": baseline_ttft / warm["ttft_ms"],
            "ttft_speedup_reader_alone": alone["baseline"]["ttft_ms"] / alone["cached"]["ttft_ms"],
            "ttft_trained_over_untrained_reader": alone["cached"]["ttft_ms"]
            / alone["cached_untrained"]["ttft_ms"],
        },
    }


def markdown(result: dict[str, Any]) -> str:
    w, http, alone, s = result["workload"], result["http"], result["reader_alone"], result["summary"]

    def row(name: str, figures: dict[str, float]) -> str:
        return f"| {name} | {figures['ttft_ms']:.0f} | {figures['total_ms']:.0f} |"

    return "\n".join(
        [
            f"{w['questions']} dev questions x {w['passes']} passes, {w['candidates']} candidates, "
            f"k = {w['top_k']}, at most {w['max_new_tokens']} answer tokens, {w['dtype']}; "
            f"median prompt of the concatenated baseline: {alone['prompt_tokens_median']:.0f} tokens.",
            "",
            "| end to end (HTTP, streamed) | time to first token (ms) | total (ms) |",
            "|---|---|---|",
            row("/answer, document states and reranker embeddings cached", http["cached_states"]),
            row("/answer, both computed per query", http["states_per_query"]),
            *(
                [
                    row(
                        "/answer ranked by the reader's heads (RouteHead), states cached",
                        http["attention_reranker_cached"],
                    )
                ]
                if http.get("attention_reranker_cached")
                else []
            ),
            f"| baseline: same retrieval + rerank ({http['cached_states']['retrieve_rerank_ms']:.0f} ms), "
            f"HF `generate` on the concatenated prompt | {s['baseline_end_to_end_ttft_ms']:.0f} | |",
            "",
            "| reader alone, same 3 documents | time to first token (ms) | total (ms) |",
            "|---|---|---|",
            row("cached document states (question + answer tokens only)", alone["cached"]),
            row("the same, untrained reader (no adapter)", alone["cached_untrained"]),
            row("parallel document encoding on the spot", alone["encoded"]),
            row("baseline: HF `generate`, concatenated prompt", alone["baseline"]),
            "",
            *rerank_lines(http),
            "",
            f"Time to first token, baseline / cached: **{s['ttft_speedup_end_to_end']:.1f}x** end to end, "
            f"**{s['ttft_speedup_reader_alone']:.1f}x** for the reader alone. The trained reader's time to "
            f"first token is {s['ttft_trained_over_untrained_reader']:.2f}x the untrained reader's.",
        ]
    )


def rerank_lines(http: dict[str, Any]) -> list[str]:
    """Ranking alone: the rerank stage inside /answer and a /rerank request of the same candidates."""
    rows = [("MiniLM reranker (shipped G-Rerank), embeddings cached", http["cached_states"])]
    if http.get("attention_reranker_cached"):
        rows.append(("reader's heads (RouteHead), document states cached", http["attention_reranker_cached"]))
    lines = [
        "",
        f"| ranking {CANDIDATES} candidates | /answer's rerank stage (ms) | /rerank request (ms) | pairs/s |",
        "|---|---|---|---|",
    ]
    for name, figures in rows:
        if "rerank_request_ms" in figures:
            stage, request = figures["rerank_stage_ms"], figures["rerank_request_ms"]
            lines.append(f"| {name} | {stage:.0f} | {request:.0f} | {CANDIDATES / (request / 1000):.0f} |")
    return lines
