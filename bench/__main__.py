"""Run the benchmarks and write ``bench.json`` and ``bench.md``.

    python -m bench                       # all of them (``make bench``): minutes to tens of minutes
    python -m bench --quick               # smaller versions, for development
    python -m bench --only rerank_throughput --only faiss_retrieval

``--only`` re-runs some benchmarks and keeps the others' results from an earlier ``bench.json`` in the same
folder; every section records the command and the time it was measured with.

Each benchmark is a module of this package (see ``bench/__init__.py``); one that is not there yet is skipped
with a message, one that fails is reported with its error, and the others still run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench import environment

BENCHMARKS = ("rerank_throughput", "faiss_retrieval", "answer_latency", "overload", "train_throughput")


def run_one(name: str, quick: bool, command: str) -> dict[str, Any]:
    """``{"result": ...}``, ``{"skipped": why}`` or ``{"error": traceback}``, with the seconds it took, the
    command and the start time."""
    stamp = {"command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    stamp["load_average_1m"] = environment.machine().get("load_average_1m")
    started = time.perf_counter()
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"bench.{name}":
            raise
        return {"skipped": f"bench/{name}.py does not exist yet", **stamp}
    try:
        outcome: dict[str, Any] = {"result": module.run(quick)}
    except Exception:
        outcome = {"error": traceback.format_exc()}
    outcome["seconds"] = round(time.perf_counter() - started, 1)
    return outcome | stamp


def render(report: dict[str, Any]) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Command: `{report['command']}`{' (quick mode: indicative only)' if report['quick'] else ''}  ",
        f"Started: {report['started']}",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in report["machine"].items()),
        "",
        "| library | version |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in report["versions"].items()),
        "",
    ]
    for name, outcome in report["benchmarks"].items():
        lines += [f"## {name}", ""]
        if "command" in outcome:
            lines += [f"Measured by `{outcome['command']}`, started {outcome['started']}.", ""]
        if "skipped" in outcome:
            lines += [f"Skipped: {outcome['skipped']}.", ""]
        elif "error" in outcome:
            lines += ["Failed:", "", "```", outcome["error"].rstrip(), "```", ""]
        else:
            module = importlib.import_module(f"bench.{name}")
            lines += [module.markdown(outcome["result"]).rstrip(), "", f"({outcome['seconds']} s)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller runs: indicative numbers, fast")
    parser.add_argument(
        "--only", action="append", choices=BENCHMARKS, metavar="NAME", help=f"one of {', '.join(BENCHMARKS)}"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder of the results (default: bench/results/<this CPU model>, so each machine keeps its own)",
    )
    args = parser.parse_args(argv)
    args.out = args.out or Path("bench/results") / environment.machine_slug()
    command = environment.command() if argv is None else shlex.join(["python", "-m", "bench", *argv])
    report: dict[str, Any] = {
        "command": command,
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": environment.machine(),
        "versions": environment.versions(),
        "benchmarks": {},
    }
    earlier = args.out / "bench.json"
    if args.only and earlier.is_file():  # keep what the other benchmarks measured before
        kept = json.loads(earlier.read_text())["benchmarks"]
        report["benchmarks"] = {n: kept[n] for n in BENCHMARKS if n in kept and n not in args.only}
    for name in args.only or BENCHMARKS:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        outcome = report["benchmarks"][name] = run_one(name, args.quick, command)
        report["benchmarks"] = {n: report["benchmarks"][n] for n in BENCHMARKS if n in report["benchmarks"]}
        status = next(k for k in ("skipped", "error", "result") if k in outcome)
        print(f"[bench] {name}: {status} ({outcome.get('seconds', 0)} s)", file=sys.stderr, flush=True)
        if status == "skipped":
            print(f"[bench] {name}: {outcome['skipped']}", file=sys.stderr)
        # Written after every benchmark: a long run stopped part-way keeps what it measured.
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "bench.md").write_text(render(report) + "\n")
    print(f"[bench] wrote {args.out / 'bench.json'} and {args.out / 'bench.md'}", file=sys.stderr)
    return 1 if any("error" in o for o in report["benchmarks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
