"""The checkpoint a tuned file (or folder) was tuned from, as the statement ``finetune`` wrote with it records it.

A tuned model's own unreduced outputs are not the ones the user started from (its norms and biases moved too), so
whatever measures what the reduction costs (``eval``) compares with this origin instead, when it is still there and
still the same checkpoint (its content hash). The statement is read where every load reads it
(``models.loading.tuned_statement``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TunedOrigin:
    """Where a tuned checkpoint came from: ``path`` (None when it is not found, or no longer the same checkpoint)
    and what the statement recorded."""

    recorded: str
    sha256: str | None
    path: Path | None


def tuned_origin(checkpoint: str | Path) -> TunedOrigin | None:
    """The origin of ``checkpoint`` when ``finetune`` wrote it (its statement says so), else None. The recorded path
    is tried, then the same name beside ``checkpoint``; a checkpoint whose content hash differs from the recorded
    one is not the origin."""
    from tofu_export.models.loading import tuned_statement

    checkpoint = Path(checkpoint)
    statement = tuned_statement(checkpoint)
    if not statement:
        return None
    recorded, digest = statement.get("checkpoint"), statement.get("checkpoint_sha256")
    digest = digest if isinstance(digest, str) and digest else None
    if not isinstance(recorded, str) or not recorded:
        return TunedOrigin("", None, None)  # tuned from a timm name (random weights): nothing to find
    for candidate in (Path(recorded), checkpoint.parent / Path(recorded).name):
        if candidate.exists() and candidate.resolve() != checkpoint.resolve() and (
                digest is None or _digest(candidate) == digest):
            return TunedOrigin(recorded, digest, candidate)
    return TunedOrigin(recorded, digest, None)


def _digest(candidate: Path) -> str | None:
    """``candidate``'s content hash as a load records it; None where it cannot be hashed (not a checkpoint)."""
    from tofu_export.checkpoint import CheckpointError
    from tofu_export.models.loading import checkpoint_digest

    try:
        return checkpoint_digest(candidate)
    except (CheckpointError, OSError):
        return None
