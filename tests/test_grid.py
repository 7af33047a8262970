"""The covering grid (``--qmoe-grid=covering``): each (case, scheme) pair once, and still every case and
every scheme in every dtype, so the dev profile halves the targets without losing a pair of factors.
Level 6 chooses its own covering designs (expert parallel); they must meet every N the backends declare."""

from __future__ import annotations

import itertools

import pytest

from qmoe.implementations.jax_prequant import JaxPrequantBackend
from qmoe.implementations.torch_triton import TorchTritonBackend
from qmoe.reference import SCHEMES
from qmoe.suite import test_level6_expert_parallel as level6
from qmoe.suite.cases import CASES
from qmoe.suite.plugin import CPU_DEVICES, Target, covering_dtype
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


# -- level 6's designs ------------------------------------------------------------------------------------------
EP_BACKENDS = (JaxPrequantBackend, TorchTritonBackend)


def _level6_design(cls) -> tuple[level6.EPConfig, ...]:
    return level6.PROCESS_CONFIGS if cls.capabilities.expert_parallel_processes else level6.CONFIGS


def test_level6_sizes_are_declared_and_simulated_on_cpu():
    assert level6.EP_SIZES == (2, 4, 8)
    for cls in EP_BACKENDS:
        assert cls.capabilities.expert_parallel == level6.EP_SIZES, cls.name
    assert CPU_DEVICES >= max(level6.EP_SIZES)  # JAX's simulated CPU devices


@pytest.mark.parametrize("cls", EP_BACKENDS, ids=lambda cls: cls.name)
def test_level6_designs_meet_every_declared_size(cls, monkeypatch):
    """Each backend's covering design, and its quick half (``--qmoe-grid=covering``), shards over every N
    it declares; N = 8 only on 8-expert cases (one expert per device), among them the idle devices of
    ``empty_experts``, and in every dtype the backend declares; and every configuration applies to it."""
    design = _level6_design(cls)
    quick = [c for c in design if c in level6.QUICK]
    assert {c.ep_size for c in design} == {c.ep_size for c in quick} == set(cls.capabilities.expert_parallel)
    ep8 = [c for c in design if c.ep_size == 8]
    assert all(CASES[c.case].spec.experts == 8 for c in ep8), ep8
    assert "empty_experts" in {c.case for c in ep8}
    assert {c.dtype for c in ep8} == set(cls.capabilities.dtypes)
    monkeypatch.setenv("QMOE_GRID", "full")
    monkeypatch.delenv(level6.GRID_ENV, raising=False)
    for test_name in ("test_expert_parallel_forward", "test_expert_parallel_backward"):
        for config in design:
            assert level6.applies_to(cls.capabilities, test_name, {"config": config}) is None, config


def test_level6_quick_half_is_drawn_from_the_designs():
    assert level6.QUICK <= set(level6.CONFIGS) | set(level6.PROCESS_CONFIGS)
