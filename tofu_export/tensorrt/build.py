"""TensorRT engines from exported ONNX: the batch-range checks, the build (TensorRT 8.5, 10.x and 11 Python API)
and the equivalent ``trtexec`` line. Loading and running an engine is :mod:`tofu_export.tensorrt.runner`.

The precision is the graph's (``graph_precision``: FP32, FP16 tensors, or explicit Q/DQ INT8). From TensorRT 10 the
network is strongly typed, so the engine runs each layer in the type the ONNX graph gives it and no precision flag
is set (TensorRT 11 has none); TensorRT 8.x builds weakly typed and is asked for FP16 / INT8 with builder flags.
``tensorrt`` is imported lazily: without it the builder raises ``TensorRTUnavailable``, whose message is the
``trtexec`` line to run on the device.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import onnx

from tofu_export.atomic import write_bytes_atomic
from tofu_export.config import TrtConfig
from tofu_export.errors import Hint, UserError
from tofu_export.tensorrt.api import EngineBuildError, TensorRTUnavailable, network_flags, severity, strongly_typed
from tofu_export.user_warnings import warn_user

GraphPrecision = Literal["fp32", "fp16", "int8"]


class EngineInputError(UserError, ValueError):
    """The ONNX graph or the requested batch range cannot make a one-image-input optimization profile."""


@dataclass(frozen=True)
class ImageInput:
    """The single image input of an exported classifier: ``name`` with shape ``[B, C, H, W]``.

    ``batch`` is the static batch size, or None when axis 0 is symbolic (dynamic batch); ``precision`` is what the
    graph computes in (see :func:`graph_precision`).
    """

    name: str
    chw: tuple[int, int, int]
    batch: int | None
    precision: GraphPrecision = "fp32"


def graph_precision(graph: onnx.GraphProto) -> GraphPrecision:
    """``int8`` when the graph holds Q/DQ nodes, ``fp16`` when its image input is FLOAT16, else ``fp32``."""
    if any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in graph.node):
        return "int8"
    initializers = {init.name for init in graph.initializer}
    inputs = [info for info in graph.input if info.name not in initializers]
    if inputs and inputs[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
        return "fp16"
    return "fp32"


def read_image_input(onnx_path: str | Path) -> ImageInput:
    """Name, ``(C, H, W)``, batch and precision of the one 4-D graph input of ``onnx_path`` (weights not loaded)."""
    path = Path(onnx_path)
    if not path.is_file():
        raise EngineInputError(f"ONNX file {path} does not exist; export the model first.")
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    inputs = [info for info in graph.input if info.name not in initializers]
    if len(inputs) != 1:
        names = [info.name for info in inputs]
        raise EngineInputError(f"{path} has inputs {names}; the engine builder expects exactly one image input.")
    info = inputs[0]
    dims = info.type.tensor_type.shape.dim
    chw = tuple(dim.dim_value for dim in dims[1:])
    if len(dims) != 4 or any(size <= 0 for size in chw):
        shape = [dim.dim_value or dim.dim_param or "?" for dim in dims]
        raise EngineInputError(
            f"Input '{info.name}' of {path} has shape {shape}; expected [batch, C, H, W] with static "
            "C, H, W. Re-export with a fixed image size and only axis 0 dynamic."
        )
    batch = dims[0].dim_value if dims[0].HasField("dim_value") else None
    return ImageInput(info.name, (chw[0], chw[1], chw[2]), batch, graph_precision(graph))


def check_batch_range(config: TrtConfig, static_batch: int | None = None) -> None:
    """Raise :class:`EngineInputError` unless the config's batch range fits a static batch of the graph."""
    low, opt, high = config.min_batch, config.opt_batch, config.max_batch
    if static_batch is not None and not low == opt == high == static_batch:
        raise EngineInputError(
            f"The ONNX input has a static batch of {static_batch}, but the requested range is {low}..{high}. "
            f"Re-export with a dynamic batch axis, or use min=opt=max={static_batch}.",
            hint=Hint("max_batch", str(static_batch)),
        )


def targets_strongly_typed(config: TrtConfig) -> bool:
    """Whether every release the export is for builds strongly typed networks (TensorRT >= 10)."""
    return all(int(target.split(".")[0]) >= 10 for target in config.targets)


def trtexec_command(
    onnx_path: str | Path, engine_path: str | Path, config: TrtConfig, image: ImageInput,
    timing_cache: str | Path | None = None,
) -> str:  # fmt: skip
    """The ``trtexec`` line that builds the same engine as :func:`build_engine` for ``config.targets``.

    ``--stronglyTyped`` where every target is TensorRT >= 10 (the graph's precision), else the weakly typed
    ``--fp16`` / ``--int8`` flags of 8.x. The workspace goes through ``--memPoolSize=workspace:N`` with N in MiB
    (``--workspace`` is deprecated in 8.x and gone in 10).
    """
    channels, height, width = image.chw

    def shape(batch: int) -> str:
        return shlex.quote(f"{image.name}:{batch}x{channels}x{height}x{width}")

    parts = [
        "trtexec",
        f"--onnx={shlex.quote(str(onnx_path))}",
        f"--saveEngine={shlex.quote(str(engine_path))}",
        f"--minShapes={shape(config.min_batch)}",
        f"--optShapes={shape(config.opt_batch)}",
        f"--maxShapes={shape(config.max_batch)}",
        f"--memPoolSize=workspace:{round(config.workspace_gib * 1024)}",
    ]
    if targets_strongly_typed(config):
        parts.append("--stronglyTyped")
    else:
        parts += [f"--{flag}" for flag in _weak_flags(config, image.precision)]
    if timing_cache:
        parts.append(f"--timingCacheFile={shlex.quote(str(timing_cache))}")
    return " ".join(parts)


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    config: TrtConfig,
    *,
    timing_cache_path: str | Path | None = None,
    log_level: str = "WARNING",
) -> Path:
    """Parse ``onnx_path`` with TensorRT's ONNX parser and write a serialized engine to ``engine_path``.

    One optimization profile spans ``[min | opt | max batch, C, H, W]`` of the single image input. TensorRT >= 10:
    a strongly typed network (no precision flags); 8.x: FP16 / INT8 builder flags from the graph's precision (and
    ``config.fp16``). The timing cache at ``timing_cache_path`` is loaded when present and saved back; both files
    are written atomically. Raises ``TensorRTUnavailable`` when ``tensorrt`` cannot be imported (its message holds
    the trtexec line), ``EngineBuildError`` when parsing or building fails.
    """
    image = read_image_input(onnx_path)
    check_batch_range(config, image.batch)
    try:
        import tensorrt as trt
    except ImportError as error:  # also what `sys.modules["tensorrt"] = None` raises
        command = trtexec_command(onnx_path, engine_path, config, image, timing_cache_path)
        raise TensorRTUnavailable.for_build(onnx_path, command, str(error)) from error
    logger = trt.Logger(severity(trt, log_level))
    builder = trt.Builder(logger)
    network, _parser = _parse_network(trt, builder, logger, Path(onnx_path))  # _parser owns the weights
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gib * (1 << 30)))
    _set_precision(trt, builder, builder_config, config, image.precision)
    if hasattr(trt, "ProfilingVerbosity"):  # layer types and tactics for the engine inspector (tensorrt.inspect)
        builder_config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = builder.create_optimization_profile()
    shapes = ((batch, *image.chw) for batch in (config.min_batch, config.opt_batch, config.max_batch))
    profile.set_shape(image.name, *shapes)
    builder_config.add_optimization_profile(profile)
    cache_path = None if timing_cache_path is None else Path(timing_cache_path)
    if cache_path is not None:
        _load_timing_cache(builder_config, cache_path)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise EngineBuildError(
            f"TensorRT {trt.__version__} failed to build an engine from {onnx_path}; rerun with "
            "log_level='VERBOSE' to see the failing layer (often too small a workspace or an unsupported op)."
        )
    engine_path = Path(engine_path)
    write_bytes_atomic(engine_path, memoryview(serialized).tobytes())
    if cache_path is not None:
        write_bytes_atomic(cache_path, memoryview(builder_config.get_timing_cache().serialize()).tobytes())
    return engine_path


def _parse_network(trt: ModuleType, builder: Any, logger: Any, onnx_path: Path) -> tuple[Any, Any]:
    """``(network, parser)`` for ``onnx_path``; parser errors become one exception.

    The parser owns the weight memory the network points to, so the caller keeps it alive until the build.
    """
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(f"  {parser.get_error(index)}" for index in range(parser.num_errors))
        raise EngineBuildError(
            f"TensorRT {trt.__version__} could not parse {onnx_path}:\n{errors}\nRun "
            "tofu_export.tensorrt.check.check_tensorrt_compat on the ONNX file to see which ops to change."
        )
    return network, parser


def _weak_flags(config: TrtConfig, precision: GraphPrecision) -> list[str]:
    """Builder flags a weakly typed (TensorRT 8.x) build needs: ``fp16`` for an FP16 graph or ``config.fp16``,
    ``int8`` for an explicitly quantized (Q/DQ) graph."""
    return [flag for flag, wanted in (("fp16", config.fp16 or precision == "fp16"), ("int8", precision == "int8"))
            if wanted]  # fmt: skip


def _set_precision(trt: ModuleType, builder: Any, builder_config: Any, config: TrtConfig, precision: str) -> None:
    """Strongly typed (>= 10): nothing to set, and an FP32 graph cannot be asked for FP16; 8.x: builder flags."""
    if strongly_typed(trt):
        if config.fp16 and precision == "fp32":
            raise EngineBuildError(
                f"TensorRT {trt.__version__} builds strongly typed networks, whose precision is the graph's: this "
                "ONNX graph is FP32. Export it with precision fp16 (or int8) instead of asking the builder for FP16."
            )
        return
    for flag in _weak_flags(config, precision):  # type: ignore[arg-type]
        if flag == "fp16" and not getattr(builder, "platform_has_fast_fp16", True):
            warn_user("This GPU has no fast FP16: TensorRT may run the FP16 layers in FP32.", RuntimeWarning)
        builder_config.set_flag(getattr(trt.BuilderFlag, flag.upper()))


def _load_timing_cache(builder_config: Any, cache_path: Path) -> None:
    """Attach the timing cache at ``cache_path`` (empty when missing) so tactic timings are reused."""
    cache = builder_config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if not builder_config.set_timing_cache(cache, ignore_mismatch=False):
        warn_user(f"Timing cache {cache_path} was made on another GPU or TensorRT version; starting a fresh one.",
                  RuntimeWarning)
        builder_config.set_timing_cache(builder_config.create_timing_cache(b""), ignore_mismatch=False)
