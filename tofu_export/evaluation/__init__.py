"""Evaluation of reduced models: classification accuracy, or backbone fidelity (feature cosine, k-NN).

The model under test is any callable ``images [B, 3, H, W] -> [B, K]``: a runner from :mod:`tofu_export.engines`.
"""

from tofu_export.errors import EvaluationError
from tofu_export.evaluation.data import (
    IndexedImageFolder,
    artifact_transform,
    image_folder,
    make_loader,
    model_data_config,
    model_transform,
    split_folders,
)
from tofu_export.evaluation.evaluate import EvaluationReport, Reference, evaluate
from tofu_export.evaluation.metrics import (
    classification_accuracy,
    extract_features,
    feature_cosine,
    knn_accuracy,
    linear_probe_accuracy,
)

__all__ = [
    "EvaluationError",
    "EvaluationReport",
    "IndexedImageFolder",
    "Reference",
    "artifact_transform",
    "classification_accuracy",
    "evaluate",
    "extract_features",
    "feature_cosine",
    "image_folder",
    "knn_accuracy",
    "linear_probe_accuracy",
    "make_loader",
    "model_data_config",
    "model_transform",
    "split_folders",
]
