"""Throughput: backend x scheme x top_k x shape x pass x routing, through pytest-benchmark.

    pytest -m benchmark [--bench-shape cpu-small|logbook|models|...] [--backend NAME] [--device cuda]
           [--benchmark-autosave | --benchmark-compare [--benchmark-compare-fail=mean:10%]] [--bench-cuda-graph]
    pytest --benchmark-json=out.json [-k CASE]      # pytest-benchmark's flags alone select these tests

Each test times `Backend.benchmark_step` in pedantic rounds (`harness.time_rounds`), checks the timed
outputs against the reference, and records FLOPs, TF/s, tokens/s, GB/s, device and versions in
``extra_info`` (with the peak device memory of one call). `test_harness_overhead` times the do-nothing
backend through the same rounds.
Needs the benchmark plugin (`qmoe.suite.benchmarks.plugin`); deselected unless benchmarks are asked for.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.benchmark


def _plugin_loaded(config: pytest.Config) -> bool:
    """Whether the benchmark plugin is registered, under whatever name (the suite's plugin registers it as
    ``qmoe.benchmarks``; ``-p qmoe.suite.benchmarks.plugin`` under its module name)."""
    from qmoe.suite.benchmarks import plugin

    return config.pluginmanager.is_registered(plugin)


_NO_PLUGIN = ("the benchmark plugin is not loaded: add 'qmoe.suite.benchmarks.plugin' to pytest_plugins in the root "
              "conftest.py, or run with -p qmoe.suite.benchmarks.plugin")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if not _plugin_loaded(metafunc.config):
        for name in ("bench_case", "overhead_shape"):
            if name in metafunc.fixturenames:
                skip = pytest.mark.skip(reason=_NO_PLUGIN)
                metafunc.parametrize(name, [pytest.param(None, id="no-plugin", marks=skip)])
        return
    from qmoe.suite.benchmarks.plugin import bench_grid, bench_options
    from qmoe.suite.benchmarks.shapes import preset
    from qmoe.suite.benchmarks.timing import clock_for

    if "bench_case" in metafunc.fixturenames:
        metafunc.parametrize("bench_case", bench_grid(metafunc.config))
    elif "overhead_shape" in metafunc.fixturenames:
        timer, name = clock_for(bench_options(metafunc.config).device)
        mark = pytest.mark.benchmark(group="harness overhead", **({"timer": timer} if name != "perf_counter" else {}))
        from qmoe.suite.benchmarks.peers import NoopBackend, NoopStreamBackend

        shape = preset(metafunc.config.getoption("--bench-shape"))[0]
        # on CUDA both timing modes (`harness.time_rounds`); elsewhere there is one
        noops = (NoopBackend, NoopStreamBackend) if name == "cuda_events" else (NoopBackend,)
        metafunc.parametrize("overhead_shape", [
            pytest.param((shape, noop), id=f"{noop.name}-{shape.name}", marks=[mark]) for noop in noops])


def test_throughput(benchmark, bench_case, request: pytest.FixtureRequest) -> None:
    from qmoe.suite.benchmarks.harness import run_case
    from qmoe.suite.benchmarks.plugin import bench_options

    case, cls, load_error = bench_case
    if load_error:
        pytest.fail(f"backend {case.backend} cannot be loaded: {load_error}", pytrace=False)
    run_case(benchmark, case, cls, bench_options(request.config))


def test_harness_overhead(benchmark, overhead_shape, request: pytest.FixtureRequest) -> None:
    """The do-nothing backend through the same rounds: the harness's own cost per timed call."""
    from qmoe.suite.benchmarks.harness import run_overhead
    from qmoe.suite.benchmarks.plugin import bench_options

    shape, noop = overhead_shape
    run_overhead(benchmark, bench_options(request.config), shape, noop)
