"""Artifact folders that appear whole or not at all, and the manifest that describes them."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tofu_export.atomic import write_json_atomic
from tofu_export.errors import UserError
from tofu_export.hashing import sha256_file
from tofu_export.manifest import MANIFEST, Manifest

_PACKAGES = ("tofu-export", "torch", "timm", "onnx", "onnxruntime", "onnxsim", "tensorrt")


class ArtifactExistsError(UserError, FileExistsError):
    """The output folder exists and overwriting was not asked for."""


@contextlib.contextmanager
def staged_folder(out_dir: Path, *, force: bool = False, keep_on_error: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside ``out_dir``; on success it replaces ``out_dir`` in one rename.

    On an exception the staging folder is deleted (nothing half-written is left) unless ``keep_on_error``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise ArtifactExistsError(f"{out_dir} already exists; pass --force to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the artifact folder is meant to be shared
    try:
        yield staging
    except BaseException:
        if not keep_on_error:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        out_dir.rename(trash / out_dir.name)
        staging.rename(out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        staging.rename(out_dir)


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
