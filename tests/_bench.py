"""bench/'s own modules for the tests (bench/ is a folder of scripts that import one another by bare name, not a
package), and a timing summary written out by hand."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def bench_modules(*names: str) -> list:
    """Import bench/<name>.py (or a package of bench/) for each name, with bench/ on sys.path only meanwhile."""
    sys.path.insert(0, str(BENCH))
    try:
        return [importlib.import_module(name) for name in names]
    finally:
        sys.path.remove(str(BENCH))


def timing(p25: float, median: float, p75: float, repeats: int = 3) -> dict:
    """A row's `*_ms` entry as bench/_measure.py writes it, with the quartiles given rather than computed."""
    return {"median": median, "p25": p25, "p75": p75, "min": p25, "times": [median] * repeats}
