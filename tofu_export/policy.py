"""A measured ToFu policy: one reduce mode and one r per block, and the measurements it was chosen from.

``tofu-export calibrate`` writes a policy as ``policy.json``; ``ToFuConfig(policy=...)`` (and every command's
``--policy``) applies it. A policy is bound to the model geometry it was measured on (depth, tokens entering the
first block, protected prefix tokens, input size): ``check_fits`` refuses any other model.

    policy = Policy.load("policy.json")
    policy.check_fits(model, 224)
    tofu_export.patch(model, r=list(policy.r), mode=list(policy.modes), img_size=224)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tofu_export.atomic import write_json_atomic
from tofu_export.errors import Hint, UserError
from tofu_export.names import REDUCE_MODES
from tofu_export.schedule import plan_tokens
from tofu_export.sizes import as_pair

if TYPE_CHECKING:
    from torch import nn

FORMAT = "tofu-export/policy"
FORMAT_VERSION = 1


class PolicyError(UserError):
    """A policy file that cannot be read, or a policy that does not fit the model it is applied to."""


@dataclass(frozen=True)
class Policy:
    """Per-block reduce modes and r, the model geometry they were measured on, and where they came from.

    ``model`` holds ``arch`` (timm name, informative), ``depth``, ``tokens`` (entering block 0), ``num_prefix``,
    ``embed_dim`` and ``img_size`` ``[h, w]``; ``source`` the images (``count``, ``path``), the tool version and the
    budget; ``measurements`` every number behind the choice (per-block scores, latencies, predicted and verified
    cosine).
    """

    modes: tuple[str, ...]  # [depth] "prune" | "mean" | "mlerp"
    r: tuple[int, ...]  # [depth] tokens removed in block i (asked; the plan clips nothing for a fitting model)
    model: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)
    measurements: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "modes", tuple(str(m) for m in self.modes))
        object.__setattr__(self, "r", tuple(self.r))
        depth = self.model.get("depth")
        if not isinstance(depth, int) or depth <= 0:
            raise PolicyError(f"a policy needs the model's depth (a positive int), got {depth!r}")
        if len(self.modes) != depth or len(self.r) != depth:
            raise PolicyError(
                f"a policy for a {depth}-block model needs {depth} modes and {depth} r values, got "
                f"{len(self.modes)} and {len(self.r)}"
            )
        bad = sorted({m for m in self.modes if m not in REDUCE_MODES})
        if bad:
            raise PolicyError(f"unknown reduce mode(s) {bad} in the policy; each block takes one of {REDUCE_MODES}")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in self.r):
            raise PolicyError(f"every r of a policy must be an int >= 0, got {list(self.r)}")
        for key in ("tokens", "num_prefix"):
            if not isinstance(self.model.get(key), int):
                raise PolicyError(f"the policy's model record lacks {key!r} (an int)")
        size = self.model.get("img_size")  # an int or [height, width] of positive ints (a string would unpack)
        pair = [size, size] if isinstance(size, int) else size
        if not (isinstance(pair, list | tuple) and len(pair) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)):
            raise PolicyError(f"the policy's model record has img_size {size!r}; expected [height, width] in pixels "
                              "(positive ints): the file was edited or damaged, calibrate again")
        plan = plan_tokens(self.model["tokens"], self.model["num_prefix"], self.r, strict=False, warn=False)
        if plan.clipped:
            block = plan.clipped[0]
            raise PolicyError(
                f"the policy asks block {block} to remove {self.r[block]} tokens, but it receives "
                f"{plan.tokens[block]} ({self.model['num_prefix']} protected) and can remove at most {plan.r[block]}"
            )

    @property
    def depth(self) -> int:
        return len(self.modes)

    @property
    def img_size(self) -> tuple[int, int]:
        return as_pair(self.model["img_size"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "modes": list(self.modes),
            "r": list(self.r),
            "model": dict(self.model),
            "source": dict(self.source),
            "measurements": dict(self.measurements),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        """The policy of a ``to_dict`` record; a record of another kind or version is a ``PolicyError``."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise PolicyError("this is not a tofu-export policy (no \"format\": \"tofu-export/policy\" record)")
        if data.get("format_version") != FORMAT_VERSION:
            raise PolicyError(
                f"policy format version {data.get('format_version')!r} is not supported (this tool reads version "
                f"{FORMAT_VERSION}); calibrate again with this version"
            )
        try:
            return cls(tuple(data["modes"]), tuple(data["r"]), dict(data["model"]), dict(data.get("source", {})),
                       dict(data.get("measurements", {})))
        except (KeyError, TypeError) as error:
            message = f"the policy record is incomplete or malformed: {type(error).__name__}: {error}"
            raise PolicyError(message) from error

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a ``policy.json``; a missing, unreadable or malformed file is a ``PolicyError`` naming it."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise PolicyError(f"policy file {path} does not exist",
                              hint=Hint("policy", None, "write one with the calibrate command")) from error
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise PolicyError(f"policy file {path} is not readable JSON: {error}") from error
        try:
            return cls.from_dict(data)
        except PolicyError as error:
            raise PolicyError(f"{path}: {error}", hint=error.hint) from error

    def save(self, path: str | Path) -> Path:
        """Write the policy as JSON atomically (readers see the old file or the new one)."""
        return write_json_atomic(path, self.to_dict())

    def check_fits(self, model: nn.Module, img_size: int | Sequence[int] | None = None) -> None:
        """Raise ``PolicyError`` naming each way ``model`` at ``img_size`` (default: its own) differs from the model
        the policy was measured on: depth, embedding width, protected prefix tokens, input size, tokens."""
        from tofu_export.models.family import family_of

        family = family_of(model)
        size = family.img_size(model) if img_size is None else as_pair(img_size)
        got = model_record(model, size)
        names = {"depth": "blocks", "embed_dim": "embedding width", "num_prefix": "protected prefix tokens",
                 "img_size": "input size", "tokens": "tokens entering block 0"}
        want = dict(self.model, img_size=list(self.img_size))
        wrong = [f"{label} {got[key]} (policy: {want[key]})" for key, label in names.items()
                 if key in want and got[key] != want[key]]
        if wrong:
            hint = None
            if got["img_size"] != want["img_size"] and got["depth"] == want["depth"]:
                hint = Hint("img_size", str(self.img_size[0]), "the input size the policy was calibrated at")
            raise PolicyError(
                f"the policy was calibrated on {self.model.get('arch', 'another model')} and does not fit this "
                f"model: {'; '.join(wrong)}. Calibrate again on this model and input size.",
                hint=hint,
            )
        family.num_tokens(model, size)  # the model accepts the size at all (raises otherwise)


def model_record(model: nn.Module, img_size: int | Sequence[int] | None = None) -> dict[str, Any]:
    """The geometry a policy is bound to: ``arch``, ``depth``, ``embed_dim``, ``num_prefix``, ``img_size [h, w]``
    and ``tokens`` (entering block 0 at that input size)."""
    from tofu_export.models.family import family_of

    family = family_of(model)
    size = family.img_size(model) if img_size is None else as_pair(img_size)
    return {
        "arch": family.arch_name(model),
        "depth": family.depth(model),
        "embed_dim": family.embed_dim(model),
        "num_prefix": family.num_prefix(model),
        "img_size": [int(size[0]), int(size[1])],
        "tokens": family.num_tokens(model, size),
    }
