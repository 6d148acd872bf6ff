#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (CUDA torch + onnxruntime-gpu; TensorRT if present), in under 8 minutes:
#   1. the GPU / TensorRT tests (pytest -m "gpu or tensorrt"),
#   2. ONNX Runtime CUDA and TensorRT-provider latency of {baseline, ToMe r=16, ToFu r=16} x {fp32, fp16},
#      deit_small_patch16_224 (random weights: latency only), batch 1 and 32, wall clock, median and p90 of
#      interleaved runs (engine and timing caches of the TensorRT provider in the run folder),
# and writes one results file naming the device: bench/results/precision_device_<gpu>.{json,md}.
# Usage: bash bench/device_check.sh [ROUNDS]   (run from the repository root; never run here: no GPU was lent)
set -euo pipefail
ROUNDS="${1:-20}"
export PYTHONPATH="${PYTHONPATH:-$PWD}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: this script needs one')"
timeout 240 python -m pytest -q -m "gpu or tensorrt" tests/ || echo "GPU tests failed or timed out (see above)"
timeout 300 python - "$ROUNDS" <<'PY'
import json, sys, tempfile, time
from pathlib import Path
import numpy as np, onnxruntime as ort, timm, torch
import tofu_export
from tofu_export.engines.ort import create_session
from tofu_export.exporters.onnx import export_onnx

rounds = int(sys.argv[1])
device = torch.cuda.get_device_name(0)
providers = [p for p in ("cuda", "tensorrt") if {"cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}[p] in ort.get_available_providers()]
variants = {"baseline": ("tome", 0), "tome": ("tome", 16), "tofu": ("tofu", 16)}
rows, work = [], Path(tempfile.mkdtemp(prefix="tofu-device-"))
model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
for name, (mode, r) in variants.items():
    for precision in ("fp32", "fp16"):
        tofu_export.patch(model, r=r, mode=mode, img_size=224)
        path = work / f"{name}-{precision}" / "model.onnx"
        export_onnx(model, path, 224, exporter="torchscript", precision=precision)
        tofu_export.unpatch(model)
        dtype = np.float16 if precision == "fp16" else np.float32
        for provider in providers:
            session = create_session(path, provider=provider, cache_dir=path.parent)
            feed_name = session.get_inputs()[0].name
            for batch in (1, 32):
                feed = {feed_name: np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(dtype)}
                for _ in range(3):
                    session.run(None, feed)  # builds the TensorRT engine on first use (then cached)
                times = []
                for _ in range(rounds):
                    start = time.perf_counter()
                    session.run(None, feed)
                    times.append((time.perf_counter() - start) * 1e3)
                rows.append({"variant": name, "precision": precision, "provider": provider, "batch": batch,
                             "median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90))})
                print(rows[-1], flush=True)
slug = "".join(c if c.isalnum() else "_" for c in device).strip("_").lower()
out = Path("bench/results") / f"precision_device_{slug}"
record = {"device": device, "onnxruntime": ort.__version__, "torch": torch.__version__, "rounds": rounds,
          "providers": providers, "rows": rows}
out.with_suffix(".json").write_text(json.dumps(record, indent=1))
lines = [f"# ORT GPU latency on {device}", "", f"`bash bench/device_check.sh {rounds}`; onnxruntime {ort.__version__}; "
         "deit_small_patch16_224 (random weights), wall ms (host I/O included).", "",
         "| variant | precision | provider | batch | median ms | p90 ms |", "|---|---|---|---|---|---|"]
lines += [f"| {r['variant']} | {r['precision']} | {r['provider']} | {r['batch']} | {r['median_ms']:.2f} | "
          f"{r['p90_ms']:.2f} |" for r in rows]
out.with_suffix(".md").write_text("\n".join(lines) + "\n")
print(f"wrote {out}.md")
PY
