"""Generated cases (hypothesis): ragged sizes, T = 1, top_k = experts, zero rows, outlier rows,
skewed and empty routing, capacity drops; forward and backward held to the tight bound.

Generated cases have no fidelity floor (see suite/tolerances.py): per-token int8 of a token with
one outlier feature is lossy by design.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference
from reference import SCHEMES

from .checks import assert_close
from .cases import router_saturated
from .strategies import case_data
from .test_level3_forward import assert_same_routing, effective_as_params
from .tolerances import tolerance

pytestmark = pytest.mark.conformance


def _usable(backend, spec, scheme: str) -> bool:
    return backend.capabilities.unsupported(spec, scheme) is None


@given(data=st.data())
def test_generated_forward_backward(backend, data):
    caps = backend.capabilities
    dtype = caps.dtypes[0]
    scheme = data.draw(st.sampled_from([s for s in caps.schemes if s in SCHEMES]), label="scheme")
    case = data.draw(case_data(dtype), label="case")
    if not _usable(backend, case.spec, scheme):
        return  # capability outside what this backend declares: nothing to check for this draw
    tol = tolerance(scheme, dtype, "forward")
    prepared = backend.prepare(case.spec, case.params, scheme, dtype)
    eff = effective_as_params(backend, prepared)
    result = backend.forward(prepared, case.x)
    expected = reference.forward(case.spec, eff, case.x, scheme, weights_are_effective=True)
    assert_same_routing(case.spec, eff, case.x, result, expected, "forward")
    if np.any(expected.y):
        assert_close(np.asarray(result.y), expected.y, tol.tight, "forward.y", tol.reason)
    else:
        assert not np.any(np.asarray(result.y)), "reference output is all zero, backend's is not"
    if "backward" not in caps.passes:
        return
    grads = backend.backward(prepared, case.x, case.dy)
    expected_grads = reference.backward(case.spec, eff, case.x, case.dy, scheme, weights_are_effective=True)
    btol = tolerance(scheme, dtype, "backward")
    saturated = router_saturated(case.spec, eff, case.x)
    for name, value in expected_grads.items():
        if name == "router" and saturated:
            continue  # rounding noise on both sides: see router_saturated
        got = np.asarray(grads[name], dtype=np.float64)
        if np.any(value):
            assert_close(got, value, btol.tight, f"grad.{name}", btol.reason, by_row=(name == "x"))
        else:
            assert not np.any(got), f"grad.{name} must be exactly zero like the reference's"
