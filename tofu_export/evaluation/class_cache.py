"""Class embeddings kept between commands, so a second ``eval`` or ``sweep`` of the same two-tower model on the same
classes reads them instead of running its text tower again (CLIP's 80 ImageNet prompts for 1,000 classes: minutes
on a CPU, every time).

An entry is a function of what the embeddings are computed from: the checkpoint's content hash and the config it was
built with (``--arch``), the class names in order, the prompts written out, and the tool's version (whose text side
may change between releases). It is a safetensors file ``[K, D]`` under
``$XDG_CACHE_HOME/tofu-export/class_embeddings/`` (``~/.cache`` without it), named by the hash of that key, written
atomically; one that cannot be read, or does not hold ``K`` finite rows, is computed again and replaced.
``TOFU_EXPORT_CLASS_CACHE`` names another folder, or ``off``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from tofu_export import __version__

__all__ = ["ENV", "cache_folder", "cached_class_embeddings"]

ENV = "TOFU_EXPORT_CLASS_CACHE"


def cache_folder() -> Path | None:
    """Where class embeddings are kept (None: ``TOFU_EXPORT_CLASS_CACHE=off``)."""
    named = os.environ.get(ENV)
    if named == "off":
        return None
    if named:
        return Path(named)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tofu-export" / "class_embeddings"


def _entry(folder: Path, digest: str, names: Sequence[str], templates: Sequence[str]) -> Path:
    key = json.dumps({"checkpoint": digest, "names": list(names), "prompts": list(templates), "tool": __version__})
    return folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"


def _read(path: Path, classes: int) -> Tensor | None:
    """The ``[classes, D]`` float32 embeddings in ``path``, or None where it is missing, unreadable or not that."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        embeddings = load_file(str(path))["classes"]
    except (OSError, SafetensorError, KeyError, ValueError):
        return None
    fits = embeddings.ndim == 2 and embeddings.shape[0] == classes and embeddings.dtype == torch.float32
    return embeddings if fits and bool(torch.isfinite(embeddings).all()) else None


def cached_class_embeddings(digest: str, names: Sequence[str], templates: Sequence[str],
                            compute: Callable[[], Tensor]) -> tuple[Tensor, Path | None]:
    """The class embeddings ``[K, D]`` of ``names`` in ``templates`` from the checkpoint ``digest`` names (its content
    hash, and how it was built): read from the cache where an entry is there (and its path returned), else
    ``compute()``d and kept (None)."""
    folder = cache_folder()
    if folder is None:
        return compute(), None
    path = _entry(folder, digest, names, templates)
    found = _read(path, len(names)) if path.is_file() else None
    if found is not None:
        return found, path
    embeddings = compute()
    try:
        from safetensors.torch import save

        from tofu_export.atomic import write_bytes_atomic

        write_bytes_atomic(path, save({"classes": embeddings.float().contiguous()}))
    except OSError:
        pass  # a cache that cannot be written (read-only home, full disk) costs the next command the encoding only
    return embeddings, None
