"""Evaluate a reranker on a split: what it ranks first among each question's candidates, and what the
reader answers from its top k.

    python -m training.evaluate --reranker runs/grerank/artifact            # a trained artifact
    python -m training.evaluate --reranker zero-shot                        # the untrained default MiniLM
    python -m training.evaluate --reranker bm25 --k 2 5 --out results/dev/bm25.json

Ranking (training.metrics): Recall@1 and MRR of the answer-bearing supporting paragraph; Recall@2/@5,
NDCG@5 and MRR of all supporting paragraphs; Recall@2/@5 of bridge paragraphs. Answers: the default
reader reads exactly the deterministic top k (the serving path) and answers greedily; EM and F1 use the
HotpotQA normalisation. Everything is broken down by question type, with the number of questions behind
each figure.

Reader work is cached on disk (``--state-cache-dir``): document states, and each generated answer under a
key of the reader, question and the exact documents read. Methods that pick the same top k for a question
share that answer, so evaluating many methods costs little more than evaluating one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from grerank import model_paths
from grerank.artifact import load_artifact, read_manifest, sha256_file
from grerank.doc_state_cache import DEFAULT_DISK_GB, DocStateCache
from grerank.gumbel_topk import hard_topk
from grerank.qa_data import Example, split_path
from grerank.reader_artifact import load_configured_reader
from grerank.readers import READER_FAMILIES
from grerank.reranker import Reranker, build_reranker
from grerank.runtime import PRECISIONS, resolve_device, resolve_dtype
from training.attention_features import router_scores
from training.bm25 import BM25
from training.metrics import exact_match, f1_score, ranking_metrics
from training.train import load_split, score_all

BASELINES = ("bm25", "zero-shot")
READ_SETTINGS = ("oracle", "all")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Evaluate a reranker (an artifact, a model folder, or a baseline) on a split: ranking "
        "metrics over each question's candidates and reader EM/F1 from its top k, by question type.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--split", default="dev", help="'train', 'dev' (shipped HotpotQA) or a HotpotQA/FiD file")
    p.add_argument(
        "--reranker",
        default="zero-shot",
        help="a reranker or head-router artifact folder, a reranker folder, 'zero-shot' (the untrained "
        "default MiniLM) or 'bm25'",
    )
    p.add_argument("--name", default=None, help="method name in the report (default: from --reranker)")
    p.add_argument("--candidates", dest="n", type=int, default=10, help="candidates per question")
    p.add_argument("--limit", type=int, default=None, help="use only the first N questions")
    p.add_argument("--k", type=int, nargs="*", default=[2, 5], help="top-k the reader answers from")
    p.add_argument(
        "--read",
        nargs="*",
        choices=READ_SETTINGS,
        default=[],
        help="reranker-free reader settings besides the top k: 'oracle' (the supporting paragraphs only), "
        "'all' (every candidate)",
    )
    p.add_argument(
        "--answer-questions", type=int, default=None, help="questions the reader answers (default: all)"
    )
    p.add_argument("--max-new-tokens", type=int, default=24, help="answer length limit")
    p.add_argument("--reader", default="default", help="'default' (SmolLM2-135M-Instruct) or a model folder")
    p.add_argument("--reader-family", choices=READER_FAMILIES, default="auto")
    p.add_argument(
        "--reader-artifact",
        default="shipped",
        help="trained reader adapter: 'shipped' (models/reader), a reader artifact folder, or 'none'",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--state-cache-dir", default="runs/doc-states", help="document states and answers on disk")
    p.add_argument("--cache-disk-gb", type=float, default=DEFAULT_DISK_GB)
    p.add_argument("--out", default=None, help="write the results as JSON here (and predictions beside it)")
    args = p.parse_args(argv)
    if any(k < 1 or k > args.n for k in args.k):
        p.error(f"every --k must lie in 1..{args.n}")
    return args


# ---- scoring ---------------------------------------------------------------------------------------------


def load_scorer(spec: str) -> tuple[Reranker | str, dict]:
    """The reranker to evaluate and a description of it for the report."""
    if spec == "bm25":
        return "bm25", {"kind": "bm25"}
    if spec == "zero-shot":
        path = model_paths.resolve("reranker", "default")
        return build_reranker("bi-encoder", path), {"kind": "zero-shot", "path": str(path)}
    folder = Path(spec)
    if (folder / "manifest.json").is_file() and json.loads((folder / "manifest.json").read_text()).get(
        "kind"
    ) == "router":  # ranks by the reader's attention heads: scored in evaluate(), through the reader
        return "router", {
            "kind": "router",
            "path": str(folder),
            "manifest": read_manifest(folder, kind="router"),
        }
    if (folder / "manifest.json").is_file():
        reranker, manifest = load_artifact(folder)
        return reranker, {"kind": "artifact", "path": str(folder), "manifest": manifest}
    if (folder / "reranker.json").is_file():
        return Reranker.load(folder), {"kind": "reranker folder", "path": str(folder)}
    raise SystemExit(
        f"--reranker {spec!r} is neither {' nor '.join(BASELINES)}, an artifact (manifest.json) "
        "nor a reranker folder (reranker.json)"
    )


def scores_for(scorer: Reranker | str, examples: list[Example], bf16: bool) -> list[list[float]]:
    if scorer == "bm25":
        bm25 = BM25(p.as_text() for ex in examples for p in ex.passages)
        return [bm25.scores(ex.question, [p.as_text() for p in ex.passages]) for ex in examples]
    return score_all(scorer, examples, bf16)


# ---- answers ---------------------------------------------------------------------------------------------


class AnswerStore:
    """Generated answers on disk, keyed by the states' namespace (reader and how states are computed),
    question, the documents read and the length limit."""

    def __init__(self, path: Path, cache: DocStateCache) -> None:
        self.path = path
        # The untrained reader keeps the states' namespace as its signature, so answers stored before
        # adapters existed stay valid; a trained reader adds its adapter.
        reader = cache.reader
        self.signature = cache.namespace + (f"|{reader.adapter_id}" if reader.adapter_id else "")
        if getattr(reader, "answer_model", None) is not None:  # generation through merged weights
            self.signature += "|merged"
        self.answers: dict[str, str] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                self.answers[row["key"]] = row["answer"]

    def key(self, example: Example, chosen: Sequence[int], max_new_tokens: int) -> str:
        texts = [example.passages[i].as_text() for i in chosen]
        return hashlib.sha256(
            "\0".join([self.signature, example.question, str(max_new_tokens), *texts]).encode()
        ).hexdigest()

    def add(self, key: str, answer: str) -> None:
        self.answers[key] = answer
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps({"key": key, "answer": answer}) + "\n")


def reading_sets(examples: list[Example], scores: list[list[float]], setting: str) -> list[list[int]]:
    """The candidates the reader reads in ``setting`` (``topK``, ``oracle`` or ``all``), in candidate order:
    the same set gives the same prompt, whatever ranked it."""
    if setting == "oracle":
        return [ex.supporting_indices() for ex in examples]
    if setting == "all":
        return [list(range(len(ex.passages))) for ex in examples]
    k = int(setting.removeprefix("top"))
    return [sorted(hard_topk(torch.tensor(row, dtype=torch.float32), k).tolist()) for row in scores]


def answer_metrics(
    examples: list[Example],
    reading: list[list[int]],
    setting: str,
    cache: DocStateCache,
    store: AnswerStore,
    max_new_tokens: int,
) -> tuple[dict, list[dict]]:
    """EM/F1 by question type when the reader reads ``reading`` (one index list per question); and the
    predictions."""
    groups: dict[str, dict[str, list[float]]] = {}
    predictions = []
    for example, chosen in tqdm(list(zip(examples, reading, strict=True)), desc=setting, unit="q"):
        key = store.key(example, chosen, max_new_tokens)
        if key not in store.answers:
            states = cache.states([example.passages[i] for i in chosen], example.question)
            store.add(key, cache.reader.generate(example.question, states, max_new_tokens))
        answer = store.answers[key]
        em, f1 = exact_match(answer, example.answers), f1_score(answer, example.answers)
        for group in ("all", example.type or "untyped"):
            bucket = groups.setdefault(group, {"em": [], "f1": []})
            bucket["em"].append(em)
            bucket["f1"].append(f1)
        predictions.append(
            {"id": example.id, "setting": setting, "read": chosen, "answer": answer, "gold": example.answer}
        )
    metrics = {
        group: {name: {"value": 100 * sum(v) / len(v), "n": len(v)} for name, v in values.items()}
        for group, values in groups.items()
    }
    return metrics, predictions


# ---- main ------------------------------------------------------------------------------------------------


def evaluate(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    examples = load_split(args.split, args.limit, args.n)
    scorer, described = load_scorer(args.reranker)
    if isinstance(scorer, Reranker):
        scorer.to(device)
    started = time.perf_counter()
    loaded = None  # (reader, manifest), when ranking needs the reader too
    if scorer == "router":
        loaded = load_configured_reader(args.reader_artifact, args.reader, args.reader_family, device, dtype)
        scores = router_scores(Path(args.reranker), loaded[0], examples, Path(split_path(args.split)).stem)
    else:
        scores = scores_for(scorer, examples, dtype == torch.bfloat16)
    result: dict = {
        "name": args.name
        or (described["kind"] if described["kind"] != "artifact" else Path(args.reranker).name),
        "command": "python -m training.evaluate " + shlex.join(args.argv),
        "reranker": described,
        "split": {"path": str(split_path(args.split)), "sha256": sha256_file(split_path(args.split))},
        "questions": len(examples),
        "ranking": ranking_metrics(examples, scores),
        "answers": {},
    }
    predictions: list[dict] = []
    settings = [f"top{k}" for k in args.k] + args.read
    if settings:
        reader, manifest = loaded or load_configured_reader(
            args.reader_artifact, args.reader, args.reader_family, device, dtype
        )
        result["reader"] = {"base": args.reader, "artifact": args.reader_artifact if manifest else None}
        result["reader"]["adapter_sha256"] = reader.adapter_id
        state_dir = Path(args.state_cache_dir)
        cache = DocStateCache(reader, 2 << 30, state_dir, int(args.cache_disk_gb * (1 << 30)))
        store = AnswerStore(state_dir / "answers.jsonl", cache)
        m = args.answer_questions or len(examples)
        for setting in settings:
            reading = reading_sets(examples[:m], scores[:m], setting)
            metrics, preds = answer_metrics(examples[:m], reading, setting, cache, store, args.max_new_tokens)
            result["answers"][setting] = metrics
            predictions += preds
    result["seconds"] = round(time.perf_counter() - started, 1)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
    return result


def summary_table(result: dict) -> str:
    """The headline figures as aligned text lines."""
    lines = [f"{result['name']}: {result['questions']} questions"]
    for group, metrics in result["ranking"].items():
        cells = ", ".join(f"{name} {m['value']:.1f} (n={m['n']})" for name, m in metrics.items())
        lines.append(f"  ranking [{group}] {cells}")
    for topk, groups in result["answers"].items():
        for group, metrics in groups.items():
            cells = ", ".join(f"{name} {m['value']:.1f} (n={m['n']})" for name, m in metrics.items())
            lines.append(f"  answers {topk} [{group}] {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.argv = argv  # the exact command goes into the results
    result = evaluate(args)
    print(summary_table(result))
    return result


if __name__ == "__main__":
    main()
