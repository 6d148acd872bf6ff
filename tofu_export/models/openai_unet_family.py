"""The OpenAI guided-diffusion / consistency-models UNet as a ``DenoiserFamily``: checkpoint folders (``config.json``
with ``"kind": "openai-unet"`` + ``model.safetensors``) or a file with that config; ``AttentionBlock``s reduced
(``openai_unet_tofu``); calibration samples one consistency step from noise at the largest sigma."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from tofu_export.dense.plan import DensePolicy
from tofu_export.errors import Hint, UserError
from tofu_export.models.denoiser_family import DenoiserFamily, Inputs, LoadedDenoiser, Sampler
from tofu_export.models.openai_unet import ConsistencyDenoiser, UNetModel
from tofu_export.models.openai_unet_build import CONFIG_NAME, example_inputs, load_openai_unet
from tofu_export.models.openai_unet_config import UNetConfig

SIGMA_MAX = 80.0  # the consistency models' largest noise level: one step from pure noise


def _is_unet_config(path: Path) -> bool:
    try:
        data = json.loads(path.read_text()) if path.is_file() and path.stat().st_size < 1_000_000 else None
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("kind") == "openai-unet"


def unet_config(model: nn.Module) -> UNetConfig:
    """The ``UNetConfig`` a built model (bare or preconditioned) carries."""
    network = model.network if isinstance(model, ConsistencyDenoiser) else model
    return network.config


class OpenAIUNetFamily(DenoiserFamily):
    name = "openai-unet"
    classes = "the OpenAI guided-diffusion / consistency-models UNet (AttentionBlock)"

    def recognises(self, path: Path) -> bool:
        path = Path(path)
        return _is_unet_config(path / CONFIG_NAME if path.is_dir() else path.with_name(CONFIG_NAME))

    def describe(self, path: Path) -> str:
        return "an OpenAI / consistency-models UNet checkpoint"

    def load(self, path: Path, *, config: Path | None, trust_pickle: bool, size: int | None) -> LoadedDenoiser:
        model, cfg = load_openai_unet(path, config)
        if size is not None and size != cfg.image_size:
            raise UserError(f"this UNet is built for {cfg.image_size}x{cfg.image_size} samples, not {size}",
                            hint=Hint("size", str(cfg.image_size)))
        return LoadedDenoiser(model, self, Path(path), cfg.image_size, type(model).__name__)

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, (UNetModel, ConsistencyDenoiser))

    def grids(self, model: nn.Module, inputs: tuple[Tensor, ...]) -> dict[str, tuple[int, int]]:
        from tofu_export.models.openai_unet_tofu import attention_grids

        return attention_grids(model)

    def patch(self, model: nn.Module, policy: DensePolicy, grids: dict[str, tuple[int, int]]) -> nn.Module:
        from tofu_export.models.openai_unet_tofu import patch

        if set(policy.sublayers) != {"self"}:
            raise UserError("an OpenAI UNet's AttentionBlock has self-attention only; reduce before 'self'",
                            hint=Hint("sublayers", "self"))
        return patch(model, policy)

    def unpatch(self, model: nn.Module) -> nn.Module:
        from tofu_export.models.openai_unet_tofu import unpatch

        return unpatch(model)

    def step(self, model: nn.Module) -> nn.Module:
        return model

    def input_names(self, model: nn.Module) -> list[str]:
        cfg = unet_config(model)
        names = ["sample", "sigma" if cfg.denoiser == "consistency" else "timestep"]
        return names + (["label"] if cfg.label != "none" else [])

    def make_inputs(self, model: nn.Module, size: int) -> Inputs:
        cfg = unet_config(model)
        return lambda batch, seed: example_inputs(cfg, batch, seed)

    def sampler(self, model: nn.Module, size: int, samples: int, seed: int) -> Sampler:
        """One consistency step from ``noise x 80`` at sigma 80 (labels drawn from ``seed`` too)."""
        cfg = unet_config(model)
        if cfg.denoiser != "consistency":
            raise UserError("calibration samples one step of a consistency denoiser; this UNet has no "
                            "preconditioning (its config says \"denoiser\": \"none\")")
        g = torch.Generator().manual_seed(seed)
        inputs = [torch.randn(samples, cfg.in_channels, size, size, generator=g) * SIGMA_MAX,
                  torch.full((samples,), SIGMA_MAX)]
        if cfg.label == "continuous":
            inputs.append(torch.rand(samples, generator=g))
        elif cfg.label == "class":
            inputs.append(torch.randint(cfg.num_classes, (samples,), generator=g))

        def run() -> Tensor:
            with torch.no_grad():
                return model(*inputs)

        return run

    def sampler_text(self, model: nn.Module) -> str:
        return f"one consistency step from noise at sigma {SIGMA_MAX:g}"
