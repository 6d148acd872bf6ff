"""``tofu-export check MODEL.onnx --costs``: the per-block reduction table, in text and JSON."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from tofu_export.cli import app

ENV = {"COLUMNS": "200", "NO_COLOR": "1"}


def test_costs_table_lists_every_reducing_block(mixed_tofu_onnx: Path) -> None:
    result = CliRunner().invoke(app, ["check", str(mixed_tofu_onnx), "--trt", "10", "--costs"], env=ENV)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("block  nodes"))
    end = next(i for i in range(header + 1, len(lines)) if lines[i].startswith("total"))  # the verdict table follows
    blocks = [line.split()[0] for line in lines[header + 1:end + 1] if line.strip()]
    assert blocks == ["0", "1", "2", "3", "total"]
    assert "TopK 3" in lines[header + 1]  # best match (k=1), edge order, unmerged order


def test_costs_in_json_and_absent_without_the_flag(mixed_tofu_onnx: Path) -> None:
    result = CliRunner().invoke(app, ["check", str(mixed_tofu_onnx), "--trt", "10", "--costs", "--json"], env=ENV)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [b["block"] for b in report["reduction_costs"]["blocks"]] == [0, 1, 2, 3]
    assert report["reduction_costs"]["total"]["nodes"] == sum(b["nodes"] for b in report["reduction_costs"]["blocks"])
    assert all(b["kernels"] <= 25 for b in report["reduction_costs"]["blocks"])  # MLERP's budget (issue 23)
    plain = CliRunner().invoke(app, ["check", str(mixed_tofu_onnx), "--trt", "10", "--json"], env=ENV)
    assert "reduction_costs" not in json.loads(plain.output)
