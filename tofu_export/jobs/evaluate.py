"""Score a ToFu model (PyTorch, ONNX or TensorRT) against its unreduced reference on an image folder."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from tofu_export.config import ToFuConfig
from tofu_export.errors import Hint
from tofu_export.evaluation import EvaluationError, evaluate
from tofu_export.jobs.profile import backend_for, open_runner
from tofu_export.models.loading import load_model


def evaluate_model(
    model: str | Path,
    data: str | Path,
    *,
    tofu: ToFuConfig,
    reference: str | Path | None = None,
    arch: str | None = None,
    trust_pickle: bool = False,
    batch_size: int = 32,
    limit: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``data``: a checkpoint is patched with ``tofu`` in PyTorch; a deployed artifact
    (``.onnx``, ``.engine``) is run as is and needs ``reference``, the checkpoint it was exported from."""
    from tofu_export.engines.torch import TorchRunner

    model, data = Path(model), Path(data)
    if not data.is_dir():
        raise EvaluationError(f"{data} is not a folder of images (ImageFolder layout, or train/ and test/)")
    if batch_size < 1:
        raise EvaluationError(f"the batch size must be at least 1, got {batch_size}", hint=Hint("batch_size", "32"))
    if limit is not None and limit < 1:
        raise EvaluationError(f"the image limit must be at least 1, got {limit}", hint=Hint("limit", "100"))
    if backend_for(model, None) != "torch":  # a deployed artifact (.onnx, .engine)
        if reference is None:
            raise EvaluationError(
                f"{model} is a deployed artifact: its outputs are compared with the unreduced model's, so the "
                "checkpoint it was exported from is needed.", hint=Hint("reference", "CHECKPOINT"),
            )
        reference_model = load_model(reference, arch=arch, trust_pickle=trust_pickle).model
        candidate = open_runner(model, threads=threads)
        description = {"candidate": str(model)}
    else:
        reference_model = load_model(model, arch=arch, trust_pickle=trust_pickle).model
        patched = copy.deepcopy(reference_model)
        resolved = tofu.patch(patched, static=False)
        candidate = TorchRunner(patched, threads=threads)
        description = {"candidate": f"{model} patched with {resolved.source}, r={resolved.r}"}
    report = evaluate(reference_model, candidate, data, batch_size=batch_size, limit=limit)
    return {**description, **report.to_dict()}
