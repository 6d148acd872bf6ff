"""The engine builder against fakes of the TensorRT 8.6, 10.x and 11 Python APIs: strongly typed networks from 10,
builder precision flags only on 8.x, never a flag that 11 removed; the timing cache round trip."""

from __future__ import annotations

import enum
import sys
import types
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from tofu_export.config import TrtConfig
from tofu_export.tensorrt.api import EngineBuildError, network_flags, strongly_typed
from tofu_export.tensorrt.build import build_engine


def fake_tensorrt(version: str) -> types.ModuleType:
    """A ``tensorrt`` module with the members each release has: 8.6 (EXPLICIT_BATCH, FP16/INT8 flags), 10.x (both
    kinds, STRONGLY_TYPED added, weak flags deprecated), 11 (STRONGLY_TYPED only; FP16/INT8 flags removed)."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    creation = {"EXPLICIT_BATCH": 0} if major < 11 else {}
    if major >= 10:
        creation["STRONGLY_TYPED"] = 5
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", creation or {"NONE": 9})
    flags = {"TF32": 7, "REFIT": 3} | ({"FP16": 0, "INT8": 1} if major < 11 else {})
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", flags)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    calls: list[tuple[str, Any]] = []
    trt.calls = calls

    class Cache:
        def serialize(self) -> bytes:
            return b"cache"

    class Config:
        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            calls.append(("pool", size))

        def set_flag(self, flag: Any) -> None:
            calls.append(("flag", flag.name))

        def add_optimization_profile(self, profile: Any) -> None:
            calls.append(("profile", profile.shapes))

        def create_timing_cache(self, data: bytes) -> Cache:
            calls.append(("timing_cache", data))
            return Cache()

        def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> bool:
            return True

        def get_timing_cache(self) -> Cache:
            return Cache()

    class Profile:
        def set_shape(self, name: str, *shapes: tuple[int, ...]) -> None:
            self.shapes = (name, *shapes)

    class Builder:
        platform_has_fast_fp16 = True

        def __init__(self, logger: Any) -> None:
            pass

        def create_network(self, flags: int) -> str:
            calls.append(("network", flags))
            return "network"

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: str, config: Config) -> bytes:
            return b"engine"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network: str, logger: Any) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            calls.append(("parse", Path(path).name))
            return True

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    return trt


def image_model(path: Path, precision: str) -> Path:
    """``[B, 3, 8, 8] -> Relu`` in FP32 or FP16, or with one Q/DQ pair (``int8``)."""
    elem = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT
    nodes, inits = [helper.make_node("Relu", ["x"], ["r"])], []
    if precision == "int8":
        inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
                 helper.make_tensor("z", TensorProto.INT8, [], [0])]
        nodes += [helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]  # fmt: skip
    else:
        nodes.append(helper.make_node("Identity", ["r"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", elem, ["batch", 3, 8, 8])], inits)  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize(("version", "precision", "network", "set_flags"), [
    ("8.6.1", "fp32", "EXPLICIT_BATCH", []),
    ("8.6.1", "fp16", "EXPLICIT_BATCH", ["FP16"]),
    ("8.6.1", "int8", "EXPLICIT_BATCH", ["INT8"]),
    ("10.3.0", "fp32", "STRONGLY_TYPED", []),
    ("10.13.2", "fp16", "STRONGLY_TYPED", []),
    ("10.13.2", "int8", "STRONGLY_TYPED", []),
    ("11.0.0", "fp16", "STRONGLY_TYPED", []),
    ("11.0.0", "int8", "STRONGLY_TYPED", []),
])  # fmt: skip
def test_precision_comes_from_the_graph_from_tensorrt_10(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str, precision: str, network: str, set_flags: list[str]
) -> None:
    trt = fake_tensorrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    onnx_path = image_model(tmp_path / "m.onnx", precision)
    engine = build_engine(onnx_path, tmp_path / "m.engine", TrtConfig(max_batch=4, workspace_gib=0.5),
                          timing_cache_path=tmp_path / "t.cache")  # fmt: skip
    assert engine.read_bytes() == b"engine" and (tmp_path / "t.cache").read_bytes() == b"cache"
    calls = dict(trt.calls[:2])
    assert calls["network"] == 1 << int(getattr(trt.NetworkDefinitionCreationFlag, network))
    assert [value for kind, value in trt.calls if kind == "flag"] == set_flags
    assert ("profile", ("x", (1, 3, 8, 8), (1, 3, 8, 8), (4, 3, 8, 8))) in trt.calls
    assert ("pool", 1 << 29) in trt.calls


def test_fp16_flag_on_an_fp32_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """8.x: the weakly typed FP16 flag still applies; 10+ (strongly typed) refuses, pointing at an FP16 export."""
    onnx_path = image_model(tmp_path / "m.onnx", "fp32")
    trt8 = fake_tensorrt("8.6.1")
    monkeypatch.setitem(sys.modules, "tensorrt", trt8)
    build_engine(onnx_path, tmp_path / "m.engine", TrtConfig(fp16=True, targets=("8.5",)))
    assert [value for kind, value in trt8.calls if kind == "flag"] == ["FP16"]
    for version in ("10.3.0", "11.0.0"):
        monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version))
        with pytest.raises(EngineBuildError, match=r"strongly typed.*precision fp16"):
            build_engine(onnx_path, tmp_path / f"{version}.engine", TrtConfig(fp16=True))
        assert not (tmp_path / f"{version}.engine").exists()


@pytest.mark.parametrize(("version", "typed"), [("8.5.2", False), ("8.6.1", False), ("10.0.1", True), ("11.1", True)])
def test_version_switches(version: str, typed: bool) -> None:
    trt = fake_tensorrt(version)
    assert strongly_typed(trt) is typed
    flag = "STRONGLY_TYPED" if typed else "EXPLICIT_BATCH"
    assert network_flags(trt) == 1 << int(getattr(trt.NetworkDefinitionCreationFlag, flag))
