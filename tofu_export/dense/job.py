"""The library functions behind ``tofu-export denoiser`` and ``tofu-export calibrate-denoiser``.

A source is an OpenAI-UNet checkpoint folder (``config.json`` + ``model.safetensors``), a checkpoint file with
its config, or a diffusers folder (``models/diffusers_load``: ``UNet2DConditionModel``, ``UNet2DModel``, DiT, PixArt;
without diffusers installed, the error names the extra). ``open_denoiser`` gives either as an ``OpenedDenoiser``.
Calibration samples one step of a consistency UNet (OpenAI layout) only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tofu_export.dense.calibrate import Calibration, calibrate_denoiser
from tofu_export.dense.export import DenoiserExport, export_denoiser
from tofu_export.dense.plan import DensePolicy, check_sublayers, plan_blocks
from tofu_export.errors import Hint, UserError
from tofu_export.merge import ReduceMode


@dataclass
class OpenedDenoiser:
    """A loaded denoiser, ready to patch and export: ``step`` is what is exported, ``patch`` applies a policy."""

    step: nn.Module
    grids: dict[str, tuple[int, int]]
    patch: Callable[[DensePolicy], object]
    make_inputs: Callable[[int, int], tuple[torch.Tensor, ...]]
    input_names: list[str]


def open_denoiser(source: str | Path, config: str | Path | None = None, trust_pickle: bool = False,
                  size: int | None = None) -> OpenedDenoiser:
    """An OpenAI-UNet checkpoint (folder, or file + ``config``) or a diffusers folder (``size``: its latent side,
    default ``sample_size``)."""
    from tofu_export.models.diffusers_load import diffusers_class

    if Path(source).exists() and diffusers_class(Path(source)) is not None:
        return _open_diffusers(source, trust_pickle, size)
    from tofu_export.models.openai_unet_tofu import attention_grids, patch

    model, cfg = load_denoiser(source, config)
    names = ["sample", "sigma" if cfg.denoiser == "consistency" else "timestep"]
    names += ["label"] if cfg.label != "none" else []
    return OpenedDenoiser(model, attention_grids(model), lambda policy: patch(model, policy), _inputs(cfg, 0), names)


def _open_diffusers(source: str | Path, trust_pickle: bool, size: int | None) -> OpenedDenoiser:
    from tofu_export.models.diffusers_denoiser import input_names, patch, step, step_inputs, token_grids
    from tofu_export.models.diffusers_load import load_diffusers

    model = load_diffusers(source, trust_pickle)
    sample_size = model.config.sample_size
    side = size or (sample_size if isinstance(sample_size, int) else sample_size[0])
    make = step_inputs(model, side)
    grids = token_grids(model, make(1, 0))
    return OpenedDenoiser(step(model), grids, lambda policy: patch(model, policy, grids), make, input_names(model))


def load_denoiser(source: str | Path, config: str | Path | None = None):
    """``(model, UNetConfig)`` for an OpenAI-UNet source; a ``UserError`` for anything else."""
    from tofu_export.models.diffusers_load import diffusers_class
    from tofu_export.models.openai_unet_build import load_openai_unet

    path = Path(source)
    if not path.exists():
        raise UserError(f"{path} does not exist", hint=Hint("source", None, "a checkpoint folder or file"))
    if diffusers_class(path) is not None:
        raise UserError(f"{path} is a diffusers folder: calibration samples consistency UNets (OpenAI layout) only; "
                        "export it with one ratio and mode, or a policy file")
    return load_openai_unet(path, config)


def _inputs(cfg, seed: int):
    from tofu_export.models.openai_unet_build import example_inputs

    return lambda batch, s: example_inputs(cfg, batch, seed + s)


def export_denoiser_step(source: str | Path, out: str | Path, *, ratio: float = 0.5, mode: ReduceMode = "mlerp",
                         max_downsample: int = 1, stride: int = 2, seed: int | None = None,
                         policy: str | Path | None = None, config: str | Path | None = None, opset: int = 17,
                         exporter: str = "dynamo", force: bool = False, sublayers: Sequence[str] = ("self",),
                         trust_pickle: bool = False, size: int | None = None) -> DenoiserExport:
    """Patch the denoiser (``policy`` file, or one ``ratio`` / ``mode`` for the levels ``max_downsample`` allows,
    before ``sublayers``) and write ``out/model.onnx`` + ``out/policy.json`` + ``out/export.json``, all or nothing."""
    from tofu_export.artifacts import staged_folder

    if not Path(source).exists():
        raise UserError(f"{source} does not exist", hint=Hint("source", None, "a checkpoint folder or file"))
    check_sublayers(sublayers)
    opened = open_denoiser(source, config, trust_pickle, size)
    plan = (DensePolicy.load(policy) if policy else
            plan_blocks(opened.grids, ratio, mode, max_downsample, stride, seed, sublayers))
    opened.patch(plan)
    with staged_folder(Path(out), force=force) as folder:
        result = export_denoiser(opened.step, folder / "model.onnx", opened.make_inputs, opened.input_names,
                                 opset=opset, exporter=exporter)
        plan.save(folder / "policy.json")
        record = result.to_dict()
        record["path"] = "model.onnx"
        (folder / "export.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    result.path = Path(out) / "model.onnx"
    return result


def flop_cost(model: nn.Module, patch: Callable[[DensePolicy], object], inputs: Sequence[torch.Tensor]):
    """``cost(policy)``: the predicted cost of one step under ``policy``, in FLOPs (torch's ``FlopCounterMode`` on
    one sample): the unreduced step's, less each reduced block's own saving (measured once per block and ratio,
    summed: blocks are assumed independent)."""
    from torch.utils.flop_counter import FlopCounterMode

    one = [t[:1] for t in inputs]

    def count(policy: DensePolicy) -> float:
        patch(policy)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*one)
        return float(counter.get_total_flops())

    base = count(DensePolicy({}))
    savings: dict[tuple[str, float], float] = {}

    def cost(policy: DensePolicy) -> float:
        for name, plan in policy.blocks.items():
            if (name, plan.ratio) not in savings:
                savings[name, plan.ratio] = base - count(DensePolicy({name: plan}, policy.stride, policy.seed))
        return base - sum(savings[name, plan.ratio] for name, plan in policy.blocks.items())

    return cost


def calibrate_denoiser_policy(source: str | Path, out: str | Path, *, ratio: float = 0.5,
                              min_psnr: float | None = None, speedup: float | None = None, samples: int = 2,
                              max_downsample: int = 1,
                              stride: int = 2, seed: int | None = None, noise_seed: int = 1,
                              config: str | Path | None = None) -> Calibration:
    """Calibrate a consistency denoiser's per-block modes on one-step samples (noise at its largest sigma, 80) and
    write the policy file ``out``. ``speedup``: a budget on the predicted (FLOP) speed-up of the step."""
    from tofu_export.models.openai_unet_tofu import attention_grids, patch

    out = Path(out)
    if out.exists():
        raise UserError(f"{out} exists; choose another policy path (nothing is overwritten)", hint=Hint("out"))
    model, cfg = load_denoiser(source, config)
    if cfg.denoiser != "consistency":
        raise UserError("calibration samples one step of a consistency denoiser; this UNet has no preconditioning")
    g = torch.Generator().manual_seed(noise_seed)
    size = (samples, cfg.in_channels, cfg.image_size, cfg.image_size)
    inputs = [torch.randn(size, generator=g) * 80.0, torch.full((samples,), 80.0)]
    if cfg.label == "continuous":
        inputs.append(torch.rand(samples, generator=g))
    elif cfg.label == "class":
        inputs.append(torch.randint(cfg.num_classes, (samples,), generator=g))

    def run(policy: DensePolicy) -> torch.Tensor:
        patch(model, policy)
        with torch.no_grad():
            return model(*inputs)

    blocks = list(plan_blocks(attention_grids(model), ratio, "mean", max_downsample, stride, seed).blocks)
    cost = flop_cost(model, lambda policy: patch(model, policy), inputs) if speedup is not None else None
    result = calibrate_denoiser(run, blocks, ratio, min_psnr=min_psnr, speedup=speedup, cost=cost, stride=stride,
                                seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.policy.save(out)
    return result
