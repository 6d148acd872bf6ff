"""``tofu-export denoiser`` and ``tofu-export calibrate-denoiser``: dense ToFu for diffusion denoisers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Source = Annotated[str, typer.Argument(help="An OpenAI-UNet checkpoint folder (config.json + model.safetensors), or a "
                                            "diffusers save_pretrained folder (UNet2DConditionModel, UNet2DModel, "
                                            "DiT, PixArt).")]
Ratio = Annotated[float, typer.Option("--ratio", help="Fraction of each reduced block's tokens to reduce.")]
MaxDown = Annotated[int, typer.Option("--max-downsample", help="Reduce blocks up to this many times coarser.")]
Seed = Annotated[int | None, typer.Option("--seed", help="Draw window destinations once from this seed.")]
Config = Annotated[Path | None, typer.Option("--config", help="The UNet config, when SOURCE is a file.")]


def denoiser(
    source: Source,
    out: Annotated[Path, typer.Option("--out", "-o", help="Artifact folder to write.")],
    ratio: Ratio = 0.5,
    mode: Annotated[str, typer.Option("--mode", help="prune, mean (ToMe for SD) or mlerp.")] = "mlerp",
    max_downsample: MaxDown = 1,
    seed: Seed = None,
    policy: Annotated[Path | None, typer.Option("--policy", help="A calibrate-denoiser policy file.")] = None,
    config: Config = None,
    exporter: Annotated[str, typer.Option("--exporter", help="dynamo or torchscript.")] = "dynamo",
    force: Annotated[bool, typer.Option("--force", help="Replace an artifact folder tofu-export wrote.")] = False,
    sublayers: Annotated[str, typer.Option("--sublayers", help="Reduce before these sub-layers of a block: "
                                           "self, cross, mlp (comma-separated).")] = "self",
    opset: Annotated[int, typer.Option("--opset", help="17 (TensorRT 10) or 16 (also TensorRT 8.5).")] = 17,
    size: Annotated[int | None, typer.Option("--size", help="Sample side for a diffusers model (default: its "
                                              "sample_size).")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Read pickled diffusers weights "
                                                "(weights_only).")] = False,
) -> None:
    """Export one denoiser step with dense ToFu as a static-shape ONNX graph (parity and TensorRT checked).

    Example: tofu-export denoiser models/terrain_unet --ratio 0.5 --mode mlerp -o artifacts/terrain
    """
    from tofu_export.dense.job import export_denoiser_step

    result = export_denoiser_step(source, out, ratio=ratio, mode=mode, max_downsample=max_downsample, seed=seed,
                                  policy=policy, config=config, exporter=exporter, force=force,
                                  sublayers=sublayers.split(","), opset=opset, size=size, trust_pickle=trust_pickle)
    parity = result.parity
    typer.echo(f"wrote {result.path} (parity max |diff| {parity.max_abs_diff:.3g}, TensorRT static check "
               f"{'passed' if result.tensorrt and result.tensorrt['ok'] else 'not run'})")


def calibrate_denoiser(
    source: Source,
    out: Annotated[Path, typer.Option("--out", "-o", help="Policy file to write.")],
    ratio: Ratio = 0.5,
    min_psnr: Annotated[float | None, typer.Option("--min-psnr", help="Stop reducing blocks below this.")] = None,
    speedup: Annotated[float | None, typer.Option("--speedup", help="Keep the step's predicted (FLOP) speed-up at "
                                                   "least this, e.g. 1.1.")] = None,
    samples: Annotated[int, typer.Option("--samples", help="One-step samples to measure on.")] = 2,
    max_downsample: MaxDown = 1,
    seed: Seed = None,
    config: Config = None,
) -> None:
    """Choose each block's reduce mode by its damage to the final sample; write a policy for `denoiser --policy`.

    Example: tofu-export calibrate-denoiser models/terrain_unet --ratio 0.75 --min-psnr 35 -o terrain-policy.json
    """
    from tofu_export.dense.job import calibrate_denoiser_policy

    result = calibrate_denoiser_policy(source, out, ratio=ratio, min_psnr=min_psnr, speedup=speedup, samples=samples,
                                       max_downsample=max_downsample, seed=seed, config=config)
    modes = ", ".join(f"{k}={v.mode}" for k, v in result.policy.blocks.items())
    predicted = result.policy.notes.get("predicted_speedup")
    speed = f", predicted speed-up {predicted:.3f}x" if predicted else ""
    typer.echo(f"wrote {out}: {result.psnr:.1f} dB, SSIM {result.ssim:.4f}{speed} ({modes})")
