"""Honest timing: device clocks, cache flushes, device and framework descriptions.

On CUDA the clock is CUDA events, as triton's ``do_bench`` measures: pytest-benchmark reads its
timer (set per test with ``pytest.mark.benchmark(timer=cuda_event_clock)``) before and after each
timed call; `CudaEventClock` records an event on the device at each reading and returns the device
time since its origin, so a round's duration is the device's time between the two events (the timed
call itself synchronizes, so the second event follows all its work, whatever framework enqueued it).
Between rounds `L2Flush` zeroes a buffer larger than the L2 cache (do_bench's 256 MB), outside the
timed interval, so no round finds the previous round's weights in L2.

On CPU the clock is `time.perf_counter` and there is nothing to flush.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from collections.abc import Callable

#: do_bench's flush size: larger than any current GPU's L2 (H100: 50 MB).
L2_FLUSH_BYTES = 256 * 1024 * 1024


def is_cuda(device: str | None) -> bool:
    return device in ("cuda", "gpu")


class CudaEventClock:
    """A pytest-benchmark timer reading the CUDA device timeline, in seconds.

    Each reading adds the device time since the previous reading's event (``elapsed_time`` between two
    consecutive events, exact to the events' ~0.5 us resolution) to a float64 total. Measuring from one
    origin instead, as the first version did, loses precision as the session ages: ``elapsed_time`` is
    float32 milliseconds, whose step is 31.25 us past 262 s (2**18 ms). On the H200 (2026-11-30) every
    round after the fourth minute was a multiple of 31.25 us, and the do-nothing backend's "overhead" of
    31.25 us (1.1% of the fastest case) was that step, not the harness.
    """

    def __init__(self) -> None:
        import torch

        self._torch = torch
        self._last = torch.cuda.Event(enable_timing=True)
        self._last.record()
        self._last.synchronize()
        self._seconds = 0.0
        self.__name__ = "cuda_events"

    def __call__(self) -> float:
        event = self._torch.cuda.Event(enable_timing=True)
        event.record()
        event.synchronize()
        self._seconds += self._last.elapsed_time(event) / 1e3
        self._last = event
        return self._seconds


class L2Flush:
    """Zero a buffer larger than L2 (a no-op where there is no CUDA device)."""

    def __init__(self, device: str | None) -> None:
        self.buffer = None
        if is_cuda(device) and _torch_cuda_available():
            import torch

            self.buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")

    @property
    def bytes(self) -> int:
        return L2_FLUSH_BYTES if self.buffer is not None else 0

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.zero_()


_clock: CudaEventClock | None = None


def cuda_event_clock() -> float:
    """The CUDA-event timer as a plain function (made on first use), for ``pytest.mark.benchmark(timer=...)``."""
    global _clock
    if _clock is None:
        _clock = CudaEventClock()
    return _clock()


def clock_for(device: str | None) -> tuple[Callable[[], float], str]:
    """(timer, its name): CUDA events on a CUDA device with torch, else perf_counter."""
    if is_cuda(device) and _torch_cuda_available():
        return cuda_event_clock, "cuda_events"
    return time.perf_counter, "perf_counter"


def _torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU model as pytest-benchmark's ``machine_info["cpu"]`` names it (py-cpuinfo's ``brand_raw``),
    else the platform's, with the cores this process may use."""
    from pytest_benchmark.plugin import get_cpu_info

    try:
        name = get_cpu_info().get("brand_raw")
    except Exception:  # py-cpuinfo reads the OS's own descriptions; a failure there leaves the platform's name
        name = None
    name = name or platform.processor() or platform.machine()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name} ({cores} cores)"


def device_name(device: str | None) -> str:
    """What runs the benchmark: the GPU's name for cuda/gpu, else the CPU's."""
    if is_cuda(device):
        if _torch_cuda_available():
            import torch

            return torch.cuda.get_device_name(0)
        try:
            import jax

            return jax.devices("gpu")[0].device_kind
        except Exception:
            return "unknown GPU"
    return cpu_name()
