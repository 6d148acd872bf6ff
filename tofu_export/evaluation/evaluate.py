"""One-call evaluation of a reduced model (ToFu-patched module, ONNX or TensorRT artifact) on an image folder.

* reference has a head (its family's ``num_classes > 0``: timm's ``num_classes``, a transformers
  ``*ForImageClassification``): top-1 / top-5 of the reference and of the candidate, and the share of
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
from tofu_export.errors import EvaluationError
from tofu_export.evaluation.data import Transform, make_loader, model_transform, split_folders
from tofu_export.evaluation.metrics import (
    Predictor,
    classify,
    cosine_per_image,
    cosine_standard_error,
    cosine_summary,
    extract_features,
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
    cosines: tuple[float, ...] = ()  # [n_eval] per image (fidelity): for paired comparisons, not in ``to_dict``

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if key != "cosines"}


@dataclass(frozen=True)
class ReferenceOutputs:
    """The unreduced model on one image folder: its top-1 classes ``[N]`` and ``scores`` (top1, top5) for a
    classifier, or its pooled ``features [N, D]`` and the folder's ``labels [N]`` for a backbone."""

    top1: torch.Tensor | None = None
    scores: dict[str, float] = field(default_factory=dict)
    features: torch.Tensor | None = None
    labels: torch.Tensor | None = None


@dataclass
class Reference:
    """The unreduced model, the transform its images get, and its outputs on each image folder, computed once however
    many candidates are scored against it (a sweep's points, ``eval``'s ToFu and ToMe)."""

    model: torch.nn.Module
    transform: Transform
    _outputs: dict[tuple[Any, ...], ReferenceOutputs] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, model: torch.nn.Module, transform: Transform | None = None) -> Reference:
        """``model``, its images transformed by ``transform`` (default: the model's own eval transform)."""
        return cls(model, transform or model_transform(model))

    @property
    def classifies(self) -> bool:
        """Whether the model's output is a classifier's logits, as its family says (timm's ``num_classes``, a
        transformers ``*ForImageClassification``)."""
        from tofu_export.models.family import num_classes

        return num_classes(self.model) > 0

    def outputs(self, loader: torch.utils.data.DataLoader, key: tuple[Any, ...]) -> ReferenceOutputs:
        """The model's outputs on ``loader``'s images, computed at the first call for ``key`` (the folder, then how it
        is read: limit, batch size)."""
        if key not in self._outputs:
            runner, split = TorchRunner(self.model), f"unreduced, {Path(key[0]).name}"
            if self.classifies:
                scores, top1 = classify(runner, loader, label=split)
                self._outputs[key] = ReferenceOutputs(top1=top1, scores={k: v for k, v in scores.items() if k != "n"})
            else:
                features, labels = extract_features(runner, loader, label=split)
                self._outputs[key] = ReferenceOutputs(features=features, labels=labels)
        return self._outputs[key]


def evaluate(
    reference: torch.nn.Module | Reference,
    candidate: Predictor,
    data: str | Path,
    *,
    transform: Transform | None = None,
    batch_size: int = 32,
    num_workers: int = 1,
    limit: int | None = None,
    knn_k: int = 20,
    knn_temperature: float = 0.07,
    label: str = "candidate",
) -> EvaluationReport:
    """Score ``candidate`` against the unreduced ``reference`` on the ImageFolder ``data``.

    ``candidate`` must output what ``reference(images)`` outputs: logits ``[B, K]`` for a classifier,
    pooled features ``[B, D]`` for a headless backbone. ``transform`` defaults to the reference's eval
    transform; ``limit`` caps the images per split (evenly strided, for quick runs). Pass a ``Reference`` to score
    several candidates against one model: its outputs are computed once. ``label`` names the candidate in progress.
    """
    if isinstance(reference, Reference):
        if transform is not None and transform is not reference.transform:
            raise ValueError("a Reference carries its transform: give it to Reference.of, not to evaluate")
    else:
        reference = Reference.of(reference, transform)
    train_dir, eval_dir = split_folders(data)

    def loader(root: Path) -> torch.utils.data.DataLoader:
        return make_loader(root, reference.transform, batch_size=batch_size, num_workers=num_workers, limit=limit)

    def reference_outputs(root: Path) -> tuple[torch.utils.data.DataLoader, ReferenceOutputs]:
        data_loader = loader(root)
        return data_loader, reference.outputs(data_loader, (str(root.resolve()), limit, batch_size))

    eval_loader, on_eval = reference_outputs(eval_dir)
    n_eval = len(eval_loader.dataset)  # type: ignore[arg-type]
    if reference.classifies:
        scores, candidate_top1 = classify(candidate, eval_loader, label=f"{label}, {eval_dir.name}")
        metrics = {f"reference_{key}": value for key, value in on_eval.scores.items()}
        metrics.update({f"candidate_{key}": value for key, value in scores.items() if key != "n"})
        metrics["top1_agreement"] = 100.0 * float((on_eval.top1 == candidate_top1).double().mean())
        return EvaluationReport("classification", str(data), n_eval, metrics=metrics)
    reference_eval, eval_labels = on_eval.features, on_eval.labels

    candidate_eval, _ = extract_features(candidate, eval_loader, label=f"{label}, {eval_dir.name}")
    if candidate_eval.shape != reference_eval.shape:
        raise EvaluationError(
            f"The candidate outputs {list(candidate_eval.shape[1:])} per image but the headless reference "
            f"outputs {list(reference_eval.shape[1:])}; export the reduced model headless (num_classes=0)."
        )
    per_image = cosine_per_image(reference_eval, candidate_eval)  # [n_eval]: once, for the summary, SE and pairing
    metrics = {f"cosine_{key}": value for key, value in cosine_summary(per_image).items()}
    metrics["cosine_se"] = cosine_standard_error(per_image)
    cosines = tuple(per_image.tolist())
    if train_dir is None:
        return EvaluationReport("fidelity", str(data), n_eval, metrics=metrics, cosines=cosines)
    train_loader, on_train = reference_outputs(train_dir)
    reference_train, train_labels = on_train.features, on_train.labels
    candidate_train, _ = extract_features(candidate, train_loader, label=f"{label}, {train_dir.name}")
    for name, train_features, eval_features in (("reference", reference_train, reference_eval),
                                                ("candidate", candidate_train, candidate_eval)):
        metrics[f"{name}_knn_top1"] = knn_accuracy(
            train_features, train_labels, eval_features, eval_labels, k=knn_k, temperature=knn_temperature
        )
    n_train = len(train_loader.dataset)  # type: ignore[arg-type]
    return EvaluationReport("fidelity", str(data), n_eval, n_train, metrics, cosines)
