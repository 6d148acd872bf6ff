"""What does onnxscript's ``SlicesSplit`` rule cost an export, and does leaving it out change the graph? (issue 22)

torch's dynamo exporter ends with onnxscript's graph optimiser (``optimizer.optimize_ir``). One of its default
rewrite rules, ``SlicesSplit``, has a two-node pattern, and onnxscript matches such patterns by walking the whole
graph for every candidate node: for every ``Slice``, every node. ``tofu_export.exporters.optimiser_rules`` leaves that
rule out (``rewrite_rules_without``). This script exports each model's ToFu graph once without optimisation, then
optimises copies of it with and without the rule, alternating, ``--rounds`` times each, and reports the CPU
seconds of each optimisation and whether the two graphs are byte for byte the same.

Usage: python bench/optimiser_rules.py [--models deit_small_patch16_224,vit_large_patch16_224] [--r 8]
       [--rounds 2] [--out bench/results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import onnx
import onnx_ir as ir
import timm
import torch
from bench_record import header, machine_line, write_results
from onnxscript.optimizer import optimize_ir

from tofu_export import patch
from tofu_export.exporters import dynamo
from tofu_export.exporters.optimiser_rules import rewrite_rules_without


def unoptimised_graph(name: str, r: int) -> onnx.ModelProto:
    """``name`` (random weights, seed 0) with ToFu at ``r``, through torch's dynamo exporter and this project's
    translations, before any graph optimisation; batch dynamic, as an export writes it."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    patch(model, r=r, mode="tofu")
    size = model.patch_embed.img_size[0]
    shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (torch.randn(2, 3, size, size),), dynamo=True,
                                    opset_version=dynamo.EXPORT_OPSET, dynamic_shapes=shapes,
                                    custom_translation_table=dynamo.translation_table(17), optimize=False,
                                    verbose=False)
    return program.model_proto


def optimise(graph: onnx.ModelProto, skip_rule: bool) -> tuple[bytes, float]:
    """The optimised graph's bytes and the CPU seconds the optimisation took."""
    model = ir.from_proto(graph)
    start = time.process_time()
    if skip_rule:
        with rewrite_rules_without():
            optimize_ir(model)
    else:
        optimize_ir(model)
    seconds = time.process_time() - start
    return ir.to_proto(model).SerializeToString(), seconds


def measure(name: str, r: int, rounds: int) -> dict:
    graph = unoptimised_graph(name, r)
    times: dict[str, list[float]] = {"with": [], "without": []}
    outputs: dict[str, bytes] = {}
    for _ in range(rounds):
        for label in ("with", "without"):
            outputs[label], seconds = optimise(graph, skip_rule=label == "without")
            times[label].append(seconds)
    return {"model": name, "r": r, "nodes_before": len(graph.graph.node),
            "slices": sum(node.op_type == "Slice" for node in graph.graph.node),
            "with_rule_s": times["with"], "without_rule_s": times["without"],
            "same_graph": outputs["with"] == outputs["without"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="deit_small_patch16_224,vit_large_patch16_224")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    rows = [measure(name, args.r, args.rounds) for name in args.models.split(",")]
    command = " ".join(["python bench/optimiser_rules.py", *sys.argv[1:]])
    machine = machine_line(load_before, f"onnxscript {version('onnxscript')}")
    lines = [*header("onnxscript's SlicesSplit rule: its cost in torch's graph optimiser (issue 22)", command,
                     machine),
             "CPU seconds of `onnxscript.optimizer.optimize_ir` on one ToFu graph (dynamo exporter, before "
             "optimisation), with and without the rule, alternating; each cell lists every round.", "",
             "| model | r | nodes before | Slice nodes | with the rule, CPU s | without, CPU s | median ratio | "
             "same graph |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = statistics.median(row["without_rule_s"]) / statistics.median(row["with_rule_s"])
        lines.append(f"| {row['model']} | {row['r']} | {row['nodes_before']} | {row['slices']} | "
                     + " / ".join(f"{s:.2f}" for s in row["with_rule_s"]) + " | "
                     + " / ".join(f"{s:.2f}" for s in row["without_rule_s"]) + f" | {ratio:.2f} | "
                     f"{'yes' if row['same_graph'] else 'NO'} |")
    write_results(args.out, "optimiser_rules", lines, {"command": command, "machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
