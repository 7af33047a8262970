"""Expert-parallel benchmark: the layer with its experts split over N devices against the same layer on one.

One measurement (`measure`) per backend x scheme x N x dispatch gives, from one run:

* ``seconds`` per round of the sharded layer (the slowest rank's time, rounds aligned by a barrier) and
  of the one-device layer on the same global batch, and tokens/s of each;
* per-rank stage times: ``route``, ``dispatch`` (counts exchange + row all-to-all), ``experts`` (local
  grouped GEMMs), ``combine`` (reverse all-to-all + gate-weighted sum), ``shared``; forward + backward
  adds ``backward`` (the whole backward, both reverse exchanges included);
* all-to-all bytes each rank sends (to other ranks, and in total with its own block), the achieved GB/s
  of the dispatch, and beside it a plain ``all_to_all_single`` of the same bytes in equal blocks timed in
  the same processes (what the interconnect gives an exchange of that size);
* with ``dispatch="int8"``: the same with rows sent as int8 codes + a float32 scale, the saving in bytes
  and seconds, and its output checked against the float dispatch (tight where the scheme quantizes the
  routed activations per token anyway: the expert re-derives the same codes; otherwise the SQNR floor of
  per-token int8 activations, `int8_dispatch_floor_db`).

The sharded output is checked against the one-device output on the checked rows (the ``expert_parallel``
tolerance): a benchmark of a wrong layer is not a result. Tokens whose top-k boundary lies within the float32
router's rounding (`qmoe.suite.bounds.routing_undecided`) may select another expert on one side — the two
programs' router GEMMs differ in shape — so their rows are counted and reported, not held to the bound
(`compare_to_one_device`). Where jax_prequant's one-device layer runs out of device memory (its capacity
padding on zipf routing asked one H200 for 42-63 GiB) the case still runs: the sharded layer is checked
against the float64 reference on the benchmarks' check rows (`check_against_reference`), and the speed-up
is left empty with the one-device error recorded.

torch_triton (``expert_parallel_processes``) runs in the session's pool of N ranks
(`qmoe.suite.process_group`; NCCL on GPUs, gloo on CPU): each rank builds the inputs itself (seeded:
every rank has the same batch), times with CUDA events on a GPU (``perf_counter`` on CPU), never a
host-device copy. jax_prequant runs in this process over N devices (fake CPU devices in CI), float and
int8 dispatch each from ``JaxPrequantBackend(device, ep_dispatch=...)``: its timed expert-parallel layer is
one XLA program; its stage times (route, dispatch, experts, combine, shared; forward only) come from the
same forward cut at its all-to-alls into separately jitted programs over the same mesh, each timed alone
after warm-up with ``block_until_ready`` (`jax_stage_seconds`): one figure per stage for all devices, whose
sum exceeds the fused program's forward by the launches and the materialized intermediates. Its all-to-all
bytes are read from the timed program itself (the operands of its ``all_to_all`` operations, static buffers
of N x N blocks of ``dispatch_capacity`` rows; forward + backward includes the backward's exchanges), and
its plain all-to-all is ``jax.lax.all_to_all`` of one float
dispatch's row bytes. Its int8 routed schemes send int8 codes + scales under either dispatch (the expert
would make the same codes), so their byte saving is zero except for ``int8_routed_prequant`` forward +
backward, whose float dispatch sends the float rows its weight gradient needs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from qmoe.reference.schemes import get_scheme

from . import outputs, workload
from .shapes import LOGBOOK_SHARED0, BenchShape

#: A CI-sized layer (seconds on two CPU cores, interpreted Triton included) and the logbook's layer.
EP_CPU_TINY = BenchShape("ep-cpu-tiny", tokens=64, hidden=64, ffn=64, experts=8, top_ks=(2,),
                         source="qmoe: the expert-parallel benchmark's CPU size (no model)")
EP_SHAPES = {"ep-cpu-tiny": EP_CPU_TINY, "logbook-shared0": LOGBOOK_SHARED0}
#: Token rows of each rank's output returned for the checks.
CHECK_ROWS = 128


@dataclass(frozen=True)
class EPBench:
    """One expert-parallel measurement."""

    shape: BenchShape
    top_k: int
    scheme: str
    ep_size: int
    dtype: str
    pass_: str = "forward"          # forward | forward_backward
    rounds: int = 5
    warmup: int = 2
    routing: str = "balanced"

    @property
    def id(self) -> str:
        return f"{self.scheme}-top{self.top_k}-{self.shape.name}-{self.pass_}-ep{self.ep_size}-{self.routing}"


def int8_dispatch_floor_db(dtype: str) -> float:
    """SQNR floor for the float-activation schemes' output under int8 dispatch: that of the output of
    ``int8_routed`` (per-token int8 activations *and* per-expert int8 weights), which int8 dispatch, quantizing
    only the routed activations, must clear."""
    from qmoe.suite.tolerances import tolerance

    floor = tolerance("int8_routed", dtype, "forward").floor("y")
    if floor is None:
        raise KeyError(f"no int8_routed output floor for {dtype}")
    return floor


def _sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    noise = float(np.sum((np.asarray(actual, np.float64) - np.asarray(reference, np.float64)) ** 2))
    signal = float(np.sum(np.asarray(reference, np.float64) ** 2))
    return float("inf") if noise == 0 else 10.0 * np.log10(signal / noise)


def _relative_row_error(actual: np.ndarray, expected: np.ndarray) -> float:
    a, r = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    ref = np.linalg.norm(r, axis=1)
    err = np.linalg.norm(a - r, axis=1)
    return float(np.max(np.where(ref > 0, err / np.where(ref > 0, ref, 1), np.where(err > 0, np.inf, 0.0))))


def compare_to_one_device(bench_id: str, tol, y_sharded: np.ndarray, y_one: np.ndarray, undecided: np.ndarray,
                          ids_sharded: np.ndarray | None = None, ids_one: np.ndarray | None = None) -> dict:
    """The sharded layer's rows against the one-device layer's; raises AssertionError if out of bounds.

    Rows of routing-undecided tokens (`qmoe.suite.bounds.routing_undecided`) are left out of the bound: a
    near-tie at the top-k boundary may resolve differently in the two programs (H200, logbook zipf top-8:
    token 20764, logit gap 7.4e-8, moved by 4.65e-2, its flip's own effect). Expert ids, where given, must
    agree on every other token: a selection that differs there is a routing bug, not rounding.
    """
    undecided = np.asarray(undecided, dtype=bool)
    decided = ~undecided
    differs = np.zeros(undecided.shape, dtype=bool)
    if ids_sharded is not None and ids_one is not None:
        # the selected sets: two experts inside the top-k whose scores are within rounding of each other may
        # come in either slot order (H200 x4, zipf top-8: token 7283, experts 4 and 6), which moves no row
        differs = np.any(np.sort(ids_sharded, axis=-1) != np.sort(ids_one, axis=-1), axis=-1)
        wrong = differs & decided
        assert not wrong.any(), (f"{bench_id}: sharded routing differs from one device at {int(wrong.sum())} tokens "
                                 f"whose top-k boundary is beyond float32 rounding (first: token "
                                 f"{int(np.argmax(wrong))})")
    error = _relative_row_error(y_sharded[decided], y_one[decided]) if decided.any() else 0.0
    assert error <= tol.tight, (f"{bench_id}: sharded output differs from one device by {error:.3e} (> {tol.tight:g}: "
                                f"{tol.reason}) on the {int(decided.sum())} routing-decided rows")
    return {"output_error_vs_one_device": error, "routing_undecided_tokens": int(undecided.sum()),
            "routing_differs_tokens": int(differs.sum()),
            "output_error_undecided_rows": (_relative_row_error(y_sharded[undecided], y_one[undecided])
                                            if undecided.any() else None)}


def is_out_of_memory(exc: BaseException) -> bool:
    """A device allocation failure (XLA's RESOURCE_EXHAUSTED, torch's OutOfMemoryError)."""
    text = f"{type(exc).__name__}: {exc}"
    return "RESOURCE_EXHAUSTED" in text or "OutOfMemoryError" in text or "out of memory" in text.lower()


def check_against_reference(bench_id: str, spec, params, scheme: str, x: np.ndarray, dy: np.ndarray,
                            y: np.ndarray) -> dict:
    """The sharded layer's output on the benchmarks' check rows against the float64 reference, as
    `harness.run_case` checks a layer: the check where no one-device output exists to compare with.
    Raises `outputs.WrongOutputError` below the SQNR floor."""
    rows = outputs.check_rows(x.shape[0], outputs.DEFAULT_CHECK_ROWS)
    layer = outputs.check_layer(spec, params, scheme, x, rows)
    expected = outputs.expected_output(layer.spec, layer.effective, scheme, "forward", x, dy, layer.rows)
    check = outputs.compare_output(y, expected, (x.shape[0], spec.hidden), scheme, "forward",
                                   what=f"{bench_id} (sharded, float dispatch)")
    return {"output_check_vs_reference": check.as_dict()}


def check_int8_dispatch(scheme: str, dtype: str, y_float: np.ndarray, y_int8: np.ndarray) -> dict:
    """Int8 dispatch against float dispatch (see the module docstring); raises AssertionError if out of bounds."""
    from qmoe.suite.tolerances import expert_parallel_same_codes

    if get_scheme(scheme).routed_activations == "per_token":
        bound = expert_parallel_same_codes(dtype).tight
        error = _relative_row_error(y_int8, y_float)
        assert error <= bound, (f"int8 dispatch under {scheme}: the expert quantizes each row anyway, so the output "
                                f"must equal float dispatch's; worst row relative error {error:.3e} > {bound:g}")
        return {"int8_dispatch_check": "tight", "int8_dispatch_error": error, "int8_dispatch_bound": bound}
    floor = int8_dispatch_floor_db(dtype)
    sqnr = _sqnr_db(y_float, y_int8)
    assert sqnr >= floor, f"int8 dispatch under {scheme}: SQNR {sqnr:.1f} dB against float dispatch < floor {floor} dB"
    return {"int8_dispatch_check": "sqnr", "int8_dispatch_sqnr_db": sqnr, "int8_dispatch_floor_db": floor}


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# -- torch_triton: per-rank task (runs in the pool's workers) -----------------------------------------------
def torch_rank_task(payload: dict) -> dict:
    """One rank's share of a torch measurement: EP rounds (float and int8 dispatch), the one-device layer
    (rank 0), a plain all-to-all of the dispatch's bytes; per-round stage seconds and sent bytes."""
    import torch
    import torch.distributed as dist

    from qmoe.implementations.torch_triton import TRAINABLE, expert_parallel
    from qmoe.suite.bounds import routing_undecided
    from qmoe.suite.process_group import backend_in_worker

    bench: EPBench = payload["bench"]
    device = payload["device"]
    rank, size = dist.get_rank(), dist.get_world_size()
    cuda = device in ("cuda", "gpu")
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    spec = bench.shape.spec(bench.top_k)
    params = workload.make_params(bench.shape, bench.routing, bench.dtype)
    item = workload.make_inputs(bench.shape, bench.dtype, 1)[0]
    passes = "forward" if bench.pass_ == "forward" else "backward"
    out: dict[str, Any] = {"rank": rank}

    def rounds(step, recorder=None) -> list:
        for _ in range(bench.warmup):
            step()
        times = []
        for _ in range(bench.rounds):
            dist.barrier()
            synchronize()
            if recorder is None:
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            else:
                step()
                times.append(recorder.seconds())
        return times

    for dispatch in ("float", "int8"):
        backend = backend_in_worker(payload["backend"], device, ep_dispatch=dispatch)
        prepared = backend.prepare(spec, params, bench.scheme, bench.dtype, ep_size=size)
        x = torch.tensor(item.x, dtype=prepared.torch_dtype, device=prepared.device)
        dy = torch.tensor(item.dy, dtype=torch.float32, device=prepared.device)
        recorder = expert_parallel.StageRecorder(cuda)
        step = expert_parallel.local_step(prepared, x, passes, dy, TRAINABLE, synchronize, recorder)
        stages = rounds(step, recorder)
        forward = expert_parallel.local_step(prepared, x, "forward", None, TRAINABLE, synchronize)
        y = forward()
        out[dispatch] = {"stages": stages, "sent_bytes": dict(recorder.sent_bytes),
                         "y_rows": y[:CHECK_ROWS].to(torch.float32).cpu().numpy(),
                         "token_begin": prepared.shard.tokens(bench.shape.tokens)[0]}
        del prepared, step, forward
    begin, checked = out["float"]["token_begin"], out["float"]["y_rows"].shape[0]
    out["undecided"] = routing_undecided(spec, params, item.x[begin:begin + checked])
    # a plain all-to-all of the float dispatch's row bytes, equal blocks, in this same group
    row_bytes = out["float"]["sent_bytes"]["dispatch_rows"][1]
    block = max(1, -(-row_bytes // size))
    plain = torch.zeros(block * size, dtype=torch.uint8, device="cuda" if cuda else "cpu")
    received = torch.empty_like(plain)
    out["plain_all_to_all"] = {"bytes_per_rank": block * size, "off_rank_bytes": block * (size - 1),
                               "seconds": rounds(lambda: (dist.all_to_all_single(received, plain), synchronize()))}
    # the same layer on one device (rank 0), the others waiting at the barrier
    if rank == 0:
        backend = backend_in_worker(payload["backend"], device)
        one = backend.prepare(spec, params, bench.scheme, bench.dtype)
        x = torch.tensor(item.x, dtype=one.torch_dtype, device=one.device)
        dy = torch.tensor(item.dy, dtype=torch.float32, device=one.device)
        one_step = backend.device_step(one, x, passes, dy)
        for _ in range(bench.warmup):
            one_step()
        times = []
        for _ in range(bench.rounds):
            if cuda:
                start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start_event.record()
                one_step()
                end_event.record()
                end_event.synchronize()
                times.append(start_event.elapsed_time(end_event) / 1e3)
            else:
                start = time.perf_counter()
                one_step()
                times.append(time.perf_counter() - start)
        y_one = backend.device_step(one, x, "forward")()
        out["one_device"] = {"seconds": times, "y": y_one.to(torch.float32).cpu().numpy()}
        del one
    dist.barrier()
    return out


def summarize_torch(bench: EPBench, ranks: list[dict]) -> dict:
    """extra_info of a torch measurement from the ranks' records; checks the outputs."""
    from qmoe.suite.tolerances import tolerance

    info: dict[str, Any] = {}
    tol = tolerance(bench.scheme, bench.dtype, "expert_parallel")
    y_one = ranks[0]["one_device"]["y"]
    for dispatch in ("float", "int8"):
        per_round = [max(sum(r[dispatch]["stages"][i].values()) for r in ranks) for i in range(bench.rounds)]
        stage_names = list(ranks[0][dispatch]["stages"][0])
        stages = {name: [_median([r[dispatch]["stages"][i].get(name, 0.0) for i in range(bench.rounds)])
                         for r in ranks] for name in stage_names}
        sent = {what: [r[dispatch]["sent_bytes"].get(what, (0, 0)) for r in ranks]
                for what in ranks[0][dispatch]["sent_bytes"]}
        seconds = _median(per_round)
        dispatch_s = max(stages["dispatch"])
        off_rank_rows = sum(off for off, _ in sent["dispatch_rows"])
        info[dispatch] = {
            "seconds_per_round": per_round, "seconds_median": seconds,
            "tokens_per_s": bench.shape.tokens / seconds,
            "stage_seconds_per_rank": stages,
            "sent_bytes_per_rank": {what: [list(v) for v in values] for what, values in sent.items()},
            "all_to_all_bytes_off_rank": sum(off for values in sent.values() for off, _ in values),
            "all_to_all_bytes_total": sum(total for values in sent.values() for _, total in values),
            "dispatch_gb_per_s": off_rank_rows / len(ranks) / dispatch_s / 1e9 if dispatch_s else None,
        }
        # sharded output rows against the one-device output of the same tokens
        y_rows = np.concatenate([r[dispatch]["y_rows"] for r in ranks])
        y_expected = np.concatenate([y_one[r[dispatch]["token_begin"]:r[dispatch]["token_begin"]
                                           + r[dispatch]["y_rows"].shape[0]] for r in ranks])
        undecided = np.concatenate([r["undecided"] for r in ranks])
        if dispatch == "float":
            info[dispatch].update(compare_to_one_device(bench.id, tol, y_rows, y_expected, undecided))
        else:  # int8 dispatch is checked against float dispatch (int8_check); its distance is recorded
            info[dispatch]["output_error_vs_one_device"] = _relative_row_error(y_rows, y_expected)
    y_float = np.concatenate([r["float"]["y_rows"] for r in ranks])
    y_int8 = np.concatenate([r["int8"]["y_rows"] for r in ranks])
    info["int8_check"] = check_int8_dispatch(bench.scheme, bench.dtype, y_float, y_int8)
    plain = [r["plain_all_to_all"] for r in ranks]
    plain_s = _median([max(p["seconds"][i] for p in plain) for i in range(bench.rounds)])
    info["plain_all_to_all"] = {"bytes_per_rank": plain[0]["bytes_per_rank"], "seconds_median": plain_s,
                                "gb_per_s": plain[0]["off_rank_bytes"] / plain_s / 1e9 if plain_s else None}
    one_s = _median(ranks[0]["one_device"]["seconds"])
    info["one_device"] = {"seconds_median": one_s, "tokens_per_s": bench.shape.tokens / one_s,
                          "seconds_per_round": ranks[0]["one_device"]["seconds"]}
    info["int8_dispatch_saving"] = {
        "bytes": 1 - info["int8"]["all_to_all_bytes_off_rank"] / max(info["float"]["all_to_all_bytes_off_rank"], 1),
        "dispatch_seconds": 1 - max(info["int8"]["stage_seconds_per_rank"]["dispatch"])
        / max(info["float"]["stage_seconds_per_rank"]["dispatch"]),
        "layer_seconds": 1 - info["int8"]["seconds_median"] / info["float"]["seconds_median"]}
    info["speedup_vs_one_device"] = one_s / info["float"]["seconds_median"]
    return info



def measure_torch(backend_cls: type, device: str | None, bench: EPBench) -> dict:
    from qmoe.suite import process_group

    payload = {"backend": process_group.reference_of(backend_cls), "device": device, "bench": bench}
    ranks = process_group.pool(backend_cls, bench.ep_size, device).call(torch_rank_task, payload)
    return summarize_torch(bench, ranks)


# -- jax_prequant: in this process, over N devices ----------------------------------------------------------
def sent_bytes(operands: list[tuple[str, tuple[int, ...]]], devices: int) -> dict:
    """All-to-all bytes of a jax program from its operands (dtype, per-device shape): each device sends its
    operands whole, 1/N of each to itself (tiled, equal blocks), the rest off-device."""
    per_device = sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for dtype, shape in operands)
    return {"all_to_all_bytes_total": devices * per_device,
            "all_to_all_bytes_off_rank": devices * per_device * (devices - 1) // devices}


def jax_stage_seconds(backend, sharded, x: np.ndarray, timed, tol, bench_id: str, y_program: np.ndarray) -> dict:
    """Stage times of jax_prequant's expert-parallel forward, from its separately jitted stage programs over the
    same mesh (`programs.ep_forward_stages`: route, dispatch, experts, combine, shared), each timed alone on
    device-resident inputs (``timed``: warm-up rounds, then rounds each ending in ``block_until_ready``).

    One figure per stage (a one-element list under ``stage_seconds_per_rank``): each stage is one SPMD program
    over all N devices, timed until every device's share is ready (the slowest device). They are a
    decomposition beside the timed one-program layer, not a split of it: their sum exceeds the fused
    program's forward time by N launches and the materialized intermediates between them. The composed
    stages' output is checked against the one program's (``y_program``); raises AssertionError if apart."""
    import jax

    from qmoe.implementations.jax_prequant import programs

    x_dev = backend._put_tokens(sharded, x)
    plan = backend._plan_for(sharded, x_dev)
    y_stages, stages = programs.ep_forward_stages(sharded.params, sharded.frozen, x_dev, plan)
    y_stages = np.asarray(y_stages, dtype=np.float64)
    error = _relative_row_error(y_stages, y_program)
    assert error <= tol.tight, f"{bench_id}: the composed stage programs differ from the one program by {error:.3e}"
    seconds = {name: [_median(timed(lambda run=run: jax.block_until_ready(run())))] for name, run in stages.items()}
    _, received = stages["dispatch"]()
    rows_bytes = sum(value.nbytes for value in received) / plan.ep_size  # each device's dispatch payload
    off_rank = rows_bytes * (plan.ep_size - 1) / plan.ep_size
    dispatch_s = seconds["dispatch"][0]
    return {"stage_seconds_per_rank": seconds, "stage_seconds_sum": sum(v[0] for v in seconds.values()),
            "stage_note": "forward stages as separate programs over all devices (one figure each, the slowest "
                          "device); the timed layer is the one fused program",
            "stages_error_vs_program": error, "stages_equal_program": bool(np.array_equal(y_stages, y_program)),
            "dispatch_gb_per_s": off_rank / dispatch_s / 1e9 if dispatch_s else None}


def measure_jax(backend_cls: type, device: str | None, bench: EPBench) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from qmoe.implementations.jax_prequant.expert_parallel import AXIS, _shard_map
    from qmoe.suite.bounds import routing_undecided
    from qmoe.suite.tolerances import tolerance

    spec = bench.shape.spec(bench.top_k)
    params = workload.make_params(bench.shape, bench.routing, bench.dtype)
    item = workload.make_inputs(bench.shape, bench.dtype, 1)[0]
    passes = "forward" if bench.pass_ == "forward" else "backward"
    n = bench.ep_size

    def timed(step) -> list[float]:
        for _ in range(bench.warmup):
            step()
        times = []
        for _ in range(bench.rounds):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return times

    # A one-device layer that does not fit is a finding, not a failure: sharding may make it fit (on the
    # H200, jax_prequant's capacity padding on zipf routing asked one device for 42-63 GiB). The sharded
    # layer is then checked against the reference instead of against one device.
    one_backend = backend_cls(device)
    one_s: list[float] | None = None
    r_one = None
    one_refusal = None
    try:
        one = one_backend.prepare(spec, params, bench.scheme, bench.dtype)
        one_s = timed(one_backend.benchmark_step(one, item.x, passes, item.dy))
        r_one = one_backend.forward(one, item.x)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        one_s, r_one = None, None
        one_refusal = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    one = None  # the one-device layer's buffers go before the sharded layer is built
    undecided = routing_undecided(spec, params, item.x)
    tol = tolerance(bench.scheme, bench.dtype, "expert_parallel")
    info: dict[str, Any] = {}
    outputs = {}
    for dispatch in ("float", "int8"):
        backend = backend_cls(device, ep_dispatch=dispatch)
        sharded = backend.prepare(spec, params, bench.scheme, bench.dtype, ep_size=n)
        sharded_s = timed(backend.benchmark_step(sharded, item.x, passes, item.dy))
        result = backend.forward(sharded, item.x)
        operands = backend.all_to_all_operands(sharded, item.x, passes, item.dy)
        _, capacity = sharded.sizes[bench.shape.tokens]
        mesh = sharded.plan.mesh
        seconds = _median(sharded_s)
        stages = jax_stage_seconds(backend, sharded, item.x, timed, tol, bench.id, result.y)
        info[dispatch] = {"seconds_per_round": sharded_s, "seconds_median": seconds,
                          "tokens_per_s": bench.shape.tokens / seconds, **stages,
                          "dispatch_capacity_rows": capacity,
                          "all_to_all_operands_per_device": [[dtype, list(shape)] for dtype, shape in operands],
                          **sent_bytes(operands, n)}
        if dispatch == "float" and r_one is None:
            info[dispatch].update(check_against_reference(bench.id, spec, params, bench.scheme, item.x, item.dy,
                                                          result.y))
        elif dispatch == "float":
            info[dispatch].update(compare_to_one_device(bench.id, tol, result.y, r_one.y, undecided,
                                                        result.expert_ids, r_one.expert_ids))
        elif r_one is not None:  # int8 dispatch is checked against float dispatch (int8_check); its distance
            info[dispatch]["output_error_vs_one_device"] = _relative_row_error(result.y, r_one.y)
        outputs[dispatch] = result.y
        del sharded
    info["int8_check"] = check_int8_dispatch(bench.scheme, bench.dtype, outputs["float"], outputs["int8"])
    info["int8_dispatch_saving"] = {
        "bytes": 1 - info["int8"]["all_to_all_bytes_off_rank"] / max(info["float"]["all_to_all_bytes_off_rank"], 1),
        "dispatch_seconds": 1 - max(info["int8"]["stage_seconds_per_rank"]["dispatch"])
        / max(info["float"]["stage_seconds_per_rank"]["dispatch"]),
        "layer_seconds": 1 - info["int8"]["seconds_median"] / info["float"]["seconds_median"]}

    # a plain all-to-all of one float dispatch's row bytes (N x N blocks of `capacity` rows), equal blocks
    width = np.dtype(np.float32).itemsize if bench.dtype == "float32" else 2
    row_bytes = n * info["float"]["dispatch_capacity_rows"] * bench.shape.hidden * width
    off_rank = (n - 1) / n
    plain = jax.device_put(jnp.zeros((n * max(1, -(-row_bytes // n)),), jnp.uint8).reshape(n, -1).repeat(n, 0),
                           jax.sharding.NamedSharding(mesh, P(AXIS)))
    exchange = jax.jit(_shard_map(lambda v: jax.lax.all_to_all(v, AXIS, 0, 0, tiled=True), mesh, (P(AXIS),),
                                  P(AXIS)))
    plain_s = timed(lambda: jax.block_until_ready(exchange(plain)))
    plain_median = _median(plain_s)
    info["plain_all_to_all"] = {"bytes_per_rank": int(plain.nbytes // n), "seconds_median": plain_median,
                                "gb_per_s": plain.nbytes / n * off_rank / plain_median / 1e9}
    if one_s is None:
        info["one_device"] = {"seconds_median": None, "tokens_per_s": None, "error": one_refusal}
        info["speedup_vs_one_device"] = None
        return info
    one_seconds = _median(one_s)
    info["one_device"] = {"seconds_median": one_seconds, "tokens_per_s": bench.shape.tokens / one_seconds,
                          "seconds_per_round": one_s}
    info["speedup_vs_one_device"] = one_seconds / info["float"]["seconds_median"]
    return info


def measure(backend_cls: type, device: str | None, bench: EPBench) -> dict:
    """The measurement for a backend by its capabilities (processes: torch.distributed; else in-process)."""
    if backend_cls.capabilities.expert_parallel_processes:
        info = measure_torch(backend_cls, device, bench)
    else:
        info = measure_jax(backend_cls, device, bench)
    info.update(kind="expert_parallel", ep_backend=backend_cls.name, scheme=bench.scheme, top_k=bench.top_k,
                ep_size=bench.ep_size, dtype=bench.dtype, pass_name=bench.pass_, routing=bench.routing,
                **{f"shape_{k}": v for k, v in bench.shape.describe().items()})
    return info
