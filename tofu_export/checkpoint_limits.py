"""Resource limits of a checkpoint, checked from its headers and metadata before any tensor is materialised.

A small untrusted file must not drive memory or time: a zip member compressed 300:1, a 1-element storage
expanded (stride 0) to 1e10 elements, a legacy pickle declaring a 40 GB storage, a safetensors header whose
shapes exceed its data, or a key ``blocks.99999.*`` / a width no ViT has, which would make the builder allocate a
model far larger than the file. Each is a :class:`CheckpointLimitError` naming the tensor, key or member.

``inspect_torch_file`` reads ``data.pkl`` (or a legacy file's pickles) with an unpickler that constructs nothing:
globals become inert placeholders, storages are ``(dtype name, element count)`` records and each tensor a
``TensorMeta`` (storage, offset, size, stride).
"""

from __future__ import annotations

import io
import json
import math
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tofu_export.errors import UserError

MAX_DEPTH = 256  # blocks: ViT-22B has 48
MAX_WIDTH = 16_384  # embedding width: ViT-22B has 6144
MAX_TOKENS = 65_536  # position-embedding rows: 256x256 patches
EXPANSION = 4  # the built model (fp32) may be this many times the stored bytes (fp16 -> fp32 is 2x) ...
SLACK_BYTES = 256 << 20  # ... plus this much (small files)
_ITEMSIZE = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1,
             "Byte": 1, "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16, "Float8_e4m3fn": 1, "Float8_e5m2": 1}
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8}
_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:blocks|layers|layer|stages|encoder\.layer)\.(\d+)\.")


class CheckpointError(UserError):
    """A checkpoint file or state dict that cannot be loaded into a timm ViT; the message says what to do."""


class CheckpointLimitError(CheckpointError):
    """A checkpoint whose declared sizes exceed what its file holds, or what any supported ViT needs."""


@dataclass(frozen=True)
class StorageMeta:
    key: str
    itemsize: int
    numel: int


@dataclass(frozen=True)
class TensorMeta:
    storage: StorageMeta
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.size)


class _Inert:
    """Whatever a pickle names that is not a tensor: accepts any construction, holds nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *args: Any) -> Any:
    if not isinstance(storage, StorageMeta):
        return _Inert()
    return TensorMeta(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _first(value: Any, *args: Any) -> Any:  # _rebuild_parameter(data, requires_grad, hooks) -> data
    return value


class _MetaUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name.startswith("_rebuild_parameter"):
            return _first
        if module == "collections" and name == "OrderedDict":
            return dict
        if module == "torch" and name.endswith("Storage"):
            return name  # the persistent id below reads the dtype from it
        return _Inert

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], str):
            itemsize = _ITEMSIZE.get(pid[1].removesuffix("Storage"), 1)  # UntypedStorage: bytes
            return StorageMeta(str(pid[2]), itemsize, int(pid[4]))
        return _Inert()


def _tensors(obj: Any, prefix: str = "", depth: int = 0) -> dict[str, TensorMeta]:
    """``name -> TensorMeta`` of every tensor in nested dicts (the state dict and its training wrappers)."""
    found: dict[str, TensorMeta] = {}
    if isinstance(obj, TensorMeta):
        found[prefix or "<tensor>"] = obj
    elif isinstance(obj, Mapping) and depth < 8:
        for key, value in obj.items():
            found.update(_tensors(value, f"{prefix}.{key}" if prefix else str(key), depth + 1))
    return found


def _parse(load: Any) -> Any:
    """The metadata tree, or None where this reader cannot parse it (``torch.load`` then names the corruption;
    the checks on the loaded tensors still run)."""
    try:
        return load()
    except Exception:  # a truncated or unusual pickle: not this reader's to judge
        return None


def inspect_torch_file(path: Path) -> tuple[dict[str, TensorMeta], int]:
    """``(tensors, stored bytes)`` of a ``torch.save`` file (zip or legacy), read without materialising anything;
    refuses compressed zip members that expand past the file, and legacy storages larger than the file."""
    size = path.stat().st_size
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            expanded = sum(member.file_size for member in members)
            if expanded > 2 * size + (1 << 20):
                big = max(members, key=lambda member: member.file_size)
                raise CheckpointLimitError(
                    f"{path} is a {size / 1e6:.1f} MB archive whose members expand to {expanded / 1e9:.2f} GB "
                    f"(e.g. {big.filename}: {big.file_size / 1e9:.2f} GB, compressed); torch.save never compresses, "
                    "so it was not loaded. Re-save the weights with torch.save or as .safetensors.")
            pickled = next((m for m in members if m.filename.endswith("data.pkl")), None)
            if pickled is None:
                return {}, size  # torch.load names what is missing
            data = archive.read(pickled)
        return _tensors(_parse(lambda: _MetaUnpickler(io.BytesIO(data)).load())), size
    with open(path, "rb") as handle:
        unpickler = _MetaUnpickler(handle)
        tensors = _tensors(_parse(lambda: [unpickler.load() for _ in range(4)][3]))  # magic, protocol, info, data
    declared = sum(s.numel * s.itemsize for s in {t.storage for t in tensors.values()})
    if declared > size:
        raise CheckpointLimitError(
            f"{path} declares {declared / 1e9:.2f} GB of tensor data but the file has {size / 1e6:.1f} MB; it is "
            "corrupt or crafted, so it was not loaded. Re-save the weights with torch.save or as .safetensors.")
    return tensors, size


def check_views(tensors: Mapping[str, TensorMeta], path: Path) -> None:
    """Refuse a tensor with more elements than its storage holds (a stride-0 or overlapping expansion)."""
    for name, meta in tensors.items():
        if any(s < 0 for s in meta.size) or any(s < 0 for s in meta.stride):
            raise CheckpointLimitError(f"{path}: tensor {name} has a negative size or stride {meta.size}/"
                                       f"{meta.stride}; the file is corrupt or crafted. Re-save it.")
        if meta.numel > max(meta.storage.numel - meta.offset, 0) and meta.numel > 0:
            raise CheckpointLimitError(
                f"{path}: tensor {name} has {meta.numel:,} elements (shape {list(meta.size)}, stride "
                f"{list(meta.stride)}) but its storage holds {meta.storage.numel:,}: an expanded view that would "
                "take far more memory than the file. Save real weights (tensor.contiguous()) and pass that file.")


def is_safetensors(path: Path) -> bool:
    """Whether the file ``path`` is a safetensors file (an 8-byte header length, then the JSON header)."""
    with open(path, "rb") as handle:
        return handle.read(9)[8:9] == b"{"


def inspect_safetensors(path: Path) -> tuple[dict[str, tuple[int, ...]], int]:
    """``(name -> shape, stored bytes)`` from a safetensors header; shapes must fit the data they point at."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if length > min(size - 8, 100 << 20):
            raise CheckpointLimitError(f"{path}: its safetensors header claims {length:,} bytes, more than the "
                                       "file or the format allows; the file is corrupt. Save or download it again.")
        header = json.loads(handle.read(length))
    shapes = {}
    for name, entry in (header.items() if isinstance(header, dict) else ()):
        if name == "__metadata__" or not isinstance(entry, dict):
            continue
        shape = tuple(int(d) for d in entry.get("shape", ()))
        begin, end = (int(v) for v in entry.get("data_offsets", (0, 0)))
        need = math.prod(shape) * _ST_ITEMSIZE.get(str(entry.get("dtype")), 1)
        if need != end - begin:  # (data past the end of a truncated file: safetensors names that)
            raise CheckpointLimitError(f"{path}: tensor {name} declares shape {list(shape)} ({need:,} bytes) but "
                                       f"points at {end - begin:,} bytes; the file is corrupt. Save it again.")
        shapes[name] = shape
    return shapes, size


_SHAPED = {"patch_embed.proj.weight": (4, "[width, channels, patch, patch]"),
           "cls_token": (3, "[1, 1, width]"), "reg_token": (3, "[1, registers, width]"),
           "dist_token": (3, "[1, 1, width]"), "pos_embed": (3, "[1, tokens, width]")}


def check_key_shapes(shapes: Mapping[str, Sequence[int]], path: Path) -> None:
    """The ViT tensors whose shapes the architecture is read from must have their rank and no empty dimension
    (a patch size of 0, a 1-D ``reg_token``), so that nothing downstream divides by or indexes into nothing."""
    for name, shape in shapes.items():
        role = next((key for key in _SHAPED if name == key or name.endswith("." + key)), None)
        if role is None:
            continue
        rank, layout = _SHAPED[role]
        if len(shape) != rank or any(d <= 0 for d in shape):
            raise CheckpointLimitError(f"{path}: {name} has shape {list(shape)}; a ViT's {role} is {layout} with no "
                                       "empty dimension. The file is not a ViT checkpoint or is damaged: pass the "
                                       "original weights.")


def check_model_bounds(shapes: Mapping[str, Sequence[int]], stored_bytes: int, path: Path) -> None:
    """Depth, width and tokens a ViT built from these keys would have: each within its bound, and the model's
    estimated size within ``EXPANSION`` x the stored bytes (a small file cannot ask for a large model)."""
    check_key_shapes(shapes, path)
    depth = 0
    for name in shapes:
        match = _BLOCK_INDEX.search(name)
        if match and int(match.group(1)) >= MAX_DEPTH:
            raise CheckpointLimitError(f"{path}: key {name} names block {int(match.group(1))}; tofu-export builds "
                                       f"at most {MAX_DEPTH} blocks. Remove the stray key, or pass another file.")
        depth = max(depth, int(match.group(1)) + 1 if match else 0)
    width = max((shape[0] for name, shape in shapes.items() if name.endswith("patch_embed.proj.weight") and shape),
                default=0)
    width = max([width] + [shape[-1] for name, shape in shapes.items()
                           if name.rsplit(".", 1)[-1] in ("cls_token", "pos_embed") and shape])
    if width > MAX_WIDTH:
        raise CheckpointLimitError(f"{path}: the embedding width is {width:,}; tofu-export builds ViTs up to "
                                   f"{MAX_WIDTH:,} wide. Pass a ViT checkpoint.")
    tokens = max((shape[-2] for name, shape in shapes.items() if name.rsplit(".", 1)[-1] == "pos_embed"
                  and len(shape) >= 2), default=0)
    if tokens > MAX_TOKENS:
        raise CheckpointLimitError(f"{path}: pos_embed has {tokens:,} positions; tofu-export builds ViTs with up to "
                                   f"{MAX_TOKENS:,} tokens. Pass a ViT checkpoint at its usual resolution.")
    model_bytes = 4 * 12 * depth * width * width  # attention + MLP(4x) weights, fp32
    if model_bytes > EXPANSION * stored_bytes + SLACK_BYTES:
        raise CheckpointLimitError(
            f"{path}: its keys describe a ViT of {depth} blocks x width {width} (~{model_bytes / 1e9:.1f} GB) but "
            f"the file holds {stored_bytes / 1e6:.1f} MB of weights; keys without weights (e.g. a stray block "
            "index) would make tofu-export build far more than the file. Pass the complete checkpoint.")
