"""Evaluation: known-answer accuracy, exact fidelity at r=0, k-NN sanity, ORT parity, one-call evaluate()."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from tofu_export.engines.base import RunnerError, run_in_fixed_batches
from tofu_export.engines.ort import OrtRunner
from tofu_export.engines.torch import TorchRunner
from tofu_export.evaluation import (
    EvaluationError,
    Reference,
    artifact_transform,
    classification_accuracy,
    evaluate,
    extract_features,
    feature_cosine,
    image_folder,
    knn_accuracy,
    linear_probe_accuracy,
    make_loader,
    model_data_config,
    model_transform,
)
from tofu_export.tensorrt.runner import TrtRunner

IDENTITY_NORMALIZE = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def write_png(path: Path, rgb: tuple[int, int, int] | np.ndarray, size: int = 8) -> None:
    """A solid-colour ``size`` x ``size`` RGB PNG, or the given ``[H, W, 3]`` uint8 array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.asarray(rgb, dtype=np.uint8)
    if pixels.ndim == 1:
        pixels = np.broadcast_to(pixels, (size, size, 3))
    Image.fromarray(np.ascontiguousarray(pixels)).save(path)


def write_noise_folder(root: Path, classes: int, per_class: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for label in range(classes):
        for i in range(per_class):
            write_png(root / str(label) / f"{i}.png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


class DominantChannel(nn.Module):
    """Logits ``[B, 3]`` = per-channel mean of ``[B, 3, H, W]``: predicts the image's dominant colour."""

    num_classes = 3

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))


def tiny_vit(img_size: int = 32, num_classes: int = 0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=img_size, depth=2, num_classes=num_classes
    ).eval()


@pytest.fixture
def colour_folder(tmp_path: Path) -> Path:
    """Five images; the dominant-channel model gets 3 right at top-1 and 4 at top-2."""
    images = {
        "0/red.png": (200, 10, 10),  # top-1 right
        "1/green.png": (10, 200, 10),  # top-1 right
        "2/blue.png": (10, 10, 200),  # top-1 right
        "1/orange.png": (200, 100, 0),  # label 1 ranks second: top-2 right
        "1/purple.png": (200, 0, 100),  # label 1 ranks last: wrong
    }
    for name, rgb in images.items():
        write_png(tmp_path / name, rgb)
    return tmp_path


def test_classification_accuracy_matches_the_known_answers(colour_folder: Path) -> None:
    loader = make_loader(colour_folder, artifact_transform(8, **IDENTITY_NORMALIZE), batch_size=2, num_workers=0)
    scores = classification_accuracy(TorchRunner(DominantChannel()), loader, topk=(1, 2, 5))
    assert scores == {"top1": 60.0, "top2": 80.0, "top5": 100.0, "n": 5.0}


def test_digit_folders_are_class_indices_and_other_names_sorted_order(tmp_path: Path) -> None:
    for name in ("3", "10"):
        write_png(tmp_path / "digits" / name / "a.png", (0, 0, 0))
    for name in ("dog", "cat"):
        write_png(tmp_path / "words" / name / "a.png", (0, 0, 0))
    digits = image_folder(tmp_path / "digits", artifact_transform(8))
    words = image_folder(tmp_path / "words", artifact_transform(8))
    assert digits.class_to_idx == {"10": 10, "3": 3}
    assert sorted(digits.targets) == [3, 10]
    assert words.class_to_idx == {"cat": 0, "dog": 1}


def test_ambiguous_digit_folders_and_missing_data_raise(tmp_path: Path) -> None:
    for name in ("7", "007"):
        write_png(tmp_path / name / "a.png", (0, 0, 0))
    with pytest.raises(EvaluationError, match="same class index"):
        image_folder(tmp_path, artifact_transform(8))
    with pytest.raises(EvaluationError, match="does not exist"):
        image_folder(tmp_path / "missing", artifact_transform(8))


def test_labels_beyond_the_head_raise(tmp_path: Path) -> None:
    write_png(tmp_path / "0243" / "a.png", (0, 0, 0))
    loader = make_loader(tmp_path, artifact_transform(8), num_workers=0)
    with pytest.raises(EvaluationError, match="243"):
        classification_accuracy(TorchRunner(DominantChannel()), loader)


def test_model_data_config_uses_the_built_img_size() -> None:
    model = tiny_vit(img_size=64)
    assert timm.data.resolve_data_config({}, model=model)["input_size"] == (3, 224, 224)  # timm's stale answer
    assert model_data_config(model)["input_size"] == (3, 64, 64)


def test_feature_cosine_is_exactly_one_for_identical_models_and_lower_otherwise(tmp_path: Path) -> None:
    write_noise_folder(tmp_path, classes=2, per_class=4, size=32, seed=0)
    model = tiny_vit()
    loader = make_loader(tmp_path, model_transform(model), batch_size=3, num_workers=0)
    first, labels = extract_features(TorchRunner(model), loader)
    second, _ = extract_features(TorchRunner(copy.deepcopy(model)), loader)
    other, _ = extract_features(TorchRunner(tiny_vit(seed=1)), loader)
    assert first.shape == (8, model.num_features) and labels.tolist() == [0] * 4 + [1] * 4
    assert feature_cosine(first, second) == {"mean": 1.0, "min": 1.0, "p5": 1.0}
    assert feature_cosine(first, other)["mean"] < 0.99


def test_patched_model_at_r0_has_exact_fidelity(tmp_path: Path) -> None:
    import tofu_export

    write_noise_folder(tmp_path, classes=2, per_class=3, size=32, seed=1)
    model = tiny_vit()
    loader = make_loader(tmp_path, model_transform(model), batch_size=4, num_workers=0)
    reference, _ = extract_features(TorchRunner(model), loader)
    for mode in ("tofu", "tome", "prune", "mlerp"):
        patched = copy.deepcopy(model)
        patched = tofu_export.patch(patched, r=0, mode=mode) or patched
        features, _ = extract_features(TorchRunner(patched), loader)
        assert feature_cosine(reference, features) == {"mean": 1.0, "min": 1.0, "p5": 1.0}, mode


def clusters(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three tight clusters around orthogonal directions in 16-d: ``([3 * per_class, 16], [3 * per_class])``."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(per_class)
    centers = torch.eye(16)[:3] * 5.0
    return centers[labels] + 0.3 * torch.randn(labels.shape[0], 16, generator=generator), labels


def test_knn_and_linear_probe_separate_clusters_and_fall_to_chance_on_shuffled_labels() -> None:
    train, train_labels = clusters(per_class=30, seed=0)
    test, test_labels = clusters(per_class=10, seed=1)
    assert knn_accuracy(train, train_labels, test, test_labels, k=20) == 100.0
    assert linear_probe_accuracy(train, train_labels, test, test_labels) == 100.0

    generator = torch.Generator().manual_seed(2)
    noise_train, noise_test = torch.randn(600, 16, generator=generator), torch.randn(600, 16, generator=generator)
    random_train, random_test = torch.randint(0, 4, (600,), generator=generator), torch.randint(0, 4, (600,))
    assert 15.0 < knn_accuracy(noise_train, random_train, noise_test, random_test, k=20) < 35.0  # chance: 25


def test_ort_predictor_matches_torch_with_dynamic_and_static_batch(tmp_path: Path) -> None:
    model = tiny_vit(num_classes=5)
    images = torch.randn(5, 3, 32, 32)
    dynamic, static = tmp_path / "dynamic.onnx", tmp_path / "static.onnx"
    torch.onnx.export(
        model, (images[:2],), dynamic, dynamo=False, input_names=["input"], dynamic_axes={"input": {0: "batch"}}
    )
    torch.onnx.export(model, (images[:2],), static, dynamo=False, input_names=["input"])
    expected = TorchRunner(model)(images)
    for path, fixed_batch in ((dynamic, None), (static, 2)):
        predictor = OrtRunner(path, threads=1)
        assert predictor.input.batch == fixed_batch
        torch.testing.assert_close(predictor(images), expected, atol=1e-4, rtol=0)  # 5 images: 2 + 2 + 1 padded
    with pytest.raises(RunnerError, match="artifact_transform"):
        OrtRunner(static)(torch.randn(2, 3, 48, 48))


def test_run_in_fixed_batches_pads_and_trims() -> None:
    seen: list[int] = []

    def double(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.shape[0])
        return batch * 2

    out = run_in_fixed_batches(double, torch.arange(5.0).view(5, 1), fixed_batch=2)
    assert out.flatten().tolist() == [0.0, 2.0, 4.0, 6.0, 8.0] and seen == [2, 2, 2]


def test_trt_predictor_explains_what_is_missing(tmp_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        if torch.cuda.is_available():
            pytest.skip("tensorrt and CUDA are installed: the missing-backend error cannot occur here")
    from tofu_export.engines.base import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match=r"OrtRunner|CUDA"):
        TrtRunner(tmp_path / "model.engine")


@pytest.mark.parametrize("num_classes", [0, 2])
def test_a_reference_runs_once_however_many_candidates_are_scored(
    tmp_path: Path, num_classes: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """``eval`` scores ToFu and ToMe, a sweep every point, against one unreduced model: its outputs on each split are
    computed once, and every progress line names the model and the split it is running."""
    for split, seed in (("train", 0), ("test", 1)):
        write_noise_folder(tmp_path / split, classes=2, per_class=4, size=32, seed=seed)
    model = tiny_vit(num_classes=num_classes)
    same = TorchRunner(copy.deepcopy(model))  # copied before the hook: only the reference's images are counted
    seen: list[int] = []
    model.register_forward_hook(lambda _module, args, _out: seen.append(args[0].shape[0]))
    reference = Reference.of(model)
    first = evaluate(reference, same, tmp_path, batch_size=4, num_workers=0, label="a")
    images_once = sum(seen)
    second = evaluate(reference, TorchRunner(tiny_vit(num_classes=num_classes, seed=1)), tmp_path, batch_size=4,
                      num_workers=0, label="b")
    assert images_once == (8 if num_classes else 16) and sum(seen) == images_once  # eval (+ train for k-NN), once
    fresh = evaluate(model, TorchRunner(tiny_vit(num_classes=num_classes, seed=1)), tmp_path, batch_size=4,
                     num_workers=0)
    assert second.metrics == fresh.metrics and first.metrics != second.metrics  # cached = computed anew
    assert sum(seen) == 2 * images_once  # a module, not a Reference: computed for that call
    progress = capsys.readouterr().err
    for name in ("unreduced, test", "a, test", "b, test"):
        assert f"({name})" in progress, progress
    with pytest.raises(ValueError, match="Reference carries its transform"):
        evaluate(reference, TorchRunner(model), tmp_path, transform=lambda image: image)


def test_evaluate_fidelity_with_splits_and_classification(tmp_path: Path) -> None:
    for split, seed in (("train", 0), ("test", 1)):
        write_noise_folder(tmp_path / split, classes=2, per_class=4, size=32, seed=seed)
    backbone = tiny_vit()
    report = evaluate(backbone, TorchRunner(copy.deepcopy(backbone)), tmp_path, batch_size=4, num_workers=0)
    assert (report.task, report.n_eval, report.n_train) == ("fidelity", 8, 8)
    assert report.metrics["cosine_min"] == 1.0
    assert report.metrics["candidate_knn_top1"] == report.metrics["reference_knn_top1"]
    other = evaluate(backbone, TorchRunner(tiny_vit(seed=1)), tmp_path / "test", num_workers=0)
    assert other.n_train == 0 and "reference_knn_top1" not in other.metrics
    assert other.metrics["cosine_mean"] < 0.99
    assert len(other.cosines) == 8 and sum(other.cosines) / 8 == pytest.approx(other.metrics["cosine_mean"])
    assert "cosines" not in other.to_dict()  # per image: for paired comparisons, not for the report

    classifier = tiny_vit(num_classes=2)
    scores = evaluate(classifier, TorchRunner(classifier), tmp_path, num_workers=0).to_dict()
    assert scores["task"] == "classification" and scores["n_eval"] == 8
    assert scores["metrics"]["candidate_top1"] == scores["metrics"]["reference_top1"]
    assert set(scores["metrics"]) == {"reference_top1", "reference_top5", "candidate_top1", "candidate_top5",
                                      "top1_agreement"}
    assert scores["metrics"]["top1_agreement"] == 100.0  # the same model keeps every image's class
