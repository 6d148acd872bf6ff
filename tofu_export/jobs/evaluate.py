"""`tofu-export eval`: score a ToFu model (PyTorch, ONNX or TensorRT) against its unreduced reference."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tofu_export.evaluation import EvaluationError, OrtPredictor, TorchPredictor, TrtPredictor, evaluate
from tofu_export.models.timm_vit import patch
from tofu_export.schedule import RSpec

ARTIFACT_SUFFIXES = {".onnx": OrtPredictor, ".engine": TrtPredictor, ".plan": TrtPredictor}


def run_cli_eval(
    model: str,
    data: Path,
    *,
    reference: str | None,
    r: RSpec,
    mode: str,
    arch: str | None,
    batch_size: int,
    limit: int | None,
    threads: int | None,
    trust_pickle: bool,
    load: Callable[[str, str | None, int | None, bool], Any],
) -> dict[str, Any]:
    """Evaluate ``model`` on ``data``; artifacts need ``reference`` (their source checkpoint) to compare against."""
    if not Path(data).is_dir():
        raise EvaluationError(f"{data} is not a folder of images (ImageFolder layout, or train/ and test/)")
    suffix = Path(model).suffix
    if suffix in ARTIFACT_SUFFIXES:
        if reference is None:
            raise EvaluationError(
                f"{model} is a deployed artifact: pass --reference CHECKPOINT (the checkpoint it was exported "
                "from) so its outputs can be compared with the unreduced model's."
            )
        reference_model = load(reference, arch, None, trust_pickle)
        predictor = ARTIFACT_SUFFIXES[suffix](model) if suffix != ".onnx" else OrtPredictor(model, threads)
        description = {"candidate": str(model)}
    else:
        reference_model = load(model, arch, None, trust_pickle)
        candidate = patch(copy.deepcopy(reference_model), r, mode)
        predictor = TorchPredictor(candidate)
        description = {"candidate": f"{model} patched mode={mode} r={r}"}
    report = evaluate(reference_model, predictor, data, batch_size=batch_size, limit=limit)
    return {**description, **report.to_dict()}
