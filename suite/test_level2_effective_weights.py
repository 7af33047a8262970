"""Level 2, effective weights: the float weights a backend computes with are a valid quantization of
the given weights under its scheme (and exactly the given weights where the scheme keeps them float)."""

from __future__ import annotations

import numpy as np
import pytest

from reference import get_scheme
from reference.quantization import quantize_weight

from .checks import ConformanceError, check_shape, rerun_hint
from .tolerances import tolerance

pytestmark = pytest.mark.conformance
CASE_NAMES = ("balanced", "sigmoid", "shared_expert", "wide_g64")


def _step(given: np.ndarray, rule: str, scheme) -> np.ndarray | None:
    """Per-element quantization step of the reference quantizer (None: the weight stays float)."""
    quantized = quantize_weight(given, rule, scheme)
    return None if quantized is None else np.broadcast_to(quantized.scale, given.shape)


def test_effective_weights(backend, target, data, prepared):
    tol = tolerance(target.scheme, target.dtype, "effective_weights")
    scheme = get_scheme(target.scheme)
    weights = backend.effective_weights(prepared)
    for name, given in data.params.items():
        assert name in weights, f"effective_weights has no {name}\n{rerun_hint()}"
        actual = np.asarray(weights[name], dtype=np.float64)
        check_shape(actual, given, f"effective.{name}")
        rule = scheme.weight_quant(name)
        step = _step(given, rule, scheme)
        if step is None:
            if not np.array_equal(actual, given):
                worst = np.unravel_index(np.argmax(np.abs(actual - given)), given.shape)
                raise ConformanceError(
                    f"effective.{name}: scheme {scheme.name} keeps it float, but it differs from the given "
                    f"weights by up to {np.abs(actual - given).max():.3e} at {worst}\n{rerun_hint()}")
            continue
        # Affine grids may legitimately differ from ours (MLX picks its own scale/bias): one step.
        bound = (1.0 if rule == "affine_group" else tol.tight) * step * (1 + 1e-5) + 1e-12
        excess = np.abs(actual - given) - bound
        if np.any(excess > 0):
            worst = np.unravel_index(np.argmax(excess / step), given.shape)
            raise ConformanceError(
                f"effective.{name}: not a valid {rule} quantization: error {abs(actual - given)[worst]:.3e} at "
                f"{tuple(int(i) for i in worst)} exceeds {bound[worst]:.3e} ({'one step' if rule == 'affine_group' else 'half a step'} "
                f"of that element's scale {step[worst]:.3e}); a per-tensor instead of per-expert scale, or a "
                f"quantizer applied twice, looks like this\n{rerun_hint()}")
