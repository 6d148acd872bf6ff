"""Which TensorRT releases an export is made for, the ONNX opset that follows, and the verdict per release.

Jetson boards get TensorRT with JetPack: JetPack 5 ships TensorRT 8.5, JetPack 6 TensorRT 10.3, JetPack 7 TensorRT
10.13 (checked against the 10.3 table). An export is
made for one or more of these *targets*; the graph is still checked against every release tofu-export knows, so the
manifest and the report say which releases the artifact builds on, and which would need another export.

The opset follows from the targets: opset 17 keeps each LayerNorm as one ``LayerNormalization`` node (fused on
TensorRT 10), but TensorRT 8.5's ONNX parser has no importer for it, so an export for 8.5 uses opset 16, where the
exporter decomposes LayerNorm into primitive ops.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from tofu_export.errors import Hint, UserError
from tofu_export.tensorrt.ops import ALL_TARGETS, NATIVE_OPS, TARGET_LABELS

if TYPE_CHECKING:
    from tofu_export.manifest import TrtCheckRecord

# JetPack major release -> the operator table that applies: JetPack 6 ships TensorRT 10.3; JetPack 7 (Jetson Thor)
# ships TensorRT 10.13, checked against the 10.3 table, which is conservative for it: the 10.x changelog only adds
# operators and relaxes restrictions after 10.3. TensorRT 11 has no table here (no published operator list was at
# hand): `--trt 11` is an unknown release.
JETPACK_TRT: dict[str, str] = {"5": "8.5", "6": "10", "7": "10"}
TRT_JETPACK: dict[str, str] = {"8.5": "5", "10": "6"}  # the JetPack a table is labelled with
DEFAULT_TARGETS: tuple[str, ...] = ("10",)  # JetPack 6: what current Jetson boards (Orin) ship
NEWEST_OPSET, LAYERNORM_FREE_OPSET = 17, 16


class UnknownTargetError(UserError, ValueError):
    """A TensorRT or JetPack release tofu-export has no operator tables for."""


def _split(values: Iterable[str]) -> list[str]:
    """``["8.5,10", " 6"]`` -> ``["8.5", "10", "6"]``."""
    return [part.strip() for value in values for part in str(value).split(",") if part.strip()]


def resolve_targets(trt: Sequence[str] = (), jetpack: Sequence[str] = ()) -> tuple[str, ...]:
    """The TensorRT releases to export for, from TensorRT versions (``8.5``, ``10``) and JetPack releases (``5``,
    ``6``), in ``ALL_TARGETS`` order; nothing named gives ``DEFAULT_TARGETS``."""
    wanted = [_trt_release(v) for v in _split(trt)]
    for value in _split(jetpack):
        if value.split(".")[0] not in JETPACK_TRT:
            raise UnknownTargetError(
                f"unknown JetPack release {value!r}; tofu-export knows JetPack {', '.join(JETPACK_TRT)} "
                f"({', '.join(f'JetPack {j} = TensorRT {t}' for j, t in JETPACK_TRT.items())})",
                hint=Hint("jetpack", "6"),
            )
        wanted.append(JETPACK_TRT[value.split(".")[0]])
    return tuple(t for t in ALL_TARGETS if t in wanted) or DEFAULT_TARGETS


def validate_targets(targets: Sequence[str]) -> tuple[str, ...]:
    """The known releases named by ``targets`` (``"10.3"`` -> ``"10"``), in the order given, without repeats;
    the one error for an unknown or empty list."""
    if not _split(targets):
        raise UnknownTargetError(
            f"no TensorRT release named; tofu-export checks graphs against "
            f"{', '.join(TARGET_LABELS[t] for t in ALL_TARGETS)}", hint=Hint("trt", DEFAULT_TARGETS[0]),
        )
    return tuple(dict.fromkeys(_trt_release(value) for value in _split(targets)))


def _trt_release(value: str) -> str:
    """``"10.3"`` -> ``"10"``, ``"8.5.2"`` -> ``"8.5"``: the release whose operator table applies."""
    for target in sorted(ALL_TARGETS, key=len, reverse=True):
        if value == target or value.startswith(f"{target}."):
            return target
    raise UnknownTargetError(
        f"unknown TensorRT release {value!r}; tofu-export checks graphs against "
        f"{', '.join(TARGET_LABELS[t] for t in ALL_TARGETS)}",
        hint=Hint("trt", DEFAULT_TARGETS[0], "or 8.5 for JetPack 5"),
    )


def export_opset(targets: Iterable[str]) -> int:
    """The newest opset whose graph every target parses natively: 17, or 16 when a target lacks
    ``LayerNormalization`` (TensorRT 8.5)."""
    return NEWEST_OPSET if all("LayerNormalization" in NATIVE_OPS[t] for t in targets) else LAYERNORM_FREE_OPSET


@dataclass(frozen=True)
class TargetVerdict:
    """Whether the exported graph builds natively on one TensorRT release."""

    target: str  # "8.5" | "10"
    label: str  # "TensorRT 8.5 (JetPack 5)"
    jetpack: str  # "5"
    builds: bool  # no error in the check
    requested: bool  # the export was made for this release
    errors: list[str]  # the check's error messages for this release (first few)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def target_verdicts(check: TrtCheckRecord, max_errors: int = 3) -> list[TargetVerdict]:
    """One verdict per checked release of a manifest's TensorRT check (``requested``: the releases it was for)."""
    verdicts = []
    for target, ok in check.per_target.items():
        errors = [f"{i.op_type or i.node}: {i.message}" for i in check.issues
                  if i.target == target and i.severity == "error"]
        verdicts.append(TargetVerdict(target, TARGET_LABELS[target], TRT_JETPACK.get(target, "?"), bool(ok),
                                      target in check.requested, list(dict.fromkeys(errors))[:max_errors]))
    return verdicts
