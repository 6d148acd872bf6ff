"""Zero-shot classification with a two-tower model (CLIP, SigLIP), as CLIP scores ImageNet: one embedding per class
from its text tower (each prompt's embedding normalised, averaged over the prompts, normalised again), and an
image's scores the cosines of its image embedding to them. What the reduction costs is then an accuracy, for models
that have no classifier head. The text tower runs once, unreduced; only the image tower is reduced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tofu_export.class_names import ZeroShot
from tofu_export.errors import EvaluationError
from tofu_export.evaluation.data import model_transform
from tofu_export.evaluation.evaluate import Reference
from tofu_export.evaluation.metrics import Predictor
from tofu_export.progress import tracker

__all__ = ["ZeroShotClassifier", "class_embeddings", "zero_shot_logits", "zero_shot_predictor", "zero_shot_reference"]

_CLASSES_AT_ONCE = 32  # classes whose prompts go to the text tower in one call


def class_embeddings(encode: Callable[[Sequence[str]], Tensor], names: Sequence[str], zero_shot: ZeroShot) -> Tensor:
    """``[K, D]``: class ``k``'s prompts (``zero_shot.texts``) encoded by ``encode`` (``prompts -> [P, D]``), each
    normalised, averaged and normalised again."""
    per_class = len(zero_shot.templates)
    chunks = []
    with tracker(f"encoding {len(names)} class names x {per_class} prompts", len(names)) as progress:
        for start in range(0, len(names), _CLASSES_AT_ONCE):
            chunk = names[start:start + _CLASSES_AT_ONCE]
            encoded = F.normalize(encode(zero_shot.texts(chunk)).float(), dim=-1)  # [k * P, D]
            chunks.append(F.normalize(encoded.view(len(chunk), per_class, -1).mean(dim=1), dim=-1))  # [k, D]
            progress.advance(len(chunk))
    return torch.cat(chunks)


def zero_shot_logits(features: Tensor, classes: Tensor) -> Tensor:
    """Image embeddings ``[B, D]`` and normalised class embeddings ``[K, D]`` -> cosines ``[B, K]``."""
    if features.ndim != 2 or features.shape[1] != classes.shape[1]:
        raise EvaluationError(f"the image tower outputs {list(features.shape[1:])} per image, the text tower "
                              f"{classes.shape[1]}-wide embeddings: zero-shot needs the image tower's embedding (its "
                              "projection kept)")
    return F.normalize(features.float(), dim=-1) @ classes.T


def zero_shot_predictor(predictor: Predictor, classes: Tensor) -> Predictor:
    """``predictor`` (images -> image embeddings ``[B, D]``: a runner of any runtime) scoring ``classes``."""
    return lambda images: zero_shot_logits(predictor(images), classes)


class ZeroShotClassifier(nn.Module):
    """An image ``tower`` (``images [B, 3, H, W] -> [B, D]``) as a classifier of ``classes [K, D]``: ``[B, K]``."""

    def __init__(self, tower: nn.Module, classes: Tensor) -> None:
        super().__init__()
        self.tower = tower
        self.register_buffer("classes", classes)
        self.num_classes = classes.shape[0]

    def forward(self, images: Tensor) -> Tensor:
        return zero_shot_logits(self.tower(images), self.classes)


def zero_shot_reference(model: nn.Module, classes: Tensor) -> Reference:
    """The unreduced image tower ``model`` as the zero-shot classifier of ``classes [K, D]`` that every reduced model
    is scored against (``zero_shot_predictor``), its images transformed as the tower's own."""
    return Reference(ZeroShotClassifier(model, classes), model_transform(model))
