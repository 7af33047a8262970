"""Level 5, update: one SGD step as the backend declares it matches the reference step.

``master_float`` (QAT, quantize-each-call schemes): master -= lr * STE gradient, the effective
weights are then the scheme's quantization of the new master. ``requantize`` (MLX layerwise):
dequantize, step, requantize; a valid result is within one step of the reference's float step.
"""

from __future__ import annotations

import numpy as np
import pytest

from qmoe import reference
from qmoe.reference import get_scheme
from qmoe.reference.quantization import quantize_weight
from qmoe.suite.bounds import effective_as_params
from qmoe.suite.checks import assert_close, assert_requantized_step
from qmoe.suite.tolerances import tolerance

pytestmark = pytest.mark.conformance
REQUIRES = ("update",)
CASE_NAMES = ("balanced", "empty_experts", "shared_expert", "wide_g64")

#: Large enough that the step moves weights by several quantization steps: a backend that did not
#: update (or lost the step in requantization) cannot pass.
LR = 0.5


def test_update(backend, target, data, prepared):
    tol = tolerance(target.scheme, target.dtype, "update")
    scheme = get_scheme(target.scheme)
    before = effective_as_params(backend, prepared)
    kind = backend.capabilities.update
    updated = backend.update(prepared, data.x, data.dy, LR)
    after = backend.effective_weights(updated)
    if kind == "master_float":
        grads = reference.backward(data.spec, data.params, data.x, data.dy, target.scheme)
        master = data.params.map(np.array)
        for name in grads:
            if name != "x":
                setattr(master, name, getattr(master, name) - LR * grads[name])
        expected = reference.effective_params(data.spec, master, scheme)
        for name, value in expected.items():
            assert_close(np.asarray(after[name]), value, tol.tight, f"update.{name}", tol.reason, by_row=False)
        return
    grads = reference.backward(data.spec, before, data.x, data.dy, target.scheme, weights_are_effective=True)
    for name, start in before.items():
        stepped = start - LR * grads[name] if name in grads else start
        actual = np.asarray(after[name], dtype=np.float64)
        quantized = quantize_weight(stepped, scheme.weight_quant(name), scheme)
        if quantized is None:
            assert_close(actual, stepped, tol.tight, f"update.{name}", tol.reason, by_row=False)
            continue
        assert_requantized_step(actual, start, grads.get(name, np.zeros_like(start)), LR, quantized.scale, tol.tight,
                                f"update.{name}")
