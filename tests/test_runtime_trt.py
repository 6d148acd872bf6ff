"""TensorRT backend: only runnable with the tensorrt package and a CUDA GPU (a Jetson or NVIDIA workstation)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from tofu_export.engines.base import BackendUnavailableError

HAS_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.mark.skipif(HAS_TRT, reason="TensorRT and CUDA are available here")
def test_missing_tensorrt_is_a_clear_runtime_error(tmp_path: Path) -> None:
    from tofu_export.engines.trt import TrtRunner

    with pytest.raises(RuntimeError, match="TensorRT") as info:
        TrtRunner(tmp_path / "model.engine")
    assert isinstance(info.value, BackendUnavailableError)


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="needs the tensorrt Python package and a CUDA GPU")
def test_engine_runs_and_reports_layer_times(tmp_path: Path) -> None:
    import tensorrt as trt
    import timm

    from tofu_export.engines.trt import TrtRunner

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2).eval()
    onnx_path = tmp_path / "vit.onnx"
    torch.onnx.export(model, torch.randn(1, 3, 64, 64), str(onnx_path), dynamo=False, opset_version=17)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes())
    engine_path = tmp_path / "vit.engine"
    engine_path.write_bytes(bytes(builder.build_serialized_network(network, builder.create_builder_config())))
    backend = TrtRunner(engine_path)
    backend.run(1)
    backend.sync()
    ops = backend.profile_ops(batch_size=1, iters=3)
    assert ops and all(op.ms >= 0 for op in ops)
