"""The checkpoint a tuned file was tuned from, read from the sidecar ``finetune`` wrote beside it.

A tuned model's own unreduced outputs are not the ones the user started from (its norms and biases moved too), so
whatever measures what the reduction costs (``eval``) compares with this origin instead, when it is still there and
still the same file (its sha256).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SIDECAR_WRITER = "tofu-export finetune"


@dataclass(frozen=True)
class TunedOrigin:
    """Where a tuned checkpoint came from: ``path`` (None when it is not found, or no longer the same file) and
    what the sidecar recorded."""

    recorded: str
    sha256: str | None
    path: Path | None


def tuned_origin(checkpoint: str | Path) -> TunedOrigin | None:
    """The origin of ``checkpoint`` when it is a file ``finetune`` wrote (its ``.json`` sidecar says so), else None.
    The recorded path is tried, then the same file name beside ``checkpoint``; a file whose sha256 differs from the
    recorded one is not the origin."""
    from tofu_export.hashing import sha256_file

    checkpoint = Path(checkpoint)
    sidecar = checkpoint.with_suffix(".json")
    if not checkpoint.is_file() or not sidecar.is_file():
        return None
    try:
        statement = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(statement, dict) or statement.get("written_by") != SIDECAR_WRITER:
        return None
    recorded, digest = statement.get("checkpoint"), statement.get("checkpoint_sha256")
    if not isinstance(recorded, str) or not recorded:
        return TunedOrigin("", None, None)  # tuned from a timm name (random weights): nothing to find
    for candidate in (Path(recorded), checkpoint.parent / Path(recorded).name):
        if candidate.is_file() and candidate.resolve() != checkpoint.resolve() and (
                not digest or sha256_file(candidate) == digest):
            return TunedOrigin(recorded, digest, candidate)
    return TunedOrigin(recorded, digest if isinstance(digest, str) else None, None)
