"""The reference router, capacity rule, balance loss and bypass mode on constructed cases."""

from __future__ import annotations

import numpy as np
import pytest

from qmoe import reference
from qmoe.reference import MoEParams, MoESpec
from qmoe.reference.routing import balance_loss, capacity_mask, sigmoid, softmax

pytestmark = pytest.mark.conformance

SOFTMAX = MoESpec(hidden=8, ffn=4, experts=4, top_k=2)
SIGMOID = SOFTMAX.replace(router="sigmoid_topk", routed_scaling=2.5)
ROUTERS = {"softmax": SOFTMAX, "sigmoid": SIGMOID}


def random_problem(spec: MoESpec, tokens: int = 16, seed: int = 0) -> tuple[MoEParams, np.ndarray]:
    return MoEParams.random(spec, seed=seed), np.random.default_rng(50 + seed).standard_normal((tokens, spec.hidden))


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_ties_go_to_the_lower_expert_index(router: str) -> None:
    spec = ROUTERS[router].replace(experts=5, top_k=2)
    params, x = random_problem(spec)
    # Experts 1, 3, 4 share one router column, larger than the others: top-2 takes 1 and 3, 4 loses.
    params.router[:, [0, 2]] = 0.0
    params.router[:, [1, 3, 4]] = np.abs(params.router[:, [1]]) + 1.0
    x = np.abs(x)
    if params.router_bias is not None:
        params.router_bias[:] = 0.0
    ids = reference.route(spec, params, x).expert_ids
    np.testing.assert_array_equal(ids, np.tile([1, 3], (x.shape[0], 1)))


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_all_experts_tied_pick_the_first_k(router: str) -> None:
    spec = ROUTERS[router]
    params, x = random_problem(spec)
    params.router[:] = np.tile(params.router[:, :1], (1, spec.experts))
    if params.router_bias is not None:
        params.router_bias[:] = 0.0
    result = reference.forward(spec, params, x)
    np.testing.assert_array_equal(result.expert_ids, np.tile(np.arange(spec.top_k), (x.shape[0], 1)))


def test_sigmoid_bias_changes_selection_not_weights() -> None:
    spec = SIGMOID
    params, x = random_problem(spec)
    params.router_bias[:] = 0.0
    unbiased = reference.route(spec, params, x)
    params.router_bias[3] = 10.0  # bias > any score gap: expert 3 is always picked, first
    biased = reference.route(spec, params, x)
    assert np.all(biased.expert_ids[:, 0] == 3)
    assert not np.array_equal(biased.expert_ids, unbiased.expert_ids)
    np.testing.assert_array_equal(biased.scores, unbiased.scores)
    selected = np.take_along_axis(sigmoid(x @ params.router), biased.expert_ids, axis=-1)
    expected = selected / selected.sum(axis=-1, keepdims=True) * spec.routed_scaling
    np.testing.assert_allclose(biased.gate_weights, expected, rtol=1e-15)
    # A bias that moves every expert alike changes nothing at all.
    params.router_bias[:] = 0.3
    shifted = reference.route(spec, params, x)
    np.testing.assert_array_equal(shifted.expert_ids, unbiased.expert_ids)
    np.testing.assert_array_equal(shifted.gate_weights, unbiased.gate_weights)


@pytest.mark.parametrize("spec", [SOFTMAX, SOFTMAX.replace(top_k=4), SIGMOID, SIGMOID.replace(routed_scaling=1.0)],
                         ids=["softmax", "softmax_top_k_all", "sigmoid_scaled", "sigmoid"])
def test_renormalized_weights_sum_to_one_times_scaling(spec: MoESpec) -> None:
    params, x = random_problem(spec)
    weights = reference.forward(spec, params, x).gate_weights
    target = spec.routed_scaling if spec.router == "sigmoid_topk" else 1.0
    np.testing.assert_allclose(weights.sum(axis=-1), target, rtol=1e-14)
    assert np.all(weights > 0)


def test_softmax_without_renormalization_keeps_the_probabilities() -> None:
    spec = SOFTMAX.replace(renormalize=False)
    params, x = random_problem(spec)
    result = reference.forward(spec, params, x)
    p = softmax(x @ params.router)
    np.testing.assert_array_equal(result.gate_weights, np.take_along_axis(p, result.expert_ids, axis=-1))
    assert np.all(result.gate_weights.sum(axis=-1) < 1.0)
    # Best first: the selected probabilities are non-increasing along k.
    assert np.all(np.diff(result.gate_weights, axis=-1) <= 0)


def test_capacity_keeps_the_first_assignments_in_token_major_order() -> None:
    spec = SOFTMAX.replace(capacity_factor=0.5)  # 4 tokens * 2 / 4 experts * 0.5 -> capacity 1
    ids = np.array([[0, 1], [1, 0], [0, 2], [3, 0]])
    assert spec.capacity(4) == 1
    expected = np.array([[True, True], [False, False], [False, True], [True, False]])
    np.testing.assert_array_equal(capacity_mask(spec, ids), expected)
    spec2 = SOFTMAX.replace(capacity_factor=1.0)  # capacity 2
    np.testing.assert_array_equal(capacity_mask(spec2, ids),
                                  [[True, True], [True, True], [False, True], [True, False]])
    np.testing.assert_array_equal(capacity_mask(SOFTMAX, ids), np.ones_like(ids, dtype=bool))


def test_dropped_assignments_contribute_nothing_to_the_output() -> None:
    spec = SOFTMAX.replace(capacity_factor=0.5)
    params, x = random_problem(spec, tokens=12)
    routing = reference.route(spec, params, x)
    assert not routing.kept.all()
    outputs = reference.expert_outputs(spec, params, x)
    expected = np.zeros_like(x)
    for t, k in zip(*np.nonzero(routing.kept)):
        expected[t] += routing.gate_weights[t, k] * outputs[routing.expert_ids[t, k], t]
    np.testing.assert_allclose(reference.forward(spec, params, x).y, expected, rtol=1e-13, atol=1e-15)


def test_balance_loss_is_one_for_perfect_balance() -> None:
    rng = np.random.default_rng(60)
    ids = np.array([[0, 1], [2, 3], [1, 0], [3, 2]])  # every expert picked twice out of 8
    uniform = np.full((4, 4), 0.25)
    assert balance_loss(SOFTMAX, ids, uniform) == pytest.approx(1.0, abs=1e-15)
    # With balanced counts any probabilities give 1: E * sum_i (1/E) P_i = sum_i P_i = 1.
    probs = softmax(rng.standard_normal((4, 4)))
    assert balance_loss(SOFTMAX, ids, probs) == pytest.approx(1.0, abs=1e-15)
    # Collapse: every token on expert 0 with probability 1 gives E.
    collapsed = np.zeros((4, 4))
    collapsed[:, 0] = 1.0
    assert balance_loss(SOFTMAX.replace(top_k=1), np.zeros((4, 1), dtype=int), collapsed) == 4.0


SCHEME_SPEC = MoESpec(hidden=64, ffn=64, experts=4, top_k=2, shared_ffn=64)


@pytest.mark.parametrize("scheme", sorted(reference.SCHEMES))
def test_experts_without_tokens_get_exactly_zero_weight_gradient(scheme: str) -> None:
    spec = SCHEME_SPEC
    params, x = random_problem(spec, tokens=10)
    # Positive inputs, positive columns for experts 0-2 and a negative column for expert 3:
    # expert 3 has the lowest logit on every token and top-2 never picks it.
    x = np.abs(x) + 0.1
    params.router[:, :3] = np.abs(params.router[:, :3])
    params.router[:, 3] = -np.abs(params.router[:, 3]) - 0.1
    dy = np.random.default_rng(61).standard_normal(x.shape)
    result = reference.forward(spec, params, x, scheme)
    assert not np.any(result.expert_ids == 3)
    grads = reference.backward(spec, params, x, dy, scheme, balance_coeff=0.5)
    assert not grads["w13"][3].any() and not grads["w2"][3].any(), f"{scheme}: unused expert 3 got a gradient"
    used = np.unique(result.expert_ids)
    assert all(grads["w13"][e].any() and grads["w2"][e].any() for e in used), f"{scheme}: a used expert got none"


@pytest.mark.parametrize("scheme", ["none", "int8_routed", "int8_affine_g64"])
def test_bypass_expert_outputs_are_each_expert_on_every_row(scheme: str) -> None:
    spec = SCHEME_SPEC.replace(shared_ffn=0)
    params, x = random_problem(spec, tokens=5)
    outputs = reference.expert_outputs(spec, params, x, scheme)
    assert outputs.shape == (spec.experts, 5, spec.hidden)
    effective = reference.effective_params(spec, params, scheme)
    for e in range(spec.experts):
        for t in range(5):
            # One expert alone on one row: top-1 of a single expert, weight 1 after renormalization.
            single = MoESpec(hidden=spec.hidden, ffn=spec.ffn, experts=1, top_k=1)
            one = MoEParams(router=np.zeros((spec.hidden, 1)), w13=effective.w13[e:e + 1], w2=effective.w2[e:e + 1])
            y = reference.forward(single, one, x[t:t + 1], scheme, weights_are_effective=True).y
            np.testing.assert_allclose(outputs[e, t], y[0], rtol=1e-13, atol=1e-15,
                                       err_msg=f"{scheme} expert {e} token {t}")


def test_bypass_float_expert_is_swiglu() -> None:
    spec = SOFTMAX
    params, x = random_problem(spec, tokens=5)
    outputs = reference.expert_outputs(spec, params, x)
    for e in range(spec.experts):
        gate, up = x @ params.w13[e, :, :spec.ffn], x @ params.w13[e, :, spec.ffn:]
        np.testing.assert_allclose(outputs[e], (gate / (1 + np.exp(-gate)) * up) @ params.w2[e], rtol=1e-13)


def test_top_k_all_experts_unnormalized_output_is_probability_weighted_bypass() -> None:
    spec = SOFTMAX.replace(top_k=4, renormalize=False)
    params, x = random_problem(spec, tokens=7)
    p = softmax(x @ params.router)
    expected = np.einsum("te,eth->th", p, reference.expert_outputs(spec, params, x))
    np.testing.assert_allclose(reference.forward(spec, params, x).y, expected, rtol=1e-13, atol=1e-15)
