"""One benchmark case end to end: inputs, prepare, warm-up, timed rounds, output check, extra_info.

The grid (`BenchCase`) is backend x scheme x top_k x shape x pass x routing; backends come from the
suite's selection (the registry, ``--backend``, ``--backend-module``) and never by name here, and the
native peers of every framework a selected backend runs on are added beside them (compiled and eager),
with the GEMM bounds (`peers.GemmBound`, `int8_bound.GemmBoundInt8`: the layer's grouped GEMMs alone, on
perfectly balanced pre-sorted rows).

Before a case is built its host and device memory are estimated (`memory.estimate`); a case that would
not fit is skipped with the estimate as the reason. After the timed rounds one untimed call measures
the peak device memory (`memory.measure_peak`). With ``--bench-cuda-graph`` (and always for the int8
bound on CUDA) the steps are captured in CUDA graphs first (`graphs.capture`); what could not be captured
runs as it is, and extra_info says which and why.

Timed rounds (`time_rounds`): pytest-benchmark's pedantic mode, one call per round (or n, below). Each round's
(untimed) setup flushes L2 and hands the target the next of ``--bench-inputs`` distinct inputs, so no
two consecutive rounds see the same x and a backend cannot serve a cached result; the target stores
the call's return value, which is checked against the reference after the rounds. First, untimed calls
for ``--bench-warmup-s`` (`warm_up`: compilation, autotuning, capacity sizing, clocks), then warm-up rounds
(at least one per distinct input) through the same path as the timed ones. A case gets ``--bench-rounds``
timed rounds, or more where its calls are short, until they add up to ``--bench-min-time-s`` (`rounds_for`).
On CUDA a step whose work all goes to torch's current stream (``step.stream_body``) is timed
stream-ordered, between CUDA events with no host wait inside; any other step waits for the start event
and synchronizes at its end (`timing.CudaEventClock`). extra_info ``timing`` says which; each mode has
its own do-nothing row (`run_overhead`), so the harness's cost is measured for both.

A synchronized round holds a host round trip (~35 us on the H200). A step that can enqueue calls without
waiting (``step.async_body`` and ``step.wait``, `implementations.base.async_step`: JAX's) runs n of them
back to back per round and waits once, as training loops and triton's ``do_bench`` run, and the clock
divides the interval by n, so the statistics stay per call. n (extra_info ``calls_per_round``) is chosen
once per case from the fastest warm-up call (`timing.calls_per_round`: a round of >= 20 ms, at most 100
calls); steps that take longer keep n = 1, and so does every step on the host clock or timed
stream-ordered. A row with n calls per round pays the round trip once per n calls: its share of the row
is the do-nothing row's round (its per-call median times its own n, the cap) over n times the row's call
(`timing.overhead_share`), as the harness-overhead line (`tables.overhead_ratios`) compares them. Within a round the
n calls use the same input (inputs still rotate per round) and L2 is flushed before the first call only:
the calls after it would find the previous call's last bytes in L2, so n > 1 is allowed only where one call
moves at least the flush's bytes (``may_repeat``; every GPU preset's layer moves far more, in weights
alone), so each call evicts what the one before it left, as the flush would.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import math
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qmoe import reference
from qmoe.reference.schemes import get_scheme
from qmoe.reference.spec import MoEParams, SpecError

from . import graphs, memory, metrics, outputs, timing, workload
from .peers import NoopBackend, PeerBackend, framework_of
from .shapes import BenchShape

#: ``pass`` id in test names -> (metrics pass name, the ``pass_`` handed to `Backend.benchmark_step`).
PASS_IDS = {"fwd": ("forward", "forward"), "fwd_bwd": ("forward_backward", "backward")}


@dataclass(frozen=True)
class BenchOptions:
    device: str | None
    dtype: str
    rounds: int = 5  # at least this many timed rounds (more where `min_time_s` asks for them)
    warmup: int = 1
    warmup_s: float = 0.05  # untimed calls for at least this long before the rounds (`warm_up`)
    min_time_s: float = 0.1  # timed rounds at least this long together (`rounds_for`), at most `MAX_ROUNDS`
    inputs: int = 2
    check_rows: int = outputs.DEFAULT_CHECK_ROWS
    stage_times: bool = False
    max_call_s: float | None = None
    threads: int | None = None
    deadline: float | None = None  # time.monotonic() after which cases are skipped (session budget)
    cuda_graph: bool = False  # capture every capturable step in a CUDA graph (--bench-cuda-graph)
    round_s: float = timing.TARGET_ROUND_S  # a synchronized round's target length (`timing.calls_per_round`)


@dataclass(frozen=True)
class BenchCase:
    """One benchmark: backend x scheme x top_k x shape x pass x routing."""

    backend: str
    scheme: str
    shape: BenchShape
    top_k: int
    pass_id: str
    routing: str
    is_peer: bool = False

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.scheme}-top{self.top_k}-{self.shape.name}-{self.pass_id}-{self.routing}"

    @property
    def pass_name(self) -> str:
        return PASS_IDS[self.pass_id][0]

    @property
    def group(self) -> str:
        """pytest-benchmark group: rows that did the same work (same shape, top_k, pass, routing)."""
        return f"{self.shape.name} top{self.top_k} {self.pass_name} {self.routing}"


def default_dtype(device: str | None) -> str:
    """float32 on CPU (what every backend declares); bfloat16 on GPUs (what the logbook measured)."""
    return "bfloat16" if timing.is_cuda(device) else "float32"


# -- caches: one entry each, so memory holds one shape's arrays at a time ------------------------------------------
class _One:
    """A single-entry cache: a new key drops the old value first (gigabytes at the logbook's shape)."""

    def __init__(self, on_drop: Callable[[], None] | None = None) -> None:
        self.key: Any = None
        self.value: Any = None
        self.on_drop = on_drop

    def get(self, key, make: Callable[[], Any]):
        if self.key != key or self.value is None:
            self.drop()
            self.value = make()
            self.key = key
        return self.value

    def drop(self) -> None:
        if self.value is not None:
            self.key, self.value = None, None
            gc.collect()
            if self.on_drop:
                self.on_drop()


def _free_device_memory() -> None:
    """Give cached device memory back, so the next framework in the same process finds it free."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


_params = _One()
_inputs = _One()
_effective = _One()
_expert_weights = _One()
_expected = _One()  # {(scheme, top_k, pass, input, rows, fixed routing): outputs.Expected}
_prepared = _One(_free_device_memory)
_loads: dict[tuple, float] = {}
#: (backend, scheme, shape, pass) -> (top_k, seconds) of a first call over the budget: larger top-k
#: and the other routing pattern only do more work, so they are skipped without another call.
_too_slow: dict[tuple, tuple[int, float]] = {}
_instances: dict[tuple, Any] = {}


def clear_caches() -> None:
    for cache in (_prepared, _expected, _expert_weights, _effective, _inputs, _params):
        cache.drop()
    _loads.clear()
    _too_slow.clear()
    _instances.clear()


def _effective_key(shape: BenchShape, scheme: str) -> tuple:
    """Schemes that quantize the weights alike share the reference's effective weights."""
    s = get_scheme(scheme)
    return (s.routed_weights, s.shared_weights if shape.shared_ffn else None, s.group_size, s.qat_scale_floor,
            s.qat_keep_float_max_numel, s.qat_clip_quantile)


def reference_effective(shape: BenchShape, routing: str, dtype: str, scheme: str, params: MoEParams) -> MoEParams:
    spec = shape.spec(shape.top_ks[0])
    key = (shape, routing, dtype, _effective_key(shape, scheme))
    return _effective.get(key, lambda: reference.effective_params(spec, params, scheme))


def bench_inputs(shape: BenchShape, dtype: str, count: int) -> list[workload.Inputs]:
    """`workload.make_inputs`, kept for one (shape, dtype, count) at a time (gigabytes at the logbook's)."""
    return _inputs.get((shape, dtype, count), lambda: workload.make_inputs(shape, dtype, count))


def expert_effective(shape: BenchShape, routing: str, dtype: str, scheme: str) -> outputs.ExpertEffective:
    """The per-expert effective weights of the layer's checks (`outputs.ExpertEffective`), shared by the
    schemes that quantize the weights alike; one layer and weight quantization at a time."""
    key = (shape, routing, dtype, _effective_key(shape, scheme))
    return _expert_weights.get(key, lambda: outputs.ExpertEffective(scheme))


def reference_expected(case: BenchCase, dtype: str, rows: np.ndarray, input_index: int,
                       expert_ids: np.ndarray | None, make: Callable[[], outputs.Expected]) -> outputs.Expected:
    """The reference output a case's check compares with, computed once for all backends that did the same
    work (each backend would otherwise build the same float64 sub-layer again: seconds per case at the
    logbook's shape). Kept for one (shape, routing, dtype) at a time."""
    routing_key = None if expert_ids is None else hashlib.blake2b(np.ascontiguousarray(expert_ids).tobytes(),
                                                                     digest_size=16).hexdigest()
    table = _expected.get((case.shape, case.routing, dtype), dict)
    key = (case.scheme, case.top_k, case.pass_id, input_index, rows.tobytes(), routing_key)
    if key not in table:
        table[key] = make()
    return table[key]


def backend_instance(cls: type, device: str | None):
    device = cls.declared_device(device)
    key = (cls, device)
    if key not in _instances:
        _instances[key] = cls(device)
    return _instances[key]


# -- timing -------------------------------------------------------------------------------------------------
#: Stands in `TimedRounds.results` for an input whose step never ran (``--benchmark-disable`` runs one
#: round only), as distinct from a step that ran and returned None (which fails the output check).
NOT_RUN = type("NotRun", (), {"__repr__": lambda self: "NOT_RUN"})()


@dataclass
class TimedRounds:
    results: list  # per distinct input, the last timed call's return value, or NOT_RUN
    timer: str
    l2_flush_bytes: int
    first_call_s: float | None = None
    #: "stream_ordered" (CUDA events around ``step.stream_body``, no host wait inside), "synchronized" (CUDA
    #: events around the synchronizing step, the start awaited), or "host" (perf_counter)
    timing: str = "host"
    #: calls per timed round (`timing.calls_per_round`); the timings are per call whatever it is
    calls_per_round: int = 1
    rounds: int = 0  # timed rounds run (`rounds_for`)
    warmup_calls: int = 0  # untimed calls before the rounds' own warm-up rounds (`warm_up`)


@dataclass
class CallsPerRound:
    """How many calls each round makes: one per warm-up round, then, where ``repeat``, `timing.calls_per_round`
    of the fastest warm-up call (the first may have compiled), fixed for the case's timed rounds. The warm-up
    calls are read off the CUDA clock (``last_call_s``): pytest-benchmark reads its timer around warm-up
    rounds as around timed ones; without a reading the rounds keep one call, the round trip in their times."""

    warmup: int
    repeat: bool
    calls: int = 1
    warm_call_s: list[float] = field(default_factory=list)
    round_s: float = timing.TARGET_ROUND_S

    def before_round(self, index: int, last_call_s: float | None) -> int:
        """The calls of round ``index`` (0-based, warm-up first); ``last_call_s``: the previous round's call."""
        if not self.repeat or index == 0 or index > self.warmup:
            return self.calls
        if last_call_s is not None:
            self.warm_call_s.append(last_call_s)
        if index == self.warmup and self.warm_call_s:
            self.calls = timing.calls_per_round(min(self.warm_call_s), self.round_s)
        return self.calls


def back_to_back(step: Callable[[], Any], calls: int) -> Any:
    """``calls`` calls of ``step.async_body``, then ``step.wait`` on the last one's output, which by the
    contract of `Backend.benchmark_step` is ready only once all of them finished. Returns that output: the
    one the output check sees."""
    for _ in range(calls):
        out = step.async_body()
    step.wait(out)
    return out


#: Timed rounds at most, however short the call (a do-nothing call would otherwise get 10^5 of them).
MAX_ROUNDS = 200


def warm_up(steps: list[Callable[[], Any]], flush: Callable[[], None], seconds: float) -> tuple[int, float | None]:
    """Untimed calls, each after an L2 flush: one per input (the first may compile or autotune), then more
    through the inputs until ``seconds`` have passed since those; none if ``seconds`` is 0. Returns (calls,
    the fastest call's seconds by the host clock, or None if none ran). Why: with one warm-up round, 2-4 ms
    cases on the H200 were still getting faster over their 5 timed rounds (2026-12-01, gpt-oss-20b forward:
    3.58, 2.97, 2.86, 2.67, 2.79 ms; the same case 27% apart in two runs); triton's do_bench likewise warms up
    by time (25 ms). The clock starts after the first calls, so that a compile does not use up the warm-up."""
    if seconds <= 0:
        return 0, None
    times: list[float] = []

    def call() -> None:
        flush()
        times.append(_call_seconds(steps[len(times) % len(steps)]))

    for _ in steps:
        call()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        call()
    return len(times), min(times)


def rounds_for(options: BenchOptions, round_s: float | None) -> int:
    """Timed rounds: ``options.rounds``, or more, up to `MAX_ROUNDS`, until they add up to ``options.min_time_s``
    (``round_s``: one round's estimated seconds). A 3 ms call then gets 34 rounds, a 35 ms one keeps 5."""
    if round_s is None or round_s <= 0 or options.min_time_s <= 0:
        return options.rounds
    return max(options.rounds, min(MAX_ROUNDS, math.ceil(options.min_time_s / round_s)))


def time_rounds(benchmark, steps: list[Callable[[], Any]], options: BenchOptions, may_repeat: bool = True
                ) -> TimedRounds:
    """Pedantic rounds over ``steps`` (one per distinct input) with the setup/flush/timer described above.
    On CUDA, steps that all offer ``stream_body`` (`implementations.base.synchronized_step`) are timed
    stream-ordered: the clock's start does not wait (`timing.CudaEventClock`). Otherwise, steps that all offer
    ``async_body`` run several calls per round (`CallsPerRound`, `back_to_back`) unless ``may_repeat`` is
    False (a call too small to evict the previous one from L2: see the module docstring)."""
    _, timer_name = timing.clock_for(options.device)  # the grid put this timer into the benchmark mark
    flush = timing.L2Flush(options.device)
    clock = timing.cuda_clock() if timer_name == "cuda_events" else None
    bodies = [getattr(step, "stream_body", None) for step in steps]
    stream_ordered = clock is not None and all(body is not None for body in bodies)
    calls = bodies if stream_ordered else steps
    warmup = max(options.warmup, len(steps))
    repeats = CallsPerRound(warmup, repeat=clock is not None and not stream_ordered and may_repeat
                            and all(getattr(step, "async_body", None) is not None for step in steps),
                            round_s=options.round_s)
    results: list = [NOT_RUN] * len(steps)
    turn = itertools.count()
    warmup_calls, call_s = (0, None) if getattr(benchmark, "disabled", False) else warm_up(steps, flush,
                                                                                          options.warmup_s)
    expected_calls = (timing.calls_per_round(call_s, options.round_s) if repeats.repeat and call_s is not None
                      else 1)
    rounds = rounds_for(options, None if call_s is None else call_s * expected_calls)

    def setup():
        index = next(turn)
        # The previous output of the input about to run goes before the call, not when the call's output
        # replaces it: kept through the call it adds one output (a forward+backward's weight gradients) to the
        # call's live memory (2026-12-01, deepseek-v3 on the H200: 21 GiB of gradients, out of memory).
        results[index % len(steps)] = NOT_RUN
        n = repeats.before_round(index, getattr(clock, "last_call_s", None))
        flush()
        if clock is not None:
            clock.arm(synchronize_start=not stream_ordered, calls=n)
        return (index % len(steps), n), {}

    def target(i: int, n: int) -> None:
        results[i] = back_to_back(steps[i], n) if n > 1 else calls[i]()

    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
    if stream_ordered:
        check_stream_order(steps[0], bodies[0], clock, flush)
    mode = "host" if clock is None else "stream_ordered" if stream_ordered else "synchronized"
    return TimedRounds(results, timer_name, flush.bytes, timing=mode, calls_per_round=repeats.calls, rounds=rounds,
                       warmup_calls=warmup_calls)


#: Device seconds a stream-ordered call may come out shorter than the same call synchronized, beyond half
#: of it: the synchronized interval's host round trip (~22-25 us on the H200), with room for noise.
STREAM_ORDER_SLACK_S = 100e-6
#: Calls of each kind the check times, keeping the fastest of each: one synchronized call can catch a
#: host stall (H200, 2026-12-01: the compiled torch peer at top-1 zipf forward+backward, 7.0 ms
#: stream-ordered against one synchronized call of 15.4 ms, in a run alone on the machine, where its
#: timed rounds agreed with each other), while a body whose work is on another stream is short every time.
STREAM_ORDER_SAMPLES = 3


class StreamOrderError(AssertionError):
    """A step offered ``stream_body`` but its work is not ordered on torch's current stream."""


def check_stream_order(step: Callable[[], Any], body: Callable[[], Any], clock, flush: Callable[[], None],
                       samples: int = STREAM_ORDER_SAMPLES) -> None:
    """Time ``body`` stream-ordered and ``step`` synchronized, the fastest of ``samples`` calls each (after
    the rounds: nothing compiles now), and refuse a stream-ordered timing that misses the work: a body whose
    kernels go to another stream (a side stream, NCCL's, another framework's) ends its interval before they
    run, so it measures ~nothing. A correct body differs from the synchronized step by the host round trip
    alone."""
    def once(call: Callable[[], Any], synchronize_start: bool) -> float:
        flush()
        clock.arm(synchronize_start)
        start = clock()
        call()
        return clock() - start

    ordered = min(once(body, False) for _ in range(samples))
    synchronized = min(once(step, True) for _ in range(samples))
    if synchronized - ordered > max(0.5 * synchronized, STREAM_ORDER_SLACK_S):
        raise StreamOrderError(
            f"step.stream_body took {ordered * 1e6:.1f} us between CUDA events on torch's current stream, the same "
            f"step synchronized {synchronized * 1e6:.1f} us (fastest of {samples} calls each): its work is not "
            "ordered on that stream (a side stream, a collective, another framework), so it cannot be timed "
            "stream-ordered; build the step without torch_stream=True (implementations.base.synchronized_step)")


class _PhaseClock:
    """Wall seconds of a case's phases (extra_info ``phase_s``): where a long run's time goes (building and
    quantizing the layer, compiling in the warm-up rounds, the reference check), not a throughput."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 3)
        self._last = now


# -- one case -----------------------------------------------------------------------------------------------
def _skip(reason: str):
    import pytest

    pytest.skip(reason)


def run_case(benchmark, case: BenchCase, backend_cls: type, options: BenchOptions) -> dict:
    """Run ``case``; returns the extra_info it recorded. Skips (with the reason) what cannot run here.

    A case that fails lets go of its device arrays before the error goes on: pytest keeps a failure's
    traceback (and ``sys.last_traceback``) until the next one, and its frames hold the case's prepared
    weights and last outputs. On 2026-12-01 (deepseek-v3, H200) one out-of-memory failure left 40 GiB held
    that way, and the next four cases failed in their own allocations.
    """
    try:
        return _run_case(benchmark, case, backend_cls, options)
    except Exception as exc:
        traceback.clear_frames(exc.__traceback__)  # the finished frames' locals; names and lines stay
        _prepared.drop()
        raise


def _run_case(benchmark, case: BenchCase, backend_cls: type, options: BenchOptions) -> dict:
    if options.deadline is not None and time.monotonic() > options.deadline:
        _skip("the session's time budget (--bench-session-budget-s) is spent: not started")
    backend = backend_instance(backend_cls, options.device)
    shape, dtype = case.shape, options.dtype
    spec = shape.spec(case.top_k)
    metric_pass, step_pass = PASS_IDS[case.pass_id]
    limit = getattr(backend, "benchmark_limit", None)
    if limit is not None:
        reason = limit(spec, shape.tokens, metric_pass, dtype)
        if reason:
            _skip(f"{case.backend}: {reason}")

    need = memory.estimate(spec, shape.tokens, dtype, metric_pass,
                           outputs.BACKWARD_CHECK_BYTES + outputs.EFFECTIVE_CACHE_BYTES)
    too_big = memory.fit_refusal(need, memory.host_memory_bytes(), memory.device_memory_bytes(options.device),
                                 options.device,
                                 memory.held_by_other_frameworks(framework_of(backend_cls), options.device))
    if too_big:
        _skip(f"{case.id} not built: {too_big}")

    slow_key = (case.backend, case.scheme, shape, case.pass_id)
    if options.max_call_s is not None and slow_key in _too_slow and _too_slow[slow_key][0] <= case.top_k:
        k, seconds = _too_slow[slow_key]
        _skip(f"{case.backend} {case.scheme} took {seconds:.1f} s per call at {shape.name} top{k} {metric_pass} "
              f"(> --bench-max-call-s {options.max_call_s:g}); this case does at least as much work")

    clock = _PhaseClock()
    params = _params.get((shape, case.routing, dtype), lambda: workload.make_params(shape, case.routing, dtype))
    inputs = bench_inputs(shape, dtype, options.inputs)
    clock.lap("inputs")
    prepare_key = (case.backend, options.device, case.scheme, shape, case.top_k, case.routing, dtype)

    def prepare():
        try:
            return backend.prepare(spec, params, case.scheme, dtype)
        except SpecError as exc:
            _skip(f"{case.backend} cannot run this case: {exc}")

    prepared = _prepared.get(prepare_key, prepare)
    clock.lap("prepare")
    steps = [backend.benchmark_step(prepared, item.x, step_pass, item.dy) for item in inputs]
    step_info = dict(getattr(steps[0], "extra_info", None) or {})  # what a step says of itself (a bound's variant)
    graph_info = None
    if timing.is_cuda(options.device) and (options.cuda_graph or getattr(steps[0], "always_capture", False)):
        captured = [graphs.capture(step) for step in steps]
        steps = [c.step for c in captured]
        failed = next((c.reason for c in captured if not c.captured), None)
        graph_info = {"cuda_graph": failed is None, **({"cuda_graph_reason": failed} if failed else {})}

    clock.lap("capture")
    first_call_s = None
    if options.max_call_s is not None:
        first_call_s = _call_seconds(steps[0])
        if first_call_s > options.max_call_s:
            first_call_s = _call_seconds(steps[0])  # the first call may have compiled: judge the second
        if first_call_s > options.max_call_s:
            _too_slow[slow_key] = (case.top_k, first_call_s)
            _skip(f"{case.backend} {case.scheme} took {first_call_s:.1f} s per call (after compiling) at {shape.name} "
                  f"top{case.top_k} {metric_pass} (> --bench-max-call-s {options.max_call_s:g}): too slow to "
                  "benchmark here")

    # a call that moves fewer bytes than the L2 flush would leave the next call of a round a warm cache
    may_repeat = metrics.bytes_moved(spec, shape.tokens, case.scheme, dtype, metric_pass).total >= timing.L2_FLUSH_BYTES
    timed = time_rounds(benchmark, steps, options, may_repeat)
    clock.lap("rounds")
    timed.first_call_s = first_call_s
    info = describe(case, backend_cls, spec, options, timed)
    info.update(graph_info or {})
    info.update(step_info)
    fixed = getattr(backend, "fixed_expert_ids", None)
    expert_ids = fixed(spec, shape.tokens) if fixed is not None else None
    if expert_ids is None:
        info["load_imbalance"] = _load_imbalance(shape, case, spec, params, inputs[0].x)
    else:  # a peer that does not route: its own fixed assignment, whatever the case's routing pattern
        info["load_imbalance"] = workload.load_imbalance(np.bincount(expert_ids.reshape(-1), minlength=spec.experts))
        info["routing_fixed"] = True
    stats = _stats(benchmark)
    if stats is not None:
        info.update(measured(spec, shape.tokens, case.scheme, dtype, metric_pass, stats, info["device_name"]))

    benchmark.extra_info.update(info)
    rows = outputs.check_rows(shape.tokens, options.check_rows)
    clock.lap("metrics")
    checks = []
    for i, (item, result) in enumerate(zip(inputs, timed.results)):
        if result is NOT_RUN:
            continue  # --benchmark-disable runs one round only; a step that returned None is checked (and fails)
        def expected(item: workload.Inputs = item) -> outputs.Expected:
            layer = outputs.check_layer(spec, params, case.scheme, item.x, rows, expert_ids,
                                        lambda: reference_effective(shape, case.routing, dtype, case.scheme, params),
                                        cache=expert_effective(shape, case.routing, dtype, case.scheme))
            return outputs.expected_output(layer.spec, layer.effective, case.scheme, metric_pass, item.x, item.dy,
                                           layer.rows, layer.expert_ids)

        want = reference_expected(case, dtype, rows, i, expert_ids, expected)
        checks.append(outputs.compare_output(result, want, (shape.tokens, shape.hidden), case.scheme, metric_pass,
                                             what=f"{case.id} (input {i})"))
    if not checks:
        raise outputs.OutputNotFoundError(f"{case.id}: no timed call ran, so no output could be checked: "
                                          "an unchecked timing is not a result")
    clock.lap("check")
    # The peak is measured once the timed outputs are gone: torch's allocator peak starts from what is allocated,
    # and a kept forward+backward output (the weight gradients) would count twice (the step makes its own).
    timed.results, result = [], None
    after = memory.measure_peak(info["framework"], options.device, steps[0]).as_info()
    clock.lap("peak_memory")
    if options.stage_times and metric_pass == "forward" and hasattr(backend, "stage_times"):
        try:
            after["stage_times_s"] = {k: float(v) for k, v in backend.stage_times(prepared, inputs[0].x).items()}
        except Exception as exc:  # stage timing is optional: its failure is reported, not fatal
            after["stage_times_error"] = f"{type(exc).__name__}: {exc}"
    benchmark.extra_info.update(after)
    benchmark.extra_info["phase_s"] = clock.laps
    benchmark.extra_info["output_check"] = {
        "what": checks[0].what if checks else None, "rows": int(rows.size), "inputs": len(checks),
        "floor_db": outputs.OUTPUT_CHECK_FLOOR_DB,
        "checked_rows": min((c.rows for c in checks), default=0),
        "min_sqnr_db": min((c.sqnr_db for c in checks), default=None)}
    return benchmark.extra_info


def run_overhead(benchmark, options: BenchOptions, shape: BenchShape, noop: type[NoopBackend] = NoopBackend) -> dict:
    """Time a do-nothing backend's step through the very same rounds: the harness's own cost per call
    (`NoopBackend`: of a synchronizing step; `peers.NoopStreamBackend`: of a stream-ordered one). On CUDA the
    synchronizing one's empty calls get the most calls per round (`timing.MAX_CALLS_PER_ROUND`): its median
    times its ``calls_per_round`` is the harness's cost of one round (`timing.overhead_share`)."""
    backend = noop(options.device)
    spec = shape.spec(shape.top_ks[0])
    inputs = bench_inputs(shape, options.dtype, options.inputs)
    steps = [backend.benchmark_step(None, item.x, "forward", item.dy) for item in inputs]
    timed = time_rounds(benchmark, steps, options)
    case = BenchCase(noop.name, "none", shape, spec.top_k, "fwd", "balanced")
    info = describe(case, noop, spec, options, timed)
    info["harness_only"] = True
    stats = _stats(benchmark)
    if stats is not None:
        info.update(seconds_median=stats.median, seconds_mean=stats.mean, seconds_min=stats.min)
    benchmark.extra_info.update(info)
    return info


def _call_seconds(step: Callable[[], Any]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def _stats(benchmark):
    meta = getattr(benchmark, "stats", None)
    return getattr(meta, "stats", None) if meta is not None else None


def describe(case: BenchCase, backend_cls: type, spec, options: BenchOptions, timed: TimedRounds) -> dict:
    """What was run, where, with what: the part of extra_info that does not depend on the timings."""
    try:
        versions = dict(backend_cls.versions())
    except Exception as exc:
        versions = {"error": f"{type(exc).__name__}: {exc}"}
    versions.update(python=platform.python_version(), numpy=np.__version__)
    info = {
        "backend": case.backend, "peer": bool(case.is_peer or issubclass(backend_cls, PeerBackend)),
        "bound": bool(getattr(backend_cls, "bound", False)),
        "framework": framework_of(backend_cls), "scheme": case.scheme, "pass": case.pass_name,
        "top_k": case.top_k, "routing": case.routing, "dtype": options.dtype,
        **case.shape.describe(), "renormalize": spec.renormalize, "routed_scaling": spec.routed_scaling,
        "device": options.device or "default", "device_name": timing.device_name(options.device),
        "versions": versions, "timer": timed.timer, "timing": timed.timing, "calls_per_round": timed.calls_per_round,
        "l2_flush_bytes": timed.l2_flush_bytes,
        "inputs": options.inputs, "rounds": timed.rounds or options.rounds,
        "warmup_rounds": max(options.warmup, options.inputs),
        "warmup_calls": timed.warmup_calls, "warmup_s": options.warmup_s, "min_time_s": options.min_time_s,
        "round_s": options.round_s,
        "threads": options.threads, "cuda_graph_option": options.cuda_graph,
    }
    bound_operand = getattr(backend_cls, "bound_operand", None)
    if info["bound"] and bound_operand is not None:
        info["bound_operand"] = bound_operand(options.dtype)  # which rows it bounds (their peak_operand)
    if timed.first_call_s is not None:
        info["first_call_s"] = timed.first_call_s
    return info


def measured(spec, tokens: int, scheme: str, dtype: str, pass_name: str, stats, device_name: str) -> dict:
    """The metrics of one result (TF/s etc. from the median round)."""
    flop_count = metrics.flops(spec, tokens, pass_name)
    traffic = metrics.bytes_moved(spec, tokens, scheme, dtype, pass_name)
    seconds = stats.median
    tf = metrics.tflops(flop_count, seconds)
    return {
        "flops": flop_count, "bytes": traffic.total,
        "bytes_split": {"weights": traffic.weights, "activations": traffic.activations,
                        "gradients": traffic.gradients},
        "seconds_median": seconds, "seconds_mean": stats.mean, "seconds_min": stats.min,
        "tflops": tf, "tokens_per_s": metrics.tokens_per_s(tokens, seconds),
        "gb_per_s": metrics.gb_per_s(traffic.total, seconds),
        "pct_peak": metrics.percent_of_peak(tf, device_name, scheme, dtype),
        "peak_operand": metrics.peak_operand(scheme, dtype),
    }


def _load_imbalance(shape: BenchShape, case: BenchCase, spec, params: MoEParams, x: np.ndarray) -> float:
    key = (shape, case.routing, case.top_k, params.router.dtype.str)
    if key not in _loads:
        _loads[key] = workload.load_imbalance(workload.expert_loads(spec, params, x))
    return _loads[key]


