"""An ONNX graph is built in a temporary folder beside its destination, saved, checked, and moved into place only
when every step passed: a failed export leaves nothing at the path it was asked to write."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx

from tofu_export.errors import ExportError
from tofu_export.exporters.simplify import over_protobuf_limit


@contextmanager
def staged(path: Path) -> Iterator[Path]:
    """A path like ``path`` in a fresh temporary folder beside it. When the block ends without an error, everything
    written in that folder (the graph, and its external data first) moves into ``path``'s folder; on an error, or
    after the move, the temporary folder is deleted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as workdir:
        yield Path(workdir) / path.name
        move_files(Path(workdir), path.parent)


def move_files(folder: Path, destination: Path) -> None:
    """Every file in ``folder`` into ``destination``, a graph's external data before the graph (the graph, once it
    is there, can be read)."""
    for written in sorted(folder.iterdir(), key=lambda p: p.suffix != ".data"):
        os.replace(written, destination / written.name)


def save_graph(graph: onnx.ModelProto, path: Path) -> bool:
    """Save ``graph`` (in a staging folder: ``staged``); models over the protobuf limit go to ``<name>.data`` beside
    it. A data file of an earlier save there goes first (onnx appends to one; a graph now small enough for one
    file, e.g. after an FP16 conversion, needs none). Returns whether the weights went beside it."""
    external = over_protobuf_limit(graph)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save(graph, str(path), save_as_external_data=external, location=data.name if external else None)
    if external:  # onnx creates it readable by its owner alone: the artifact's files share one mode
        data.chmod(path.stat().st_mode & 0o777)
    return external


def check_graph(path: Path) -> None:
    """The full ONNX checker (with shape inference) on the file at ``path``; ``ExportError`` when it fails."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"the exported graph is not valid ONNX: {error}") from error
