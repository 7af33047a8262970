"""Honest timing: device clocks, cache flushes, device and framework descriptions.

On CUDA the clock is CUDA events, as triton's ``do_bench`` measures: pytest-benchmark reads its
timer (set per test with ``pytest.mark.benchmark(timer=cuda_event_clock)``) before and after each
timed call; `CudaEventClock` records an event on the device at each reading, so a round's duration is
the device's time between the two events. A step whose work is all on torch's stream is timed
stream-ordered (no host wait inside the interval); any other waits for the start event and ends with
its own synchronization, so the second event follows all its work, whatever framework enqueued it.
That host round trip (~35 us on the H200) is spread over several calls where the step can enqueue them
without waiting (``step.async_body``): a round then runs `calls_per_round` calls back to back, waits once,
and the clock reports the interval divided by their number, so every statistic stays per call.
Between rounds `L2Flush` zeroes a buffer larger than the L2 cache (do_bench's 256 MB), outside the
timed interval, so no round finds the previous round's weights in L2.

On CPU the clock is `time.perf_counter` and there is nothing to flush.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import time
from collections.abc import Callable

#: do_bench's flush size: larger than any current GPU's L2 (H100: 50 MB).
L2_FLUSH_BYTES = 256 * 1024 * 1024

#: How long a synchronized round should last: its host round trip measured ~35 us on the H200 (the
#: do-nothing row, 34.6 us), so a round of >= 20 ms holds it to <= ~0.2% of the round's calls.
TARGET_ROUND_S = 20e-3
#: At most this many calls per round: it bounds how many calls a round enqueues before it waits (each holds
#: its output until it ran), and at 100 the round trip is ~0.35 us a call, under 0.2% of any call of 175 us
#: or more; calls that short are the do-nothing step's (which gets the cap), not a layer's on a GPU preset
#: (the H200's fastest synchronized case took 2.8 ms).
MAX_CALLS_PER_ROUND = 100


def calls_per_round(call_s: float, target_s: float = TARGET_ROUND_S) -> int:
    """Calls per synchronized round so that it lasts ``target_s`` (`TARGET_ROUND_S`, ``--bench-round-s``):
    ceil(target / call), from 1 to `MAX_CALLS_PER_ROUND`. ``call_s`` is one synchronized call, its round trip
    included, so the estimate errs towards fewer calls (a shorter round), never towards hiding the round trip."""
    if call_s <= 0.0:
        return MAX_CALLS_PER_ROUND
    return max(1, min(MAX_CALLS_PER_ROUND, math.ceil(target_s / call_s)))


def overhead_share(noop_s: float, noop_calls: int, row_s: float, row_calls: int) -> float:
    """The harness's share of one call of a row: a round costs the harness what the do-nothing row's round
    took (its per-call seconds times its calls per round), and a row pays that once per round, i.e. once
    per ``row_calls`` of its calls of ``row_s`` each. With one call per round on both sides this is the
    plain ratio of the two medians. An upper bound: the do-nothing row's empty calls count as harness."""
    return noop_s * noop_calls / (row_calls * row_s)


def is_cuda(device: str | None) -> bool:
    return device in ("cuda", "gpu")


class CudaEventClock:
    """A pytest-benchmark timer reading the CUDA device timeline, in seconds.

    Each reading records a CUDA event on torch's current stream. A round's two readings bracket its
    call; the harness arms the clock (`arm`) in the round's untimed setup, so the next reading starts a
    round and the one after ends it, adding the device time between the two events (``elapsed_time``,
    exact to the events' ~0.5 us resolution) divided by the round's calls (``arm(calls=n)``: a
    synchronized round that ran the step n times back to back, see `calls_per_round`) to a float64 total
    that it returns; ``last_call_s`` is that per-call time of the last round. How the start waits:

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
        self._calls = 1  # calls in the armed (then open) round: its interval is divided by them
        self._seconds = 0.0
        self.last_call_s: float | None = None
        self.__name__ = "cuda_events"

    def arm(self, synchronize_start: bool = True, calls: int = 1) -> None:
        """The next reading starts a timed round of ``calls`` calls (see the class docstring)."""
        self._armed, self._calls = synchronize_start, calls

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
        start, calls = (self._open, self._calls) if self._open is not None else (self._last, 1)
        event.synchronize()
        per_call = start.elapsed_time(event) / 1e3 / calls
        self._seconds += per_call
        if self._open is not None:
            self.last_call_s = per_call
        self._open, self._last, self._calls = None, event, 1
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
