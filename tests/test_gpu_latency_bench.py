"""bench/gpu_latency.py runs on the CPU (its smoke mode) and writes a table with every runner it promises."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_latency.py"


@pytest.mark.slow
def test_cpu_smoke_run_writes_every_variant_and_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("gpu_latency_bench", BENCH)  # the script's main, in this process
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    compiled: list[str] = []

    def no_compile(model, **options):  # --compile's rows, without inductor's minute of compiling
        compiled.append(options["mode"])
        return model

    monkeypatch.setattr(bench.torch, "compile", no_compile)
    table_path = bench.main(["--device", "cpu", "--models", "deit_tiny_patch16_224", "--img-size", "64", "--depth",
                             "2", "--batches", "1,2", "--dtypes", "fp32", "--iters", "2", "--r", "3", "--compile",
                             "--exporter", "torchscript",  # the rows are the subject, not the exporter: 5x cheaper
                             "--out", str(tmp_path)])
    assert table_path == tmp_path / "gpu_latency_cpu.md"  # a CPU run writes the CPU file
    assert not (tmp_path / "gpu_latency.md").exists(), "a CPU run must not write the GPU result files"
    result = json.loads((tmp_path / "gpu_latency_cpu.json").read_text())
    assert result["device"] == "cpu" and "not a GPU result" in result["benchmark"]
    rows = {(r["batch"], r["runtime"], r["variant"]): r for r in result["rows"]}
    expected = {(b, "torch-eager", v) for b in (1, 2) for v in ("baseline", "tome", "tofu-eager", "tofu", "prune")}
    expected |= {(b, "ort-cpu", v) for b in (1, 2) for v in ("baseline", "tome", "tofu")}
    expected |= {(b, "torch-compile", v) for b in (1, 2) for v in ("baseline", "tome", "tofu", "prune")}
    assert set(rows) == expected and compiled == ["default"] * 8  # on CPU without CUDA graphs
    for key, row in rows.items():
        assert row["median_ms"] > 0 and row["p90_ms"] >= row["median_ms"]
        if key[1] == "torch-compile":  # eager's kernel count would not describe inductor's kernels: none given
            assert row["count_per_block"] is None and row["speedup"] is not None
        else:
            assert row["count_per_block"] > 0
    assert rows[(1, "torch-eager", "baseline")]["speedup"] == 1.0
    # the reduction adds ops: every reduced variant runs more aten ops per block than the plain model
    assert all(rows[(1, "torch-eager", v)]["count_per_block"] > rows[(1, "torch-eager", "baseline")]["count_per_block"]
               for v in ("tome", "tofu-eager", "tofu", "prune"))
    table = (tmp_path / "gpu_latency_cpu.md").read_text()
    assert "| deit_tiny_patch16_224 | fp32 | 2 | ort-cpu | tofu |" in table
    assert result["models"]["deit_tiny_patch16_224"]["tofu_graph_reduction"]["nodes"] > 0
