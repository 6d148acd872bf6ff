"""Does calibrate's latency model predict the speed-up the exported graph measures? Fed noise or the model's own input.

``calibrate`` predicts a policy's latency from one-block graphs timed on the backend (``calibration.latency``) and
then measures the chosen policy's exported graph. This script builds the latency model twice per clock, with the
one-block graphs fed what ``calibrate`` feeds them (the block's input in the unreduced pass of real images, the stem
a real image) and fed standard normal noise of the same shapes (what ``calibrate`` fed before), and times the
exported unreduced, uniform ToMe, MLERP and prune graphs at --r (``measure_policy_latency`` runs, each with the
unreduced graph and ToMe in its rounds), all on standard normal noise (the runners' default) and all on a real image
(a ninth --data image, what ``calibrate`` times on now: its first held-out image). Reported per clock, feed and
variant: predicted speed-up, measured speed-ups (median of per-round ratios) and their ratios to the predicted; the
issue's target is a measured speed-up within 5% of the predicted.

Usage: python bench/latency_prediction.py --checkpoint <dinov2.safetensors> --data data/fashion-mnist
       [--r 16] [--clocks thread-cpu,wall] [--rounds 40] [--out bench/results]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import warnings
from importlib.metadata import version
from pathlib import Path

import torch
from bench_record import header, machine_line, write_results

from tofu_export import load_model
from tofu_export.calibration.images import load_images
from tofu_export.calibration.latency import measure_block_latency
from tofu_export.calibration.measured import measure_policy_latency
from tofu_export.calibration.trace import trace
from tofu_export.models.family import family_of
from tofu_export.schedule import plan_tokens

FEEDS = ("own input", "noise")
MODES = ("mean", "mlerp", "prune")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="images: the first calibration image and block inputs")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--clocks", default="thread-cpu,wall")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    load_before = os.getloadavg()[0]
    model = load_model(args.checkpoint).model
    family = family_of(model)
    tokens0, prefix, depth = family.num_tokens(model), family.num_prefix(model), family.depth(model)
    images, _ = load_images(args.data, model, 9)
    images, test = images[:8], images[8:]  # test: the image the whole graphs are timed on (not a block input's)
    block_in = trace(model, images, args.r).inputs[0]  # [8, N, C]
    feeds = {"own input": (block_in, images[:1]),
             "noise": (torch.randn(block_in.shape, generator=torch.Generator().manual_seed(0)),
                       torch.randn(images[:1].shape, generator=torch.Generator().manual_seed(1)))}
    uniform = plan_tokens(tokens0, prefix, [args.r] * depth, warn=False).r
    rows = []
    for clock in args.clocks.split(","):
        threads = 1 if clock == "thread-cpu" else None
        models = {feed: measure_block_latency(model, args.r, *feeds[feed], clock=clock, threads=threads,
                                              rounds=args.rounds) for feed in FEEDS}
        measured: dict[str, dict[str, float]] = {"noise": {}, "image": {}}
        for policy, timed_on in itertools.product(("mlerp", "prune"), measured):
            # each run: the unreduced graph, the policy and ToMe in the same rounds, all on noise or on a real image
            run = measure_policy_latency(model, [policy] * depth, uniform, clock=clock, threads=threads,
                                         rounds=args.rounds, tome_r=(args.r,), image=test if timed_on == "image"
                                         else None)
            measured[timed_on][policy], measured[timed_on]["mean"] = run.speedup, run.tome_speedup[args.r]
            print(clock, policy, timed_on, run.speedup, run.tome_speedup, flush=True)
        for feed, latency in models.items():
            baseline = latency.predict_ms(tokens0, prefix, [0] * depth, ["mean"] * depth)
            for mode in MODES:
                predicted = baseline / latency.predict_ms(tokens0, prefix, uniform, [mode] * depth)
                rows.append({"clock": clock, "feed": feed, "mode": mode, "predicted": predicted,
                             "measured_noise": measured["noise"][mode], "measured_image": measured["image"][mode],
                             "baseline_predicted_ms": baseline})
    command = " ".join(["python bench/latency_prediction.py", *sys.argv[1:]])
    machine = machine_line(load_before, f"onnxruntime {version('onnxruntime')}")
    lines = [*header("calibrate's latency model: predicted against measured speed-up, the one-block graphs fed the "
                     "model's own input or noise", command, machine),
             f"{Path(args.checkpoint).name}, uniform r={args.r} (`{uniform}`), batch 1, dynamo graphs at opset 17. "
             "thread-cpu: one ORT intra-op thread, the calling thread's CPU time; wall: ORT's default threads. "
             f"Latency model: one-block graphs, {args.rounds} interleaved rounds; measured: the exported whole "
             f"graphs, {args.rounds} interleaved rounds, median of per-round speed-ups over the unreduced graph "
             "(ToMe in the rounds of both runs: the MLERP run's figure shown).", "",
             "| clock | one-block graphs fed | mode | predicted unreduced ms | predicted speed-up | measured on noise "
             "(/ predicted) | measured on a real image (/ predicted) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['clock']} | {r['feed']} | {r['mode']} | {r['baseline_predicted_ms']:.1f} | "
              f"{r['predicted']:.3f}x | {r['measured_noise']:.3f}x ({r['measured_noise'] / r['predicted']:.3f}) | "
              f"{r['measured_image']:.3f}x ({r['measured_image'] / r['predicted']:.3f}) |" for r in rows]
    write_results(args.out, "latency_prediction", lines, {"command": command, "machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
