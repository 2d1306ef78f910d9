"""Benchmarks, run by ``python -m bench`` (``make bench``), which writes ``bench.json`` and ``bench.md`` with
the machine, library versions and the exact command to ``bench/results/<cpu model>/``: each CPU model this
project has been measured on keeps its own results.

A benchmark is a module of this package listed in :data:`bench.__main__.BENCHMARKS`, exposing

* ``run(quick: bool) -> dict``: its results, JSON-serialisable; medians over repeated runs, and ``quick``
  a smaller version (seconds to a few minutes) for development;
* ``markdown(result: dict) -> str``: its section of ``bench.md``.
"""
