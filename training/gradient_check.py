"""Does G-Rerank's relaxed gradient point where the loss it stands for goes down?

The relaxed top-k mask stands for sampling k documents without replacement from ``p = softmax(kappa * w)``
(Gumbel top-k, a Plackett-Luce draw) and reading only them. With n = 10 candidates and k = 2 every subset
can be read, so the expected loss of that sampling has an exact gradient::

    E(w)   = sum_S P_w(S) * NLL(S)
    P_w(S) = sum over the orderings (i_1 .. i_k) of S of  prod_j p_ij / (1 - p_i1 - .. - p_i(j-1))

For each question this compares, as directions in score space (the gradient with respect to the n scores,
before the reranker's own chain rule):

* ``relaxed``: the mean over ``--draws`` Gumbel draws of the G-Rerank loss gradient (what training follows,
  averaged over many steps), and a single draw's (what one step follows);
* the means of 2 and 4 independent draws (``--mask-draws 2`` / ``4``) and of 1 and 2 antithetic pairs
  (``--mask-draws 2`` / ``4 --antithetic``): what a step with those options follows;
* ``pdist``: the PDist gradient ``kappa * (p - q)``, ``q = softmax(log P(a | q, d_i))``;

each by its cosine with the exact gradient of ``E``. A cosine near 1 means that the estimator descends the
reader's loss; near 0 means it follows noise or something else.

    python -m training.gradient_check --questions 40                 # default tau / kappa / k
    python -m training.gradient_check --tau 0.25 0.5 1 --kappa 3 10 30   # a grid, one subset table
    python -m training.gradient_check --standardize 0 1 --kappa 1 3 10  # scores standardised per question

The reader is the trained one (``--reader-artifact shipped``) unless told otherwise; with standardised
scores the exact gradient is that of the standardised distribution's expected loss.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from grerank import model_paths
from grerank.doc_state_cache import DEFAULT_DISK_GB, DocStateCache
from grerank.qa_data import Example
from grerank.reader_artifact import load_configured_reader
from grerank.reranker import build_reranker
from grerank.runtime import resolve_dtype
from training import objectives, report
from training.reader_signals import reader_signals
from training.train import load_split


def exact_gradient(
    scores: torch.Tensor, kappa: float, subsets: torch.Tensor, nll: torch.Tensor, standardize: bool = False
) -> tuple[float, torch.Tensor]:
    """``(E, dE/dw)`` of the expected subset NLL under Gumbel top-k sampling from ``softmax(kappa * w)``
    (:func:`training.objectives.expected_nll`, in float64)."""
    w = scores.detach().double()[None].requires_grad_()
    expected = objectives.expected_nll(w, nll.double()[None], subsets.shape[1], kappa, standardize)
    (grad,) = torch.autograd.grad(expected, w)
    return expected.item(), grad[0].float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def relaxed_gradients(
    reader, example: Example, states: list[torch.Tensor], scores: torch.Tensor, k: int, tau: float,
    kappa: float, rows: int, generator: torch.Generator, per_row: int = 1, antithetic: bool = False,
    standardize: bool = False, chunk: int = 8,
) -> torch.Tensor:  # fmt: skip
    """Gradients ``[rows, n]`` in the scores of training's G-Rerank loss
    (:func:`training.objectives.grerank_nll`, one question), each row averaged over ``per_row`` masks."""
    grads = []
    for start in range(0, rows, chunk):
        size = min(chunk, rows - start)
        w = scores.detach().float().repeat(size, 1).requires_grad_()
        loss = objectives.grerank_nll(
            w, reader, [example.question] * size, [example.answer] * size, [states] * size, k, tau, kappa,
            generator, per_row, antithetic, standardize,
        )  # fmt: skip
        grads.append(size * torch.autograd.grad(loss, w)[0])  # the loss is the mean over the rows
    return torch.cat(grads)


def mean_cosine(grads: torch.Tensor, group: int, exact: torch.Tensor) -> float:
    """Mean cosine with ``exact`` of the means of consecutive groups of ``group`` rows of ``grads``."""
    means = grads[: len(grads) // group * group].view(-1, group, grads.shape[-1]).mean(1)
    return statistics.mean(cosine(g, exact) for g in means)


def pdist_gradient(scores: torch.Tensor, loglik: torch.Tensor, kappa: float) -> torch.Tensor:
    """Gradient ``[n]`` of training's PDist loss (:func:`training.objectives.pdist_loss`) in the scores."""
    w = scores.detach().float()[None].requires_grad_()
    return torch.autograd.grad(objectives.pdist_loss(w, loglik[None], kappa), w)[0][0]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m training.gradient_check",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--split", default="train", help="'train', 'dev' or a HotpotQA/FiD file")
    p.add_argument("--questions", type=int, default=40, help="first N questions of the split")
    p.add_argument(
        "--reranker", default="default", help="'default' (the MiniLM training starts from) or a folder"
    )
    p.add_argument(
        "--reader-artifact",
        default="shipped",
        help="trained reader adapter: 'shipped' (models/reader), a reader artifact folder, or 'none'",
    )
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--tau", type=float, nargs="+", default=[0.5])
    p.add_argument("--kappa", type=float, nargs="+", default=[10.0])
    p.add_argument(
        "--standardize",
        type=int,
        choices=(0, 1),
        nargs="+",
        default=[0],
        help="1: scores standardised per question before kappa (training's --standardize-scores)",
    )
    p.add_argument(
        "--draws", type=int, default=32, help="Gumbel draws per question and setting (a multiple of 4)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state-cache-dir", default="runs/doc-states", help="document states and reader signals")
    p.add_argument(
        "--out", default="results/gradient-check/default.json", help="JSON; the report reads that folder"
    )
    args = p.parse_args(argv)
    if args.draws % 4:
        p.error(f"--draws must be a multiple of 4 (groups of 4 draws, pairs of pairs), not {args.draws}")

    device = torch.device("cpu")
    reader, _ = load_configured_reader(
        args.reader_artifact, "default", "auto", device, resolve_dtype("auto", device)
    )
    reranker = build_reranker("bi-encoder", model_paths.resolve("reranker", args.reranker)).eval()
    state_dir = Path(args.state_cache_dir)
    # One question's states at a time in memory.
    cache = DocStateCache(reader, 1 << 29, state_dir, int(DEFAULT_DISK_GB * (1 << 30)))
    examples = load_split(args.split, args.questions, 10)
    store = state_dir / "reader-signals.jsonl"
    loglik = reader_signals(examples, cache, "loglik", store)
    subset_nll = reader_signals(examples, cache, f"subset_nll_k{args.k}", store)
    generator = torch.Generator().manual_seed(args.seed)
    settings = list(itertools.product(args.tau, args.kappa, args.standardize))
    name = lambda tau, kappa, std: f"tau={tau} kappa={kappa}" + (" standardized" if std else "")  # noqa: E731
    rows: dict[str, list[dict]] = {name(*setting): [] for setting in settings}
    subsets = objectives.k_subsets(10, args.k)
    for example in tqdm(examples, desc="questions", unit="q"):
        states = cache.states(example.passages, example.question)
        nll = subset_nll[example.id]
        with torch.no_grad():
            scores = reranker.predict(example.question, [p.as_text() for p in example.passages])
        for tau, kappa, std in settings:
            expected, exact = exact_gradient(scores, kappa, subsets, nll, bool(std))
            relaxed = (reader, example, states, scores, args.k, tau, kappa)
            singles = relaxed_gradients(*relaxed, args.draws, generator, standardize=bool(std))
            pairs = relaxed_gradients(
                *relaxed, args.draws // 2, generator, per_row=2, antithetic=True, standardize=bool(std)
            )
            pdist = pdist_gradient(scores, loglik[example.id], kappa)
            rows[name(tau, kappa, std)].append(
                {
                    "id": example.id,
                    "expected_nll": expected,
                    "relaxed_mean": cosine(singles.mean(0), exact),
                    "relaxed_single": mean_cosine(singles, 1, exact),
                    "independent_2": mean_cosine(singles, 2, exact),
                    "independent_4": mean_cosine(singles, 4, exact),
                    "antithetic_2": mean_cosine(pairs, 1, exact),
                    "antithetic_4": mean_cosine(pairs, 2, exact),
                    "pdist": cosine(pdist, exact),
                    "snr": (singles.mean(0).norm() / singles.std(0).norm().clamp_min(1e-12)).item(),
                }
            )
    summary = {
        setting: {key: statistics.mean(r[key] for r in values) for key in values[0] if key != "id"}
        for setting, values in rows.items()
    }
    command = shlex.join(
        ["python", "-m", "training.gradient_check", *(sys.argv[1:] if argv is None else argv)]
    )
    result = {"command": command, "args": vars(args), "summary": summary, "questions": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(report.gradient_check_table([result])))
    return result


if __name__ == "__main__":
    main()
