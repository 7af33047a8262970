"""Proof the suite has teeth: each mutant backend (one planted bug) makes the conformance suite fail,
in the test named for it. The suite runs once, in a subprocess, over every mutant (float32 only, to
keep it short); each parametrized test below then reads that run's outcomes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the mutants are built on torch_eager")

from tests.mutants import CONTROL, MUTANTS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

#: The slice of the suite the mutants run through: enough to reach every catcher (scheme none and
#: int8_routed; a balanced, an empty-expert and an outlier case), small enough for a minute of CPU.
SELECTION = ("float32 and not generated and (balanced or empty_experts or zero_rows_outliers) "
             "and (-none- or -int8_routed-)")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, list[dict]]:
    """nodeid -> outcome rows of one conformance run over all mutants."""
    report = tmp_path_factory.mktemp("mutants") / "conformance.json"
    command = [sys.executable, "-m", "pytest", "suite", "-m", "conformance", "-q", "-p", "no:cacheprovider",
               "-k", SELECTION, f"--conformance-json={report}", "--backend", ",".join([*MUTANTS, CONTROL.name])]
    for cls in [*(cls for cls, _ in MUTANTS.values()), CONTROL]:
        command.append(f"--backend-module=tests.mutants:{cls.__name__}")
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    if not report.exists():
        pytest.fail(f"the mutant run wrote no report:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return json.loads(report.read_text())["tests"]


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_mutant_is_caught(outcomes, mutant):
    _, catcher = MUTANTS[mutant]
    mine = [row for row in outcomes if f"[{mutant}-" in row["nodeid"]]
    failed = [row["nodeid"] for row in mine if row["outcome"] == "failed"]
    assert mine, f"no conformance test ran against {mutant}"
    assert failed, f"{mutant} passed the whole conformance suite: the planted bug went unnoticed"
    assert any(catcher in nodeid for nodeid in failed), \
        f"{mutant} should be caught by {catcher}; it failed only: {failed[:5]}"


def test_unmutated_backend_passes_the_same_run(outcomes):
    """The control: the same selection of tests passes for a mutant-free subclass."""
    control = [row for row in outcomes if "[mutant_control-" in row["nodeid"]]
    assert control, "the control backend did not run"
    failed = [row["nodeid"] for row in control if row["outcome"] == "failed"]
    assert not failed, f"the unmutated control fails: {failed[:5]}"
