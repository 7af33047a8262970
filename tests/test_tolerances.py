"""The tolerance table is the only one, complete, and used: every entry has a reason, every level and
every named bound is read by a conformance test, and every fidelity floor is measured, not copied."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from qmoe.reference.schemes import SCHEMES
from qmoe.suite import tolerances

SUITE = Path(tolerances.__file__).resolve().parent
#: Names in the table module that are its structure, not bounds.
STRUCTURE = {"LEVELS", "DTYPES", "KINDS", "TOLERANCES"}


def _suite_sources(include_table: bool = False) -> dict[str, str]:
    return {path.name: path.read_text() for path in SUITE.rglob("*.py")
            if include_table or path.name != "tolerances.py"}


def _names_used(source: str) -> set[str]:
    """Names read (not assigned) in ``source``."""
    tree = ast.parse(source)
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)} | \
        {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}


def test_every_scheme_dtype_and_level_has_an_entry_with_a_reason():
    for scheme in SCHEMES:
        for dtype in tolerances.DTYPES:
            for level in tolerances.LEVELS:
                entry = tolerances.tolerance(scheme, dtype, level)
                assert entry.reason.strip(), f"({scheme}, {dtype}, {level}) has no reason"
                assert entry.tight >= 0


def test_a_missing_entry_says_where_to_add_it():
    with pytest.raises(KeyError, match="suite/tolerances.py"):
        tolerances.tolerance("int4_something", "float32", "forward")


def test_every_level_is_asked_for_by_some_suite_module():
    sources = _suite_sources()
    for level in tolerances.LEVELS:
        users = [name for name, text in sources.items() if f'"{level}")' in text and "tolerance(" in text]
        assert users, f"no suite module asks tolerance(..., {level!r}): the entry is dead"


def test_every_named_bound_is_read():
    """Every named constant of the table is read: by a test or check, or by the table's own derivation."""
    used = set().union(*(_names_used(text) for text in _suite_sources(include_table=True).values()))
    module = ast.parse(Path(tolerances.__file__).read_text())
    constants = [target.id for node in module.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                 for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                 if isinstance(target, ast.Name) and target.id.isupper() and not target.id.startswith("_")]
    assert constants, "found no named bounds in suite/tolerances.py"
    dead = sorted(set(constants) - STRUCTURE - used)
    assert not dead, f"named bounds no suite module reads: {dead}"


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if SCHEMES[s].quantized])
def test_fidelity_floors_come_from_the_measurement(scheme):
    """The table's measured SQNR is today's measurement (to its 0.1 dB rounding), every lossy tensor kind
    has one, and the floors of both dtypes derive from it."""
    table = tolerances.MEASURED_SQNR_DB[scheme]
    for kind, value in tolerances.measure_reference_sqnr(scheme).items():
        if not np.isfinite(value):
            assert kind not in table, f"{scheme}: {kind} is exact, yet has a floor"
            continue
        assert kind in table, f"{scheme}: {kind} loses fidelity ({value:.1f} dB) but has no measurement"
        assert abs(table[kind] - value) <= 0.051, \
            f"{scheme}: {kind} measured {value:.2f} dB, the table says {table[kind]}: " \
            "re-measure (python -m qmoe.suite.tolerances)"
    for dtype in tolerances.DTYPES:
        floors = tolerances.tolerance(scheme, dtype, "forward").sqnr_floor_db
        assert set(floors) == set(table)
        for kind, floor in floors.items():
            assert floor == tolerances.fidelity_floor(table[kind], dtype) <= table[kind] - tolerances.FLOOR_MARGIN_DB
