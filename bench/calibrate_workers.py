"""What exporting the timed graphs side by side saves a calibration: the default `calibrate`, one worker against one
per core, run in turn in one process.

A calibration exports 16 one-block graphs (the latency model) and 5 whole graphs (the chosen policy, the unreduced
model, ToMe at three r) only to time them; an export is single-threaded Python for most of its time, so one after
the other they leave all but one core idle. ``exporters.workers.run_jobs`` runs them in forked workers, one per core
(``ExportSettings.workers``; None: one per core memory allows). This script runs the calibration ``tofu-export
calibrate CHECKPOINT DATA`` runs by default (64 images, 192 confirm images, ``--min-cosine 0.995``, the dynamo
exporter) with ``workers=1`` and with the default, alternating (``--pairs`` pairs, the first variant swapped each
pair), and records each run's wall time, the wall time inside the two export phases (the calls of ``run_jobs``), and
the policy it chose. The policies can differ: the latency model is timed on ONNX Runtime in every run.

Usage: python bench/calibrate_workers.py --checkpoint CKPT --data DIR [--pairs 2] [--out bench/results/x]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_record import header, machine_line, write_results

from tofu_export import load_model
from tofu_export.calibration import calibrate, latency, measured
from tofu_export.calibration.images import load_images, split_confirm
from tofu_export.calibration.measured import ExportSettings
from tofu_export.calibration.select import Budget
from tofu_export.exporters import workers as workers_module


def timed_phases(log: list[float]):
    """``run_jobs`` that adds each call's wall seconds to ``log``."""
    def run_jobs(jobs, workers, on_done=None):
        start = time.perf_counter()
        try:
            return workers_module.run_jobs(jobs, workers, on_done)
        finally:
            log.append(time.perf_counter() - start)
    return run_jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="the folder calibrate is given")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/calibrate_workers"))
    args = parser.parse_args()
    command = shlex.join(["python", "bench/calibrate_workers.py", *sys.argv[1:]])
    machine = machine_line(os.getloadavg()[0])
    model = load_model(args.checkpoint).model.eval()
    batch, source = load_images(args.data, model, 64 + 192)
    images, confirm = split_confirm(batch, 64)
    auto = ExportSettings().workers_for(5, model)
    variants = {"one worker": ExportSettings(workers=1), f"default ({auto} workers here)": ExportSettings()}
    runs: list[dict] = []
    for pair in range(args.pairs):
        order = list(variants) if pair % 2 == 0 else list(reversed(variants))
        for name in order:
            phases: list[float] = []
            latency.run_jobs = measured.run_jobs = timed_phases(phases)
            start = time.perf_counter()
            policy = calibrate(model, images, budget=Budget(min_cosine=0.995), source=source,
                               settings=variants[name], confirm=confirm, progress=False)
            seconds = time.perf_counter() - start
            m = policy.measurements
            runs.append({"variant": name, "pair": pair, "seconds": seconds, "export_phases_s": phases,
                         "load_after": os.getloadavg()[0], "modes": list(policy.modes), "r": list(policy.r),
                         "measured_speedup": m["measured_speedup"], "held_out_cosine": m["held_out_cosine"]})
            print(f"{name}: {seconds:.1f} s (exports {sum(phases):.1f} s)", file=sys.stderr, flush=True)
    record = {"command": command, "machine": machine, "torch_threads": torch.get_num_threads(), "runs": runs}
    lines = header("Calibration with its timed graphs exported side by side", command, machine)
    lines += ["| variant | pair | wall s | export phases s (one-block graphs, whole graphs) | load after | chosen "
              "(r per block) | measured speed-up | held-out cosine |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        phases = " + ".join(f"{p:.1f}" for p in run["export_phases_s"])
        cells = [run["variant"], str(run["pair"]), f"{run['seconds']:.1f}", phases, f"{run['load_after']:.2f}",
                 " ".join(map(str, run["r"])), f"{run['measured_speedup']:.3f}x", f"{run['held_out_cosine']:.5f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name in variants:
        walls = [run["seconds"] for run in runs if run["variant"] == name]
        exports = [sum(run["export_phases_s"]) for run in runs if run["variant"] == name]
        lines.append(f"- {name}: wall median {statistics.median(walls):.1f} s (range {min(walls):.1f}-"
                     f"{max(walls):.1f}), export phases {statistics.median(exports):.1f} s ({min(exports):.1f}-"
                     f"{max(exports):.1f}).")
    write_results(args.out, "calibrate_workers", lines, record)


if __name__ == "__main__":
    main()
