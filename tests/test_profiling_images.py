"""The images a profile times on: which files, in which preprocessing, and what the report calls them."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tofu_export.manifest import MANIFEST, Manifest
from tofu_export.profiling.images import ProfileImageError, graph_timing_images, image_paths


def _png(path: Path, value: int, size: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)
    return path


def test_a_file_is_itself_and_a_folder_is_spread_evenly(tmp_path: Path) -> None:
    files = [_png(tmp_path / "data" / f"{i % 2}" / f"{i}.png", 10 * i) for i in range(6)]
    assert image_paths(files[0], 4) == [files[0]]
    chosen = image_paths(tmp_path / "data", 2)
    assert len(chosen) == 2 and {path.parent.name for path in chosen} == {"0", "1"}  # both class folders
    assert len(image_paths(tmp_path / "data", 10)) == 6
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ProfileImageError, match="not an image file"):
        image_paths(tmp_path / "notes.txt", 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProfileImageError, match="no images"):
        image_paths(tmp_path / "empty", 1)


def test_images_take_the_manifests_preprocessing_at_the_graphs_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = _png(tmp_path / "grey.png", 102)
    graph = tmp_path / "art" / "model.onnx"
    graph.parent.mkdir()
    plain = graph_timing_images(image, 1, graph, (3, 16, 16))  # no manifest: ImageNet's mean and std
    assert plain.images.shape == (1, 3, 16, 16) and "ImageNet mean and std (no manifest)" in plain.description
    expected = (0.4 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(plain.images[0, :, 8, 8], expected, atol=1e-5)

    (graph.parent / MANIFEST).write_text("{}")
    recorded = {"input_size": [3, 224, 224], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 1.0,
                "interpolation": "bilinear"}
    monkeypatch.setattr(Manifest, "read", classmethod(lambda cls, folder: types.SimpleNamespace(
        preprocessing=recorded)))
    fed = graph_timing_images(image, 3, graph, (3, 16, 16))
    assert fed.images.shape == (1, 3, 16, 16)  # one file: one image; the graph's size, not the recorded one
    assert torch.allclose(fed.images[0, :, 8, 8], torch.full((3,), (0.4 - 0.5) / 0.5), atol=1e-5)
    assert fed.description == f"1 image from {image} (the preprocessing its manifest records)"


def test_a_checkpoint_profiled_in_pytorch_times_on_images_in_its_own_eval_transform(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from tofu_export.jobs.profile import profile_source

    for i in range(3):
        _png(tmp_path / "data" / f"{i}.png", 40 * i, size=80)
    result = profile_source(tiny_checkpoint, batch_sizes=[2], warmup=0, iters=1, breakdown=False,
                            images=tmp_path / "data", backend="torch", threads=1)
    assert result.timed_on == f"2 images from {tmp_path / 'data'} (the model's eval transform)"
    assert result.batches[0].latency.n == 1
