"""The OpenAI guided-diffusion / consistency-models UNet (``UNetModel``): scale-shift ResBlocks, ``AttentionBlock``s
with QKV attention, and the consistency-model preconditioning around it (``ConsistencyDenoiser``).

Parameter names follow the original code, so its checkpoints load as they are (``openai_unet_build``). An
``AttentionBlock`` reduces its tokens when ``openai_unet_tofu.patch`` gave it a ``tofu`` module (``DenseToFu``):
the normalised tokens are reduced before the QKV projection and unmerged after ``proj_out``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tofu_export.models.openai_unet_config import UNetConfig


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (the original's ``normalization``)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[B] -> [B, dim]`` as ``[cos, sin]`` (the original's order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Resample(nn.Module):
    """Nearest x2 upsampling or 2x2 average pooling, without a convolution (``resblock_updown``'s resamplers)."""

    def __init__(self, up: bool) -> None:
        super().__init__()
        self.up = up

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> [B, C, 2H, 2W] or [B, C, H/2, W/2]
        if not self.up:
            return F.avg_pool2d(x, 2, 2)
        # nearest x2 as expand + reshape: a Resize's output batch is floor(1.0 * batch) to shape inference,
        # which TensorRT's static check (rightly) cannot match with the batch axis of the other branch
        b, c, h, w = x.shape
        return x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)


class ResBlock(nn.Module):
    """Residual block with the timestep embedding as a scale and shift of the second normalisation."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, scale_shift: bool = True,
                 up: bool = False, down: bool = False) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, 1, 1))
        self.updown = up or down
        self.h_upd = self.x_upd = Resample(up) if self.updown else nn.Identity()
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels * (2 if scale_shift else 1)))
        self.out_layers = nn.Sequential(normalization(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, 1, 1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # x [B, C, H, W], emb [B, E]
        if self.updown:
            h = self.in_layers[2](self.h_upd(self.in_layers[:2](x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb)[..., None, None]  # [B, C' or 2C', 1, 1]
        if self.scale_shift:
            half = emb_out.shape[1] // 2  # slices, not chunk: Split has no down-conversion from opset 18
            scale, shift = emb_out[:, :half], emb_out[:, half:]
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def qkv_attention(qkv: Tensor, num_heads: int) -> Tensor:
    """The original's ``QKVAttention`` (split q, k, v, then heads): ``[B, 3C, T] -> [B, C, T]``, as matmuls."""
    batch, width, length = qkv.shape
    width //= 3
    q, k, v = qkv[:, :width], qkv[:, width : 2 * width], qkv[:, 2 * width :]  # [B, C, T] each
    ch = width // num_heads
    scale = 1 / math.sqrt(math.sqrt(ch))
    q = (q * scale).reshape(batch * num_heads, ch, length)
    k = (k * scale).reshape(batch * num_heads, ch, length)
    weight = torch.softmax((q.transpose(1, 2) @ k).float(), dim=-1).type(q.dtype)  # [BH, T, S]
    out = v.reshape(batch * num_heads, ch, length) @ weight.transpose(1, 2)  # [BH, ch, T]
    return out.reshape(batch, -1, length)


class AttentionBlock(nn.Module):
    """Self-attention over the ``H x W`` tokens of a feature map; ``tofu`` (None unless patched) reduces them."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        self.tofu: nn.Module | None = None

    def attend(self, tokens: Tensor) -> Tensor:
        """Normalised tokens ``[B, C, T] -> [B, C, T]`` (QKV, attention, output projection)."""
        return self.proj_out(qkv_attention(self.qkv(tokens), self.num_heads))

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W]
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)  # [B, C, T]
        h = self.norm(x)
        if self.tofu is None:
            h = self.attend(h)
        else:  # tokens last for the reduction: [B, T, C]
            h = self.tofu(h.transpose(1, 2), lambda t: self.attend(t.transpose(1, 2)).transpose(1, 2)).transpose(1, 2)
        return (x + h).reshape(b, c, *spatial)


class TimestepSequential(nn.Sequential):
    """Layers of one UNet stage; ResBlocks also get the embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNetModel(nn.Module):
    """``UNetModel(x [B, Cin, H, W], timesteps [B], y [B] or None) -> [B, Cout, H, W]``."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.config = cfg
        mc, emb_dim = cfg.model_channels, cfg.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.label == "class":
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)
        elif cfg.label == "continuous":
            self.label_emb = nn.Sequential(nn.Linear(1, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res(cin: int, cout: int, **kw: bool) -> ResBlock:
            return ResBlock(cin, emb_dim, cout, cfg.use_scale_shift_norm, **kw)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, ch // cfg.num_head_channels if cfg.num_head_channels > 0 else cfg.num_heads)

        ch = int(cfg.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(cfg.in_channels, ch, 3, 1, 1))])
        chans, ds = [ch], 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepSequential(*layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(res(ch, ch, down=True)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepSequential(res(ch, ch), attn(ch), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + chans.pop(), mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_ds:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, up=True))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, 1, 1))

    def forward(self, x: Tensor, timesteps: Tensor, y: Tensor | None = None) -> Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels))  # [B, E]
        if self.config.label == "class":
            emb = emb + self.label_emb(y)
        elif self.config.label == "continuous":
            emb = emb + self.label_emb(y[:, None].float())
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


class ConsistencyDenoiser(nn.Module):
    """Karras/consistency preconditioning: ``(noisy [B, C, H, W], sigma [B], label [B]) -> denoised``,
    ``c_skip * x + c_out * F(c_in * x, 250 log sigma, label)``, clamped to ``[-1, 1]`` when ``clip``."""

    def __init__(self, network: UNetModel, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 clip: bool = True) -> None:
        super().__init__()
        self.network, self.sigma_data, self.sigma_min, self.clip = network, sigma_data, sigma_min, clip

    def forward(self, noisy: Tensor, sigma: Tensor, label: Tensor | None = None) -> Tensor:
        sd2 = self.sigma_data**2
        c_skip = sd2 / ((sigma - self.sigma_min) ** 2 + sd2)  # [B]
        c_out = (sigma - self.sigma_min) * self.sigma_data / torch.sqrt(sigma**2 + sd2)
        c_in = 1 / torch.sqrt(sigma**2 + sd2)
        out = self.network(c_in[:, None, None, None] * noisy, 250.0 * torch.log(sigma), label)
        denoised = c_skip[:, None, None, None] * noisy + c_out[:, None, None, None] * out
        return denoised.clamp(-1, 1) if self.clip else denoised
