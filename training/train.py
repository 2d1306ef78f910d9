"""G-Rerank training: a reranker learns from a frozen reader's answer loss through a relaxed top-k mask.

One step, for a batch of questions with n candidates each (DESIGN.md section 2)::

    w = R(q, d_1..d_n)                         reranker scores               (trainable)
    M = relaxed_topk_mask(w, k, tau, kappa)    Gumbel soft top-k             (grerank.gumbel_topk)
    L = reader NLL of the gold answer, with log M added to the attention of each document's tokens
                                               (grerank.masked_attention, reader frozen)
    L += anchor_weight * KL(p_start || p_w)    optional: stay close to the starting reranker
    backprop L into R only

The reader's document states are constants (frozen reader, parallel-encoded documents), so they are
computed once and cached (grerank.doc_state_cache, in memory and on disk across runs); backprop runs only
through question/answer tokens. ``--objective`` swaps G-Rerank for a baseline (training.objectives) on the
same data, loop and evaluation.

    python -m training.train --help
    torchrun --nproc_per_node=2 -m training.train ...     (DDP: gloo on CPU, nccl on GPU)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from grerank import model_paths
from grerank.artifact import sha256_file, write_artifact
from grerank.doc_state_cache import DEFAULT_DISK_GB, DocStateCache
from grerank.gumbel_topk import hard_topk_mask
from grerank.qa_data import Example, load_examples, split_path
from grerank.reader_artifact import load_configured_reader
from grerank.readers import READER_FAMILIES
from grerank.reranker import Reranker, build_reranker
from grerank.runtime import (
    PRECISIONS,
    available_memory_bytes,
    peak_rss_gb,
    resolve_device,
    resolve_dtype,
    return_free_memory,
    reuse_freed_memory,
)
from training import objectives
from training.metrics import ranking_metrics
from training.reader_signals import reader_signals

SELECT_BY = ("reader_nll", "answer_recall@1", "answer_mrr", "support_recall@2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Train a reranker end to end with Gumbel Reranking (G-Rerank) through a frozen reader, "
        "evaluate it on dev, and write a versioned artifact from the best dev checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--train",
        nargs="+",
        default=["train"],
        help="one or more of 'train' (shipped HotpotQA), 'extra' (its 1,095 extra official-train questions) "
        "or a HotpotQA/FiD file",
    )
    g.add_argument("--dev", default="dev", help="dev split, same forms as --train")
    g.add_argument("--limit-train", type=int, default=None, help="use only the first N train questions")
    g.add_argument("--limit-dev", type=int, default=None, help="use only the first N dev questions")
    g.add_argument(
        "--candidates", dest="n", type=int, default=10, help="n: candidates per question (fewer: skipped)"
    )
    g = p.add_argument_group("models")
    g.add_argument("--reranker-arch", choices=("bi-encoder", "cross-encoder"), default="bi-encoder")
    g.add_argument("--reranker", default="default", help="starting weights: 'default' (MiniLM) or a folder")
    g.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="train a LoRA adapter of this rank (peft; alpha 2 x rank) instead of every weight: an artifact "
        "of about a megabyte over the named base model; 0: full fine-tuning",
    )
    g.add_argument("--reader", default="default", help="'default' (SmolLM2-135M-Instruct) or a model folder")
    g.add_argument("--reader-family", choices=READER_FAMILIES, default="auto")
    g.add_argument(
        "--reader-artifact",
        default="shipped",
        help="the trained reader adapter over --reader: 'shipped' (models/reader), a reader artifact folder, "
        "or 'none' (the untrained reader)",
    )
    g = p.add_argument_group("objective")
    g.add_argument(
        "--objective",
        choices=objectives.OBJECTIVES,
        default="grerank",
        help="grerank, or a baseline: pdist, emdr, loop, adist (distilled from the reader), supervised "
        "(labels); or expected: the exact expected reader NLL over every k-subset, the loss G-Rerank's "
        "relaxation estimates (an ablation; n choose k reader passes per question, once)",
    )
    g.add_argument("--k", type=int, default=2, help="documents the reader sees (soft draws per mask)")
    g.add_argument("--tau", type=float, default=0.5, help="Gumbel-softmax temperature")
    g.add_argument(
        "--kappa",
        type=float,
        default=10.0,
        help="scale of reranker scores in the mask and in softmax(kappa*w)",
    )
    g.add_argument(
        "--mask-draws",
        type=int,
        default=1,
        help="Gumbel masks per question and step, their losses averaged: less gradient noise (one draw's "
        "gradient has about as much noise as signal, see training.gradient_check) for the cost of the "
        "question and answer tokens only",
    )
    g.add_argument(
        "--nested",
        action="store_true",
        help="average the loss over the reader reading the top 1, top 2, ..., top k (grerank: the relaxed "
        "masks of the same draws, k reader passes a draw; expected: each level's exact loss), so the order "
        "within the top k counts (answer Recall@1), not only the set",
    )
    g.add_argument(
        "--antithetic",
        action="store_true",
        help="pair a question's Gumbel masks as noise u and 1 - u (antithetic draws; needs an even "
        "--mask-draws)",
    )
    g.add_argument(
        "--standardize-scores",
        action="store_true",
        help="standardise each question's scores (mean 0, std 1) before kappa in the mask (grerank) and the "
        "subset distribution (expected); kappa then counts standard deviations",
    )
    g.add_argument(
        "--anchor-weight",
        type=float,
        default=1.0,
        help="weight of KL(starting reranker || trained reranker) over each question's candidates; keeps "
        "what the starting reranker knew (0 disables)",
    )
    g.add_argument("--anchor-temperature", type=float, default=0.1, help="softmax temperature of that KL")
    g.add_argument(
        "--mix-start",
        type=float,
        default=0.0,
        help="write the artifact with (1 - MIX) x trained + MIX x starting weights: a mixture of the two "
        "rerankers at no serving cost (WiSE-FT); the checkpoint is chosen before mixing; 0 disables",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=2e-5)
    g.add_argument("--epochs", type=int, default=2)
    g.add_argument("--batch-size", type=int, default=4, help="questions per step and process")
    g.add_argument("--grad-accum", type=int, default=1, help="steps whose gradients are summed per update")
    g.add_argument("--warmup", type=float, default=0.1, help="fraction of updates with a linear LR warm-up")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument(
        "--precision", choices=PRECISIONS, default="auto", help="reader weights and reranker autocast"
    )
    g.add_argument("--no-doc-cache", action="store_true", help="recompute document states every step (slow)")
    g.add_argument(
        "--cache-memory-gb",
        type=float,
        default=None,
        help="document states kept in RAM (default: half the memory available at start, shared among "
        "local processes); the rest are read back from --state-cache-dir, which is slower",
    )
    g.add_argument(
        "--state-cache-dir",
        default="runs/doc-states",
        help="document states and reader signals on disk, shared by every run with the same reader",
    )
    g.add_argument(
        "--cache-disk-gb", type=float, default=DEFAULT_DISK_GB, help="disk budget of --state-cache-dir"
    )
    g = p.add_argument_group("evaluation and output")
    g.add_argument(
        "--eval-every", type=int, default=0, help="updates between dev evaluations (0: each epoch)"
    )
    g.add_argument("--dev-reader-questions", type=int, default=100, help="dev questions for the reader NLL")
    g.add_argument(
        "--select-by", choices=SELECT_BY, default="reader_nll", help="dev criterion for the best state"
    )
    g.add_argument("--out", default="runs/grerank", help="run folder: log, checkpoint, artifact")
    g.add_argument("--artifact", default=None, help="artifact folder (default: OUT/artifact)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    args = p.parse_args(argv)
    if args.mask_draws < 1:
        p.error(f"--mask-draws must be at least 1, not {args.mask_draws}")
    if args.antithetic and args.mask_draws % 2:
        p.error(f"--antithetic pairs the masks: --mask-draws must be even, not {args.mask_draws}")
    if args.k > args.n:
        p.error(f"--k ({args.k}) cannot exceed --candidates ({args.n})")
    if not 0.0 <= args.mix_start <= 1.0:
        p.error(f"--mix-start must lie in [0, 1], not {args.mix_start}")
    return args


# ---- distributed -----------------------------------------------------------------------------------------


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); starts a process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


# ---- one G-Rerank step -----------------------------------------------------------------------------------


def candidate_texts(batch: list[Example]) -> list[list[str]]:
    return [[p.as_text() for p in ex.passages] for ex in batch]


def document_states(batch: list[Example], reader, cache: DocStateCache | None) -> list[list[torch.Tensor]]:
    if cache is not None:
        return [cache.states(ex.passages, ex.question) for ex in batch]
    return [reader.encode_documents(ex.passages, question=ex.question) for ex in batch]


def batch_loss(
    batch: list[Example],
    reranker: torch.nn.Module,
    reader,
    cache: DocStateCache | None,
    args: argparse.Namespace,
    generator: torch.Generator,
    start_scores: dict[str, torch.Tensor],
    signals: dict[str, dict[str, torch.Tensor]],
    autocast_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The ``--objective`` loss of one batch (plus the anchor term), and its parts for the log."""
    device = reader.device
    with torch.autocast(
        device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
    ):
        scores = torch.stack(reranker([ex.question for ex in batch], candidate_texts(batch))).float()

    def target(kind: str) -> torch.Tensor:  # a reader signal of the batch's questions [B, ...]
        return torch.stack([signals[kind][ex.id] for ex in batch]).to(scores.device)

    if args.objective == "grerank":
        questions, answers = [ex.question for ex in batch], [ex.answer for ex in batch]
        states = document_states(batch, reader, cache)
        loss = objectives.grerank_nll(
            scores,
            reader,
            questions,
            answers,
            states,
            args.k,
            args.tau,
            args.kappa,
            generator,
            args.mask_draws,
            args.antithetic,
            args.standardize_scores,
            args.nested,
        )
    elif args.objective == "expected":
        terms = [
            objectives.expected_nll(
                scores, target(f"subset_nll_k{k}"), k, args.kappa, args.standardize_scores
            )
            for k in objectives.levels(args.k, args.nested)
        ]
        loss = torch.stack(terms).mean()
    elif args.objective == "supervised":
        labels = torch.tensor([ex.supporting for ex in batch], device=scores.device)
        loss = objectives.supervised_loss(scores, labels, args.kappa)
    else:
        loss = objectives.DISTILLATION[args.objective](scores, target(*signals), args.kappa)  # its one signal
    parts = {args.objective: loss.item()}
    if args.anchor_weight > 0:
        start = torch.stack([start_scores[ex.id] for ex in batch]).to(scores.device)
        kl = objectives.anchor_kl(scores, start, args.anchor_temperature)
        loss = loss + args.anchor_weight * kl
        parts["kl"] = kl.item()
    return loss, parts


# ---- evaluation ------------------------------------------------------------------------------------------


@torch.no_grad()
def score_all(reranker: Reranker, examples: list[Example], bf16: bool, chunk: int = 64) -> list[list[float]]:
    """Scores of every example's candidates, ``chunk`` questions per call (with a progress bar)."""
    scores: list[list[float]] = []
    for start in tqdm(range(0, len(examples), chunk), desc="scoring", unit="chunk", leave=False):
        batch = examples[start : start + chunk]
        scores += [
            s.tolist()
            for s in reranker.predict_many([ex.question for ex in batch], candidate_texts(batch), bf16)
        ]
    return scores


@torch.no_grad()
def reader_nll_at_k(
    examples: list[Example], scores: list[list[float]], reader, cache: DocStateCache | None, k: int
) -> float:
    """Mean answer NLL when the reader sees exactly the deterministic top-k (label-free dev criterion)."""
    total = 0.0
    for start in tqdm(range(0, len(examples), 8), desc="dev reader", unit="batch", leave=False):
        batch = examples[start : start + 8]
        mask = hard_topk_mask(torch.tensor(scores[start : start + 8]), k)
        nll = reader.answer_nll(
            [ex.question for ex in batch],
            [ex.answer for ex in batch],
            document_states(batch, reader, cache),
            mask,
        )
        total += nll.sum().item()
    return total / max(len(examples), 1)


def evaluate(
    reranker: Reranker,
    dev: list[Example],
    reader,
    cache: DocStateCache | None,
    args: argparse.Namespace,
    bf16: bool,
) -> dict:
    scores = score_all(reranker, dev, bf16)
    metrics = ranking_metrics(dev, scores)
    flat = {name: m["value"] for name, m in metrics["all"].items()}
    if args.dev_reader_questions > 0:
        m = args.dev_reader_questions
        flat["reader_nll"] = reader_nll_at_k(dev[:m], scores[:m], reader, cache, args.k)
    return {"summary": flat, "by_type": metrics}


Weights = dict[str, torch.Tensor]


def mixed(trained: Weights, start: Weights, mix: float) -> Weights:
    """``(1 - mix) x trained + mix x start`` for every floating-point tensor (integer buffers as trained)."""
    if mix == 0.0:
        return trained
    return {
        name: torch.lerp(value, start[name].to(value.dtype), mix) if value.is_floating_point() else value
        for name, value in trained.items()
    }


def better(new: dict, best: dict | None, key: str) -> bool:
    if best is None:
        return True
    lower_is_better = key == "reader_nll"
    return new[key] < best[key] if lower_is_better else new[key] > best[key]


# ---- main ------------------------------------------------------------------------------------------------


def load_split(names: str | list[str], limit: int | None, n: int) -> list[Example]:
    """The questions of one split or of several in turn (the first ``limit`` of them all), their first
    ``n`` candidates; questions with fewer are skipped."""
    names = [names] if isinstance(names, str) else names
    examples = [ex for name in names for ex in load_examples(split_path(name))][:limit]
    examples = [ex for ex in examples if len(ex.passages) >= n]
    for ex in examples:
        ex.passages = ex.passages[:n]
        ex.supporting = ex.supporting[:n]
    return examples


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    reuse_freed_memory()
    device = resolve_device(args.device)
    rank, world = init_distributed(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    dtype = resolve_dtype(args.precision, device)
    bf16 = dtype == torch.bfloat16
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out = Path(args.out)
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(vars(args), indent=2) + "\n")

    train = load_split(args.train, args.limit_train, args.n)
    dev = load_split(args.dev, args.limit_dev, args.n)
    shard = train[rank::world][
        : len(train) // world
    ]  # equal shards: every rank takes the same number of steps

    reranker_path = model_paths.resolve("reranker", args.reranker)
    reranker = build_reranker(args.reranker_arch, reranker_path)
    if args.lora_rank:
        reranker.add_lora(args.reranker, args.lora_rank, 2.0 * args.lora_rank)
    reranker.to(device)
    weights = reranker.state_dict().items()
    start_weights = {k: v.detach().cpu().clone() for k, v in weights} if args.mix_start else {}
    reader, reader_manifest = load_configured_reader(
        args.reader_artifact, args.reader, args.reader_family, device, dtype
    )
    state_dir = Path(args.state_cache_dir)
    if args.cache_memory_gb is None:  # every process on this machine takes its share of half of what is free
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        memory = available_memory_bytes() // (2 * local)
    else:
        memory = int(args.cache_memory_gb * (1 << 30))
    cache = DocStateCache(reader, memory, state_dir, int(args.cache_disk_gb * (1 << 30)))
    if is_main:
        disk = f"{args.cache_disk_gb} GB in {state_dir}"
        print(f"document states: {memory / 2**30:.1f} GiB in memory, then {disk}")
    train_cache = None if args.no_doc_cache else cache

    # Reader signals are constants of training: computed once, on disk.
    signals = {
        kind: reader_signals(shard, cache, kind, state_dir / "reader-signals.jsonl", is_main)
        for kind in objectives.signal_kinds(args.objective, args.k, args.nested)
    }

    start_scores: dict[str, torch.Tensor] = {}
    if args.anchor_weight > 0:  # the starting reranker's scores, fixed for the whole run
        start_scores = {
            ex.id: torch.tensor(s) for ex, s in zip(shard, score_all(reranker, shard, bf16), strict=True)
        }

    model = reranker
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(reranker, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(reranker.parameters(), lr=args.lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(shard) / args.batch_size)
    updates = max(1, steps_per_epoch * args.epochs // args.grad_accum)
    warmup = max(1, int(args.warmup * updates))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: min(1.0, (u + 1) / warmup))
    eval_every = args.eval_every or max(1, steps_per_epoch // args.grad_accum)

    state = {
        "epoch": 0,
        "step": 0,
        "update": 0,
        "best": None,
        "history": [],
        "train_seconds": 0.0,
        "examples": 0,
    }
    checkpoint = out / "checkpoint.pt"
    best_weights = None
    if args.resume and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        reranker.load_state_dict(saved["reranker"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        state, best_weights = saved["state"], saved["best_weights"]
        if is_main:
            print(f"resumed from {checkpoint} at epoch {state['epoch']}, update {state['update']}")

    log = (out / "log.jsonl").open("a") if is_main else None

    def record(entry: dict) -> None:
        state["history"].append(entry)
        if log is not None:
            log.write(json.dumps(entry) + "\n")
            log.flush()

    def run_eval() -> None:
        nonlocal best_weights
        if is_main:
            result = evaluate(reranker, dev, reader, cache, args, bf16)
            entry = {"type": "eval", "epoch": state["epoch"], "update": state["update"], **result["summary"]}
            record(entry)
            tqdm.write("dev " + " ".join(f"{k}={v:.3f}" for k, v in result["summary"].items()))
            if state["update"] == 0:
                state["start_metrics"] = result
            if better(result["summary"], state["best"] and state["best"]["summary"], args.select_by):
                state["best"] = {**result, "update": state["update"], "epoch": state["epoch"]}
                best_weights = copy.deepcopy({k: v.cpu() for k, v in reranker.state_dict().items()})
        return_free_memory()  # evaluation's transients differ from training's: return them
        barrier(world)

    if state["update"] == 0 and state["best"] is None:
        run_eval()  # the starting reranker is a candidate too: training must beat it to be kept

    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)
    if "generator" in state:
        generator.set_state(state["generator"])

    def save_checkpoint() -> None:
        state["train_seconds"] = time.perf_counter() - t_start
        state["generator"] = generator.get_state()
        if is_main:
            torch.save(
                {
                    "reranker": reranker.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "state": state,
                    "best_weights": best_weights,
                    "args": vars(args),
                },
                checkpoint,
            )

    t_start = time.perf_counter() - state["train_seconds"]
    for epoch in range(state["epoch"], args.epochs):
        state["epoch"] = epoch
        order = list(range(len(shard)))
        random.Random(args.seed + epoch).shuffle(order)  # the same order again on resume
        model.train()
        starts = range(0, len(order), args.batch_size)
        bar = tqdm(
            starts, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not is_main, initial=state["step"]
        )
        for step, start in enumerate(starts):
            if step < state["step"]:
                continue  # done before the checkpoint we resumed from
            batch = [shard[i] for i in order[start : start + args.batch_size]]
            loss, parts = batch_loss(
                batch,
                model,
                reader,
                train_cache,
                args,
                generator,
                start_scores,
                signals,
                dtype if bf16 else None,
            )
            (loss / args.grad_accum).backward()
            state["examples"] += len(batch) * world
            bar.update()
            if (step + 1) % args.grad_accum == 0 or start + args.batch_size >= len(order):
                torch.nn.utils.clip_grad_norm_(reranker.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                state["update"] += 1
                state["step"] = step + 1
                elapsed = time.perf_counter() - t_start
                record(
                    {"type": "train", "epoch": epoch, "update": state["update"], "loss": loss.item(), **parts}
                    | {"seconds": round(elapsed, 1), "peak_rss_gb": round(peak_rss_gb(), 2)}
                )
                bar.set_postfix(loss=f"{loss.item():.3f}", ex_s=f"{state['examples'] / elapsed:.2f}")
                if state["update"] % eval_every == 0:
                    run_eval()
                    save_checkpoint()
        bar.close()
        state["epoch"], state["step"] = epoch + 1, 0
        save_checkpoint()
    state["train_seconds"] = time.perf_counter() - t_start

    summary = {"best": state["best"], "start": state.get("start_metrics"), "history": state["history"]}
    if is_main:
        if state["history"][-1].get("type") != "eval":
            run_eval()
        reranker.load_state_dict(mixed(best_weights, start_weights, args.mix_start))
        artifact = Path(args.artifact) if args.artifact else out / "artifact"
        write_artifact(
            artifact,
            reranker,
            hyperparameters={k: getattr(args, k) for k in ("n", "k", "tau", "kappa", "anchor_weight", "lr")}
            | {"epochs": args.epochs, "batch_size": args.batch_size * world, "grad_accum": args.grad_accum}
            | {"seed": args.seed, "select_by": args.select_by, "anchor_temperature": args.anchor_temperature}
            | {"mix_start": args.mix_start, "mask_draws": args.mask_draws, "antithetic": args.antithetic}
            | {"standardize_scores": args.standardize_scores},
            reader={
                "model": str(args.reader),
                "family": getattr(reader, "family", "decoder"),
                "dtype": str(dtype),
                "artifact": reader_manifest
                and {"path": args.reader_artifact, "adapter_sha256": reader.adapter_id},
            },
            data={
                "train": [
                    {"path": str(split_path(t)), "sha256": sha256_file(split_path(t))} for t in args.train
                ],
                "dev": {"path": str(split_path(args.dev)), "sha256": sha256_file(split_path(args.dev))},
                "train_questions": len(train),
                "dev_questions": len(dev),
            },
            metrics={
                "dev_start": state.get("start_metrics", {}).get("summary"),
                "dev_best": state["best"]["summary"],
                "dev_best_by_type": state["best"]["by_type"],
                "best_update": state["best"]["update"],
            },
            training={
                "processes": world,
                "updates": state["update"],
                "train_seconds": round(state["train_seconds"], 1),
                "examples_per_second": round(state["examples"] / max(state["train_seconds"], 1e-9), 3),
                "doc_cache": not args.no_doc_cache,
                "peak_rss_gb": round(peak_rss_gb(), 2),
            },
        )
        print(
            f"artifact written to {artifact} (best dev {args.select_by} at update {state['best']['update']})"
        )
        summary["artifact"] = str(artifact)
        log.close()
    if world > 1:
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
