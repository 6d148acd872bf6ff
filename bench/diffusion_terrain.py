"""Dense ToFu on real diffusion weights: the terrain consistency UNet (``make terrain``), one-step samples.

From the same noise: the unreduced model, ToMe for SD (``mean``), ``prune``, ``MLERP`` (every 32x32 attention block,
one top-left destination per 2x2 window) and a calibrated per-block policy (``tofu_export.dense.calibrate``, on
held-out noise) at several ratios; PSNR / SSIM against the unreduced samples; ONNX Runtime CPU latency of the
exported denoiser step (batch 1, one intra-op thread, thread-CPU clock, all graphs interleaved in one run); an image
grid. Writes bench/results/diffusion_terrain.{md,json,png}.

    python bench/diffusion_terrain.py --checkpoint models/terrain_unet
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tofu_export.dense.calibrate import calibrate_denoiser
from tofu_export.dense.export import export_denoiser
from tofu_export.dense.metrics import mean_psnr, psnr, ssim
from tofu_export.dense.plan import DensePolicy, plan_blocks
from tofu_export.models.openai_unet_build import load_openai_unet
from tofu_export.models.openai_unet_tofu import attention_grids, patch

NAMES = ["noisy", "sigma", "difficulty"]
SIGMA_MAX = 80.0


def one_step_inputs(count: int, seed: int) -> tuple[torch.Tensor, ...]:
    """The package's one-step sampler: noise x 80 at sigma 80, difficulties spread over 0..1."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, 1, 128, 128, generator=g) * SIGMA_MAX
    return noise, torch.full((count,), SIGMA_MAX), torch.linspace(0, 1, count)


def sampler(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]):
    def run(policy: DensePolicy) -> torch.Tensor:
        patch(model, policy)
        with torch.no_grad():
            return model(*inputs)

    return run


def grid_png(rows: list[tuple[str, torch.Tensor]], path: Path, columns: int = 4) -> None:
    """One row per configuration (label left), ``columns`` samples as grey heightmaps."""
    from PIL import Image, ImageDraw

    label_w, size, pad = 230, 128, 4
    image = Image.new("L", (label_w + columns * (size + pad), len(rows) * (size + pad)), 255)
    draw = ImageDraw.Draw(image)
    for i, (label, samples) in enumerate(rows):
        y = i * (size + pad)
        draw.multiline_text((4, y + 40), label, fill=0)
        for j in range(min(columns, len(samples))):
            pixels = ((samples[j, 0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
            image.paste(Image.fromarray(pixels), (label_w + j * (size + pad), y))
    image.save(path)


def time_sessions(paths: dict[str, Path], rounds: int, warmup: int = 2) -> dict[str, dict]:
    """ORT CPU, batch 1, one intra-op thread (runs on this thread: the thread-CPU clock sees all of it);
    all graphs interleaved round by round, in a fresh seeded order each round. A graph at ratio R is also compared
    round by round with ToMe for SD (``R/mean``) timed in the same round: the median and quartiles of that ratio."""
    from tofu_export.engines.ort import create_session
    from tofu_export.profiling.compare import round_orders
    from tofu_export.profiling.timing import QUARTILES, per_round_speedup

    sessions = {k: create_session(p, threads=1, spinning=False) for k, p in paths.items()}
    feeds = {n: t.numpy() for n, t in zip(NAMES, one_step_inputs(1, 99), strict=True)}
    cpu: dict[str, list[float]] = {k: [] for k in sessions}
    wall: dict[str, list[float]] = {k: [] for k in sessions}
    for r, order in enumerate(round_orders(list(sessions), warmup + rounds, seed=0)):
        for k in order:
            c0, w0 = time.thread_time(), time.perf_counter()
            sessions[k].run(None, feeds)
            if r >= warmup:
                cpu[k].append(time.thread_time() - c0)
                wall[k].append(time.perf_counter() - w0)
    out = {k: {"cpu_ms": 1e3 * statistics.median(cpu[k]), "wall_ms": 1e3 * statistics.median(wall[k])}
           for k in sessions}
    for k in sessions:
        tome = f"{k.split('/')[0]}/mean"
        if tome in sessions and k != tome:
            q1, mid, q3 = per_round_speedup(cpu[k], cpu[tome], QUARTILES)
            out[k]["cpu_vs_tome_sd"] = {"median": mid, "q1": q1, "q3": q3}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="models/terrain_unet")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--calib-samples", type=int, default=1)
    parser.add_argument("--ratios", default="0.25,0.5,0.75")
    parser.add_argument("--latency-ratios", default="0.75")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--latency-modes", default="mean,prune,mlerp,calibrated")
    parser.add_argument("--exporter", default="torchscript")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    started, load_start = time.time(), os.getloadavg()
    model, _ = load_openai_unet(args.checkpoint)
    grids = attention_grids(model)
    blocks = list(plan_blocks(grids, 0.5, "mean").blocks)  # the finest (32x32) attention blocks
    ratios = [float(r) for r in args.ratios.split(",")]
    evaluate = sampler(model, one_step_inputs(args.samples, 0))
    calib = sampler(model, one_step_inputs(args.calib_samples, 1))
    reference = evaluate(DensePolicy({}))
    rows, grid, policies = [], [("unreduced", reference)], {}
    for ratio in ratios:
        for mode in ("mean", "prune", "mlerp"):
            policies[(ratio, mode)] = plan_blocks(grids, ratio, mode)
        t0 = time.time()
        calibration = calibrate_denoiser(calib, blocks, ratio)
        policies[(ratio, "calibrated")] = calibration.policy
        print(f"calibrated {ratio}: {time.time() - t0:.0f} s, {len(calibration.log)} runs", flush=True)
        for mode in ("mean", "prune", "mlerp", "calibrated"):
            out = evaluate(policies[(ratio, mode)])
            modes = sorted({p.mode for p in policies[(ratio, mode)].blocks.values()})
            rows.append({"ratio": ratio, "policy": mode, "modes": modes, "psnr_db": mean_psnr(out, reference),
                         "psnr_per_sample_mean_db": float(psnr(out, reference).mean()),
                         "ssim": float(ssim(out, reference).mean()),
                         "blocks": {k: v.mode for k, v in policies[(ratio, mode)].blocks.items()}})
            print(rows[-1]["ratio"], mode, f"{rows[-1]['psnr_db']:.1f} dB {rows[-1]['ssim']:.4f}", flush=True)
            grid.append((f"{mode}\nreduce {ratio:.0%}\n{rows[-1]['psnr_db']:.1f} dB", out))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid_png(grid, out_dir / "diffusion_terrain.png")
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared? see the load)",
        "load_average_start": load_start, "samples": args.samples, "calib_samples": args.calib_samples,
        "exporter": args.exporter, "rows": rows, "latency": {},
    }
    write(record, out_dir, started)  # the quality half stands on its own if timing is cut short
    latency_ratios = [float(r) for r in args.latency_ratios.split(",") if r]
    keys = [("base", "unreduced"), *[(r, m) for r in latency_ratios for m in args.latency_modes.split(",")]]
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for key in keys:
            patch(model, policies.get(key, DensePolicy({})))
            path = Path(tmp) / f"{key[0]}_{key[1]}.onnx"
            export = export_denoiser(model, path, lambda b, s: one_step_inputs(b, s), NAMES, exporter=args.exporter,
                                     simplify=False)
            paths[f"{key[0]}/{key[1]}"] = path
            print("exported", key, export.parity.max_abs_diff, export.tensorrt.ok, flush=True)
            if key != ("base", "unreduced"):
                row = next(r for r in rows if (r["ratio"], r["policy"]) == key)
                row["onnx"] = {"parity_max_abs_diff": export.parity.max_abs_diff, "parity_ok": export.parity.ok,
                               "tensorrt_static_ok": export.tensorrt.ok, "ops": export.op_counts}
        record["latency"] = time_sessions(paths, args.rounds)
    write(record, out_dir, started)
    print(render(record))


def write(record: dict, out_dir: Path, started: float) -> None:
    record["load_average_end"], record["seconds"] = os.getloadavg(), time.time() - started
    (out_dir / "diffusion_terrain.json").write_text(json.dumps(record, indent=2) + "\n")
    (out_dir / "diffusion_terrain.md").write_text(render(record))


def render(record: dict) -> str:
    lines = ["# Dense ToFu on the terrain consistency UNet (one-step samples)", "",
             f"`{record['command']}` on {record['machine']}; load average {record['load_average_start'][0]:.1f} at "
             f"start, {record['load_average_end'][0]:.1f} at the end; {record['seconds']:.0f} s.", "",
             f"{record['samples']} samples from seed-0 noise; PSNR (dB, over all samples) and mean SSIM against the "
             f"unreduced model's samples from the same noise. Reduction in the 9 attention blocks at 32x32, one "
             f"top-left destination per 2x2 window. Calibrated: per-block modes chosen on {record['calib_samples']} "
             "held-out sample(s) (seed 1).", "",
             "| reduce | policy | PSNR dB | SSIM | modes |", "|---|---|---|---|---|"]
    for r in record["rows"]:
        lines.append(f"| {r['ratio']:.0%} | {r['policy']} | {r['psnr_db']:.1f} | {r['ssim']:.4f} | "
                     f"{', '.join(r['modes'])} |")
    lines += ["", "ONNX Runtime CPU, batch 1, 1 thread, median over interleaved rounds:", "",
              "| graph | thread CPU ms | wall ms | thread CPU / ToMe for SD's in the same round (quartiles) |",
              "|---|---|---|---|"]
    for k, v in record["latency"].items():
        versus = v.get("cpu_vs_tome_sd")
        paired = f"{versus['median']:.3f} ({versus['q1']:.3f}-{versus['q3']:.3f})" if versus else ""
        lines.append(f"| {k} | {v['cpu_ms']:.1f} | {v['wall_ms']:.1f} | {paired} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
