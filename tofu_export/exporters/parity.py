"""Parity: does the exported graph on ONNX Runtime compute what the PyTorch model computes, on fixed inputs?

``side_by_side`` runs both on the same batches and ``row_cosines`` compares them sample by sample: a ViT export's
gate (``verify_parity``, its floors per precision in ``exporters.precision``) and a denoiser step's
(``dense.export.verify_denoiser``) are both built on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from tofu_export.errors import ExportError
from tofu_export.exporters.precision import PARITY_FLOORS
from tofu_export.names import Precision

if TYPE_CHECKING:
    from tofu_export.engines.ort import Optimization

MIN_COSINE = PARITY_FLOORS["fp32"].min_cosine  # every image's ONNX output must keep at least this cosine to PyTorch's
MIN_WITHIN = PARITY_FLOORS["fp32"].min_within  # and at least this fraction of images must agree to the tolerance


@dataclass(frozen=True)
class Parity:
    """How closely ONNX Runtime reproduces PyTorch on fixed inputs.

    Token matching takes discrete decisions (top-k of similarity scores). Where two candidate matches are tied to
    within float rounding, ONNX Runtime and PyTorch (whose kernels round differently) may resolve the tie
    differently, and that image's output then differs more than rounding. ``ok`` therefore asks that *most*
    images agree to ``tolerance`` (relative to the output scale) and that *every* image keeps a cosine
    similarity of at least ``MIN_COSINE`` to PyTorch's output; the images over tolerance are counted. FP16 and INT8
    graphs are held to their own floors (``precision.PARITY_FLOORS``), always against the FP32 PyTorch model.
    """

    batch_sizes: list[int]
    max_abs_diff: float
    mean_abs_diff: float
    output_scale: float  # max |PyTorch output|, for reading max_abs_diff relatively
    images_within_tolerance: float  # fraction of images whose every output is within tolerance
    min_cosine: float  # smallest per-image cosine similarity between the two outputs
    top1_agreement: float | None  # fraction of images with the same argmax (classifiers only, else None)
    tolerance: float
    ok: bool
    precision: str = "fp32"
    ort_optimization: str = "all"  # ONNX Runtime's graph optimisation level ("basic": an INT8 graph's Q/DQ unfused)


def side_by_side(
    model: nn.Module,
    onnx_path: str | Path,
    batches: Sequence[tuple[torch.Tensor, ...]],
    optimization: Optimization = "all",
) -> tuple[np.ndarray, np.ndarray]:
    """``(expected, got)``: PyTorch's (FP32) and ONNX Runtime's first output for every batch of inputs, each
    ``[samples, outputs]`` (a sample's output flattened, batches stacked). Inputs go to the graph's inputs in order,
    as they are (a class label stays int64), but a FLOAT16 graph input is fed FLOAT16. ``ExportError`` when the two
    outputs' shapes differ. ``optimization``: ONNX Runtime's graph optimisation level (see ``create_session``)."""
    from tofu_export.engines.ort import create_session

    session = create_session(onnx_path, optimization=optimization)
    half = [i.name for i in session.get_inputs() if i.type == "tensor(float16)"]
    names = [i.name for i in session.get_inputs()]
    expected_all, got_all = [], []
    for inputs in batches:
        with torch.no_grad():
            expected = model(*inputs).float().numpy()
        feed = {name: tensor.numpy().astype(np.float16) if name in half else tensor.numpy()
                for name, tensor in zip(names, inputs, strict=True)}
        got = session.run(None, feed)[0].astype(np.float32)
        if got.shape != expected.shape:
            raise ExportError(f"ONNX output shape {got.shape} differs from PyTorch {expected.shape}")
        expected_all.append(expected.reshape(len(expected), -1))
        got_all.append(got.reshape(len(got), -1))
    return np.concatenate(expected_all), np.concatenate(got_all)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[n]``: the cosine similarity of each row of ``a`` ``[n, k]`` with the same row of ``b``: 0 where one row
    is zero and the other not, 1 where both are (the same output; a zero-initialised head's, say)."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = ~a.any(axis=1) & ~b.any(axis=1)
    return np.where(both_zero, 1.0, (a * b).sum(axis=1) / np.maximum(norms, 1e-30))


def verify_parity(
    model: nn.Module,
    onnx_path: str | Path,
    img_size: tuple[int, int],
    batch_sizes: Sequence[int] = (1, 8),
    tolerance: float = 1e-4,
    seed: int = 0,
    inputs: torch.Tensor | None = None,
    precision: Precision = "fp32",
    optimization: Optimization = "all",
) -> Parity:
    """Run PyTorch (FP32) and ONNX Runtime on the same fixed inputs and compare outputs (see ``Parity`` for ``ok``).

    Inputs are seeded standard-normal images (the scale of normalised pixels), one batch per size, or ``inputs``
    ``[B, 3, H, W]`` when given; an FP16 graph is fed FLOAT16. ``precision`` picks the floors the outputs must meet.
    ``optimization``: ONNX Runtime's graph optimisation level; ``"basic"`` keeps Q/DQ nodes unfused, so an INT8
    graph is run as the ONNX spec defines it rather than through this CPU's fused integer kernels.
    """
    generator = torch.Generator().manual_seed(seed)
    batches = [inputs] if inputs is not None else [
        torch.randn(b, 3, *img_size, generator=generator) for b in batch_sizes]
    expected, got = side_by_side(model, onnx_path, [(images,) for images in batches], optimization)  # [images, out]
    floor = PARITY_FLOORS[precision]
    diff, scale = np.abs(got - expected), float(np.abs(expected).max())
    within = diff.max(axis=1) <= (floor.relative or tolerance) * max(1.0, scale)
    cosine = row_cosines(got, expected)
    classifier = bool(getattr(model, "num_classes", 0)) and expected.shape[1] > 1  # timm's, HFVisionEncoder's
    top1 = float((got.argmax(1) == expected.argmax(1)).mean()) if classifier else None
    return Parity(
        batch_sizes=[len(b) for b in batches],
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        output_scale=scale,
        images_within_tolerance=float(within.mean()),
        min_cosine=float(cosine.min()),
        top1_agreement=top1,
        tolerance=floor.relative or tolerance,
        ok=bool(within.mean() >= floor.min_within and cosine.min() >= floor.min_cosine
                and (top1 is None or floor.min_top1 is None or top1 >= floor.min_top1)),
        precision=precision,
        ort_optimization=optimization,
    )


def require_parity(
    model: nn.Module, staged: Path, size: tuple[int, int], batch_sizes: Sequence[int], tolerance: float,
    precision: Precision, images: torch.Tensor | None, optimization: Optimization = "all",
) -> Parity:  # fmt: skip
    """The parity of ``staged`` (on ``images`` when given, else seeded random batches); ``ExportError`` when off."""
    parity = verify_parity(model, staged, size, batch_sizes, tolerance, inputs=images, precision=precision,
                           optimization=optimization)
    if not parity.ok:
        floor = PARITY_FLOORS[precision]
        top1 = "" if parity.top1_agreement is None or floor.min_top1 is None else (
            f"; top-1 agreement {parity.top1_agreement:.0%} ({floor.min_top1:.0%} needed)")
        raise ExportError(
            f"the {precision} graph on ONNX Runtime disagrees with the FP32 PyTorch model: max |diff| = "
            f"{parity.max_abs_diff:.3g} on outputs up to {parity.output_scale:.3g}; "
            f"{parity.images_within_tolerance:.0%} of the images agree to the tolerance ({parity.tolerance:g} "
            f"relative, {floor.min_within:.0%} needed) and the lowest per-image cosine is {parity.min_cosine:.6f} "
            f"({floor.min_cosine} needed){top1}; nothing was written. {parity_advice(parity)}"
        )
    return parity


def parity_advice(parity: Parity) -> str:
    """What to do about a failed check: enough images agree but one is below the cosine floor (FP32): near ties."""
    floor = PARITY_FLOORS[parity.precision]
    if parity.precision == "fp32" and parity.images_within_tolerance >= floor.min_within:
        return ("Most images agree, so the graph computes the model; the others hold near-tied token matches that "
                "ONNX Runtime and PyTorch resolve differently, and with few tokens left one such tie moves the output "
                "further than the cosine floor allows: reduce less in the last blocks (a smaller r, or a policy "
                "calibrated for less speed-up).")
    return ("If the model is numerically sensitive, raise --tolerance (FP32) or use a higher precision; otherwise "
            "please report it.")


def parity_notes(parity: Parity) -> list[str]:
    """The manifest's note on a passing check where some images differed by more than the tolerance."""
    if parity.images_within_tolerance >= 1:
        return []
    ties = "near-tied token matches resolved differently by ONNX Runtime and PyTorch, whose float rounding differs"
    cause = ties if parity.precision == "fp32" else (
        f"the {parity.precision} graph's rounding against the FP32 model, and {ties}")
    return [f"{1 - parity.images_within_tolerance:.0%} of the parity images differ by more than the tolerance "
            f"(up to {parity.max_abs_diff:.3g}, cosine >= {parity.min_cosine:.7f}): {cause}."]
