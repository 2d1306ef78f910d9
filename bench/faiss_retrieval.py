"""FAISS retrieval: latency and recall on the demo corpus, and the recall/latency trade-off of a compressed
index on a synthetic corpus of 1M vectors.

* Demo corpus (``make index``: the vendored HotpotQA paragraphs, exact inner-product search, as served):
  per shipped dev question, the time to embed the query and to search the service's ``DocumentIndex``
  (one query per call, as ``/answer`` does), and the recall of the question's supporting paragraphs in the
  top 20 that ``/answer`` reranks.
* Synthetic: 1M unit vectors of the embedder's width (384) drawn around 10k random centres, so that they
  cluster as text embeddings do (uniformly random vectors have no neighbours worth finding); queries are
  fresh draws. Exact search (``IndexFlatIP``) is the reference; IVF-PQ (4096 lists, 48 bytes per vector)
  is swept over ``nprobe``, with and without re-ranking the top 100 by exact distances (``IndexRefineFlat``).
  Recall@10 against the exact top 10, and the median / p99 latency of one query per call.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import faiss
import numpy as np

from bench.stats import percentile
from grerank import qa_data
from service.engine.models import load_embedder, resolve_bf16
from service.settings import Settings
from service.storage.build_index import hotpot_documents
from service.storage.document_index import STORE_FILE, DocumentIndex

TOP = 20
RECALL_AT = 10
NPROBES = (1, 4, 16, 64)


def _latencies(search, queries: np.ndarray) -> dict[str, float]:
    seconds = []
    for q in queries:
        start = time.perf_counter()
        search(q[None])
        seconds.append(time.perf_counter() - start)
    return {"p50_ms": 1000 * statistics.median(seconds), "p99_ms": 1000 * percentile(seconds, 99)}


def demo_corpus(questions: int) -> dict[str, Any]:
    settings = Settings()
    if not (settings.index_dir / STORE_FILE).is_file():
        raise RuntimeError(f"no index in {settings.index_dir}: run `make index` first")
    import torch

    device = torch.device("cpu")
    embedder, source = load_embedder(settings, device)
    bf16 = resolve_bf16(settings.precision, device)
    index = DocumentIndex(settings.index_dir, embedder.dim, source)
    try:
        examples = qa_data.load_examples(qa_data.split_path("dev"), questions)
        embedder.encode(["warm-up"], bf16=bf16)
        embed_s, search_s, recalls = [], [], []
        for ex in examples:
            start = time.perf_counter()
            vector = embedder.encode([ex.question], bf16=bf16)[0]
            middle = time.perf_counter()
            hits = index.search(vector, TOP)
            search_s.append(time.perf_counter() - middle)
            embed_s.append(middle - start)
            supporting = {
                d.id for d, s in zip(hotpot_documents(ex.passages), ex.supporting, strict=True) if s
            }
            found = {h.document.id for h in hits}
            recalls.append(len(supporting & found) / max(len(supporting), 1))
        return {
            "documents": len(index),
            "questions": len(examples),
            "index": "IndexFlatIP (exact)",
            "embed_p50_ms": 1000 * statistics.median(embed_s),
            "search_p50_ms": 1000 * statistics.median(search_s),
            "search_p99_ms": 1000 * percentile(search_s, 99),
            f"supporting_recall@{TOP}": statistics.mean(recalls),
        }
    finally:
        index.close()


def clustered(n: int, dim: int, centres: np.ndarray, rng: np.random.Generator, spread: float) -> np.ndarray:
    picks = rng.integers(0, len(centres), n)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # chunks: bounded temporaries
        stop = min(start + 100_000, n)
        block = centres[picks[start:stop]] + spread * rng.standard_normal((stop - start, dim), np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def synthetic(n: int, queries: int, dim: int = 384, lists: int = 4096) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((10_000, dim), np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    base = clustered(n, dim, centres, rng, spread=0.06)
    query = clustered(queries, dim, centres, rng, spread=0.06)

    exact = faiss.IndexFlatIP(dim)
    exact.add(base)
    _, truth = exact.search(query, RECALL_AT)
    flat = _latencies(lambda q: exact.search(q, RECALL_AT), query)
    rows = [{"index": "Flat (exact)", "bytes_per_vector": dim * 4, "recall": 1.0, **flat}]

    lists = min(lists, n // 64)
    ivfpq = faiss.index_factory(dim, f"IVF{lists},PQ48", faiss.METRIC_INNER_PRODUCT)
    started = time.perf_counter()
    ivfpq.train(base[rng.choice(n, min(n, 100 * lists), replace=False)])
    ivfpq.add(base)
    build_s = time.perf_counter() - started
    refined = faiss.IndexRefineFlat(ivfpq, faiss.swig_ptr(base))
    refined.k_factor = 10
    ivf = faiss.extract_index_ivf(ivfpq)
    for nprobe in NPROBES:
        ivf.nprobe = nprobe
        variants = (("IVF-PQ", ivfpq, 48), ("IVF-PQ + exact re-rank of 100", refined, 48 + dim * 4))
        for name, index, size in variants:
            _, found = index.search(query, RECALL_AT)
            overlap = [len(set(f) & set(t)) for f, t in zip(found, truth, strict=True)]
            recall = float(np.mean(overlap)) / RECALL_AT
            rows.append(
                {
                    "index": f"{name}, nprobe {nprobe}",
                    "bytes_per_vector": size,
                    "recall": recall,
                    **_latencies(lambda q, index=index: index.search(q, RECALL_AT), query),
                }
            )
    return {
        "vectors": n,
        "dim": dim,
        "queries": queries,
        "ivf_lists": lists,
        "ivfpq_build_s": build_s,
        "rows": rows,
    }


def run(quick: bool) -> dict[str, Any]:
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    return {
        "demo": demo_corpus(40 if quick else 300),
        "synthetic": synthetic(100_000 if quick else 1_000_000, 200 if quick else 1000),
    }


def markdown(result: dict[str, Any]) -> str:
    demo, syn = result["demo"], result["synthetic"]
    lines = [
        f"Demo corpus: {demo['documents']} documents, {demo['index']}, {demo['questions']} dev questions: "
        f"query embedding {demo['embed_p50_ms']:.1f} ms, search p50 {demo['search_p50_ms']:.2f} ms / "
        f"p99 {demo['search_p99_ms']:.2f} ms; supporting-paragraph recall@{TOP} "
        f"{demo[f'supporting_recall@{TOP}']:.3f}.",
        "",
        f"Synthetic: {syn['vectors']:,} clustered unit vectors of width {syn['dim']}, "
        f"{syn['queries']} queries (one per call); IVF-PQ with {syn['ivf_lists']} lists built in "
        f"{syn['ivfpq_build_s']:.0f} s.",
        "",
        f"| index | bytes/vector | recall@{RECALL_AT} | p50 (ms) | p99 (ms) |",
        "|---|---|---|---|---|",
        *(
            f"| {r['index']} | {r['bytes_per_vector']} | {r['recall']:.3f} | {r['p50_ms']:.2f} "
            f"| {r['p99_ms']:.2f} |"
            for r in syn["rows"]
        ),
    ]
    return "\n".join(lines)
