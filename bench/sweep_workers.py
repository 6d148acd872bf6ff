"""What exporting a sweep's points side by side saves: `tofu-export sweep` with one export at a time against the
default (forked workers, one per core), run in turn in one process, each into a fresh folder.

A sweep exports every point (a full artifact: trace, simplification, parity, TensorRT check, report) before it times
and scores them; ``sweep.job`` now exports the points ahead in ``exporters.workers`` and then takes them in turn.
This script runs the same sweep with the workers forced to 1 and with the default, alternating (``--pairs``, the
first variant swapped each pair), and records each run's wall time and the rows' speed-ups (timed after the
exports, so the two variants time alike).

Usage: python bench/sweep_workers.py --checkpoint CKPT [--r 0,8,16] [--modes tome,tofu] [--pairs 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_record import header, machine_line, write_results

from tofu_export.exporters.workers import export_workers
from tofu_export.sweep import job as sweep_job
from tofu_export.sweep.config import SweepConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--r", default="0,8,16")
    parser.add_argument("--modes", default="tome,tofu")
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/sweep_workers"))
    args = parser.parse_args()
    command = shlex.join(["python", "bench/sweep_workers.py", *sys.argv[1:]])
    machine = machine_line(os.getloadavg()[0])
    config = SweepConfig(r_values=tuple(int(k) for k in args.r.split(",")), modes=tuple(args.modes.split(",")))
    variants = {"one at a time": lambda jobs, weights: 1, "default": export_workers}
    runs = []
    for pair in range(args.pairs):
        for name in (list(variants) if pair % 2 == 0 else list(reversed(variants))):
            sweep_job.export_workers = variants[name]
            said: list[str] = []
            with tempfile.TemporaryDirectory(prefix="sweep-workers-") as tmp:
                start = time.perf_counter()
                result = sweep_job.run_sweep_job(args.checkpoint, Path(tmp) / "sweep", config, say=said.append,
                                                 progress=False)
                seconds = time.perf_counter() - start
            runs.append({"variant": name, "pair": pair, "seconds": seconds, "said": said[0],
                         "load_after": os.getloadavg()[0],
                         "speedups": {f"{row['mode']} r={row['r']}": row.get("speedup") for row in result.rows}})
            print(f"{name}: {seconds:.1f} s", file=sys.stderr, flush=True)
    lines = header("A sweep with its points exported side by side", command, machine)
    lines += ["| variant | pair | wall s | load after | what the sweep said first |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['pair']} | {r['seconds']:.1f} | {r['load_after']:.2f} | {r['said']} |"
              for r in runs]
    lines.append("")
    for name in variants:
        walls = [r["seconds"] for r in runs if r["variant"] == name]
        lines.append(f"- {name}: wall median {statistics.median(walls):.1f} s ({min(walls):.1f}-{max(walls):.1f}).")
    write_results(args.out, "sweep_workers", lines, {"command": command, "machine": machine, "runs": runs})


if __name__ == "__main__":
    main()
