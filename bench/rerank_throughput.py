"""Rerank throughput and latency of the running service, against sentence-transformers and infinity-emb on
the same weights and inputs.

Workload: requests of one HotpotQA dev question and 20 shipped HotpotQA passages, each cut to 126 word pieces
(128 tokens with [CLS] and [SEP]); the default MiniLM reranker (a bi-encoder: cosine of mean-pooled
embeddings). Measured, with medians over repeated runs:

* our service, started with uvicorn on loopback in a subprocess (like the tests do): pairs/s and request
  latency p50/p99 at 1, 8 and 32 concurrent clients (asyncio httpx clients, bodies encoded beforehand),
  with its cache of sequences read before turned off, as the peers have none: every passage is encoded;
* the model alone, in process: the same requests through the same batching and backend, no HTTP; from it the
  service overhead (HTTP, JSON, queue) at 8 clients as a fraction of model time;
* sentence-transformers on the same weights, in each of its ordinary configurations: fp32 (its defaults),
  bf16 weights (``model_kwargs={"torch_dtype": torch.bfloat16}``) and fp32 weights under bf16 autocast;
  ``SentenceTransformer.encode`` of the query and documents, then cosine, request by request (latency) and
  all requests in one call (its best throughput). The summary compares against the strongest of them and of
  the other peers (below). The default weights ship no cross-encoder, so there is no
  ``CrossEncoder.predict`` row; bf16 configurations are skipped on CPUs without bf16 instructions;
* infinity-emb, if an ``infinity_emb`` executable is found (``GRERANK_BENCH_INFINITY``, else
  ``.venv-infinity/bin/infinity_emb``; ``make bench-infinity`` makes that venv): its ``/embeddings`` at the
  same concurrencies, defaults but for ``--engine torch --device cpu`` (its ONNX engine does not load with
  what installs beside torch 2.13; see :mod:`bench.onnx_peer`);
* onnxruntime, through sentence-transformers' ``backend="onnx"`` in that same peer venv
  (:mod:`bench.onnx_peer`): fp32, and int8 by its dynamic quantisation (a lower precision: its scores'
  distance from fp32 is reported beside it), all requests in one ``encode`` call;
* this machine's bf16 matmul peak (GFLOP/s of a large torch matmul), and the model's achieved GFLOP/s as a
  fraction of it, FLOPs counted from the config: per sequence of n real tokens,
  ``layers * (2 n (4 h^2 + 2 h i) + 4 n^2 h)`` (the linear layers and attention; padding not counted).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.local_service import serving
from bench.stats import medians, percentile, summary
from grerank import model_paths, qa_data
from grerank.reranker import build_reranker
from grerank.runtime import cpu_has_bf16, resolve_dtype
from service.engine.batching_queue import rerank_inline
from service.engine.rerank_backend import RerankBackend
from service.metrics import Metrics
from service.settings import Settings
from tests.uvicorn_server import ROOT, free_port

CONCURRENCY = (1, 8, 32)
DOCUMENTS = 20
DOC_TOKENS = 128
# Model folders, as GRERANK_RERANKER / GRERANK_READER take them; the smoke test points them at tiny models.
RERANKER = "default"
READER = "default"
INFINITY_NAME = "minilm"
# The peers' processes load the weights from disk and never ask the Hugging Face hub.
PEER_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
ONNX_PEER_TIMEOUT_S = 3600  # export, quantisation and 2 x 3 bulk runs: ~8 min on a 2-core Zen 3
PEAKS = (("bf16", "bfloat16"), ("fp32", "float32"))
NO_BF16 = "this CPU has no bf16 matrix instructions (AVX-512 BF16 or AMX), so bf16 runs emulated"


@dataclass(frozen=True)
class Sizes:
    requests: dict[int, int]  # per concurrency, per run
    repeats: int
    matmul: int  # side of the square matmul that measures the peak
    agreement: int  # requests whose scores are compared with sentence-transformers


QUICK = Sizes({1: 4, 8: 16, 32: 32}, repeats=2, matmul=2048, agreement=4)
FULL = Sizes({1: 20, 8: 80, 32: 160}, repeats=3, matmul=4096, agreement=16)


@dataclass(frozen=True)
class Workload:
    queries: list[str]
    documents: list[list[str]]

    def __len__(self) -> int:
        return len(self.queries)

    def rerank_bodies(self) -> list[bytes]:
        return [
            json.dumps({"query": q, "documents": d}).encode()
            for q, d in zip(self.queries, self.documents, strict=True)
        ]

    def embedding_bodies(self) -> list[bytes]:
        return [
            json.dumps({"model": INFINITY_NAME, "input": [q, *d]}).encode()
            for q, d in zip(self.queries, self.documents, strict=True)
        ]


def workload(requests: int, seed: int = 0) -> Workload:
    """``requests`` (question, 20 passages) pairs; passages cut to ``DOC_TOKENS`` tokens with specials."""
    import random

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_paths.resolve("reranker", RERANKER))
    texts = [p.as_text() for p in qa_data.corpus()]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    budget = DOC_TOKENS - 2
    long = [
        text[: offsets[budget - 1][1]]
        for text, offsets in zip(texts, encoded["offset_mapping"], strict=True)
        if len(offsets) >= budget
    ]
    questions = [ex.question for ex in qa_data.load_examples(qa_data.split_path("dev"))]
    rng = random.Random(seed)
    return Workload(
        [questions[i % len(questions)] for i in range(requests)],
        [rng.sample(long, DOCUMENTS) for _ in range(requests)],
    )


# ---- load generation ----


async def _drive(url: str, path: str, bodies: list[bytes], clients: int, total: int) -> dict[str, Any]:
    latencies: list[float] = []
    failures: list[int] = []
    counter = itertools.count()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one_client() -> None:
            while (i := next(counter)) < total:
                start = time.perf_counter()
                response = await client.post(path, content=bodies[i % len(bodies)], headers=headers)
                await response.aread()
                if response.status_code != 200:
                    failures.append(response.status_code)
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - start
    return {"latencies": latencies, "wall": wall, "failures": failures}


def load_run(url: str, path: str, bodies: list[bytes], clients: int, total: int) -> dict[str, float]:
    """``total`` requests from ``clients`` concurrent clients: pairs/s and latency percentiles (ms)."""
    out = asyncio.run(_drive(url, path, bodies, clients, total))
    if out["failures"]:
        raise RuntimeError(
            f"{len(out['failures'])} of {total} requests failed: {sorted(set(out['failures']))}"
        )
    return {
        "pairs_per_s": total * DOCUMENTS / out["wall"],
        "p50_ms": percentile(out["latencies"], 50) * 1000,
        "p99_ms": percentile(out["latencies"], 99) * 1000,
        "wall_s": out["wall"],
    }


def concurrency_sweep(
    url: str, path: str, bodies: list[bytes], sizes: Sizes, probe: Any = None
) -> dict[str, dict[str, Any]]:
    """Per concurrency, the median of each metric over ``sizes.repeats`` runs (and every run's pairs/s).
    ``probe(run)`` (optional) adds server-side figures to a run."""
    load_run(url, path, bodies, 1, 2)  # warm-up: first-call kernel selection, connection set-up
    out = {}
    for clients in CONCURRENCY:
        runs = []
        for _ in range(sizes.repeats):
            before = probe() if probe else None
            run = load_run(url, path, bodies, clients, sizes.requests[clients])
            if probe:
                run.update(_busy(before, probe(), run["wall_s"]))
            runs.append(run)
        out[str(clients)] = {**medians(runs), "pairs_per_s_runs": [r["pairs_per_s"] for r in runs]}
    return out


# ---- our service ----


def _metric_sums(url: str) -> dict[str, float]:
    """The rerank forward-pass counters of /metrics."""
    text = httpx.get(url + "/metrics", timeout=30).text
    out = {}
    for name in ("grerank_forward_seconds_sum", "grerank_forward_seconds_count", "grerank_batch_tokens_sum"):
        match = re.search(rf'^{name}{{stage="rerank"}} (\S+)$', text, re.MULTILINE)
        out[name] = float(match.group(1)) if match else 0.0
    return out


def _busy(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    busy = after["grerank_forward_seconds_sum"] - before["grerank_forward_seconds_sum"]
    passes = after["grerank_forward_seconds_count"] - before["grerank_forward_seconds_count"]
    tokens = after["grerank_batch_tokens_sum"] - before["grerank_batch_tokens_sum"]
    return {
        "model_busy_fraction": busy / wall,
        "tokens_per_pass": tokens / passes if passes else 0.0,
        "passes": passes,
    }


def our_service(folder: Path) -> AbstractContextManager[str]:
    env = {
        "GRERANK_RERANKER": RERANKER,
        "GRERANK_EMBEDDER": RERANKER,
        "GRERANK_READER": READER,
        "GRERANK_INDEX_DIR": str(folder / "index"),
        "GRERANK_MAX_QUEUE": "64",  # above the 32 clients: no 429 from a response racing the next request
        # Throughput, not admission: 32 clients that never back off queue more than the 3 s default deadline.
        "GRERANK_MAX_WAIT_MS": "600000",
        # Requests draw their passages from one corpus, so they repeat; the peers read every one afresh.
        "GRERANK_RERANK_CACHE_MB": "0",
    }
    return serving(env, folder / "server.log")


# ---- the model alone, in process ----


def backend_for(dtype: torch.dtype) -> RerankBackend:
    reranker = build_reranker("bi-encoder", model_paths.resolve("reranker", RERANKER)).eval()
    return RerankBackend(reranker, dtype)


def model_alone(backend: RerankBackend, work: Workload, repeats: int) -> dict[str, Any]:
    """All requests through the queue's pass planning and the backend, as one batch: model-only seconds."""
    from service.engine.batching_queue import PassPlanner, RerankJob, run_pass

    settings, metrics = Settings(), Metrics()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        planner = PassPlanner(settings.max_batch_tokens, settings.rerank_batch_size)
        for query, texts in zip(work.queries, work.documents, strict=True):
            job = RerankJob()
            job.start(backend.encode(query, texts))
            planner.add(job)
        while entries := planner.next_pass():
            run_pass(backend, entries, metrics)
        seconds.append(time.perf_counter() - start)
    model_seconds = statistics.median(seconds)
    return {
        "pairs_per_s": len(work) * DOCUMENTS / model_seconds,
        "seconds": summary(seconds),
        "max_batch_tokens": settings.max_batch_tokens,
        "rerank_batch_size": settings.rerank_batch_size,
    }


def encoder_flops(backend: RerankBackend, work: Workload) -> float:
    """FLOPs of the encoder forward passes over every real (unpadded) token of ``work``."""
    config = backend.config
    layers, hidden, inner = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    total = 0.0
    for query, texts in zip(work.queries, work.documents, strict=True):
        for sequence in backend.encode(query, texts):
            n = len(sequence.ids)
            total += layers * (2 * n * (4 * hidden**2 + 2 * hidden * inner) + 4 * n**2 * hidden)
    return total


def matmul_peak(dtype: torch.dtype, side: int, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of a ``side`` x ``side`` torch matmul: median and best of ``repeats`` timed runs."""
    a, b = torch.randn(side, side).to(dtype), torch.randn(side, side).to(dtype)
    for _ in range(2):
        a @ b
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        rates.append(2 * side**3 / (time.perf_counter() - start) / 1e9)
    return {"median_gflops": statistics.median(rates), "best_gflops": max(rates), "side": side}


# ---- sentence-transformers ----


ST_CONFIGS = {  # name: (weights dtype, bf16 autocast)
    "fp32": (torch.float32, False),
    "bf16 weights": (torch.bfloat16, False),
    "bf16 autocast": (torch.float32, True),
}


def sentence_transformers_baseline(work: Workload, sizes: Sizes, config: str = "fp32") -> dict[str, Any]:
    """One configuration (:data:`ST_CONFIGS`): per request (one client) and all requests in one ``encode``
    call; and its scores."""
    from sentence_transformers import SentenceTransformer, util

    dtype, autocast = ST_CONFIGS[config]
    model = SentenceTransformer(
        str(model_paths.resolve("reranker", RERANKER)), device="cpu", model_kwargs={"torch_dtype": dtype}
    )

    def scores(i: int) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            embeddings = model.encode([work.queries[i], *work.documents[i]], convert_to_tensor=True)
        return util.cos_sim(embeddings[:1].float(), embeddings[1:].float())[0]

    scores(0)  # warm-up
    runs, agreement_scores = [], {}
    for _ in range(sizes.repeats):
        latencies = []
        start = time.perf_counter()
        for i in range(sizes.requests[1]):
            t = time.perf_counter()
            agreement_scores[i] = scores(i)
            latencies.append(time.perf_counter() - t)
        wall = time.perf_counter() - start
        runs.append(
            {
                "pairs_per_s": sizes.requests[1] * DOCUMENTS / wall,
                "p50_ms": percentile(latencies, 50) * 1000,
                "p99_ms": percentile(latencies, 99) * 1000,
            }
        )
    bulk = []
    count = sizes.requests[CONCURRENCY[-1]]
    texts = [t for q, d in zip(work.queries[:count], work.documents[:count], strict=True) for t in (q, *d)]
    for _ in range(sizes.repeats):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model.encode(texts, convert_to_tensor=True)
        bulk.append(count * DOCUMENTS / (time.perf_counter() - start))
    for i in range(len(agreement_scores), sizes.agreement):
        agreement_scores[i] = scores(i)
    return {
        "per_request": medians(runs),
        "bulk_pairs_per_s": statistics.median(bulk),
        "scores": [agreement_scores[i].tolist() for i in range(sizes.agreement)],
    }


def score_distance(reference: list[list[float]], other: list[list[float]]) -> dict[str, float]:
    """Max absolute score difference and the share of requests with the same top 5, ``other`` vs
    ``reference``."""
    diffs, same_top5 = [], 0
    for expected, got in zip(reference, other, strict=True):
        theirs, ours = torch.tensor(expected), torch.tensor(got)
        diffs.append(float((ours - theirs).abs().max()))
        same_top5 += ours.topk(5).indices.tolist() == theirs.topk(5).indices.tolist()
    return {"max_abs_score_diff": max(diffs), "same_top5_fraction": same_top5 / len(reference)}


def agreement(backend: RerankBackend, work: Workload, reference: list[list[float]]) -> dict[str, float]:
    """How far our served scores (``backend``'s precision) are from sentence-transformers' fp32 cosines."""
    settings, metrics = Settings(), Metrics()
    ours = [
        rerank_inline(
            backend,
            work.queries[i],
            work.documents[i],
            settings.max_batch_tokens,
            settings.rerank_batch_size,
            metrics,
        ).tolist()
        for i in range(len(reference))
    ]
    return score_distance(reference, ours)


# ---- infinity-emb ----


def infinity_executable() -> Path | None:
    configured = os.environ.get("GRERANK_BENCH_INFINITY")
    if configured is not None:
        return Path(configured) if configured else None  # set but empty: off
    default = ROOT / ".venv-infinity" / "bin" / "infinity_emb"
    return default if default.is_file() else None


@contextmanager
def infinity_service(executable: Path, folder: Path) -> Iterator[str]:
    port = free_port()
    command = [str(executable), "v2", "--model-id", str(model_paths.resolve("reranker", RERANKER))]
    command += ["--served-model-name", INFINITY_NAME, "--engine", "torch", "--device", "cpu"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    # No usage statistics sent anywhere.
    env = {**os.environ, **PEER_OFFLINE, "DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    url = f"http://127.0.0.1:{port}"
    with (folder / "infinity.log").open("ab") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"infinity_emb exited with {process.returncode}; see its log")
            try:
                if httpx.get(url + "/models", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        else:
            raise RuntimeError("infinity_emb did not start within 600 s")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def infinity_baseline(work: Workload, sizes: Sizes, folder: Path) -> dict[str, Any]:
    executable = infinity_executable()
    if executable is None:
        return {"skipped": "no infinity_emb executable (GRERANK_BENCH_INFINITY, or make bench-infinity)"}
    version = subprocess.run(
        [str(executable.parent / "python"), "-c", "import infinity_emb; print(infinity_emb.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    with infinity_service(executable, folder) as url:
        sweep = concurrency_sweep(url, "/embeddings", work.embedding_bodies(), sizes)
    return {"version": version or None, "concurrency": sweep}


# ---- onnxruntime (sentence-transformers' ONNX backend, in the peer venv) ----


def onnx_baseline(work: Workload, sizes: Sizes, folder: Path) -> dict[str, Any]:
    executable = infinity_executable()
    if executable is None:
        return {"skipped": "no peer venv (GRERANK_BENCH_INFINITY, or make bench-infinity)"}
    count = sizes.requests[CONCURRENCY[-1]]
    spec = {
        "model": str(model_paths.resolve("reranker", RERANKER)),
        "folder": str(folder),
        "requests": [[q, *d] for q, d in zip(work.queries[:count], work.documents[:count], strict=True)],
        "repeats": sizes.repeats,
        "agreement": sizes.agreement,
    }
    (folder / "onnx_peer.json").write_text(json.dumps(spec))
    env = {**os.environ, **PEER_OFFLINE}
    script = ROOT / "bench" / "onnx_peer.py"
    try:
        completed = subprocess.run(
            [str(executable.parent / "python"), str(script), str(folder / "onnx_peer.json")],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=ONNX_PEER_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return {"skipped": f"bench/onnx_peer.py took longer than {ONNX_PEER_TIMEOUT_S} s"}
    if completed.returncode != 0:
        why = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"bench/onnx_peer.py failed ({completed.returncode}): {why}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ---- the benchmark ----


def run(quick: bool) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    torch.set_grad_enabled(False)
    work = workload(max(sizes.requests.values()))
    dtype = resolve_dtype("auto", torch.device("cpu"))
    bf16 = cpu_has_bf16()
    result: dict[str, Any] = {
        "workload": {
            "documents_per_request": DOCUMENTS,
            "document_tokens": DOC_TOKENS,
            "requests_per_run": {str(c): n for c, n in sizes.requests.items()},
            "repeats": sizes.repeats,
            "reranker": RERANKER,
            "dtype": str(dtype).removeprefix("torch."),
        }
    }
    with tempfile.TemporaryDirectory(prefix="grerank-bench-") as tmp:
        with our_service(Path(tmp)) as url:
            # The precision the service chose for itself ("auto" measures the CPU in its own process).
            served = httpx.get(url + "/info", timeout=30).json()["rerank_batching"]["dtype"]
            result["workload"]["service_precision"] = served
            bodies = work.rerank_bodies()
            result["service"] = concurrency_sweep(url, "/rerank", bodies, sizes, lambda: _metric_sums(url))
        backend = backend_for(dtype)
        best = max(CONCURRENCY, key=lambda c: result["service"][str(c)]["pairs_per_s"])
        best_work = Workload(work.queries[: sizes.requests[best]], work.documents[: sizes.requests[best]])
        result["model_alone"] = model_alone(backend, best_work, sizes.repeats)
        flops_per_pair = encoder_flops(backend, best_work) / (len(best_work) * DOCUMENTS)
        result["sentence_transformers"] = sentence_transformers_baseline(work, sizes)
        st_scores = result["sentence_transformers"].pop("scores")
        result["agreement_with_sentence_transformers"] = agreement(backend, work, st_scores)
        result["sentence_transformers_other"] = {}
        for config in list(ST_CONFIGS)[1:]:
            if not bf16:
                # Without bf16 instructions torch emulates bf16 GEMMs hundreds of times slower than fp32
                # (0.3 against 150 GFLOP/s on an AMD Zen 3): nobody's configuration, and hours to measure.
                result["sentence_transformers_other"][config] = {"skipped": NO_BF16}
                continue
            other = sentence_transformers_baseline(work, sizes, config)
            other.pop("scores")
            result["sentence_transformers_other"][config] = other
        result["infinity"] = infinity_baseline(work, sizes, Path(tmp))
        result["onnxruntime"] = onnx_baseline(work, sizes, Path(tmp))
        for config in ("fp32", "int8"):
            if config in result["onnxruntime"]:
                peer = result["onnxruntime"][config]
                peer["vs_sentence_transformers_fp32"] = score_distance(st_scores, peer.pop("scores"))
    result["peak"] = {
        dtype: matmul_peak(getattr(torch, name), sizes.matmul if name == "float32" or bf16 else 512)
        for dtype, name in PEAKS
    }
    result["summary"] = summarize(result, flops_per_pair, best)
    return result


def summarize(result: dict[str, Any], flops_per_pair: float, best: int) -> dict[str, Any]:
    service = result["service"]
    ours = service[str(best)]["pairs_per_s"]
    model = result["model_alone"]["pairs_per_s"]
    # The peak of the precision the service ran in: where bf16 GEMMs are slower than fp32 it serves fp32.
    served = result["workload"].get("service_precision", result["workload"]["dtype"])
    peak_dtype = "bf16" if served in ("bf16", "bfloat16") else "fp32"
    peak = result["peak"][peak_dtype]["median_gflops"]
    eight = service["8"]
    peers = {"fp32": result["sentence_transformers"], **result.get("sentence_transformers_other", {})}
    peers = {name: peer for name, peer in peers.items() if "skipped" not in peer}
    strongest = max(peers, key=lambda name: peers[name]["bulk_pairs_per_s"])
    # Every peer that ran, at its best for this comparison: sentence-transformers in one encode call, the
    # infinity-emb server at the same 8 clients.
    throughputs = {
        f"sentence-transformers {name}, one encode call": p["bulk_pairs_per_s"] for name, p in peers.items()
    }
    infinity = result.get("infinity", {})
    if "concurrency" in infinity:
        throughputs[f"infinity-emb {infinity['version']}, 8 clients"] = infinity["concurrency"]["8"][
            "pairs_per_s"
        ]
    onnx = result.get("onnxruntime", {})
    onnx_name = f"onnxruntime {onnx.get('onnxruntime')} {{}}, one encode call"
    if "fp32" in onnx:
        throughputs[onnx_name.format("fp32")] = onnx["fp32"]["bulk_pairs_per_s"]
    strongest_peer = max(throughputs, key=throughputs.__getitem__)
    # int8 changes scores more than fp32 vs bf16 does, so it only enters a separate figure.
    any_precision = {**throughputs}
    if "int8" in onnx:
        any_precision[onnx_name.format("int8")] = onnx["int8"]["bulk_pairs_per_s"]
    strongest_any = max(any_precision, key=any_precision.__getitem__)
    return {
        "strongest_peer": strongest_peer,
        "at_8_clients_vs_strongest_peer": eight["pairs_per_s"] / throughputs[strongest_peer],
        "strongest_peer_any_precision": strongest_any,
        "at_8_clients_vs_strongest_peer_any_precision": eight["pairs_per_s"] / any_precision[strongest_any],
        "best_concurrency": best,
        "service_pairs_per_s": ours,
        "vs_st_bulk": ours / result["sentence_transformers"]["bulk_pairs_per_s"],
        "vs_st_per_request": ours / result["sentence_transformers"]["per_request"]["pairs_per_s"],
        "strongest_st": strongest,
        "at_8_clients_vs_strongest_st_bulk": eight["pairs_per_s"] / peers[strongest]["bulk_pairs_per_s"],
        "at_8_clients_vs_st_fp32_bulk": eight["pairs_per_s"]
        / result["sentence_transformers"]["bulk_pairs_per_s"],
        "gflop_per_pair": flops_per_pair / 1e9,
        "service_gflops": ours * flops_per_pair / 1e9,
        "model_gflops": model * flops_per_pair / 1e9,
        "peak_dtype": peak_dtype,
        "service_fraction_of_peak": ours * flops_per_pair / 1e9 / peak,
        "model_fraction_of_peak": model * flops_per_pair / 1e9 / peak,
        # (time per pair over HTTP at 8 clients) / (time per pair of the model alone) - 1
        "overhead_at_8_clients": model / eight["pairs_per_s"] - 1,
        # time the model was not in a forward pass, relative to the time it was, at 8 clients
        "idle_over_busy_at_8_clients": (1 - eight["model_busy_fraction"]) / eight["model_busy_fraction"],
    }


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _latency_row(system: str, clients: object, run: dict[str, float]) -> str:
    return _row(system, clients, f"{run['pairs_per_s']:.0f}", f"{run['p50_ms']:.0f}", f"{run['p99_ms']:.0f}")


def _peer_figures(s: dict[str, Any]) -> list[str]:
    """The 8-client ratios, one row per peer with each role it plays (results from before a role was
    measured lack its key)."""
    st = "sentence-transformers {}, one encode call"
    roles = [  # (peer, ratio key, role, target)
        (s.get("strongest_peer"), "at_8_clients_vs_strongest_peer", "strongest peer", ""),
        (
            s.get("strongest_peer_any_precision"),
            "at_8_clients_vs_strongest_peer_any_precision",
            "strongest at any precision",
            "",
        ),
        (
            st.format(s["strongest_st"]) if "strongest_st" in s else None,
            "at_8_clients_vs_strongest_st_bulk",
            "strongest sentence-transformers",
            ">= 1.5x",
        ),
        (st.format("fp32"), "at_8_clients_vs_st_fp32_bulk", "its defaults", ">= 2x"),
    ]
    rows: dict[str, tuple[float, list[str], list[str]]] = {}
    for peer, key, role, target in roles:
        if peer is None or key not in s:
            continue
        ratio, names, targets = rows.setdefault(peer, (s[key], [], []))
        names.append(role)
        targets += [target] if target else []
    return [
        _row(f"8 clients / {peer} ({', '.join(names)})", f"{ratio:.2f}x", ", ".join(targets))
        for peer, (ratio, names, targets) in rows.items()
    ]


def markdown(result: dict[str, Any]) -> str:
    w, s, peak = result["workload"], result["summary"], result["peak"]
    # Results written before the service chose its precision by measurement name the bf16 peak.
    peak_dtype = s.get("peak_dtype", "bf16")
    service_fraction = s.get("service_fraction_of_peak", s.get("service_fraction_of_bf16_peak"))
    model_fraction = s.get("model_fraction_of_peak", s.get("model_fraction_of_bf16_peak"))
    st, infinity = result["sentence_transformers"], result["infinity"]
    lines = [
        f"Requests of 1 query + {w['documents_per_request']} HotpotQA passages of {w['document_tokens']} "
        f"tokens; reranker `{w['reranker']}` ({w.get('service_precision', w['dtype'])} in the service, "
        f"{w['dtype']} for the model alone); medians of {w['repeats']} runs.",
        "",
        _row("system", "clients", "pairs/s", "p50 ms", "p99 ms"),
        _row("---", "---", "---", "---", "---"),
        *(_latency_row("grerank /rerank", c, run) for c, run in result["service"].items()),
        _latency_row("sentence-transformers fp32, per request", 1, st["per_request"]),
        _row("sentence-transformers fp32, one encode call", "-", f"{st['bulk_pairs_per_s']:.0f}", "", ""),
    ]
    for config, other in result.get("sentence_transformers_other", {}).items():
        if "skipped" in other:
            lines.append(_row(f"sentence-transformers {config}", f"skipped: {other['skipped']}", "", "", ""))
            continue
        lines += [
            _latency_row(f"sentence-transformers {config}, per request", 1, other["per_request"]),
            _row(
                f"sentence-transformers {config}, one encode call",
                "-",
                f"{other['bulk_pairs_per_s']:.0f}",
                "",
                "",
            ),
        ]
    if "skipped" in infinity:
        lines.append(_row("infinity-emb", f"skipped: {infinity['skipped']}", "", "", ""))
    else:
        name = f"infinity-emb {infinity['version']} /embeddings"
        lines += [_latency_row(name, c, run) for c, run in infinity["concurrency"].items()]
    onnx = result.get("onnxruntime", {})
    if "skipped" in onnx:
        lines.append(_row("onnxruntime", f"skipped: {onnx['skipped']}", "", "", ""))
    for config in ("fp32", "int8") if "fp32" in onnx else ():
        peer, distance = onnx[config], onnx[config]["vs_sentence_transformers_fp32"]
        lines.append(
            _row(
                f'onnxruntime {onnx["onnxruntime"]} {config} (sentence-transformers backend="onnx"), '
                f"one encode call; scores vs sentence-transformers fp32: max abs diff "
                f"{distance['max_abs_score_diff']:.4f}, same top 5 in {distance['same_top5_fraction']:.0%}",
                "-",
                f"{peer['bulk_pairs_per_s']:.0f}",
                "",
                "",
            )
        )
    model = result["model_alone"]
    lines.append(_row("model alone, in process, no HTTP", "-", f"{model['pairs_per_s']:.0f}", "", ""))
    agree = result["agreement_with_sentence_transformers"]
    lines += [
        "",
        _row("figure", "value", "target"),
        _row("---", "---", "---"),
        *_peer_figures(s),
        _row("best throughput / sentence-transformers fp32 one encode call", f"{s['vs_st_bulk']:.2f}x", ""),
        _row("throughput / sentence-transformers per request", f"{s['vs_st_per_request']:.2f}x", ""),
        _row(
            "matmul peak (side^2)",
            ", ".join(f"{d} {p['median_gflops']:.1f} GFLOP/s ({p['side']}^2)" for d, p in peak.items()),
            "",
        ),
        _row("model FLOPs per pair (analytic, real tokens)", f"{s['gflop_per_pair']:.2f} GFLOP", ""),
        _row(
            f"achieved by the service at {s['best_concurrency']} clients",
            f"{s['service_gflops']:.0f} GFLOP/s, {service_fraction:.0%} of {peak_dtype} peak",
            ">= 40%",
        ),
        _row(
            "achieved by the model alone",
            f"{s['model_gflops']:.0f} GFLOP/s, {model_fraction:.0%} of {peak_dtype} peak",
            ">= 50%",
        ),
        _row("service overhead at 8 clients (vs model alone)", f"{s['overhead_at_8_clients']:.0%}", "<= 10%"),
        _row("model idle / busy at 8 clients (server side)", f"{s['idle_over_busy_at_8_clients']:.0%}", ""),
        _row(
            "scores vs sentence-transformers fp32",
            f"max abs diff {agree['max_abs_score_diff']:.4f}, "
            f"same top 5 in {agree['same_top5_fraction']:.0%}",
            "",
        ),
    ]
    return "\n".join(lines)
