"""The names a user picks, each said once: plain strings, no torch, so the command line checks them before loading it.

Modes: ``tofu`` prunes in the first ``--prune-layers`` blocks and merges with MLERP after them; ``tome`` (size-weighted
mean), ``prune`` and ``mlerp`` use one reduce mode in every block (``schedule.layer_modes`` expands a mode per block
into the ``REDUCE_MODES`` that ``merge`` implements). Exporters, simplifiers and precisions are what
``exporters.onnx.export_onnx`` takes.
"""

from __future__ import annotations

from typing import Literal

MODES: tuple[str, ...] = ("tofu", "tome", "prune", "mlerp")
ReduceMode = Literal["mean", "prune", "mlerp"]
REDUCE_MODES: tuple[str, ...] = ("mean", "prune", "mlerp")

Exporter = Literal["torchscript", "dynamo"]
EXPORTERS: tuple[str, ...] = ("torchscript", "dynamo")
DEFAULT_EXPORTER: Exporter = "dynamo"  # measured: bench/results/latency_deit_small*.md (TorchScript is deprecated)

Simplifier = Literal["onnxslim", "onnxsim", "none"]
SIMPLIFIERS: tuple[str, ...] = ("onnxslim", "onnxsim", "none")
DEFAULT_SIMPLIFIER: Simplifier = "onnxslim"

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
