"""The ``tofu-export`` app: one small file per command, assembled here inside the error boundary."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from tofu_export.cli import calibrate, check, clean, demo, eval, export, finetune, profile, schedule, sweep
from tofu_export.cli.errors import guarded
from tofu_export.cli.groups import uses_groups

app = typer.Typer(
    name="tofu-export",
    help=(
        "Token Fusion (ToFu) for pretrained ViTs: patch a checkpoint (timm, transformers or open_clip; diffusion "
        "denoisers through the denoiser command), export a static-shape ONNX graph verified against PyTorch, and "
        "build ONNX Runtime / TensorRT artifacts.\n\n"
        "Examples:\n\n"
        "Export (the default command): tofu-export model.pth --r 16 --target trt\n\n"
        "Tokens and GFLOPs: tofu-export schedule deit_small_patch16_224 --r 16\n\n"
        "TensorRT verdict: tofu-export check artifacts/model-tofu-r16/model.onnx\n\n"
        "Latency: tofu-export profile artifacts/model-tofu-r16/model.onnx --batch 1,8\n\n"
        "Speed and fidelity: tofu-export sweep model.pth --r 0,8,16 --data images/\n\n"
        "What it costs: tofu-export eval model.pth images/ --r 16 (CLIP: --zero-shot)\n\n"
        "Your policy: tofu-export calibrate model.pth images/ --speedup 1.5\n\n"
        "Tuned to its reduction: tofu-export finetune model.pth images/ --r 24\n\n"
        "Exit codes: 0 success, 1 a check failed, 2 bad input, 3 ONNX written but no TensorRT engine built here, "
        "4 internal error, 130 interrupted. Add --debug anywhere for a traceback."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _print_version(asked: bool) -> None:
    """``--version``: this tool's version and those of the libraries an export depends on, from their installed
    metadata (nothing is imported: it answers in a fraction of a second), then exit."""
    if not asked:
        return
    import platform

    from tofu_export import __version__
    from tofu_export.artifacts import package_versions

    libraries = {name: version for name, version in package_versions().items() if name != "tofu-export"}
    listed = ", ".join(f"{name} {version or 'not installed'}" for name, version in libraries.items())
    typer.echo(f"tofu-export {__version__} (Python {platform.python_version()}; {listed})")
    raise typer.Exit()


@app.callback()
def _app_options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the versions of tofu-export and the libraries it exports "
                                               "with, then exit.")] = False,
) -> None:
    # no docstring: the app's help is the Typer(help=...) above
    pass


COMMANDS = {
    "export": export.export,
    "check": check.check,
    "schedule": schedule.schedule,
    "profile": profile.profile,
    "sweep": sweep.sweep,
    "eval": eval.eval_command,
    "demo": demo.demo,
    "calibrate": calibrate.calibrate,
    "clean-checkpoint": clean.clean_checkpoint,
    "finetune": finetune.finetune,
}
from tofu_export.cli import denoiser as _denoiser  # noqa: E402  (dense ToFu for diffusion denoisers)

COMMANDS |= {"denoiser": _denoiser.denoiser, "calibrate-denoiser": _denoiser.calibrate_denoiser}
for _name, _command in COMMANDS.items():
    app.command(_name)(guarded(uses_groups(_command)))


def main() -> None:
    """Entry point: `tofu-export model.pth ...` means `tofu-export export model.pth ...`; `--debug` anywhere shows
    tracebacks."""
    argv = sys.argv[1:]
    if "--debug" in argv:
        argv.remove("--debug")
        os.environ["TOFU_EXPORT_DEBUG"] = "1"
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "export")
    sys.argv[1:] = argv
    app()  # each command's boundary (errors.guarded) makes SIGTERM / SIGHUP clean up like Ctrl-C


if __name__ == "__main__":
    main()
