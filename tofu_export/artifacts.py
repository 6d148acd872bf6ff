"""Artifact folders that appear whole or not at all, never over what tofu-export did not write, and the manifest
that describes them."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tofu_export.atomic import (
    exchange_folders,
    locked_folder,
    owner_tag,
    remove_stale,
    rename_noreplace,
    signals_held,
    write_json_atomic,
)
from tofu_export.errors import Hint, UserError
from tofu_export.hashing import sha256_file
from tofu_export.manifest import MANIFEST, TOOL, Manifest, ManifestError
from tofu_export.output_paths import OutputPathError, check_not_an_input, check_parent

_PACKAGES = ("tofu-export", "torch", "timm", "onnx", "onnxscript", "onnxruntime", "onnxslim", "onnxsim", "tensorrt")
ONNX_NAME, ORT_NAME, ENGINE_NAME = "model.onnx", "model.ort.onnx", "model.engine"  # the graphs an artifact holds


class ArtifactExistsError(UserError, FileExistsError):
    """The output folder exists and replacing it was not asked for (or is not allowed)."""


FolderState = tuple[int, int, int] | None  # (device, inode, mtime ns) of the output folder; None: nothing there
_OUT = Hint("out", None, "with a new folder")
logger = logging.getLogger(__name__)


def is_artifact_folder(folder: Path) -> bool:
    """True when ``folder`` holds a ``manifest.json`` that tofu-export wrote (its ``tool`` is tofu-export)."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and data.get("tool") == TOOL


def graph_in(path: str | Path, *, engine: bool = False) -> Path:
    """``path`` as given, or, where it is an artifact folder tofu-export wrote, the graph in it: ``model.onnx``
    (``model.engine`` with ``engine``), so ``profile`` / ``eval`` / ``check`` take the folder ``export`` printed.
    Any other folder stays as it is (a transformers or open_clip model folder is a checkpoint)."""
    path = Path(path)
    if not (path.is_dir() and is_artifact_folder(path)):
        return path
    graph = path / (ENGINE_NAME if engine else ONNX_NAME)
    if not graph.is_file():
        held = ", ".join(sorted(entry.name for entry in os.scandir(path))) or "nothing"
        raise UserError(f"{path} is a tofu-export artifact folder without {graph.name} (it holds {held}); pass the "
                        "file to use")
    return graph


def folder_state(path: Path) -> FolderState:
    """What is at ``path`` now, to notice later whether someone replaced or changed it meanwhile."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino, info.st_mtime_ns


def foreign_files(folder: Path) -> list[str]:
    """Entries of an artifact folder that its manifest does not list (someone else put them there)."""
    try:
        files = json.loads((folder / MANIFEST).read_text()).get("files", [])
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        files = []
    listed = {entry.get("name") for entry in files if isinstance(entry, dict)} if isinstance(files, list) else set()
    return sorted(entry.name for entry in os.scandir(folder) if entry.name not in listed | {MANIFEST})


def check_output(out_dir: str | Path, *, force: bool = False, inputs: Sequence[str | Path] = ()) -> FolderState:
    """Refuse an output folder that cannot be written or must not be replaced, before any work starts.

    ``force`` replaces only a folder that tofu-export wrote (it holds a tofu-export manifest.json) and that holds
    nothing but the files its manifest lists; a file, a symbolic link, any other folder, or a folder that is or
    holds one of ``inputs`` is never replaced. Returns the folder's state now (see ``staged_folder``).
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        raise OutputPathError(f"the output path {out_dir} is a symbolic link (to {os.readlink(out_dir)}); "
                              "tofu-export writes only at a real path and never replaces a link", hint=_OUT)
    check_parent(out_dir)
    check_not_an_input(out_dir, inputs)
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise OutputPathError(f"the output path {out_dir} is a file, not an artifact folder; tofu-export never "
                              "replaces a file", hint=_OUT)
    if not is_artifact_folder(out_dir):
        raise ArtifactExistsError(
            f"{out_dir} already exists and was not written by tofu-export (it holds no tofu-export {MANIFEST}), "
            "so it is never replaced, even when replacing is asked for", hint=_OUT)
    if not force:
        raise ArtifactExistsError(f"{out_dir} already exists (an artifact folder from an earlier export)",
                                  hint=Hint("force", None, "to replace it, or choose another output folder"))
    extra = foreign_files(out_dir)
    if extra:
        raise ArtifactExistsError(
            f"{out_dir} holds files tofu-export did not write ({', '.join(extra[:5])}), so it is not replaced even "
            "with replacing asked for; move them out first", hint=_OUT)
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise OutputPathError(f"{out_dir} is read-only, so its old files cannot be replaced; make it writable "
                              f"(chmod u+w {out_dir})", hint=_OUT)
    return folder_state(out_dir)


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Remove the staging (and parking) folders beside ``out_dir`` that a killed export left, saying so."""
    removed = [*remove_stale(out_dir.parent, f".{out_dir.name}.partial-"),
               *remove_stale(out_dir.parent, f".{out_dir.name}.old-")]
    for path in removed:
        logger.warning("removed %s, left by an earlier export that was killed (its process is gone)", path)
    return removed


@contextlib.contextmanager
def staged_folder(
    out_dir: Path, *, force: bool = False, keep_on_error: bool = False, expected: FolderState | bool = True,
) -> Iterator[Path]:
    """Yield an empty staging folder beside ``out_dir``; on success it becomes ``out_dir`` in one rename.

    ``expected``: the folder state ``check_output`` returned when the job started (True: check now). If the
    folder changed since (another export finished there meanwhile), nothing is replaced and this export fails.
    On any exception, SIGINT/SIGTERM included, the staging folder and any parent folder made for it are removed
    (``keep_on_error`` keeps the staging folder), so nothing half-written is left.
    """
    out_dir = Path(out_dir)
    state = check_output(out_dir, force=force) if expected is True else expected
    made: list[Path] = []
    staging: Path | None = None
    try:
        made = _make_parents(out_dir.parent)
        remove_stale_staging(out_dir)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{owner_tag()}-", dir=out_dir.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; the artifact folder is meant to be shared
        yield staging
        _publish(staging, out_dir, state)  # type: ignore[arg-type]
    except BaseException:
        with signals_held():
            if staging is not None and not keep_on_error:
                shutil.rmtree(staging, ignore_errors=True)
            for folder in reversed(made):
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the ones created, outermost first."""
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir()
    return missing[::-1]


def _publish(staging: Path, out_dir: Path, state: FolderState) -> None:
    """Rename ``staging`` to ``out_dir`` if ``out_dir`` is still as it was when checked, under the parent's lock."""
    changed = ArtifactExistsError(
        f"{out_dir} was written or changed by someone else (another export?) while this export ran; this "
        f"export's result was discarded and {out_dir} was left as it is", hint=_OUT)
    with locked_folder(out_dir.parent), signals_held():  # the bounded wait for the lock can be interrupted
        if folder_state(out_dir) != state:
            raise changed
        if state is None:
            try:
                rename_noreplace(staging, out_dir)
            except FileExistsError:
                raise changed from None
            return
        exchange_folders(staging, out_dir)  # staging now holds the old artifact
        shutil.rmtree(staging, ignore_errors=True)


def cached_artifact(folder: Path, name: str) -> bool:
    """Whether ``folder/name`` is a reusable artifact: present and matching the sha256 its manifest records.

    False when it is missing or does not match (export it again); a folder whose manifest tofu-export did not
    write (or cannot read) is an error, since re-exporting would have to replace what tofu-export did not write.
    """
    if not folder.exists():
        return False
    try:
        recorded = Manifest.read(folder).file_sha256(name)
    except ManifestError as error:
        raise ArtifactExistsError(f"the cached artifact folder {folder} is damaged ({error}); delete it and "
                                  "rerun to export it again") from error
    return (folder / name).is_file() and recorded == sha256_file(folder / name)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def describe_files(folder: Path) -> list[dict[str, Any]]:
    """Name, size and sha256 of every file in ``folder`` except the manifest."""
    return [
        {"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    ]


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Complete ``manifest`` with the folder's files, package versions, machine and time, and write it."""
    manifest.created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    manifest.files = describe_files(folder)
    manifest.versions = package_versions()
    manifest.machine = {"platform": platform.platform(), "python": platform.python_version()}
    return write_json_atomic(folder / MANIFEST, manifest.to_dict())
