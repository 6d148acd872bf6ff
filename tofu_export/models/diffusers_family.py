"""diffusers denoisers as a ``DenoiserFamily``: ``UNet2DConditionModel``, ``UNet2DModel``, ``DiTTransformer2DModel`` and
``PixArtTransformer2DModel`` from ``save_pretrained`` folders (``diffusers_load``), reduced and stepped by
``diffusers_denoiser``. Calibration samples with diffusers' ``DDIMScheduler`` (default config, ``STEPS`` steps,
``eta=0``: deterministic) from seeded noise and conditioning; the final latents (or pixels) are the sample."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from tofu_export.dense.plan import DensePolicy
from tofu_export.models.denoiser_family import DenoiserFamily, Inputs, LoadedDenoiser, Sampler
from tofu_export.models.diffusers_load import EXTRA, KINDS, diffusers_class

STEPS = 4


class DiffusersFamily(DenoiserFamily):
    name = "diffusers"
    classes = f"diffusers {', '.join(KINDS)}"
    needs = f"the diffusers extra: {EXTRA}"

    def recognises(self, path: Path) -> bool:
        return diffusers_class(Path(path)) is not None

    def describe(self, path: Path) -> str:
        kind = diffusers_class(Path(path))
        return f"a diffusers {kind} folder" if kind else "a diffusers pipeline folder"

    def load(self, path: Path, *, config: Path | None, trust_pickle: bool, size: int | None) -> LoadedDenoiser:
        from tofu_export.models.diffusers_load import load_diffusers

        model = load_diffusers(path, trust_pickle)
        sample_size = model.config.sample_size
        side = size or (sample_size if isinstance(sample_size, int) else sample_size[0])
        return LoadedDenoiser(model, self, Path(path), int(side), type(model).__name__)

    def owns(self, model: nn.Module) -> bool:
        return type(model).__name__ in KINDS and type(model).__module__.startswith("diffusers.")

    def grids(self, model: nn.Module, inputs: tuple[Tensor, ...]) -> dict[str, tuple[int, int]]:
        from tofu_export.models.diffusers_denoiser import token_grids

        return token_grids(model, inputs)

    def patch(self, model: nn.Module, policy: DensePolicy, grids: dict[str, tuple[int, int]]) -> nn.Module:
        from tofu_export.models.diffusers_denoiser import patch

        return patch(model, policy, grids)

    def unpatch(self, model: nn.Module) -> nn.Module:
        from tofu_export.models.diffusers_denoiser import unpatch

        return unpatch(model)

    def step(self, model: nn.Module) -> nn.Module:
        from tofu_export.models.diffusers_denoiser import step

        return step(model)

    def input_names(self, model: nn.Module) -> list[str]:
        from tofu_export.models.diffusers_denoiser import input_names

        return input_names(model)

    def make_inputs(self, model: nn.Module, size: int) -> Inputs:
        from tofu_export.models.diffusers_denoiser import step_inputs

        return step_inputs(model, size)

    def sampler(self, model: nn.Module, size: int, samples: int, seed: int) -> Sampler:
        """DDIM (``DDIMScheduler()``, ``STEPS`` steps, ``eta=0``) from the seeded noise and conditioning of
        ``make_inputs(samples, seed)``; a model that predicts a variance too (DiT, PixArt: twice the channels)
        contributes its first half, the noise prediction, as diffusers' pipelines do."""
        from diffusers import DDIMScheduler

        noise, _, *cond = self.make_inputs(model, size)(samples, seed)
        denoise = self.step(model)
        channels = noise.shape[1]

        def run() -> Tensor:
            scheduler = DDIMScheduler()
            scheduler.set_timesteps(STEPS)
            x = noise * scheduler.init_noise_sigma
            with torch.no_grad():
                for t in scheduler.timesteps:
                    out = denoise(x, t.expand(samples), *cond)[:, :channels]
                    x = scheduler.step(out, t, x, eta=0.0).prev_sample
            return x

        return run

    def sampler_text(self, model: nn.Module) -> str:
        return f"DDIM (diffusers' default DDIMScheduler), {STEPS} steps, eta 0, seeded noise and conditioning"
