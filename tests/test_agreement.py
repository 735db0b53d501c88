"""The same method in several libraries agrees (table in benchmarks/agreement.py).

Each family's members run through esegeta on the sample models; every member's map must
correlate with the family's first member at least as well as the family's floor. The
measured figures are printed by ``python benchmarks/agreement.py``.
"""
from __future__ import annotations

import pytest

from benchmarks.agreement import FAMILIES, correlations

CASES = [(f, c) for f in FAMILIES for c in f.cases]


@pytest.mark.parametrize("family,case_name", CASES, ids=[f"{f.name}-{c}" for f, c in CASES])
def test_libraries_agree(family, case_name):
    pairs = correlations(family, case_name)
    assert pairs, "a family needs at least two members on the case"
    for reference, other, r in pairs:
        assert r >= family.floor, f"{other} vs {reference} on {case_name}: r={r:.4f} < {family.floor}"
