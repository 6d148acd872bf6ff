#!/usr/bin/env bash
# Export a small model end to end into an artifacts folder; any failing step fails CI.
set -euo pipefail
out="${1:-artifacts/ci}"
rm -rf "$out"
mkdir -p "$out"
# A small reference checkpoint: deit_tiny (random init, seed 0), saved as safetensors with the config.json a timm
# hub download has beside it (the head count and block kind are not in the weights: tofu-export needs them stated).
python3 - "$out/deit_tiny.safetensors" <<'PY'
import json, pathlib, sys, torch, timm
from safetensors.torch import save_file
torch.manual_seed(0)
save_file(timm.create_model("deit_tiny_patch16_224", pretrained=False).state_dict(), sys.argv[1])
config = {"architecture": "deit_tiny_patch16_224", "num_classes": 1000}
(pathlib.Path(sys.argv[1]).parent / "config.json").write_text(json.dumps(config, indent=2) + "\n")
PY
# The two exports run side by side (one per core: each is a single-threaded trace of ~50 s). TensorRT at opset 16
# (JetPack 5 and 6 both read it): engine not buildable here (exit 3 = ONNX written, engine not built); the static
# check must pass for both TensorRT versions. It has no quick look, so it ends before the ONNX Runtime export times
# its quick look; its output is printed after, whole.
tofu-export "$out/deit_tiny.safetensors" --r 16 --mode tofu --target trt --opset 16 -o "$out/deit_tiny-tofu-r16-trt" \
  > "$out/trt-export.log" 2>&1 &
trt_pid=$!
tofu-export "$out/deit_tiny.safetensors" --r 16 --mode tofu --target ort -o "$out/deit_tiny-tofu-r16"
status=0
wait "$trt_pid" || status=$?
cat "$out/trt-export.log" && rm -f "$out/trt-export.log"
if [ "$status" -ne 0 ] && [ "$status" -ne 3 ]; then echo "trt export failed with $status"; exit "$status"; fi
tofu-export check "$out/deit_tiny-tofu-r16-trt/model.onnx" --trt 8.5 --trt 10
tofu-export check "$out/deit_tiny-tofu-r16/model.onnx" --trt 10
# A latency report beside the artifact (CI's CPU; numbers are indicative only).
tofu-export profile "$out/deit_tiny-tofu-r16/model.onnx" --batch 1,4 --iters 20 --threads 2 \
  --report "$out/deit_tiny-tofu-r16/profile.md"
ls -la "$out"/*
