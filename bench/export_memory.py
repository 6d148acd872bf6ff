"""Where does a large model's ONNX export hold its memory? (issue 22)

Runs the steps of the dynamo export one by one on a random-weight timm model with ToFu (torch's translation, its
graph optimiser, the ONNX proto, the opset conversion with the weights in it as it was done before and with them set
aside as it is done now, onnxslim) and records after each the process's resident memory and the highest it reached
during the step (sampled every 50 ms by a thread).

Usage: python bench/export_memory.py [--model vit_large_patch16_224] [--r 16] [--out bench/results]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import onnx
import timm
import torch
from bench_record import header, machine_line, write_results

from tofu_export import patch
from tofu_export.exporters import dynamo
from tofu_export.exporters.optimiser_rules import rewrite_rules_without
from tofu_export.exporters.simplify import simplify_graph


def resident_gb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 2**20


class Peak:
    """The highest resident memory seen since it started or was last ``reset``, sampled every 50 ms."""

    def __init__(self) -> None:
        self.gb = resident_gb()
        threading.Thread(target=self._sample, daemon=True).start()

    def reset(self) -> None:
        self.gb = resident_gb()

    def _sample(self) -> None:
        while True:
            self.gb = max(self.gb, resident_gb())
            time.sleep(0.05)


def measure(name: str, r: int) -> list[dict]:
    from torch.onnx._internal.exporter import _core

    peak, steps = Peak(), []

    def step(what: str) -> None:
        steps.append({"step": what, "resident_gb": resident_gb(), "peak_gb": max(peak.gb, resident_gb())})
        print(steps[-1], flush=True)
        peak.reset()

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    size = model.patch_embed.img_size[0]
    patch(model, r=r, mode="tofu", img_size=size)
    step("the patched torch model")
    registry = dynamo._registry(tuple(dynamo.translation_table(17).items()))
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), rewrite_rules_without():
        warnings.simplefilter("ignore")
        program = _core.export(model, (torch.randn(2, 3, size, size),), registry=registry,
                               dynamic_shapes=({0: batch},), input_names=["input"], output_names=["logits"],
                               optimize=False, verbose=False, opset_version=dynamo.EXPORT_OPSET)
    step("torch.export and the ONNX translation")
    program.optimize()
    step("torch's graph optimiser")
    proto = program.model_proto
    del program
    step("the ONNX proto")
    dynamo._name_by_scope(proto)
    with_weights = onnx.ModelProto.FromString(proto.SerializeToString())
    step("a copy of the proto for the conversion as it was")
    aside = dynamo.set_weights_aside
    dynamo.set_weights_aside = lambda graph: {}  # the converter given every weight, as before weights_aside.py
    try:
        converted = dynamo._convert_down(with_weights, 17)
    finally:
        dynamo.set_weights_aside = aside
    del with_weights, converted
    step("converted to opset 17 with the weights in it (both dropped)")
    converted = dynamo._convert_down(proto, 17)
    del proto
    step("converted to opset 17 with the weights set aside (the opset-18 proto dropped)")
    simplify_graph(converted, "onnxslim")
    step("onnxslim (its result dropped)")
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_large_patch16_224")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    steps = measure(args.model, args.r)
    weights_gb = sum(p.numel() * 4 for p in timm.create_model(args.model).parameters()) / 2**30
    command = " ".join(["python bench/export_memory.py", *sys.argv[1:]])
    machine = machine_line(load_before)
    lines = [*header("Resident memory through a large model's dynamo export (issue 22)", command, machine),
             f"{args.model} with random weights ({weights_gb:.2f} GB in fp32), ToFu r={args.r}; each step of "
             "`tofu_export.exporters.dynamo`'s export run on its own, then `simplify_graph` with onnxslim. "
             "Resident memory after each step, the highest reached during it, and how far that rose above the memory "
             "the step started from (memory a step frees is mostly kept by the allocator, so later steps start "
             "higher).", "",
             "| step | resident GB after | peak GB during the step | rise over the step's start, GB |",
             "|---|---|---|---|"]
    before = [steps[0]["resident_gb"], *(s["resident_gb"] for s in steps[:-1])]
    lines += [f"| {s['step']} | {s['resident_gb']:.2f} | {s['peak_gb']:.2f} | {s['peak_gb'] - b:+.2f} |"
              for s, b in zip(steps, before, strict=True)]
    write_results(args.out, "export_memory", lines, {"command": command, "machine": machine, "model": args.model,
                                                     "weights_gb": weights_gb, "steps": steps})


if __name__ == "__main__":
    main()
