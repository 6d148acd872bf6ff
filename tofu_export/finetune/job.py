"""``finetune``: a checkpoint tuned to run with its token reduction, written beside its evidence.

The whole job in order: pick training and held-out images from one folder (disjoint, evenly spread), run the
unreduced model once on both (the targets), patch a copy with ToFu, score it on the held-out images, distil
(``finetune.distill``), score it again, and write the tuned weights (``.safetensors``), a sidecar stating the
architecture and what the weights were tuned for (so every command reads them as it reads a timm hub file), and
a plot of the loss. Nothing is written until the training is done; no existing file is replaced.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tofu_export.errors import Hint, UserError
from tofu_export.finetune.distill import TRAINED_WEIGHTS, DistillSettings
from tofu_export.images import ImageError, decode_images, evenly_spaced
from tofu_export.output_paths import FileOutput, check_file_outputs, is_tofu_png
from tofu_export.reports.artifact import clip_notes

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tofu_export.config import ToFuConfig
    from tofu_export.models.family import LoadedModel

TUNABLE_FAMILIES = ("timm", "timm_eva")  # whose weights are written back as a timm state dict with a sidecar
MIN_IMAGES = 8  # training images, and held-out images (a standard error over fewer says little)
BATCH = 32  # images a forward of the targets and the held-out scores takes


class FinetuneError(UserError):
    """Bad settings, outputs that may not be written, or a model this command cannot write back. Exit code 2."""


class FinetuneDataError(ImageError, FinetuneError):
    """The image folder cannot be read, holds too few images, or a file is not an image."""


@dataclass(frozen=True)
class FinetuneOutputs:
    """The three files a fine-tuning writes: the weights, the sidecar beside them, the loss plot."""

    weights: Path
    sidecar: Path
    plot: Path

    @classmethod
    def at(cls, out: str | Path) -> FinetuneOutputs:
        out = Path(out)
        if out.suffix != ".safetensors":
            raise FinetuneError(f"{out}: tuned weights are written as .safetensors; name the file "
                                f"{out.with_suffix('.safetensors').name}", hint=Hint("out", None, "OUT.safetensors"))
        return cls(out, out.with_suffix(".json"), out.with_suffix(".png"))

    def check(self, inputs: list[str | Path]) -> None:
        """Refuse, before any work, outputs that exist (the plot only where tofu-export did not write it)."""
        never = lambda path: False  # noqa: E731  (a checkpoint and its sidecar are never replaced)
        check_file_outputs([FileOutput(self.weights, never, "tuned checkpoint"),
                            FileOutput(self.sidecar, never, "checkpoint sidecar"),
                            FileOutput(self.plot, is_tofu_png, "loss plot")], inputs=inputs)


def check_settings(settings: DistillSettings, images: int, holdout: int) -> None:
    """Every number checked before torch is imported."""
    for name, value, least in (("steps", settings.steps, 1), ("batch", settings.batch, 1),
                               ("images", images, MIN_IMAGES), ("holdout", holdout, MIN_IMAGES),
                               ("warmup", settings.warmup, 0)):
        if value < least:
            raise FinetuneError(f"--{name} must be at least {least}, got {value}", hint=Hint(name, str(least)))
    if not settings.lr > 0:
        raise FinetuneError(f"--lr must be positive, got {settings.lr}", hint=Hint("lr", "1e-4"))
    if settings.weights not in TRAINED_WEIGHTS:
        raise FinetuneError(f"--weights must be one of {', '.join(TRAINED_WEIGHTS)}, got {settings.weights!r}",
                            hint=Hint("weights", "vectors"))


def split_images(root: str | Path, images: int, holdout: int) -> tuple[list[Path], list[Path], Path]:
    """``(training files, held-out files, folder)``: ``images + holdout`` files evenly spread over ``root``
    (``root/train`` where it exists), the held-out ones evenly spread among them; disjoint by construction."""
    from tofu_export.calibration.images import image_files

    folder, files = image_files(root, FinetuneDataError, "data")
    if len(files) < 2 * MIN_IMAGES:
        raise FinetuneDataError(f"{folder} holds {len(files)} images; fine-tuning needs at least {2 * MIN_IMAGES} "
                                f"({MIN_IMAGES} to train on, {MIN_IMAGES} held out)", hint=Hint("data"))
    chosen = evenly_spaced(files, images + holdout)
    held = set(evenly_spaced(range(len(chosen)), min(holdout, len(chosen) // 2)))
    return [f for i, f in enumerate(chosen) if i not in held], [chosen[i] for i in sorted(held)], folder


def outputs_of(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``[N, D]``: ``model``'s outputs on ``images [N, 3, H, W]``, ``BATCH`` at a time, without gradients."""
    import torch

    with torch.inference_mode():
        return torch.cat([model(chunk).flatten(1) for chunk in images.split(BATCH)])


def held_out_fidelity(student: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """The student's cosine to the unreduced model on the held-out images: mean, its SE, the lowest."""
    from tofu_export.evaluation.metrics import cosine_per_image, cosine_standard_error

    cosine = cosine_per_image(targets, outputs_of(student, images))
    return {"mean": float(cosine.mean()), "se": cosine_standard_error(cosine), "min": float(cosine.min()),
            "per_image": cosine.tolist()}


def finetune(loaded: LoadedModel, data: str | Path, tofu: ToFuConfig, settings: DistillSettings,
             out: str | Path, *, images: int = 256, holdout: int = 64, progress: bool = True,
             step: Callable[[str], None] = lambda stage: None) -> dict[str, Any]:
    """Tune ``loaded``'s model to run reduced as ``tofu`` says; write ``out`` (``.safetensors``), its sidecar and
    its loss plot; return the report (held-out fidelity before and after, the loss, what was written). ``step``
    hears each stage as it begins; ``progress``: a bar (or log lines) over the training steps."""
    from tofu_export.evaluation.data import model_transform
    from tofu_export.evaluation.metrics import paired_difference
    from tofu_export.finetune.distill import distill, trained_parameters
    from tofu_export.models.family import unpatch
    from tofu_export.progress import tracker

    check_settings(settings, images, holdout)
    outputs = FinetuneOutputs.at(out)
    outputs.check([p for p in (loaded.path, data) if p is not None])
    family = loaded.family.name
    if family not in TUNABLE_FAMILIES:
        raise FinetuneError(f"finetune writes timm checkpoints back; a {family} model is not supported yet "
                            f"(supported: {', '.join(TUNABLE_FAMILIES)})")
    started = time.perf_counter()
    teacher = loaded.model.eval()
    student = copy.deepcopy(teacher)
    with warnings.catch_warnings(record=True) as caught:  # an impossible r is refused here, before any image
        warnings.simplefilter("always")
        resolved = tofu.patch(student, static=False)
    notes = [*clip_notes(resolved.plan), *(str(w.message) for w in caught if "clipped" not in str(w.message))]
    train_files, held_files, folder = split_images(data, images, holdout)
    step(f"reading {len(train_files)} training and {len(held_files)} held-out images from {folder}")
    transform = model_transform(loaded.model)
    train = decode_images(train_files, transform, FinetuneDataError)
    held = decode_images(held_files, transform, FinetuneDataError)
    step("running the unreduced model on them (the targets)")
    train_targets, held_targets = outputs_of(teacher, train), outputs_of(teacher, held)
    step("scoring the reduced model on the held-out images")
    before = held_out_fidelity(student, held, held_targets)
    trained = trained_parameters(student, settings.weights)
    count = sum(p.numel() for _, p in trained)
    total = sum(p.numel() for p in student.parameters())
    step(f"training {count:,} of {total:,} weights ({settings.weights}) for {settings.steps} steps")
    with tracker("fine-tuning", settings.steps, enabled=progress, announce=True) as bar:
        def on_step(index: int, loss: float) -> None:
            bar.status(f"loss {loss:.5f}")
            bar.advance()

        losses = distill(student, train, train_targets, settings, on_step)
    step("scoring the tuned model on the held-out images")
    after = held_out_fidelity(student, held, held_targets)
    gain = paired_difference(after["per_image"], before["per_image"])
    unpatch(student)  # the weights written are those of the plain model, as it was loaded
    report = {
        "checkpoint": str(Path(loaded.path).resolve()) if loaded.path else None, "checkpoint_sha256": loaded.sha256,
        "architecture": loaded.arch.name, "data": str(folder),
        "images": len(train_files), "held_out": len(held_files),
        "tuned_for": {"r": resolved.r, "removes": resolved.plan.r, "modes": resolved.modes,
                      "prop_attn": resolved.prop_attn, "img_size": resolved.img_size, "source": resolved.source},
        "notes": notes,
        "settings": asdict(settings), "trained_weights": count, "weights": total,
        "held_out_before": {k: v for k, v in before.items() if k != "per_image"},
        "held_out_after": {k: v for k, v in after.items() if k != "per_image"},
        "gain": gain, "loss": losses, "seconds": round(time.perf_counter() - started, 1),
        "outputs": {"weights": str(outputs.weights), "sidecar": str(outputs.sidecar), "plot": str(outputs.plot)},
    }
    step(f"writing {outputs.weights.name}, {outputs.sidecar.name} and {outputs.plot.name}")
    write_outputs(student, loaded, report, outputs)
    return report


def write_outputs(model: nn.Module, loaded: LoadedModel, report: dict[str, Any], outputs: FinetuneOutputs) -> None:
    """The weights, then the sidecar, then the plot; a failure removes what this call wrote before it."""
    from tofu_export.atomic import signals_held
    from tofu_export.evaluation.data import model_data_config
    from tofu_export.finetune.plot import plot_loss
    from tofu_export.models.loading import TUNED_SIDECAR  # the mark the sidecar's reader checks
    from tofu_export.weights_file import save_safetensors, write_new

    config = model_data_config(loaded.model)
    pretrained_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if k != "input_size"}
    statement = {"architecture": loaded.arch.name, "model_args": loaded.arch.kwargs,
                 "pretrained_cfg": pretrained_cfg, "written_by": TUNED_SIDECAR,
                 **{k: v for k, v in report.items() if k not in ("loss", "outputs")}}
    metadata = {"written_by": TUNED_SIDECAR, "source_sha256": loaded.sha256 or "",
                "tuned_for": json.dumps(report["tuned_for"])}
    written: list[Path] = []
    outputs.weights.parent.mkdir(parents=True, exist_ok=True)
    with signals_held():
        try:
            write_new(outputs.weights, lambda tmp: save_safetensors(model.state_dict(), tmp, metadata),
                      FinetuneError, "finetune")
            written.append(outputs.weights)
            text = json.dumps(statement, indent=2, default=str) + "\n"
            write_new(outputs.sidecar, lambda tmp: tmp.write_text(text, encoding="utf-8"), FinetuneError, "finetune")
            written.append(outputs.sidecar)
            plot_loss(report, outputs.plot)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)  # ours, written a moment ago: nothing half-written stays
            raise
