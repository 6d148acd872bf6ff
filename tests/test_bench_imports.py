"""Every benchmark script imports: the names it takes from the library and from the scripts beside it still exist.

The scripts are run by hand, rarely, and a refactor of the library can remove a name one of them imports (a
benchmark then fails only when someone next reproduces its figures). Importing runs none of them: each keeps its
work under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCH.glob("*.py")))
def test_the_benchmark_script_imports(script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import their siblings, as when run from bench/
    module = importlib.import_module(script)
    assert module.__file__ == str(BENCH / f"{script}.py")
