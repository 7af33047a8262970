"""jax_prequant's expert-parallel forward as separate stage programs (`programs.ep_forward_stages`), the
decomposition the expert-parallel benchmark times: composed, the route, dispatch, experts and combine
programs (+ the shared expert) must give the one-program forward's output exactly, for float and int8
dispatch, with and without a shared expert, on 2 and 4 devices.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax", reason="the jax_prequant backend needs jax")

import jax  # noqa: E402

from qmoe.implementations.jax_prequant import JaxPrequantBackend, programs  # noqa: E402
from qmoe.suite.cases import CASES  # noqa: E402

pytestmark = pytest.mark.backend("jax_prequant")


def _stages(case: str, scheme: str, dtype: str, ep_dispatch: str, ep_size: int):
    if len(jax.devices("cpu")) < ep_size:
        pytest.skip(f"needs {ep_size} CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax "
                    "is imported (the suite plugin sets it)")
    data = CASES[case].build(dtype)
    backend = JaxPrequantBackend("cpu", ep_dispatch=ep_dispatch)
    prepared = backend.prepare(data.spec, data.params, scheme, dtype, ep_size=ep_size)
    x_dev = backend._put_tokens(prepared, data.x)
    plan = backend._plan_for(prepared, x_dev)
    y_program = np.asarray(programs.forward(prepared.params, prepared.frozen, x_dev, plan)[0])
    y_stages, stages = programs.ep_forward_stages(prepared.params, prepared.frozen, x_dev, plan)
    return data, y_program, np.asarray(y_stages), stages


@pytest.mark.parametrize(("case", "scheme", "dtype", "ep_dispatch", "ep_size"), [
    ("balanced", "none", "float32", "float", 2),
    ("balanced", "none", "float32", "int8", 2),
    ("balanced", "int8_routed_prequant", "float32", "float", 2),
    ("balanced", "int8_all", "bfloat16", "float", 4),
    ("shared_expert", "int8_routed", "float32", "float", 2),
    ("shared_expert", "none", "bfloat16", "int8", 4),
])
def test_composed_stages_reproduce_the_one_program_forward(case, scheme, dtype, ep_dispatch, ep_size):
    data, y_program, y_stages, stages = _stages(case, scheme, dtype, ep_dispatch, ep_size)
    assert y_stages.shape == y_program.shape == data.x.shape
    assert np.array_equal(y_stages, y_program), (
        f"stages differ from the one program by up to {np.max(np.abs(y_stages - y_program)):.3e}")
    expected = {"route", "dispatch", "experts", "combine"} | ({"shared"} if data.spec.shared_ffn else set())
    assert set(stages) == expected
    for run in stages.values():  # each stage program re-runs on its stored inputs
        jax.block_until_ready(run())


def test_dispatch_stage_sends_what_the_one_program_sends():
    """The dispatch stage's all-to-alls are the one program's dispatch exchanges (ids, then codes + scales)."""
    _, _, _, stages = _stages("balanced", "int8_routed", "float32", "float", 2)
    incoming, received = stages["dispatch"]()
    assert incoming.dtype.name == "int32"
    assert [value.dtype.name for value in received] == ["int8", "float32"]
