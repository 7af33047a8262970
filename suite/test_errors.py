"""Bad input gets a clear error that names the problem, not a traceback from inside a framework."""

from __future__ import annotations

import numpy as np
import pytest

from qmoe.implementations import UnknownBackendError, get_backend
from qmoe.reference import MoEParams, MoESpec, SpecError, UnknownSchemeError

pytestmark = pytest.mark.conformance

SPEC = MoESpec(hidden=16, ffn=8, experts=4, top_k=2)


@pytest.fixture
def ready(backend):
    scheme = backend.capabilities.schemes[0]
    dtype = backend.capabilities.dtypes[0]
    params = MoEParams.random(SPEC, seed=0).map(lambda a: a.astype(np.float32).astype(np.float64))
    return backend, backend.prepare(SPEC, params, scheme, dtype), params, scheme, dtype


def test_top_k_larger_than_experts():
    with pytest.raises(SpecError, match="top_k=5 is larger than experts=4"):
        MoESpec(hidden=16, ffn=8, experts=4, top_k=5)


def test_unknown_backend_name():
    with pytest.raises(UnknownBackendError, match="unknown backend 'nope'; known backends: .*torch_eager"):
        get_backend("nope")


def test_unknown_scheme(ready):
    backend, _, params, _, dtype = ready
    with pytest.raises(UnknownSchemeError, match="unknown scheme 'int4_magic'"):
        backend.prepare(SPEC, params, "int4_magic", dtype)


def test_wrong_param_shape(ready):
    backend, _, params, scheme, dtype = ready
    with pytest.raises(SpecError, match=r"parameter w13 has shape \(4, 16, 8\), expected \(4, 16, 16\)"):
        backend.prepare(SPEC, params.replace(w13=params.w13[..., :8]), scheme, dtype)


@pytest.mark.parametrize("bad,match", [
    pytest.param(np.zeros((3, 15)), r"x has shape \(3, 15\), expected \[tokens, hidden=16\]", id="wrong_hidden"),
    pytest.param(np.zeros((2, 3, 16)), r"x has shape \(2, 3, 16\)", id="wrong_rank"),
    pytest.param(np.zeros((3, 16), dtype=np.int32), "x must have a floating dtype, got int32", id="int_dtype"),
    pytest.param(np.zeros((0, 16)), "x has no tokens", id="no_tokens"),
    pytest.param(np.where(np.eye(4, 16) > 0, np.nan, 0.0), "non-finite value.*first at token 0, feature 0", id="nan"),
])
def test_bad_input(ready, bad, match):
    backend, prepared, *_ = ready
    with pytest.raises(SpecError, match=match):
        backend.forward(prepared, bad)


def test_nan_location_in_later_token(ready):
    backend, prepared, *_ = ready
    x = np.zeros((5, 16))
    x[3, 7] = np.inf
    with pytest.raises(SpecError, match="first at token 3, feature 7"):
        backend.forward(prepared, x)
