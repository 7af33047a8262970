"""Level 3, bypass routing (GPTQ calibration): every expert's output on every token."""

from __future__ import annotations

import numpy as np
import pytest

import reference

from .checks import assert_close
from .test_level3_forward import effective_as_params
from .tolerances import tolerance

pytestmark = pytest.mark.conformance
REQUIRES = ("bypass",)
CASE_NAMES = ("balanced", "empty_experts", "zero_rows_outliers")


def test_bypass_expert_outputs(backend, target, data, prepared):
    tol = tolerance(target.scheme, target.dtype, "forward")
    outputs = np.asarray(backend.expert_outputs(prepared, data.x))
    expected = reference.expert_outputs(data.spec, effective_as_params(backend, prepared), data.x, target.scheme,
                                        weights_are_effective=True)
    for e in range(data.spec.experts):
        assert_close(outputs[e], expected[e], tol.tight, f"bypass.expert_outputs[expert={e}]", tol.reason)
