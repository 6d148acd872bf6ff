"""The errors a user can cause or meet, typed by what the command line should do with them.

Library code raises these with a plain message and, where a setting would fix it, a structured ``Hint`` naming
that setting (``Hint("r", "8", "the first block can remove at most 8 tokens")``). The library never names command
line flags; the CLI maps a hint's setting to its flag (``r`` -> ``--r``) and every error kind to one exit code:

- ``UserError``: bad input or options (exit 2); the message says what is wrong and how to fix it.
- ``CheckFailed``: the input was fine but a verification failed (exit 1): parity, a TensorRT check.
- ``EngineNotBuilt``: the ONNX artifact was written but the TensorRT engine could not be built here (exit 3).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Hint:
    """A setting that would fix the error: ``option`` is the library's parameter name (``img_size``)."""

    option: str
    value: str | None = None  # a value that would work, where one is known
    text: str = ""  # why, in a few words
    alternative: Hint | None = None  # another setting that would fix it instead ("Use --arch X ..., or --num-heads N")


class ToFuError(Exception):
    """Base class of every error tofu-export reports to a user without a traceback."""

    exit_code = 2

    def __init__(self, message: str, *, hint: Hint | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class UserError(ToFuError):
    """Bad input: a file, a folder, an option value. Exit code 2."""

    exit_code = 2


class ExportError(UserError, RuntimeError):
    """The model could not be exported to a valid ONNX graph that matches PyTorch. Exit code 2."""


class EvaluationError(UserError, ValueError):
    """Unusable evaluation input: a malformed dataset folder, a count below one, or a model whose outputs do not fit
    the task. Exit code 2. (Here, not in ``evaluation``: ``eval`` refuses its options before torch is imported.)"""


class CheckFailed(ToFuError):
    """A verification failed on good input (parity, TensorRT compatibility). Exit code 1."""

    exit_code = 1


class EngineNotBuilt(ToFuError):
    """The ONNX artifact is complete, but no TensorRT engine could be built on this machine. Exit code 3."""

    exit_code = 3


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, then what caused it (``raise ... from``) or was being handled when it was raised, and so on down to
    the exception at the root; each once (a chain that loops back ends there)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
