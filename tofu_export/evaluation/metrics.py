"""Accuracy and backbone-fidelity metrics over any predictor and any iterable of batches.

A *predictor* maps images ``[B, 3, H, W]`` to outputs ``[B, K]`` (a runner from :mod:`tofu_export.engines`).

A *loader* is any iterable of ``(images [B, 3, H, W], labels [B])`` (a ``DataLoader`` from
:func:`tofu_export.evaluation.data.make_loader`). Percentages are in ``[0, 100]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from tofu_export.errors import EvaluationError
from tofu_export.progress import tracker

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
Predictor = Callable[[torch.Tensor], torch.Tensor]  # images [B, 3, H, W] -> outputs [B, K]


def _with_progress(loader: Batches, doing: str, label: str = "") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Iterate ``loader`` with progress on stderr (long evaluations run for minutes on a CPU): a bar on a terminal,
    a line with elapsed time and ETA every few seconds in a log; ``label`` names the model and the images."""
    total = len(loader) if hasattr(loader, "__len__") else 0  # type: ignore[arg-type]
    with tracker(f"{doing} ({label})" if label else doing, total) as progress:
        for batch in loader:
            yield batch
            progress.advance()


def classification_accuracy(predictor: Predictor, loader: Batches, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies in % (keys ``top1``, ``top5``, ...) and the image count ``n``.

    ``k`` larger than the number of classes ``K`` counts as ``K`` (every label is then in the top-k).
    """
    return classify(predictor, loader, topk)[0]


def classify(
    predictor: Predictor, loader: Batches, topk: Sequence[int] = (1, 5), *, label: str = ""
) -> tuple[dict[str, float], torch.Tensor]:
    """``classification_accuracy``'s scores and the top-1 class of every image ``[N]`` (to compare two models);
    ``label`` names the model and the images in the progress line."""
    correct = dict.fromkeys(topk, 0)
    count = 0
    predictions = []
    for images, labels in _with_progress(loader, "classifying", label):
        logits = predictor(images)
        if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
            shape = list(logits.shape)
            raise EvaluationError(f"Expected logits [B, K] for B={labels.shape[0]} images, got {shape}.")
        num_classes = logits.shape[1]
        if int(labels.max()) >= num_classes:
            raise EvaluationError(
                f"Label {int(labels.max())} does not fit the model's {num_classes} classes. Class folders "
                "named by integers are read as class indices (ImageNet: 0..999); use a matching head."
            )
        ranked = logits.topk(min(max(topk), num_classes), dim=1).indices  # [B, k_max]
        predictions.append(ranked[:, 0].cpu())
        hits = ranked == labels.unsqueeze(1)  # [B, k_max]
        for k in topk:
            correct[k] += int(hits[:, :k].any(dim=1).sum())
        count += labels.shape[0]
    if count == 0:
        raise EvaluationError("The loader yielded no images; check the dataset folder.")
    return {**{f"top{k}": 100.0 * correct[k] / count for k in topk}, "n": float(count)}, torch.cat(predictions)


def extract_features(predictor: Predictor, loader: Batches, *, label: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the predictor's outputs and the labels: ``(features [N, D] float32, labels [N] int64)``; ``label``
    names the model and the images in the progress line."""
    features, labels = [], []
    for images, batch_labels in _with_progress(loader, "extracting features", label):
        output = predictor(images)
        if output.ndim != 2:
            raise EvaluationError(
                f"Expected pooled features [B, D], got {list(output.shape)}. Use a headless model "
                "(num_classes=0) or TorchRunner(model, features=True)."
            )
        features.append(output.float().cpu())
        labels.append(batch_labels.long().cpu())
    if not features:
        raise EvaluationError("The loader yielded no images; check the dataset folder.")
    return torch.cat(features), torch.cat(labels)


def feature_cosine(reference: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
    """Per-image cosine similarity of ``test [N, D]`` to ``reference [N, D]``: mean, min and 5th percentile."""
    return cosine_summary(cosine_per_image(reference, test))


def cosine_summary(cosine: torch.Tensor) -> dict[str, float]:
    """Mean, min and 5th percentile of per-image cosines ``cosine [N]`` (``cosine_per_image``)."""
    return {"mean": float(cosine.mean()), "min": float(cosine.min()), "p5": float(torch.quantile(cosine, 0.05))}


def cosine_per_image(reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """``[N]`` float64 cosine of each row of ``test [N, D]`` to the same row of ``reference [N, D]``, computed as
    ``<a, b> / sqrt(<a, a> <b, b>)`` so identical rows give exactly 1.0."""
    if reference.shape != test.shape or reference.ndim != 2:
        raise EvaluationError(
            f"Feature shapes differ: reference {list(reference.shape)} vs test {list(test.shape)}; both "
            "must be [N, D] from the same images, with the same feature width D."
        )
    a, b = reference.double(), test.double()
    dot = (a * b).sum(dim=1)
    norms = ((a * a).sum(dim=1) * (b * b).sum(dim=1)).sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    return (dot / norms).clamp(-1.0, 1.0)


def paired_difference(mine: Sequence[float], theirs: Sequence[float]) -> dict:
    """``mine - theirs`` over the same images: ``{"difference": mean, "standard_error": SE of that mean (None for
    one image), "images": n}``. Paired per image, so what makes an image hard for both cancels: the SE of a
    difference between two reductions, not the sum of their own SEs."""
    diffs = [a - b for a, b in zip(mine, theirs, strict=True)]
    n = len(diffs)
    if n == 0:
        raise ValueError("paired_difference needs at least one image")
    mean = sum(diffs) / n
    se = (sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) ** 0.5 if n > 1 else None
    return {"difference": mean, "standard_error": se, "images": n}


def images_to_show(paired: dict) -> int | None:
    """How many images a ``paired_difference`` of this size would need to stand two standard errors from zero, the
    per-image spread staying as measured: ``n (2 SE / |difference|)^2``, rounded up (at least ``n``). None where there
    is no difference or no error bar (one image)."""
    difference, se, n = paired["difference"], paired["standard_error"], paired["images"]
    if se is None or difference == 0:
        return None
    return max(n, math.ceil(n * (2 * se / abs(difference)) ** 2))


def cosine_standard_error(cosine: torch.Tensor) -> float:
    """The standard error of the mean of per-image cosines ``cosine [N]`` (``cosine_per_image``; sample std /
    sqrt(N); 0 for one image)."""
    return float(cosine.std() / len(cosine) ** 0.5) if len(cosine) > 1 else 0.0


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> float:
    """DINO-style weighted k-NN top-1 accuracy in %.

    Features ``[N, D]`` are L2-normalized; each test image votes with its ``k`` most cosine-similar train
    images, weighted ``exp(similarity / temperature)``; the class with the largest vote wins.
    """
    if train_features.shape[1] != test_features.shape[1]:
        raise EvaluationError(
            f"Train features are {train_features.shape[1]}-d, test features {test_features.shape[1]}-d."
        )
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train.shape[0])
    correct = 0
    for start in range(0, test.shape[0], chunk_size):
        similarity, index = (test[start : start + chunk_size] @ train.T).topk(k, dim=1)  # [T, k]
        votes = torch.zeros(similarity.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
        correct += int((votes.argmax(dim=1) == test_labels[start : start + chunk_size]).sum())
    return 100.0 * correct / test.shape[0]


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    steps: int = 300,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> float:
    """Top-1 accuracy in % of a logistic-regression probe fit full-batch (L-BFGS) on standardized features."""
    mean, std = train_features.mean(dim=0), train_features.std(dim=0).clamp_min(1e-6)
    train, test = (train_features - mean) / std, (test_features - mean) / std
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    generator = torch.Generator().manual_seed(seed)
    probe = torch.nn.Linear(train.shape[1], num_classes)
    with torch.no_grad():
        probe.weight.copy_(torch.randn(probe.weight.shape, generator=generator) * 0.01)
        probe.bias.zero_()
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(train), train_labels) + weight_decay * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return 100.0 * float((probe(test).argmax(dim=1) == test_labels).float().mean())
