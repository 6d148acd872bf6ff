"""A bad option (or a graph that does not parse) is refused before torch is imported: the answer takes a fraction
of a second, not the ~3-5 CPU-s of loading torch, timm and the exporters. One fresh interpreter runs each command's
``main()`` in turn and reports, after each, its exit code, its error and whether torch has been imported so far."""

from __future__ import annotations

import os
from pathlib import Path

from commands import run_in_one_interpreter

COMMANDS = {
    "export": ["export", "model.pth", "--r", "2", "--tolerance", "-1", "-o", "out"],
    "demo": ["demo", "--r", "many", "-o", "demo_out"],
    "sweep": ["sweep", "model.pth", "--r", "a,b", "-o", "sw"],
    "sweep modes": ["sweep", "model.pth", "--r", "0,2", "--modes", "fuse", "-o", "sw"],
    "sweep zero-shot": ["sweep", "model.pth", "--zero-shot", "-o", "sw"],  # scores on no images
    "schedule": ["schedule", "model.pth", "--r", "two"],
    "eval": ["eval", "model.pth", "data", "--mode", "fuse"],
    "eval batch": ["eval", "model.pth", "data", "--batch-size", "0"],
    "eval limit": ["eval", "model.pth", "data", "--limit", "0"],
    "eval prompt": ["eval", "model.pth", "data", "--zero-shot", "--prompt", "a photo"],
    "eval prompt alone": ["eval", "model.pth", "data", "--prompt", "a photo of a {}"],
    "calibrate rule": ["calibrate", "model.pth", "data", "--rule", "coin", "-o", "p.json"],
    "denoiser ratio": ["denoiser", "data", "--ratio", "2", "-o", "out"],
    "denoiser sublayers": ["denoiser", "data", "--sublayers", "self,attn", "-o", "out"],
    "calibrate-denoiser": ["calibrate-denoiser", "data", "--max-downsample", "0", "-o", "p.json"],
    "calibrate clock": ["calibrate", "model.pth", "data", "--clock", "sundial", "-o", "p.json"],
    "calibrate-denoiser clock": ["calibrate-denoiser", "data", "--clock", "sundial", "-o", "p.json"],  # not measuring
    "calibrate images": ["calibrate", "model.pth", "data", "--images", "0", "-o", "p.json"],
    "calibrate budget": ["calibrate", "model.pth", "data", "--min-cosine", "2", "-o", "p.json"],
    "calibrate precision": ["calibrate", "model.pth", "data", "--precision", "int8", "-o", "p.json"],
    "export calibration data": ["export", "model.pth", "--calibration-data", "data", "-o", "out"],  # without int8
    "profile": ["profile", "broken.onnx", "--report", "report.md"],  # a graph that does not parse
    "clean-checkpoint": ["clean-checkpoint", "model.pth", "--use-ema", "-o", "ema.pth"],
    "clean-checkpoint folder": ["clean-checkpoint", "data", "-o", "data.safetensors"],
    "finetune steps": ["finetune", "model.pth", "data", "--steps", "0", "-o", "t.safetensors"],
    "finetune out": ["finetune", "model.pth", "data", "--r", "x", "-o", "t.safetensors"],
    "finetune suffix": ["finetune", "model.pth", "data", "-o", "t.pth"],
    "finetune folder": ["finetune", "data", "data", "-o", "t.safetensors"],  # a folder in: a folder out
    "finetune open_clip": ["finetune", "model.pth", "data", "--arch", "open_clip:ViT-B-32", "-o", "t.safetensors"],
    "calibrate-denoiser out": ["calibrate-denoiser", "data", "-o", "model.pth"],  # not a policy it wrote
    "help": ["--help"],
}
SAYS = {"export": "--tolerance", "demo": "--r", "sweep": "--r", "sweep modes": "unknown mode 'fuse'",
        "sweep zero-shot": "--data FOLDER", "schedule": "--r", "eval": "unknown mode 'fuse'",
        "eval batch": "--batch-size 32", "eval limit": "--limit 100",
        "eval prompt": "must hold {} once", "eval prompt alone": "it needs --zero-shot",
        "calibrate rule": "unknown mode rule 'coin'",
        "denoiser ratio": "ratio 2.0 is out of range", "denoiser sublayers": "unknown sub-layer attn",
        "calibrate-denoiser": "max_downsample must be >= 1", "calibrate clock": "unknown clock 'sundial'",
        "calibrate-denoiser clock": "unknown clock 'sundial'",
        "calibrate images": "--images",
        "calibrate budget": "--min-cosine", "calibrate precision": "calibrate measures FP32 graphs",
        "export calibration data": "--precision int8", "profile": "not an ONNX model",
        "clean-checkpoint": "name the file ema.safetensors",
        "clean-checkpoint folder": "takes one training checkpoint file", "finetune steps": "--steps must be at least 1",
        "finetune out": "--r", "finetune suffix": "written as .safetensors",
        "finetune folder": "written back as a folder", "finetune open_clip": "written back as a folder",
        "calibrate-denoiser out": "not a tofu-export denoiser policy",
        "help": ""}

def test_bad_options_are_refused_before_torch_is_imported(tmp_path: Path) -> None:
    (tmp_path / "model.pth").write_bytes(b"")  # never read: the options are refused first
    (tmp_path / "data").mkdir()
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07\x12\x05torch" + bytes(range(40)))
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    results = run_in_one_interpreter([(args, True) for args in COMMANDS.values()], tmp_path, env)
    assert len(results) == len(COMMANDS), results
    for name, result in zip(COMMANDS, results, strict=True):
        assert result.code == (0 if name == "help" else 2), (name, result.stderr)
        assert SAYS[name] in result.stderr and "Traceback" not in result.stderr, (name, result.stderr)
        assert not result.torch_loaded, f"{name}: torch was imported to refuse {COMMANDS[name]}"
    assert not any(tmp_path.joinpath(out).exists() for out in ("out", "demo_out", "sw", "p.json", "p.png", "report.md",
                                                            "ema.pth", "ema.json", "t.safetensors"))


def test_version_names_the_libraries_without_importing_them(tmp_path: Path) -> None:
    """``--version`` (for a bug report) answers from installed metadata, also where torch cannot be imported."""
    from tofu_export import __version__

    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    (result,) = run_in_one_interpreter([(["--version"], False)], tmp_path, env)
    assert result.code == 0 and not result.torch_loaded, result
    assert result.stdout.startswith(f"tofu-export {__version__} (Python "), result.stdout
    for library in ("torch ", "onnx ", "onnxruntime ", "timm ", "tensorrt "):  # a version or "not installed"
        assert library in result.stdout, (library, result.stdout)
