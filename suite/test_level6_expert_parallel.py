"""Level 6, expert parallel: the layer with experts sharded over N devices equals the same backend on
one device — routing, output, balance loss and every gradient — for N in {2, 4, 8}.

Comparison convention as level 4: the output and x's gradient row by row, the router's gradient as a
whole tensor, each expert's weight gradients as a whole tensor (exactly zero where no token reached
the expert). The tolerance is the ``expert_parallel`` level of `qmoe.suite.tolerances`: a backend against
itself, so only float reassociation between the two compiled programs can move a value.

Which configurations. Every (case, scheme, dtype, N) of the full grid costs two fresh compilations of
a sharded program (seconds each on CPU), so the default is a covering design of `CONFIGS`: every
scheme at N = 2 and at N = 4, each scheme in both dtypes, and each case chosen for what it does to the
dispatch — uneven routing (``all_on_one_top2``, ``one_expert``: one device receives most tokens;
``zipf_skew``), idle devices whose experts' gradients must stay exactly zero (``empty_experts``),
capacity applied in global token order (``capacity_drop``), a router bias (``sigmoid``), the shared
expert beside the sharded ones (``shared_expert``) and fewer tokens than devices (``one_token``).
N = 8 runs on the 8-expert cases, one expert per device, in both dtypes: Zipf-skewed routing (each
device's load is one expert's: devices 0 and 1 receive about 50 rows each, device 7 none), three idle
devices (``empty_experts``: experts 1, 5 and 6), capacity in global token order on the two overfull
devices (``capacity_drop``: rows from all eight sources compete for one expert's 16 places) and the
sigmoid router's bias.
``QMOE_LEVEL6_GRID=full`` runs the whole grid (`FULL_CASES` x schemes x dtypes x N) instead; there N = 8
also meets the 4-expert cases, where half the devices hold no expert (experts split ceil(E / N) per
device, as both backends document).

On CPU, N devices are simulated (``--xla_force_host_platform_device_count=8``, set by the plugin).

Backends whose N devices are N processes (``capabilities.expert_parallel_processes``: torch.distributed)
run the sharded side in a pool of N spawned ranks kept for the session (`qmoe.suite.process_group`: one
pool per N, gloo on CPU, NCCL on GPUs); every rank gets the whole batch and returns the whole result,
rank 0's is compared and the others must equal it bit for bit. Their covering design is
`PROCESS_CONFIGS` (float32, the dtype they declare on CPU): every scheme at N = 2 and N = 4, uneven
routing, idle ranks (``one_expert`` at N = 4), ranks without tokens (``one_token``), capacity in global
order, a sigmoid router, the shared expert; at N = 8, one expert per rank, idle ranks whose gradients
must stay exactly zero (``empty_experts``) and capacity in global order over Zipf-skewed routing
(``capacity_drop``): two configurations, as on CPU the eight ranks' start is most of their cost. One
forward and one backward per configuration and side, shared by the two tests. A rank's failure fails
the test with its traceback; a machine with fewer GPUs than N skips, saying how many it has.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import numpy as np
import pytest

from qmoe.reference.schemes import SCHEMES
from qmoe.suite.cases import BALANCE_COEFF, CASES
from qmoe.suite.checks import ConformanceError, assert_close, assert_exactly_zero, rerun_hint
from qmoe.suite.tolerances import DTYPES, tolerance

pytestmark = pytest.mark.conformance
REQUIRES = ("expert_parallel",)
EP_SIZES = (2, 4, 8)
#: Environment switch for the whole grid (slow: about 500 tests per backend).
GRID_ENV = "QMOE_LEVEL6_GRID"


@dataclass(frozen=True)
class EPConfig:
    case: str
    scheme: str
    dtype: str
    ep_size: int

    @property
    def id(self) -> str:
        return f"{self.scheme}-{CASES[self.case].id}-{self.dtype}-ep{self.ep_size}"


#: The covering design (see the module docstring): each scheme at N = 2 and N = 4 and in both dtypes;
#: N = 8 on the 8-expert cases (one expert per device), in both dtypes.
CONFIGS: tuple[EPConfig, ...] = (
    EPConfig("all_on_one_top2", "none", "float32", 2),
    EPConfig("zipf_skew", "none", "bfloat16", 4),
    EPConfig("balanced", "int8_dense", "float32", 2),
    # the largest difference of the full grid (5.1e-3, grad.x): the int8 shared expert in bfloat16
    EPConfig("shared_expert", "int8_dense", "bfloat16", 4),
    EPConfig("capacity_drop", "int8_routed", "bfloat16", 2),
    EPConfig("one_expert", "int8_routed", "float32", 4),
    EPConfig("sigmoid", "int8_all", "float32", 2),
    EPConfig("one_token", "int8_all", "bfloat16", 4),
    EPConfig("empty_experts", "int8_routed_prequant", "float32", 2),
    EPConfig("all_on_one_top2", "int8_routed_prequant", "bfloat16", 4),
    EPConfig("zipf_skew", "int8_routed", "float32", 8),
    EPConfig("empty_experts", "none", "bfloat16", 8),
    EPConfig("capacity_drop", "int8_routed_prequant", "float32", 8),
    EPConfig("sigmoid", "int8_all", "bfloat16", 8),
)
#: The covering design for process-group backends (see the module docstring).
PROCESS_CONFIGS: tuple[EPConfig, ...] = (
    EPConfig("all_on_one_top2", "none", "float32", 2),
    EPConfig("capacity_drop", "none", "float32", 4),
    EPConfig("empty_experts", "none", "float32", 4),
    EPConfig("sigmoid", "int8_routed", "float32", 2),
    EPConfig("one_expert", "int8_routed", "float32", 4),
    EPConfig("balanced", "int8_routed_prequant", "float32", 2),
    EPConfig("one_token", "int8_routed_prequant", "float32", 4),
    EPConfig("shared_expert", "qat_int8_row", "float32", 2),
    EPConfig("zipf_skew", "qat_int8_row", "float32", 4),
    EPConfig("empty_experts", "int8_routed", "float32", 8),
    EPConfig("capacity_drop", "qat_int8_row", "float32", 8),
)
#: Under the covering grid (``--qmoe-grid=covering``, the dev profile's default) half of each design:
#: every scheme once, N = 2, 4 and 8 and both dtypes still met, the uneven and idle cases kept.
QUICK = {
    EPConfig("all_on_one_top2", "none", "float32", 2),
    EPConfig("shared_expert", "int8_dense", "bfloat16", 4),
    EPConfig("capacity_drop", "int8_routed", "bfloat16", 2),
    EPConfig("one_token", "int8_all", "bfloat16", 4),
    EPConfig("empty_experts", "int8_routed_prequant", "float32", 2),
    EPConfig("one_expert", "int8_routed", "float32", 4),
    EPConfig("capacity_drop", "none", "float32", 4),
    EPConfig("balanced", "int8_routed_prequant", "float32", 2),
    EPConfig("zipf_skew", "qat_int8_row", "float32", 4),
    EPConfig("shared_expert", "qat_int8_row", "float32", 2),
    EPConfig("zipf_skew", "int8_routed", "float32", 8),
    EPConfig("empty_experts", "int8_routed", "float32", 8),
}
FULL_CASES = ("balanced", "zipf_skew", "all_on_one_top2", "one_expert", "empty_experts", "capacity_drop",
              "sigmoid", "shared_expert", "one_token")


def _full_grid() -> bool:
    grid = os.environ.get(GRID_ENV, "")
    if grid and grid != "full":
        raise pytest.UsageError(f"{GRID_ENV}={grid!r}: use 'full' or leave it unset")
    return grid == "full"


def _configs() -> tuple[EPConfig, ...]:
    if _full_grid():
        return tuple(EPConfig(*c) for c in itertools.product(FULL_CASES, SCHEMES, DTYPES, EP_SIZES))
    return CONFIGS + tuple(c for c in PROCESS_CONFIGS if c not in CONFIGS)


def applies_to(caps, test_name: str, params: dict) -> str | None:
    """Why an expert-parallel configuration does not apply to a backend (None: it does)."""
    config: EPConfig = params["config"]
    design = PROCESS_CONFIGS if caps.expert_parallel_processes else CONFIGS
    if not _full_grid() and config not in design:
        return "not in its expert-parallel covering design"
    if not _full_grid() and os.environ.get("QMOE_GRID") == "covering" and config not in QUICK:
        return "left to the full grid (--qmoe-grid=full; ci profile)"
    why = caps.unsupported(CASES[config.case].spec, config.scheme)
    if why:
        return why
    if config.dtype not in caps.dtypes:
        return f"does not declare dtype {config.dtype}"
    if config.ep_size not in caps.expert_parallel:
        return f"does not declare expert_parallel size {config.ep_size}"
    if test_name.endswith("backward") and "backward" not in caps.passes:
        return "does not declare backward"
    return None


def _require_devices(backend, ep_size: int) -> None:
    """Skip, saying why, where the machine has fewer devices than the configuration shards over."""
    count = backend.device_count()
    if count is not None and count < ep_size:
        pytest.skip(f"ep{ep_size} needs {ep_size} {backend.device} devices, {backend.name} sees {count}")


def _both(backend, config: EPConfig):
    """(case data, layer on one device, layer sharded over ``ep_size`` devices)."""
    _require_devices(backend, config.ep_size)
    data = CASES[config.case].build(config.dtype)
    one = backend.prepare(data.spec, data.params.copy(), config.scheme, config.dtype)
    sharded = backend.prepare(data.spec, data.params.copy(), config.scheme, config.dtype, ep_size=config.ep_size)
    return data, one, sharded


#: (backend class, device, config) -> results of a process-group backend, both passes, both sides.
_process_results: dict[tuple, dict] = {}


def _process_group_results(backend, config: EPConfig) -> dict:
    """One device here and N ranks in the session's pool, forward and backward each, once per config."""
    from qmoe.suite import process_group

    key = (process_group.reference_of(type(backend)), backend.device, config)
    if key in _process_results:
        return _process_results[key]
    _require_devices(backend, config.ep_size)
    data = CASES[config.case].build(config.dtype)
    one_state = backend.prepare(data.spec, data.params.copy(), config.scheme, config.dtype)
    one = {"forward": backend.forward(one_state, data.x),
           "backward": backend.backward(one_state, data.x, data.dy, balance_coeff=BALANCE_COEFF)}
    payload = {"backend": process_group.reference_of(type(backend)), "device": backend.device, "spec": data.spec,
               "params": data.params, "scheme": config.scheme, "dtype": config.dtype, "ep_size": config.ep_size,
               "x": data.x, "dy": data.dy, "balance_coeff": BALANCE_COEFF, "passes": ("forward", "backward")}
    try:
        ranks = process_group.pool(type(backend), config.ep_size, backend.device).call(process_group.run_layer,
                                                                                        payload)
    except process_group.WorkerError as exc:
        pytest.fail(f"ep{config.ep_size}: {exc}\n{rerun_hint()}", pytrace=False)
    for rank, other in enumerate(ranks[1:], start=1):
        _assert_ranks_agree(ranks[0], other, rank, config)
    _process_results[key] = {"data": data, "one": one, "sharded": ranks[0]}
    return _process_results[key]


def _assert_ranks_agree(first: dict, other: dict, rank: int, config: EPConfig) -> None:
    """Every rank returns the whole layer's result, gathered by the same collectives: identical."""
    pairs = [("y", first["forward"].y, other["forward"].y),
             ("expert_ids", first["forward"].expert_ids, other["forward"].expert_ids)]
    pairs += [(f"grad.{k}", v, other["backward"][k]) for k, v in first["backward"].items()]
    for what, a, b in pairs:
        if not np.array_equal(np.asarray(a), np.asarray(b)):
            raise ConformanceError(f"ep{config.ep_size}: rank {rank}'s {what} differs from rank 0's (the gathered "
                                   f"result must be the same on every rank)\n{rerun_hint()}")


def _assert_same_routing(one, sharded, what: str) -> None:
    """Expert ids identical: routing is decided on the global token set before the dispatch, by the
    same float32 arithmetic, so no selection may resolve differently."""
    if not np.array_equal(np.asarray(sharded.expert_ids), np.asarray(one.expert_ids)):
        wrong = np.argwhere(np.asarray(sharded.expert_ids) != np.asarray(one.expert_ids))
        t, k = (int(i) for i in wrong[0])
        raise ConformanceError(f"{what}.expert_ids: {len(wrong)} differ; token {t} slot {k}: sharded "
                               f"{sharded.expert_ids[t, k]}, one device {one.expert_ids[t, k]}\n{rerun_hint()}")


@pytest.mark.parametrize("config", _configs(), ids=lambda c: c.id)
def test_expert_parallel_forward(backend, config):
    tol = tolerance(config.scheme, config.dtype, "expert_parallel")
    if backend.capabilities.expert_parallel_processes:
        results = _process_group_results(backend, config)
        one, sharded = results["one"]["forward"], results["sharded"]["forward"]
    else:
        data, one_state, sharded_state = _both(backend, config)
        one = backend.forward(one_state, data.x)
        sharded = backend.forward(sharded_state, data.x)
    what = f"ep{config.ep_size}.forward"
    _assert_same_routing(one, sharded, what)
    assert_close(np.asarray(sharded.gate_weights), np.asarray(one.gate_weights), tol.tight, f"{what}.gate_weights",
                 tol.reason)
    assert_close(np.asarray(sharded.y), np.asarray(one.y), tol.tight, f"{what}.y", tol.reason)
    bound = tol.tight * max(1.0, abs(float(one.balance_loss)))
    assert abs(float(sharded.balance_loss) - float(one.balance_loss)) <= bound, \
        f"{what}.balance_loss {float(sharded.balance_loss)} vs one device {float(one.balance_loss)}\n{rerun_hint()}"


@pytest.mark.parametrize("config", _configs(), ids=lambda c: c.id)
def test_expert_parallel_backward(backend, config):
    tol = tolerance(config.scheme, config.dtype, "expert_parallel")
    if backend.capabilities.expert_parallel_processes:
        results = _process_group_results(backend, config)
        data, one, sharded = results["data"], results["one"]["backward"], results["sharded"]["backward"]
    else:
        data, one_state, sharded_state = _both(backend, config)
        one = backend.backward(one_state, data.x, data.dy, balance_coeff=BALANCE_COEFF)
        sharded = backend.backward(sharded_state, data.x, data.dy, balance_coeff=BALANCE_COEFF)
    assert sorted(sharded) == sorted(one), f"ep{config.ep_size} gradient keys {sorted(sharded)} vs {sorted(one)}"
    for name, expected in one.items():
        expected = np.asarray(expected, dtype=np.float64)
        actual = np.asarray(sharded[name], dtype=np.float64)
        if name in ("w13", "w2"):
            for e in range(data.spec.experts):
                what = f"ep{config.ep_size}.grad.{name}[expert={e}]"
                if not np.any(expected[e]):
                    assert_exactly_zero(actual[e], what)
                else:
                    assert_close(actual[e], expected[e], tol.tight, what, tol.reason, by_row=False)
        else:
            assert_close(actual, expected, tol.tight, f"ep{config.ep_size}.grad.{name}", tol.reason,
                         by_row=(name == "x"))
