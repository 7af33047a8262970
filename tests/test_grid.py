"""The covering grid (``--qmoe-grid=covering``): each (case, scheme) pair once, and still every case and
every scheme in every dtype, so the dev profile halves the targets without losing a pair of factors."""

from __future__ import annotations

import itertools

from qmoe.reference import SCHEMES
from qmoe.suite.cases import CASES
from qmoe.suite.plugin import Target, covering_dtype
from qmoe.suite.tolerances import DTYPES


def _design() -> list[Target]:
    return [covering_dtype([Target("b", scheme, CASES[case], dtype) for dtype in DTYPES], scheme, case)
            for scheme, case in itertools.product(SCHEMES, CASES)]


def test_every_pair_of_factors_meets():
    design = _design()
    assert len(design) == len(SCHEMES) * len(CASES)
    pairs = {(t.scheme, t.case.name) for t in design}
    assert len(pairs) == len(design)
    assert {(t.scheme, t.dtype) for t in design} == set(itertools.product(SCHEMES, DTYPES))
    assert {(t.case.name, t.dtype) for t in design} == set(itertools.product(CASES, DTYPES))


def test_a_backend_with_one_dtype_keeps_every_target():
    """Where only one dtype applies, the pair runs in it: the covering design never drops a pair."""
    target = Target("b", "none", CASES["balanced"], "float32")
    assert covering_dtype([target], "none", "balanced") is target
