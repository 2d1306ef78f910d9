"""`torchrun --nproc_per_node=2` trains on the CPU (gloo); its loss curve matches one process's in shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.synthetic_qa import synthetic_split

ROOT = Path(__file__).resolve().parent.parent


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "train"]


def thirds(values: list[float]) -> tuple[float, float]:
    third = max(1, len(values) // 3)
    return sum(values[:third]) / third, sum(values[-third:]) / third


def test_two_processes_learn_like_one(copy_reader_dir: Path, tiny_bert_dir: Path, tmp_path: Path) -> None:
    train_file = synthetic_split(tmp_path / "train.jsonl", 48, 4, seed=0)
    dev_file = synthetic_split(tmp_path / "dev.jsonl", 16, 4, seed=99)
    common = [
        "--train", str(train_file), "--dev", str(dev_file), "--candidates", "4", "--k", "1",
        "--reranker", str(tiny_bert_dir), "--reranker-arch", "cross-encoder",
        "--reader", str(copy_reader_dir),
        "--lr", "3e-3", "--epochs", "4", "--precision", "fp32", "--dev-reader-questions", "0",
        "--select-by", "answer_recall@1", "--device", "cpu", "--anchor-weight", "0",
        "--state-cache-dir", str(tmp_path / "states"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "training.train", *common, "--batch-size", "4", "--out", str(tmp_path / "1")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "training.train", *common, "--batch-size", "2", "--out", str(tmp_path / "two"),
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert double.returncode == 0, double.stderr[-2000:]

    one, two = losses(tmp_path / "1"), losses(tmp_path / "two")
    assert len(one) == len(two)  # same global batch: same number of updates
    (one_start, one_end), (two_start, two_end) = thirds(one), thirds(two)
    assert one_end < 0.9 * one_start and two_end < 0.9 * two_start  # both learn
    assert abs(one_start - two_start) < 0.25 * one_start and abs(one_end - two_end) < 0.35 * one_end
    manifest = json.loads((tmp_path / "two" / "artifact" / "manifest.json").read_text())
    assert manifest["training"]["processes"] == 2
