#!/usr/bin/env bash
# The profiler sweep for deit_small_patch16_224 on this CPU: every mode at r in {0,4,8,12,16}, exported,
# parity-verified, then timed with ONNX Runtime all together, round-robin (batch 1, 2 threads, spinning off).
# Report: bench/results/sweep_deit_small/{sweep.md,sweep.json,latency_vs_r.png}. Resumable.
set -euo pipefail
out="${1:-bench/results/sweep_deit_small}"
tofu-export sweep deit_small_patch16_224 --r 0,4,8,12,16 --modes tome,prune,mlerp,tofu --iters 60 --threads 2 --interleave -o "$out"
python3 -c "from tofu_export.profiling.device import describe_device; import json; print(json.dumps(describe_device().to_dict(), indent=2))" > "$out/machine.json"
