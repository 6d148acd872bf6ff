"""Build an OpenAI / consistency-models UNet from its config and load its checkpoint (safetensors preferred).

A checkpoint folder holds ``config.json`` (``UNetConfig``) and ``model.safetensors``; a checkpoint file may sit
anywhere with its config passed beside it. Keys are the original's (``input_blocks.1.0.in_layers.0.weight``);
a consistency denoiser's are prefixed ``network.``. 1x1 attention projections stored as 2-D convolutions
(``[3C, C, 1, 1]``) are accepted and squeezed to the original's 1-D ones.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tofu_export.checkpoint import CheckpointError, load_state_dict
from tofu_export.errors import Hint, UserError
from tofu_export.models.openai_unet import ConsistencyDenoiser, UNetModel
from tofu_export.models.openai_unet_config import UNetConfig

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def build_model(cfg: UNetConfig) -> nn.Module:
    """The bare ``UNetModel`` or, for ``denoiser="consistency"``, the ``ConsistencyDenoiser`` around it (eval)."""
    network = UNetModel(cfg)
    if cfg.denoiser == "consistency":
        return ConsistencyDenoiser(network, cfg.sigma_data, cfg.sigma_min, cfg.clip).eval()
    return network.eval()


def squeeze_1x1(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Attention ``qkv`` / ``proj_out`` weights ``[O, I, 1, 1]`` -> ``[O, I, 1]`` (other entries unchanged)."""
    return {
        k: v[..., 0] if v.ndim == 4 and k.endswith((".qkv.weight", ".proj_out.weight")) else v
        for k, v in state.items()
    }


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` strictly; a missing or unexpected key, or a shape mismatch, is a ``CheckpointError``."""
    state = squeeze_1x1(state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(wrong)} of another shape (e.g. {wrong[0]})" if wrong else ""]
        raise CheckpointError(f"{source} does not fit its UNet config: " + "; ".join(p for p in parts if p),
                              hint=Hint("config", None, "the config the checkpoint was written with"))
    model.load_state_dict(state)


def load_openai_unet(path: str | Path, config: str | Path | None = None) -> tuple[nn.Module, UNetConfig]:
    """A folder with ``config.json`` + ``model.safetensors``, or a checkpoint file with ``config`` beside it."""
    path = Path(path)
    if path.is_dir():
        weights, config = path / WEIGHTS_NAME, config or path / CONFIG_NAME
        if not weights.is_file():
            raise UserError(f"{path} has no {WEIGHTS_NAME}")
    else:
        weights = path
        config = config or path.with_name(CONFIG_NAME)
    if not Path(config).is_file():
        raise UserError(f"no UNet config for {path}: {config} does not exist",
                        hint=Hint("config", None, "a config.json with \"kind\": \"openai-unet\""))
    cfg = UNetConfig.from_file(config)
    model = build_model(cfg)
    load_weights(model, load_state_dict(weights), str(weights))
    return model, cfg


def example_inputs(cfg: UNetConfig, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded inputs of one denoiser step: ``(sample, sigma or timestep[, label])``."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    if cfg.denoiser == "consistency":
        t = torch.exp(torch.rand(batch, generator=g) * 8 - 4)  # sigma in [0.02, 55]
        sample = sample * t[:, None, None, None]
    else:
        t = torch.rand(batch, generator=g) * 999
    if cfg.label == "class":
        return sample, t, torch.randint(cfg.num_classes, (batch,), generator=g)
    if cfg.label == "continuous":
        return sample, t, torch.rand(batch, generator=g)
    return sample, t
