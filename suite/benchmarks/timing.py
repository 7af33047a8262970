"""Honest timing: device clocks, cache flushes, device and framework descriptions.

On CUDA the clock is CUDA events, as triton's ``do_bench`` measures: pytest-benchmark reads its
timer (set per test with ``pytest.mark.benchmark(timer=cuda_event_clock)``) before and after each
timed call; `CudaEventClock` records an event on the device at each reading, so a round's duration is
the device's time between the two events. A step whose work is all on torch's stream is timed
stream-ordered (no host wait inside the interval); any other waits for the start event and ends with
its own synchronization, so the second event follows all its work, whatever framework enqueued it.
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

    Each reading records a CUDA event on torch's current stream. A round's two readings bracket its
    call; the harness arms the clock (`arm`) in the round's untimed setup, so the next reading starts a
    round and the one after ends it, adding the device time between the two events (``elapsed_time``,
    exact to the events' ~0.5 us resolution) to a float64 total that it returns. How the start waits:

    * ``synchronize_start=True``: the host waits for the start event before the call, so work that the
      event does not order (JAX's or MLX's streams, a side stream) cannot begin before it; the call then
      ends with its own device synchronization. The interval holds the host's round trip: from the
      start event to the call's first launch, and from its last kernel to the end event.
    * ``synchronize_start=False`` (stream-ordered steps, ``step.stream_body``): nothing waits. The start
      event is queued behind the L2 flush, the call's kernels behind it on the same stream and the end
      event behind them, as in triton's ``do_bench``; the device goes from one to the next with no host
      in between, unless the host is slower to launch than the device to run (then that wait is the
      step's own launch cost, and counted).

    An unarmed reading (pytest-benchmark's calibration) adds the time since the previous event. Totals
    from one origin are not used: ``elapsed_time`` is float32 milliseconds, whose step is 31.25 us past
    262 s (2**18 ms); on the H200 (2026-11-30) every round after the fourth minute was a multiple of it.
    """

    def __init__(self, event: Callable[[], object] | None = None) -> None:
        if event is None:
            import torch

            def event() -> object:
                return torch.cuda.Event(enable_timing=True)

        # a ring of events made once: a reading creates none (at most two are in use: an open start, the last)
        self._ring = [event() for _ in range(4)]
        self._turn = 0
        self._last = self._next()
        self._last.record()
        self._last.synchronize()
        self._open: object | None = None
        self._armed: bool | None = None  # None: not armed; else whether the armed start synchronizes
        self._seconds = 0.0
        self.__name__ = "cuda_events"

    def arm(self, synchronize_start: bool = True) -> None:
        """The next reading starts a timed round (see the class docstring for ``synchronize_start``)."""
        self._armed = synchronize_start

    def _next(self):
        self._turn = (self._turn + 1) % len(self._ring)
        return self._ring[self._turn]

    def __call__(self) -> float:
        event = self._next()
        event.record()
        if self._armed is not None:
            if self._armed:
                event.synchronize()
            self._armed, self._open = None, event
            return self._seconds
        start = self._open if self._open is not None else self._last
        event.synchronize()
        self._seconds += start.elapsed_time(event) / 1e3
        self._open, self._last = None, event
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


def cuda_clock() -> CudaEventClock:
    """The one CUDA-event clock of the process (made on first use): the benchmark marks read it, the
    harness arms it before each round."""
    global _clock
    if _clock is None:
        _clock = CudaEventClock()
    return _clock


def cuda_event_clock() -> float:
    """The CUDA-event timer as a plain function, for ``pytest.mark.benchmark(timer=...)``."""
    return cuda_clock()()


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
