"""Image sizes: users give an int or a (height, width) pair; code works with the pair."""

from __future__ import annotations

from collections.abc import Sequence


def as_pair(img_size: int | Sequence[int]) -> tuple[int, int]:
    """``224`` or ``(224, 224)`` -> ``(224, 224)``."""
    if isinstance(img_size, int):
        return img_size, img_size
    height, width = img_size
    return int(height), int(width)
