"""Level 5, stack: the layerwise / grouped trainer is one pass of the reference block-coordinate descent.

``Backend.train_stack`` runs `qmoe.reference.updates.block_coordinate_descent` (requantize rule) over a
residual stack ``x_{l+1} = x_l + moe_l(x_l)`` with loss ``0.5 * sum((x_L - target)^2) / T``: groups
of ``group_size`` consecutive layers, each group stepped jointly with the later layers frozen.

A quantized backend's grid may differ from the reference's (MLX picks its own affine scale and
bias), so the reference's end state cannot be compared element for element. The check replays the
pass on the backend's own states instead: for each group, the reference gradient is taken at the
state the backend had reached (earlier groups as the backend left them, later layers as the backend
quantized them at the start), and each of the group's layers must be that step: float parameters
tightly, quantized ones within one quantization step of the float step (a valid requantization),
and moved at least half as far as the step asks (so "not updated" cannot pass).

The stack (seed) and the learning rate are chosen from the reference alone, such that the reference's
own pass has no routing near-tie at any group's state: the test never skips on, and never adapts to,
a state the backend produced.
"""

from __future__ import annotations

import numpy as np
import pytest

from qmoe import reference
from qmoe.reference import MoEParams, get_scheme
from qmoe.reference.quantization import quantize_weight
from qmoe.reference.updates import TRAINABLE_PARAMS, block_coordinate_descent, stack_backward, stack_forward, stack_loss
from qmoe.suite.cases import CaseData, round_to_dtype, routing_gaps
from qmoe.suite.checks import ConformanceError, assert_close, assert_requantized_step, rerun_hint
from qmoe.suite.tolerances import ROUTING_MARGIN, tolerance

pytestmark = pytest.mark.conformance
REQUIRES = ("layerwise_trainer",)
CASE_NAMES = ("balanced", "capacity_drop", "sigmoid", "shared_expert", "wide_g64")

#: Layers in the stack: three, so group sizes 1, 2 and 3 give layerwise, a ragged last group, and one joint step.
DEPTH = 3
#: The largest relative step (RMS of lr * g over RMS of the parameter) any trainable parameter takes
#: in the first group. Larger steps make block-coordinate descent itself diverge on these stacks (the
#: reference's loss reaches 1e282 at a few times this); at 5% the experts still move by a few
#: quantization steps (an affine-g64 step is ~2% of a weight's RMS), so "not updated" cannot pass.
MAX_RELATIVE_STEP = 0.1
#: Each layer's output is scaled to this fraction of its input's norm (through w2 and shared_w2, which
#: scale the output exactly): without it the SwiGLU stack grows quadratically per layer, the loss
#: gradient reaches 1e14 and float32 cancellation, not the backend, decides the comparison.
RESIDUAL_FRACTION = 0.3
#: Deeper layers' routers are scaled down: a saturated sigmoid router turns every score into a near-tie.
DEEP_ROUTER_SCALE = 0.5
#: Smallest routing gap the reference's pass may have (relative, as `routing_gaps`): the cases' own
#: `ROUTING_MARGIN`, 100x a float32 router's error. A correct backend's states differ from the reference's
#: by float32 arithmetic (and, for affine schemes, by a valid grid of its own); a token can route
#: differently from the reference evaluated at the backend's state only where the backend's own gap falls
#: under its router's float32 error (~1e-6), which a reference gap of 1e-4 makes rare, and then the test
#: fails rather than skips. A larger margin finds no seed: the case's own first layer has gaps of 1.6e-4.
REFERENCE_MARGIN = ROUTING_MARGIN


def _stack_layers(data: CaseData, attempt: int) -> list[MoEParams]:
    """The case's layer first, then seeded random layers of the same spec, rounded like the case's.

    The case's router (so its routing pattern) is kept; every layer's output is scaled to
    RESIDUAL_FRACTION of its input.
    """
    layers, hidden = [], np.asarray(data.x, dtype=np.float64)
    for depth in range(DEPTH):
        if depth == 0:
            layer = data.params.copy()
        else:
            layer = MoEParams.random(data.spec, seed=data.case.seed * 7919 + 97 * attempt + depth)
            layer.router = layer.router * DEEP_ROUTER_SCALE
        # Pre-activations of unit RMS keep SwiGLU near its linear-times-linear regime, so dL/dW13 and
        # dL/dW2 stay within a decade of each other relative to the weights (one lr moves both).
        pre = np.einsum("th,ehf->etf", hidden, layer.w13)
        layer.w13 = layer.w13 / np.sqrt(np.mean(pre ** 2))
        if layer.shared_w13 is not None:
            layer.shared_w13 = layer.shared_w13 / np.sqrt(np.mean((hidden @ layer.shared_w13) ** 2))
        y = reference.forward(data.spec, layer, hidden).y
        ratio = RESIDUAL_FRACTION * np.linalg.norm(hidden) / max(np.linalg.norm(y), np.finfo(float).tiny)
        layer.w2 = layer.w2 * ratio
        if layer.shared_w2 is not None:
            layer.shared_w2 = layer.shared_w2 * ratio
        layer = layer.map(lambda a: round_to_dtype(a, data.dtype))
        layer.router = round_to_dtype(layer.router, "float32")
        layers.append(layer)
        hidden = hidden + reference.forward(data.spec, layer, hidden).y
    return layers


def _learning_rate(spec, state: list[MoEParams], x: np.ndarray, goal: np.ndarray, scheme: str,
                   group_size: int) -> float:
    """The largest lr <= MAX_RELATIVE_STEP * min_{layer, param} RMS(W) / RMS(dL/dW), halving, for which
    the reference's pass lowers the loss (a diverging pass compares overflow, not backends)."""
    grads = stack_backward(spec, state, x, goal, scheme, weights_are_effective=True)
    ratios = [np.sqrt(np.mean(value ** 2) / np.mean(layer_grads[name] ** 2))
              for layer, layer_grads in zip(state, grads) for name, value in layer.items()
              if name in TRAINABLE_PARAMS and np.any(layer_grads[name])]
    lr = float(MAX_RELATIVE_STEP * min(ratios))
    before = stack_loss(spec, state, x, goal, scheme, weights_are_effective=True)
    for _ in range(10):
        after = block_coordinate_descent(spec, state, x, goal, scheme, lr, group_size)
        if stack_loss(spec, after, x, goal, scheme, weights_are_effective=True) < before:
            return lr
        lr /= 2
    raise AssertionError("no learning rate in 10 halvings lowers the reference's stack loss: fix the stack case")


def _near_tie(spec, layers: list[MoEParams], x: np.ndarray, scheme: str, margin: float) -> int | None:
    """Index of the first layer whose routing (at these effective weights) has a near-tie, or None."""
    _, inputs = stack_forward(spec, layers, x, scheme, weights_are_effective=True)
    for index, (layer, hidden) in enumerate(zip(layers, inputs)):
        gaps = routing_gaps(spec, layer, hidden)
        if ((gaps > 0) & (gaps < margin)).any():
            return index
    return None


def _reference_start(data: CaseData, scheme: str, goal: np.ndarray, group_size: int
                     ) -> tuple[list[MoEParams], float]:
    """(given layers, learning rate) of the first seed whose reference pass has no routing near-tie.

    Decided from the reference alone, never from a backend's state: the reference's effective weights,
    its learning rate and its own block-coordinate pass, checked at the state every group sees (earlier
    layers stepped, later ones not yet) with a margin of `REFERENCE_MARGIN`. So no backend can change
    which stack is tested, or earn a skip by producing a state with a near-tie.
    """
    spec, x = data.spec, np.asarray(data.x, dtype=np.float64)
    for attempt in range(50):
        layers = _stack_layers(data, attempt)
        begin = [reference.effective_params(spec, layer, scheme) for layer in layers]
        lr = _learning_rate(spec, begin, x, goal, scheme, group_size)
        end = block_coordinate_descent(spec, layers, x, goal, scheme, lr, group_size)
        if all(_near_tie(spec, end[:start] + begin[start:], x, scheme, REFERENCE_MARGIN) is None
               for start in range(0, DEPTH, group_size)):
            return layers, lr
    raise AssertionError(f"case {data.case.name}: no stack whose reference pass is free of routing near-ties "
                         "in 50 seeds")


def _check_layer_step(name_prefix: str, before: MoEParams, grads: dict[str, np.ndarray], after: dict,
                      scheme, tol, lr: float) -> None:
    """``after`` is one requantizing SGD step from ``before`` with gradient ``grads`` (see module doc)."""
    for name, start in before.items():
        actual = np.asarray(after[name], dtype=np.float64)
        what = f"{name_prefix}.{name}"
        if name not in TRAINABLE_PARAMS:
            if not np.array_equal(actual, start):
                raise ConformanceError(f"{what}: changed by up to {np.abs(actual - start).max():.3e}; it steers "
                                       f"selection only and takes no SGD step\n{rerun_hint()}")
            continue
        stepped = start - lr * grads[name]
        quantized = quantize_weight(stepped, scheme.weight_quant(name), scheme)
        if quantized is None:
            assert_close(actual, stepped, tol.tight, what, tol.reason)
            continue
        assert_requantized_step(actual, start, grads[name], lr, quantized.scale, tol.tight, what)


@pytest.mark.parametrize("group_size", [1, 2, DEPTH], ids=lambda g: f"group{g}")
def test_train_stack(backend, target, data, group_size):
    tol = tolerance(target.scheme, target.dtype, "update")
    scheme = get_scheme(target.scheme)
    spec = data.spec
    goal = round_to_dtype(np.random.default_rng(data.case.seed + 1).standard_normal(data.x.shape), target.dtype)
    layers, lr = _reference_start(data, target.scheme, goal, group_size)
    # The check replays the pass on the backend's own states, starting from its quantization of the layers.
    state = [MoEParams(**{k: np.asarray(v, dtype=np.float64) for k, v in
                          backend.effective_weights(backend.prepare(spec, layer, target.scheme, target.dtype)).items()})
             for layer in layers]
    trained = backend.train_stack(spec, layers, data.x, goal, target.scheme, target.dtype, lr, group_size)
    assert len(trained) == DEPTH, f"train_stack returned {len(trained)} layers for a stack of {DEPTH}"

    x_start = np.asarray(data.x, dtype=np.float64)
    for start in range(0, DEPTH, group_size):
        stop = min(start + group_size, DEPTH)
        tail_grads = stack_backward(spec, state[start:], x_start, goal, target.scheme, weights_are_effective=True)
        for index in range(start, stop):
            _check_layer_step(f"stack.layer{index}", state[index], tail_grads[index - start], trained[index],
                              scheme, tol, lr)
            state[index] = MoEParams(**{k: np.asarray(v, dtype=np.float64) for k, v in trained[index].items()})
        x_start = stack_forward(spec, state[start:stop], x_start, target.scheme, weights_are_effective=True)[0]
