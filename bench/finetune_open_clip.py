"""Does ``finetune`` write a full-size open_clip model back whole? A random CLIP of one of open_clip's own configs
(no pretrained weights can be had here), saved as a float16 ``.bin`` the way OpenAI's weights come, is tuned through
the library's job (``tofu_export.finetune.job.finetune``, as the command runs it) and read back by open_clip's own
``create_model("local-dir:OUT")``: its image tower must give what tofu-export's loader gives, its text tower what the
source's gives, and every text tensor must be written as it was (values and dtype). Records the job's time, the
process's peak memory and the sizes. Fidelity is not the point here (random weights).

Usage: python bench/finetune_open_clip.py [--config ViT-B-32] [--r 8] [--steps 5] [--images 16] [--holdout 8]
       [--data data/fashion-mnist] [--out bench/results/finetune_open_clip]
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import torch
from bench_record import header, machine_line, write_results

import tofu_export
from tofu_export.finetune.distill import DistillSettings
from tofu_export.finetune.job import finetune
from tofu_export.models.loading import load_model


def _source(folder: Path, config: str, dtype: torch.dtype) -> tuple[Path, torch.nn.Module]:
    """A seeded random CLIP of ``config``, saved as ``folder/<config>.bin`` in ``dtype``; and the model as saved."""
    torch.manual_seed(0)
    model = open_clip.create_model(config).eval()
    state = {name: tensor.to(dtype) for name, tensor in model.state_dict().items()}
    path = folder / f"{config}.bin"
    torch.save(state, path)
    model.load_state_dict(state)  # the float32 model of the weights as stored
    return path, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ViT-B-32")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--holdout", type=int, default=8)
    parser.add_argument("--data", type=Path, default=Path("data/fashion-mnist"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/finetune_open_clip"))
    args = parser.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    machine = machine_line(os.getloadavg()[0], f"open_clip {open_clip.__version__}")
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source_path, source = _source(work, args.config, torch.float16)
        loaded = load_model(source_path, arch=f"open_clip:{args.config}")
        started = time.perf_counter()
        report = finetune(loaded, args.data, tofu_export.ToFuConfig(r=args.r),
                          DistillSettings(steps=args.steps, batch=4), work / "tuned", images=args.images,
                          holdout=args.holdout, progress=False)
        seconds = time.perf_counter() - started
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        back = load_model(work / "tuned")
        theirs = open_clip.create_model(f"local-dir:{work / 'tuned'}").eval()
        tokenizer = open_clip.get_tokenizer(args.config)
        text = tokenizer(["a photo of a shoe", "a photo of a shirt"])
        images = torch.randn(2, 3, back.img_size, back.img_size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            tower = float((back.model(images) - theirs.encode_image(images)).abs().max())
            texts = float((source.encode_text(text) - theirs.encode_text(text)).abs().max())
        from safetensors import safe_open

        stored = torch.load(source_path, weights_only=True)
        with safe_open(str(work / "tuned" / "open_clip_model.safetensors"), "pt") as written:
            kept = [name for name in stored if not name.startswith("visual.")]
            same = all(torch.equal(stored[name], written.get_tensor(name)) for name in kept)
            dtypes = sorted({str(written.get_tensor(name).dtype) for name in written.keys()  # noqa: SIM118
                             if name.startswith("visual.")})
        record = {
            "command": command, "machine": machine, "config": args.config, "r": args.r, "steps": args.steps,
            "parameters": sum(t.numel() for t in stored.values()), "source_bytes": source_path.stat().st_size,
            "written_bytes": (work / "tuned" / "open_clip_model.safetensors").stat().st_size,
            "job_seconds": round(seconds, 1), "peak_rss_gb": round(peak_gb, 2),
            "held_out_before": report["held_out_before"]["mean"], "held_out_after": report["held_out_after"]["mean"],
            "tower_max_abs_diff_open_clip_vs_tofu_export": tower, "text_max_abs_diff_vs_source": texts,
            "text_tensors_written_as_they_were": same, "text_tensors": len(kept), "visual_dtypes": dtypes,
        }
    lines = [
        *header(f"finetune writes open_clip {args.config} back whole", command, machine),
        "| what | value |", "|---|---|",
        f"| parameters (both towers) | {record['parameters']:,} |",
        f"| source `.bin` (float16) / written `open_clip_model.safetensors` | {record['source_bytes'] / 1e6:.0f} MB / "
        f"{record['written_bytes'] / 1e6:.0f} MB |",
        f"| the job (targets, {args.steps} steps, scores, writing) | {record['job_seconds']} s |",
        f"| the process's peak resident memory | {record['peak_rss_gb']} GB |",
        f"| image tower: open_clip's loader against tofu-export's, max abs diff | {tower:.3g} |",
        f"| text tower: open_clip's loader against the source, max abs diff | {texts:.3g} |",
        f"| text tensors written as they were (values and dtype) | {same} ({len(kept)}) |",
        f"| visual tensors' dtype | {', '.join(dtypes)} |",
        "", "Random weights: the held-out cosines (before "
        f"{record['held_out_before']:.5f}, after {record['held_out_after']:.5f}) say nothing of a real model.",
    ]
    write_results(args.out, "finetune_open_clip", lines, record)


if __name__ == "__main__":
    main()
