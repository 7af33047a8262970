"""Proof the suite has teeth: each mutant backend (one planted bug) makes the conformance suite fail,
in the test named for it, by at least ten times that test's bound. The suite runs once, in a
subprocess, over every mutant and the unmutated controls; each parametrized test below then reads
that run's outcomes. ``pytest tests/test_mutants.py -rA`` prints which test caught which mutant, by
how much (error / bound; ``inf`` for a discrete mismatch such as a wrong expert id).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the mutants are built on torch_eager")

from qmoe.implementations.torch_triton import TorchTritonBackend  # noqa: E402
from tests.mutants import CONTROLS, MUTANTS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

#: A catcher must fail by at least this factor over its bound: a bug that only grazes the bound is
#: one tolerance tweak away from passing.
MIN_RATIO = 10.0

#: Per scheme, the cases the mutants run through (float32, where the tight bounds are tightest): scheme
#: none for routing (ties, capacity drops, sigmoid routers with a bias, shared experts whose gates do
#: not sum to one), gradients and empty experts; int8_routed for the quantizers (exact .5 ties,
#: outlier and zero rows) and the update; int8_routed_prequant (torch_triton only, whose kernels run
#: interpreted on CPU) for its custom VJP. A -k name matches as a substring: "sigmoid" also selects
#: shared_sigmoid, "ties" exact_ties.
SCHEME_CASES: dict[str, tuple[str, ...]] = {
    "none": ("balanced", "empty_experts", "ties", "capacity_drop", "sigmoid", "shared_no_renorm"),
    "int8_routed": ("balanced", "empty_experts", "zero_rows_outliers", "exact_ties"),
    "int8_routed_prequant": ("balanced",),
}
#: Tests that compare nothing a mutant breaks alone (SQNR floors, bypass routing) stay out; the
#: quantizer's fixed cases (level 1) come in.
SELECTION = ("(float32 and not generated and not fidelity and not bypass and ("
             + " or ".join(f"(-{scheme}- and ({' or '.join(cases)}))" for scheme, cases in SCHEME_CASES.items())
             + ") and (not triton or -int8_routed_prequant-)) or quantizer_fixed_cases")
#: Words of the selection that a backend's name must not contain (else -k selects all its tests).
SELECTION_WORDS = ("float32", "generated", "fidelity", "bypass", "quantizer_fixed_cases",
                   *(f"-{scheme}-" for scheme in SCHEME_CASES), *(c for cases in SCHEME_CASES.values() for c in cases))


def _backend_of(nodeid: str, name: str) -> bool:
    return f"[{name}-" in nodeid or f"[{name}]" in nodeid


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> list[dict]:
    """The outcome rows (``--conformance-json``) of one conformance run over all mutants and controls."""
    report = tmp_path_factory.mktemp("mutants") / "conformance.json"
    classes = [*(cls for cls, _ in MUTANTS.values()), *CONTROLS]
    command = [sys.executable, "-m", "pytest", "suite", "-m", "conformance", "-q", "-p", "no:cacheprovider",
               "--qmoe-grid=full", "-k", SELECTION, f"--conformance-json={report}",
               "--backend", ",".join(c.name for c in classes)]
    command += [f"--backend-module=tests.mutants:{cls.__name__}" for cls in classes]
    run = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    if not report.exists():
        pytest.fail(f"the mutant run wrote no report:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return json.loads(report.read_text())["tests"]


def _worst_failure(row: dict) -> tuple[float, str]:
    """(ratio, what) of the row's worst failed comparison; (nan, '') where it recorded none."""
    failed = [(f["ratio"] if f.get("ratio") is not None else math.inf, f.get("what", "?"))
              for f in row["figures"] if f.get("failed")]
    return max(failed) if failed else (math.nan, "")


def _skip_if_unavailable(rows: list[dict], name: str) -> None:
    """A backend that cannot run here (torch_triton without triton) skips every test: say so, once."""
    if all(row["outcome"] == "skipped" for row in rows):
        pytest.skip(f"every test of {name} was skipped: {rows[0]['reason']}")


def _short(nodeid: str) -> str:
    return nodeid.removeprefix("suite/")


def _times(ratio: float) -> str:
    """error / bound as text; inf for a discrete mismatch (a wrong expert id, a NaN, an off-grid weight)."""
    return "inf" if ratio == math.inf else f"{ratio:.3g}"


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_mutant_is_caught(outcomes, mutant):
    _, catcher = MUTANTS[mutant]
    mine = [row for row in outcomes if _backend_of(row["nodeid"], mutant)]
    assert mine, f"no conformance test ran against {mutant}"
    _skip_if_unavailable(mine, mutant)
    failed = [row for row in mine if row["outcome"] == "failed"]
    caught = [(*_worst_failure(row), row) for row in failed]
    table = "\n".join(f"  {_times(ratio):>9}  {what or '(no figures recorded)'}  in {_short(row['nodeid'])}"
                      for ratio, what, row in sorted(caught, key=lambda c: -c[0] if c[0] == c[0] else 0)[:12])
    assert failed, f"{mutant} passed all {len(mine)} conformance tests it ran: the planted bug went unnoticed"
    by_catcher = [c for c in caught if catcher in c[2]["nodeid"]]
    assert by_catcher, f"{mutant} should be caught by {catcher}; it failed only (error/bound, check, test):\n{table}"
    best_ratio, best_what, best_row = max(by_catcher, key=lambda c: c[0] if c[0] == c[0] else -1.0)
    assert best_ratio >= MIN_RATIO, (
        f"{mutant} fails {catcher} only by error/bound {_times(best_ratio)} ({best_what or 'no figures recorded'}), "
        f"less than {MIN_RATIO:g}; its failures (error/bound, check, test):\n{table}")
    print(f"{mutant}: caught by {_short(best_row['nodeid'])}: {best_what} at error/bound {_times(best_ratio)} "
          f"({len(failed)} of {len(mine)} tests failed)")


@pytest.mark.parametrize("control", [cls.name for cls in CONTROLS])
def test_unmutated_backend_passes_the_same_run(outcomes, control):
    """The controls: the same selection of tests passes for a mutant-free subclass of each backend."""
    rows = [row for row in outcomes if _backend_of(row["nodeid"], control)]
    assert rows, f"the control backend {control} did not run"
    _skip_if_unavailable(rows, control)
    failed = [f"{_short(row['nodeid'])}: {row['message']}" for row in rows if row["outcome"] == "failed"]
    assert not failed, f"the unmutated control {control} fails:\n" + "\n".join(failed[:5])


def test_mutant_names_stay_out_of_the_selection():
    """-k matches names as substrings: a mutant named like a case or a scheme would run every test.
    Backends built on torch_triton carry "triton" in their name (the selection keeps them to prequant)."""
    for cls in [*(cls for cls, _ in MUTANTS.values()), *CONTROLS]:
        assert ("triton" in cls.name) == issubclass(cls, TorchTritonBackend), \
            f"{cls.name}: the name must contain 'triton' exactly when the backend is torch_triton"
        clashes = [word for word in SELECTION_WORDS if word in cls.name]
        assert not clashes, f"backend name {cls.name} contains {clashes}: rename it (the selection is {SELECTION!r})"
