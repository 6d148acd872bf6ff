"""What does torch's decomposition pass cost an export, and does skipping it where it changes nothing change the graph?

torch's dynamo exporter traces every captured graph a second time to decompose what its ONNX registry cannot
translate. ``tofu_export.exporters.decompositions`` skips that second trace where the captured graph holds nothing to
decompose. This script exports each model with ``export_onnx`` (the whole export: trace, simplification, checks,
parity) both ways, alternating which goes first, ``--pairs`` times, and reports the CPU and wall seconds of each
export and whether the two graphs are the same node for node (``graph_structure``).

Usage: python bench/export_decompositions.py [--checkpoint DINOV2.safetensors] [--models deit_small_patch16_224]
       [--r 16] [--pairs 3] [--out bench/results/export_decompositions]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import onnx
import timm
import torch
from bench_record import header, machine_line, write_results

from tofu_export import patch
from tofu_export.exporters import dynamo
from tofu_export.exporters.graph_structure import graph_structure
from tofu_export.exporters.onnx import export_onnx
from tofu_export.models.loading import load_model

WAYS = ("skipped where nothing to decompose", "torch's own (every graph decomposed)")


def build(source: str, r: int) -> tuple[torch.nn.Module, int]:
    """A checkpoint file (its weights) or a timm name (random weights, seed 0), patched with ToFu at ``r``."""
    if Path(source).exists():
        model = load_model(source).model
    else:
        torch.manual_seed(0)
        model = timm.create_model(source, pretrained=False).eval()
    size = model.patch_embed.img_size[0]
    if r:
        patch(model, r=r, mode="tofu", img_size=size)
    return model, size


def export_once(model: torch.nn.Module, size: int, way: str, path: Path) -> tuple[float, float]:
    """CPU and wall seconds of one whole export, ``way`` one of ``WAYS``."""
    original = dynamo.decompositions_where_needed
    if way == WAYS[1]:  # torch's exporter as it is
        dynamo.decompositions_where_needed = contextlib.nullcontext
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(model, path, size)
        return time.process_time() - cpu, time.perf_counter() - wall
    finally:
        dynamo.decompositions_where_needed = original


def measure(source: str, r: int, pairs: int, work: Path) -> dict:
    model, size = build(source, r)
    seconds: dict[str, dict[str, list[float]]] = {way: {"cpu": [], "wall": []} for way in WAYS}
    for pair in range(pairs):
        for way in (WAYS if pair % 2 == 0 else WAYS[::-1]):
            cpu, wall = export_once(model, size, way, work / f"{WAYS.index(way)}.onnx")
            seconds[way]["cpu"].append(cpu)
            seconds[way]["wall"].append(wall)
    graphs = [onnx.load(str(work / f"{i}.onnx")) for i in range(len(WAYS))]
    ratios = [a / b for a, b in zip(seconds[WAYS[0]]["cpu"], seconds[WAYS[1]]["cpu"], strict=True)]
    return {"model": Path(source).name, "r": r, "nodes": len(graphs[0].graph.node), "seconds": seconds,
            "cpu_ratio_per_pair": ratios, "same_graph": graph_structure(graphs[0]) == graph_structure(graphs[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="", help="a DINOv2 checkpoint (make dinov2), exported at --r and 0")
    parser.add_argument("--models", default="deit_small_patch16_224", help="timm names, random weights, at --r")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/export_decompositions"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    points = [(name, args.r) for name in args.models.split(",") if name]
    points += [(args.checkpoint, args.r), (args.checkpoint, 0)] if args.checkpoint else []
    with tempfile.TemporaryDirectory() as work:
        rows = [measure(source, r, args.pairs, Path(work)) for source, r in points]
    command = " ".join(["python bench/export_decompositions.py", *sys.argv[1:]])
    machine = machine_line(load_before, f"onnxscript {version('onnxscript')}")
    lines = [*header("torch's decomposition pass, skipped where it changes nothing: an export's cost", command,
                     machine),
             "Seconds of one whole `export_onnx` (dynamo exporter, opset 17, onnxslim, checks, parity at batch 1 and "
             "8; torch on one thread) each way, alternating which goes first; each cell lists every pair. "
             "'same graph': the two files are the same node for node, value names aside (`graph_structure`).", "",
             "| model | r | nodes | skipped, CPU s | torch's own, CPU s | median CPU ratio (per-pair range) | "
             "skipped / torch's own, wall s | same graph |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        fast, slow = (row["seconds"][way] for way in WAYS)
        ratios = row["cpu_ratio_per_pair"]
        lines.append(f"| {row['model']} | {row['r']} | {row['nodes']} | "
                     + " / ".join(f"{s:.1f}" for s in fast["cpu"]) + " | "
                     + " / ".join(f"{s:.1f}" for s in slow["cpu"])
                     + f" | {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) | "
                     f"{statistics.median(fast['wall']):.1f} / {statistics.median(slow['wall']):.1f} | "
                     f"{'yes' if row['same_graph'] else 'NO'} |")
    write_results(args.out, "export_decompositions", lines, {"command": command, "machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
