"""The reference's analytic backward against float64 central differences, and its STE rule.

Every gradient tensor (x, router, w13, w2, shared_w13, shared_w2) is checked element by element on
small shapes (H=8, F=4, E=4), where full central differences are cheap. The loss is
L = sum(y * dy) + balance_coeff * balance_loss with a seeded random cotangent dy: a ones cotangent
cannot see a wrong token scatter (STYLE.md). Routing is piecewise constant in x and the router, so
every perturbed evaluation asserts that no routing decision flipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from qmoe import reference
from qmoe.reference import MoEParams, MoESpec
from qmoe.reference.quantization import quantize_per_token
from tests.finite_difference import FD_EPS, central_difference

pytestmark = pytest.mark.conformance

FD_RTOL = 1e-6  # normwise: ||fd - analytic|| / ||analytic|| per gradient tensor

SMALL = MoESpec(hidden=8, ffn=4, experts=4, top_k=2)
SIGMOID = SMALL.replace(router="sigmoid_topk", routed_scaling=2.5)


@dataclass(frozen=True)
class GradCase:
    name: str
    spec: MoESpec
    tokens: int = 6
    balance_coeff: float = 0.0
    seed: int = 0


GRAD_CASES = [
    GradCase("softmax_renormalized", SMALL),
    GradCase("softmax_not_renormalized", SMALL.replace(renormalize=False)),
    GradCase("sigmoid_bias_scaled", SIGMOID),
    GradCase("sigmoid_not_renormalized", SIGMOID.replace(renormalize=False, routed_scaling=1.5)),
    GradCase("shared_expert", SMALL.replace(shared_ffn=4)),
    GradCase("capacity_dropping", SMALL.replace(capacity_factor=0.5), tokens=8),
    GradCase("balance_loss_softmax", SMALL, balance_coeff=0.37),
    GradCase("balance_loss_sigmoid", SIGMOID.replace(shared_ffn=4), balance_coeff=0.37),
    GradCase("top_k_equals_experts", SMALL.replace(top_k=4)),
    GradCase("one_token", SMALL, tokens=1),
]


def normwise_relative_error(fd: np.ndarray, analytic: np.ndarray) -> float:
    """||fd - analytic|| / ||analytic|| (the absolute norm where the analytic gradient is zero)."""
    scale = np.linalg.norm(analytic)
    difference = np.linalg.norm(fd - analytic)
    return float(difference / scale) if scale > 0 else float(difference)


def layer_problem(case: GradCase) -> tuple[MoEParams, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + case.seed)
    params = MoEParams.random(case.spec, seed=case.seed)
    x = rng.standard_normal((case.tokens, case.spec.hidden))
    dy = rng.standard_normal((case.tokens, case.spec.hidden))
    return params, x, dy


def fd_gradients(spec: MoESpec, params: MoEParams, x: np.ndarray, dy: np.ndarray, balance_coeff: float,
                 scheme: str = "none") -> dict[str, np.ndarray]:
    """Central differences of sum(y * dy) + balance_coeff * balance_loss for x and every trainable param."""
    base_ids = reference.forward(spec, params, x, scheme).expert_ids

    def loss() -> float:
        result = reference.forward(spec, params, x, scheme)
        # A flipped top-k choice makes L jump; the difference quotient would then be meaningless.
        np.testing.assert_array_equal(result.expert_ids, base_ids, err_msg="routing flipped inside the FD step")
        return float(np.sum(result.y * dy) + balance_coeff * result.balance_loss)

    targets = {"x": x, **{name: value for name, value in params.items() if name != "router_bias"}}
    return {name: central_difference(loss, array) for name, array in targets.items()}


def fd_relative_errors(case: GradCase) -> dict[str, float]:
    """Normwise relative error of every analytic gradient of ``case`` against central differences."""
    params, x, dy = layer_problem(case)
    analytic = reference.backward(case.spec, params, x, dy, "none", balance_coeff=case.balance_coeff)
    fd = fd_gradients(case.spec, params, x, dy, case.balance_coeff)
    assert set(analytic) == set(fd), f"gradient keys {sorted(analytic)} != parameters {sorted(fd)}"
    return {name: normwise_relative_error(fd[name], analytic[name]) for name in analytic}


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.name for c in GRAD_CASES])
def test_backward_matches_central_differences(case: GradCase) -> None:
    errors = fd_relative_errors(case)
    expected = {"x", "router", "w13", "w2"} | ({"shared_w13", "shared_w2"} if case.spec.shared_ffn else set())
    assert set(errors) == expected, "router_bias must have no gradient; every other parameter one"
    bad = {name: err for name, err in errors.items() if not err <= FD_RTOL}
    assert not bad, (f"{case.name}: analytic vs central-difference gradient, normwise relative error {bad} "
                     f"> {FD_RTOL} (eps {FD_EPS}); rerun: pytest {__file__} -k {case.name}")


def test_capacity_case_drops_and_keeps_assignments() -> None:
    """The capacity gradient case must actually drop some assignments, or it tests nothing new."""
    case = next(c for c in GRAD_CASES if c.name == "capacity_dropping")
    params, x, _ = layer_problem(case)
    kept = reference.route(case.spec, params, x).kept
    assert kept.any() and not kept.all(), f"capacity case keeps {int(kept.sum())} of {kept.size} assignments"


# -- straight-through rule ----------------------------------------------------------------------

STE_FLOAT_ACTIVATION_CASES = {
    # 128 x 128 x 5 experts: both expert tensors exceed 65,536 elements, so QAT really quantizes them;
    # shared_w13 (128 x 544 = 69,632) is quantized while shared_w2 (34,816) stays float.
    "qat_int8_row": MoESpec(hidden=128, ffn=128, experts=5, top_k=2, shared_ffn=272),
    "int8_affine_g64": MoESpec(hidden=128, ffn=64, experts=4, top_k=2, shared_ffn=64),
}


@pytest.mark.parametrize("scheme", sorted(STE_FLOAT_ACTIVATION_CASES))
def test_ste_with_float_activations_is_float_backward_at_effective_weights(scheme: str) -> None:
    """Float activations: the STE gradient is exactly the float (`none`) gradient at the effective weights."""
    spec = STE_FLOAT_ACTIVATION_CASES[scheme]
    params = MoEParams.random(spec, seed=3)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((9, spec.hidden))
    dy = rng.standard_normal((9, spec.hidden))
    effective = reference.effective_params(spec, params, scheme)
    changed = [name for name, value in params.items() if not np.array_equal(value, getattr(effective, name))]
    assert {"w13", "w2"} <= set(changed), f"{scheme} left the expert weights float: nothing to test ({changed})"
    ste = reference.backward(spec, params, x, dy, scheme, balance_coeff=0.2)
    exact = reference.backward(spec, effective, x, dy, "none", balance_coeff=0.2)
    assert set(ste) == set(exact)
    for name in ste:
        np.testing.assert_array_equal(ste[name], exact[name], err_msg=f"{scheme} STE grad.{name}")


def _silu(z: np.ndarray) -> np.ndarray:
    return z / (1.0 + np.exp(-z))


def _frozen_noise(values: np.ndarray) -> np.ndarray:
    """Q(v) - v for per-token int8 quantization: the offset the STE surrogate holds constant."""
    return quantize_per_token(values).dequantize() - values


def _swiglu_with_frozen_noise(rows: np.ndarray, w13: np.ndarray, w2: np.ndarray, noise_in: np.ndarray,
                              noise_hidden: np.ndarray) -> np.ndarray:
    """(silu((v + n1) W1) * ((v + n1) W3) + n2) W2: the quantized expert with its noise frozen."""
    ffn = w13.shape[-1] // 2
    a = (rows + noise_in) @ w13
    return (_silu(a[:, :ffn]) * a[:, ffn:] + noise_hidden) @ w2


class FrozenNoiseSurrogate:
    """A float MoE whose per-token quantization noise is frozen at a base point, written from DESIGN.md.

    At the base point it computes exactly the quantized forward; its true gradient is, by
    definition, the straight-through gradient (every quantizer's derivative is the identity).
    """

    def __init__(self, spec: MoESpec, scheme: str, effective: MoEParams, x: np.ndarray) -> None:
        self.spec, self.scheme = spec, reference.get_scheme(scheme)
        routing = reference.route(spec, effective, x)
        self.ids = routing.expert_ids
        self.noise: dict[object, tuple[np.ndarray, np.ndarray]] = {}
        for e in range(spec.experts):
            tokens = np.nonzero(((self.ids == e) & routing.kept).any(axis=1))[0]
            self.noise[e] = self._noise(x[tokens], effective.w13[e], self.scheme.routed_activations)
        if spec.shared_ffn:
            self.noise["shared"] = self._noise(x, effective.shared_w13, self.scheme.shared_activations)

    @staticmethod
    def _noise(rows: np.ndarray, w13: np.ndarray, rule: str) -> tuple[np.ndarray, np.ndarray]:
        if rule == "float":
            return np.zeros_like(rows), np.zeros((rows.shape[0], w13.shape[-1] // 2))
        ffn = w13.shape[-1] // 2
        rows_q = rows + _frozen_noise(rows)
        a = rows_q @ w13
        return _frozen_noise(rows), _frozen_noise(_silu(a[:, :ffn]) * a[:, ffn:])

    def __call__(self, effective: MoEParams, x: np.ndarray) -> np.ndarray:
        routing = reference.route(self.spec, effective, x)
        np.testing.assert_array_equal(routing.expert_ids, self.ids, err_msg="routing flipped inside the FD step")
        y = np.zeros_like(x)
        for e in range(self.spec.experts):
            tokens, slots = np.nonzero((routing.expert_ids == e) & routing.kept)
            if tokens.size:
                out = _swiglu_with_frozen_noise(x[tokens], effective.w13[e], effective.w2[e], *self.noise[e])
                y[tokens] += routing.gate_weights[tokens, slots][:, None] * out
        if self.spec.shared_ffn:
            y += _swiglu_with_frozen_noise(x, effective.shared_w13, effective.shared_w2, *self.noise["shared"])
        return y


@pytest.mark.parametrize("scheme", ["int8_routed", "int8_all", "int8_dense"])
def test_ste_with_quantized_activations_is_gradient_of_frozen_noise_graph(scheme: str) -> None:
    """Per-token activations: the STE gradient equals central differences of the frozen-noise surrogate."""
    spec = SMALL.replace(shared_ffn=4)
    params = MoEParams.random(spec, seed=5)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((7, spec.hidden))
    dy = rng.standard_normal((7, spec.hidden))
    effective = reference.effective_params(spec, params, scheme)
    surrogate = FrozenNoiseSurrogate(spec, scheme, effective, x)
    np.testing.assert_allclose(surrogate(effective, x), reference.forward(spec, params, x, scheme).y,
                               rtol=0, atol=1e-13, err_msg="surrogate forward is not the quantized forward")
    ste = reference.backward(spec, params, x, dy, scheme)
    work = effective.copy()
    fd = {name: central_difference(lambda: float(np.sum(surrogate(work, x) * dy)), getattr(work, name))
          for name in ("router", "w13", "w2", "shared_w13", "shared_w2")}
    fd["x"] = central_difference(lambda: float(np.sum(surrogate(effective, x) * dy)), x)
    errors = {name: normwise_relative_error(fd[name], ste[name]) for name in fd}
    bad = {name: err for name, err in errors.items() if not err <= FD_RTOL}
    assert not bad, f"{scheme}: STE gradient vs frozen-noise central differences {bad} > {FD_RTOL}"
    # The check only has teeth if the quantized activations change the gradient at all.
    float_at_effective = reference.backward(spec, effective, x, dy, "none")
    assert normwise_relative_error(float_at_effective["x"], ste["x"]) > 1e-4, \
        f"{scheme}: activation quantization did not change grad.x; the STE check would be vacuous"
