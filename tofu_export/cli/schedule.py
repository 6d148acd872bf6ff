"""``tofu-export schedule MODEL``: tokens per block, reduce mode per block and GFLOPs, without exporting."""

from __future__ import annotations

import warnings
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tofu_export.cli.options import JsonOption, ModelOptions, ToFuOptions
from tofu_export.cli.output import print_json, print_line, print_table
from tofu_export.reports.artifact import clip_notes
from tofu_export.schedule import compact_r


def schedule(
    source: Annotated[str, typer.Argument(help="A checkpoint, or a timm model name (e.g. deit_small_patch16_224).")],
    model: ModelOptions,
    tofu: ToFuOptions,
    as_json: JsonOption = False,
) -> None:
    """Print tokens per block, reduce mode per block and GFLOPs before/after, without exporting.

    Example: tofu-export schedule deit_small_patch16_224 --r 16 --mode tofu
    """
    config = tofu.build(model.img_size)  # every option checked before torch is loaded
    from tofu_export import token_schedule

    net = model.load(source).model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolved = config.patch(net)
    result = token_schedule(net, resolved.img_size)
    if as_json:
        print_json(result.to_dict())
        return
    console = Console()
    for note in clip_notes(resolved.plan) + [str(w.message) for w in caught if "clipped" not in str(w.message)]:
        print_line(console, f"note: {note}")
    table = Table(title=f"{source}: {resolved.source}, r per block {compact_r(result.r)}, {resolved.img_size} px",
                  title_justify="left", caption_justify="left",
                  caption=f"GFLOPs {result.gflops_original:.2f} -> {result.gflops_reduced:.2f} "
                  f"({result.flop_ratio:.2f}x fewer); {result.tokens[-1] - result.r[-1]} tokens leave the last block.")
    for column in ("block", "tokens in", "removed", "reduce"):
        table.add_column(column, justify="right")
    for i, (n, removed, how) in enumerate(zip(result.tokens, result.r, result.modes, strict=True)):
        table.add_row(str(i), str(n), str(removed), how)
    print_table(console, table)
