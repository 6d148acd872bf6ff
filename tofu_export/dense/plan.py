"""Which blocks of a denoiser reduce tokens, by how much and how: a per-block policy and its JSON file.

A block is named by its module path (``input_blocks.11.1``) and has a token grid ``height x width``. The default
plan (``plan_blocks``) reduces every block whose grid is at most ``max_downsample`` times coarser than the finest
one (ToMe for SD's ``max_downsample``: 1 = only the finest level), all with one ratio and mode. A policy file
(written by calibration) gives every block its own ratio and mode instead.

``sublayers`` says before which sub-layers of a block the tokens are reduced (and unmerged after): ``self``
(self-attention, the default), ``cross`` (cross-attention: its queries) and ``mlp`` (the feed-forward). A block's
sub-layers share one matching per forward, as in ToMe for SD.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tofu_export.atomic import write_text_atomic
from tofu_export.errors import Hint, UserError
from tofu_export.names import REDUCE_MODES, ReduceMode
from tofu_export.output_paths import FileOutput, check_file_outputs, is_dense_policy_file

SUBLAYERS: tuple[str, ...] = ("self", "cross", "mlp")  # in the order a block runs them


@dataclass(frozen=True)
class BlockPlan:
    """One block's reduction: ``ratio`` of its tokens reduced with ``mode``."""

    ratio: float
    mode: ReduceMode


@dataclass
class DensePolicy:
    """Per-block plans (``blocks``: name -> plan) with the window ``stride`` and ``seed`` they were made for, and
    the ``sublayers`` every reduced block reduces before."""

    blocks: dict[str, BlockPlan]
    stride: int = 2
    seed: int | None = None
    notes: dict = field(default_factory=dict)
    sublayers: tuple[str, ...] = ("self",)

    def __post_init__(self) -> None:
        self.sublayers = check_sublayers(self.sublayers)

    def to_json(self) -> str:
        return json.dumps(
            {"kind": "tofu-dense-policy", "stride": self.stride, "seed": self.seed, "sublayers": list(self.sublayers),
             "blocks": {name: asdict(plan) for name, plan in self.blocks.items()}, "notes": self.notes},
            indent=2,
        )

    def save(self, path: str | Path) -> None:
        """Write the policy to ``path`` whole (a temporary moved into place: never half a file)."""
        write_text_atomic(path, self.to_json() + "\n")

    @staticmethod
    def check_output(path: str | Path, inputs: Sequence[str | Path] = ()) -> None:
        """Refuse, before any work, a policy path that may not be written: anything but a denoiser policy
        tofu-export wrote (which a new calibration replaces), or one of ``inputs``."""
        check_file_outputs([FileOutput(Path(path), is_dense_policy_file, "denoiser policy")], inputs=inputs)

    @classmethod
    def load(cls, path: str | Path) -> DensePolicy:
        try:
            data = json.loads(Path(path).read_text())
            if data.get("kind") != "tofu-dense-policy":
                raise ValueError("not a dense ToFu policy (kind != 'tofu-dense-policy')")
            blocks = {name: BlockPlan(float(p["ratio"]), p["mode"]) for name, p in data["blocks"].items()}
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserError(f"cannot read the policy file {path}: {error}", hint=Hint("policy", None, "a file "
                            "written by calibrate-denoiser")) from error
        for name, plan in blocks.items():
            check_plan(plan, name)
        return cls(blocks, int(data.get("stride", 2)), data.get("seed"), data.get("notes", {}),
                   tuple(data.get("sublayers", ["self"])))


def check_plan(plan: BlockPlan, name: str = "") -> None:
    """Raise ``UserError`` for a mode or ratio no block can take."""
    where = f" (block {name})" if name else ""
    if plan.mode not in REDUCE_MODES:
        raise UserError(f"unknown reduce mode {plan.mode!r}{where}",
                        hint=Hint("mode", "mlerp", ", ".join(REDUCE_MODES)))
    if not 0.0 <= plan.ratio < 1.0:
        raise UserError(f"ratio {plan.ratio} is out of range{where}", hint=Hint("ratio", "0.5", "a fraction in [0, 1)"))


def check_sublayers(sublayers) -> tuple[str, ...]:
    """``sublayers`` as a tuple in block order; ``UserError`` for an unknown one or none."""
    names = [sublayers] if isinstance(sublayers, str) else list(sublayers)
    names = [part.strip() for name in names for part in str(name).split(",") if part.strip()]
    unknown = [name for name in names if name not in SUBLAYERS]
    if unknown or not names:
        raise UserError(f"unknown sub-layer {', '.join(unknown) or '(none named)'}: choose from {', '.join(SUBLAYERS)}",
                        hint=Hint("sublayers", "self", "self,cross,mlp"))
    return tuple(name for name in SUBLAYERS if name in names)


def check_uniform_plan(ratio: float, mode: ReduceMode, max_downsample: int = 1,
                       sublayers=("self",)) -> tuple[str, ...]:
    """Every setting of ``plan_blocks`` that does not need the model, checked (the CLI does it before torch is
    loaded): ``UserError`` naming the bad one; the sub-layers in block order."""
    check_plan(BlockPlan(ratio, mode))
    if max_downsample < 1:
        raise UserError(f"max_downsample must be >= 1, not {max_downsample}", hint=Hint("max_downsample", "1"))
    return check_sublayers(sublayers)


def plan_blocks(grids: dict[str, tuple[int, int]], ratio: float, mode: ReduceMode, max_downsample: int = 1,
                stride: int = 2, seed: int | None = None, sublayers=("self",)) -> DensePolicy:
    """One ratio and mode for every block (``grids``: name -> ``(height, width)``) at most ``max_downsample`` times
    coarser (per side) than the finest grid; coarser blocks are left alone."""
    sublayers = check_uniform_plan(ratio, mode, max_downsample, sublayers)
    if not grids:
        raise UserError("this model has no block that can reduce tokens")
    finest = max(h * w for h, w in grids.values())
    chosen = {
        name: BlockPlan(ratio, mode)
        for name, (h, w) in grids.items()
        if h * w * max_downsample**2 >= finest and min(h, w) >= stride
    }
    return DensePolicy(chosen, stride, seed, sublayers=sublayers)
