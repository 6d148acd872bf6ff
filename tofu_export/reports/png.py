"""Every PNG tofu-export writes: a matplotlib figure on the Agg canvas (no display, no global backend switch), marked
as tofu-export's in its ``Software`` text chunk (``output_paths.is_tofu_png`` reads it, so a later run may replace
the file and nothing else), written atomically."""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tofu_export.atomic import write_bytes_atomic
from tofu_export.output_paths import PNG_SOFTWARE


def save_png(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` to ``path`` as a PNG tofu-export claims; returns ``path``."""
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer, metadata={"Software": PNG_SOFTWARE})
    return write_bytes_atomic(path, buffer.getvalue())
