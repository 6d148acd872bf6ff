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
    monkeypatch.setattr(script, "prepare_mnist", lambda out, source, per_class: prepared.append("mnist") or 0)
    monkeypatch.setattr(script, "mnist_5k_path", lambda: Path("mnist_5k.csv.gz"))
    for call in calls:
        argv = call[call.index("scripts/prepare_data.py") + 1 :]
        assert script.main(argv) == 0, call
    assert sorted(prepared) == ["fashion", "foolbox", "mnist"]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_data_checks_for_fashion_mnist_before_installing_anything() -> None:
    recipe = subprocess.run(["make", "-n", "data"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert recipe.index("dataset-fashion-mnist") < recipe.index("pip install")
    assert "sudo sh -c 'apt-get update && apt-get install -y dataset-fashion-mnist'" in recipe


def _mnist_csv(path: Path, labels: list[int]) -> Path:
    import gzip

    import numpy as np

    rng = np.random.default_rng(0)
    rows = [",".join(map(str, [*rng.integers(0, 256, 784), label])) for label in labels]
    path.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    return path


def test_mnist_writes_disjoint_train_and_test_splits_per_digit(tmp_path: Path) -> None:
    script = _load_script()
    source = _mnist_csv(tmp_path / "mnist.csv.gz", [0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    out = tmp_path / "data"
    assert script.main(["mnist", "--out", str(out), "--source", str(source), "--train-per-class", "2",
                        "--test-per-class", "1"]) == 0
    train = sorted(p.relative_to(out / "mnist" / "train").as_posix() for p in (out / "mnist" / "train").rglob("*.png"))
    test = sorted(p.relative_to(out / "mnist" / "test").as_posix() for p in (out / "mnist" / "test").rglob("*.png"))
    assert train == ["0/00000.png", "0/00001.png", "1/00003.png", "1/00004.png", "2/00007.png", "2/00008.png"]
    assert test == ["0/00002.png", "1/00005.png", "2/00009.png"]
    assert script.main(["mnist", "--out", str(out), "--source", str(source)]) == 0  # idempotent, no error


def test_mnist_refuses_a_malformed_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import gzip

    script = _load_script()
    bad = tmp_path / "bad.csv.gz"
    bad.write_bytes(gzip.compress(b"1,2,3\n4,5,6\n"))
    assert script.main(["mnist", "--out", str(tmp_path / "data"), "--source", str(bad)]) == 1
    assert "expected rows of 784 pixels" in capsys.readouterr().err
