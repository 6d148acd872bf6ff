"""The checkpoint a tuned file was tuned from, as the sidecar ``finetune`` wrote beside it records it.

A tuned model's own unreduced outputs are not the ones the user started from (its norms and biases moved too), so
whatever measures what the reduction costs (``eval``) compares with this origin instead, when it is still there and
still the same file (its sha256). The sidecar is read as every timm checkpoint's is
(``models.loading.tuned_statement``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
        if candidate.is_file() and candidate.resolve() != checkpoint.resolve() and (
                digest is None or sha256_file(candidate) == digest):
            return TunedOrigin(recorded, digest, candidate)
    return TunedOrigin(recorded, digest, None)
