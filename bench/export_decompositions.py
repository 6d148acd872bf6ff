"""What does torch's decomposition pass cost an export, and does skipping it where it changes nothing change the graph?

torch's dynamo exporter traces every captured graph a second time to decompose what its ONNX registry cannot
translate. ``tofu_export.exporters.decompositions`` skips that second trace where the captured graph holds nothing to
decompose. This script exports each model with ``export_onnx`` (the whole export: trace, simplification, checks,
parity) both ways, alternating which goes first, ``--pairs`` times, and reports the CPU and wall seconds of each
export and whether the two graphs are the same node for node (``graph_structure``).

``--families`` adds models of the other families, random weights at their libraries' sizes, built here (no
download): ``transformers-dinov2`` (a ``Dinov2Model`` of DINOv2 ViT-S/14's config from a ``save_pretrained`` folder,
exported at 224 px, ToFu at ``--r``), ``siglip`` (a ``SiglipVisionModel`` of the default config, ViT-B/16 at 224
px, attention-pool head, ToFu at ``--r``), ``open-clip`` (the ViT-B-32 visual tower from a hub folder, ToFu at ``--r``),
and one denoiser step each of ``dit`` (a 12-layer ``DiTTransformer2DModel``, 384 wide, on a 32x32 latent) and
``unet`` (a two-level ``UNet2DConditionModel`` with cross-attention) with dense MLERP at ratio 0.5
(``export_denoiser``: parity and the TensorRT check included).

Usage: python bench/export_decompositions.py [--checkpoint DINOV2.safetensors] [--models deit_small_patch16_224]
       [--families transformers-dinov2,siglip,open-clip,dit,unet] [--r 16] [--pairs 3] [--out ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import onnx
import timm
import torch
from bench_record import header, machine_line, write_results

from tofu_export import patch
from tofu_export.exporters import dynamo
from tofu_export.exporters.graph_structure import graph_structure
from tofu_export.exporters.onnx import export_onnx
from tofu_export.models.loading import load_model

WAYS = ("skipped where nothing to decompose", "torch's own (every graph decomposed)")


Export = Callable[[Path], object]  # writes one graph to the path given
VIT_FAMILIES = ("transformers-dinov2", "siglip", "open-clip")  # patched with ToFu at --r; the others are denoisers


def build(source: str, r: int) -> Export:
    """A checkpoint file (its weights) or a timm name (random weights, seed 0), patched with ToFu at ``r``."""
    if Path(source).exists():
        model = load_model(source).model
    else:
        torch.manual_seed(0)
        model = timm.create_model(source, pretrained=False).eval()
    size = model.patch_embed.img_size[0]
    if r:
        patch(model, r=r, mode="tofu", img_size=size)
    return lambda path: export_onnx(model, path, size)


def build_family(family: str, r: int, work: Path) -> Export:
    """A random-weight model of ``family`` (module docstring), loaded the way a user's would be, patched."""
    torch.manual_seed(0)
    if family in VIT_FAMILIES:
        folder = work / family
        folder.mkdir(exist_ok=True)
        if family == "transformers-dinov2":
            import transformers

            transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=384, num_attention_heads=6,
                                                               intermediate_size=1536)).save_pretrained(folder)
            model, size = load_model(folder, img_size=224).model, 224
        elif family == "siglip":
            import transformers

            transformers.SiglipVisionModel(transformers.SiglipVisionConfig()).save_pretrained(folder)
            model, size = load_model(folder).model, 224
        else:
            import open_clip
            from safetensors.torch import save_file

            save_file(open_clip.create_model("ViT-B-32").state_dict(), folder / "open_clip_model.safetensors")
            (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config(
                "ViT-B-32")}))
            model, size = load_model(folder).model, 224
        patch(model, r=r, mode="tofu", img_size=size)
        return lambda path: export_onnx(model, path, size)
    import diffusers

    from tofu_export.dense.export import export_denoiser
    from tofu_export.dense.plan import plan_blocks
    from tofu_export.models.diffusers_denoiser import input_names, step, step_inputs, token_grids
    from tofu_export.models.diffusers_denoiser import patch as patch_denoiser

    if family == "dit":
        denoiser = diffusers.DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4,
                                                   out_channels=8, num_layers=12, sample_size=32, patch_size=2,
                                                   num_embeds_ada_norm=1000)
    elif family == "unet":
        denoiser = diffusers.UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), mid_block_type=None,
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=8,
            norm_num_groups=16)
    else:
        raise SystemExit(f"unknown family {family!r}: {', '.join(VIT_FAMILIES)}, dit or unet")
    denoiser.eval()
    make = step_inputs(denoiser, 32)
    grids = token_grids(denoiser, make(1, 0))
    patch_denoiser(denoiser, plan_blocks(grids, 0.5, "mlerp"), grids)
    names = input_names(denoiser)
    return lambda path: export_denoiser(step(denoiser), path, make, names, exporter="dynamo", opset=17)


def export_once(export: Export, way: str, path: Path) -> tuple[float, float]:
    """CPU and wall seconds of one whole export, ``way`` one of ``WAYS``."""
    original = dynamo.decompositions_where_needed
    if way == WAYS[1]:  # torch's exporter as it is
        dynamo.decompositions_where_needed = contextlib.nullcontext
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export(path)
        return time.process_time() - cpu, time.perf_counter() - wall
    finally:
        dynamo.decompositions_where_needed = original


def measure(name: str, r: int, export: Export, pairs: int, work: Path) -> dict:
    seconds: dict[str, dict[str, list[float]]] = {way: {"cpu": [], "wall": []} for way in WAYS}
    for pair in range(pairs):
        for way in (WAYS if pair % 2 == 0 else WAYS[::-1]):
            cpu, wall = export_once(export, way, work / f"{WAYS.index(way)}.onnx")
            seconds[way]["cpu"].append(cpu)
            seconds[way]["wall"].append(wall)
    graphs = [onnx.load(str(work / f"{i}.onnx")) for i in range(len(WAYS))]
    ratios = [a / b for a, b in zip(seconds[WAYS[0]]["cpu"], seconds[WAYS[1]]["cpu"], strict=True)]
    return {"model": name, "r": r, "nodes": len(graphs[0].graph.node), "seconds": seconds,
            "cpu_ratio_per_pair": ratios, "same_graph": graph_structure(graphs[0]) == graph_structure(graphs[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="", help="a DINOv2 checkpoint (make dinov2), exported at --r and 0")
    parser.add_argument("--models", default="deit_small_patch16_224", help="timm names, random weights, at --r")
    parser.add_argument("--families", default="", help="other families' models, random weights (module docstring)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/export_decompositions"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    points = [(name, args.r) for name in args.models.split(",") if name]
    points += [(args.checkpoint, args.r), (args.checkpoint, 0)] if args.checkpoint else []
    with tempfile.TemporaryDirectory() as work:
        rows = [measure(Path(source).name, r, build(source, r), args.pairs, Path(work)) for source, r in points]
        rows += [measure(family, args.r if family in VIT_FAMILIES else 0,
                         build_family(family, args.r, Path(work)), args.pairs, Path(work))
                 for family in args.families.split(",") if family]
    command = " ".join(["python bench/export_decompositions.py", *sys.argv[1:]])
    machine = machine_line(load_before, f"onnxscript {version('onnxscript')}")
    lines = [*header("torch's decomposition pass, skipped where it changes nothing: an export's cost", command,
                     machine),
             "Seconds of one whole `export_onnx` (dynamo exporter, opset 17, onnxslim, checks, parity at batch 1 and "
             "8; torch on one thread; a denoiser's `export_denoiser`, r shown as 0) each way, alternating which goes "
             "first; each cell lists every pair. "
             "'same graph': the two files are the same node for node, value names aside (`graph_structure`).", "",
             "| model | r | nodes | skipped, CPU s | torch's own, CPU s | median CPU ratio (per-pair range) | "
             "skipped / torch's own, wall s | same graph |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        fast, slow = (row["seconds"][way] for way in WAYS)
        ratios = row["cpu_ratio_per_pair"]
        lines.append(f"| {row['model']} | {row['r']} | {row['nodes']} | "
                     + " / ".join(f"{s:.1f}" for s in fast["cpu"]) + " | "
                     + " / ".join(f"{s:.1f}" for s in slow["cpu"])
                     + f" | {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) | "
                     f"{statistics.median(fast['wall']):.1f} / {statistics.median(slow['wall']):.1f} | "
                     f"{'yes' if row['same_graph'] else 'NO'} |")
    write_results(args.out, "export_decompositions", lines, {"command": command, "machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
