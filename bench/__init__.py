"""Benchmarks, run by ``python -m bench`` (``make bench``), which writes ``bench/results/bench.json`` and
``bench/results/bench.md`` with the machine, library versions and the exact command.

A benchmark is a module of this package listed in :data:`bench.__main__.BENCHMARKS`, exposing

* ``run(quick: bool) -> dict``: its results, JSON-serialisable; medians over repeated runs, and ``quick``
  a smaller version (seconds to a few minutes) for development;
* ``markdown(result: dict) -> str``: its section of ``bench.md``.
"""
