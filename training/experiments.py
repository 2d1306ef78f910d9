"""The comparison behind ``results/``: every method trained and evaluated by the same two CLIs on the shipped
HotpotQA train and dev splits, seed by seed.

    python -m training.experiments                 # run what is missing, then write the report
    python -m training.experiments --dry-run       # list the commands without running them
    python -m training.experiments --only pdist emdr --seeds 0 1
    python -m training.experiments --sweep         # G-Rerank's hyperparameters, one epoch a point
    python -m training.experiments --matched       # every label-free objective at matched anchor weights

Each run is ``python -m training.train ... --out runs/experiments/NAME`` (trained methods) followed by
``python -m training.evaluate ... --out results/dev/NAME.json``, as subprocesses, so the commands recorded in
the results are exactly what ran. A run whose results file exists is skipped, and training resumes from its
checkpoint: the grid can be stopped and continued, and extended with more seeds (a results file from other
commands is stale and is run again). Document states, reader
signals and generated answers are shared on disk (``runs/doc-states``), so only the first run pays for the
reader's work on a passage.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from training import report


@dataclass(frozen=True)
class Method:
    name: str
    train_args: tuple[str, ...] | None  # None: evaluated as is (no training, no seeds)
    reranker: str = ""  # what training.evaluate loads when not trained
    note: str = ""
    seeds: int | None = None  # the first this many of the seeds asked for; None: all of them


BASELINE_FLAGS = ("--anchor-weight", "0")  # the published objectives, without G-Rerank's anchor

METHODS = [
    Method("bm25", None, "bm25", "lexical baseline"),
    Method("zero-shot", None, "zero-shot", "the untrained MiniLM bi-encoder the others start from"),
    Method("grerank", (), note="G-Rerank, the training CLI's defaults"),
    Method("grerank-mix", ("--mix-start", "0.5"), note="G-Rerank, weights mixed half-way back to the start"),
    Method("grerank-draws4", ("--mask-draws", "4"), note="G-Rerank, 4 Gumbel masks per question and step"),
    Method("pdist", ("--objective", "pdist", *BASELINE_FLAGS), note="perplexity distillation"),
    Method("emdr", ("--objective", "emdr", *BASELINE_FLAGS), note="EMDR: documents as latent variables"),
    Method("loop", ("--objective", "loop", *BASELINE_FLAGS), note="leave-one-out perplexity distillation"),
    Method("adist", ("--objective", "adist", *BASELINE_FLAGS), note="attention distillation"),
    Method("supervised", ("--objective", "supervised", *BASELINE_FLAGS), note="uses supporting labels"),
]


def sweep_point(name: str, *flags: str) -> Method:
    # One epoch: a point costs half a full run, and the dev curves show most of the movement in epoch 1.
    return Method(name, ("--epochs", "1", *flags), note=" ".join(flags) or "the training CLI's defaults")


# G-Rerank's own knobs on dev (results in RESULTS/sweep): one flag changed from the defaults, then pairs.
SWEEP = [
    sweep_point("default"),
    sweep_point("anchor0", "--anchor-weight", "0"),
    sweep_point("anchor0.1", "--anchor-weight", "0.1"),
    sweep_point("anchor0.3", "--anchor-weight", "0.3"),
    sweep_point("tau0.25", "--tau", "0.25"),
    sweep_point("tau1", "--tau", "1.0"),
    sweep_point("kappa3", "--kappa", "3"),
    sweep_point("kappa30", "--kappa", "30"),
    sweep_point("k1", "--k", "1"),
    sweep_point("k3", "--k", "3"),
    sweep_point("lr1e-5", "--lr", "1e-5"),
    sweep_point("lr5e-5", "--lr", "5e-5"),
    sweep_point("draws4", "--mask-draws", "4"),
    # Both variance cuts at once (training.gradient_check: each brings a step closer to the exact gradient).
    sweep_point("tau1-draws4", "--tau", "1.0", "--mask-draws", "4"),
]


# Every label-free objective at the same anchor weights (KL to the starting reranker's scores): none, a middle
# weight (one seed: a point on each method's trade-off curve) and G-Rerank's default, through the trained
# reader on the shipped train split and the extra official-train questions (RESULTS/matched).
LABEL_FREE = ("grerank", "pdist", "emdr", "loop", "adist")
ANCHORS = {"0": None, "0.3": 1, "1": None}
MATCHED = [
    Method(
        f"{objective}-anchor{weight}",
        ("--objective", objective, "--anchor-weight", weight, "--train", "train", "extra"),
        note=f"{objective}, anchor weight {weight}",
        seeds=seeds,
    )
    for objective in LABEL_FREE
    for weight, seeds in ANCHORS.items()
]
MATCHED += [
    Method(
        "expected-anchor1",
        ("--objective", "expected", "--train", "train", "extra"),
        note="the exact expected loss G-Rerank's relaxation estimates (ablation), anchor weight 1",
    ),
    Method(
        "expected-anchor0",
        ("--objective", "expected", "--anchor-weight", "0", "--train", "train", "extra"),
        note="the exact expected loss (ablation), anchor weight 0: the objective without estimator noise",
        seeds=1,
    ),
    # A softer mask: through the trained reader one draw's gradient has cosine 0.75 with the exact one at
    # tau 2 against 0.47 at the default 0.5 (training.gradient_check), the variance cut of 4 masks for free.
    *(
        Method(
            f"grerank-tau2-anchor{weight}",
            ("--objective", "grerank", "--tau", "2", "--anchor-weight", weight, "--train", "train", "extra"),
            note=f"grerank at tau 2, anchor weight {weight}",
            seeds=1,
        )
        for weight in ("0", "1")
    ),
    # A loss that sees rank 1: a top-2 loss cannot tell which of the two ranks first (answer R@1).
    Method(
        "grerank-k1-anchor0",
        ("--objective", "grerank", "--k", "1", "--anchor-weight", "0", "--train", "train", "extra"),
        note="grerank with the reader reading the top 1, anchor weight 0",
        seeds=1,
    ),
    # Its exact counterpart: can a loss on the top 1 lift answer R@1 once the estimator's noise is gone?
    Method(
        "expected-k1-anchor0",
        ("--objective", "expected", "--k", "1", "--anchor-weight", "0", "--train", "train", "extra"),
        note="the exact expected loss reading the top 1 (ablation), anchor weight 0",
        seeds=1,
    ),
    # A loss on the top 1 and the top 2 together (`--nested`): rank 1 and the set the reader reads both count.
    *(
        Method(
            f"{objective}-nested-anchor0",
            ("--objective", objective, "--nested", "--anchor-weight", "0", "--train", "train", "extra"),
            note=f"{objective} averaged over the reader reading the top 1 and the top 2, anchor weight 0",
            seeds=1,
        )
        for objective in ("expected", "grerank")
    ),
    # At the same lr and epoch the reader-loss objectives move the ranking about half as far as distillation
    # (dev top-2 sets changed from zero-shot's: exact loss 36%, G-Rerank 33%, PDist 68%): 5x the lr.
    *(
        Method(
            f"{objective}{'-nested' if nested else ''}-lr1e-4-anchor0",
            ("--objective", objective, *(("--nested",) if nested else ()), "--lr", "1e-4")
            + ("--anchor-weight", "0", "--train", "train", "extra"),
            note=f"{objective}{' nested' if nested else ''} at lr 1e-4 (5x), anchor weight 0",
            seeds=1,
        )
        for objective, nested in (("expected", True), ("grerank", True), ("pdist", False))
    ),
    # The expected loss's gradient in a score is weighted by the document's own probability (on-policy),
    # so it barely reaches an answer-bearing paragraph ranked low; a flatter softmax(kappa w) reaches further.
    Method(
        "expected-nested-lr1e-4-kappa3-anchor0",
        ("--objective", "expected", "--nested", "--lr", "1e-4", "--kappa", "3")
        + ("--anchor-weight", "0", "--train", "train", "extra"),
        note="expected nested at lr 1e-4 and kappa 3, anchor weight 0",
        seeds=1,
    ),
]
UNTRAINED = [m for m in METHODS if m.train_args is None]


@dataclass
class Run:
    method: Method
    seed: int | None
    commands: list[list[str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.method.name if self.seed is None else f"{self.method.name}-seed{self.seed}"


def plan(
    methods: list[Method],
    seeds: list[int],
    runs: Path,
    results: Path,
    train_args: list[str],
    eval_args: list[str],
) -> list[Run]:
    """Seed-major order: every method's first seed comes before any method's second."""
    planned = [Run(m, None) for m in methods if m.train_args is None]
    for i, seed in enumerate(seeds):
        planned += [Run(m, seed) for m in methods if m.train_args is not None and i < (m.seeds or len(seeds))]
    for run in planned:
        out = results / f"{run.name}.json"
        reranker = run.method.reranker
        if run.method.train_args is not None:
            folder = runs / run.name
            run.commands.append(
                ["python", "-m", "training.train", *run.method.train_args, *train_args,
                 "--seed", str(run.seed), "--out", str(folder), "--resume"]
            )  # fmt: skip
            reranker = str(folder / "artifact")
        run.commands.append(
            ["python", "-m", "training.evaluate", "--reranker", reranker, "--name", run.name,
             "--out", str(out), *eval_args]
        )  # fmt: skip
    return planned


def finished(run: Run, results: Path) -> bool:
    """Whether ``run`` has a results file from exactly its planned commands (one from other commands, e.g.
    an earlier grid definition or other ``--train-args``, is stale: run again and replaced)."""
    out = results / f"{run.name}.json"
    if not out.is_file():
        return False
    return json.loads(out.read_text()).get("commands") == [shlex.join(c) for c in run.commands]


def execute(run: Run, results: Path) -> None:
    started = time.perf_counter()
    for command in run.commands:
        print("$", shlex.join(command), flush=True)
        subprocess.run([sys.executable, *command[1:]], check=True)
    out = results / f"{run.name}.json"
    result = json.loads(out.read_text())
    result.update(
        method=run.method.name,
        seed=run.seed,
        note=run.method.note,
        commands=[shlex.join(c) for c in run.commands],
        wall_seconds=round(time.perf_counter() - started, 1),
    )
    out.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m training.experiments",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="method (or sweep point) names; untrained first, then seed by seed, each in the order given",
    )
    grids = p.add_mutually_exclusive_group()
    grids.add_argument(
        "--sweep", action="store_true", help="run the G-Rerank hyperparameter sweep, not the methods"
    )
    grids.add_argument(
        "--matched",
        action="store_true",
        help="run every label-free objective at anchor weights 0, 0.3 (one seed) and 1 on train + extra "
        "(results in RESULTS/matched)",
    )
    p.add_argument("--seeds", type=int, nargs="*", default=None, help="default: 0 1; the sweep's: 0")
    p.add_argument(
        "--runs", default=None, help="training run folders (default: runs/experiments, runs/sweep)"
    )
    p.add_argument("--results", default="results", help="results folder (dev results go in dev/, sweep/)")
    p.add_argument("--train-args", default="", help="extra training.train arguments, one string")
    p.add_argument("--eval-args", default="", help="extra training.evaluate arguments, one string")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    grid, kind = (SWEEP, "sweep") if args.sweep else (METHODS, "experiments")
    if args.matched:
        grid, kind = UNTRAINED + MATCHED, "matched"
    known = {m.name: m for m in grid}
    unknown = set(args.only or []) - set(known)
    if unknown:
        p.error(f"unknown names {sorted(unknown)}; known: {sorted(known)}")
    methods = grid if args.only is None else [known[n] for n in dict.fromkeys(args.only)]
    seeds = args.seeds if args.seeds is not None else [0] if args.sweep else [0, 1]
    runs = args.runs or f"runs/{kind}"
    results = Path(args.results)
    folder = results / {"sweep": "sweep", "matched": "matched"}.get(kind, "dev")
    planned = plan(
        methods, seeds, Path(runs), folder, shlex.split(args.train_args), shlex.split(args.eval_args)
    )
    for run in planned:
        done = finished(run, folder)
        if args.dry_run:
            print(f"# {run.name}{' (done)' if done else ''}")
            print("\n".join(shlex.join(c) for c in run.commands))
        elif not done:
            execute(run, folder)
    if not args.dry_run:
        report.main(
            ["--results", str(results), "--runs", "runs/experiments" if kind != "experiments" else runs]
        )


if __name__ == "__main__":
    main()
