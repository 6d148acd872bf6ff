"""TensorRT engines from exported ONNX: the batch-range checks, the build (TensorRT 8.5 and 10.x Python API) and
the equivalent ``trtexec`` line. Loading and running an engine is :mod:`tofu_export.engines.trt`.

``tensorrt`` is imported lazily inside functions: without it (any machine but the Jetson / a GPU box) the
builder raises :class:`TensorRTUnavailable`, whose message is the ``trtexec`` line to run on the device.
"""

from __future__ import annotations

import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx

from tofu_export.atomic import write_bytes_atomic
from tofu_export.engines.trt import EngineBuildError, TensorRTUnavailable, severity
from tofu_export.errors import UserError


class EngineInputError(UserError, ValueError):
    """The ONNX graph or the requested batch range cannot make a one-image-input optimization profile."""


@dataclass(frozen=True)
class ImageInput:
    """The single image input of an exported classifier: ``name`` with shape ``[B, C, H, W]``.

    ``batch`` is the static batch size, or None when axis 0 is symbolic (dynamic batch).
    """

    name: str
    chw: tuple[int, int, int]
    batch: int | None


def read_image_input(onnx_path: str | Path) -> ImageInput:
    """Name, ``(C, H, W)`` and batch of the one 4-D graph input of ``onnx_path`` (weights are not loaded)."""
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
    return ImageInput(name=info.name, chw=(chw[0], chw[1], chw[2]), batch=batch)


def check_batch_range(min_batch: int, opt_batch: int, max_batch: int, static_batch: int | None = None) -> None:
    """Raise :class:`EngineInputError` unless ``1 <= min <= opt <= max`` and the range fits a static batch."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise EngineInputError(
            f"Batch range min={min_batch}, opt={opt_batch}, max={max_batch} is invalid; "
            "it needs 1 <= min <= opt <= max."
        )
    if static_batch is not None and not min_batch == opt_batch == max_batch == static_batch:
        raise EngineInputError(
            f"The ONNX input has a static batch of {static_batch}, but the requested range is "
            f"{min_batch}..{max_batch}. Re-export with a dynamic batch axis, or use "
            f"min=opt=max={static_batch}."
        )


def trtexec_command(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    fp16: bool,
    min_batch: int,
    opt_batch: int,
    max_batch: int,
    input_name: str,
    input_shape_chw: tuple[int, int, int],
    workspace_mib: int,
    timing_cache: str | None,
) -> str:
    """The ``trtexec`` line that builds the same engine as :func:`build_engine` (TensorRT 8.5 and 10.x).

    The workspace goes through ``--memPoolSize=workspace:N`` with N in MiB, the unit both versions default to
    (``--workspace`` is deprecated in 8.x and gone in 10).
    """
    check_batch_range(min_batch, opt_batch, max_batch)
    channels, height, width = input_shape_chw

    def shape(batch: int) -> str:
        return shlex.quote(f"{input_name}:{batch}x{channels}x{height}x{width}")

    parts = [
        "trtexec",
        f"--onnx={shlex.quote(str(onnx_path))}",
        f"--saveEngine={shlex.quote(str(engine_path))}",
        f"--minShapes={shape(min_batch)}",
        f"--optShapes={shape(opt_batch)}",
        f"--maxShapes={shape(max_batch)}",
        f"--memPoolSize=workspace:{int(workspace_mib)}",
    ]
    if fp16:
        parts.append("--fp16")
    if timing_cache:
        parts.append(f"--timingCacheFile={shlex.quote(str(timing_cache))}")
    return " ".join(parts)


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    fp16: bool = False,
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 8,
    workspace_gib: float = 2.0,
    timing_cache_path: str | Path | None = None,
    log_level: str = "WARNING",
) -> Path:
    """Parse ``onnx_path`` with TensorRT's ONNX parser and write a serialized engine to ``engine_path``.

    One optimization profile spans ``[min_batch | opt_batch | max_batch, C, H, W]`` of the single image
    input. FP16 is enabled only where the GPU has fast FP16. The timing cache at ``timing_cache_path`` is
    loaded when present and saved back. Both files are written atomically. Raises
    :class:`TensorRTUnavailable` when ``tensorrt`` cannot be imported (its message holds the trtexec line),
    :class:`EngineBuildError` when parsing or building fails.
    """
    image = read_image_input(onnx_path)
    check_batch_range(min_batch, opt_batch, max_batch, image.batch)
    try:
        import tensorrt as trt
    except ImportError as error:  # also what `sys.modules["tensorrt"] = None` raises
        command = trtexec_command(
            onnx_path, engine_path, fp16=fp16, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
            input_name=image.name, input_shape_chw=image.chw, workspace_mib=round(workspace_gib * 1024),
            timing_cache=None if timing_cache_path is None else str(timing_cache_path),
        )  # fmt: skip
        raise TensorRTUnavailable.for_build(onnx_path, command, str(error)) from error
    logger = trt.Logger(severity(trt, log_level))
    builder = trt.Builder(logger)
    network, _parser = _parse_network(trt, builder, logger, Path(onnx_path))  # _parser owns the weights
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        _enable_fp16(trt, builder, config)
    profile = builder.create_optimization_profile()
    profile.set_shape(image.name, *((batch, *image.chw) for batch in (min_batch, opt_batch, max_batch)))
    config.add_optimization_profile(profile)
    cache_path = None if timing_cache_path is None else Path(timing_cache_path)
    if cache_path is not None:
        _load_timing_cache(config, cache_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"TensorRT {trt.__version__} failed to build an engine from {onnx_path}; rerun with "
            "log_level='VERBOSE' to see the failing layer (often too small a workspace or an unsupported op)."
        )
    engine_path = Path(engine_path)
    write_bytes_atomic(engine_path, memoryview(serialized).tobytes())
    if cache_path is not None:
        write_bytes_atomic(cache_path, memoryview(config.get_timing_cache().serialize()).tobytes())
    return engine_path


def _parse_network(trt: ModuleType, builder: Any, logger: Any, onnx_path: Path) -> tuple[Any, Any]:
    """``(network, parser)`` for ``onnx_path``, explicit batch; parser errors become one exception.

    The parser owns the weight memory the network points to, so the caller keeps it alive until the build.
    """
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(f"  {parser.get_error(index)}" for index in range(parser.num_errors))
        raise EngineBuildError(
            f"TensorRT {trt.__version__} could not parse {onnx_path}:\n{errors}\nRun "
            "tofu_export.exporters.trt_check.check_tensorrt_compat on the ONNX file to see which ops to change."
        )
    return network, parser


def _trt_major(trt: ModuleType) -> int:
    return int(str(trt.__version__).split(".")[0])


def _network_flags(trt: ModuleType) -> int:
    """Explicit batch: a flag on TensorRT 8.x, the only mode (flags 0; EXPLICIT_BATCH deprecated) from 10."""
    if _trt_major(trt) >= 10:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def _enable_fp16(trt: ModuleType, builder: Any, config: Any) -> None:
    if getattr(builder, "platform_has_fast_fp16", True):  # deprecated in 10.x; assume yes when absent
        config.set_flag(trt.BuilderFlag.FP16)
        return
    warnings.warn("This GPU has no fast FP16: building an FP32 engine instead of FP16.", RuntimeWarning, stacklevel=3)


def _load_timing_cache(config: Any, cache_path: Path) -> None:
    """Attach the timing cache at ``cache_path`` (empty when missing) so tactic timings are reused."""
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        warnings.warn(
            f"Timing cache {cache_path} was made on another GPU or TensorRT version; starting a fresh one.",
            RuntimeWarning,
            stacklevel=3,
        )
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
