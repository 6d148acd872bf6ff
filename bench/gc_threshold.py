"""What does Python's cyclic garbage collector cost a ``tofu-export export``? (issue 22)

The console script sets the collector's youngest-generation threshold to 50,000 allocations
(``tofu_export.cli.fewer_collections``; Python's default is 700). This script runs the same export command in fresh
processes with that setting and with Python's defaults (the same entry point, ``fewer_collections`` made a no-op),
alternating, ``--rounds`` times each, on a random-weight checkpoint it writes to a temporary folder, and reports each
run's CPU seconds, wall seconds and peak resident memory (``wait4``), and whether both wrote the same ``model.onnx``.

Usage: python bench/gc_threshold.py [--model deit_small_patch16_224] [--r 16] [--rounds 3] [--out bench/results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import timm
import torch
from bench_record import header, machine_line, write_results
from safetensors.torch import save_file

ENTRY = """import sys
variant = sys.argv[1]
sys.argv = ["tofu-export", *sys.argv[2:]]  # the console script's own name: the command is this process's
import tofu_export.cli as cli
if variant == "python-defaults":
    cli.fewer_collections = lambda: None
cli.main()
"""
VARIANTS = ("shipped", "python-defaults")


def run_export(variant: str, checkpoint: Path, arch: str, r: int, out: Path) -> dict:
    """One ``tofu-export export`` in a fresh process: its CPU seconds (user + system), wall seconds and peak RSS."""
    args = ["export", str(checkpoint), "--arch", arch, "--r", str(r), "--no-bench", "-o", str(out)]
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", ENTRY, variant, *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    stderr = process.stderr.read().decode() if process.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{variant}: the export failed:\n{stderr[-2000:]}")
    return {"cpu_s": usage.ru_utime + usage.ru_stime, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    same = True
    with tempfile.TemporaryDirectory(prefix="gc-threshold-") as scratch:
        work = Path(scratch)
        torch.manual_seed(0)
        save_file(timm.create_model(args.model, pretrained=False).state_dict(), work / "model.safetensors")
        for round_ in range(args.rounds):
            order = VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]
            graphs = {}
            for variant in order:
                out = work / f"{variant}-{round_}"
                runs[variant].append(run_export(variant, work / "model.safetensors", args.model, args.r, out))
                graphs[variant] = (out / "model.onnx").read_bytes()
                print(variant, runs[variant][-1], flush=True)
            same = same and len(set(graphs.values())) == 1
    ratios = [new["cpu_s"] / old["cpu_s"] for new, old in zip(runs["shipped"], runs["python-defaults"], strict=True)]
    command = " ".join(["python bench/gc_threshold.py", *sys.argv[1:]])
    machine = machine_line(load_before, f"onnxscript {version('onnxscript')}")
    lines = [*header("The cyclic garbage collector's cost in `tofu-export export` (issue 22)", command, machine),
             f"`tofu-export export <random {args.model}> --arch {args.model} --r {args.r} --no-bench`, each run a "
             "fresh process; `shipped` = the console script as released (youngest generation every 50,000 "
             "allocations), `python-defaults` = the same entry point with Python's 700. Alternating order, "
             "paired by round.", "",
             "| variant | CPU s per round | median CPU s | wall s per round | peak RSS MB per round |",
             "|---|---|---|---|---|"]
    for variant in VARIANTS:
        cpu = [run["cpu_s"] for run in runs[variant]]
        lines.append(f"| {variant} | " + " / ".join(f"{s:.1f}" for s in cpu) + f" | {statistics.median(cpu):.1f} | "
                     + " / ".join(f"{run['wall_s']:.1f}" for run in runs[variant]) + " | "
                     + " / ".join(f"{run['peak_rss_mb']:.0f}" for run in runs[variant]) + " |")
    lines += ["", "CPU of `shipped` / `python-defaults`, paired by round: "
              + ", ".join(f"{ratio:.3f}" for ratio in ratios) + f" (median {statistics.median(ratios):.3f}). "
              f"Both wrote the same `model.onnx` in every round: {'yes' if same else 'NO'}."]
    write_results(args.out, "gc_threshold", lines, {"command": command, "machine": machine, "runs": runs,
                                                    "cpu_ratios": ratios, "same_graph": same})


if __name__ == "__main__":
    main()
