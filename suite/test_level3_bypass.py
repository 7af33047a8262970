"""Level 3, bypass routing (GPTQ calibration): every expert's output on every token."""

from __future__ import annotations

import numpy as np
import pytest

from qmoe import reference
from qmoe.suite.bounds import CaseBounds, effective_as_params
from qmoe.suite.checks import assert_close
from qmoe.suite.tolerances import tolerance

pytestmark = pytest.mark.conformance
REQUIRES = ("bypass",)
CASE_NAMES = ("balanced", "empty_experts", "zero_rows_outliers")


def test_bypass_expert_outputs(backend, target, data, prepared):
    tol = tolerance(target.scheme, target.dtype, "forward")
    outputs = np.asarray(backend.expert_outputs(prepared, data.x))
    eff = effective_as_params(backend, prepared)
    expected = reference.expert_outputs(data.spec, eff, data.x, target.scheme, weights_are_effective=True)
    bounds = CaseBounds(tol, data.spec, eff, data.x, target.scheme, target.dtype, bypass=True)
    for e in range(data.spec.experts):
        bound = bounds.expert_output(e)
        assert_close(outputs[e], expected[e], bound.relative, f"bypass.expert_outputs[expert={e}]", bound.reason,
                     extra=bound.absolute)
