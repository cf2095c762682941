"""Benchmark tooling: `python -m fastbert.bench report RUN.json` turns a pytest-benchmark JSON into
RESULTS.md tables (speedup of fastbert over each baseline) and PNG plots (see report.py, plots.py).
The benchmarks themselves live in benchmarks/ (pytest benchmarks/ --benchmark-only)."""
