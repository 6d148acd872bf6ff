"""Read an open_clip checkpoint into its visual tower, and nothing else.

A checkpoint is a file (``open_clip_model.safetensors``, ``open_clip_pytorch_model.bin``, or a ``.pt`` from
open_clip's training: ``{"state_dict": {"module.visual.*": ...}, "optimizer": ...}``) or a hub folder holding
one beside its ``open_clip_config.json``. Its ``visual.*`` keys are the tower's; the text tower's are never copied
into the model (a safetensors file's are not even read; a ``torch.save`` file is read whole, checked, and its text
keys dropped at once). The tower is built on the meta device from the config (``open_clip_config.py``), the
file's shapes are compared with it before any weight is read, and the weights are then assigned (as float32):
no random initialisation. At another input size the position embeddings are resampled once, here, as open_clip
resamples them when it loads a checkpoint at a forced image size (bicubic, antialiased, class token kept). A tower
that is a timm model alone (SigLIP: ``visual.trunk.*``) is read the same way and built as that timm model
(``open_clip_timm.py``). Which files and keys a checkpoint holds is read from headers by ``open_clip_files.py``; a
tuned tower is written back by ``open_clip_save.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from tofu_export.checkpoint import CheckpointError, check_values, load_state_dict
from tofu_export.checkpoint_limits import MAX_TOKENS
from tofu_export.errors import Hint
from tofu_export.hashing import sha256_file
from tofu_export.models.family import ArchGuess, LoadedModel, fit_problems
from tofu_export.models.open_clip_config import PREFIX, TowerConfig, open_clip_module, resolve_config
from tofu_export.models.open_clip_files import VISUAL, header_shapes, is_safetensors, visual_name, weights_file

__all__ = ["load_open_clip", "read_tower"]


def _dims(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """What the weights show of the tower (for naming configs that fit)."""
    layers = len({n.split(".")[2] for n in shapes if n.startswith("transformer.resblocks.")})
    dims = {"layers": layers} if layers else {}
    if len(shapes.get("conv1.weight", ())) == 4:
        dims.update(width=shapes["conv1.weight"][0], patch_size=shapes["conv1.weight"][2])
    if len(shapes.get("positional_embedding", ())) == 2:
        dims["tokens"] = shapes["positional_embedding"][0]
    if len(shapes.get("proj", ())) == 2:
        dims["embed_dim"] = shapes["proj"][1]
    if len(shapes.get("transformer.resblocks.0.mlp.c_fc.weight", ())) == 2:
        dims["hidden"] = shapes["transformer.resblocks.0.mlp.c_fc.weight"][0]
    return dims


def _describe(dims: dict[str, int]) -> str:
    words = {"width": "width {}", "layers": "{} layers", "patch_size": "patch {}", "tokens": "{} positions",
             "embed_dim": "embedding {}"}
    return ", ".join(text.format(dims[key]) for key, text in words.items() if key in dims)


def _build(config: TowerConfig, img_size: int) -> nn.Module:
    """The tower ``config`` describes at ``img_size``, on the meta device (no memory, no initialisation)."""
    open_clip_module()
    from open_clip.model import _build_vision_tower

    vision = {**config.vision, "image_size": img_size, "output_tokens": False}  # one output: the embedding
    with torch.device("meta"):
        return _build_vision_tower(config.embed_dim, vision, quick_gelu=config.quick_gelu)


def _check_fits(file: Path, config: TowerConfig, expected: dict[str, tuple[int, ...]],
                shapes: dict[str, tuple[int, ...]]) -> None:
    """The file's tower keys and shapes are those of the config's tower, or an error naming the fix."""
    problems = fit_problems(expected, shapes, "the config")
    if problems:
        from tofu_export.models.open_clip_config import configs_matching

        found = [name for name in configs_matching(_dims(shapes)) if name != config.name]
        said = f"; its shapes fit {', '.join(found[:4])}" if found else ""
        seen, wanted = _describe(_dims(shapes)), _describe(_dims(expected))
        detail = f"the weights are {seen}, the config {wanted}" if seen != wanted else "; ".join(problems)
        raise CheckpointError(
            f"{file} does not fit the open_clip config {config.name} from {config.source}: {detail}{said}",
            hint=Hint("arch", f"{PREFIX}{found[0] if found else 'NAME'}", "naming the config it was trained with"))


def _read_safetensors(file: Path, names: set[str] | None, name_of: Callable[[str], str | None]
                      ) -> dict[str, Tensor] | None:
    """The tower's tensors ``names`` (None: all; ``name_of`` names a key in the tower, None outside it) of a
    safetensors file, reading nothing else; None when the file cannot be read so."""
    from safetensors import SafetensorError, safe_open

    if header_shapes(file) is None:
        return None
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            keys = {name_of(key): key for key in handle.keys()}  # noqa: SIM118 (not iterable)
            keys.pop(None, None)  # the other tower's and the rest
            return {name: handle.get_tensor(keys[name]) for name in (keys if names is None else names) if name in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None  # load_state_dict names what is wrong with the file


def read_tower(file: Path, names: set[str] | None, trust_pickle: bool,
               name_of: Callable[[str], str | None] = visual_name) -> dict[str, Tensor]:
    """A tower's tensors ``names`` as float32 (None: all of them), each under the name ``name_of`` gives its key
    (default: the visual tower's, ``visual.`` stripped; None for a key outside the tower); of a safetensors file
    nothing else is read."""
    tensors = _read_safetensors(file, names, name_of) if is_safetensors(file) else None
    if tensors is None:
        everything = load_state_dict(file, trust_pickle=trust_pickle)  # limits, views and values checked
        tensors = {name: everything.pop(key) for key in list(everything)
                   if (name := name_of(key)) is not None and (names is None or name in names)}
        del everything  # the other tower and the rest
    else:
        check_values(tensors, file)  # what load_state_dict checks (NaN / Inf, complex), on the tensors read here
    bad = [name for name, tensor in tensors.items() if not tensor.is_floating_point()]
    if bad:
        raise CheckpointError(f"{file}: tower weights {', '.join(bad[:3])} are not floats (a quantized export?): use "
                              "the float checkpoint")
    return {name: tensor.float() for name, tensor in tensors.items()}


def _resize_positions(state: dict[str, Tensor], tower: nn.Module) -> None:
    """``positional_embedding [1 + g*g, C]`` -> ``[1 + gh*gw, C]`` for ``tower``'s grid, by open_clip's own code."""
    from open_clip.model import resize_pos_embed

    wrapped = {f"{VISUAL}positional_embedding": state["positional_embedding"]}
    resize_pos_embed(wrapped, SimpleNamespace(visual=tower))
    state["positional_embedding"] = wrapped[f"{VISUAL}positional_embedding"]


def _target_size(config: TowerConfig, img_size: int | None) -> int:
    size = config.image_size if img_size is None else img_size
    patch = config.patch_size
    if size % patch or (size // patch) ** 2 + 1 > MAX_TOKENS:
        raise CheckpointError(f"an input of {size} px does not fit open_clip config {config.name}: the size must be "
                              f"a multiple of its patch ({patch} px) with at most {MAX_TOKENS} tokens",
                              hint=Hint("img_size", str(config.image_size), f"or another multiple of {patch}"))
    return size


def load_open_clip(path: Path, *, arch: str | None, img_size: int | None, trust_pickle: bool,
                   num_heads: int | None = None) -> LoadedModel:
    """The visual tower of the open_clip checkpoint ``path`` (a file or a hub folder), weights loaded, eval mode;
    at ``img_size`` when given (position embeddings resampled), else at the config's size."""
    file = weights_file(path)
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {file} does not exist",
                              hint=Hint("checkpoint", None, "the path of an open_clip checkpoint"))
    header = header_shapes(file)
    config = resolve_config(path, arch, _dims(header) if header else None)
    if config.timm_trunk:  # the tower is a timm model alone: built as one
        from tofu_export.models.open_clip_timm import check_trunk_keys, load_timm_trunk

        if header is not None:
            check_trunk_keys(file, config, set(header))  # before any weight is read
        visual = read_tower(file, None, trust_pickle)
        check_trunk_keys(file, config, set(visual))
        return load_timm_trunk(file, path, config, visual, img_size=img_size, num_heads=num_heads,
                               digest=sha256_file(file))
    if num_heads is not None and num_heads != config.heads:
        raise CheckpointError(f"open_clip config {config.name} has {config.heads} attention heads, not {num_heads}",
                              hint=Hint("num_heads", None, "leave it out: the config states it"))
    size = _target_size(config, img_size)
    native = _build(config, config.image_size)
    expected = {name: tuple(tensor.shape) for name, tensor in native.state_dict().items()}
    if header is not None:
        _check_fits(file, config, expected, header)  # before any weight is read
    state = read_tower(file, set(expected), trust_pickle)
    _check_fits(file, config, expected, {name: tuple(t.shape) for name, t in state.items()})
    tower = _build(config, size) if size != config.image_size else native
    if size != config.image_size:
        _resize_positions(state, tower)
    tower.load_state_dict(state, strict=True, assign=True)
    tower.eval()
    if config.preprocess:
        tower.preprocess_cfg = dict(config.preprocess)
    return LoadedModel(tower, _guess(config, size, img_size is not None), path, sha256_file(file))


def _guess(config: TowerConfig, size: int, resized: bool) -> ArchGuess:
    vision = config.vision
    kwargs: dict[str, Any] = {"width": vision.get("width", 768), "layers": vision.get("layers"),
                              "heads": config.heads, "patch_size": config.patch_size, "image_size": size,
                              "embed_dim": config.embed_dim, "quick_gelu": config.quick_gelu}
    notes = (f"position embeddings resampled from {config.image_size} to {size} px (bicubic)",) if resized and \
        size != config.image_size else ()
    return ArchGuess(name=f"{PREFIX}{config.name}", kwargs=kwargs, notes=notes,
                     reason=f"open_clip visual tower from {config.source}; text tower not loaded",
                     provenance={**{key: config.source for key in kwargs},
                                 **({"image_size": "--img-size"} if resized else {})})
