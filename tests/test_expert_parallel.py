"""Expert parallelism outside the conformance grid: the process pool's failure handling (a rank's error
comes back with its traceback, a dead rank fails the call, neither hangs), torch_triton's expert-parallel
entry points, the int8 dispatch's packing and its check, and the expert-parallel benchmark end to end on
CPU for both frameworks at a tiny shape (what CI runs; GPUs run the same module over NCCL).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("torch", reason="the process pool's ranks are torch.distributed ranks")
pytest.importorskip("triton", reason="torch_triton needs triton")

from qmoe.implementations.torch_triton import TorchTritonBackend  # noqa: E402
from qmoe.reference.spec import SpecError  # noqa: E402
from qmoe.suite import process_group  # noqa: E402
from qmoe.suite.benchmarks import expert_parallel as ep_bench  # noqa: E402
from qmoe.suite.cases import CASES  # noqa: E402


# -- tasks run in the pool's ranks ------------------------------------------------------------------------------
def fail_on_rank_one(payload: dict) -> int:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError(f"planted failure {payload['tag']}")
    dist.barrier()  # rank 0 waits in a collective that rank 1 never joins
    return dist.get_rank()


def exit_on_rank_one(payload: dict) -> int:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        os._exit(3)
    return dist.get_rank()


def rank_and_size(payload: dict) -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


# -- the pool ---------------------------------------------------------------------------------------------------
def test_pool_runs_a_task_on_every_rank_in_order():
    pool = process_group.pool(TorchTritonBackend, 2, None)
    assert pool.call(rank_and_size, {}) == [(0, 2), (1, 2)]
    assert process_group.pool(TorchTritonBackend, 2, None) is pool  # one pool per N for the session


def test_a_rank_error_fails_the_call_with_its_traceback_and_no_hang():
    pool = process_group.pool(TorchTritonBackend, 2, None)
    with pytest.raises(process_group.WorkerError, match=r"(?s)rank 1 of 2 failed.*ValueError: planted failure x7"):
        pool.call(fail_on_rank_one, {"tag": "x7"}, timeout=60)
    assert not pool.alive  # torn down: rank 0 was blocked in a collective
    fresh = process_group.pool(TorchTritonBackend, 2, None)
    assert fresh is not pool and fresh.call(rank_and_size, {}) == [(0, 2), (1, 2)]


def test_a_dead_rank_fails_the_call():
    pool = process_group.pool(TorchTritonBackend, 2, None)
    with pytest.raises(process_group.WorkerError, match="ranks exited"):
        pool.call(exit_on_rank_one, {}, timeout=60)


def test_worker_environment_is_explicit():
    cpu = process_group.worker_environment("cpu")
    assert cpu["TRITON_INTERPRET"] == "1" and cpu["OMP_NUM_THREADS"] == "1"
    assert process_group.worker_environment("cuda") == {"NCCL_NVLS_ENABLE": "0"}


# -- torch_triton entry points ----------------------------------------------------------------------------------
def test_sharded_prepare_needs_a_process_group():
    data = CASES["balanced"].build("float32")
    with pytest.raises(SpecError, match="torch.distributed initialized with 2 ranks"):
        TorchTritonBackend("cpu").prepare(data.spec, data.params, "none", "float32", ep_size=2)


def test_int8_dispatch_rows_carry_the_quantizers_codes_and_scales():
    import torch

    from qmoe.implementations.torch_triton import expert_parallel
    from qmoe.implementations.torch_triton.kernels.quant import quantize_rows

    rows = torch.tensor(CASES["zero_rows_outliers"].build("float32").x, dtype=torch.float32)
    packed = expert_parallel.pack_int8_rows(rows)
    codes, scale = quantize_rows(rows)
    assert packed.dtype == torch.int8 and packed.shape == (rows.shape[0], rows.shape[1] + 4)
    unpacked = expert_parallel.unpack_int8_rows(packed, torch.float32)
    assert torch.equal(unpacked, codes.to(torch.float32) * scale[:, None])
    assert torch.all((unpacked - rows).abs() <= scale[:, None] / 2 * (1 + 1e-6))  # half a step per element


def test_int8_dispatch_check_holds_its_bounds():
    rng = np.random.default_rng(0)
    y = rng.standard_normal((16, 8))
    ep_bench.check_int8_dispatch("int8_routed_prequant", "float32", y, y * (1 + 1e-7))
    with pytest.raises(AssertionError, match="must equal float dispatch"):
        ep_bench.check_int8_dispatch("int8_routed_prequant", "float32", y, y * (1 + 1e-3))
    with pytest.raises(AssertionError, match="must equal float dispatch"):  # not level 6's per-token 6e-2:
        ep_bench.check_int8_dispatch("int8_routed_prequant", "bfloat16", y, y * (1 + 3e-2))  # same codes
    floor = ep_bench.int8_dispatch_floor_db("float32")
    ep_bench.check_int8_dispatch("none", "float32", y, y + y * 10 ** (-(floor + 3) / 20))
    with pytest.raises(AssertionError, match="SQNR"):
        ep_bench.check_int8_dispatch("none", "float32", y, y + y * 10 ** (-(floor - 3) / 20))


def test_routing_undecided_marks_only_near_ties_at_the_top_k_boundary():
    from qmoe.reference import MoEParams, MoESpec
    from qmoe.suite.bounds import routing_undecided

    spec = MoESpec(hidden=8, ffn=8, experts=8, top_k=2)
    params = MoEParams.random(spec, seed=0)
    params.router = np.eye(8)  # logits = x
    x = np.zeros((4, 8))
    x[0, :3] = [3.0, 2.0, 2.0 - 1e-7]  # 2nd vs 3rd: within float32 rounding of logits of ~3
    x[1, :3] = [3.0, 2.0, 2.0]         # an exact tie: the lower index wins, decided
    x[2, :3] = [3.0, 2.0, 1.0]         # a clear margin
    x[3, :3] = [2.0, 2.0 - 1e-7, 1.0]  # a near-tie inside the selection: the same experts either way
    assert routing_undecided(spec, params, x).tolist() == [True, False, False, False]


def test_compare_to_one_device_leaves_out_only_undecided_rows():
    from qmoe.suite.tolerances import tolerance

    rng = np.random.default_rng(3)
    tol = tolerance("none", "bfloat16", "expert_parallel")
    y = rng.standard_normal((6, 16))
    ids = np.tile(np.arange(2), (6, 1))
    undecided = np.array([False, False, True, False, False, False])
    flipped, flipped_ids = y.copy(), ids.copy()
    flipped[2] += 0.2 * rng.standard_normal(16)  # a near-tie token took its 9th expert on one side
    flipped_ids[2, 1] = 5
    info = ep_bench.compare_to_one_device("case", tol, flipped, y, undecided, flipped_ids, ids)
    assert info["routing_undecided_tokens"] == 1 and info["routing_differs_tokens"] == 1
    assert info["output_error_vs_one_device"] == 0.0 and info["output_error_undecided_rows"] > tol.tight
    dropped = y.copy()
    dropped[4] *= 0.9  # a lost assignment on a decided token: what the bound is there for
    with pytest.raises(AssertionError, match="differs from one device by 1.000e-01"):
        ep_bench.compare_to_one_device("case", tol, dropped, y, undecided, ids, ids)
    moved = ids.copy()
    moved[0, 0] = 7  # a selection that differs beyond rounding
    with pytest.raises(AssertionError, match="routing differs from one device at 1 tokens"):
        ep_bench.compare_to_one_device("case", tol, y, y, undecided, moved, ids)
    swapped = ids.copy()
    swapped[0] = swapped[0, ::-1]  # the same two experts in the other slot order (H200 x4: token 7283)
    assert ep_bench.compare_to_one_device("case", tol, y, y, undecided, swapped, ids)["routing_differs_tokens"] == 0


# -- the benchmark on CPU ---------------------------------------------------------------------------------------
def _bench(scheme: str) -> ep_bench.EPBench:
    return ep_bench.EPBench(ep_bench.EP_CPU_TINY, 2, scheme, 2, "float32", rounds=2, warmup=1)


def test_expert_parallel_benchmark_torch_on_cpu():
    info = ep_bench.measure(TorchTritonBackend, None, _bench("none"))
    for dispatch in ("float", "int8"):
        record = info[dispatch]
        assert set(record["stage_seconds_per_rank"]) == {"route", "dispatch", "experts", "combine"}
        assert all(len(v) == 2 and min(v) > 0 for v in record["stage_seconds_per_rank"].values())
        assert record["all_to_all_bytes_off_rank"] > 0 and record["tokens_per_s"] > 0
    assert info["float"]["output_error_vs_one_device"] <= 1e-5
    hidden = ep_bench.EP_CPU_TINY.hidden
    rows_float = info["float"]["sent_bytes_per_rank"]["dispatch_rows"]
    rows_int8 = info["int8"]["sent_bytes_per_rank"]["dispatch_rows"]
    for (_, f_total), (_, i_total) in zip(rows_float, rows_int8):  # (H + 4) bytes per row instead of 4 H
        assert i_total * 4 * hidden == f_total * (hidden + 4)
    assert info["int8_dispatch_saving"]["bytes"] > 0
    assert info["int8_check"]["int8_dispatch_check"] == "sqnr"
    assert info["plain_all_to_all"]["gb_per_s"] > 0 and info["one_device"]["tokens_per_s"] > 0


@pytest.mark.parametrize("scheme", ("none", "int8_routed_prequant"))
def test_expert_parallel_benchmark_jax_on_cpu(scheme):
    pytest.importorskip("jax")
    from qmoe.implementations.jax_prequant import JaxPrequantBackend

    info = ep_bench.measure(JaxPrequantBackend, None, _bench(scheme))
    assert info["float"]["output_error_vs_one_device"] <= 1e-5
    assert info["float"]["all_to_all_bytes_total"] > 0 and info["plain_all_to_all"]["gb_per_s"] > 0
    assert info["ep_backend"] == "jax_prequant" and info["ep_size"] == 2
    for dispatch in ("float", "int8"):  # the forward's stage programs, one figure each, composed exactly
        record = info[dispatch]
        assert set(record["stage_seconds_per_rank"]) == {"route", "dispatch", "experts", "combine"}
        assert all(len(v) == 1 and v[0] > 0 for v in record["stage_seconds_per_rank"].values())
        assert record["stages_equal_program"] and record["dispatch_gb_per_s"] > 0
    assert info["int8_dispatch_saving"]["dispatch_seconds"] is not None
    hidden = ep_bench.EP_CPU_TINY.hidden
    sent = {d: [(dtype, tuple(shape)) for dtype, shape in info[d]["all_to_all_operands_per_device"]]
            for d in ("float", "int8")}
    slots = 2 * info["float"]["dispatch_capacity_rows"]
    ids, rows, codes, scale = ("int32", (slots,)), ("float32", (slots, hidden)), ("int8", (slots, hidden)), \
        ("float32", (slots, 1))
    assert sent["int8"] == [ids, codes, scale, rows]  # expert ids, codes and scales out; outputs back
    assert info["int8"]["all_to_all_bytes_total"] == 2 * slots * (4 + hidden + 4 + 4 * hidden)
    if scheme == "none":  # float rows out, float outputs back; int8 dispatch saves 3H - 4 of 8H + 4 bytes
        assert sent["float"] == [ids, rows, rows]
        assert info["int8_dispatch_saving"]["bytes"] == pytest.approx((3 * hidden - 4) / (8 * hidden + 4))
        assert info["int8_check"]["int8_dispatch_check"] == "sqnr"
    else:  # the scheme's own dispatch already sends the codes its experts quantize: nothing left to save
        assert sent["float"] == sent["int8"] and info["int8_dispatch_saving"]["bytes"] == 0
        assert info["int8_check"]["int8_dispatch_check"] == "tight" and info["int8_check"]["int8_dispatch_error"] == 0


def test_expert_parallel_benchmark_when_one_device_does_not_fit(monkeypatch):
    """A one-device layer that runs out of memory (jax_prequant's capacity padding on zipf, H200) leaves the
    case a result: the sharded layer is timed and checked against the float64 reference instead, the
    table says why there is no speed-up; an error that is not out-of-memory still fails the case."""
    pytest.importorskip("jax")
    from qmoe.implementations.jax_prequant import JaxPrequantBackend
    from qmoe.suite.benchmarks import ep_tables

    prepare = JaxPrequantBackend.prepare

    def one_device_too_small(self, spec, params, scheme, dtype, ep_size=1):
        if ep_size == 1:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 42.00GiB")
        return prepare(self, spec, params, scheme, dtype, ep_size)

    monkeypatch.setattr(JaxPrequantBackend, "prepare", one_device_too_small)
    info = ep_bench.measure(JaxPrequantBackend, None, _bench("none"))
    assert info["speedup_vs_one_device"] is None and "RESOURCE_EXHAUSTED" in info["one_device"]["error"]
    check = info["float"]["output_check_vs_reference"]
    assert check["sqnr_db"] > check["floor_db"] and check["rows"] > 0
    assert "output_error_vs_one_device" not in info["int8"]
    (row,) = ep_tables.layer_table([info])
    assert "one device: out of memory" in row

    def broken(self, spec, params, scheme, dtype, ep_size=1):
        raise ValueError("not a memory problem")

    monkeypatch.setattr(JaxPrequantBackend, "prepare", broken)
    with pytest.raises(ValueError, match="not a memory problem"):
        ep_bench.measure(JaxPrequantBackend, None, _bench("none"))
