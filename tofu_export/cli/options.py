"""The option groups shared by the commands: each owns its flags and builds one library object.

To add an option every command that reduces tokens takes, add a field to ``ToFuOptions`` and pass it on in
``ToFuOptions.build``; the flag then appears (under its panel) on export, schedule, profile, eval and calibrate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tofu_export.cli.groups import option_group
from tofu_export.errors import Hint, UserError
from tofu_export.names import DEFAULT_EXPORTER, DEFAULT_SIMPLIFIER, MODES

JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
ExporterOption = Annotated[
    str, typer.Option("--exporter", help="dynamo (torch.export) | torchscript; see README for which is faster.")
]
OpsetOption = Annotated[
    int | None,
    typer.Option("--opset", help="ONNX opset: 17 (TensorRT 10, JetPack 6) or 16 (LayerNorm decomposed: also TensorRT "
                 "8.5, JetPack 5). Where a command takes --trt / --jetpack, the default follows them."),
]


def parse_int_list(text: str, setting: str) -> list[int]:
    """``"0,8,16"`` -> ``[0, 8, 16]``; anything else is a user error naming ``setting``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{setting} must be comma-separated integers, got {text!r}", hint=Hint(setting)) from None
    if not values:
        raise UserError(f"{setting} needs at least one value", hint=Hint(setting))
    return values


@option_group("Model")
class ModelOptions:
    arch: Annotated[
        str | None, typer.Option("--arch", help="timm architecture name (the model built, as named), transformers "
                                 "class (for a folder), or open_clip:NAME (an open_clip model config, or a config "
                                 "JSON file); inferred from the checkpoint when omitted.")
    ] = None
    num_heads: Annotated[
        int | None, typer.Option("--num-heads", help="States that the checkpoint is a timm ViT of plain pre-norm "
                                 "Blocks with this many attention heads (the weights cannot show either); needed "
                                 "where neither the file, a config.json / NAME.json beside it (for NAME.pth), nor "
                                 "--arch says.")
    ] = None
    img_size: Annotated[
        int | None, typer.Option("--img-size", help="Input resolution in pixels; default: the checkpoint's.")
    ] = None
    trust_pickle: Annotated[
        bool,
        typer.Option(
            "--trust-pickle",
            help="Allow checkpoints that contain pickled Python objects. Such files can run code when loaded: use "
            "only for files you trust (safetensors or plain state dicts never need this).",
        ),
    ] = False

    def load(self, source: str | Path, *, allow_timm_name: bool = True) -> Any:
        """The model as a ``LoadedModel``: a checkpoint file, or a timm name (random weights)."""
        from tofu_export.models.loading import load_model

        return load_model(source, arch=self.arch, img_size=self.img_size, trust_pickle=self.trust_pickle,
                          allow_timm_name=allow_timm_name, num_heads=self.num_heads)


@option_group("Token reduction")
class ToFuOptions:
    r: Annotated[
        str, typer.Option("--r", "-r", help="Tokens removed per block: an int (16), or one per block (16,16,8,...).")
    ] = "16"
    schedule: Annotated[
        str,
        typer.Option("--schedule", help="'constant' (r in every block) or 'decreasing' (2r first block down to 0, "
                     "ToMe-style)."),
    ] = "constant"
    mode: Annotated[
        str,
        typer.Option("--mode", "-m", help=f"One of {', '.join(MODES)}. tofu merges with MLERP and prunes in the first "
                     "--prune-layers blocks; tome averages; prune drops; mlerp merges everywhere."),
    ] = "tofu"
    prune_layers: Annotated[
        int | None,
        typer.Option("--prune-layers", help="tofu: leading blocks that prune instead of merging (the speed knob) "
                     "[default: 0: on DINOv2, MLERP everywhere kept ToMe's fidelity and pruning even one block fell "
                     "behind (README); `tofu-export calibrate` measures the choice on your model]."),
    ] = None
    prop_attn: Annotated[
        bool, typer.Option("--prop-attn/--no-prop-attn", help="Proportional attention (off for MAE-style fine-tuning).")
    ] = True
    policy: Annotated[
        Path | None,
        typer.Option("--policy", help="A policy.json from `tofu-export calibrate`: per-block modes and r measured on "
                     "your model; replaces --r, --mode and --prune-layers."),
    ] = None

    def r_spec(self) -> Any:
        """``--r`` and ``--schedule`` as the library's r: an int, a per-block list, or ToMe's (r, -1.0)."""
        values = parse_int_list(self.r, "r")
        if self.schedule not in ("constant", "decreasing"):
            raise UserError(f"the schedule must be 'constant' or 'decreasing', got {self.schedule!r}",
                            hint=Hint("schedule", "constant"))
        if len(values) > 1:
            return values
        return (values[0], -1.0) if self.schedule == "decreasing" else values[0]

    def build(self, img_size: int | None = None) -> Any:
        """The ``ToFuConfig`` these flags describe."""
        from tofu_export.config import ToFuConfig

        policy = None
        if self.policy is not None:
            from tofu_export.policy import Policy

            policy = Policy.load(self.policy)
        return ToFuConfig(r=self.r_spec(), mode=self.mode, prune_layers=self.prune_layers, prop_attn=self.prop_attn,
                          img_size=img_size, policy=policy)

    @property
    def label(self) -> str:
        """For default output names: ``tofu-r16``, ``policy``."""
        return "policy" if self.policy is not None else f"{self.mode}-r{self.r.replace(',', '_')}"


@option_group("ONNX")
class OnnxOptions:
    opset: OpsetOption = None
    simplify: Annotated[bool, typer.Option("--simplify/--no-simplify", help="Simplify (see --simplifier).")] = True
    simplifier: Annotated[
        str, typer.Option("--simplifier", help="onnxslim (pure Python, installs on Jetson) | onnxsim | none.")
    ] = DEFAULT_SIMPLIFIER
    precision: Annotated[
        str, typer.Option("--precision", help="fp32 | fp16 (FP16 graph) | int8 (Q/DQ, calibrated on --data images).")
    ] = "fp32"
    tolerance: Annotated[
        float, typer.Option("--tolerance", help="Max |ONNX - PyTorch| allowed, relative to the output scale.")
    ] = 1e-4
    exporter: ExporterOption = DEFAULT_EXPORTER
    calibration_data: Annotated[
        Path | None,
        typer.Option("--calibration-data", help="With --precision int8: images to calibrate on (a folder, flat or in "
                     "class folders; up to 32 used). export defaults to its --data; without either, synthetic "
                     "images, with a note."),
    ] = None

    def build(self, data: Path | None = None) -> Any:
        """The ``OnnxConfig``. An INT8 graph calibrates on ``--calibration-data``, else on ``data`` (the command's
        own image folder, where it has one: export's ``--data``)."""
        from tofu_export.config import OnnxConfig

        if self.calibration_data is not None and self.precision != "int8":
            raise UserError("--calibration-data calibrates an INT8 graph: it needs --precision int8",
                            hint=Hint("precision", "int8"))
        calibration = self.calibration_data or (data if self.precision == "int8" else None)
        return OnnxConfig(opset=self.opset, simplify=self.simplify, tolerance=self.tolerance, exporter=self.exporter,
                          precision=self.precision, simplifier=self.simplifier,  # type: ignore[arg-type]
                          calibration_data=calibration)


@option_group("TensorRT")
class TrtOptions:
    fp16: Annotated[bool, typer.Option("--fp16", help="Build an FP16 engine (with --target trt).")] = False
    min_batch: Annotated[int, typer.Option("--min-batch", help="Engine profile: smallest batch.")] = 1
    opt_batch: Annotated[int, typer.Option("--opt-batch", help="Engine profile: batch to tune for.")] = 1
    max_batch: Annotated[int, typer.Option("--max-batch", help="Engine profile: largest batch.")] = 8
    workspace_gib: Annotated[float, typer.Option("--workspace-gib", help="Builder workspace (GiB).")] = 2.0
    trt: Annotated[
        list[str] | None,
        typer.Option("--trt", help="TensorRT release(s) the artifact must build on: 10 (JetPack 6) [default], 8.5 "
                     "(JetPack 5), or both; the opset follows."),
    ] = None
    jetpack: Annotated[
        list[str] | None, typer.Option("--jetpack", help="The same by JetPack release: 6 (TensorRT 10), 5 (8.5).")
    ] = None

    def build(self) -> Any:
        from tofu_export.config import TrtConfig
        from tofu_export.tensorrt.targets import resolve_targets

        return TrtConfig(fp16=self.fp16, min_batch=self.min_batch, opt_batch=self.opt_batch, max_batch=self.max_batch,
                         workspace_gib=self.workspace_gib, targets=resolve_targets(self.trt or (), self.jetpack or ()))


@option_group("Runtime")
class RuntimeOptions:
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads (ORT intra-op / torch).")] = None
    spin: Annotated[
        bool,
        typer.Option("--spin/--no-spin", help="ORT CPU worker threads busy-wait between ops (ORT's default, fastest "
                     "on an idle machine). --no-spin gives steadier timings on shared or virtual machines."),
    ] = True

    def check(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise UserError(f"threads must be at least 1, got {self.threads}", hint=Hint("threads", "1"))


@option_group("Backend")
class BackendOptions:
    backend: Annotated[
        str | None,
        typer.Option("--backend", help="Where to time: ort (ONNX Runtime CPU) | ort-cuda | ort-trt (ORT's TensorRT "
                     "provider) | trt (a TensorRT engine) | torch [default: profile: from the file type; sweep: ort]."),
    ] = None
    device: Annotated[str, typer.Option("--device", help="PyTorch's device, with --backend torch: cpu | cuda.")] = "cpu"
    cuda_graphs: Annotated[bool, typer.Option(
        "--cuda-graphs", help="With --backend torch --device cuda: time each batch size as one captured CUDA graph, "
        "replayed (the GPU's time without Python's launch cost per kernel; the breakdown stays eager)."
    )] = False

    def build(self, path: str | Path | None = None) -> Any:
        """The ``jobs.profile.Backend`` (``path``: the file whose type picks it when no backend is given)."""
        from tofu_export.jobs.profile import parse_backend

        return parse_backend(self.backend, self.device, path, self.cuda_graphs)


@option_group("Zero-shot")
class ZeroShotOptions:
    zero_shot: Annotated[
        bool, typer.Option("--zero-shot", help="Classify with the checkpoint's text tower (CLIP, SigLIP: an open_clip "
                           "checkpoint, a transformers CLIPModel / SiglipModel folder): each class named in the "
                           "prompts, an image's class the nearest by cosine; top-1/top-5 instead of the cosine to "
                           "the unreduced embeddings.")
    ] = False
    prompt: Annotated[
        list[str] | None,
        typer.Option("--prompt", metavar="TEMPLATE", help="With --zero-shot: a prompt, {} where the class name goes; "
                     "repeat it for CLIP's prompt ensemble; open_clip:imagenet is CLIP's 80 ImageNet prompts "
                     "(open_clip:imagenet-simple: 7 of them). [default: \"a photo of a {}.\"]"),
    ] = None
    class_names: Annotated[
        Path | None,
        typer.Option("--class-names", metavar="FILE", help="With --zero-shot: the class names in index order (a JSON "
                     "list, a JSON object keyed 0..K-1, or one name a line; open_clip:imagenet is CLIP's names of "
                     "ImageNet's 1,000 classes) [default: labels.json in the image folder, else its class folders' "
                     "names]."),
    ] = None

    def build(self) -> Any:
        """The ``class_names.ZeroShot`` (checked before torch loads), or None without ``--zero-shot``; its other
        options alone are refused."""
        from tofu_export.class_names import DEFAULT_PROMPT, ZeroShot

        if not self.zero_shot:
            named = [flag for flag, value in (("--prompt", self.prompt), ("--class-names", self.class_names)) if value]
            if named:
                them = "them" if len(named) > 1 else "it"
                raise UserError(f"{' and '.join(named)} {'set' if len(named) > 1 else 'sets'} how --zero-shot "
                                "classifies: it needs --zero-shot",
                                hint=Hint("zero_shot", None, f"or leave {them} out"))
            return None
        return ZeroShot(tuple(self.prompt) if self.prompt else (DEFAULT_PROMPT,), self.class_names)
