"""End-to-end evaluation over a running service: what a user of ``/answer`` gets.

    python -m training.evaluate_service                                # starts one with its defaults
    python -m training.evaluate_service --name untrained \
        --env GRERANK_ARTIFACT=none GRERANK_READER_ARTIFACT=none          # the untrained models
    python -m training.evaluate_service --url http://127.0.0.1:8000    # a service you started

Every paragraph of the split's questions is ingested through ``POST /documents`` (id = its title), then each
question goes to ``POST /answer`` with open retrieval over the whole index (the service's default
candidates and top k). Reported: EM and F1 by question type, how often the supporting paragraphs are cited
(each, both, the answer-bearing one), and latency (client-measured, and the service's per-stage timings).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from grerank.qa_data import Example, load_examples, split_path
from training.metrics import exact_match, f1_score


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.evaluate_service",
        description="Ingest a split's paragraphs into the service, ask every question through /answer, and "
        "report EM/F1, citations of the supporting paragraphs and latency.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--split", default="dev", help="'dev', 'train' or a HotpotQA file")
    p.add_argument(
        "--limit", type=int, default=None, help="ask only the first N questions (all are ingested)"
    )
    p.add_argument("--url", default=None, help="a running service; default: start one on a loopback port")
    p.add_argument("--env", nargs="*", default=[], help="GRERANK_*=VALUE settings of the started service")
    p.add_argument("--api-key", default=None, help="bearer key, if the service requires one")
    p.add_argument("--name", default="service", help="name in the results")
    p.add_argument("--out", default=None, help="write the results as JSON here (and the answers beside it)")
    return p.parse_args(argv)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@contextmanager
def started_service(env: dict[str, str]) -> Iterator[str]:
    from bench.local_service import serving

    with tempfile.TemporaryDirectory(prefix="grerank-e2e-") as tmp:
        folder = Path(tmp)
        with serving({"GRERANK_INDEX_DIR": str(folder / "index"), **env}, folder / "server.log") as url:
            yield url


def ingest(client: httpx.Client, examples: list[Example], chunk: int = 200) -> int:
    documents = {
        p.title: {"id": p.title, "title": p.title, "text": p.text} for ex in examples for p in ex.passages
    }
    rows = list(documents.values())
    for start in tqdm(range(0, len(rows), chunk), desc="POST /documents", unit="chunk"):
        response = client.post("/documents", json={"documents": rows[start : start + chunk]}, timeout=900)
        response.raise_for_status()
    return len(rows)


def ask(client: httpx.Client, examples: list[Example]) -> list[dict]:
    rows = []
    for ex in tqdm(examples, desc="POST /answer", unit="q"):
        started = time.perf_counter()
        response = client.post("/answer", json={"query": ex.question}, timeout=300)
        seconds = time.perf_counter() - started
        response.raise_for_status()
        body = response.json()
        cited = [c["id"] for c in body["citations"]]
        gold = [p.title for p, s in zip(ex.passages, ex.supporting, strict=True) if s]
        bearing = [p.title for p, b in zip(ex.passages, ex.answer_bearing(), strict=True) if b]
        answer = body["answer"] or ""
        rows.append(
            {
                "id": ex.id,
                "type": ex.type,
                "question": ex.question,
                "answer": answer,
                "gold": ex.answer,
                "em": exact_match(answer, ex.answers),
                "f1": f1_score(answer, ex.answers),
                "cited": cited,
                "supporting_cited": sum(t in cited for t in gold) / max(len(gold), 1),
                "both_cited": float(all(t in cited for t in gold)),
                "answer_bearing_cited": float(any(t in cited for t in bearing)) if bearing else None,
                "seconds": seconds,
                "timings_ms": body["timings_ms"],
                "error": body.get("error"),
            }
        )
    return rows


def summarise(rows: list[dict]) -> dict:
    def mean(key: str, subset: list[dict]) -> dict:
        values = [r[key] for r in subset if r[key] is not None]
        return {"value": round(100 * statistics.fmean(values), 2) if values else None, "n": len(values)}

    groups = {"all": rows} | {
        t: [r for r in rows if r["type"] == t] for t in sorted({r["type"] for r in rows})
    }
    quality = {
        name: {
            key: mean(key, subset)
            for key in ("em", "f1", "supporting_cited", "both_cited", "answer_bearing_cited")
        }
        for name, subset in groups.items()
    }
    seconds = [r["seconds"] for r in rows]
    stages = {
        stage: statistics.fmean(r["timings_ms"].get(stage, 0.0) for r in rows)
        for stage in rows[0]["timings_ms"]
    }
    latency = {
        "p50_s": round(percentile(seconds, 0.5), 3),
        "p95_s": round(percentile(seconds, 0.95), 3),
        "mean_s": round(statistics.fmean(seconds), 3),
        "mean_stage_ms": {k: round(v, 1) for k, v in stages.items()},
    }
    return {
        "quality": quality,
        "latency": latency,
        "reader_errors": sum(r["error"] is not None for r in rows),
    }


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    examples = load_examples(split_path(args.split))
    asked = examples[: args.limit]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    service = nullcontext(args.url) if args.url else started_service(env)
    with service as url, httpx.Client(base_url=url, headers=headers) as client:
        info = client.get("/info", timeout=30).json()
        documents = ingest(client, examples)
        rows = ask(client, asked)
    result = {
        "name": args.name,
        "command": shlex.join(["python", "-m", "training.evaluate_service", *argv]),
        "split": str(split_path(args.split)),
        "documents": documents,
        "questions": len(rows),
        "served": {
            role: {k: info["models"][role][k] for k in ("status", "source")}
            for role in ("reranker", "reader")
        }
        | {"default_top_k": info.get("default_top_k"), "device": info["models"]["device"]},
        **summarise(rows),
    }
    print(json.dumps({k: result[k] for k in ("name", "questions", "quality", "latency")}, indent=1))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return result


if __name__ == "__main__":
    main()
