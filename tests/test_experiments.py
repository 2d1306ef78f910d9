"""The experiment grid and its report, end to end on tiny models and the synthetic task."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from tests.synthetic_qa import synthetic_split
from training import experiments


def tiny_grid_args(
    tmp_path: Path, reader: Path, reranker: Path, train_questions: int
) -> tuple[list[str], list[str]]:
    """``training.train`` and ``training.evaluate`` arguments for a grid over the synthetic task and tiny
    models: one epoch, k = 1, 4 candidates."""
    train = synthetic_split(tmp_path / "train.jsonl", train_questions, 4, seed=0)
    dev = synthetic_split(tmp_path / "dev.jsonl", 8, 4, seed=9)
    shared = ["--candidates", "4", "--reader", str(reader), "--precision", "fp32",
              "--state-cache-dir", str(tmp_path / "states")]  # fmt: skip
    train_args = [*shared, "--train", str(train), "--dev", str(dev), "--reranker", str(reranker),
                  "--epochs", "1", "--k", "1", "--dev-reader-questions", "4"]  # fmt: skip
    return train_args, [*shared, "--split", str(dev), "--k", "1", "--max-new-tokens", "2"]


def test_grid_trains_evaluates_and_reports_every_method(
    copy_reader_dir: Path, tiny_bert_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the grid's default folders land here
    train_args, eval_args = tiny_grid_args(tmp_path, copy_reader_dir, tiny_bert_dir, train_questions=16)
    argv = ["--only", "bm25", "zero-shot", "grerank", "pdist", "--seeds", "0", "1",
            "--train-args", shlex.join(train_args), "--eval-args", shlex.join(eval_args)]  # fmt: skip
    experiments.main(argv)

    names = sorted(p.stem for p in (tmp_path / "results" / "dev").glob("*.json"))
    assert names == ["bm25", "grerank-seed0", "grerank-seed1", "pdist-seed0", "pdist-seed1", "zero-shot"]
    pdist = json.loads((tmp_path / "results" / "dev" / "pdist-seed1.json").read_text())
    assert pdist["method"] == "pdist" and pdist["seed"] == 1
    assert "--objective pdist" in pdist["commands"][0] and "--seed 1" in pdist["commands"][0]
    assert pdist["reranker"]["manifest"]["hyperparameters"]["seed"] == 1

    report = (tmp_path / "results" / "README.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| pdist |")]
    assert len(rows) == 3 and rows[0].split(" | ")[1] == "2"  # one row per question group; 2 seeds
    assert "python -m training.evaluate --reranker bm25" in report
    assert re.search(r"- answer R@1: G-Rerank [\d.]+ (beats|does not beat) pdist [\d.]+\.", report)
    assert "- Seeds behind these means: grerank 2, pdist 2" in report
    assert report.index("| bm25 |") < report.index("| grerank |") < report.index("| pdist |")  # grid order
    for plot in ("metrics.png", "training_curves.png"):
        assert (tmp_path / "results" / plot).read_bytes()[:4] == b"\x89PNG"

    stamp = (tmp_path / "results" / "dev" / "bm25.json").stat().st_mtime_ns
    experiments.main(argv)  # everything is done: nothing runs again
    assert (tmp_path / "results" / "dev" / "bm25.json").stat().st_mtime_ns == stamp

    # The sweep: its own folders, one seed, flags on top of the defaults, a table of its own in the report.
    sweep_argv = ["--sweep", "--only", "default", "anchor0",
                  "--train-args", shlex.join(train_args), "--eval-args", shlex.join(eval_args)]  # fmt: skip
    experiments.main(sweep_argv)
    assert sorted(p.stem for p in (tmp_path / "results" / "sweep").glob("*.json")) == [
        "anchor0-seed0",
        "default-seed0",
    ]
    anchor0 = json.loads((tmp_path / "results" / "sweep" / "anchor0-seed0.json").read_text())
    assert anchor0["reranker"]["manifest"]["hyperparameters"]["anchor_weight"] == 0.0
    assert (tmp_path / "runs" / "sweep" / "anchor0-seed0" / "artifact").is_dir()
    report = (tmp_path / "results" / "README.md").read_text()
    sweep = report[report.index("## G-Rerank hyperparameter sweep") : report.index("## Commands")]
    assert sweep.index("| default | 1 |") < sweep.index("| anchor0 | 1 | --anchor-weight 0 |")
    assert re.search(r"the best answer R@1 among them: (default|anchor0|none)\.", sweep)
    assert "python -m training.train --epochs 1 --anchor-weight 0 " in report
    assert "--seed 0 --out runs/sweep/anchor0-seed0 --resume" in report


def test_only_keeps_the_order_given_within_each_seed(tmp_path: Path, capsys) -> None:
    argv = ["--only", "pdist", "grerank", "bm25", "pdist", "--seeds", "0", "1", "--results", str(tmp_path),
            "--dry-run"]  # fmt: skip
    experiments.main(argv)
    headers = [line for line in capsys.readouterr().out.splitlines() if line.startswith("# ")]
    assert headers == ["# bm25", "# pdist-seed0", "# grerank-seed0", "# pdist-seed1", "# grerank-seed1"]


def test_matched_grid_runs_each_objective_at_its_anchor_weights(
    copy_reader_dir: Path, tiny_bert_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    experiments.main(["--matched", "--only", "grerank-anchor0.3", "loop-anchor1", "--dry-run"])
    headers = [line for line in capsys.readouterr().out.splitlines() if line.startswith("# ")]
    # The middle weight is one point of a trade-off curve: the first seed only.
    assert headers == ["# grerank-anchor0.3-seed0", "# loop-anchor1-seed0", "# loop-anchor1-seed1"]

    train_args, eval_args = tiny_grid_args(tmp_path, copy_reader_dir, tiny_bert_dir, train_questions=8)
    argv = ["--matched", "--only", "zero-shot", "grerank-anchor0.3", "pdist-anchor1", "--seeds", "0",
            "--train-args", shlex.join(train_args), "--eval-args", shlex.join(eval_args)]  # fmt: skip
    experiments.main(argv)
    folder = tmp_path / "results" / "matched"
    assert sorted(p.stem for p in folder.glob("*.json")) == [
        "grerank-anchor0.3-seed0", "pdist-anchor1-seed0", "zero-shot",
    ]  # fmt: skip
    pdist = json.loads((folder / "pdist-anchor1-seed0.json").read_text())
    assert pdist["reranker"]["manifest"]["hyperparameters"]["anchor_weight"] == 1.0
    assert "--objective pdist --anchor-weight 1 --train train extra" in pdist["commands"][0]
    report = (tmp_path / "results" / "README.md").read_text()
    table = report[report.index("## Label-free objectives at matched anchor weights") :]
    assert "| grerank-anchor0.3 | 0.3 | 1 |" in table and "| zero-shot | – | – |" in table
    assert "--seed 0 --out runs/matched/pdist-anchor1-seed0 --resume" in table  # the commands behind it

    # Other commands make a result stale: asked again with other evaluation arguments, it is run again.
    stamp = (folder / "zero-shot.json").stat().st_mtime_ns
    experiments.main([*argv[:-1], shlex.join([*eval_args, "--limit", "6"])])
    assert (folder / "zero-shot.json").stat().st_mtime_ns != stamp
    assert "--limit 6" in json.loads((folder / "zero-shot.json").read_text())["commands"][0]


def test_tradeoff_plot_draws_a_curve_per_objective(tmp_path: Path) -> None:
    from training import report

    def result(weight: float | None, answer: float, bridge: float) -> dict:
        ranking = {
            "all": {
                "answer_recall@1": {"value": answer, "n": 9},
                "bridge_recall@5": {"value": bridge, "n": 9},
            }
        }
        manifest = {"hyperparameters": {"anchor_weight": weight}} if weight is not None else None
        return {"name": "x", "ranking": ranking, "reranker": {"manifest": manifest}}

    matched = {
        "zero-shot": [result(None, 27.0, 93.0)],
        "grerank-anchor0": [result(0.0, 29.0, 91.0)],
        "grerank-anchor1": [result(1.0, 27.5, 94.0)],
        "pdist-anchor0": [result(0.0, 32.0, 83.0)],
    }
    assert report.plot_tradeoff(matched, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert not report.plot_tradeoff({"zero-shot": matched["zero-shot"]}, tmp_path / "none.png")
