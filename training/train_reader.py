"""Train the reader for the task: a LoRA adapter (peft) over the default reader, in the served layout.

    python -m training.train_reader                  # the shipped default (make train-reader)
    python -m training.train_reader --help

The reader sees exactly what the service and G-Rerank give it (grerank.decoder_reader): the shared prefix,
each candidate encoded on its own, then the question and the answer. The adapter acts on the question and
answer tokens only (grerank.reader_adapter): documents stay encoded by the base model, so their states are
the cached constants G-Rerank and the service already use, and a step runs only the few question and answer
tokens forward and back.

One run, top to bottom:

1. load the train questions (the shipped split and the extra official-train questions; never dev), rank each
   question's candidates with the starting reranker, and draw the documents each question is read with
   (training.reader_inputs: all ten, the reranker's top k, gold plus distractors, gold missing), once for
   the run, so that every epoch reads the same sets and each document is encoded once;
2. encode every document those draws need, once, into the shared state cache (timed apart: a later run with
   the same reader pays nothing for it);
3. minimise the answer tokens' cross-entropy (the answer in the dataset's style, ending on the stop token),
   checkpointing every ``--checkpoint-every`` updates (``--resume`` continues);
4. answer dev questions with all candidates and with the supporting paragraphs only, and write the reader
   artifact (grerank.reader_artifact) with those metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from grerank import model_paths
from grerank.artifact import sha256_file
from grerank.decoder_reader import DecoderReader
from grerank.doc_state_cache import DEFAULT_DISK_GB, DocStateCache
from grerank.qa_data import Example, load_examples, split_path
from grerank.reader_adapter import LORA_TARGETS, add_lora, lora_parameters
from grerank.reader_artifact import write_reader_artifact
from grerank.reranker import build_reranker
from grerank.runtime import (
    PRECISIONS,
    available_memory_bytes,
    peak_rss_gb,
    resolve_device,
    resolve_dtype,
    reuse_freed_memory,
)
from training.metrics import exact_match, f1_score
from training.reader_inputs import reading_set
from training.train import score_all

ROOT = Path(__file__).resolve().parent.parent


def relative(path: Path) -> str:
    """A data path as the manifest records it: relative to the checkout when inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.train_reader",
        description="Fine-tune the reader (a LoRA adapter acting on question and answer tokens) for question "
        "answering over parallel-encoded candidates, and write a reader artifact.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--train",
        nargs="+",
        default=["train", "extra"],
        help="train splits: 'train' (shipped HotpotQA), 'extra' (its extra official-train questions) or "
        "HotpotQA/FiD files; never the dev split",
    )
    g.add_argument("--dev", default="dev", help="dev split for the final evaluation")
    g.add_argument("--limit-train", type=int, default=None, help="use only the first N train questions")
    g.add_argument("--dev-questions", type=int, default=100, help="dev questions answered at the end")
    g.add_argument("--ranker", default="default", help="reranker behind the top-k reading sets (bi-encoder)")
    g = p.add_argument_group("model")
    g.add_argument("--reader", default="default", help="base reader: 'default' or a causal-LM folder")
    g.add_argument("--rank", type=int, default=16, help="LoRA rank")
    g.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (scale alpha / rank)")
    g.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    g.add_argument("--targets", nargs="+", default=list(LORA_TARGETS), help="projections given an adapter")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--epochs", type=int, default=3)
    g.add_argument("--batch-size", type=int, default=4, help="questions per step")
    g.add_argument("--grad-accum", type=int, default=2, help="steps per update")
    g.add_argument("--warmup", type=float, default=0.05, help="fraction of updates with a linear warm-up")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("runtime and output")
    g.add_argument("--device", default="auto")
    g.add_argument("--precision", choices=PRECISIONS, default="auto", help="the base reader's weights")
    g.add_argument("--state-cache-dir", default="runs/doc-states", help="document states on disk (shared)")
    g.add_argument(
        "--cache-disk-gb", type=float, default=DEFAULT_DISK_GB, help="disk budget of --state-cache-dir"
    )
    g.add_argument("--checkpoint-every", type=int, default=20, help="updates between checkpoints")
    g.add_argument("--out", default="runs/reader", help="run folder: log, checkpoint, artifact")
    g.add_argument("--artifact", default=None, help="artifact folder (default: OUT/artifact)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    args = p.parse_args(argv)
    if any(name in ("dev", str(split_path("dev"))) for name in args.train):
        p.error("--train must not include the dev split")
    return args


def load_questions(specs: list[str], limit: int | None) -> list[Example]:
    examples = [ex for spec in specs for ex in load_examples(split_path(spec))]
    return [ex for ex in examples if ex.passages and ex.answer.strip()][:limit]


def reading_sets(examples: list[Example], ranked: list[list[int]], seed: int) -> list[list[int]]:
    rng = random.Random(f"{seed}-0")
    return [reading_set(ex, order, rng) for ex, order in zip(examples, ranked, strict=True)]


def batch_nll(
    reader: DecoderReader, batch: list[Example], chosen: list[list[int]], cache: DocStateCache
) -> torch.Tensor:
    """Mean answer-token NLL of a batch, each question reading its chosen candidates."""
    states = [cache.states([ex.passages[i] for i in ids]) for ex, ids in zip(batch, chosen, strict=True)]
    width = max(len(ids) for ids in chosen)
    mask = torch.tensor([[1.0] * len(ids) + [0.0] * (width - len(ids)) for ids in chosen])
    total, count = reader.answer_log_likelihood(
        [ex.question for ex in batch], [ex.answer for ex in batch], states, mask
    )
    return -total.sum() / count.sum().clamp_min(1)


@torch.no_grad()
def answer_dev(reader: DecoderReader, dev: list[Example], cache: DocStateCache) -> dict:
    """EM and F1 reading all candidates and reading the supporting paragraphs only (oracle)."""
    reader.model.eval()
    scores: dict[str, dict[str, list[float]]] = {"all": {"em": [], "f1": []}, "oracle": {"em": [], "f1": []}}
    for ex in tqdm(dev, desc="dev answers", unit="q"):
        for setting, ids in (("all", range(len(ex.passages))), ("oracle", ex.supporting_indices())):
            answer = reader.generate(ex.question, cache.states([ex.passages[i] for i in ids]), 24)
            scores[setting]["em"].append(exact_match(answer, ex.answers))
            scores[setting]["f1"].append(f1_score(answer, ex.answers))
    return {
        setting: {name: round(100 * sum(v) / max(len(v), 1), 2) for name, v in values.items()}
        for setting, values in scores.items()
    } | {"questions": len(dev)}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    reuse_freed_memory()
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    log = (out / "log.jsonl").open("a")

    def record(entry: dict) -> None:
        log.write(json.dumps(entry) + "\n")
        log.flush()

    # ---- 1. questions, the starting reranker's order, the reading sets ----
    train = load_questions(args.train, args.limit_train)
    dev = [ex for ex in load_examples(split_path(args.dev)) if ex.supporting][: args.dev_questions]
    ranked_file = out / "ranked.json"
    if ranked_file.is_file():
        ranked = json.loads(ranked_file.read_text())
    else:
        ranker = build_reranker("bi-encoder", model_paths.resolve("reranker", args.ranker)).to(device)
        scores = score_all(ranker, train, dtype == torch.bfloat16)
        ranked = [sorted(range(len(s)), key=lambda i, s=s: (-s[i], i)) for s in scores]
        ranked_file.write_text(json.dumps(ranked))
        del ranker
    # Drawn once: every epoch reads the same sets, so each document is encoded once for the whole run.
    plan = reading_sets(train, ranked, args.seed)

    reader = DecoderReader.from_pretrained(model_paths.resolve("reader", args.reader), device, dtype)
    adapter = add_lora(reader.model, args.rank, args.alpha, args.dropout, tuple(args.targets))
    reader.adapter = adapter
    memory = available_memory_bytes() // 2
    cache = DocStateCache(reader, memory, args.state_cache_dir, int(args.cache_disk_gb * (1 << 30)))

    # ---- 2. one-off encoding of every document the run reads ----
    started = time.perf_counter()
    needed = [ex.passages[i] for ex, ids in zip(train, plan, strict=True) for i in ids]
    needed += [p for ex in dev for p in ex.passages]
    passages = list({(p.title, p.text): p for p in needed}.values())
    for start in tqdm(range(0, len(passages), 64), desc="document states", unit="x64"):
        cache.states(passages[start : start + 64])
    encode_seconds = time.perf_counter() - started
    record({"type": "encode", "documents": len(passages), "encoded": cache.misses, "seconds": encode_seconds})
    print(f"document states: {len(passages)} documents, {cache.misses} encoded in {encode_seconds:.0f} s, "
          f"{cache.disk_bytes / 2**30:.1f} GiB on disk")  # fmt: skip

    # ---- 3. training ----
    params = lora_parameters(adapter)
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    updates = max(1, steps_per_epoch * args.epochs // args.grad_accum)
    warmup = max(1, int(args.warmup * updates))

    def lr_at(update: int) -> float:  # linear warm-up, then cosine decay to a tenth
        if update < warmup:
            return (update + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (update - warmup) / max(1, updates - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    state = {"epoch": 0, "step": 0, "update": 0, "train_seconds": 0.0}
    checkpoint = out / "checkpoint.pt"
    if args.resume and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        adapter.load_state_dict(saved["adapter"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        state = saved["state"]
        print(f"resumed from {checkpoint} at epoch {state['epoch']}, update {state['update']}")

    def save_checkpoint() -> None:
        state["train_seconds"] = time.perf_counter() - t_start
        lora = {k: v for k, v in adapter.state_dict().items() if "lora_" in k}
        saved = {"adapter": lora, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}
        torch.save(saved | {"state": state, "args": vars(args)}, checkpoint.with_suffix(".tmp"))
        checkpoint.with_suffix(".tmp").replace(checkpoint)

    t_start = time.perf_counter() - state["train_seconds"]
    for epoch in range(state["epoch"], args.epochs):
        state["epoch"] = epoch
        order = list(range(len(train)))
        random.Random(args.seed + epoch).shuffle(order)
        reader.model.train()  # LoRA dropout; the base reader has no dropout of its own
        starts = range(0, len(order), args.batch_size)
        bar = tqdm(starts, desc=f"epoch {epoch + 1}/{args.epochs}", initial=state["step"])
        for step, start in enumerate(starts):
            if step < state["step"]:
                continue
            index = order[start : start + args.batch_size]
            loss = batch_nll(reader, [train[i] for i in index], [plan[i] for i in index], cache)
            (loss / args.grad_accum).backward()
            bar.update()
            if (step + 1) % args.grad_accum == 0 or start + args.batch_size >= len(order):
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                state["update"] += 1
                state["step"] = step + 1
                elapsed = time.perf_counter() - t_start
                record({"type": "train", "epoch": epoch, "update": state["update"], "loss": loss.item(),
                        "lr": schedule.get_last_lr()[0], "seconds": round(elapsed, 1)})  # fmt: skip
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if state["update"] % args.checkpoint_every == 0:
                    save_checkpoint()
        bar.close()
        state["epoch"], state["step"] = epoch + 1, 0
        save_checkpoint()
    train_seconds = time.perf_counter() - t_start

    # ---- 4. dev answers and the artifact ----
    for param in params:
        param.requires_grad_(False)
    metrics = answer_dev(reader, dev, cache)
    record({"type": "eval", **metrics})
    print("dev " + json.dumps(metrics))
    data = {relative(split_path(spec)): sha256_file(split_path(spec)) for spec in args.train}
    artifact = Path(args.artifact) if args.artifact else out / "artifact"
    write_reader_artifact(
        artifact,
        reader,
        args.reader,
        hyperparameters={k: getattr(args, k) for k in ("rank", "alpha", "dropout", "targets", "lr", "epochs")}
        | {"batch_size": args.batch_size, "grad_accum": args.grad_accum, "warmup": args.warmup}
        | {"seed": args.seed, "precision": str(dtype), "ranker": args.ranker},
        data={"train": data, "train_questions": len(train), "dev": relative(split_path(args.dev))},
        metrics={"dev": metrics},
        training={
            "command": shlex.join(["python", "-m", "training.train_reader", *argv]),
            "updates": state["update"],
            "train_seconds": round(train_seconds, 1),
            "encode_seconds": round(encode_seconds, 1),
            "documents_encoded": cache.misses,
            "state_cache_gib": round(cache.disk_bytes / 2**30, 2),
            "peak_rss_gb": round(peak_rss_gb(), 2),
        },
    )
    print(f"reader artifact written to {artifact}")
    log.close()
    return {"artifact": str(artifact), "dev": metrics, "train_seconds": train_seconds}


if __name__ == "__main__":
    main()
