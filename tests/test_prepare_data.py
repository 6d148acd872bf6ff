"""scripts/prepare_data.py as the Makefile calls it."""

from __future__ import annotations

import importlib.util
import shlex
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "scripts" / "prepare_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_data_calls_the_script_with_arguments_it_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every prepare_data.py line of ``make data`` parses, and together they prepare both datasets."""
    recipe = subprocess.run(["make", "-n", "data"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    calls = [shlex.split(line) for line in recipe.splitlines() if "scripts/prepare_data.py" in line]
    script = _load_script()
    prepared: list[str] = []
    monkeypatch.setattr(script, "prepare_foolbox", lambda out: prepared.append("foolbox") or 0)
    monkeypatch.setattr(script, "prepare_fashion_mnist", lambda out, source, per_class: prepared.append("fashion") or 0)
    for call in calls:
        argv = call[call.index("scripts/prepare_data.py") + 1 :]
        assert script.main(argv) == 0, call
    assert sorted(prepared) == ["fashion", "foolbox"]
