"""One-call evaluation of a reduced model (ToFu-patched module, ONNX or TensorRT artifact) on an image folder.

* reference has a head (``num_classes > 0``): top-1 / top-5 of the reference and of the candidate, and the share of
  images whose top-1 class the candidate keeps (``top1_agreement``, %);
* headless backbone: cosine similarity of the candidate's pooled features to the unreduced reference's,
  plus DINO-style k-NN top-1 of both backbones when ``data`` has ``train/`` and ``test/`` (or ``val/``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from tofu_export.engines.torch import TorchRunner
from tofu_export.evaluation.data import Transform, make_loader, model_transform, split_folders
from tofu_export.evaluation.errors import EvaluationError
from tofu_export.evaluation.metrics import (
    Predictor,
    classify,
    cosine_standard_error,
    extract_features,
    feature_cosine,
    knn_accuracy,
)


@dataclass(frozen=True)
class EvaluationReport:
    """Flat metrics (``reference_top1``, ``candidate_top1``, ``cosine_mean``, ``candidate_knn_top1``, ...)."""

    task: Literal["classification", "fidelity"]
    data: str
    n_eval: int
    n_train: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(
    reference: torch.nn.Module,
    candidate: Predictor,
    data: str | Path,
    *,
    transform: Transform | None = None,
    batch_size: int = 32,
    num_workers: int = 1,
    limit: int | None = None,
    knn_k: int = 20,
    knn_temperature: float = 0.07,
) -> EvaluationReport:
    """Score ``candidate`` against the unreduced ``reference`` on the ImageFolder ``data``.

    ``candidate`` must output what ``reference(images)`` outputs: logits ``[B, K]`` for a classifier,
    pooled features ``[B, D]`` for a headless backbone. ``transform`` defaults to the reference's eval
    transform; ``limit`` caps the images per split (evenly strided, for quick runs).
    """
    train_dir, eval_dir = split_folders(data)
    transform = transform or model_transform(reference)

    def loader(root: Path) -> torch.utils.data.DataLoader:
        return make_loader(root, transform, batch_size=batch_size, num_workers=num_workers, limit=limit)

    eval_loader = loader(eval_dir)
    n_eval = len(eval_loader.dataset)  # type: ignore[arg-type]
    if getattr(reference, "num_classes", 0):
        metrics = {}
        top1 = {}
        for name, predictor in (("reference", TorchRunner(reference)), ("candidate", candidate)):
            scores, top1[name] = classify(predictor, eval_loader)
            metrics.update({f"{name}_{key}": value for key, value in scores.items() if key != "n"})
        metrics["top1_agreement"] = 100.0 * float((top1["reference"] == top1["candidate"]).double().mean())
        return EvaluationReport("classification", str(data), n_eval, metrics=metrics)

    reference_predictor = TorchRunner(reference)
    reference_eval, eval_labels = extract_features(reference_predictor, eval_loader)
    candidate_eval, _ = extract_features(candidate, eval_loader)
    if candidate_eval.shape != reference_eval.shape:
        raise EvaluationError(
            f"The candidate outputs {list(candidate_eval.shape[1:])} per image but the headless reference "
            f"outputs {list(reference_eval.shape[1:])}; export the reduced model headless (num_classes=0)."
        )
    cosine = feature_cosine(reference_eval, candidate_eval)
    metrics = {f"cosine_{key}": value for key, value in cosine.items()}
    metrics["cosine_se"] = cosine_standard_error(reference_eval, candidate_eval)
    if train_dir is None:
        return EvaluationReport("fidelity", str(data), n_eval, metrics=metrics)
    train_loader = loader(train_dir)
    for name, predictor, eval_features in (
        ("reference", reference_predictor, reference_eval),
        ("candidate", candidate, candidate_eval),
    ):
        train_features, train_labels = extract_features(predictor, train_loader)
        metrics[f"{name}_knn_top1"] = knn_accuracy(
            train_features, train_labels, eval_features, eval_labels, k=knn_k, temperature=knn_temperature
        )
    n_train = len(train_loader.dataset)  # type: ignore[arg-type]
    return EvaluationReport("fidelity", str(data), n_eval, n_train, metrics)
