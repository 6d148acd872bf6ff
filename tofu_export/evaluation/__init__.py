"""Evaluation of reduced models: classification accuracy, or backbone fidelity (feature cosine, k-NN)."""

from tofu_export.evaluation.data import (
    IndexedImageFolder,
    artifact_transform,
    image_folder,
    make_loader,
    model_data_config,
    model_transform,
    split_folders,
)
from tofu_export.evaluation.errors import EvaluationError
from tofu_export.evaluation.evaluate import EvaluationReport, evaluate
from tofu_export.evaluation.metrics import (
    classification_accuracy,
    extract_features,
    feature_cosine,
    knn_accuracy,
    linear_probe_accuracy,
)
from tofu_export.evaluation.predictors import OrtPredictor, Predictor, TorchPredictor, TrtPredictor

__all__ = [
    "EvaluationError",
    "EvaluationReport",
    "IndexedImageFolder",
    "OrtPredictor",
    "Predictor",
    "TorchPredictor",
    "TrtPredictor",
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
