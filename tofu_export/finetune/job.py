"""``finetune``: a checkpoint tuned to run with its token reduction, written beside its evidence.

The whole job in order: pick training and held-out images from one folder (disjoint, evenly spread), run the
unreduced model once on both (the targets), patch a copy with ToFu, score it on the held-out images, distil
(``finetune.distill``), score it again, and write the tuned weights where the family that read the checkpoint reads
them back (a timm model: ``.safetensors`` with a sidecar stating the architecture, read as a timm hub file is; a
transformers model: a ``save_pretrained`` folder; an open_clip tower: a hub folder of the whole CLIP model), a
statement of what the weights were tuned for, and a plot of the loss.
Nothing is written until the training is done; nothing existing is replaced.
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
from tofu_export.models.tuned import FOLDER_STATEMENT, TUNED_SIDECAR  # torch-free: what the families read back
from tofu_export.output_paths import FileOutput, check_file_outputs, check_new_path, is_tofu_png
from tofu_export.reports.artifact import clip_notes

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tofu_export.config import ToFuConfig
    from tofu_export.models.family import LoadedModel, ModelFamily

MIN_IMAGES = 8  # training images, and held-out images (a standard error over fewer says little)
BATCH = 32  # images a forward of the targets and the held-out scores takes


class FinetuneError(UserError):
    """Bad settings, outputs that may not be written, or a model this command cannot write back. Exit code 2."""


class FinetuneDataError(ImageError, FinetuneError):
    """The image folder cannot be read, holds too few images, or a file is not an image."""


@dataclass(frozen=True)
class FinetuneOutputs:
    """What a fine-tuning writes: the weights, the statement of what they are, the loss plot. A timm model's as
    three files (``OUT.safetensors``, ``OUT.json``, ``OUT.png``); a model read from a folder (transformers,
    open_clip) inside a new folder ``OUT`` (``folder``, then also ``weights``) laid out as its loader reads it."""

    weights: Path
    sidecar: Path
    plot: Path
    folder: Path | None = None

    @classmethod
    def at(cls, out: str | Path, *, folder: bool = False) -> FinetuneOutputs:
        """The outputs for ``-o out``: files for a timm model, a folder (``folder``) for a transformers or
        open_clip one."""
        out = Path(out)
        if folder:
            if out.suffix == ".safetensors":
                raise FinetuneError(f"{out}: a model read from a folder (transformers, open_clip) is written back as "
                                    f"a folder, as it was read; name the folder {out.with_suffix('').name}",
                                    hint=Hint("out", None, "OUT (a new folder)"))
            return cls(out, out / FOLDER_STATEMENT, out / "loss.png", folder=out)
        if out.suffix != ".safetensors":
            raise FinetuneError(f"{out}: tuned weights are written as .safetensors; name the file "
                                f"{out.with_suffix('.safetensors').name}", hint=Hint("out", None, "OUT.safetensors"))
        return cls(out, out.with_suffix(".json"), out.with_suffix(".png"))

    @property
    def checkpoint(self) -> Path:
        """What a command is given to load the tuned model: the weights file, or the folder."""
        return self.folder or self.weights

    def check(self, inputs: list[str | Path]) -> None:
        """Refuse, before any work, outputs that exist (the plot only where tofu-export did not write it)."""
        if self.folder is not None:  # a new folder, or nothing: a checkpoint folder is never added to or replaced
            check_new_path(self.folder, "tuned model folder", inputs)
            return
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
    """Tune ``loaded``'s model to run reduced as ``tofu`` says; write ``out`` (``FinetuneOutputs``: a timm model's
    ``.safetensors`` with its sidecar and loss plot, a transformers or open_clip model's folder); return the report
    (held-out fidelity before and after, the loss, what was written). ``step`` hears each stage as it begins;
    ``progress``: a bar (or log lines) over the training steps."""
    from tofu_export.evaluation.data import model_transform
    from tofu_export.evaluation.metrics import paired_difference
    from tofu_export.finetune.distill import distill, trained_parameters
    from tofu_export.models.family import families, unpatch, weights_writer
    from tofu_export.progress import tracker

    check_settings(settings, images, holdout)
    writer = weights_writer(loaded)
    if not writer.tuned_layout:
        writers = [f.name for f in families() if f.tuned_layout]
        raise FinetuneError(f"finetune cannot write the weights of {writer.name} models back yet (it writes "
                            f"{', '.join(writers)} models)")
    outputs = FinetuneOutputs.at(out, folder=writer.tuned_layout == "folder")
    outputs.check([p for p in (loaded.path, data) if p is not None])
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
        "outputs": {"checkpoint": str(outputs.checkpoint), "weights": str(outputs.weights),
                    "sidecar": str(outputs.sidecar), "plot": str(outputs.plot)},
    }
    step(f"writing {outputs.folder}" if outputs.folder else
         f"writing {outputs.weights.name}, {outputs.sidecar.name} and {outputs.plot.name}")
    write_outputs(student, loaded, report, outputs, writer)
    return report


def write_outputs(model: nn.Module, loaded: LoadedModel, report: dict[str, Any], outputs: FinetuneOutputs,
                  writer: ModelFamily) -> None:
    """The weights (``writer``: the family that reads them back), then the statement, then the plot, as files (a
    failure removes those this call wrote) or in a hidden folder moved into place whole; never over anything."""
    from tofu_export.atomic import signals_held

    metadata = {"written_by": TUNED_SIDECAR, "source_sha256": loaded.sha256 or "",
                "tuned_for": json.dumps(report["tuned_for"])}
    said = {"written_by": TUNED_SIDECAR, **{k: v for k, v in report.items() if k not in ("loss", "outputs")}}
    write = _write_folder if outputs.folder is not None else _write_files
    with signals_held():
        write(model, loaded, writer, report, outputs, metadata, said)


def _statement(built: dict[str, Any], said: dict[str, Any]) -> str:
    return json.dumps({**built, **said}, indent=2, default=str) + "\n"


def _write_files(model: nn.Module, loaded: LoadedModel, writer: ModelFamily, report: dict[str, Any],
                 outputs: FinetuneOutputs, metadata: dict[str, str], said: dict[str, Any]) -> None:
    from tofu_export.finetune.plot import plot_loss
    from tofu_export.weights_file import write_new

    written: list[Path] = []
    built: dict[str, Any] = {}

    def weights(tmp: Path) -> None:
        built.update(writer.write_weights(model, loaded, tmp, metadata))

    outputs.weights.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_new(outputs.weights, weights, FinetuneError, "finetune")
        written.append(outputs.weights)
        text = _statement(built, said)
        write_new(outputs.sidecar, lambda tmp: tmp.write_text(text, encoding="utf-8"), FinetuneError, "finetune")
        written.append(outputs.sidecar)
        plot_loss(report, outputs.plot)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)  # ours, written a moment ago: nothing half-written stays
        raise


def _write_folder(model: nn.Module, loaded: LoadedModel, writer: ModelFamily, report: dict[str, Any],
                  outputs: FinetuneOutputs, metadata: dict[str, str], said: dict[str, Any]) -> None:
    from tofu_export.finetune.plot import plot_loss
    from tofu_export.weights_file import write_new

    def fill(staging: Path) -> None:
        staging.mkdir()
        built = writer.write_weights(model, loaded, staging, metadata)
        (staging / outputs.sidecar.name).write_text(_statement(built, said), encoding="utf-8")
        plot_loss(report, staging / outputs.plot.name)

    outputs.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    write_new(outputs.checkpoint, fill, FinetuneError, "finetune")
