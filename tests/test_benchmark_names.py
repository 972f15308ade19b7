"""A benchmark run as a script has benchmarks/ first on sys.path, so a benchmark named like a
library it imports (as `transitions.py` once was) hides that library from every benchmark."""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_no_benchmark_shadows_an_installed_module() -> None:
    elsewhere = [
        p for p in sys.path if p and Path(p).resolve() not in (BENCHMARKS, BENCHMARKS.parent)
    ]
    stems = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
    assert stems, "no benchmarks found"
    shadowing = [
        stem
        for stem in stems
        if stem in sys.builtin_module_names
        or importlib.machinery.PathFinder.find_spec(stem, elsewhere) is not None
    ]
    assert shadowing == []
