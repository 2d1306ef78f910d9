"""Choose the reader's attention heads to rerank with: static head sets (QRHead-style) and RouteHead's
query-routed heads, trained on the attention features of train questions (training.attention_features).

    python -m training.train_router --labels supporting --seeds 0 1 --artifact models/router
    python -m training.train_router --labels reader            # label-free: pseudo labels from the reader

Pseudo labels: per train question, a greedy forward search over head sets (from the empty set, add the head
that most improves the set's ranking of the question's relevant candidates; stop when none does, at
``--max-set`` heads). "Relevant" is the supporting paragraphs (``--labels supporting``) or, label-free, the
two candidates under which the reader finds the gold answer most likely (the signal PDist distils), so the
router can be trained wherever G-Rerank can. A set is scored by NDCG over the candidates, ties broken by
the margin between the weakest relevant and the strongest other candidate: combining heads is where
redundancy and conflict show, which one head's own score cannot tell.

The router (grerank.head_router) is fitted to those sets: binary cross-entropy per head plus a sparsity
term (``--sparsity`` times the mean head probability). Its query layer and how many heads it keeps are
chosen on a held-out fifth of the train questions by the same relevance (never on dev), then it is refitted
on every train question. Static sets rank heads by their own mean Recall@2 on the train questions.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from grerank.doc_state_cache import DocStateCache
from grerank.head_router import HeadRouter, RouterConfig, aggregate, select
from grerank.qa_data import Example
from grerank.router_artifact import write_router_artifact
from training.attention_features import (
    DEFAULT_DIR,
    Features,
    features_for,
    open_reader,
    reader_folder,
    split_examples,
)
from training.metrics import ranking_metrics

QUERY_LAYERS = (5, 10, 15, 20, 25, 29)
TOP_M = (1, 2, 4, 8, 16, 0)  # 0: every head the router gives probability >= 0.5
STATIC_M = (1, 4, 8, 16)
REPORTED = ("answer_recall@1", "support_recall@2", "support_recall@5", "bridge_recall@5")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.train_router",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--labels", choices=("supporting", "reader"), default="supporting")
    p.add_argument("--train", nargs="+", default=["train", "extra"], help="train splits ('extra': vendored)")
    p.add_argument("--limit", type=int, default=None, help="first N questions of each train split")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--max-set", type=int, default=8, help="largest head set the search builds")
    p.add_argument("--sparsity", type=float, default=0.1, help="weight of the mean head probability")
    p.add_argument("--dim", type=int, default=32, help="head embedding size")
    p.add_argument("--epochs", type=int, default=300, help="full-batch Adam steps")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--reader-artifact", default="shipped")
    p.add_argument("--features", type=Path, default=DEFAULT_DIR)
    p.add_argument("--artifact", type=Path, default=None, help="write the first seed's router here")
    p.add_argument("--static-artifact", type=Path, default=None, help="write the best static head set here")
    p.add_argument("--out", type=Path, default=None, help="results JSON")
    return p.parse_args(argv)


# ---- pseudo labels -------------------------------------------------------------------------------------


def relevant(example: Example, features: Features, labels: str) -> torch.Tensor:
    """Boolean ``[n]``: the candidates a good head set should rank first."""
    if labels == "supporting":
        return torch.tensor(example.supporting, dtype=torch.bool)
    assert features.loglik is not None, "label-free routing needs the reader's log-likelihoods"
    top = features.loglik.topk(2).indices
    return torch.zeros(len(features.loglik), dtype=torch.bool).scatter_(0, top, True)


def set_quality(scores: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """``[C]`` for candidate score rows ``[C, n]``: NDCG of ``gold`` plus a hundredth of the squashed
    margin between the weakest gold and the strongest other candidate."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    discounts = 1 / torch.log2(torch.arange(scores.shape[-1], dtype=torch.float32) + 2)
    dcg = (gold[order].float() * discounts).sum(dim=-1)
    ideal = discounts[: int(gold.sum())].sum()
    margin = scores[:, gold].min(dim=-1).values - scores[:, ~gold].max(dim=-1).values
    return dcg / ideal + 0.01 * torch.tanh(margin / (scores.std(dim=-1) + 1e-9))


def search_heads(calibrated: torch.Tensor, gold: torch.Tensor, max_set: int) -> torch.Tensor:
    """Greedy forward selection: boolean ``[layers, heads]``."""
    flat = calibrated.flatten(0, 1)  # [H, n]
    chosen = torch.zeros(len(flat), dtype=torch.bool)
    current, best = torch.zeros(flat.shape[1]), -float("inf")
    for _ in range(max_set):
        quality = set_quality(current + flat, gold)
        quality[chosen] = -float("inf")
        head = int(quality.argmax())
        if quality[head] <= best + 1e-9:
            break
        chosen[head], best, current = True, float(quality[head]), current + flat[head]
    return chosen.view(calibrated.shape[:2])


# ---- the router ----------------------------------------------------------------------------------------


def fit(
    pooled: torch.Tensor, targets: torch.Tensor, config: RouterConfig, args: argparse.Namespace, seed: int
) -> HeadRouter:
    """A router fitted to head sets ``targets`` ``[N, layers, heads]`` from pooled ``[N, layers, hidden]``."""
    torch.manual_seed(seed)
    router = HeadRouter(config)
    with torch.no_grad():  # start from how often each head is chosen: the static prior
        rate = targets.flatten(1).float().mean(dim=0).clamp(1e-3, 1 - 1e-3)
        router.bias.copy_(torch.log(rate / (1 - rate)))
    optimizer = torch.optim.AdamW(router.parameters(), lr=args.lr, weight_decay=1e-2)
    y = targets.flatten(1).float()
    with torch.enable_grad():
        for _ in range(args.epochs):
            logits = router(pooled)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
            loss = loss + args.sparsity * torch.sigmoid(logits).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return router.eval()


def routed_scores(
    router: HeadRouter, features: list[Features], top_m: int | None = None
) -> list[list[float]]:
    pooled = torch.stack([f.pooled.float() for f in features])
    with torch.no_grad():
        heads = select(router(pooled), router.config.top_m if top_m is None else top_m)
    heads = heads.view(len(features), router.config.layers, router.config.heads)
    return [aggregate(f.calibrated, h).tolist() for f, h in zip(features, heads, strict=True)]


def recall_at_2(scores: list[list[float]], gold: list[torch.Tensor]) -> float:
    hits = []
    for row, g in zip(scores, gold, strict=True):
        top = torch.tensor(row).argsort(descending=True, stable=True)[:2]
        hits.append(float(g[top].sum() / g.sum()))
    return 100 * sum(hits) / len(hits)


def static_ranking(features: list[Features], gold: list[torch.Tensor]) -> torch.Tensor:
    """Heads ``[layers * heads]`` best first by their own mean Recall@2 of the relevant candidates."""
    total = torch.zeros(features[0].asked.shape[:2])
    for f, g in zip(features, gold, strict=True):
        top = f.calibrated.argsort(dim=-1, descending=True)[..., :2]
        total += g[top].float().sum(dim=-1) / g.sum()
    return total.flatten().argsort(descending=True, stable=True)


def static_set(ranking: torch.Tensor, m: int, shape: torch.Size) -> torch.Tensor:
    chosen = torch.zeros(ranking.numel(), dtype=torch.bool)
    chosen[ranking[:m]] = True
    return chosen.view(shape)


# ---- main ----------------------------------------------------------------------------------------------


def load_features(
    args: argparse.Namespace, reader
) -> tuple[list[Example], list[Features], list[Example], list[Features]]:
    """Train questions with their features (computing what is missing), and dev's."""
    cache = DocStateCache(reader, 1 << 30)  # each question's states are used once: memory only
    folder = reader_folder(reader, args.features)
    train: list[Example] = []
    train_f: list[Features] = []
    for split in args.train:
        examples = split_examples(split, args.limit)
        train += examples
        train_f += features_for(examples, cache, folder / f"{split}.pt", loglik=True, desc=split)
    dev = split_examples("dev", None)
    return train, train_f, dev, features_for(dev, cache, folder / "dev.pt", loglik=False, desc="dev")


def choose(
    pooled: torch.Tensor, targets: torch.Tensor, features: list[Features], gold: list[torch.Tensor], args
) -> tuple[int, int, dict]:
    """Query layer and head count by relevance Recall@2 on the last fifth of the train questions, fitted on
    the rest; the static sets' figures on the same split beside them."""
    cut = len(features) * 4 // 5
    layers, heads, hidden = *targets.shape[1:], pooled.shape[-1]
    router_r2 = {}
    for layer in tqdm(QUERY_LAYERS, desc="choose query layer"):
        router = fit(
            pooled[:cut], targets[:cut], RouterConfig(layers, heads, hidden, layer, args.dim), args, 0
        )
        for m in TOP_M:
            router_r2[(layer, m)] = recall_at_2(routed_scores(router, features[cut:], m), gold[cut:])
    ranking = static_ranking(features[:cut], gold[:cut])
    static_r2 = {}
    for m in STATIC_M:
        fixed = HeadRouter.fixed(static_set(ranking, m, targets.shape[1:]), hidden)
        static_r2[m] = recall_at_2(routed_scores(fixed, features[cut:]), gold[cut:])
    (layer, top_m), best = max(router_r2.items(), key=lambda kv: kv[1])
    held_out = {
        "choice": {"query_layer": layer, "top_m": top_m, "support_recall@2": round(best, 1)},
        "router": {f"layer {la}, top_m {m}": round(v, 1) for (la, m), v in router_r2.items()},
        "static": {m: round(v, 1) for m, v in static_r2.items()},
    }
    return layer, top_m, held_out


def mean_of(rows: list[dict]) -> dict:
    return {
        group: {
            metric: {"value": sum(r[group][metric]["value"] for r in rows) / len(rows), "n": cell["n"]}
            for metric, cell in rows[0][group].items()
        }
        for group in rows[0]
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    reader = open_reader(args.reader_artifact)
    train, train_f, dev, dev_f = load_features(args, reader)
    gold = [relevant(ex, f, args.labels) for ex, f in zip(train, train_f, strict=True)]
    keep = [i for i, g in enumerate(gold) if 0 < int(g.sum()) < len(g)]
    train, train_f, gold = [train[i] for i in keep], [train_f[i] for i in keep], [gold[i] for i in keep]
    pairs = list(zip(train_f, gold, strict=True))
    targets = torch.stack(
        [search_heads(f.calibrated, g, args.max_set) for f, g in tqdm(pairs, desc="search")]
    )
    pooled = torch.stack([f.pooled.float() for f in train_f])
    layers, heads, hidden = *targets.shape[1:], pooled.shape[-1]

    rows: dict[str, list[list[float]]] = {
        "all heads (sum)": [f.calibrated.sum(dim=(0, 1)).tolist() for f in dev_f]
    }
    ranking = static_ranking(train_f, gold)  # static sets: heads ranked on every train question
    for m in STATIC_M:
        rows[f"static top {m}"] = routed_scores(
            HeadRouter.fixed(static_set(ranking, m, targets.shape[1:]), hidden), dev_f
        )
    layer, top_m, held_out = choose(pooled, targets, train_f, gold, args)
    print(f"held out: {held_out['choice']}; static {held_out['static']}")

    name = "RouteHead (labels)" if args.labels == "supporting" else "RouteHead (label-free)"
    config = RouterConfig(layers, heads, hidden, layer, dim=args.dim, top_m=top_m)
    routers = [fit(pooled, targets, config, args, seed) for seed in args.seeds]
    for seed, router in zip(args.seeds, routers, strict=True):
        rows[f"{name}, seed {seed}"] = routed_scores(router, dev_f)
    ranking_rows = {key: ranking_metrics(dev, value) for key, value in rows.items()}
    ranking_rows[f"{name}, mean of {len(routers)} seeds"] = mean_of(
        [ranking_rows[f"{name}, seed {s}"] for s in args.seeds]
    )
    sizes = targets.flatten(1).sum(dim=1).float()
    command = "python -m training.train_router " + shlex.join(sys.argv[1:] if argv is None else argv)
    hyper = {k: getattr(args, k) for k in ("max_set", "sparsity", "dim", "epochs", "lr", "seeds")}
    result = {
        "command": command,
        "labels": args.labels,
        "reader_artifact": args.reader_artifact,
        "adapter_sha256": reader.adapter_id,
        "train_questions": len(train),
        "dev_questions": len(dev),
        "pseudo_label_set_size": {"mean": round(float(sizes.mean()), 2), "max": int(sizes.max())},
        "held_out": held_out,
        "hyperparameters": hyper,
        "best_static_heads": [divmod(int(i), heads) for i in ranking[:16]],
        "ranking": ranking_rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    for key, metrics in ranking_rows.items():
        print(f"{key:36s} " + "  ".join(f"{k} {metrics['all'][k]['value']:.1f}" for k in REPORTED))
    sections = {
        "command": command,
        "data": {"train_splits": args.train, "train_questions": len(train), "labels": args.labels},
        "hyperparameters": hyper | {"query_layer": layer, "top_m": top_m},
    }
    if args.artifact:
        metrics = ranking_rows[f"{name}, seed {args.seeds[0]}"]["all"]
        write_router_artifact(args.artifact, routers[0], reader, **sections, dev_metrics=metrics)
    if args.static_artifact:
        best_m = max(held_out["static"], key=held_out["static"].get)
        fixed = HeadRouter.fixed(static_set(ranking, best_m, targets.shape[1:]), hidden)
        metrics = ranking_rows[f"static top {best_m}"]["all"]
        write_router_artifact(args.static_artifact, fixed, reader, **sections, dev_metrics=metrics)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
