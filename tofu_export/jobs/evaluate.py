"""Score a ToFu model (PyTorch, ONNX or TensorRT) against its unreduced reference, and against ToMe at the same
per-block r, on an image folder.

A deployed artifact's reference is the checkpoint its manifest records (a file or a folder, checked against the
recorded content hash), loaded at the size the artifact was exported at, unless the caller names one; a checkpoint
``finetune`` wrote, or an artifact exported from one, is compared with the checkpoint it was tuned from (its
statement says which). Library warnings raised on the way are collected as notes, not printed.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

from tofu_export.artifacts import graph_in
from tofu_export.class_names import NAMED_CLASSES, ZeroShot, class_names, read_class_names
from tofu_export.config import ToFuConfig
from tofu_export.errors import EvaluationError, Hint
from tofu_export.jobs.profile import backend_for, open_runner


def evaluate_model(
    model: str | Path,
    data: str | Path,
    *,
    tofu: ToFuConfig,
    reference: str | Path | None = None,
    arch: str | None = None,
    trust_pickle: bool = False,
    num_heads: int | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    threads: int | None = None,
    compare_tome: bool = True,
    img_size: int | None = None,
    zero_shot: ZeroShot | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``data``: a checkpoint is patched with ``tofu`` in PyTorch; a deployed artifact
    (``.onnx``, ``.engine``, or the artifact folder: its ``model.onnx``) is run as is. Either is compared with
    ``reference`` (default: the checkpoint itself unreduced, or the one the artifact's manifest records; for a tuned
    checkpoint, the one it was tuned from), and ToMe at the same r runs on that reference. Checkpoints are loaded at
    ``img_size`` (default: a checkpoint's own size, an artifact's the size it was exported at), the reference at the
    candidate's size.

    Returns ``{"candidate", "r", "task", "data", "n_eval", "n_train", "metrics", "tome", "vs_tome", "zero_shot",
    "notes"}``; ``r`` is the per-block r the model really removes; ``tome`` the same evaluation of ToMe at that r
    (None when not asked or when the candidate is ToMe); ``vs_tome`` the candidate's cosine minus ToMe's, image by
    image, with its standard error (``evaluation.metrics.paired_difference``; a backbone only, else None);
    ``zero_shot`` the classes, where their names came from, the prompts written out and the checkpoint whose text
    tower embedded them (None without ``zero_shot``).
    """
    model, data = graph_in(model), Path(data)  # an artifact folder: its model.onnx
    if not data.is_dir():
        raise EvaluationError(f"{data} is not a folder of images (ImageFolder layout, or train/ and test/)")
    if batch_size < 1:
        raise EvaluationError(f"the batch size must be at least 1, got {batch_size}", hint=Hint("batch_size", "32"))
    if limit is not None and limit < 1:
        raise EvaluationError(f"the image limit must be at least 1, got {limit}", hint=Hint("limit", "100"))
    if zero_shot is not None and zero_shot.names_file is not None and str(zero_shot.names_file) not in NAMED_CLASSES:
        read_class_names(zero_shot.names_file)  # a file that names no classes: said before torch is loaded
    from tofu_export.engines.torch import TorchRunner  # torch and timm: after the checks above
    from tofu_export.evaluation import Reference, evaluate, split_folders
    from tofu_export.evaluation.metrics import Predictor, paired_difference
    from tofu_export.evaluation.zero_shot import zero_shot_predictor, zero_shot_reference
    from tofu_export.models.loading import load_model, stated_at_export
    notes: list[str] = []
    if zero_shot is not None:  # the class names before any model is loaded
        names, names_from = class_names(data, split_folders(data)[1], zero_shot.names_file)
        notes.append(zero_shot.note(len(names), names_from))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if backend_for(model, None) != "torch":  # a deployed artifact (.onnx, .engine)
            reference_path, mode, r, exported_at = artifact_reference(model, reference)
            if reference is None:  # exported from a tuned checkpoint: compared with the one it was tuned from
                reference_path = tuned_reference(reference_path, notes) or reference_path
            if reference is None and arch is None and num_heads is None:  # as the artifact's export was told
                arch, num_heads = stated_at_export(model.parent)
            reference_loaded = load_model(reference_path, arch=arch, trust_pickle=trust_pickle, num_heads=num_heads,
                                          img_size=img_size or exported_at)
            text_from = reference_path
            candidate = open_runner(model, threads=threads)
            description = str(model)
        else:
            loaded = load_model(model, arch=arch, trust_pickle=trust_pickle, num_heads=num_heads, img_size=img_size)
            tuned = loaded.model
            origin = Path(reference) if reference is not None else tuned_reference(model, notes)
            reference_loaded = loaded if origin is None else load_model(
                origin, arch=arch, trust_pickle=trust_pickle, num_heads=num_heads, img_size=loaded.img_size)
            text_from = Path(model) if origin is None else origin
            patched = copy.deepcopy(tuned)
            resolved = tofu.patch(patched, static=False)
            mode, r = tofu.label, list(resolved.plan.r)
            candidate = TorchRunner(patched, threads=threads)
            description = str(model)
        reference_model = reference_loaded.model
        if zero_shot is None:
            reference_outputs = Reference.of(reference_model)  # its outputs computed once for both candidates
        else:  # every model scored classifies against the same class embeddings, from the reference's text tower
            classes = zero_shot_classes(text_from, reference_loaded.sha256, names, zero_shot, arch=arch,
                                        trust_pickle=trust_pickle, notes=notes)
            reference_outputs = zero_shot_reference(reference_model, classes)

        def scored_as(predictor: Predictor) -> Predictor:
            return predictor if zero_shot is None else zero_shot_predictor(predictor, classes)

        scored = evaluate(reference_outputs, scored_as(candidate), data, batch_size=batch_size, limit=limit, label=mode)
        tome, vs_tome = None, None
        if compare_tome and mode != "tome" and any(r):
            tome_model = copy.deepcopy(reference_model)
            ToFuConfig(r=r, mode="tome").patch(tome_model, static=False)
            tome_scored = evaluate(reference_outputs, scored_as(TorchRunner(tome_model, threads=threads)), data,
                                   batch_size=batch_size, limit=limit, label="ToMe")
            tome = tome_scored.metrics
            if scored.cosines and tome_scored.cosines:  # the same images in the same order: paired
                vs_tome = paired_difference(scored.cosines, tome_scored.cosines)
    notes += list(dict.fromkeys(str(w.message).splitlines()[0] for w in caught))
    classified = None if zero_shot is None else {"classes": names, "class_names": names_from,
                                                 "prompts": list(zero_shot.templates), "text_tower": str(text_from)}
    return {"candidate": description, "mode": mode, "r": r, **scored.to_dict(), "tome": tome, "vs_tome": vs_tome,
            "zero_shot": classified, "notes": notes}


def zero_shot_classes(checkpoint: Path, digest: str | None, names: list[str], zero_shot: ZeroShot, *,
                      arch: str | None, trust_pickle: bool, notes: list[str]) -> Any:
    """The class embeddings ``[K, D]`` of ``names`` in ``zero_shot``'s prompts by the text tower of ``checkpoint``
    (``evaluation.zero_shot.class_embeddings``), read from the class cache where an earlier command kept them (a
    note says so), else computed (the text tower loaded only then) and kept. ``digest`` is the checkpoint's content
    hash as its load recorded it (``LoadedModel.sha256``; None for a model name): not computed again here."""
    from tofu_export.evaluation.class_cache import cached_class_embeddings
    from tofu_export.evaluation.zero_shot import class_embeddings
    from tofu_export.models.loading import text_encoder

    def compute() -> Any:
        return class_embeddings(text_encoder(checkpoint, arch=arch, trust_pickle=trust_pickle), names, zero_shot)

    if digest is None or not checkpoint.exists():  # a model name (no hash), or a path not there: no text tower
        text_encoder(checkpoint, arch=arch, trust_pickle=trust_pickle)  # says why
    built_as = f"{digest} --arch {arch}"  # the same weights under another config: another tower
    classes, kept = cached_class_embeddings(built_as, names, zero_shot.templates, compute)
    if kept is not None:
        notes.append(f"zero-shot: the class embeddings were read from {kept}, kept by an earlier command for this "
                     "checkpoint, these names and prompts")
    return classes


def artifact_reference(model: Path, reference: str | Path | None) -> tuple[Path, str, list[int], int | None]:
    """The checkpoint to compare a deployed artifact with (a file or a folder), its mode, the per-block r and the
    input size it was exported at (None: not recorded, or not square), from the manifest beside it; a named
    ``reference`` wins. The recorded content hash must match the checkpoint found."""
    from tofu_export.manifest import MANIFEST, Manifest
    from tofu_export.models.loading import checkpoint_digest

    manifest = Manifest.read(model.parent) if (model.parent / MANIFEST).is_file() else None
    mode, r = (manifest.tofu.mode, list(manifest.tofu.r)) if manifest else ("unknown", [])
    size = manifest.img_size if manifest else []
    exported_at = int(size[0]) if len(size) == 2 and size[0] == size[1] else None
    if reference is not None:
        return Path(reference), mode, r, exported_at
    if manifest is None:
        raise EvaluationError(
            f"{model} is a deployed artifact without a tofu-export manifest beside it: its outputs are compared "
            "with the unreduced model's, so the checkpoint it was exported from is needed.",
            hint=Hint("reference", "CHECKPOINT"),
        )
    recorded = Path(manifest.input.path)
    path = recorded if recorded.is_absolute() or recorded.exists() else model.parent / recorded
    if not path.exists():
        raise EvaluationError(f"the checkpoint {recorded} recorded in {model.parent / MANIFEST} is not there (the "
                              "artifact was exported elsewhere); name it", hint=Hint("reference", "CHECKPOINT"))
    if manifest.input.sha256 and checkpoint_digest(path) != manifest.input.sha256:
        raise EvaluationError(f"{path} is not the checkpoint {model} was exported from (its sha256 differs from the "
                              "manifest's); name the right one", hint=Hint("reference", "CHECKPOINT"))
    return path, mode, r, exported_at


def tuned_reference(checkpoint: Path, notes: list[str]) -> Path | None:
    """For a checkpoint ``finetune`` wrote, the one it was tuned from (what the reduction's cost is measured
    against: the tuned model's own unreduced outputs moved with its weights), with a note either way; None for any
    other checkpoint, or where the origin is not found (then the tuned model is its own reference, and the note
    says to name the origin)."""
    from tofu_export.finetune.origin import tuned_origin

    origin = tuned_origin(checkpoint)
    if origin is None:
        return None
    if origin.path is not None:
        notes.append(f"{checkpoint.name} was tuned by tofu-export finetune: the reference is the checkpoint it was "
                     f"tuned from, {origin.path} (sha256 checked), unreduced")
        return origin.path
    where = f"{origin.recorded} is not there or has changed" if origin.recorded else "it was tuned from a model name"
    notes.append(f"{checkpoint.name} was tuned by tofu-export finetune, but {where}: the reference is the tuned model "
                 "itself, unreduced, whose outputs moved with the tuning; pass --reference ORIGINAL to measure "
                 "against the model it was tuned from")
    return None
