#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, as one command of about 4 minutes (the device tool's lent H100/H200 machine:
# CUDA torch, a CPU-only onnxruntime, no TensorRT; what it lacks is skipped and said):
#   1. the GPU / TensorRT tests (pytest -m "gpu or tensorrt"; TensorRT ones skip with their reason),
#   2. bench/gpu_latency.py: baseline vs ToMe vs ToFu (eager and static) vs static pruning on deit_small, torch eager
#      and CUDA graphs (ORT CUDA where that provider loads), fp32/fp16, batch 1/64, CUDA kernels per block,
#   3. the CLI: `tofu-export profile` of a deit_small checkpoint on --device cuda, plain and ToFu r=16, eager (with
#      the per-part breakdown) and with --cuda-graphs (replayed CUDA graphs, no breakdown).
# Results go to $OUT (default bench/results/device): gpu_latency.{json,md}, profile_{plain,tofu}.{json,md},
# profile_{plain,tofu}_graphs.{json,md} (the profiles' JSON packed into profiles.tgz: the tool returns 8 files), log.txt.
# Usage (repository root): bash bench/device_check.sh [gpu_latency.py options, replacing the defaults below]
# Wheels in .whl/ (e.g. onnxslim, which the GPU image lacks) are installed first.
set -uo pipefail
OUT="${OUT:-bench/results/device}"
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, torch.cuda.get_device_name(), '| onnxruntime', o.__version__, o.get_available_providers())" \
  || { echo "no CUDA torch here"; exit 2; }
echo "== 1. GPU tests"; date
timeout 90 python3 -m pytest -q -p no:cacheprovider -rs -m "gpu or tensorrt" tests/test_engines_torch.py \
  tests/test_profiling_memory.py tests/test_tensorrt.py tests/test_engines_trt.py || echo "GPU tests: rc $?"
echo "== 2. bench/gpu_latency.py"; date
if [ $# -eq 0 ]; then set -- --models deit_small --batches 1,64 --dtypes fp32,fp16 --iters 30 --budget-s 150; fi
timeout 270 python3 bench/gpu_latency.py --device cuda "$@" --out "$OUT" || echo "gpu_latency: rc $?"
echo "== 3. tofu-export profile --device cuda"; date
python3 -c "import timm; from safetensors.torch import save_file; save_file(timm.create_model('deit_small_patch16_224').state_dict(), '/tmp/deit_small.safetensors')"
for variant in "plain --r 0" "tofu --r 16 --mode tofu"; do
  set -- $variant
  timeout 60 python3 -m tofu_export.cli profile /tmp/deit_small.safetensors --arch deit_small_patch16_224 \
    --backend torch --device cuda "${@:2}" --batch 1,64 --iters 50 --report "$OUT/profile_$1.md" || echo "profile $1: rc $?"
  timeout 60 python3 -m tofu_export.cli profile /tmp/deit_small.safetensors --arch deit_small_patch16_224 \
    --backend torch --device cuda --cuda-graphs --no-breakdown "${@:2}" --batch 1,64 --iters 50 \
    --report "$OUT/profile_$1_graphs.md" || echo "profile $1 --cuda-graphs: rc $?"
done
date
(cd "$OUT" && tar czf profiles.tgz profile_*.json && rm -f profile_*.json)
ls "$OUT"
