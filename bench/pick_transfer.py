"""Does a calibrated pick keep on other images what it measured on its own? The winner's curse of a small search set.

``calibrate`` chooses among candidates by their mean cosine on its search images (48 by default) and its confirm
images; the candidates near a budget lie within a few 1e-4 of each other there, so the one measuring highest is
partly the one these images happen to favour. This script scores given policies (and uniform ToMe at given r)
in PyTorch on (a) the calibration's own images, split as ``calibrate`` splits them (search, confirm, held-out),
and (b) more image folders (e.g. every Fashion-MNIST train image, the calibration's among them, and test images
it never saw): per policy the mean cosine to the unreduced model's pooled feature, and the paired per-image
difference to a reference (``--against``) with its standard error. A pick that measured ahead on its search
images and behind on the larger sets was chosen by noise.

Usage: python bench/pick_transfer.py --checkpoint <dinov2.safetensors> --calibration data/fashion-mnist \\
       --policy pick=bench/results/<run>/matched_latency_dinov2.json --tome 21,22 --against tome-r21 \\
       --folder train=data/fashion-mnist/train --folder test=<fashion-mnist>/test --count 1000 --out bench/results/<x>
A ``--policy`` file is a ``policy.json`` or a matched-latency bench record (its first calibrated policy).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch
from bench_record import header, machine_line, write_results

from tofu_export import load_model
from tofu_export.calibration.damage import policy_cosines
from tofu_export.calibration.images import load_images, split_confirm
from tofu_export.calibration.measured import split_held_out
from tofu_export.calibration.trace import reference_pass
from tofu_export.evaluation.metrics import paired_difference
from tofu_export.models.family import family_of
from tofu_export.schedule import plan_tokens

Policy = tuple[list[str], list[int]]  # per-block modes, r


def read_policy(path: Path) -> Policy:
    """``(modes, r)`` of a ``policy.json`` or of a matched-latency bench record's first calibrated policy."""
    data = json.loads(path.read_text())
    if "calibration" in data:
        data = next(iter(data["calibration"]["policies"].values()))
    return list(data["modes"]), list(data["r"])


def named_policy(spec: str) -> tuple[str, Policy]:
    name, _, path = spec.partition("=")
    return name, read_policy(Path(path))


def compact(policy: Policy) -> str:
    """``ml32 ml32 - ... me8``: per block the mode's first letters and r, ``-`` where nothing is removed."""
    return " ".join(f"{m[:2]}{k}" if k else "-" for m, k in zip(*policy, strict=True))  # as the policy plot writes it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--calibration", required=True, help="the folder calibrate was given (its train/ is read)")
    parser.add_argument("--calib-images", type=int, default=64)
    parser.add_argument("--confirm-images", type=int, default=192)
    parser.add_argument("--holdout", type=float, default=0.25)
    parser.add_argument("--policy", action="append", default=[], help="NAME=PATH (repeatable)")
    parser.add_argument("--tome", default="", help="uniform ToMe r values scored too (tome-rK)")
    parser.add_argument("--against", default=None, help="the reference of the paired differences (a name)")
    parser.add_argument("--folder", action="append", default=[], help="NAME=PATH: more images (repeatable)")
    parser.add_argument("--count", type=int, default=1000, help="images per --folder (an even spread)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/pick_transfer"))
    args = parser.parse_args()
    command = shlex.join(["python", "bench/pick_transfer.py", *sys.argv[1:]])
    machine = machine_line(os.getloadavg()[0])
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    model = load_model(args.checkpoint).model.eval()
    family = family_of(model)
    depth, tokens0, prefix = family.depth(model), family.num_tokens(model), family.num_prefix(model)
    policies = dict(named_policy(spec) for spec in args.policy)
    for k in (int(x) for x in args.tome.split(",") if x):
        policies[f"tome-r{k}"] = (["mean"] * depth, plan_tokens(tokens0, prefix, [k] * depth, warn=False).r)
    against = args.against or next(iter(policies))

    images, _ = load_images(args.calibration, model, args.calib_images + args.confirm_images)
    calib, confirm = split_confirm(images, args.calib_images)
    search, held = split_held_out(calib, args.holdout)
    sets = {name: x for name, x in (("search", search), ("confirm", confirm), ("held-out", held)) if len(x)}
    for spec in args.folder:
        name, _, path = spec.partition("=")
        sets[name] = load_images(path, model, args.count)[0]

    cosines: dict[str, dict[str, list[float]]] = {}
    for set_name, x in sets.items():
        reference = reference_pass(model, x)  # the unreduced pass, once for every policy
        cosines[set_name] = {name: policy_cosines(model, reference, modes, r, True).tolist()
                             for name, (modes, r) in policies.items()}
        print(f"scored {set_name} ({len(x)} images)", file=sys.stderr, flush=True)

    table = {s: {name: {"cosine": sum(c) / len(c), **({} if name == against else
                                                      paired_difference(c, by[against]))}
                 for name, c in by.items()} for s, by in cosines.items()}
    record = {"command": command, "machine": machine, "seconds": round(time.perf_counter() - start),
              "policies": {name: {"modes": p[0], "r": p[1]} for name, p in policies.items()}, "against": against,
              "images": {s: len(x) for s, x in sets.items()}, "results": table}
    lines = header("A calibrated pick on its own images and on others (PyTorch, cosine to the unreduced model)",
                   command, machine)
    lines += [f"{record['seconds']} s. Policies: " + "; ".join(f"{n} `{compact(p)}`" for n, p in policies.items()), "",
              f"Mean cosine per image set; in brackets the paired difference to {against} ± its standard error.", "",
              "| images | " + " | ".join(policies) + " |", "|---|" + "---|" * len(policies)]
    for s, by in table.items():
        cells = [f"{v['cosine']:.5f}" + ("" if name == against else
                                         f" ({v['difference']:+.5f} ± {v['standard_error'] or 0:.5f})")
                 for name, v in by.items()]
        lines.append(f"| {s} ({len(sets[s])}) | " + " | ".join(cells) + " |")
    write_results(args.out, "pick_transfer", lines, record)


if __name__ == "__main__":
    main()
