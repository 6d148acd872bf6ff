"""What does building a timm ViT from a checkpoint's state dict cost, copied into a randomly initialised model (the
old way) or taken by a model built on the meta device (``build_model(..., take_weights=True)``, what loading a file
does)? (issue 22)

For each model: random weights (seed 0) as the state dict, then ``--rounds`` alternating builds of each kind from a
fresh clone of it, each timed on the process CPU clock and the wall clock; the two models' outputs are compared.

Usage: python bench/model_build.py [--models deit_small_patch16_224,vit_large_patch16_224] [--rounds 2]
       [--out bench/results]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import timm
import torch
from bench_record import header, machine_line, write_results

from tofu_export.models.timm_vit_build import build_model

KINDS = {"copied": False, "taken": True}


def measure(name: str, rounds: int) -> dict:
    torch.manual_seed(0)
    source = timm.create_model(name, pretrained=False).eval()
    weights = source.state_dict()
    times: dict[str, list[tuple[float, float]]] = {kind: [] for kind in KINDS}
    outputs = {}
    example = torch.randn(1, 3, *source.patch_embed.img_size)
    for _ in range(rounds):
        for kind, take in KINDS.items():
            given = {key: tensor.clone() for key, tensor in weights.items()}
            cpu, wall = time.process_time(), time.perf_counter()
            model, _ = build_model(given, arch=name, take_weights=take)
            times[kind].append((time.process_time() - cpu, time.perf_counter() - wall))
            with torch.no_grad():
                outputs[kind] = model(example)
            del model, given
    return {"model": name, "parameters_m": sum(p.numel() for p in source.parameters()) / 1e6,
            **{f"{kind}_cpu_s": [c for c, _ in times[kind]] for kind in KINDS},
            **{f"{kind}_wall_s": [w for _, w in times[kind]] for kind in KINDS},
            "same_outputs": bool(torch.equal(outputs["copied"], outputs["taken"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="deit_small_patch16_224,vit_large_patch16_224")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    rows = [measure(name, args.rounds) for name in args.models.split(",")]
    command = " ".join(["python bench/model_build.py", *sys.argv[1:]])
    machine = machine_line(load_before, f"timm {timm.__version__}")
    lines = [*header("Building a timm ViT from a state dict: copied into an initialised model, or taken (issue 22)",
                     command, machine),
             "`build_model(state_dict, arch=name)`: `copied` builds the model with timm's random initialisation "
             "and copies the weights in; `taken` (`take_weights=True`, what loading a checkpoint file does) builds "
             "it on the meta device and gives it the tensors themselves. Each cell lists every round.", "",
             "| model | M params | copied, CPU s | taken, CPU s | copied, wall s | taken, wall s | same outputs |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [" / ".join(f"{s:.2f}" for s in row[key])
                 for key in ("copied_cpu_s", "taken_cpu_s", "copied_wall_s", "taken_wall_s")]
        lines.append(f"| {row['model']} | {row['parameters_m']:.0f} | " + " | ".join(cells)
                     + f" | {'yes' if row['same_outputs'] else 'NO'} |")
    lines += ["", "Memory: a taken model holds the state dict's own tensors, so the weights are in memory once, not "
              "twice, while the model is built (not measured here)."]
    write_results(args.out, "model_build", lines, {"command": command, "machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
