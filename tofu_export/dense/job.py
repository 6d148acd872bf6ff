"""The library functions behind ``tofu-export denoiser`` and ``tofu-export calibrate-denoiser``.

A source is an OpenAI-UNet checkpoint folder (``config.json`` + ``model.safetensors``) or a checkpoint file with
its config. A diffusers folder (``model_index.json`` or a ``config.json`` with ``_class_name``) is recognised and
refused with the reason: without diffusers installed, the message names the extra.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tofu_export.dense.calibrate import Calibration, calibrate_denoiser
from tofu_export.dense.export import DenoiserExport, export_denoiser
from tofu_export.dense.plan import DensePolicy, plan_blocks
from tofu_export.errors import Hint, UserError
from tofu_export.merge import ReduceMode


def _diffusers_folder(path: Path) -> bool:
    if not path.is_dir():
        return False
    if (path / "model_index.json").is_file():
        return True
    try:
        return "_class_name" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def load_denoiser(source: str | Path, config: str | Path | None = None):
    """``(model, UNetConfig)`` for an OpenAI-UNet source; a ``UserError`` for anything else."""
    from tofu_export.models.openai_unet_build import load_openai_unet

    path = Path(source)
    if not path.exists():
        raise UserError(f"{path} does not exist", hint=Hint("source", None, "a checkpoint folder or file"))
    if _diffusers_folder(path):
        try:
            import diffusers  # noqa: F401
        except ImportError:
            raise UserError(f"{path} is a diffusers folder; reading it needs the diffusers extra: "
                            "pip install 'tofu-export[diffusers]'") from None
        raise UserError(f"{path} is a diffusers folder: diffusers families are not supported by this release yet "
                        "(only OpenAI / consistency-models UNets)")
    return load_openai_unet(path, config)


def _inputs(cfg, seed: int):
    from tofu_export.models.openai_unet_build import example_inputs

    return lambda batch, s: example_inputs(cfg, batch, seed + s)


def export_denoiser_step(source: str | Path, out: str | Path, *, ratio: float = 0.5, mode: ReduceMode = "mlerp",
                         max_downsample: int = 1, stride: int = 2, seed: int | None = None,
                         policy: str | Path | None = None, config: str | Path | None = None, opset: int = 17,
                         exporter: str = "dynamo", force: bool = False) -> DenoiserExport:
    """Patch the denoiser (``policy`` file, or one ``ratio`` / ``mode`` for the levels ``max_downsample`` allows)
    and write ``out/model.onnx`` + ``out/policy.json`` + ``out/export.json``, all or nothing."""
    from tofu_export.artifacts import staged_folder
    from tofu_export.models.openai_unet_tofu import attention_grids, patch

    model, cfg = load_denoiser(source, config)
    grids = attention_grids(model)
    plan = DensePolicy.load(policy) if policy else plan_blocks(grids, ratio, mode, max_downsample, stride, seed)
    patch(model, plan)
    names = ["sample", "sigma" if cfg.denoiser == "consistency" else "timestep"]
    names += ["label"] if cfg.label != "none" else []
    with staged_folder(Path(out), force=force) as folder:
        result = export_denoiser(model, folder / "model.onnx", _inputs(cfg, 0), names, opset=opset, exporter=exporter)
        plan.save(folder / "policy.json")
        record = result.to_dict()
        record["path"] = "model.onnx"
        (folder / "export.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    result.path = Path(out) / "model.onnx"
    return result


def calibrate_denoiser_policy(source: str | Path, out: str | Path, *, ratio: float = 0.5,
                              min_psnr: float | None = None, samples: int = 2, max_downsample: int = 1,
                              stride: int = 2, seed: int | None = None, noise_seed: int = 1,
                              config: str | Path | None = None) -> Calibration:
    """Calibrate a consistency denoiser's per-block modes on one-step samples (noise at its largest sigma, 80) and
    write the policy file ``out``."""
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
    result = calibrate_denoiser(run, blocks, ratio, min_psnr=min_psnr, stride=stride, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.policy.save(out)
    return result
