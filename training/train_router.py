"""Choose the reader's attention heads to rerank with: static head sets (QRHead-style) and RouteHead's
query-routed heads, trained on the attention features of train questions (training.attention_features).

    python -m training.train_router --labels supporting --seeds 0 1 --artifact models/router
    python -m training.train_router --labels reader            # label-free: the reader's own signal
    python -m training.train_router --fit sets                 # RouteHead's pseudo head sets

What a question's candidates should rank as: its supporting paragraphs (``--labels supporting``) or,
label-free, the reader's answer likelihood given each candidate alone, as a distribution (the signal PDist
distils), so the router can be trained wherever G-Rerank can.

Two ways to fit the router (grerank.head_router), both with a sparsity term (``--sparsity`` times the
mean head probability):

* ``--fit sets`` (RouteHead as its abstract describes it): pseudo labels from a greedy forward search per
  train question over head sets (add the head that most improves the set's NDCG of the relevant candidates,
  ties broken by the margin between the weakest relevant and the strongest other; stop when none does, at
  ``--max-set`` heads), among the ``--pool`` heads best on average, then binary cross-entropy per head.
  Searched over all 270 heads, a question's set is mostly heads that rank its ten candidates well by chance.
* ``--fit listwise`` (the default, measured better): the router's head probabilities weight the heads'
  masses, and the cross-entropy between the relevance distribution and the softmax of the weighted mean
  (at ``--temperature``) is minimised directly: no search, every head's evidence on every question counts.

At inference the router keeps its top ``m`` heads and sums their masses. The query layer and ``m`` are
chosen on a held-out fifth of the train questions by Recall@2 of the relevant candidates (never on dev),
then the router is refitted on every train question. Static sets rank heads by their own mean Recall@2.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from grerank.decoder_reader import DecoderReader
from grerank.doc_state_cache import DocStateCache
from grerank.head_router import HeadRouter, RouterConfig
from grerank.qa_data import Example
from grerank.router_artifact import write_router_artifact
from training.attention_features import (
    DEFAULT_DIR,
    Features,
    features_for,
    open_reader,
    reader_folder,
    routed_scores,
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
    p.add_argument("--fit", choices=("listwise", "sets"), default="listwise", help="how the router is fitted")
    p.add_argument("--max-set", type=int, default=8, help="--fit sets: largest head set the search builds")
    p.add_argument(
        "--pool", type=int, default=16, help="--fit sets: heads searched (best on average); 0: all"
    )
    p.add_argument("--temperature", type=float, default=0.02, help="--fit listwise: of the score softmax")
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


def relevance(example: Example, features: Features, labels: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What a good head set ranks first: a distribution ``[n]`` over the candidates (the supporting ones
    alike, or the reader's answer likelihoods normalised) and its top candidates as booleans (the supporting
    ones, or the reader's two most likely)."""
    if labels == "supporting":
        gold = torch.tensor(example.supporting, dtype=torch.bool)
        return gold.float() / gold.sum().clamp(min=1), gold
    assert features.loglik is not None, "label-free routing needs the reader's log-likelihoods"
    top = features.loglik.topk(2).indices
    return torch.softmax(features.loglik, dim=0), torch.zeros_like(
        features.loglik, dtype=torch.bool
    ).scatter_(0, top, True)


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


def pool_search(
    features: list[Features], gold: list[torch.Tensor], ranking: torch.Tensor, args: argparse.Namespace
) -> torch.Tensor:
    """Pseudo head sets ``[N, layers, heads]``: :func:`search_heads` among the ``args.pool`` best heads."""
    outside = torch.zeros(ranking.numel(), dtype=torch.bool)
    outside[ranking[args.pool :] if args.pool else []] = True
    sets = []
    for f, g in tqdm(list(zip(features, gold, strict=True)), desc="search head sets", unit="q"):
        masses = f.calibrated.clone()
        masses.view(-1, masses.shape[-1])[outside] = 0  # tells the candidates apart in no way: never chosen
        sets.append(search_heads(masses, g, args.max_set))
    return torch.stack(sets)


def fit_listwise(
    pooled: torch.Tensor,
    masses: torch.Tensor,
    targets: torch.Tensor,
    config: RouterConfig,
    args: argparse.Namespace,
    seed: int,
) -> HeadRouter:
    """A router whose probability-weighted mean of head masses ``[N, layers * heads, n]`` ranks as the
    relevance distributions ``targets`` ``[N, n]`` say; pooled states ``[N, layers, hidden]``."""
    torch.manual_seed(seed)
    router = HeadRouter(config)
    router.standardise(pooled)
    optimizer = torch.optim.AdamW(router.parameters(), lr=args.lr, weight_decay=1e-2)
    with torch.enable_grad():
        for _ in range(args.epochs):
            gate = torch.sigmoid(router(pooled))  # [N, H]
            scores = (gate[:, :, None] * masses).sum(dim=1) / (gate.sum(dim=1, keepdim=True) + 1e-6)
            log_p = torch.log_softmax(scores / args.temperature, dim=-1)
            loss = -(targets * log_p).sum(dim=-1).mean() + args.sparsity * gate.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return router.eval()


def fit_sets(
    pooled: torch.Tensor, targets: torch.Tensor, config: RouterConfig, args: argparse.Namespace, seed: int
) -> HeadRouter:
    """A router fitted to head sets ``targets`` ``[N, layers, heads]`` from pooled ``[N, layers, hidden]``."""
    torch.manual_seed(seed)
    router = HeadRouter(config)
    router.standardise(pooled)
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


def train_and_dev(
    args: argparse.Namespace, reader: DecoderReader
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


@dataclass
class TrainSet:
    """The train questions as tensors: pooled states, head masses, relevance (distribution and top)."""

    features: list[Features]
    pooled: torch.Tensor  # [N, layers, hidden]
    masses: torch.Tensor  # [N, layers * heads, n]
    targets: torch.Tensor  # [N, n] relevance distributions
    gold: list[torch.Tensor]  # [n] booleans each
    sets: torch.Tensor | None = None  # [N, layers, heads] pseudo head sets (--fit sets)

    def __len__(self) -> int:
        return len(self.features)

    def fit(self, rows: slice, config: RouterConfig, args: argparse.Namespace, seed: int) -> HeadRouter:
        if args.fit == "sets":
            assert self.sets is not None
            return fit_sets(self.pooled[rows], self.sets[rows], config, args, seed)
        return fit_listwise(self.pooled[rows], self.masses[rows], self.targets[rows], config, args, seed)


def choose(data: TrainSet, args: argparse.Namespace) -> tuple[int, int, dict]:
    """Query layer and head count by relevance Recall@2 on the last fifth of the train questions, fitted on
    the rest; the static sets' figures on the same split beside them."""
    cut = len(data) * 4 // 5
    fitted, held, gold = slice(0, cut), data.features[cut:], data.gold[cut:]
    layers, heads, hidden = *data.features[0].asked.shape[:2], data.pooled.shape[-1]
    router_r2 = {}
    for layer in tqdm(QUERY_LAYERS, desc="choose the query layer"):
        router = data.fit(fitted, RouterConfig(layers, heads, hidden, layer, args.dim), args, 0)
        for m in TOP_M:
            router_r2[(layer, m)] = recall_at_2(routed_scores(router, held, m), gold)
    ranking = static_ranking(data.features[:cut], data.gold[:cut])
    static_r2 = {}
    for m in STATIC_M:
        fixed = HeadRouter.fixed(static_set(ranking, m, torch.Size((layers, heads))), hidden)
        static_r2[m] = recall_at_2(routed_scores(fixed, held), gold)
    (layer, top_m), best = max(router_r2.items(), key=lambda kv: kv[1])
    held_out = {
        "choice": {"query_layer": layer, "top_m": top_m, "recall@2": round(best, 1)},
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
    train, train_f, dev, dev_f = train_and_dev(args, reader)
    relevant = [relevance(ex, f, args.labels) for ex, f in zip(train, train_f, strict=True)]
    keep = [i for i, (_, g) in enumerate(relevant) if 0 < int(g.sum()) < len(g)]
    train_f = [train_f[i] for i in keep]
    data = TrainSet(
        features=train_f,
        pooled=torch.stack([f.pooled.float() for f in train_f]),
        masses=torch.stack([f.calibrated.flatten(0, 1) for f in train_f]),
        targets=torch.stack([relevant[i][0] for i in keep]),
        gold=[relevant[i][1] for i in keep],
    )
    layers, heads, hidden = *train_f[0].asked.shape[:2], data.pooled.shape[-1]
    shape = torch.Size((layers, heads))
    ranking = static_ranking(train_f, data.gold)  # static sets: heads ranked on every train question
    if args.fit == "sets":
        data.sets = pool_search(train_f, data.gold, ranking, args)

    chosen_by = "" if args.labels == "supporting" else ", chosen by the reader's likelihoods"
    rows: dict[str, list[list[float]]] = {
        "all heads (sum)": [f.calibrated.sum(dim=(0, 1)).tolist() for f in dev_f]
    }
    for m in STATIC_M:
        rows[f"static top {m}{chosen_by}"] = routed_scores(
            HeadRouter.fixed(static_set(ranking, m, shape), hidden), dev_f
        )
    layer, top_m, held_out = choose(data, args)
    print(f"held out: {held_out['choice']}; static {held_out['static']}")

    name = f"RouteHead ({'labels' if args.labels == 'supporting' else 'label-free'}, {args.fit})"
    config = RouterConfig(layers, heads, hidden, layer, dim=args.dim, top_m=top_m)
    routers = [data.fit(slice(None), config, args, seed) for seed in args.seeds]
    for seed, router in zip(args.seeds, routers, strict=True):
        rows[f"{name}, seed {seed}"] = routed_scores(router, dev_f)
    ranking_rows = {key: ranking_metrics(dev, value) for key, value in rows.items()}
    ranking_rows[f"{name}, mean of {len(routers)} seeds"] = mean_of(
        [ranking_rows[f"{name}, seed {s}"] for s in args.seeds]
    )
    sizes = (data.sets if data.sets is not None else routers[0].select(data.pooled)).flatten(1).sum(dim=1)
    command = "python -m training.train_router " + shlex.join(sys.argv[1:] if argv is None else argv)
    names = ("fit", "sparsity", "dim", "epochs", "lr", "seeds", "temperature", "max_set", "pool")
    hyper = {k: getattr(args, k) for k in names}
    result = {
        "command": command,
        "labels": args.labels,
        "reader_artifact": args.reader_artifact,
        "adapter_sha256": reader.adapter_id,
        "fit": args.fit,
        "train_questions": len(data),
        "dev_questions": len(dev),
        # --fit sets: the searched sets; listwise: the heads the first router keeps on the train questions
        "head_set_size": {"mean": round(float(sizes.float().mean()), 2), "max": int(sizes.max())},
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
        "data": {"train_splits": args.train, "train_questions": len(data), "labels": args.labels},
        "hyperparameters": hyper | {"query_layer": layer, "top_m": top_m},
    }
    if args.artifact:
        metrics = ranking_rows[f"{name}, seed {args.seeds[0]}"]["all"]
        write_router_artifact(args.artifact, routers[0], reader, **sections, dev_metrics=metrics)
    if args.static_artifact:
        best_m = max(held_out["static"], key=held_out["static"].get)
        fixed = HeadRouter.fixed(static_set(ranking, best_m, shape), hidden)
        metrics = ranking_rows[f"static top {best_m}{chosen_by}"]["all"]
        write_router_artifact(args.static_artifact, fixed, reader, **sections, dev_metrics=metrics)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
