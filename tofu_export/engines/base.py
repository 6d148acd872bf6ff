"""The interface every inference backend implements, and the per-op timing record they report."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class OpTime:
    """Mean time of one graph node / layer / module per inference run.

    ``name`` is the scoped node, layer or module name (``/blocks.3/attn/qkv/MatMul``, ``blocks.3.attn``);
    ``op_type`` is the ONNX op, TensorRT layer type or module class (may be empty when unknown).
    """

    name: str
    op_type: str
    ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class Backend(Protocol):
    """A model ready to run on one device over a fixed random input of shape ``[B, C, H, W]``."""

    name: str
    device: str  # "cpu" or "cuda": where memory is measured

    def run(self, batch_size: int) -> None:
        """Run one inference on a cached random batch of ``batch_size`` images."""

    def sync(self) -> None:
        """Block until all queued device work is done (a no-op for synchronous backends)."""

    def profile_ops(self, batch_size: int, iters: int) -> list[OpTime]:
        """Per-node mean times over ``iters`` profiled runs (after one discarded warm-up run)."""
