"""Expert-parallel benchmark: each backend that declares ``expert_parallel``, its experts split over N
devices, against the same layer on one device (`qmoe.suite.benchmarks.expert_parallel` measures)::

    pytest -m benchmark suite/benchmarks/test_expert_parallel.py [--backend NAME] [--device cuda]
           [--bench-shape logbook-shared0] [--bench-top-k 2,8] [--bench-scheme none,int8_routed_prequant]
           [--bench-pass forward,forward_backward] [--bench-routing balanced,zipf] [--bench-rounds 10]
           --benchmark-json=ep.json

N: ``QMOE_EP_BENCH_SIZES`` (comma-separated; default 2 on CPU, every declared N up to the GPUs torch sees
on CUDA). Shape: ``--bench-shape`` where it names a layer here (``logbook-shared0``), else
``ep-cpu-tiny`` on CPU and ``logbook-shared0`` on GPUs. Default schemes: ``none`` and
``int8_routed_prequant``. The rounds run where the layer runs (the ranks of a process group, or this
process over N devices) and are timed there (CUDA events on GPUs); pytest-benchmark records those
per-round seconds (the sharded layer, float dispatch) through a replay clock, and ``extra_info`` holds
the rest (stage times, bytes, GB/s, the plain all-to-all, int8 dispatch and its saving, one device).
"""

from __future__ import annotations

import itertools
import os

import pytest

pytestmark = pytest.mark.benchmark

DEFAULT_SCHEMES = ("none", "int8_routed_prequant")


class ReplayClock:
    """A pytest-benchmark timer that replays seconds measured elsewhere: each timed call advances it by the
    next measured round (pedantic mode reads the timer once before and once after each call)."""

    __name__ = "replayed_device_rounds"

    def __init__(self) -> None:
        self.now = 0.0
        self.pending: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self) -> None:
        self.now += self.pending.pop(0)


CLOCK = ReplayClock()


def _sizes(declared: tuple[int, ...], device: str | None) -> list[int]:
    wanted = os.environ.get("QMOE_EP_BENCH_SIZES")
    if wanted:
        return [int(n) for n in wanted.split(",") if n.strip()]
    if device in ("cuda", "gpu"):
        try:
            import torch

            available = torch.cuda.device_count()
        except ImportError:
            available = 0
        return [n for n in declared if n <= available] or [min(declared)]
    return [2]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "ep_bench" not in metafunc.fixturenames:
        return
    from qmoe.suite.benchmarks.expert_parallel import EP_CPU_TINY, EP_SHAPES, EPBench
    from qmoe.suite.benchmarks.harness import default_dtype
    from qmoe.suite.benchmarks.shapes import LOGBOOK_SHARED0
    from qmoe.suite.plugin import selection

    config = metafunc.config
    sel = selection(config)
    cuda = sel.device in ("cuda", "gpu")
    shape = EP_SHAPES.get(config.getoption("--bench-shape"), LOGBOOK_SHARED0 if cuda else EP_CPU_TINY)

    def csv(name: str) -> list[str]:
        value = config.getoption(name, None)
        return [v.strip() for v in value.split(",") if v.strip()] if value else []

    top_ks = [int(k) for k in csv("--bench-top-k")] or [2]
    schemes = csv("--bench-scheme") or list(DEFAULT_SCHEMES)
    passes = csv("--bench-pass") or ["forward"]
    routings = csv("--bench-routing") or ["balanced"]
    dtype = config.getoption("--bench-dtype", None) or default_dtype(sel.device)
    rounds = config.getoption("--bench-rounds", 5)
    params = []
    for entry in sel.backends:
        cls = entry.cls
        if cls is None or not cls.capabilities.expert_parallel:
            continue
        for scheme in schemes:
            if scheme not in cls.capabilities.schemes:
                continue
            for n in _sizes(cls.capabilities.expert_parallel, sel.device):
                for k in top_ks:
                    for pass_, routing in itertools.product(passes, routings):
                        bench = EPBench(shape, k, scheme, n, dtype, pass_, rounds=rounds, routing=routing)
                        marks = [pytest.mark.benchmark(group=f"expert parallel {bench.id}", timer=CLOCK)]
                        if entry.unavailable:
                            marks.append(pytest.mark.skip(reason=f"{entry.name} unavailable: {entry.unavailable}"))
                        params.append(pytest.param((cls, bench), id=f"{entry.name}-{bench.id}", marks=marks))
    metafunc.parametrize("ep_bench", params)


def test_expert_parallel(benchmark, ep_bench, request: pytest.FixtureRequest) -> None:
    from qmoe.suite import process_group
    from qmoe.suite.benchmarks.expert_parallel import measure
    from qmoe.suite.plugin import selection

    cls, bench = ep_bench
    try:
        info = measure(cls, selection(request.config).device, bench)
    except process_group.WorkerError as exc:
        pytest.fail(f"{bench.id}: {exc}", pytrace=False)
    CLOCK.pending = list(info["float"]["seconds_per_round"])
    benchmark.pedantic(CLOCK.advance, rounds=len(CLOCK.pending), warmup_rounds=0, iterations=1)
    benchmark.extra_info.update(info)
