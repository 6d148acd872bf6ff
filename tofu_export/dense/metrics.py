"""Image fidelity of denoiser samples against the unreduced model's: PSNR and SSIM (Gaussian window, per channel)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def psnr(x: Tensor, ref: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-sample PSNR in dB of ``x`` against ``ref`` (``[B, C, H, W]``; ``data_range`` 2 for ``[-1, 1]``)."""
    mse = (x.double() - ref.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-20))


def _gaussian(size: int = 11, sigma: float = 1.5) -> Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: Tensor, ref: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-sample SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, valid region). A
    sample smaller than 11 pixels a side (a small latent) gets the largest odd window that fits."""
    x, ref = x.double(), ref.double()
    channels = x.shape[1]
    side = min(11, *x.shape[-2:])
    g = _gaussian(side - (1 - side % 2))
    window = (g[:, None] @ g[None, :]).expand(channels, 1, -1, -1)  # [C, 1, 11, 11]

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, window, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(ref)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(ref * ref) - mu_y**2
    cov = blur(x * ref) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (num / den).flatten(1).mean(1)


def mean_psnr(x: Tensor, ref: Tensor, data_range: float = 2.0) -> float:
    """PSNR of the whole set (mean squared error over all samples), in dB; ``inf`` when identical."""
    mse = float((x.double() - ref.double()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)
