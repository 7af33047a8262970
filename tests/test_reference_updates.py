"""The reference update rules (master-float, requantize) and block-coordinate descent over a stack."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from qmoe import reference
from qmoe.reference import MoEParams, MoESpec
from qmoe.reference.quantization import dequantized_weight, quantize_weight
from qmoe.reference.updates import TRAINABLE_PARAMS
from tests.finite_difference import FD_EPS, central_difference

pytestmark = pytest.mark.conformance

FD_RTOL = 1e-6
SMALL = MoESpec(hidden=8, ffn=4, experts=4, top_k=2)
#: hidden and ffn multiples of 64 so that every scheme, affine groups included, applies.
GRID = MoESpec(hidden=64, ffn=64, experts=4, top_k=2, shared_ffn=64)


def layer_problem(spec: MoESpec, tokens: int = 10, seed: int = 0) -> tuple[MoEParams, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(200 + seed)
    return (MoEParams.random(spec, seed=seed), rng.standard_normal((tokens, spec.hidden)),
            rng.standard_normal((tokens, spec.hidden)))


def stack_problem(spec: MoESpec, layers: int = 3, tokens: int = 6, seed: int = 0
                  ) -> tuple[list[MoEParams], np.ndarray, np.ndarray]:
    """A residual stack with small layers (0.5 x the random init) so the residual stream stays O(1)."""
    rng = np.random.default_rng(300 + seed)
    stack = []
    for index in range(layers):
        layer = MoEParams.random(spec, seed=seed * 10 + index)
        stack.append(layer.replace(w2=0.5 * layer.w2))
    return stack, rng.standard_normal((tokens, spec.hidden)), rng.standard_normal((tokens, spec.hidden))


def assert_params_equal(actual: MoEParams, expected: MoEParams, what: str) -> None:
    assert [n for n, _ in actual.items()] == [n for n, _ in expected.items()], f"{what}: parameter sets differ"
    for name, value in expected.items():
        np.testing.assert_array_equal(getattr(actual, name), value, err_msg=f"{what}: {name}")


def expected_step(spec: MoESpec, params: MoEParams, grads: dict[str, np.ndarray], scheme: str, lr: float,
                  update: str) -> MoEParams:
    """The update written out from DESIGN.md: W - lr g, then deq(Q(.)) for the requantizing rule."""
    scheme_ = reference.get_scheme(scheme)
    new = {}
    for name, value in params.items():
        if name == "router_bias":
            new[name] = value
        elif update == "master_float":
            new[name] = value - lr * grads[name]
        else:
            new[name] = dequantized_weight(value - lr * grads[name], scheme_.weight_quant(name), scheme_)
    return MoEParams(**new)


# -- one step -----------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["none", "int8_routed", "qat_int8_row"])
def test_master_float_step_is_params_minus_lr_grad(scheme: str) -> None:
    spec = SMALL.replace(router="sigmoid_topk", routed_scaling=2.0, shared_ffn=4)
    params, x, dy = layer_problem(spec)
    lr = 0.05
    new = reference.sgd_step_master_float(spec, params, x, dy, scheme, lr)
    grads = reference.backward(spec, params, x, dy, scheme)
    for name in TRAINABLE_PARAMS:
        np.testing.assert_array_equal(getattr(new, name), getattr(params, name) - lr * grads[name], err_msg=name)
    np.testing.assert_array_equal(new.router_bias, params.router_bias, err_msg="router_bias must not move")
    assert new.router_bias is not params.router_bias, "the step must return new arrays, not alias the input"


@pytest.mark.parametrize("scheme", ["int8_routed", "int8_all", "int8_affine_g64"])
def test_requantize_step_lands_on_the_grid_within_half_a_step(scheme: str) -> None:
    spec = GRID.replace(router="sigmoid_topk", routed_scaling=2.0)
    params, x, dy = layer_problem(spec, seed=1)
    scheme_ = reference.get_scheme(scheme)
    effective = reference.effective_params(spec, params, scheme)
    lr = 0.5
    new = reference.sgd_step_requantize(spec, effective, x, dy, scheme, lr)
    grads = reference.backward(spec, effective, x, dy, scheme, weights_are_effective=True)
    np.testing.assert_array_equal(new.router_bias, effective.router_bias)
    for name in TRAINABLE_PARAMS:
        float_step = getattr(effective, name) - lr * grads[name]
        rule = scheme_.weight_quant(name)
        if rule == "float":
            np.testing.assert_array_equal(getattr(new, name), float_step, err_msg=f"float {name}: plain step")
            continue
        on_grid = quantize_weight(float_step, rule, scheme_)
        error = np.abs(getattr(new, name) - float_step)
        half_step = 0.5 * np.broadcast_to(on_grid.scale, error.shape) * (1 + 1e-12)
        assert np.all(error <= half_step), f"{scheme} {name}: requantized step is {np.max(error / half_step) / 2:.3g}" \
                                           " steps from the float step"
        again = quantize_weight(getattr(new, name), rule, scheme_)
        np.testing.assert_array_equal(again.codes, on_grid.codes, err_msg=f"{scheme} {name}: not a fixed point")
        np.testing.assert_allclose(again.dequantize(), getattr(new, name), rtol=1e-14, atol=0,
                                   err_msg=f"{scheme} {name}: requantizing again moved the weights")
        before = quantize_weight(getattr(effective, name), rule, scheme_)
        assert np.any(before.codes != on_grid.codes), f"{scheme} {name}: lr too small, no code moved"


def test_requantize_step_with_a_tiny_lr_can_leave_codes_unchanged() -> None:
    """The MLX layerwise rule loses steps below half a quantization step: that is its known cost."""
    spec = GRID
    params, x, dy = layer_problem(spec, seed=2)
    effective = reference.effective_params(spec, params, "int8_routed")
    new = reference.sgd_step_requantize(spec, effective, x, dy, "int8_routed", lr=1e-9)
    scheme = reference.get_scheme("int8_routed")
    for name in ("w13", "w2"):
        # The scale follows amax, which the step nudges; the codes, though, stay where they were.
        before, after = (quantize_weight(getattr(p, name), "per_expert", scheme) for p in (effective, new))
        np.testing.assert_array_equal(after.codes, before.codes, err_msg=f"{name}: a sub-half-step moved a code")
        np.testing.assert_allclose(getattr(new, name), getattr(effective, name), rtol=1e-6)
    assert not np.array_equal(new.router, effective.router), "the float router still takes its step"


def test_requantize_step_under_none_is_the_master_float_step() -> None:
    params, x, dy = layer_problem(SMALL, seed=3)
    a = reference.sgd_step_requantize(SMALL, params, x, dy, "none", 0.1, balance_coeff=0.2)
    b = reference.sgd_step_master_float(SMALL, params, x, dy, "none", 0.1, balance_coeff=0.2)
    assert_params_equal(a, b, "none: requantize vs master_float")


# -- residual stack -------------------------------------------------------------------------------

def test_stack_forward_is_the_residual_sum() -> None:
    layers, x, _ = stack_problem(SMALL)
    out, inputs = reference.stack_forward(SMALL, layers, x)
    hidden = x
    for index, layer in enumerate(layers):
        np.testing.assert_array_equal(inputs[index], hidden)
        hidden = hidden + reference.forward(SMALL, layer, hidden).y
    np.testing.assert_array_equal(out, hidden)


@dataclass(frozen=True)
class StackCase:
    name: str
    spec: MoESpec
    balance_coeff: float = 0.0


STACK_CASES = [
    StackCase("softmax", SMALL),
    StackCase("sigmoid_shared_balance", SMALL.replace(router="sigmoid_topk", routed_scaling=2.0, shared_ffn=4), 0.1),
]


def stack_fd_relative_errors(case: StackCase) -> dict[str, float]:
    """Normwise relative error of every stack gradient (per layer and tensor) against central differences."""
    spec = case.spec
    layers, x, target = stack_problem(spec)

    def routing_of(stack: list[MoEParams]) -> list[np.ndarray]:
        _, inputs = reference.stack_forward(spec, stack, x)
        return [reference.forward(spec, layer, h).expert_ids for layer, h in zip(stack, inputs)]

    base_routing = routing_of(layers)

    def loss() -> float:
        for before, now in zip(base_routing, routing_of(layers)):
            np.testing.assert_array_equal(now, before, err_msg="routing flipped inside the FD step")
        return reference.stack_loss(spec, layers, x, target, balance_coeff=case.balance_coeff)

    analytic = reference.stack_backward(spec, layers, x, target, balance_coeff=case.balance_coeff)
    errors = {"x": _relative(central_difference(loss, x), analytic[0]["x"])}
    for index, layer in enumerate(layers):
        for name, value in layer.items():
            if name != "router_bias":
                errors[f"layer{index}.{name}"] = _relative(central_difference(loss, value), analytic[index][name])
    return errors


def _relative(fd: np.ndarray, analytic: np.ndarray) -> float:
    return float(np.linalg.norm(fd - analytic) / np.linalg.norm(analytic))


@pytest.mark.parametrize("case", STACK_CASES, ids=[c.name for c in STACK_CASES])
def test_stack_backward_matches_central_differences(case: StackCase) -> None:
    errors = stack_fd_relative_errors(case)
    bad = {name: err for name, err in errors.items() if not err <= FD_RTOL}
    assert not bad, f"{case.name}: stack gradient vs central differences {bad} > {FD_RTOL} (eps {FD_EPS})"


def test_stack_loss_is_half_mean_squared_error_plus_balance() -> None:
    layers, x, target = stack_problem(SMALL)
    out, inputs = reference.stack_forward(SMALL, layers, x)
    balance = sum(reference.forward(SMALL, layer, h).balance_loss for layer, h in zip(layers, inputs))
    expected = 0.5 * np.sum((out - target) ** 2) / x.shape[0] + 0.3 * balance
    assert reference.stack_loss(SMALL, layers, x, target, balance_coeff=0.3) == pytest.approx(expected, rel=1e-14)


# -- block-coordinate descent ---------------------------------------------------------------------

def sequential_groups(spec: MoESpec, layers: list[MoEParams], x: np.ndarray, target: np.ndarray, scheme: str,
                      lr: float, group_size: int, update: str) -> list[MoEParams]:
    """Block-coordinate descent written out: whole-stack gradient at the current state, step one group."""
    effective = update == "requantize"
    current = [reference.effective_params(spec, p, scheme) if effective else p.copy() for p in layers]
    for start in range(0, len(current), group_size):
        grads = reference.stack_backward(spec, current, x, target, scheme, weights_are_effective=effective)
        for index in range(start, min(start + group_size, len(current))):
            current[index] = expected_step(spec, current[index], grads[index], scheme, lr, update)
    return current


BCD_CASES = [("requantize", "int8_routed"), ("master_float", "int8_routed"), ("requantize", "none"),
             ("master_float", "qat_int8_row")]


@pytest.mark.parametrize("update,scheme", BCD_CASES, ids=[f"{u}-{s}" for u, s in BCD_CASES])
@pytest.mark.parametrize("group_size", [1, 2, 3, 5])
def test_block_coordinate_descent_matches_the_written_out_rule(update: str, scheme: str, group_size: int) -> None:
    spec = SMALL.replace(shared_ffn=4)
    layers, x, target = stack_problem(spec, seed=1)
    snapshot = [layer.copy() for layer in layers]
    lr = 0.3
    actual = reference.block_coordinate_descent(spec, layers, x, target, scheme, lr, group_size, update=update)
    expected = sequential_groups(spec, layers, x, target, scheme, lr, group_size, update)
    for index, (a, e) in enumerate(zip(actual, expected)):
        # The whole-stack gradient and the tail-stack gradient differ only by rounding order.
        for name, value in e.items():
            np.testing.assert_allclose(getattr(a, name), value, rtol=1e-12, atol=1e-15,
                                       err_msg=f"{update}/{scheme} group {group_size}: layer {index} {name}")
    for index, (layer, before) in enumerate(zip(layers, snapshot)):
        assert_params_equal(layer, before, f"input layer {index} was modified in place")


@pytest.mark.parametrize("update,scheme", [("requantize", "int8_routed"), ("master_float", "int8_routed")])
def test_full_group_is_one_joint_step(update: str, scheme: str) -> None:
    spec = SMALL
    layers, x, target = stack_problem(spec, seed=2)
    lr = 0.3
    effective = update == "requantize"
    start = [reference.effective_params(spec, p, scheme) if effective else p for p in layers]
    grads = reference.stack_backward(spec, start, x, target, scheme, weights_are_effective=effective)
    joint = [expected_step(spec, p, g, scheme, lr, update) for p, g in zip(start, grads)]
    for group_size in (len(layers), len(layers) + 4):
        bcd = reference.block_coordinate_descent(spec, layers, x, target, scheme, lr, group_size, update=update)
        for index in range(len(layers)):
            assert_params_equal(bcd[index], joint[index], f"group_size={group_size} vs joint step, layer {index}")


def test_layerwise_differs_from_joint_and_reduces_the_loss() -> None:
    spec = SMALL.replace(shared_ffn=4)
    layers, x, target = stack_problem(spec, seed=0)
    lr = 1e-3  # small: the loss is quartic in the weights and larger steps overshoot on this stack
    before = reference.stack_loss(spec, layers, x, target)
    layerwise = reference.block_coordinate_descent(spec, layers, x, target, "none", lr, 1)
    joint = reference.block_coordinate_descent(spec, layers, x, target, "none", lr, len(layers))
    assert_params_equal(layerwise[0], joint[0], "the first group sees the same state in both")
    for index in range(1, len(layers)):
        step = np.linalg.norm(joint[index].w13 - layers[index].w13)
        gap = np.linalg.norm(layerwise[index].w13 - joint[index].w13)
        assert gap > 0.01 * step, f"layer {index}: layerwise must see the already-updated earlier layers"
    after_layerwise = reference.stack_loss(spec, layerwise, x, target)
    after_joint = reference.stack_loss(spec, joint, x, target)
    assert after_layerwise < before and after_joint < before, (before, after_layerwise, after_joint)


def test_block_coordinate_descent_rejects_bad_arguments() -> None:
    layers, x, target = stack_problem(SMALL, layers=2)
    with pytest.raises(ValueError, match="group_size"):
        reference.block_coordinate_descent(SMALL, layers, x, target, "none", 0.1, 0)
    with pytest.raises(ValueError, match="update rule"):
        reference.block_coordinate_descent(SMALL, layers, x, target, "none", 0.1, 1, update="adam")
    with pytest.raises(reference.SpecError, match="target"):
        reference.block_coordinate_descent(SMALL, layers, x, target[:3], "none", 0.1, 1)
    with pytest.raises(reference.SpecError, match="at least one layer"):
        reference.stack_forward(SMALL, [], x)
