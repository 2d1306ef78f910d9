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
* ``pdist``: the PDist gradient ``kappa * (p - q)``, ``q = softmax(log P(a | q, d_i))``;

each by its cosine with the exact gradient of ``E``. A cosine near 1 means that the estimator descends the
reader's loss; near 0 means it follows noise or something else.

    python -m training.gradient_check --questions 40                 # default tau / kappa / k
    python -m training.gradient_check --tau 0.25 0.5 1 --kappa 3 10 30   # a grid, one subset table
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
from grerank.readers import load_reader
from grerank.reranker import build_reranker
from grerank.runtime import resolve_dtype
from training import objectives, report
from training.reader_signals import reader_signals
from training.train import load_split


def subset_probabilities(log_p: torch.Tensor, subsets: list[tuple[int, ...]]) -> torch.Tensor:
    """``P(S)`` ``[len(subsets)]`` of drawing exactly the subset S in |S| draws without replacement from
    ``exp(log_p)`` (the Gumbel top-k distribution); differentiable in ``log_p``."""
    p = log_p.exp()
    out = []
    for subset in subsets:
        total = log_p.new_zeros(())
        for order in itertools.permutations(subset):
            taken = log_p.new_zeros(())
            term = log_p.new_ones(())
            for i in order:
                term = term * p[i] / (1 - taken)
                taken = taken + p[i]
            total = total + term
        out.append(total)
    return torch.stack(out)


def exact_gradient(
    scores: torch.Tensor, kappa: float, subsets: list[tuple[int, ...]], nll: torch.Tensor
) -> tuple[float, torch.Tensor]:
    """``(E, dE/dw)`` of the expected subset NLL under Gumbel top-k sampling from ``softmax(kappa * w)``."""
    w = scores.detach().double().requires_grad_()
    expected = (subset_probabilities(torch.log_softmax(kappa * w, -1), subsets) * nll.double()).sum()
    (grad,) = torch.autograd.grad(expected, w)
    return expected.item(), grad.float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def relaxed_gradients(
    reader, example: Example, states: list[torch.Tensor], scores: torch.Tensor, k: int, tau: float,
    kappa: float, draws: int, generator: torch.Generator, chunk: int = 8,
) -> torch.Tensor:  # fmt: skip
    """Per-draw gradients ``[draws, n]`` of training's G-Rerank loss (:func:`training.objectives.grerank_nll`,
    one question) in the scores."""
    grads = []
    for start in range(0, draws, chunk):
        size = min(chunk, draws - start)
        w = scores.detach().float().repeat(size, 1).requires_grad_()
        loss = objectives.grerank_nll(
            w, reader, [example.question] * size, [example.answer] * size, [states] * size, k, tau, kappa,
            generator,
        )  # fmt: skip
        grads.append(size * torch.autograd.grad(loss, w)[0])  # the loss is the mean over the rows
    return torch.cat(grads)


def pdist_gradient(scores: torch.Tensor, loglik: torch.Tensor, kappa: float) -> torch.Tensor:
    """Gradient ``[n]`` of training's PDist loss (:func:`training.objectives.pdist_loss`) in the scores."""
    w = scores.detach().float()[None].requires_grad_()
    return torch.autograd.grad(objectives.pdist_loss(w, loglik[None], kappa), w)[0][0]


@torch.no_grad()
def subset_nll(
    reader, example: Example, states: list[torch.Tensor], subsets: list[tuple[int, ...]], chunk: int = 15
) -> torch.Tensor:
    """The reader's answer NLL ``[len(subsets)]`` reading exactly each subset of the candidates."""
    values = []
    for start in range(0, len(subsets), chunk):
        part = subsets[start : start + chunk]
        mask = torch.zeros(len(part), len(example.passages))
        for row, subset in enumerate(part):
            mask[row, list(subset)] = 1.0
        size = len(part)
        values.append(
            reader.answer_nll([example.question] * size, [example.answer] * size, [states] * size, mask)
        )
    return torch.cat(values).float()


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
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--tau", type=float, nargs="+", default=[0.5])
    p.add_argument("--kappa", type=float, nargs="+", default=[10.0])
    p.add_argument("--draws", type=int, default=32, help="Gumbel draws per question and setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state-cache-dir", default="runs/doc-states", help="document states and reader signals")
    p.add_argument(
        "--out", default="results/gradient-check/default.json", help="JSON; the report reads that folder"
    )
    args = p.parse_args(argv)

    device = torch.device("cpu")
    reader = load_reader(
        model_paths.resolve("reader", "default"), "auto", device, resolve_dtype("auto", device)
    )
    reranker = build_reranker("bi-encoder", model_paths.resolve("reranker", args.reranker)).eval()
    state_dir = Path(args.state_cache_dir)
    # One question's states at a time in memory.
    cache = DocStateCache(reader, 1 << 29, state_dir, int(DEFAULT_DISK_GB * (1 << 30)))
    examples = load_split(args.split, args.questions, 10)
    loglik = reader_signals(examples, cache, "loglik", state_dir / "reader-signals.jsonl")
    generator = torch.Generator().manual_seed(args.seed)
    settings = list(itertools.product(args.tau, args.kappa))
    rows: dict[str, list[dict]] = {f"tau={t} kappa={c}": [] for t, c in settings}
    for example in tqdm(examples, desc="questions", unit="q"):
        states = cache.states(example.passages, example.question)
        subsets = list(itertools.combinations(range(len(example.passages)), args.k))
        nll = subset_nll(reader, example, states, subsets)
        with torch.no_grad():
            scores = reranker.predict(example.question, [p.as_text() for p in example.passages])
        for tau, kappa in settings:
            expected, exact = exact_gradient(scores, kappa, subsets, nll)
            grads = relaxed_gradients(
                reader, example, states, scores, args.k, tau, kappa, args.draws, generator
            )
            pdist = pdist_gradient(scores, loglik[example.id], kappa)
            rows[f"tau={tau} kappa={kappa}"].append(
                {
                    "id": example.id,
                    "expected_nll": expected,
                    "relaxed_mean": cosine(grads.mean(0), exact),
                    "relaxed_single": statistics.mean(cosine(g, exact) for g in grads),
                    "pdist": cosine(pdist, exact),
                    "snr": (grads.mean(0).norm() / grads.std(0).norm().clamp_min(1e-12)).item(),
                }
            )
    summary = {
        name: {
            key: statistics.mean(r[key] for r in values)
            for key in ("expected_nll", "relaxed_mean", "relaxed_single", "pdist", "snr")
        }
        for name, values in rows.items()
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
