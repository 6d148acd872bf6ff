"""Safe loading of timm ViT checkpoints, architecture inference from tensor shapes, and model building.

A user hands us a file; we never trust it further than we must:

* ``load_state_dict`` reads ``.safetensors`` or ``torch.save`` files (``weights_only=True`` unless the
  caller opts in with ``trust_pickle=True``), unwraps training wrappers (``{"model": sd}``, EMA, DDP
  ``module.``, ``_orig_mod.``) and turns every way a file can be broken into one :class:`CheckpointError`.
* ``infer_arch`` reads the shapes of a timm ``VisionTransformer`` state dict (``patch_embed.proj.weight``
  ``[C, 3, P, P]``, ``pos_embed`` ``[1, T, C]``, ``blocks.{i}.*``, heads, layer scale, ...) and names the
  closest timm model plus the ``timm.create_model`` kwargs that make it match exactly.
* ``build_model`` creates that model (``pretrained=False``), resamples ``pos_embed`` for a new ``img_size``
  and loads the weights, reporting missing / unexpected / mis-shaped keys with a suggested ``--arch``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import logging
import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ArchGuess", "CheckpointError", "build_model", "infer_arch", "load_state_dict", "sha256_file"]

logger = logging.getLogger(__name__)

_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema", "module")
_KEY_PREFIXES = ("module.", "_orig_mod.")
_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_ZIP_MAGIC = b"PK\x03\x04"
_MAX_LISTED_KEYS = 5


class CheckpointError(Exception):
    """A checkpoint file or state dict that cannot be loaded into a timm ViT; the message says what to do."""


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------


def sha256_file(path: str | Path, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk_bytes`` chunks so large checkpoints never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load a checkpoint file into a flat ``{name: tensor}`` state dict on CPU.

    The format is recognised from the file's first bytes (safetensors header, zip archive or legacy
    pickle), not from its suffix. Wrappers such as ``{"model": sd, "epoch": 3}`` are unwrapped (preferring
    ``model``, then ``state_dict``, then the EMA copies), non-tensor entries are dropped and ``module.`` /
    ``_orig_mod.`` prefixes are stripped. Pickled Python objects beyond tensors are refused unless
    ``trust_pickle=True``.
    """
    path = Path(path)
    _check_is_readable_file(path)
    kind = _sniff_format(path)
    if kind == "safetensors":
        raw: Any = _load_safetensors(path)
    else:
        raw = _torch_load(path, trust_pickle=trust_pickle)
    return _strip_key_prefixes(_tensor_entries(_unwrap(raw), path))


def _check_is_readable_file(path: Path) -> None:
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in _CHECKPOINT_SUFFIXES)[:_MAX_LISTED_KEYS]
        hint = f" It contains {', '.join(inside)}; pass one of those." if inside else ""
        raise CheckpointError(
            f"Checkpoint path {path} is a directory, not a file. Pass the weights file itself "
            f"(a .safetensors, .pth, .pt or .bin file).{hint}"
        )
    if not path.exists():
        raise CheckpointError(
            f"Checkpoint file {path} does not exist. Check the path (relative paths are resolved from "
            f"{Path.cwd()})."
        )
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"Checkpoint file {path} is empty (0 bytes), so it was probably not written completely. "
            "Download or save it again."
        )


def _sniff_format(path: Path) -> str:
    """``"safetensors"``, ``"torch"`` (zip or pickle), or :class:`CheckpointError` for anything else."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head.startswith(_ZIP_MAGIC):
        return "torch"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle PROTO opcode: legacy torch.save
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and 8 < int.from_bytes(head[:8], "little") + 8 <= size:
        return "safetensors"
    looks_like_text = all(32 <= byte < 127 or byte in b"\t\r\n" for byte in head)
    what = "it looks like a text file" if looks_like_text else f"it starts with the bytes {head[:8]!r}"
    raise CheckpointError(
        f"{path} is not a PyTorch (.pth/.pt/.bin) or safetensors checkpoint: {what}. "
        "Pass the model weights saved with torch.save(model.state_dict(), ...) or safetensors' save_file."
    )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise _corrupt_file_error(path, err) from err


def _torch_load(path: Path, *, trust_pickle: bool) -> Any:
    if trust_pickle:
        logger.warning(
            "Loading %s with trust_pickle=True (weights_only=False): Python code in the file may run.", path
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        # torch words it "Unsupported global: GLOBAL x" or, for blocked modules, "unsupported GLOBAL x whose module..."
        unsafe_global = re.search(r"unsupported global(?:: GLOBAL)? ([\w.]+)", str(err), flags=re.IGNORECASE)
        if not trust_pickle and unsafe_global:
            raise CheckpointError(
                f"{path} contains Python objects beyond tensors (it references {unsafe_global.group(1)}), "
                "and loading it could execute arbitrary code, so it was not loaded. If you trust where the "
                "file came from, rerun with --trust-pickle (CLI) or trust_pickle=True (API); safer, re-save "
                "it once as plain weights with torch.save(model.state_dict(), ...) or as .safetensors."
            ) from err
        raise _corrupt_file_error(path, err) from err
    except Exception as err:  # torch.load surfaces corruption as RuntimeError, EOFError, zip or import errors
        raise _corrupt_file_error(path, err) from err


def _corrupt_file_error(path: Path, err: Exception) -> CheckpointError:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = next((line for line in lines if "WeightsUnpickler error:" in line), lines[0] if lines else "")
    detail = detail.split(". ")[0].rstrip(".") or "the data ends unexpectedly"
    return CheckpointError(
        f"Could not read checkpoint {path}: the file is truncated, corrupt or not a weights file "
        f"({type(err).__name__}: {detail}). Download or save it again and compare its size / SHA-256 "
        "with the source."
    )


def _unwrap(obj: Any) -> Any:
    """Descend through ``{"model": ...}``-style training wrappers and pickled modules to the state dict."""
    while True:
        if isinstance(obj, nn.Module):
            return obj.state_dict()
        if not isinstance(obj, Mapping):
            return obj
        inner_key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping | nn.Module)), None)
        if inner_key is None:
            return obj
        obj = obj[inner_key]


def _tensor_entries(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict of named tensors. "
            "Save the weights with torch.save(model.state_dict(), ...) and pass that file."
        )
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        found = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
        raise CheckpointError(
            f"{path} contains no named tensors (top-level keys: {found}). Expected a state dict, possibly "
            f"under one of the keys {', '.join(_WRAPPER_KEYS)}; re-save it with "
            "torch.save(model.state_dict(), ...)."
        )
    return tensors


def _strip_key_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DDP ``module.`` and ``torch.compile`` ``_orig_mod.`` prefixes (in any nesting order)."""
    stripped = {}
    for key, value in state_dict.items():
        while key.startswith(_KEY_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


# ----------------------------------------------------------------------------------------------------
# Architecture inference
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ArchGuess:
    """A timm model name, the ``timm.create_model`` kwargs that make it match a checkpoint, and why.

    ``notes`` collects anything :func:`build_model` changed on the way (e.g. a resampled ``pos_embed``).
    """

    name: str
    kwargs: dict[str, Any]
    reason: str
    notes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class _KnownArch:
    name: str
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    img_size: int = 224
    num_classes: int = 1000
    distilled: bool = False
    layer_scale: bool = False


# Order breaks ties: DeiT and ViT tiny/small/base are the same network, DeiT weights are the common ones.
_KNOWN_ARCHS = (
    _KnownArch("deit_tiny_patch16_224", 16, 192, 12, 3),
    _KnownArch("deit_small_patch16_224", 16, 384, 12, 6),
    _KnownArch("deit_base_patch16_224", 16, 768, 12, 12),
    _KnownArch("deit_tiny_distilled_patch16_224", 16, 192, 12, 3, distilled=True),
    _KnownArch("deit_small_distilled_patch16_224", 16, 384, 12, 6, distilled=True),
    _KnownArch("deit_base_distilled_patch16_224", 16, 768, 12, 12, distilled=True),
    _KnownArch("vit_tiny_patch16_224", 16, 192, 12, 3),
    _KnownArch("vit_small_patch16_224", 16, 384, 12, 6),
    _KnownArch("vit_base_patch16_224", 16, 768, 12, 12),
    _KnownArch("vit_large_patch16_224", 16, 1024, 24, 16),
    _KnownArch("vit_base_patch16_224.mae", 16, 768, 12, 12, num_classes=0),
    _KnownArch("vit_small_patch14_dinov2", 14, 384, 12, 6, img_size=518, num_classes=0, layer_scale=True),
    _KnownArch("vit_base_patch14_dinov2", 14, 768, 12, 12, img_size=518, num_classes=0, layer_scale=True),
)

_LAYER_SCALE_INIT = 1e-5  # any non-None value creates the ls1/ls2 parameters; the checkpoint overwrites them


def infer_arch(state_dict: Mapping[str, torch.Tensor]) -> ArchGuess:
    """Infer the timm ``VisionTransformer`` configuration of ``state_dict`` from key names and shapes.

    Reads ``patch_embed.proj.weight`` ``[C, in_chans, P, P]``, ``pos_embed`` ``[1, T, C]`` (``T`` = grid²
    plus the prefix tokens unless ``no_embed_class``), ``cls_token`` / ``dist_token`` ``[1, 1, C]``,
    ``reg_token`` ``[1, R, C]``, the ``blocks.{i}`` count, ``blocks.0.mlp.fc1.weight``
    ``[C * mlp_ratio, C]``, layer scale ``blocks.0.ls1.gamma`` ``[C]``, ``fc_norm`` / ``norm`` /
    ``norm_pre`` and ``head.weight`` ``[num_classes, C]``. ``num_heads`` is not visible in the weights: it
    comes from the known-model table or ``embed_dim // 64``.
    """
    _require_vit_keys(state_dict)
    patch_weight = state_dict["patch_embed.proj.weight"]
    embed_dim, in_chans, patch_h, patch_w = patch_weight.shape
    if patch_h != patch_w:
        raise CheckpointError(f"Non-square patches ({patch_h}x{patch_w}) are not supported by tofu-export.")
    patch_size = int(patch_h)
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    class_token = "cls_token" in state_dict
    distilled = "dist_token" in state_dict
    reg_tokens = int(state_dict["reg_token"].shape[1]) if "reg_token" in state_dict else 0
    num_prefix = int(class_token) + int(distilled) + reg_tokens
    pos_tokens = int(state_dict["pos_embed"].shape[1])
    grid, no_embed_class = _pos_embed_grid(pos_tokens, num_prefix)
    num_classes = int(state_dict["head.weight"].shape[0]) if "head.weight" in state_dict else 0
    layer_scale = "blocks.0.ls1.gamma" in state_dict

    known = _closest_known(
        patch_size, int(embed_dim), depth, grid * patch_size, num_classes, distilled, layer_scale
    )
    kwargs: dict[str, Any] = {
        "embed_dim": int(embed_dim),
        "depth": depth,
        "num_heads": known.num_heads if known.embed_dim == embed_dim else max(1, int(embed_dim) // 64),
        "patch_size": patch_size,
        "img_size": grid * patch_size,
        "num_classes": num_classes,
        "class_token": class_token,
        "reg_tokens": reg_tokens,
        "no_embed_class": no_embed_class,
        "global_pool": _global_pool(state_dict, class_token),
        "init_values": _LAYER_SCALE_INIT if layer_scale else None,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict,
        "mlp_ratio": state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
    }
    kwargs.update(_rare_kwargs(state_dict, int(in_chans), kwargs["global_pool"], class_token))
    reason = _describe(kwargs, pos_tokens, grid, class_token, distilled, reg_tokens, known)
    return ArchGuess(name=known.name, kwargs=kwargs, reason=reason)


def _require_vit_keys(state_dict: Mapping[str, torch.Tensor]) -> None:
    required = ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight")
    if all(key in state_dict for key in required):
        shapes_ok = state_dict["patch_embed.proj.weight"].ndim == 4 and state_dict["pos_embed"].ndim == 3
        if shapes_ok:
            return
    prefixes = sorted({key.split(".", 1)[0] for key in state_dict})
    shown = ", ".join(prefixes[:10]) + (", ..." if len(prefixes) > 10 else "")
    raise CheckpointError(
        "This is not a timm VisionTransformer checkpoint: it lacks a 4-d patch_embed.proj.weight, a 3-d "
        f"pos_embed or blocks.0.mlp.fc1.weight (top-level key prefixes found: {shown}). tofu-export needs a "
        "ViT/DeiT/DINOv2 state dict with timm key names; convert weights from other libraries (e.g. Hugging "
        "Face transformers) to timm naming first."
    )


def _pos_embed_grid(pos_tokens: int, num_prefix: int) -> tuple[int, bool]:
    """Square patch grid side and ``no_embed_class`` from ``pos_embed``'s token count ``T``."""
    for candidate, no_embed_class in ((pos_tokens - num_prefix, False), (pos_tokens, True)):
        side = math.isqrt(max(candidate, 0))
        if side > 0 and side * side == candidate:
            return side, no_embed_class and num_prefix > 0
    raise CheckpointError(
        f"pos_embed has {pos_tokens} tokens, which is neither a square patch grid nor a square grid plus "
        f"the {num_prefix} prefix token(s) found in the checkpoint. tofu-export exports square inputs only; "
        "resample or fine-tune the model at a square img_size first."
    )


def _global_pool(state_dict: Mapping[str, torch.Tensor], class_token: bool) -> str:
    if "attn_pool.latent" in state_dict:
        return "map"
    if "fc_norm.weight" in state_dict or not class_token:
        return "avg"
    return "token"


def _rare_kwargs(
    state_dict: Mapping[str, torch.Tensor], in_chans: int, global_pool: str, class_token: bool
) -> dict[str, Any]:
    """Kwargs that only appear when they differ from timm's ``VisionTransformer`` defaults."""
    rare: dict[str, Any] = {}
    if in_chans != 3:
        rare["in_chans"] = in_chans
    if global_pool == "avg" and "fc_norm.weight" not in state_dict:
        rare["fc_norm"] = False
    if "norm.weight" not in state_dict and "fc_norm.weight" not in state_dict:
        rare["final_norm"] = False
    if "norm_pre.weight" in state_dict:
        rare["pre_norm"] = True
    if "blocks.0.attn.q_norm.weight" in state_dict:
        rare["qk_norm"] = True
    if "blocks.0.attn.proj.bias" not in state_dict:
        rare["proj_bias"] = False
    return rare


def _closest_known(
    patch_size: int,
    embed_dim: int,
    depth: int,
    img_size: int,
    num_classes: int,
    distilled: bool,
    layer_scale: bool,
) -> _KnownArch:
    """The table entry with the fewest (weighted) differences; distillation must match (another class)."""

    def mismatch(known: _KnownArch) -> int:
        return (
            8 * (known.embed_dim != embed_dim)
            + 8 * (known.patch_size != patch_size)
            + 4 * (known.layer_scale != layer_scale)
            + 2 * (known.depth != depth)
            + (known.img_size != img_size)
            + ((known.num_classes == 0) != (num_classes == 0))
        )

    candidates = [known for known in _KNOWN_ARCHS if known.distilled == distilled]
    return min(candidates, key=mismatch)


def _describe(
    kwargs: Mapping[str, Any],
    pos_tokens: int,
    grid: int,
    class_token: bool,
    distilled: bool,
    reg_tokens: int,
    known: _KnownArch,
) -> str:
    counts = ((int(class_token), "cls"), (int(distilled), "dist"), (reg_tokens, "reg"))
    prefix_parts = [f"{n} {what}" for n, what in counts if n]
    prefix = " + ".join(prefix_parts) or "no prefix tokens"
    where = "not in pos_embed" if kwargs["no_embed_class"] else "in pos_embed"
    head = f"head {kwargs['num_classes']} classes" if kwargs["num_classes"] else "no head (backbone)"
    if distilled:
        head += " + distillation head"
    overrides = [
        f"{field}={kwargs[field]}"
        for field in ("embed_dim", "patch_size", "depth", "img_size", "num_classes")
        if kwargs[field] != getattr(known, field)
    ]
    if (kwargs["init_values"] is not None) != known.layer_scale:
        overrides.append(f"init_values={kwargs['init_values']}")
    suffix = f" with {', '.join(overrides)}" if overrides else ""
    return (
        f"embed_dim={kwargs['embed_dim']}, depth={kwargs['depth']}, patch={kwargs['patch_size']}, "
        f"{pos_tokens} tokens ({grid}x{grid} grid, {prefix} {where}), {head}, pool={kwargs['global_pool']}"
        f"{', layer scale' if kwargs['init_values'] is not None else ''} → {known.name}{suffix}"
    )


# ----------------------------------------------------------------------------------------------------
# Model building
# ----------------------------------------------------------------------------------------------------


def build_model(
    state_dict: Mapping[str, torch.Tensor],
    *,
    arch: str | None = None,
    img_size: int | None = None,
    strict: bool = True,
) -> tuple[nn.Module, ArchGuess]:
    """Create the timm ViT for ``state_dict`` (``pretrained=False``), load the weights, return it in eval.

    Without ``arch`` the model is the inferred one with all inferred kwargs. With ``arch`` the timm defaults
    of that name are kept and only ``num_classes`` and ``img_size`` are taken from the checkpoint. An
    ``img_size`` other than the checkpoint's resamples ``pos_embed`` (bicubic, no antialias) and records a
    note. Shape mismatches always raise; missing / unexpected keys raise only when ``strict``. The returned
    :class:`ArchGuess` describes the model actually built (name, kwargs, notes).
    """
    import timm

    guess = infer_arch(state_dict)
    target_img_size = img_size if img_size is not None else guess.kwargs["img_size"]
    patch_size = guess.kwargs["patch_size"]
    if target_img_size % patch_size:
        raise CheckpointError(
            f"img_size={target_img_size} is not a multiple of the checkpoint's patch size {patch_size}; "
            f"pick e.g. {target_img_size // patch_size * patch_size}."
        )
    if arch is None:
        name, kwargs = guess.name, {**guess.kwargs, "img_size": target_img_size}
        reason = guess.reason
    else:
        _require_known_timm_name(arch, timm)
        name, kwargs = arch, {"num_classes": guess.kwargs["num_classes"], "img_size": target_img_size}
        reason = f"--arch {arch} given; the checkpoint looks like: {guess.reason}"
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as err:  # timm asserts on incompatible kwarg combinations
        raise CheckpointError(
            f"timm could not create {name} with {kwargs} ({type(err).__name__}: {err}). "
            f"The checkpoint looks like: {guess.reason}."
        ) from err

    weights, notes = _fit_pos_embed(dict(state_dict), model, guess)
    notes += _check_keys_and_shapes(weights, model, guess, arch_given=arch is not None, strict=strict)
    model.load_state_dict(weights, strict=False)
    for note in notes:
        logger.warning("%s", note)
    return model.eval(), ArchGuess(name=name, kwargs=kwargs, reason=reason, notes=tuple(notes))


def _require_known_timm_name(arch: str, timm: Any) -> None:
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(["*vit*", "*deit*"]), n=5, cutoff=0.5)
    hint = f" Close matches: {', '.join(close)}." if close else " See timm.list_models('*vit*') for names."
    raise CheckpointError(f"Unknown timm model name {arch!r} for --arch.{hint}")


def _fit_pos_embed(
    weights: dict[str, torch.Tensor], model: nn.Module, guess: ArchGuess
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Resample the checkpoint's ``pos_embed`` ``[1, T, C]`` to the model's grid if only the grid differs."""
    from timm.layers import resample_abs_pos_embed

    source = weights["pos_embed"]
    target = getattr(model, "pos_embed", None)
    if not isinstance(target, torch.Tensor) or target.shape == source.shape:
        return weights, []
    if target.shape[-1] != source.shape[-1]:
        return weights, []
    model_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    grid = guess.kwargs["img_size"] // guess.kwargs["patch_size"]
    source_prefix = source.shape[1] - grid * grid
    if model_prefix != source_prefix:
        return weights, []  # a real architecture mismatch; reported by _check_keys_and_shapes
    new_grid = list(model.patch_embed.grid_size)
    weights["pos_embed"] = resample_abs_pos_embed(
        source, new_size=new_grid, old_size=[grid, grid], num_prefix_tokens=source_prefix, antialias=False
    )
    note = (
        f"pos_embed resampled (bicubic) from a {grid}x{grid} to a {new_grid[0]}x{new_grid[1]} patch grid for "
        f"img_size={new_grid[0] * guess.kwargs['patch_size']}; accuracy may drop without fine-tuning at "
        "this size."
    )
    return weights, [note]


def _check_keys_and_shapes(
    weights: Mapping[str, torch.Tensor], model: nn.Module, guess: ArchGuess, *, arch_given: bool, strict: bool
) -> list[str]:
    """Raise on shape mismatches (always) and missing / unexpected keys (if ``strict``); else return notes."""
    expected = model.state_dict()
    mismatched = [k for k in expected if k in weights and expected[k].shape != weights[k].shape]
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if not mismatched and (not strict or not (missing or unexpected)):
        ignored = ((missing, "missing"), (unexpected, "unexpected"))
        return [f"{len(keys)} {what} keys ignored (strict=False)" for keys, what in ignored if keys]
    problems = [
        f"{k}: model expects {_shape(expected[k])}, checkpoint has {_shape(weights[k])}" for k in mismatched
    ]
    problems += [f"{k}: missing from checkpoint (model expects {_shape(expected[k])})" for k in missing]
    problems += [f"{k}: not in the model (checkpoint has {_shape(weights[k])})" for k in unexpected]
    counts = (
        f"{len(mismatched)} shape mismatch(es), {len(missing)} missing key(s), "
        f"{len(unexpected)} unexpected key(s)"
    )
    if arch_given:
        advice = (
            f"Try --arch {guess.name} (API: arch={guess.name!r}), or leave --arch out to build it with the "
            "inferred settings."
        )
    else:
        advice = (
            "Pass the exact timm model name with --arch; the checkpoint may use blocks that a plain "
            "VisionTransformer lacks."
        )
    listed = "\n".join(f"  - {p}" for p in problems[:_MAX_LISTED_KEYS])
    more = f"\n  ... and {len(problems) - _MAX_LISTED_KEYS} more" if len(problems) > _MAX_LISTED_KEYS else ""
    raise CheckpointError(
        f"The checkpoint does not fit {type(model).__name__} as built ({counts}). The checkpoint looks like: "
        f"{guess.reason}. {advice}\n{listed}{more}"
    )


def _shape(tensor: torch.Tensor) -> str:
    return str(list(tensor.shape))
