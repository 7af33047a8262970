"""The flip envelope (`qmoe.reference.flip_envelope`): which codes may flip, and that a flip stays inside it."""

from __future__ import annotations

import numpy as np
import pytest

from qmoe import reference
from qmoe.reference.experts import mlp_forward, silu
from qmoe.reference.flips import ACCUMULATE_ROUNDOFF, UNIT_ROUNDOFF, _hidden_arithmetic, possible_code_change
from qmoe.reference.quantization import quantize_per_token
from qmoe.suite.cases import CASES

U32 = UNIT_ROUNDOFF["float32"]


def test_exact_ties_at_power_of_two_scales_cannot_flip():
    """amax 127 gives scale 1: v / scale is exact, so a .5 tie must round half to even, not either way."""
    v = np.array([[0.5, 1.5, 2.5, -0.5, -2.5, 127.0]])
    change, scale = possible_code_change(v, np.zeros_like(v), U32)
    assert scale[0, 0] == 1.0
    assert not change.any()


def test_near_tie_with_rounded_scale_may_flip_by_one():
    """A scale that is not a power of two is rounded: a value at a .5 tie of the float64 ratio may go either way."""
    scale = 1.3 / 127
    v = np.array([[2.5 * scale, 10.2 * scale, 1.3]])
    change, _ = possible_code_change(v, np.zeros_like(v), U32)
    assert change.tolist() == [[1.0, 0.0, 0.0]]


def test_input_error_widens_the_window():
    """An input known to within e may land on any code that rounds from [r - e/s, r + e/s]; the row's
    largest input error also moves its amax, hence the scale, hence every code by |r| e / amax."""
    v = np.array([[127.0, 10.0, 20.0]])
    change, _ = possible_code_change(v, np.array([[0.0, 0.7, 0.0]]), U32)
    # 10 +- 0.7 reaches 9 and 11; 127 may become 126 when the amax moves by 0.7; 20 +- 0.11 stays 20.
    assert change.tolist() == [[1.0, 1.0, 0.0]]


def test_zero_row_stays_exact():
    v = np.zeros((2, 4))
    change, scale = possible_code_change(v, np.zeros_like(v), U32)
    assert not change.any() and np.all(scale == 1.0)


@pytest.mark.parametrize("case_name", ["balanced", "wide_g64", "zero_rows_outliers"])
def test_a_planted_hidden_flip_stays_inside_the_envelope(case_name):
    """Flip every hidden code the envelope calls possible, each in its worst direction: y moves by at most
    the envelope, and rows the envelope leaves at zero do not move at all."""
    data = CASES[case_name].build("float32")
    eff = reference.effective_params(data.spec, data.params, "int8_routed")
    env = reference.flip_envelope(data.spec, eff, data.x, "int8_routed", "float32")
    assert env.flips["hidden"] > 0, "the case has no possible flip to plant"
    expected = reference.forward(data.spec, eff, data.x, "int8_routed", weights_are_effective=True)
    routing = reference.route(data.spec, eff, data.x)
    x_codes = quantize_per_token(data.x).dequantize()
    y = np.zeros_like(data.x)
    for e in range(data.spec.experts):
        tokens, slots = np.nonzero(routing.expert_ids == e)
        if tokens.size == 0:
            continue
        a = x_codes[tokens] @ eff.w13[e]
        ffn = data.spec.ffn
        h = silu(a[:, :ffn]) * a[:, ffn:]
        arithmetic_a = (data.spec.hidden * ACCUMULATE_ROUNDOFF + U32) * (np.abs(x_codes[tokens]) @ np.abs(eff.w13[e]))
        change, _ = possible_code_change(h, _hidden_arithmetic(a[:, :ffn], a[:, ffn:], arithmetic_a, U32), U32)
        q = quantize_per_token(h)
        # Flip towards the other side of the nearest boundary.
        direction = np.sign(h / q.scale - q.codes)
        flipped = (q.codes + direction * np.minimum(change, 1)) * q.scale
        y[tokens] += routing.gate_weights[tokens, slots][:, None] * (flipped @ eff.w2[e])
    if data.spec.shared_ffn:
        y += mlp_forward(data.x, eff.shared_w13, eff.shared_w2, "float")[0]
    moved = np.abs(y - expected.y)
    assert np.all(moved <= env.y * (1 + 1e-9) + 1e-12)
    assert np.all(moved[~env.flip_rows] < 1e-12)


def test_mlp_forward_is_what_the_envelope_linearises():
    """The envelope reads the reference's own caches: the same pre-activations and hidden."""
    data = CASES["balanced"].build("float32")
    eff = reference.effective_params(data.spec, data.params, "int8_routed")
    out, cache = mlp_forward(data.x, eff.w13[0], eff.w2[0], "per_token")
    np.testing.assert_array_equal(cache.a, cache.xq @ eff.w13[0])


def test_saturated_gate_vjp_terms_cover_two_roundings_of_one_cotangent():
    """A saturated top-2 softmax (gates 1 and 0) has a zero Jacobian, yet a backend that evaluates the
    top gate's cotangent twice (XLA:GPU, one dot product per fusion) keeps the difference of two
    roundings of it: the VJP's terms must bound that, where |Jacobian| x |error| is zero."""
    from qmoe.reference.flips import routing_vjp_terms
    from qmoe.reference.routing import route, routing_backward

    spec = reference.MoESpec(hidden=4, ffn=4, experts=4, top_k=2)
    router = np.diag([400.0, 1.0, 1.0, 1.0])
    params = reference.MoEParams(router=router, w13=np.zeros((4, 4, 8)), w2=np.zeros((4, 4, 4)))
    routing = route(spec, params, np.array([[1.0, 0.5, 0.0, 0.0]]))
    assert routing.gate_weights[0, 0] == 1.0 and routing.gate_weights[0, 1] < 1e-100
    dg = np.array([[3.0e7, 1.0e3]])
    assert np.abs(routing_backward(spec, routing, dg, 0.0)).max() < 1e-100
    # d logit_1 = w_1 dg_1 - w_1 (w . dg'), where dg' = dg_1 (1 + u): another float32 rounding of it
    two_roundings = dg[0, 0] - dg[0, 0] * (1 + U32)
    terms = routing_vjp_terms(spec, routing, np.abs(dg))
    assert abs(two_roundings) > 0
    assert abs(two_roundings) <= U32 * terms[0, 0]
