"""Checks specific to the `jax_prequant` backend (the conformance suite covers its numerics on the
default formulation): what the compiled program does with the weights (no weight rounding in the
int8_routed_prequant step, int32 accumulation), the prequant custom VJP rule, which grouped-matmul
formulation and XLA options each platform gets, the padded (GPU) and pallas formulations' numerics on CPU,
static-capacity sizing, that expert parallelism really shards and exchanges, stage timing and the
benchmark step.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import numpy as np
import pytest

pytest.importorskip("jax", reason="the jax_prequant backend needs jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from qmoe import reference  # noqa: E402
from qmoe.implementations.jax_prequant import JaxPrequantBackend, JaxPrequantPallasBackend  # noqa: E402
from qmoe.implementations.jax_prequant import env as _jax_env  # noqa: E402
from qmoe.implementations.jax_prequant import expert_parallel as _jax_ep
from qmoe.implementations.jax_prequant import programs as _jax_programs
from qmoe.implementations.jax_prequant.grouped import bucket_capacity, int8_grouped_dot, place_rows, take_rows  # noqa: E402
from qmoe.implementations.jax_prequant.layer import float_dense_dot  # noqa: E402
from qmoe.implementations.jax_prequant.quant import quantize_per_expert, quantize_rows  # noqa: E402
from qmoe.reference import MoEParams, MoESpec  # noqa: E402
from qmoe.suite.bounds import CaseBounds  # noqa: E402
from qmoe.suite.cases import CASES  # noqa: E402
from qmoe.suite.checks import ConformanceError, assert_close, assert_exactly_zero  # noqa: E402
from qmoe.suite.tolerances import tolerance  # noqa: E402

pytestmark = pytest.mark.backend("jax_prequant")

SCHEMES = JaxPrequantBackend.capabilities.schemes
# Weight shapes chosen so that no activation tensor of the step has as many elements:
# w13 [4, 24, 80] (7680 elements), w2 [4, 40, 24] (3840).
HLO_SPEC = MoESpec(hidden=24, ffn=40, experts=4, top_k=2)
WEIGHT_ELEMENTS = {"w13": 4 * 24 * 80, "w2": 4 * 40 * 24}


def _layer(spec: MoESpec, tokens: int, seed: int = 0) -> tuple[MoEParams, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = MoEParams.random(spec, seed=seed).map(lambda a: a.astype(np.float32).astype(np.float64))
    x = rng.standard_normal((tokens, spec.hidden)).astype(np.float32).astype(np.float64)
    dy = rng.standard_normal((tokens, spec.hidden)).astype(np.float32).astype(np.float64)
    return params, x, dy


def _step_program(spec: MoESpec, scheme: str, dtype: str, grouped: str | None, tokens: int, **options: str
                  ) -> tuple[object, tuple]:
    """(plan, arguments) of the backend's forward+backward program for ``spec`` on CPU (``options``: the
    backend's other choices)."""
    backend = JaxPrequantBackend("cpu", grouped=grouped, **options)
    params, x, dy = _layer(spec, tokens=tokens)
    prepared = backend.prepare(spec, params, scheme, dtype)
    x_dev = backend._put_tokens(prepared, x)
    plan = backend._plan_for(prepared, x_dev)
    return plan, (prepared.params, prepared.frozen, x_dev, backend._put_tokens(prepared, dy), np.float32(0.05))


def _step_jaxpr(plan, args):
    return jax.make_jaxpr(lambda *a: _jax_programs.forward_backward(*a, plan=plan))(*args)


@functools.cache
def _compiled_step(scheme: str, grouped: str) -> tuple[object, str]:
    """(jaxpr, optimized HLO text) of the forward+backward program for HLO_SPEC (cached: several
    tests inspect the same program)."""
    plan, args = _step_program(HLO_SPEC, scheme, "float32", grouped, tokens=10)
    hlo = _jax_programs.forward_backward.lower(*args, plan=plan).compile().as_text()
    return _step_jaxpr(plan, args), hlo


def _sub_jaxprs(value):
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def _jaxpr_eqns(jaxpr, *primitives: str):
    """Every equation of one of ``primitives`` anywhere in the closed jaxpr (nested jaxprs included)."""
    stack = [jaxpr.jaxpr]
    while stack:
        current = stack.pop()
        for eqn in current.eqns:
            if eqn.primitive.name in primitives:
                yield eqn
            for param in eqn.params.values():
                stack.extend(_sub_jaxprs(param))


def _jaxpr_round_sizes(jaxpr) -> list[int]:
    """Element counts of every `round` output anywhere in the jaxpr (nested jaxprs included)."""
    return [int(np.prod(v.aval.shape)) for eqn in _jaxpr_eqns(jaxpr, "round") for v in eqn.outvars]


def _hlo_round_sizes(hlo: str) -> list[int]:
    """Element counts of every round-nearest-even instruction in optimized HLO text."""
    shapes = re.findall(r"=\s*[a-z0-9]+\[([0-9,]*)\][^ ]*\s+round-nearest-even\(", hlo)
    return [int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes]


@pytest.mark.parametrize("grouped", _jax_env.FORMULATIONS)
def test_prequant_step_never_rounds_weights(grouped):
    """MOE-I8-019: the prequant forward+backward quantizes only activations and cotangents."""
    jaxpr, hlo = _compiled_step("int8_routed_prequant", grouped)
    for where, sizes in (("jaxpr", _jaxpr_round_sizes(jaxpr)), ("optimized HLO", _hlo_round_sizes(hlo))):
        assert sizes, f"{where}: no rounding at all; the activations should be quantized"
        for name, elements in WEIGHT_ELEMENTS.items():
            assert elements not in sizes, f"{where}: a round over a {name}-shaped tensor ({elements} elements)"


@pytest.mark.parametrize("grouped", _jax_env.FORMULATIONS)
def test_in_step_scheme_rounds_weights(grouped):
    """Positive control for the check above: int8_routed quantizes both weights in the step."""
    jaxpr, hlo = _compiled_step("int8_routed", grouped)
    for where, sizes in (("jaxpr", _jaxpr_round_sizes(jaxpr)), ("optimized HLO", _hlo_round_sizes(hlo))):
        for name, elements in WEIGHT_ELEMENTS.items():
            assert elements in sizes, f"{where}: int8_routed should round its {name} in the step"


@pytest.mark.parametrize("grouped", _jax_env.FORMULATIONS)
def test_int8_products_accumulate_in_int32(grouped):
    """Every int8 x int8 product in the prequant step asks for an int32 result."""
    jaxpr, _ = _compiled_step("int8_routed_prequant", grouped)
    products = [str(eqn.outvars[0].aval.dtype) for eqn in _jaxpr_eqns(jaxpr, "dot_general", "ragged_dot_general")
                if {str(v.aval.dtype) for v in eqn.invars[:2]} == {"int8"}]
    # two forward projections, two input-gradient projections through the int8 weights
    assert len(products) == 4 and set(products) == {"int32"}, products


def _int8_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy per-row symmetric int8 (DESIGN.md): scale amax / 127 (1 for a zero row), round half even."""
    amax = np.abs(values).max(axis=-1, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    return np.clip(np.rint(values / scale), -127, 127), scale


@pytest.mark.parametrize("grouped", _jax_env.FORMULATIONS)
def test_prequant_custom_vjp(grouped):
    """The custom VJP of int8_routed_prequant on one grouped projection (logbook MOE-I8-023/024):
    grad_lhs = (q_g q_w[e]^T) s_g s_w[e], the per-row-quantized cotangent against the transposed
    pre-quantized codes; grad_rhs = x^T g per expert from the un-quantized float rows (the float
    grouped-matmul surrogate). The straight-through rule's input gradient, g (s_w q_w)^T, must differ:
    otherwise this test could not tell the rules apart."""
    rng = np.random.default_rng(1)
    groups, k, n = 3, 16, 12
    row_group = np.array([0, 2, 0, 0, 2, 2, 0, 2, 2, 0, 0], np.int32)  # expert 1 gets no row
    placement = place_rows(jnp.asarray(row_group), jnp.ones(row_group.shape, bool), groups, grouped, capacity=8,
                           interpret=True)  # the pallas kernels run interpreted on CPU
    x = take_rows(jnp.asarray(rng.standard_normal((row_group.size, k)), jnp.float32), placement.source)
    w = jnp.asarray(rng.standard_normal((groups, k, n)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((x.shape[0], n)), jnp.float32)
    w_codes, w_scale = quantize_per_expert(w)
    x_codes, x_scale = quantize_rows(x)
    layout = placement.layout

    def projection(rule):
        dot = int8_grouped_dot(rule, "float32")
        return lambda x_, w_: dot(x_, x_codes, x_scale, w_, w_codes, w_scale, jnp.swapaxes(w_codes, 1, 2), layout)

    _, pullback = jax.vjp(projection("prequant_vjp"), x, w)
    dx, dw = (np.asarray(a, np.float64) for a in pullback(g))
    _, ste_pullback = jax.vjp(projection("ste"), x, w)
    ste_dx = np.asarray(ste_pullback(g)[0], np.float64)

    slot_group = np.asarray(layout.row_group)
    filled = np.asarray(placement.source) < row_group.size  # padded slots hold no row
    g64, x64 = np.asarray(g, np.float64), np.asarray(x, np.float64)
    g_codes, g_scale = _int8_codes(g64)
    codes, scale = np.asarray(w_codes, np.float64), np.asarray(w_scale, np.float64).reshape(-1)
    expected_dx = np.stack([g_codes[m] @ codes[slot_group[m]].T * g_scale[m, 0] * scale[slot_group[m]]
                            for m in range(x.shape[0])])
    expected_dw = np.stack([x64[filled & (slot_group == e)].T @ g64[filled & (slot_group == e)]
                            for e in range(groups)])
    assert_close(dx[filled], expected_dx[filled], 1e-5, "grad_lhs")
    assert_close(dw[[0, 2]], expected_dw[[0, 2]], 1e-5, "grad_rhs", by_row=False)
    assert_exactly_zero(dw[1], "grad_rhs of the expert without rows")
    with pytest.raises(ConformanceError):
        assert_close(ste_dx[filled], expected_dx[filled], 1e-5, "straight-through grad_lhs")


def test_formulation_by_platform(monkeypatch):
    monkeypatch.delenv(_jax_env.GROUPED_ENV, raising=False)
    assert _jax_env.select_formulation("gpu") == "padded"
    assert _jax_env.select_formulation("cuda") == "padded"
    assert _jax_env.select_formulation("cpu") == "ragged"
    assert _jax_env.select_formulation("tpu") == "ragged"
    assert _jax_env.select_formulation("gpu", "ragged") == "ragged"
    monkeypatch.setenv(_jax_env.GROUPED_ENV, "padded")
    assert _jax_env.select_formulation("cpu") == "padded"
    with pytest.raises(ValueError, match="not one of ragged, padded, pallas"):
        _jax_env.select_formulation("cpu", "dense")


def test_pallas_formulation_only_when_asked_for(monkeypatch):
    """``pallas`` is never the platform's formulation (a padded plan becomes pallas only for a skewed
    routing: `test_skewed_routing_takes_the_padded_default_to_pallas`); asked for, it runs on GPUs and,
    interpreted, on CPU; on a TPU it raises instead of falling back to another formulation."""
    monkeypatch.delenv(_jax_env.GROUPED_ENV, raising=False)
    assert "pallas" not in {_jax_env.select_formulation(p) for p in ("cpu", "gpu", "cuda", "rocm", "tpu")}
    assert _jax_env.select_formulation("gpu", "pallas") == _jax_env.select_formulation("cpu", "pallas") == "pallas"
    monkeypatch.setenv(_jax_env.GROUPED_ENV, "pallas")
    assert _jax_env.select_formulation("cuda") == "pallas"
    with pytest.raises(ValueError, match="pallas grouped formulation runs Triton kernels on GPUs"):
        _jax_env.select_formulation("tpu")
    assert _jax_env.pallas_interpret("cpu") and not _jax_env.pallas_interpret("cuda")


def test_backend_formulation_choice(monkeypatch):
    monkeypatch.delenv(_jax_env.GROUPED_ENV, raising=False)
    params, _, _ = _layer(HLO_SPEC, 4)
    assert JaxPrequantBackend("cpu").prepare(HLO_SPEC, params, "none", "float32").plan.formulation == "ragged"
    forced = JaxPrequantBackend("cpu", grouped="padded").prepare(HLO_SPEC, params, "none", "float32")
    assert forced.plan.formulation == "padded"
    monkeypatch.setenv(_jax_env.GROUPED_ENV, "padded")
    assert JaxPrequantBackend("cpu").prepare(HLO_SPEC, params, "none", "float32").plan.formulation == "padded"
    pallas = JaxPrequantPallasBackend("cpu").prepare(HLO_SPEC, params, "none", "float32").plan
    assert JaxPrequantPallasBackend.name == "jax_prequant_pallas" and pallas.formulation == "pallas"
    assert pallas.interpret_kernels, "on CPU the pallas kernels must run interpreted"
    monkeypatch.setenv(_jax_env.GROUPED_ENV, "pallas")
    assert JaxPrequantBackend("cpu").prepare(HLO_SPEC, params, "none", "float32").plan.formulation == "pallas"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_int8_programs_on_gpu_use_cublas_options(scheme):
    """Plans with int8 GEMMs on a GPU compile with `INT8_GPU_OPTIONS` (cuBLASLt int8 GEMMs, not XLA's
    Triton GEMM fusions); bfloat16/float32-only plans and every CPU plan keep XLA's defaults."""
    assert _jax_env.INT8_GPU_OPTIONS == {"xla_gpu_enable_triton_gemm": False}
    spec = MoESpec(hidden=8, ffn=8, experts=2, top_k=1, shared_ffn=8)
    params, _, _ = _layer(spec, 4)
    plan = JaxPrequantBackend("cpu").prepare(spec, params, scheme, "float32").plan
    assert plan.platform == "cpu" and not plan.int8_gemms_on_gpu
    assert _jax_programs.forward.for_plan(plan) is _jax_programs.forward.default
    on_gpu = dataclasses.replace(plan, platform="gpu")
    assert on_gpu.int8_gemms_on_gpu == (scheme != "none")
    expected = _jax_programs.forward.int8_gpu if scheme != "none" else _jax_programs.forward.default
    assert _jax_programs.forward.for_plan(on_gpu) is expected


def test_bucket_capacity():
    for rows in (1, 15, 16, 17, 100, 1000, 1100, 4097, 70000):
        bucket = bucket_capacity(rows)
        assert bucket >= rows and bucket % 16 == 0
        assert bucket <= max(16, -(-int(rows * 1.03125) // 16) * 16 + 16), (rows, bucket)
    assert bucket_capacity(1100) == 1120
    assert bucket_capacity(4419) == 4480  # the H200 logbook's fullest expert at top-8 ("balanced" routing)


def _check_against_reference(backend, prepared, case_data, scheme, dtype="float32") -> None:
    """Forward and backward tight against the reference at the backend's effective weights."""
    spec, x, dy = case_data.spec, case_data.x, case_data.dy
    eff = MoEParams(**backend.effective_weights(prepared))
    result = backend.forward(prepared, x)
    expected = reference.forward(spec, eff, x, scheme, weights_are_effective=True)
    np.testing.assert_array_equal(result.expert_ids, expected.expert_ids)
    bound = CaseBounds(tolerance(scheme, dtype, "forward"), spec, eff, x, scheme, dtype).output()
    assert_close(result.y, expected.y, bound.relative, "forward.y", extra=bound.absolute)
    grads = backend.backward(prepared, x, dy, balance_coeff=0.05)
    expected_grads = reference.backward(spec, eff, x, dy, scheme, 0.05, weights_are_effective=True)
    bounds = CaseBounds(tolerance(scheme, dtype, "backward"), spec, eff, x, scheme, dtype, dy=dy)
    for name, value in expected_grads.items():
        if name in ("w13", "w2"):
            for e in range(spec.experts):
                if np.any(value[e]):
                    bound = bounds.gradient(name, e)
                    assert_close(grads[name][e], value[e], bound.relative, f"grad.{name}[{e}]", by_row=False,
                                 extra=bound.absolute)
                else:
                    assert_exactly_zero(grads[name][e], f"grad.{name}[{e}]")
        else:
            bound = bounds.gradient(name)
            assert_close(grads[name], value, bound.relative, f"grad.{name}", by_row=(name == "x"), extra=bound.absolute)


#: Each scheme once on the padded formulation, with the cases that stress it: experts with no rows
#: (whole zero capacity blocks), capacity drops, the shared expert (int8 per-channel for int8_dense /
#: int8_all) and top-1 with every token on one expert (one full block, the rest empty).
PADDED_CASES = (("none", "empty_experts"), ("int8_dense", "shared_expert"), ("int8_routed", "capacity_drop"),
                ("int8_all", "shared_expert"), ("int8_routed_prequant", "one_expert"))


@pytest.mark.parametrize(("scheme", "case"), PADDED_CASES)
def test_padded_formulation_matches_reference(scheme, case):
    """The GPU formulation, run on CPU: same numerics as the reference, dropless and with capacity."""
    backend = JaxPrequantBackend("cpu", grouped="padded")
    data = CASES[case].build("float32")
    prepared = backend.prepare(data.spec, data.params, scheme, "float32")
    _check_against_reference(backend, prepared, data, scheme)


#: Each scheme on the pallas formulation (interpreted on CPU), with the cases that stress a grouped kernel:
#: experts with no rows, all rows on one expert, one token (one row per expert at most), skewed routing,
#: capacity drops (rows past every group) and the shared expert.
PALLAS_CASES = (("none", "empty_experts"), ("int8_dense", "shared_expert"), ("int8_routed", "capacity_drop"),
                ("int8_all", "zipf_skew"), ("int8_routed_prequant", "all_on_one_top2"),
                ("int8_routed_prequant", "one_token"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("scheme", "case"), PALLAS_CASES)
def test_pallas_formulation_matches_reference(scheme, case, dtype):
    """The Pallas grouped kernels (issue 15), interpreted on CPU: forward and backward tight against the
    reference at the backend's effective weights."""
    backend = JaxPrequantBackend("cpu", grouped="pallas")
    data = CASES[case].build(dtype)
    prepared = backend.prepare(data.spec, data.params, scheme, dtype)
    assert prepared.plan.formulation == "pallas"
    _check_against_reference(backend, prepared, data, scheme, dtype)


@pytest.mark.parametrize("scheme", ["int8_routed", "int8_all", "int8_routed_prequant"])
def test_pallas_int8_forward_gets_codes_contracting_their_minor_axis(scheme, monkeypatch):
    """Every int8 product of the pallas formulation contracts the minor axis of both operands ([G, N, K]
    weight codes, ``transpose_rhs``), also when the codes are made in the step: on the H200 the step-quantized
    schemes' [G, K, N] codes ran at a quarter of int8_routed_prequant's rate (`layer.step_codes`)."""
    from qmoe.implementations.jax_prequant import pallas_grouped

    calls, kernel = [], pallas_grouped.grouped_matmul

    def recording(lhs, rhs, group_sizes, **kwargs):
        if lhs.dtype == jnp.int8:
            calls.append(kwargs.get("transpose_rhs", False))
        return kernel(lhs, rhs, group_sizes, **kwargs)

    monkeypatch.setattr(pallas_grouped, "grouped_matmul", recording)
    _jax_programs.forward.clear_cache()
    try:
        backend = JaxPrequantBackend("cpu", grouped="pallas")
        params, x, _ = _layer(HLO_SPEC, tokens=10)
        backend.forward(backend.prepare(HLO_SPEC, params, scheme, "float32"), x)
    finally:
        _jax_programs.forward.clear_cache()
    assert calls and all(calls), f"{scheme}: int8 kernel calls with transpose_rhs={calls}"


def test_padded_capacity_grows_when_outgrown():
    """A cached bucket smaller than the routing needs is detected after the run and the run redone."""
    backend = JaxPrequantBackend("cpu", grouped="padded")
    data = CASES["all_on_one_top2"].build("float32")
    prepared = backend.prepare(data.spec, data.params, "int8_routed_prequant", "float32")
    prepared.sizes[data.x.shape[0]] = (16, 0)  # every token goes to one expert: 33 rows needed
    _check_against_reference(backend, prepared, data, "int8_routed_prequant")
    assert prepared.sizes[data.x.shape[0]][0] >= data.x.shape[0]


def _evenly_routed():
    """256 tokens over 4 experts at top-1, 64 each (token t peaks at feature t mod 4, which only expert
    t mod 4's router column reads): the capacity bucket is exactly the rows routed."""
    spec = MoESpec(hidden=32, ffn=16, experts=4, top_k=1)
    params = MoEParams.random(spec, 3)
    params.router = np.zeros_like(params.router)
    params.router[np.arange(4), np.arange(4)] = 1.0
    rng = np.random.default_rng(4)
    x = 0.1 * rng.standard_normal((256, 32))
    x[np.arange(256), np.arange(256) % 4] += 4.0
    data = dataclasses.make_dataclass("Data", ["spec", "params", "x", "dy"])
    return data(spec, params, x, rng.standard_normal((256, 32)))


def test_skewed_routing_takes_the_padded_default_to_pallas(monkeypatch):
    """Where padded is the platform's default (GPUs; simulated here), a token count whose routing would pad
    more than PADDING_LIMIT and PADDING_MIN_ROWS runs the pallas formulation instead (every token on one
    expert: capacity x experts is experts / top_k times the rows routed), still matching the reference; a
    routing that pads little stays padded; so does one whose padding is under PADDING_MIN_ROWS (the
    conformance cases'); a formulation somebody asked for is never replaced."""
    from qmoe.implementations import jax_prequant as jp

    monkeypatch.delenv(_jax_env.GROUPED_ENV, raising=False)
    monkeypatch.setattr(_jax_env, "select_formulation", lambda platform, override=None: override or "padded")
    backend = JaxPrequantBackend("cpu")
    small = CASES["all_on_one_top2"].build("float32")
    prepared = backend.prepare(small.spec, small.params, "none", "float32")
    assert backend._plan_for(prepared, backend._put_tokens(prepared, small.x)).formulation == "padded"
    monkeypatch.setattr(jp, "PADDING_MIN_ROWS", 0)  # the cases below are small
    for data, expected in ((CASES["all_on_one_top2"].build("float32"), "pallas"), (_evenly_routed(), "padded")):
        prepared = backend.prepare(data.spec, data.params, "int8_routed_prequant", "float32")
        assert prepared.plan.formulation == "padded" and prepared.skewed_formulation == "pallas"
        plan = backend._plan_for(prepared, backend._put_tokens(prepared, data.x))
        capacity = prepared.sizes[data.x.shape[0]][0]
        padding = capacity * plan.experts / (data.x.shape[0] * data.spec.top_k)
        assert plan.formulation == expected, padding
        assert (padding > jp.PADDING_LIMIT) == (expected == "pallas")
        _check_against_reference(backend, prepared, data, "int8_routed_prequant")
    data = CASES["all_on_one_top2"].build("float32")
    asked = JaxPrequantBackend("cpu", grouped="padded").prepare(data.spec, data.params, "none", "float32")
    assert asked.skewed_formulation is None


def test_small_problems_run_xla_fusions_where_the_kernels_are_the_default(monkeypatch):
    """Where the SwiGLU and combine kernels are the platform's default (GPUs; simulated here), a token count
    whose routed h has fewer than KERNEL_MIN_ELEMENTS elements runs XLA's fusions (the kernels' Triton compiles
    are all they cost there: the GPU conformance cases), one at or above it the kernels, still matching the
    reference; kernels somebody asked for run at every size."""
    from qmoe.implementations import jax_prequant as jp

    monkeypatch.delenv(_jax_env.SWIGLU_ENV, raising=False)
    monkeypatch.setattr(_jax_env, "select_swiglu", lambda platform, override=None: override or "pallas")
    data = CASES["capacity_drop"].build("float32")
    backend = JaxPrequantBackend("cpu")
    prepared = backend.prepare(data.spec, data.params, "int8_routed_prequant", "float32")
    assert prepared.plan.swiglu == "pallas" and prepared.small_swiglu == "xla"
    x = backend._put_tokens(prepared, data.x)
    assert backend._plan_for(prepared, x).swiglu == "xla"
    asked = JaxPrequantBackend("cpu", swiglu="pallas").prepare(data.spec, data.params, "int8_routed_prequant",
                                                               "float32")
    assert asked.small_swiglu is None and backend._plan_for(asked, x).swiglu == "pallas"
    monkeypatch.setattr(jp, "KERNEL_MIN_ELEMENTS", data.x.shape[0] * data.spec.top_k * data.spec.ffn)
    plan = backend._plan_for(prepared, x)
    assert plan.swiglu == "pallas" and plan.fused_swiglu and plan.fused_combine
    _check_against_reference(backend, prepared, data, "int8_routed_prequant")


def test_benchmark_step_says_which_plan_runs(monkeypatch):
    """The benchmark's record names the formulation that ran, which a skewed routing changes (padded -> pallas)."""
    monkeypatch.delenv(_jax_env.GROUPED_ENV, raising=False)
    data = CASES["all_on_one_top2"].build("float32")
    backend = JaxPrequantBackend("cpu", grouped="padded")
    prepared = backend.prepare(data.spec, data.params, "int8_routed_prequant", "float32")
    plan = backend.benchmark_step(prepared, data.x, "forward").extra_info["jax_plan"]
    assert plan == {"formulation": "padded", "expert_capacity": prepared.sizes[data.x.shape[0]][0], "swiglu": "xla",
                    "int8_gemm": "xla", "router": "float32"}


def _need_devices(n: int) -> None:
    if len(jax.devices("cpu")) < n:
        pytest.skip(f"needs {n} CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is "
                    "imported (the suite plugin sets it)")


@pytest.mark.parametrize("grouped", ["padded", "pallas"])
def test_expert_parallel_with_uneven_experts_equals_one_device(grouped):
    """EP with the GPU formulations and an expert count that does not divide over the devices (pallas: each
    device's kernels see only its experts' received rows; the rest of the dispatch buffer is the kernels'
    zero tail)."""
    scheme = "int8_routed_prequant"
    _need_devices(2)
    spec = MoESpec(hidden=16, ffn=12, experts=3, top_k=2, shared_ffn=8)
    params, x, dy = _layer(spec, tokens=7, seed=3)
    backend = JaxPrequantBackend("cpu", grouped=grouped)
    one = backend.prepare(spec, params, scheme, "float32")
    two = backend.prepare(spec, params, scheme, "float32", ep_size=2)
    assert two.plan.experts == 4
    np.testing.assert_allclose(backend.forward(two, x).y, backend.forward(one, x).y, rtol=1e-5, atol=1e-6)
    g_one, g_two = backend.backward(one, x, dy), backend.backward(two, x, dy)
    for name in g_one:
        np.testing.assert_allclose(g_two[name], g_one[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_expert_parallel_shards_experts_and_exchanges_rows(monkeypatch):
    """Level 6 compares the backend with itself, so it would pass with expert parallelism silently
    off. Check that the expert arrays are split over the devices and that the program exchanges rows
    (all-to-all); and, as a control, that a dispatch keeping every row on its own device (so tokens
    meet the wrong experts) fails level 6's comparison."""
    _need_devices(4)
    scheme = "int8_routed_prequant"
    data = CASES["balanced"].build("float32")
    backend = JaxPrequantBackend("cpu")
    sharded = backend.prepare(data.spec, data.params, scheme, "float32", ep_size=4)
    for name in ("w13", "w2", "w13_codes_t", "w2_codes_t"):
        array = sharded.params.get(name, sharded.frozen.get(name))
        shards = array.addressable_shards
        assert len({shard.device for shard in shards}) == 4, f"{name} is not spread over 4 devices"
        assert all(shard.data.shape[0] == array.shape[0] // 4 for shard in shards), f"{name} is replicated"
    x_dev = backend._put_tokens(sharded, data.x)
    plan = backend._plan_for(sharded, x_dev)
    hlo = _jax_programs.forward.lower(sharded.params, sharded.frozen, x_dev, plan=plan).compile().as_text()
    assert "all-to-all" in hlo, "the sharded forward exchanges no rows"

    expected = backend.forward(backend.prepare(data.spec, data.params, scheme, "float32"), data.x).y
    monkeypatch.setattr(_jax_ep, "_exchange", lambda values: values)
    _jax_programs.forward.clear_cache()  # retrace with the broken dispatch, and drop it afterwards
    try:
        broken = backend.forward(backend.prepare(data.spec, data.params, scheme, "float32", ep_size=2), data.x).y
    finally:
        _jax_programs.forward.clear_cache()
    with pytest.raises(ConformanceError):
        assert_close(broken, expected, tolerance(scheme, "float32", "expert_parallel").tight, "broken dispatch.y")


def test_level6_fails_a_dispatch_that_keeps_rows_home_at_eight_devices(monkeypatch):
    """The control above at N = 8, one expert per device (zipf_skew: 8 experts, uneven load): a dispatch
    that sends no row away puts tokens on the wrong expert, and level 6's bound catches it by far."""
    _need_devices(8)
    scheme = "int8_routed"
    data = CASES["zipf_skew"].build("float32")
    backend = JaxPrequantBackend("cpu")
    expected = backend.forward(backend.prepare(data.spec, data.params, scheme, "float32"), data.x).y
    monkeypatch.setattr(_jax_ep, "_exchange", lambda values: values)
    _jax_programs.forward.clear_cache()
    try:
        broken = backend.forward(backend.prepare(data.spec, data.params, scheme, "float32", ep_size=8), data.x).y
    finally:
        _jax_programs.forward.clear_cache()
    bound = tolerance(scheme, "float32", "expert_parallel").tight
    with pytest.raises(ConformanceError):
        assert_close(broken, expected, bound, "broken dispatch.y")
    rows = np.linalg.norm(np.asarray(broken, np.float64) - expected, axis=1) / np.linalg.norm(expected, axis=1)
    assert rows.max() >= 10 * bound, f"caught by only {rows.max() / bound:.3g}x the bound"


def test_cpu_run_simulates_a_device_for_every_declared_ep_size():
    """The plugin asks XLA for `CPU_DEVICES` host devices (level 6 shards over up to 8)."""
    from qmoe.suite.plugin import CPU_DEVICES

    if f"xla_force_host_platform_device_count={CPU_DEVICES}" not in os.environ.get("XLA_FLAGS", ""):
        pytest.skip(f"XLA_FLAGS named its own device count before the plugin: {os.environ.get('XLA_FLAGS')!r}")
    assert len(jax.devices("cpu")) == CPU_DEVICES >= max(JaxPrequantBackend.capabilities.expert_parallel)


def test_ep_size_beyond_devices_says_how_to_fix():
    params, _, _ = _layer(HLO_SPEC, 4)
    with pytest.raises(RuntimeError, match="xla_force_host_platform_device_count"):
        JaxPrequantBackend("cpu").prepare(HLO_SPEC, params, "none", "float32", ep_size=len(jax.devices("cpu")) + 1)


@pytest.mark.parametrize("grouped", _jax_env.FORMULATIONS)
def test_stage_times(grouped):
    spec = MoESpec(hidden=16, ffn=12, experts=4, top_k=2, shared_ffn=8)
    params, x, _ = _layer(spec, tokens=9)
    backend = JaxPrequantBackend("cpu", grouped=grouped)
    times = backend.stage_times(backend.prepare(spec, params, "int8_all", "float32"), x, repeats=2)
    assert list(times) == ["pack", "up", "down", "combine", "shared"]
    assert all(isinstance(t, float) and t > 0 for t in times.values()), times


@pytest.mark.parametrize("pass_", ["forward", "backward"])
def test_benchmark_step(pass_):
    params, x, dy = _layer(HLO_SPEC, tokens=12)
    backend = JaxPrequantBackend("cpu", grouped="padded")
    prepared = backend.prepare(HLO_SPEC, params, "int8_routed_prequant", "bfloat16")
    step = backend.benchmark_step(prepared, x, pass_, dy)
    out = step()
    leaves = jax.tree.leaves(out)
    assert all(leaf.is_fully_addressable and np.all(np.isfinite(np.asarray(leaf, np.float32))) for leaf in leaves)
    if pass_ == "forward":
        assert out[0].shape == x.shape and str(out[0].dtype) == "bfloat16"


# A bfloat16 step must run its backward GEMMs in bfloat16. Autodiff of a dot with a float32 result gives the
# transposed dots a float32 cotangent; on a GPU those become float32 GEMMs. On the H200 (2026-12-01,
# logbook-shared5632) that made forward+backward of every scheme with a float shared expert 2.6-5.4x slower than
# three times its forward (95-200 TF/s against 478-534 for the schemes whose shared expert is int8, with a
# hand-written VJP). Widths no other tensor of the step has: a float32 dot over any of them is an expert's GEMM;
# only the router's dot (width: the expert count) is float32 by design.
SHARED_SPEC = MoESpec(hidden=24, ffn=40, experts=4, top_k=2, shared_ffn=56)
EXPERT_WIDTHS = {SHARED_SPEC.ffn, 2 * SHARED_SPEC.ffn, SHARED_SPEC.shared_ffn, 2 * SHARED_SPEC.shared_ffn}


@pytest.mark.parametrize("scheme", ["none", "int8_routed", "int8_routed_prequant"])  # float shared expert
def test_bfloat16_backward_has_no_float32_expert_gemm(scheme):
    jaxpr = _step_jaxpr(*_step_program(SHARED_SPEC, scheme, "bfloat16", None, tokens=16))
    bad = [f"{[str(v.aval.dtype) for v in eqn.invars]} {[v.aval.shape for v in eqn.invars]}"
           for eqn in _jaxpr_eqns(jaxpr, "dot_general")
           if any(set(v.aval.shape) & EXPERT_WIDTHS for v in eqn.invars)
           and any(v.aval.dtype == jnp.float32 for v in eqn.invars)]
    assert not bad, f"{scheme}: float32 GEMMs in the bfloat16 forward+backward program: {bad}"


WEIGHT_SHAPES = {(4, 24, 80), (4, 40, 24), (24, 112), (56, 24)}  # SHARED_SPEC's w13, w2, shared_w13, shared_w2


@pytest.mark.parametrize("grouped", ["ragged", "padded", "pallas"])
@pytest.mark.parametrize("scheme", ["none", "int8_routed", "int8_routed_prequant", "int8_all"])
def test_bfloat16_weight_gradients_leave_their_gemm_in_bfloat16(scheme, grouped):
    """No GEMM of a bfloat16 step makes a float32 weight-sized result: a float32 dW then cast was a temporary
    the size of the weights (2026-12-01, H200, deepseek-v3: 29.8 GiB of temporaries, out of memory).
    Failed before the fix in all 12 cases (the shared expert's dW as well); the pallas weight-gradient kernel
    (a pallas_call) stores its accumulator rounded to the weights' dtype too."""
    jaxpr = _step_jaxpr(*_step_program(SHARED_SPEC, scheme, "bfloat16", grouped, tokens=16))
    bad = [f"{eqn.primitive.name} -> {v.aval.dtype}{list(v.aval.shape)}"
           for eqn in _jaxpr_eqns(jaxpr, "dot_general", "ragged_dot_general", "pallas_call")
           for v in eqn.outvars if tuple(v.aval.shape) in WEIGHT_SHAPES and v.aval.dtype == jnp.float32]
    assert not bad, f"{scheme} ({grouped}): float32 weight-sized GEMM results in a bfloat16 step: {bad}"


def test_bfloat16_weights_are_cast_on_the_host(monkeypatch):
    """prepare sends a bfloat16 layer's weights as bfloat16: a float32 copy on the device first (cast there)
    is twice the weights (2026-12-01, H200, deepseek-v3: 28 GiB for w13, out of memory in prepare). The
    values are XLA's cast's, bit for bit, also across the threaded chunks. Failed before the fix."""
    from qmoe.implementations import jax_prequant

    monkeypatch.setattr(jax_prequant, "_CAST_CHUNK", 1000)  # several chunks per weight
    sent: list[tuple[str, tuple]] = []
    device_put = jax.device_put
    monkeypatch.setattr(jax, "device_put", lambda value, *a, **k: sent.append((str(value.dtype), value.shape))
                        or device_put(value, *a, **k))
    params, _, _ = _layer(SHARED_SPEC, tokens=4)
    params = params.map(lambda a: a * 1.001)  # not bfloat16 values: the rounding is exercised
    prepared = JaxPrequantBackend("cpu", grouped="padded").prepare(SHARED_SPEC, params, "none", "bfloat16")
    assert not [s for s in sent if s[0] == "float32" and s[1] in WEIGHT_SHAPES], sent
    for name in ("w13", "w2", "shared_w13", "shared_w2"):
        want = jnp.asarray(np.asarray(getattr(params, name), np.float32)).astype(jnp.bfloat16)
        got = prepared.params[name]
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))


def test_float_dense_dot_gradient_is_the_dot_gradient_in_float32():
    """In float32 the shared expert's custom VJP is autodiff's: the same dx and dW to rounding."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)
    ours = jax.vjp(float_dense_dot, x, w)[1](g)
    plain = jax.vjp(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST), x, w)[1](g)
    for got, want in zip(ours, plain):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("swiglu", ["pallas", "xla"])
@pytest.mark.parametrize("scheme", ["int8_routed_prequant", "int8_routed"])
def test_split_int8_gemm_runs_the_down_projection_alone_through_the_pallas_kernel(scheme, swiglu):
    """``int8_gemm="split"`` (`grouped.projection_layout`): the down projection's int8 products (forward, and the
    input gradient where the rule makes it int8: ``prequant_vjp``, not the straight-through ``int8_routed``) are
    the Pallas kernel's, the up projection's XLA's, and the layer's values are those of ``xla`` (both sum int8
    products exactly in int32; bfloat16 held to one rounding of the largest value)."""
    params, x, dy = _layer(HLO_SPEC, tokens=12)
    results, kernels = {}, {}
    for int8_gemm in ("xla", "split"):
        options = {"int8_gemm": int8_gemm, "swiglu": swiglu}
        jaxpr = str(_step_jaxpr(*_step_program(HLO_SPEC, scheme, "bfloat16", "padded", tokens=12, **options)))
        kernels[int8_gemm] = len(re.findall(r"name=qmoe_grouped_matmul_int8\b", jaxpr))
        backend = JaxPrequantBackend("cpu", grouped="padded", **options)
        prepared = backend.prepare(HLO_SPEC, params, scheme, "bfloat16")
        results[int8_gemm] = (backend.forward(prepared, x).y, backend.backward(prepared, x, dy))
    down_products = 2 if scheme == "int8_routed_prequant" else 1
    assert kernels == {"xla": 0, "split": down_products}, f"int8 Pallas GEMMs per step: {kernels}"
    (y0, g0), (y1, g1) = results["xla"], results["split"]
    tol = 2.0**-8
    np.testing.assert_allclose(y1, y0, rtol=0, atol=tol * float(np.abs(y0).max()))
    for name in g0:
        np.testing.assert_allclose(g1[name], g0[name], rtol=0, atol=tol * float(np.abs(g0[name]).max()),
                                   err_msg=f"d{name}")


def test_router_split_products_have_float32_accuracy():
    """`routing.split_logits`: bfloat16 parts of R (exact: `bf16_parts` sums back to R bit for bit) give x R, dR and
    dx within float32's error of the float64 products, where a single bfloat16 product of R is ~2^-9 off."""
    from qmoe.implementations.jax_prequant.routing import bf16_parts, router_logits

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((96, 320)), jnp.bfloat16).astype(jnp.float32)  # a bfloat16 layer's tokens
    router = jnp.asarray(rng.standard_normal((320, 24)) * 0.05, jnp.float32)
    g = jnp.asarray(rng.standard_normal((96, 24)), jnp.float32)
    assert np.array_equal(np.asarray(sum(p.astype(jnp.float32) for p in bf16_parts(router, 3))), np.asarray(router))
    x64, r64, g64 = (np.asarray(v, np.float64) for v in (x, router, g))

    def rel(got, want):
        return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())

    logits, pullback = jax.vjp(lambda x_, r_: router_logits(x_, r_, "bf16_split"), x, router)
    dx, d_router = pullback(g)
    one_part = jnp.dot(x.astype(jnp.bfloat16), router.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    assert rel(one_part, x64 @ r64) > 1e-3  # what a plain bfloat16 router would be off by
    assert rel(logits, x64 @ r64) < 4e-6
    assert rel(d_router, x64.T @ g64) < 4e-6
    assert rel(dx, g64 @ r64.T) < 4e-6


def test_router_split_layer_equals_the_float32_router():
    """The backend with ``router="bf16_split"`` routes as the float32 router does and gives its outputs and
    gradients within float32 noise (a bfloat16 layer, whose inputs hold bfloat16 values as the interface
    promises); float32 layers refuse it instead of running something else."""
    params, x, dy = _layer(HLO_SPEC, tokens=12)
    x, dy = (v.astype(jnp.bfloat16).astype(np.float64) for v in (x, dy))  # a bfloat16 layer's inputs
    results = {}
    for router in ("float32", "bf16_split"):
        backend = JaxPrequantBackend("cpu", router=router)
        prepared = backend.prepare(HLO_SPEC, params, "int8_routed_prequant", "bfloat16")
        assert prepared.plan.router == router
        forward = backend.forward(prepared, x)
        results[router] = (forward, backend.backward(prepared, x, dy))
    (f0, g0), (f1, g1) = results["float32"], results["bf16_split"]
    assert np.array_equal(f0.expert_ids, f1.expert_ids)
    # float32 noise (CPU, 2026-12-01: y and the weights' gradients equal, dx and d_router 5e-8 and 2e-7 of their
    # largest); a bfloat16 rounding anywhere (2^-8) or a single-part router (~2^-9 in the logits) is far outside
    np.testing.assert_allclose(f1.y, f0.y, rtol=0, atol=1e-6 * float(np.abs(f0.y).max()))
    for name in g0:
        np.testing.assert_allclose(g1[name], g0[name], rtol=0, atol=1e-6 * float(np.abs(g0[name]).max()),
                                   err_msg=f"d{name}")
    with pytest.raises(ValueError, match="bfloat16 layers"):
        JaxPrequantBackend("cpu", router="bf16_split").prepare(HLO_SPEC, params, "none", "float32")


def test_the_split_router_leaves_no_float32_gemm_in_a_bfloat16_step(monkeypatch):
    """With ``router="bf16_split"`` a bfloat16 forward+backward program has no float32 GEMM at all: the router's
    three (the only ones by design otherwise, width E) become bfloat16 products with float32 accumulation."""
    monkeypatch.setenv(_jax_env.ROUTER_ENV, "bf16_split")
    jaxpr = _step_jaxpr(*_step_program(SHARED_SPEC, "int8_routed_prequant", "bfloat16", None, tokens=16))
    dots = list(_jaxpr_eqns(jaxpr, "dot_general"))
    float32 = [[str(v.aval.dtype) for v in eqn.invars] for eqn in dots
               if any(v.aval.dtype == jnp.float32 for v in eqn.invars)]
    assert not float32, f"float32 GEMMs: {float32}"
    logits = [eqn for eqn in dots if eqn.outvars[0].aval.shape == (16, SHARED_SPEC.experts)]
    assert logits and all(v.aval.dtype == jnp.bfloat16 for eqn in logits for v in eqn.invars)


#: A layer whose int8 products all fit the Mosaic GPU kernel's tiles (K multiples of 32, N of 16).
MOSAIC_SPEC = MoESpec(hidden=64, ffn=64, experts=4, top_k=2)


def _mosaic_calls(monkeypatch) -> list[int]:
    """Record each `pallas_mosaic.grouped_int8_matmul` call's group stride (0: ragged rows) as programs trace."""
    from qmoe.implementations.jax_prequant import pallas_mosaic

    calls: list[int] = []
    kernel = pallas_mosaic.grouped_int8_matmul

    def counted(*args, **kwargs):
        calls.append(kwargs["group_stride"])
        return kernel(*args, **kwargs)

    monkeypatch.setattr(pallas_mosaic, "grouped_int8_matmul", counted)
    return calls


@pytest.mark.parametrize("grouped", ["padded", "pallas"])
def test_mosaic_int8_gemm_runs_every_int8_product(grouped, monkeypatch):
    """``int8_gemm="mosaic"``: the four int8 products of an int8_routed_prequant step (forward up and down, both
    input gradients) run `pallas_mosaic`'s kernel (in Pallas's GPU interpreter here): over the padded layout, whose
    capacity is rounded up to the kernel's whole row tiles, and over the pallas formulation's ragged rows. The
    gradients are the default's: int32 sums are exact, the scales applied in the same order (to float32 rounding
    where the default's are XLA's)."""
    from qmoe.implementations.jax_prequant import pallas_mosaic

    params, x, dy = _layer(MOSAIC_SPEC, tokens=40)
    calls = _mosaic_calls(monkeypatch)
    grads = {}
    for int8_gemm in ("mosaic", None):
        backend = JaxPrequantBackend("cpu", grouped=grouped, int8_gemm=int8_gemm)
        grads[int8_gemm] = backend.backward(backend.prepare(MOSAIC_SPEC, params, "int8_routed_prequant", "float32"),
                                            x, dy)
    stride = pallas_mosaic.ROW_ALIGNMENT if grouped == "padded" else 0
    assert calls == [stride] * 4, calls
    for name, want in grads[None].items():
        np.testing.assert_allclose(grads["mosaic"][name], want, rtol=0, atol=1e-5 * float(np.abs(want).max()),
                                   err_msg=f"d{name}")


def test_mosaic_int8_gemm_leaves_products_below_its_tiles_to_the_pallas_kernel(monkeypatch):
    """The suite's small layers (F 16: the down projection contracts 16, under the int8 wgmma's 32) run that product
    through the Pallas kernel and the up projection (K 32) through the Mosaic GPU kernel; the forward stays the
    Pallas kernel's to float32 rounding (the two apply the row and group scales in different orders)."""
    spec = MoESpec(hidden=32, ffn=16, experts=4, top_k=2)
    params, x, _ = _layer(spec, tokens=12)
    calls = _mosaic_calls(monkeypatch)
    backend = JaxPrequantBackend("cpu", grouped="pallas", int8_gemm="mosaic")
    y = backend.forward(backend.prepare(spec, params, "int8_routed_prequant", "float32"), x).y
    assert calls == [0], calls
    default = JaxPrequantBackend("cpu", grouped="pallas")
    want = np.asarray(default.forward(default.prepare(spec, params, "int8_routed_prequant", "float32"), x).y)
    np.testing.assert_allclose(np.asarray(y), want, rtol=0, atol=1e-6 * float(np.abs(want).max()))


#: A layer on the GPU large enough for several work tiles of the Mosaic GPU kernel in every product (4096 routed
#: rows; N and K of 256 and 512: the default tiles, two K steps), with skewed routing from its router bias.
MOSAIC_GPU_SPEC = MoESpec(hidden=256, ffn=256, experts=8, top_k=2)


@pytest.mark.gpu
@pytest.mark.parametrize("grouped", ["padded", "pallas"])
def test_mosaic_int8_gemm_matches_xla_on_a_hopper_gpu(grouped, interpret, monkeypatch):
    """On the GPU (``--device cuda``, Hopper), a forward+backward step whose four int8 products run the Mosaic GPU
    kernel gives the gradients of XLA's int8 dots (``xla``; ``pallas`` under the pallas formulation): the int32 sums
    are exact on both and the scales applied in the same order, so what differs is float32 rounding (XLA's fusions
    against the kernel's epilogue) and where that rounding tips a per-row int8 code of d_h: that token's dx moves
    by one code step of its d_h row (H200, before the two dequantized in the same order: one row of 2048, 1.8e-5 of
    max|dx|). Allowed: a thousandth of the rows beyond 1e-5 max, none beyond 1e-3 max."""
    if interpret:
        pytest.skip("needs the run's device to be a GPU (--device cuda)")
    device = _jax_env.platform_devices("gpu")[0]
    if not _jax_env.mosaic_default(device):
        pytest.skip(f"the Mosaic GPU kernel runs on Hopper GPUs; {device.device_kind} is not one")
    params, x, dy = _layer(MOSAIC_GPU_SPEC, tokens=2048)
    calls = _mosaic_calls(monkeypatch)
    grads = {}
    for int8_gemm in ("mosaic", "xla"):
        backend = JaxPrequantBackend("gpu", grouped=grouped, int8_gemm=int8_gemm)
        prepared = backend.prepare(MOSAIC_GPU_SPEC, params, "int8_routed_prequant", "float32")
        grads[int8_gemm] = backend.backward(prepared, x, dy)
    assert len(calls) == 4, calls
    for name, want in grads["xla"].items():
        got, peak = np.asarray(grads["mosaic"][name]), float(np.abs(want).max())
        off = np.abs(got - want) > 1e-5 * peak
        rows = np.unique(np.nonzero(off.reshape(off.shape[0], -1))[0])
        assert rows.size <= max(1, off.shape[0] // 1000), f"d{name}: {rows.size} rows beyond 1e-5 max: {rows[:10]}"
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * peak, err_msg=f"d{name}")


def test_mosaic_is_the_int8_gemm_default_on_hopper_gpus_only():
    """`env.mosaic_default`: Hopper (compute capability 9.x) GPUs; not Ampere, Blackwell, CPUs or no device (the
    expert-parallel plans); an explicit choice or $QMOE_JAX_INT8_GEMM wins over it."""

    @dataclasses.dataclass
    class Device:
        platform: str
        compute_capability: str = ""

    assert _jax_env.mosaic_default(Device("gpu", "9.0"))
    assert not any(_jax_env.mosaic_default(d) for d in (Device("gpu", "8.0"), Device("gpu", "10.0"),
                                                         Device("cpu"), None))
    hopper = Device("gpu", "9.0")
    assert _jax_env.select_int8_gemm("gpu", "padded", device=hopper) == "mosaic"
    assert _jax_env.select_int8_gemm("gpu", "pallas", device=hopper) == "mosaic"
    assert _jax_env.select_int8_gemm("gpu", "padded", device=Device("gpu", "8.0")) == "xla"
    assert _jax_env.select_int8_gemm("gpu", "padded", "xla", device=hopper) == "xla"
    assert _jax_env.select_int8_gemm("gpu", "pallas", "xla", device=hopper) == "pallas"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_jax_env.INT8_GEMM_ENV, "xla")
        assert _jax_env.select_int8_gemm("gpu", "padded", device=hopper) == "xla"


def test_the_mosaic_default_gives_way_to_xla_below_the_kernel_size(monkeypatch):
    """A defaulted ``mosaic`` plan runs XLA's int8 dots for problems under `KERNEL_MIN_ELEMENTS` (the conformance
    cases: each kernel shape would be compiled for a few rows), as the SwiGLU kernels do; one asked for is kept."""
    import qmoe.implementations.jax_prequant as jp

    monkeypatch.setattr(_jax_env, "mosaic_default", lambda device: True)
    params, _, _ = _layer(MOSAIC_SPEC, tokens=8)
    for asked, small in ((None, "xla"), ("mosaic", "mosaic")):
        backend = JaxPrequantBackend("cpu", grouped="padded", int8_gemm=asked)
        prepared = backend.prepare(MOSAIC_SPEC, params, "int8_routed_prequant", "float32")
        assert prepared.plan.int8_gemm == "mosaic"
        assert jp._sized_kernels(prepared, prepared.plan, 8).int8_gemm == small
        big = jp.KERNEL_MIN_ELEMENTS // (MOSAIC_SPEC.top_k * MOSAIC_SPEC.ffn)
        assert jp._sized_kernels(prepared, prepared.plan, big).int8_gemm == "mosaic"


def test_mosaic_is_an_int8_gemm_choice_for_the_pallas_formulation_too():
    """``mosaic`` is kept for the pallas formulation (whose own int8 kernel is otherwise forced), named in errors."""
    assert _jax_env.select_int8_gemm("cpu", "pallas", "mosaic") == "mosaic"
    assert _jax_env.select_int8_gemm("cpu", "pallas", "xla") == "pallas"
    with pytest.raises(ValueError, match="mosaic"):
        _jax_env.select_int8_gemm("cpu", "padded", "cutlass")
