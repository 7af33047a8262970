"""jax_prequant's expert-parallel dispatch: what crosses the all-to-all.

Level 6 compares the sharded layer with one device, so it cannot see *what* the dispatch sends: a
regression to float rows (or to float rows beside their codes) would pass it. These tests read the
sharded programs' ``all_to_all`` operands (the traced program, and the compiled HLO as a second view):
int8 codes + one float32 scale per row for the int8 routed schemes and under ``ep_dispatch="int8"``,
float rows otherwise, and float cotangents in every backward exchange.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax", reason="the jax_prequant backend needs jax")

import jax  # noqa: E402

from qmoe.implementations.jax_prequant import JaxPrequantBackend  # noqa: E402
from qmoe.implementations.jax_prequant import programs as _jax_programs  # noqa: E402
from qmoe.suite.cases import CASES  # noqa: E402

pytestmark = pytest.mark.backend("jax_prequant")

INT8_ROUTED = ("int8_routed", "int8_all", "int8_routed_prequant")
FLOAT_NAMES = ("float32", "bfloat16")


def _sharded(scheme: str, dtype: str = "float32", ep_dispatch: str = "float", ep_size: int = 2):
    if len(jax.devices("cpu")) < ep_size:
        pytest.skip(f"needs {ep_size} CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax "
                    "is imported (the suite plugin sets it)")
    data = CASES["balanced"].build(dtype)
    backend = JaxPrequantBackend("cpu", ep_dispatch=ep_dispatch)
    return backend, backend.prepare(data.spec, data.params, scheme, dtype, ep_size=ep_size), data


def _row_operands(operands, hidden: int) -> list[str]:
    """dtypes of the [slots, H] operands (rows, codes, outputs, cotangents), in program order."""
    return [dtype for dtype, shape in operands if len(shape) == 2 and shape[1] == hidden]


@pytest.mark.parametrize("dtype", FLOAT_NAMES)
@pytest.mark.parametrize("scheme", INT8_ROUTED)
def test_int8_schemes_dispatch_codes_and_scales_only(scheme, dtype):
    backend, sharded, data = _sharded(scheme, dtype)
    operands = backend.all_to_all_operands(sharded, data.x)
    hidden = data.spec.hidden
    slots = [shape[0] for dtype_, shape in operands if dtype_ == "int8"]
    assert _row_operands(operands, hidden) == ["int8", dtype], (
        f"{scheme}: the forward's row exchanges are {_row_operands(operands, hidden)}; expected the int8 codes "
        f"out and the {dtype} expert outputs back (all operands: {operands})")
    assert ("float32", (slots[0], 1)) in operands, f"{scheme}: no float32 scale per row sent ({operands})"


def test_compiled_program_sends_int8():
    """The same in the compiled HLO (XLA may combine or re-type collectives: on CPU it widens bfloat16 ones)."""
    def compiled_all_to_all_types(scheme: str) -> list[str]:
        backend, sharded, data = _sharded(scheme)
        x_dev = backend._put_tokens(sharded, data.x)
        plan = backend._plan_for(sharded, x_dev)
        hlo = _jax_programs.forward.lower(sharded.params, sharded.frozen, x_dev, plan=plan).compile().as_text()
        return [line.split("=", 1)[1].split(" all-to-all(")[0] for line in hlo.splitlines() if " all-to-all(" in line]

    assert any("s8[" in types for types in compiled_all_to_all_types("int8_routed_prequant"))
    assert not any("s8[" in types for types in compiled_all_to_all_types("none"))


@pytest.mark.parametrize("scheme", ("int8_routed", "int8_all"))
def test_straight_through_backward_keeps_int8_dispatch_and_float_exchanges(scheme):
    backend, sharded, data = _sharded(scheme)
    rows = _row_operands(backend.all_to_all_operands(sharded, data.x, "backward", data.dy), data.spec.hidden)
    # forward: codes out, outputs back; backward: the outputs' cotangent out, the rows' cotangent (dx) back
    assert rows == ["int8", "float32", "float32", "float32"], rows


def test_prequant_backward_dispatches_the_float_rows_its_weight_gradient_needs():
    """int8_routed_prequant's weight gradient is the float surrogate x^T g (MOE-I8-024): its forward+backward
    program sends the float rows (no codes beside them: the expert quantizes them); ``ep_dispatch="int8"``
    sends codes there too (the surrogate then uses the dequantized rows, as torch_triton's int8 dispatch)."""
    backend, sharded, data = _sharded("int8_routed_prequant")
    hidden = data.spec.hidden
    assert _row_operands(backend.all_to_all_operands(sharded, data.x, "backward", data.dy), hidden) == ["float32"] * 4
    backend, sharded, data = _sharded("int8_routed_prequant", ep_dispatch="int8")
    rows = _row_operands(backend.all_to_all_operands(sharded, data.x, "backward", data.dy), hidden)
    assert rows == ["int8", "float32", "float32", "float32"], rows


@pytest.mark.parametrize("pass_", ("forward", "backward"))
def test_float_scheme_dispatch_is_float_unless_int8_is_asked_for(pass_):
    backend, sharded, data = _sharded("none")
    rows = _row_operands(backend.all_to_all_operands(sharded, data.x, pass_, data.dy), data.spec.hidden)
    assert "int8" not in rows and rows[0] == "float32", rows
    backend, sharded, data = _sharded("none", ep_dispatch="int8")
    rows = _row_operands(backend.all_to_all_operands(sharded, data.x, pass_, data.dy), data.spec.hidden)
    assert rows[0] == "int8" and "int8" not in rows[1:], rows


def test_int8_dispatch_of_none_is_per_token_int8_with_a_straight_through_gradient():
    """``none`` under int8 dispatch computes the experts on the dequantized rows: within half a code of
    float dispatch per element of x, so the output moves by at most that through the layer; the gradient of
    x flows back unquantized (straight-through), so it stays near float dispatch's too."""
    backend_float, float_ep, data = _sharded("none")
    backend_int8, int8_ep, _ = _sharded("none", ep_dispatch="int8")
    y_float, y_int8 = backend_float.forward(float_ep, data.x).y, backend_int8.forward(int8_ep, data.x).y
    assert not np.array_equal(y_float, y_int8), "int8 dispatch changed nothing: were the rows quantized?"
    sqnr = 10 * np.log10(np.sum(y_float**2) / np.sum((y_int8 - y_float) ** 2))
    assert sqnr > 30, f"int8 dispatch of none: output SQNR {sqnr:.1f} dB against float dispatch"
    g_float = backend_float.backward(float_ep, data.x, data.dy)
    g_int8 = backend_int8.backward(int8_ep, data.x, data.dy)
    for name in ("x", "w13", "w2"):
        noise = np.sum((g_int8[name] - g_float[name]) ** 2)
        sqnr = 10 * np.log10(np.sum(g_float[name] ** 2) / max(noise, 1e-300))
        assert sqnr > 30, f"int8 dispatch of none: grad.{name} SQNR {sqnr:.1f} dB against float dispatch"


def test_unknown_dispatch_is_refused():
    with pytest.raises(ValueError, match="ep_dispatch 'fp8'"):
        JaxPrequantBackend("cpu", ep_dispatch="fp8")
