"""One dynamo trace per distinct model in a test session, shared by the forked CLI commands that export it.

The end-to-end suites (``test_cli``, ``test_bad_input``) run ``tofu-export`` ~20 times on the same tiny checkpoint
to test loading, options and output folders; each run traced the same patched model through torch's dynamo exporter
(~6 CPU-seconds, most of a tiny export). Inside one test session the code does not change, so that trace is a
function of what it traces: the classes of every submodule, their attributes (head counts, flags, hooks, the ToFu
state), every parameter and buffer, the example inputs, the opset, the names and the custom translations.
``trace_key`` hashes all of these; ``install`` makes ``tofu_export.exporters.trace``'s dynamo trace step copy the
graph of an earlier trace with the same key instead of tracing again (a process that asks for a key being traced
waits for that trace: a file lock per key). Everything after the trace (simplification, checks, parity against the
PyTorch model, the TensorRT check, the manifest) still runs on every command.

The fork server's children install it (``commands.ForkServer``): a child runs a command line and cannot monkeypatch
the code it traces. In the test processes only the modules that ask for conftest's ``shared_traces`` fixture use it:
tests that change nothing a trace depends on. An attribute this hash cannot describe falls back to ``repr``, which
for most objects holds an address: a miss, never a wrong hit. Fresh interpreters (the signal cases, the console
script, one case per subcommand) always trace.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

_SKIP = {"_parameters", "_buffers", "_modules"}  # walked by name below


def _feed(digest: Any, value: Any, depth: int = 0) -> None:
    """Add ``value`` to ``digest``: tensors by dtype, shape and bytes; containers element by element; functions by
    qualified name, what they are bound to and what they captured; other objects by their attributes (a few levels
    deep), else by ``repr``."""
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        digest.update(f"T{data.dtype}{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif value is None or isinstance(value, (str, int, float, bool, torch.dtype, torch.device)):
        digest.update(f"{type(value).__name__}:{value!r}".encode())
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__}[{len(value)}]".encode())
        for item in value:
            _feed(digest, item, depth + 1)
    elif isinstance(value, dict):  # hook dicts are keyed by a global counter: only their values say what runs
        digest.update(f"dict[{len(value)}]".encode())
        for key in sorted(value, key=repr) if not all(isinstance(k, int) for k in value) else list(value):
            _feed(digest, key if not isinstance(key, int) else "", depth + 1)
            _feed(digest, value[key], depth + 1)
    elif isinstance(value, (weakref.ReferenceType, RemovableHandle)):  # removes a hook; the hooks are fed
        digest.update(type(value).__name__.encode())
    elif isinstance(value, nn.Module):  # a reference to a module: walked on its own by trace_key
        digest.update(f"module:{type(value).__qualname__}".encode())
    elif callable(value) and hasattr(value, "__qualname__") and not isinstance(value, type) and depth < 4:
        digest.update(f"fn:{getattr(value, '__module__', '')}.{value.__qualname__}".encode())
        if hasattr(value, "__self__"):  # a bound method: what it is bound to
            _feed(digest, value.__self__, depth + 1)
        cells = getattr(value, "__closure__", None) or ()  # a closure: what it captured
        _feed(digest, [_contents(cell) for cell in cells], depth + 1)
        _feed(digest, getattr(value, "__defaults__", None), depth + 1)
    elif isinstance(value, type):
        digest.update(f"type:{value.__module__}.{value.__qualname__}".encode())
    elif dataclasses.is_dataclass(value) and depth < 4:
        digest.update(f"dc:{type(value).__qualname__}".encode())
        for field in dataclasses.fields(value):
            _feed(digest, field.name, depth + 1)
            _feed(digest, getattr(value, field.name), depth + 1)
    elif hasattr(value, "__dict__") and depth < 3:
        digest.update(f"obj:{type(value).__module__}.{type(value).__qualname__}".encode())
        for key, item in sorted(vars(value).items()):
            _feed(digest, key, depth + 1)
            _feed(digest, item, depth + 1)
    else:
        digest.update(f"repr:{value!r}".encode())


def _contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not yet filled
        return "<empty cell>"


def trace_key(model: nn.Module, example: torch.Tensor, *settings: Any) -> str:
    """A hash of everything a dynamo trace of ``model`` on ``example`` depends on in this session's code."""
    digest = hashlib.sha256()
    for name, module in model.named_modules(remove_duplicate=False):
        digest.update(f"{name}|{type(module).__module__}.{type(module).__qualname__}".encode())
        for key, value in sorted(vars(module).items()):
            if key not in _SKIP:
                _feed(digest, key)
                _feed(digest, value)
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        _feed(digest, name)
        _feed(digest, tensor)
    _feed(digest, example)
    _feed(digest, settings)
    return digest.hexdigest()


def cached(trace: Callable[..., None], folder: Path) -> Callable[..., None]:
    """``trace(model, example, path, *settings)`` that copies the graph of an earlier call with the same key from
    ``folder``, or traces and leaves its graph there."""

    def traced(model: nn.Module, example: torch.Tensor, path: Path, *settings: Any) -> None:
        key = trace_key(model, example, *settings)
        graph = folder / f"{key}.onnx"
        with open(folder / f"{key}.lock", "a") as lock:  # one trace per key: a second asker waits for the first's
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the holder ends, however it ends
            if graph.exists():
                shutil.copyfile(graph, path)
                return
            trace(model, example, path, *settings)
            fd, staged = tempfile.mkstemp(dir=folder, suffix=".tmp")
            os.close(fd)
            shutil.copyfile(path, staged)
            os.replace(staged, graph)

    return traced


def install(folder: Path) -> None:
    """Route ``tofu_export.exporters.trace``'s dynamo trace through ``folder`` for the rest of this process."""
    from tofu_export.exporters import trace

    trace._trace_dynamo = cached(trace._trace_dynamo, folder)
