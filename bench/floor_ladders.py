"""Does a fidelity floor's search gain from ladders stepped one token at a time? (DINOv2 ViT-S/14, issue 23)

``calibrate --min-cosine`` (the default budget, 0.995) bisects ladders of candidates for the fastest policy that keeps
the floor on the search images (``calibration.floor``). Its stepped ladders moved between the r choices (0, r/2, r,
3r/2, 2r), which can stop well short of the floor; a latency budget's shortlist already holds the same ladders
stepped one token at a time. This script runs ``calibration.measure`` once (r=16, 64 Fashion-MNIST train images,
thread-CPU clock, dynamo exporter, as ``bench/selection_images.py``), then per floor:

1. the floor's pick with the coarse ladders only (``floor.floor_ladders`` without the one-token ones) and with both
   (what ``calibrate`` now does): its predicted speed-up, cosine on the search images, forwards and seconds taken;
   and, with ``--confirm-images`` K, also with both and the fastest passes run again on K more train images until
   one keeps the floor over both sets (what ``calibrate`` does by default, K = 192);
2. each pick's cosine on ``--test`` held-out Fashion-MNIST test images, against uniform ToMe interpolated at the
   pick's predicted speed-up (``latency_model.interpolate_linear`` over uniform ToMe at every r in ``--tome-r``), with
   a bootstrap SE over the images.

Speed-ups are the latency model's predictions (within 1-2% of measured in the matched runs); no graph is timed
after the calibration. Usage:
    python bench/floor_ladders.py --floors 0.998,0.995,0.99 --test 1000 [--confirm-images 192] \\
        --test-folder /work/data10k/fashion-mnist/test --out bench/results/floor_ladders
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from bench_record import write_results
from selection_images import calibrated, embed, per_image_cosines

from tofu_export.calibration import Budget, load_images
from tofu_export.calibration import floor as floor_module
from tofu_export.calibration.latency_model import interpolate_linear
from tofu_export.models.family import family_of
from tofu_export.profiling.device import describe_device
from tofu_export.schedule import plan_tokens


def coarse_ladders(ladders: list) -> list:
    """``floor_ladders`` as it was: ``ladders`` without the one-token ones."""
    return [ladder for ladder in ladders if not ladder[0].endswith(", one-token steps")]


def floor_pick(calibration, floor: float, ladders: list, confirm: bool) -> dict:
    """The floor's pick bisecting ``ladders`` (``floor_ladders``' or a subset), with or without the confirm images,
    its forwards and seconds."""
    started = time.perf_counter()
    searched = calibration if confirm else dataclasses.replace(calibration, confirm=None)
    chosen, _, record = floor_module.floor_choice(searched, Budget(min_cosine=floor), "damage", ladders=ladders)
    pick = next(c for c in record["candidates"] if c["chosen"])
    return {"source": pick["source"], "modes": list(chosen.modes), "r": list(chosen.r),
            "predicted_speedup": calibration.baseline_ms / chosen.latency_ms,
            "search_cosine": pick["measured_cosine"], "confirm_cosine": pick.get("confirm_cosine"),
            "forwards": len(record["candidates"]) + sum("confirm_cosine" in c for c in record["candidates"]),
            "rounds": 1 + max(c["round"] for c in record["candidates"]),
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--floors", default="0.998,0.995,0.99")
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--test-folder", type=Path, default=Path("data/fashion-mnist/test"))
    parser.add_argument("--tome-r", default="6-24", help="uniform ToMe r placing the reference curve (a-b)")
    parser.add_argument("--confirm-images", type=int, default=0, help="also the default search: confirm images")
    parser.add_argument("--out", type=Path, default=Path("bench/results/floor_ladders"))
    args = parser.parse_args()
    command = shlex.join(["python", "bench/floor_ladders.py", *sys.argv[1:]])
    started, load = time.perf_counter(), os.getloadavg()
    model, c = calibrated(args.confirm_images)
    test_x, test_ref = embed(model, load_images(args.test_folder, model, args.test)[0])
    family = family_of(model)
    depth, tokens0, prefix = family.depth(model), family.num_tokens(model), family.num_prefix(model)
    low, high = (int(v) for v in args.tome_r.split("-"))
    tome = []
    for k in range(low, high + 1):
        r = plan_tokens(tokens0, prefix, [k] * depth, warn=False).r  # as the blocks can remove it
        latency = c.latency.predict_ms(tokens0, prefix, list(r), ["mean"] * depth)
        cosines = per_image_cosines(model, test_x, test_ref, ["mean"] * depth, list(r), c.prop_attn)
        tome.append((c.baseline_ms / latency, k, cosines))
        print(f"ToMe r={k}: {tome[-1][0]:.3f}x, held out {cosines.mean():.5f}", flush=True)
    tome.sort(key=lambda t: t[0])
    rng = np.random.default_rng(1)
    rows = []
    every = floor_module.floor_ladders(c, "damage")  # the same for every floor: priced once
    for floor in (float(f) for f in args.floors.split(",")):
        searches = [("coarse ladders", coarse_ladders(every), False), ("with one-token ladders", every, False)]
        if args.confirm_images:
            searches.append((f"with one-token ladders and {args.confirm_images} confirm images", every, True))
        for name, ladders, confirming in searches:
            row = {"floor": floor, "ladders": name, **floor_pick(c, floor, ladders, confirming)}
            held = per_image_cosines(model, test_x, test_ref, row["modes"], row["r"], c.prop_attn)
            gap = held - interpolate_linear([t[0] for t in tome], [t[2] for t in tome], row["predicted_speedup"])
            boot = [gap[rng.integers(0, len(gap), len(gap))].mean() for _ in range(1000)]
            row |= {"held_out_cosine": float(held.mean()), "gap_to_tome": float(gap.mean()),
                    "gap_se": float(np.std(boot))}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "modes"}), flush=True)
    report = {"command": command, "machine": describe_device().to_dict().get("cpu_model"),
              "load_before": [round(v, 2) for v in load], "load_after": [round(v, 2) for v in os.getloadavg()],
              "test": int(test_ref.shape[0]), "test_folder": str(args.test_folder),
              "tome": [{"r": k, "predicted_speedup": s, "held_out_cosine": float(x.mean())} for s, k, x in tome],
              "rows": rows, "wall_s": time.perf_counter() - started}
    write_results(args.out, "floor_ladders", markdown(report).splitlines(), report)


def markdown(report: dict) -> str:
    lines = ["# A floor's search with and without one-token ladders (DINOv2 ViT-S/14, issue 23)", "",
             f"Command: `{report['command']}` ({report['wall_s']:.0f} s). Machine: {report['machine']}, load average "
             f"before {report['load_before']}, after {report['load_after']}. Calibration: r=16, 64 Fashion-MNIST "
             f"train images (48 search images; thread-CPU clock, dynamo exporter); held out: {report['test']} images "
             f"of `{report['test_folder']}`. Speed-ups are the latency model's predictions; \"vs ToMe\" is the "
             "held-out cosine minus uniform ToMe's interpolated at the pick's predicted speed-up, ± bootstrap SE over "
             "the images.",
             "", "| floor | ladders | pick | r per block | predicted speed-up | cosine, search (confirm) | "
             "cosine, held out | vs ToMe ± SE | forwards (rounds) | seconds |", "|---" * 10 + "|"]
    for row in report["rows"]:
        lines.append(f"| {row['floor']} | {row['ladders']} | {row['source']} | `{row['r']}` | "
                     f"{row['predicted_speedup']:.3f}x | {row['search_cosine']:.5f}"
                     + ("" if row.get("confirm_cosine") is None else f" ({row['confirm_cosine']:.5f})")
                     + f" | {row['held_out_cosine']:.5f} | "
                     f"{row['gap_to_tome']:+.5f} ± {row['gap_se']:.5f} | {row['forwards']} ({row['rounds']}) | "
                     f"{row['seconds']:.0f} |")
    lines += ["", "Uniform ToMe (the reference curve): " + ", ".join(
        f"r={t['r']} {t['predicted_speedup']:.3f}x {t['held_out_cosine']:.5f}" for t in report["tome"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
