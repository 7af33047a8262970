"""qmoe throughput benchmarks: shape presets, FLOP and byte counting, honest timing, native peers.

`pytest -m benchmark` runs `test_throughput.py` (backend x scheme x top_k x shape x pass x routing)
through pytest-benchmark; `python -m qmoe.suite.report` turns the saved JSON into `results/` tables.
Importing this package imports no framework: torch, jax and mlx load inside the peers and the timers,
only when a benchmark that needs them runs.
"""
