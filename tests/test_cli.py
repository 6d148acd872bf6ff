"""End-to-end tests of the ``tofu-export`` command line, run as processes of their own on real checkpoint files.

Every command runs in a process of its own with its own argv, working folder, environment and standard streams: a
child forked from one server that imported the package once (``commands.ForkServer``: a fresh interpreter would
spend ~8 CPU-seconds importing torch and the exporters, more than a tiny export takes). ``--help`` runs as
``python -m tofu_export.cli`` in a fresh interpreter and once as the ``tofu-export`` console script. The commands
that do not depend on each other run together, two at a time, in two module-scoped waves; each test then inspects
the result of its own command. No command has a wall-clock timeout a busy machine could hit: each may use
``commands.CPU_LIMIT_S`` CPU-seconds, and a hang guard runs on a load-adjusted clock. The quick looks time for
``--look-seconds 0`` (their minimum of 7 rounds): what they report is checked, not how long they ran. The model is a
random-init ``deit_tiny_patch16_224`` with 2 blocks at 64 px: 16 patches plus the class token, so one matching step
removes at most 8 tokens.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch
from commands import Finished, ForkServer, run_guarded
from onnx import TensorProto, helper
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

import tofu_export
from tofu_export.accounting import token_schedule
from tofu_export.cli import app
from tofu_export.profiling.timing import format_ms

ARCH, PATCH, IMG, DEPTH, R = "deit_tiny_patch16_224", 16, 64, 2, 2
TOKENS = (IMG // PATCH) ** 2 + 1  # patches + class token entering block 0
MAX_R = (TOKENS - 1) // 2  # one bipartite matching step removes at most half the non-protected tokens
CLI = (sys.executable, "-m", "tofu_export.cli")
PARALLEL = 2  # concurrent commands: one per core of a 2-core machine (no imports left to overlap)
LOOK = ("--look-seconds", "0")  # the quick look's minimum: 7 interleaved rounds
FRESH = ("help", "console_help")  # run in a fresh interpreter, not a forked child
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
pytestmark = [pytest.mark.slow,  # end to end: two waves of real exports, sweeps and checks (kept in `make test`)
              pytest.mark.usefixtures("shared_traces")]  # the in-process demo shares the forked exports' traces
CONSOLE_SCRIPT = shutil.which("tofu-export")
SUBCOMMANDS = ("export", "check", "schedule", "profile", "sweep", "eval", "demo", "clean-checkpoint", "finetune")
FAILURES = ("truncated", "code_os_system", "code_exec", "wrong_arch", "impossible_r", "exists_no_force", "resnet",
            "parity_fail")


def _cli_env() -> dict[str, str]:
    """Plain, wide, single-threaded-torch output: no colour codes and no wrapped error lines."""
    env = {key: value for key, value in os.environ.items() if key != "FORCE_COLOR"}
    return {**env, "NO_COLOR": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Run:
    """One finished CLI invocation."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @classmethod
    def of(cls, args: Sequence[str | Path], done: Finished) -> Run:
        return cls(tuple(str(arg) for arg in args), done.returncode, done.stdout, done.stderr)

    @property
    def error(self) -> str:
        """The message after ``error:`` on stderr, or '' when the command printed none."""
        _, found, message = self.stderr.partition("error:")
        return message.strip() if found else ""

    @property
    def error_paragraph(self) -> str:
        """The first line of the error: the one paragraph that must name the problem and the fix."""
        return self.error.split("\n", 1)[0]

    def __str__(self) -> str:
        return (
            f"$ {shlex.join(self.args)}\n-> exit {self.returncode}\n"
            f"stdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}"
        )


def _run(args: Sequence[str | Path], cwd: Path) -> Run:
    """``args`` in a fresh interpreter (or the console script), under ``commands``' CPU limit and hang guard."""
    return Run.of(args, run_guarded(args, cwd, _cli_env()))


def _run_all(server: ForkServer, commands: Mapping[str, Sequence[str | Path]], cwd: Path) -> dict[str, Run]:
    """Run every command in ``cwd``: those named in ``FRESH`` in a fresh interpreter, the rest as children of the
    fork server (``PARALLEL`` at a time, ``CLI`` stripped); results keyed like ``commands``."""
    fresh = {name: args for name, args in commands.items() if name in FRESH}
    forked = {name: ([str(arg) for arg in args[len(CLI):]] if tuple(args[:len(CLI)]) == CLI else args, cwd)
              for name, args in commands.items() if name not in FRESH}
    with ThreadPoolExecutor(max_workers=1) as pool:
        futures = {name: pool.submit(_run, args, cwd) for name, args in fresh.items()}
        done = server.run_all(forked, parallel=PARALLEL)
        runs = {name: Run.of(commands[name], result) for name, result in done.items()}
        return {name: runs[name] if name in runs else futures[name].result() for name in commands}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(root: Path) -> list[Path]:
    """Staging (``.NAME.partial-*``) or trash (``.NAME.old-*``) folders left anywhere under ``root``."""
    if not root.exists():
        return []
    return [path for path in root.rglob(".*") if ".partial-" in path.name or ".old-" in path.name]


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}


def _ort_logits(onnx_path: Path, images: np.ndarray) -> np.ndarray:
    """``[B, num_classes]`` logits of ``images`` ``[B, 3, H, W]`` from ONNX Runtime on CPU."""
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def _images(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, 3, IMG, IMG)).astype(np.float32)


@dataclass(frozen=True)
class _RunsOnLoad:
    """Pickles to ``call(*args)``: unpickling runs the call, which is what a malicious checkpoint does."""

    call: Callable[..., Any]
    args: tuple[Any, ...]

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return self.call, self.args


def _scatter_add_onnx(path: Path) -> Path:
    """A one-node graph: ``ScatterElements(reduction="add")``, which TensorRT builds only with a plugin."""
    node = helper.make_node("ScatterElements", ["data", "indices", "updates"], ["out"], axis=0, reduction="add",
                            name="scatter_add")
    graph = helper.make_graph(
        [node], "scatter_add",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [4, 3]),
         helper.make_tensor_value_info("indices", TensorProto.INT64, [2, 3]),
         helper.make_tensor_value_info("updates", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# ----------------------------------------------------------------------------------------------------
# Files and the two waves of commands
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working directory of every command (the headline export writes its default ``artifacts/`` here)."""
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def server(work: Path) -> Iterator[ForkServer]:
    """The fork server every forked command of this module runs under."""
    forks = ForkServer(_cli_env(), work / "streams")
    yield forks
    forks.close()


@pytest.fixture(scope="module")
def files(work: Path) -> dict[str, Path]:
    """Checkpoints in every supported format (same weights), broken ones, and a marker path per code pickle."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, depth=DEPTH, img_size=IMG).eval()
    state_dict = model.state_dict()
    paths = {name: work / "inputs" / name for name in (
        "model.pth", "model_key.pth", "ddp_state_dict.pt", "model.safetensors", "truncated.pth",
        "code_os_system.pth", "code_exec.pth", "resnet.pth", "scatter_add.onnx")}
    paths["model.pth"].parent.mkdir()
    torch.save(state_dict, paths["model.pth"])
    _hub_config(paths["model.pth"].parent)  # the head count and block kind, as a hub download states them
    torch.save({"model": state_dict, "epoch": 3}, paths["model_key.pth"])
    ddp = {f"module.{key}": value for key, value in state_dict.items()}
    torch.save({"state_dict": ddp}, paths["ddp_state_dict.pt"])
    save_file(state_dict, str(paths["model.safetensors"]))
    good = paths["model.pth"].read_bytes()
    paths["truncated.pth"].write_bytes(good[: len(good) // 2])
    paths["marker_os_system"], paths["marker_exec"] = work / "ran-os-system", work / "ran-exec"
    shell_touch = _RunsOnLoad(os.system, (f"touch {shlex.quote(str(paths['marker_os_system']))}",))
    python_touch = _RunsOnLoad(builtins.exec, (f"open({str(paths['marker_exec'])!r}, 'w').close()",))
    torch.save({"model": state_dict, "hook": shell_touch}, paths["code_os_system.pth"])
    torch.save({"model": state_dict, "hook": python_touch}, paths["code_exec.pth"])
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=10).state_dict(), paths["resnet.pth"])
    _scatter_add_onnx(paths["scatter_add.onnx"])
    paths["images"] = work / "inputs" / "images"
    for index in range(6):  # the quick look's images: noise, in class folders
        folder = paths["images"] / f"{index % 2:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(index).integers(0, 255, (80, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
    return paths


def _hub_config(folder: Path) -> None:
    """timm's ``config.json`` for the checkpoints in ``folder``: the architecture states heads and block kind."""
    (folder / "config.json").write_text(json.dumps({"architecture": ARCH, "model_args": {"depth": DEPTH}}))


def _out(work: Path, name: str) -> Path:
    """Artifact folder of the run ``name``, alone in its own parent so leftovers are easy to spot."""
    return work / "out" / name / "artifact"


@pytest.fixture(scope="module")
def first(work: Path, files: dict[str, Path], server: ForkServer) -> dict[str, Run]:
    """Every command that needs only the input files."""
    for name in ("exists_no_force", "force"):
        _out(work, name).mkdir(parents=True)
        (_out(work, name) / "manifest.json").write_text('{"tool": "tofu-export"}')  # an earlier export's folder
    # a file the manifest does not list: without --force the folder is left alone (with it, refused: test_bad_input)
    (_out(work, "exists_no_force") / "keep.txt").write_text("written before the export")

    def export(checkpoint: str, name: str, *extra: str) -> list[str | Path]:
        return [*CLI, "export", files[checkpoint], "--r", str(R), "-o", _out(work, name), *extra]

    commands: dict[str, Sequence[str | Path]] = {  # longest first, so the pool does not end on a long one
        "sweep": [*CLI, "sweep", files["model.pth"], "--r", f"0,{R}", "--modes", "tome,tofu", "--iters", "3",
                  "-o", work / "sweep"],
        "ort_json": export("model.pth", "ort_json", "--target", "ort", "--json", "--data", files["images"], *LOOK),
        "summary": export("model.pth", "summary", *LOOK),
        "jetpack5": export("model.pth", "jetpack5", "--jetpack", "5", "--no-bench"),
        "model_key": export("model_key.pth", "model_key", "--no-bench"),
        "ddp_state_dict": export("ddp_state_dict.pt", "ddp_state_dict", "--no-bench"),
        "safetensors": export("model.safetensors", "safetensors", "--no-bench"),
        "force": export("model.pth", "force", "--force", "--no-bench"),
        # the headline form, without the word `export`, writing to its default folder artifacts/model-tofu-r2-trt
        **({} if HAS_TENSORRT else {
            "headline_trt": [*CLI, files["model.pth"].relative_to(work), "--r", str(R), "--target", "trt",
                             *LOOK]}),
        "truncated": export("truncated.pth", "truncated"),
        "code_os_system": export("code_os_system.pth", "code_os_system"),
        "code_exec": export("code_exec.pth", "code_exec"),
        "wrong_arch": export("model.pth", "wrong_arch", "--arch", "deit_small_patch16_224"),
        "impossible_r": [*CLI, "export", files["model.pth"], "--r", "50", "-o", _out(work, "impossible_r")],
        "exists_no_force": export("model.pth", "exists_no_force"),
        "resnet": export("resnet.pth", "resnet"),
        "parity_fail": export("model.pth", "parity_fail", "--tolerance", "1e-12"),
        "schedule": [*CLI, "schedule", "deit_small_patch16_224", "--r", "16", "--json"],
        "check_scatter": [*CLI, "check", files["scatter_add.onnx"]],
        "check_scatter_json": [*CLI, "check", files["scatter_add.onnx"], "--json"],
        "help": [*CLI, "--help"],
    }
    if CONSOLE_SCRIPT is not None:
        commands["console_help"] = [CONSOLE_SCRIPT, "--help"]
    return _run_all(server, commands, work)


@dataclass(frozen=True)
class SecondWave:
    runs: dict[str, Run]
    sweep_mtimes_before: dict[str, int]


@pytest.fixture(scope="module")
def second(work: Path, files: dict[str, Path], first: dict[str, Run], server: ForkServer) -> SecondWave:
    """Commands on the first wave's outputs: check and profile the exported graph, rerun the sweep."""
    model = _out(work, "ort_json") / "model.onnx"
    before = _mtimes(work / "sweep" / "artifacts")
    runs = _run_all(server, {
        "check_good": [*CLI, "check", model, "--trt", "10"],
        "profile": [*CLI, "profile", model, "--batch", "1", "--iters", "5", "--warmup", "1", "--json"],
        "profile_images": [*CLI, "profile", model, "--batch", "1,4", "--iters", "2", "--warmup", "1", "--json",
                           "--no-breakdown", "--data", files["images"]],
        "sweep_again": [*CLI, "sweep", files["model.pth"], "--r", f"0,{R}", "--modes", "tome,tofu", "--iters", "3",
                        "-o", work / "sweep"],
    }, work)
    return SecondWave(runs, before)


def _assert_user_error(run: Run, out: Path, problem: str, fix: str) -> None:
    """Exit 2, no traceback, one paragraph with ``problem`` and ``fix``, and nothing left where it would write."""
    assert run.returncode == 2, run
    assert "Traceback" not in run.stderr, run
    assert problem.lower() in run.error_paragraph.lower(), run
    assert fix in run.error_paragraph, run
    assert not out.exists(), run
    assert not _leftovers(out.parent), run


# ----------------------------------------------------------------------------------------------------
# 1. good checkpoints, manifest, JSON, ONNX Runtime
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("run_name", "checkpoint"), [
    ("ort_json", "model.pth"), ("model_key", "model_key.pth"), ("ddp_state_dict", "ddp_state_dict.pt"),
    ("safetensors", "model.safetensors"),
])
def test_export_accepts_every_checkpoint_format(
    work: Path, files: dict[str, Path], first: dict[str, Run], run_name: str, checkpoint: str
) -> None:
    run, out = first[run_name], _out(work, run_name)
    assert run.returncode == 0, run
    assert {"model.onnx", "manifest.json"} <= {path.name for path in out.iterdir()}, run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"]["sha256"] == _sha256(files[checkpoint])
    assert manifest["arch"]["name"] == ARCH
    assert not _leftovers(out.parent)


@pytest.mark.parametrize("run_name", ["model_key", "ddp_state_dict", "safetensors"])
def test_every_format_exports_the_same_weights(work: Path, first: dict[str, Run], run_name: str) -> None:
    """Same weights in, same logits out: a loader that dropped keys would leave timm's random init in place."""
    images = _images(2)
    reference = _ort_logits(_out(work, "ort_json") / "model.onnx", images)
    np.testing.assert_allclose(_ort_logits(_out(work, run_name) / "model.onnx", images), reference, atol=1e-5)


def test_manifest_describes_the_export(work: Path, files: dict[str, Path], first: dict[str, Run]) -> None:
    assert first["ort_json"].returncode == 0, first["ort_json"]
    out = _out(work, "ort_json")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"]["sha256"] == _sha256(files["model.pth"])
    assert manifest["arch"]["name"] == ARCH
    assert manifest["tofu"]["mode"] == "tofu"
    assert manifest["tofu"]["r"] == [R] * DEPTH
    assert manifest["tofu"]["tokens"] == [TOKENS - R * block for block in range(DEPTH)]
    gflops = manifest["gflops"]  # the library's count for this architecture and schedule, passed through exactly
    model = timm.create_model(ARCH, pretrained=False, depth=DEPTH, img_size=IMG)
    expected = token_schedule(tofu_export.patch(model, r=R, img_size=IMG), IMG)
    assert (gflops["original"], gflops["tofu"]) == (expected.gflops_original, expected.gflops_reduced)
    assert expected.gflops_reduced < expected.gflops_original
    assert gflops["ratio"] == pytest.approx(gflops["original"] / gflops["tofu"])
    assert manifest["onnx"]["opset"] == 17
    parity = manifest["onnx"]["parity"]
    assert parity["max_abs_diff"] <= 1e-4
    assert parity["top1_agreement"] == 1.0
    assert set(manifest["tensorrt_check"]["per_target"]) == {"8.5", "10"}
    assert manifest["tensorrt_check"]["per_target"]["10"] is True
    versions = manifest["versions"]
    assert versions["torch"] == torch.__version__.split("+")[0]
    assert versions["timm"] == timm.__version__
    assert versions["onnxruntime"] == onnxruntime.__version__
    assert versions["onnxscript"] == importlib.metadata.version("onnxscript")  # the dynamo exporter's translations
    listed = {entry["name"]: entry["sha256"] for entry in manifest["files"]}
    assert listed["model.onnx"] == _sha256(out / "model.onnx")


def test_json_flag_prints_the_manifest_on_stdout(work: Path, first: dict[str, Run]) -> None:
    run = first["ort_json"]
    printed = json.loads(run.stdout)
    on_disk = json.loads((_out(work, "ort_json") / "manifest.json").read_text())
    assert Path(printed["out_dir"]) == _out(work, "ort_json")
    assert printed["engine_error"] is None
    assert printed["input"] == on_disk["input"]
    assert printed["tofu"] == on_disk["tofu"]


def test_exported_onnx_runs_at_batch_1_and_3(work: Path, first: dict[str, Run]) -> None:
    model = _out(work, "ort_json") / "model.onnx"
    three = _images(3)
    logits3 = _ort_logits(model, three)
    logits1 = _ort_logits(model, three[:1])
    assert logits3.shape == (3, 1000)
    assert np.isfinite(logits3).all()
    np.testing.assert_allclose(logits1[0], logits3[0], atol=1e-5)  # images do not leak across the batch
    assert not np.allclose(logits3[0], logits3[1])


# ----------------------------------------------------------------------------------------------------
# 2-3. targets
# ----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is importable here, so --target trt would try to build an engine")
def test_headline_trt_without_tensorrt_keeps_onnx_and_prints_trtexec(work: Path, first: dict[str, Run]) -> None:
    run, out = first["headline_trt"], work / "artifacts" / "model-tofu-r2-trt"  # the target in the name
    assert run.returncode == 3, run
    assert ".partial-" not in run.stderr, run
    trtexec = [line.strip() for line in run.stderr.splitlines() if line.strip().startswith("trtexec ")]
    assert len(trtexec) == 1, run
    assert f"--onnx={out / 'model.onnx'} " in trtexec[0]
    assert f"--saveEngine={out / 'model.engine'} " in trtexec[0]
    folder = out
    assert sorted(path.name for path in folder.iterdir()) == ["manifest.json", "model.onnx", "report.md", "report.png"]
    tensorrt = json.loads((folder / "manifest.json").read_text())["tensorrt"]
    assert tensorrt["file"] is None
    assert tensorrt["trtexec"] == trtexec[0]
    assert not _leftovers(work / "artifacts")


def test_target_ort_writes_an_optimised_model_and_its_latency(work: Path, first: dict[str, Run]) -> None:
    out = _out(work, "ort_json")
    assert (out / "model.ort.onnx").is_file()
    ort = json.loads((out / "manifest.json").read_text())["ort"]
    assert ort["file"] == "model.ort.onnx"
    images = _images(1)
    np.testing.assert_allclose(_ort_logits(out / "model.ort.onnx", images), _ort_logits(out / "model.onnx", images),
                               atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# 1b. the quick look (baseline vs ToFu), report.md and the TensorRT targets
# ----------------------------------------------------------------------------------------------------


def test_json_carries_the_quick_look(work: Path, first: dict[str, Run]) -> None:
    printed = json.loads(first["ort_json"].stdout)
    quick = printed["quick_look"]
    assert quick == json.loads((_out(work, "ort_json") / "manifest.json").read_text())["quick_look"]
    assert quick["label"] == "quick look on this machine, not a benchmark"
    latency = quick["latency"]
    assert latency["speedup_per_round"]["p10"] <= latency["speedup"] <= latency["speedup_per_round"]["p90"]
    assert latency["baseline"]["rounds"] == latency["tofu"]["rounds"] == 7  # --look-seconds 0: the minimum
    assert latency["timed_on"] == "the first image"  # of --data's, not noise
    assert quick["gflops"] == {"baseline": printed["gflops"]["original"], "tofu": printed["gflops"]["tofu"]}
    fidelity = quick["fidelity"]
    assert fidelity["images"] == 6
    assert fidelity["cosine_min"] <= fidelity["cosine_mean"] <= 1.0
    assert 0.0 <= fidelity["top1_agreement"] <= 1.0  # deit_tiny has a 1000-class head


def test_summary_shows_baseline_and_tofu_side_by_side(work: Path, first: dict[str, Run]) -> None:
    run = first["summary"]
    assert run.returncode == 0, run
    manifest = json.loads((_out(work, "summary") / "manifest.json").read_text())
    latency = manifest["quick_look"]["latency"]
    assert "quick look on this machine, not a benchmark" in run.stdout
    assert f"{format_ms(latency['baseline']['p50_ms'])} ms" in run.stdout  # two decimals under 10 ms
    assert f"{format_ms(latency['tofu']['p50_ms'])} ms" in run.stdout
    assert f"{latency['speedup']:.2f}x" in run.stdout
    assert latency["timed_on"] == "seeded normal noise"
    assert "batch 1 on seeded normal noise" in " ".join(run.stdout.split())  # the caption says it, however wrapped
    assert "builds on TensorRT 10 (JetPack 6) (opset 17)" in run.stdout
    assert "FAIL" not in run.stdout
    assert "note: for TensorRT 8.5 (JetPack 5), export with --trt 8.5 (or --jetpack 5)" in run.stdout
    assert "pass --data DIR" in run.stdout  # no images were given
    assert manifest["tensorrt_check"]["build_for"] == ["10"]


def test_report_names_the_files_the_verdicts_and_the_figures(work: Path, first: dict[str, Run]) -> None:
    folder = _out(work, "summary")
    report = (folder / "report.md").read_text()
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in [entry["name"] for entry in manifest["files"]] + ["manifest.json"]:
        assert f"- `{name}`" in report
    assert "| TensorRT 10 (JetPack 6) | yes | yes |" in report
    assert "| TensorRT 8.5 (JetPack 5) | no: LayerNormalization" in report
    assert f"--trt 8.5 -o {folder}-trt8.5" in report
    assert f"{manifest['quick_look']['latency']['speedup']:.2f}x" in report
    assert manifest["command"] in report
    with Image.open(folder / "report.png") as plot:
        assert plot.format == "PNG" and plot.width > 600


def test_jetpack5_exports_opset16_and_no_bench_skips_the_quick_look(work: Path, first: dict[str, Run]) -> None:
    run = first["jetpack5"]
    assert run.returncode == 0, run
    folder = _out(work, "jetpack5")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["onnx"]["opset"] == 16
    assert manifest["tensorrt_check"]["per_target"] == {"8.5": True, "10": True}
    assert manifest["tensorrt_check"]["build_for"] == ["8.5"]
    assert "quick_look" not in manifest
    assert "quick look" not in run.stdout and "note:" not in run.stdout
    assert "builds on TensorRT 8.5 (JetPack 5), TensorRT 10 (JetPack 6) (opset 16)" in run.stdout
    assert "Not run for this export" in (folder / "report.md").read_text()


def test_demo_compares_outputs_on_foolbox_images(
    tmp_path: Path, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process, on the tiny checkpoint instead of DINOv2 (the real demo takes about a minute)."""
    from tofu_export.jobs import demo

    if demo.demo_images().data is None:
        pytest.skip("foolbox (the `data` extra) is not installed")
    monkeypatch.setattr(demo, "default_checkpoint", lambda: (files["model.pth"], "the test's tiny deit"))
    result = CliRunner().invoke(app, ["demo", "--r", str(R), "--out", str(tmp_path / "demo"), "--json", *LOOK],
                                env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    quick = json.loads(result.stdout[result.stdout.index("{"):])["quick_look"]
    assert quick["fidelity"]["images"] == 20 and quick["fidelity"]["name"] == demo.FOOLBOX_NAME
    assert quick["fidelity"]["top1_agreement"] is not None
    latency = quick["latency"]
    assert latency["speedup_per_round"]["p10"] <= latency["speedup"] <= latency["speedup_per_round"]["p90"]
    assert latency["baseline"]["rounds"] == latency["tofu"]["rounds"] == 7  # --look-seconds 0: the minimum
    assert latency["timed_on"] == "the first image"  # of --data's, not noise
    assert (tmp_path / "demo" / "report.md").is_file() and (tmp_path / "demo" / "model.ort.onnx").is_file()


# ----------------------------------------------------------------------------------------------------
# 4-9. user errors: exit 2, one actionable paragraph, nothing written
# ----------------------------------------------------------------------------------------------------


def test_truncated_checkpoint(work: Path, files: dict[str, Path], first: dict[str, Run]) -> None:
    run = first["truncated"]
    _assert_user_error(run, _out(work, "truncated"), "truncated", "save it again")
    assert str(files["truncated.pth"]) in run.error_paragraph


@pytest.mark.parametrize("name", ["code_os_system", "code_exec"])
def test_code_in_a_pickle_never_runs(work: Path, files: dict[str, Path], first: dict[str, Run], name: str) -> None:
    run = first[name]
    assert run.returncode == 2, run
    assert not files[name.replace("code_", "marker_")].exists(), "loading the checkpoint ran the code inside it"
    assert not _out(work, name).exists()


@pytest.mark.parametrize("name", ["code_os_system", "code_exec"])
def test_code_in_a_pickle_is_refused_with_trust_pickle_advice(
    work: Path, files: dict[str, Path], first: dict[str, Run], name: str
) -> None:
    run = first[name]
    _assert_user_error(run, _out(work, name), "could execute arbitrary code", "--trust-pickle")
    assert str(files[f"{name}.pth"]) in run.error_paragraph


def test_wrong_arch_names_the_mismatch_and_the_right_arch(work: Path, first: dict[str, Run]) -> None:
    run = first["wrong_arch"]
    _assert_user_error(run, _out(work, "wrong_arch"), "shape mismatch", f"--arch {ARCH}")
    assert "patch_embed.proj.weight: model expects [384, 3, 16, 16], checkpoint has [192, 3, 16, 16]" in run.error


def test_impossible_r_names_the_largest_possible(work: Path, first: dict[str, Run]) -> None:
    run = first["impossible_r"]
    _assert_user_error(run, _out(work, "impossible_r"), "r=50 is impossible", f"--r {MAX_R} or less")
    assert f"receives {TOKENS} tokens" in run.error_paragraph


def test_existing_output_is_left_untouched_without_force(work: Path, first: dict[str, Run]) -> None:
    run, out = first["exists_no_force"], _out(work, "exists_no_force")
    assert run.returncode == 2, run
    assert "already exists" in run.error_paragraph and "--force" in run.error_paragraph, run
    assert sorted(path.name for path in out.iterdir()) == ["keep.txt", "manifest.json"]
    assert (out / "keep.txt").read_text() == "written before the export"
    assert not _leftovers(out.parent)


def test_force_replaces_an_existing_output(work: Path, first: dict[str, Run]) -> None:
    run, out = first["force"], _out(work, "force")
    assert run.returncode == 0, run
    assert sorted(path.name for path in out.iterdir()) == ["manifest.json", "model.onnx", "report.md", "report.png"]
    assert not _leftovers(out.parent)


def test_non_vit_checkpoint_is_rejected(work: Path, first: dict[str, Run]) -> None:
    _assert_user_error(first["resnet"], _out(work, "resnet"), "not a timm VisionTransformer checkpoint",
                       "convert weights")


def test_failed_parity_leaves_no_staging_folder(work: Path, first: dict[str, Run]) -> None:
    """The one failure here that happens after the staging folder was created and model.onnx was written."""
    run, out = first["parity_fail"], _out(work, "parity_fail")
    assert run.returncode == 2, run
    assert "disagrees with the FP32 PyTorch model" in run.error_paragraph, run
    assert not out.exists()
    assert not out.parent.exists()  # the staging folder was created here, and removed with the folder made for it


@pytest.mark.parametrize("name", FAILURES)
def test_user_errors_are_one_red_line_not_a_traceback(first: dict[str, Run], name: str) -> None:
    run = first[name]
    assert "Traceback" not in run.stderr, run
    assert run.stdout == "", run
    assert re.search(r"^error: \S", run.stderr, flags=re.MULTILINE), run


# ----------------------------------------------------------------------------------------------------
# 10-14. check, schedule, help, profile, sweep
# ----------------------------------------------------------------------------------------------------


def test_check_passes_the_exported_graph_for_trt10(second: SecondWave) -> None:
    run = second.runs["check_good"]
    assert run.returncode == 0, run
    assert re.search(r"TensorRT 10\b.*\byes\b", run.stdout), run
    assert "8.5" not in run.stdout  # only the requested target is checked


def test_check_flags_scatter_elements_with_reduction(first: dict[str, Run]) -> None:
    run = first["check_scatter"]
    assert run.returncode == 1, run
    flagged = [line for line in run.stdout.splitlines() if " x ScatterElements: " in line and "NO" in line]
    assert flagged and "reduction" in run.stdout.split(" x ScatterElements: ", 1)[1], run


def test_check_json_reports_scatter_elements(first: dict[str, Run]) -> None:
    run = first["check_scatter_json"]
    assert run.returncode == 1, run
    report = json.loads(run.stdout)
    assert report["ok"] is False
    assert report["per_target"] == {"8.5": False, "10": False}
    errors = {(issue["target"], issue["op_type"]) for issue in report["issues"] if issue["severity"] == "error"}
    assert errors == {("8.5", "ScatterElements"), ("10", "ScatterElements")}


def test_schedule_json_for_deit_small(first: dict[str, Run]) -> None:
    run = first["schedule"]
    assert run.returncode == 0, run
    result = json.loads(run.stdout)
    assert result["tokens"][:2] == [197, 181]
    assert len(result["tokens"]) == 12
    assert result["flop_ratio"] > 1.8
    assert result["flop_ratio"] == pytest.approx(result["gflops_original"] / result["gflops_reduced"])


def _example_lines(text: str) -> list[str]:
    """Lines that show a ``tofu-export ...`` invocation, bare or after a label ("Example: ", "Latency: "; not the
    Usage line)."""
    return [line for line in text.splitlines() if re.match(r"\s*([A-Z][^:]{0,40}:\s*)?tofu-export \S", line)]


def test_app_help_lists_commands_and_examples(first: dict[str, Run]) -> None:
    run = first["help"]
    assert run.returncode == 0, run
    assert _example_lines(run.stdout), run
    for command in SUBCOMMANDS:
        assert re.search(rf"^\W*{command}\b", run.stdout, flags=re.MULTILINE), command


@pytest.mark.parametrize("command", ["export", "demo"])
@pytest.mark.parametrize("seconds", ["nan", "-1", "inf"])
def test_look_seconds_must_be_a_finite_number_of_seconds(tmp_path: Path, command: str, seconds: str) -> None:
    """Refused while parsing the options (in-process): nothing is loaded or written."""
    args = [command, *(["model.pth"] if command == "export" else []), "--look-seconds", seconds, "-o",
            str(tmp_path / "out")]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 2, result.output
    assert "--look-seconds" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help_shows_an_example(command: str) -> None:
    """In-process (a subprocess per help page would cost ~5 s of torch import each)."""
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert f"tofu-export {command}" in result.output
    assert _example_lines(result.output), result.output


def test_the_top_help_examples_fit_an_80_column_terminal() -> None:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "80", "NO_COLOR": "1"})
    lines = result.output.splitlines()
    examples = [i for i, line in enumerate(lines) if ": tofu-export " in line]
    assert result.exit_code == 0 and len(examples) >= 5, result.output
    assert all(not lines[i + 1].strip() for i in examples), result.output  # none wraps onto a second line


def test_no_help_text_holds_a_word_in_angle_brackets() -> None:
    """The help is rendered as markdown, which drops ``<name>`` as an HTML tag ("a <stem>.json" read "a .json")."""
    import typer.main

    group = typer.main.get_command(app)
    texts = {}
    for name, command in group.commands.items():
        texts[name] = command.help or ""
        texts |= {f"{name} {param.name}": getattr(param, "help", None) or "" for param in command.params}
    assert len(group.commands) >= 10 and sum(bool(text) for text in texts.values()) > 100  # every command was read
    assert {where: text for where, text in texts.items() if re.search(r"<[A-Za-z]", text)} == {}


@pytest.mark.skipif(CONSOLE_SCRIPT is None, reason="the tofu-export console script is not on PATH")
def test_console_script_runs(first: dict[str, Run]) -> None:
    run = first["console_help"]
    assert run.returncode == 0, run
    assert "tofu-export model.pth --r 16 --target trt" in run.stdout, run


def test_profile_json_reports_latency_and_token_reduction_time(second: SecondWave) -> None:
    run = second.runs["profile"]
    assert run.returncode == 0, run
    batch = json.loads(run.stdout)["batches"]
    assert [entry["batch_size"] for entry in batch] == [1]
    assert batch[0]["latency"]["n"] == 5
    assert batch[0]["latency"]["p50_ms"] > 0
    assert batch[0]["breakdown"]["by_category_ms"]["token_reduction"] > 0
    assert json.loads(run.stdout)["timed_on"] == "seeded normal noise"


def test_profile_times_on_the_images_given(second: SecondWave, files: dict[str, Path]) -> None:
    run = second.runs["profile_images"]
    assert run.returncode == 0, run
    result = json.loads(run.stdout)
    assert [entry["batch_size"] for entry in result["batches"]] == [1, 4]
    assert result["timed_on"] == f"4 images from {files['images']} (the preprocessing its manifest records)"


def test_sweep_writes_reports(work: Path, first: dict[str, Run]) -> None:
    run, out = first["sweep"], work / "sweep"
    assert run.returncode == 0, run
    for name in ("sweep.md", "sweep.json", "latency_vs_r.png"):
        assert (out / name).is_file(), name
    assert (out / "latency_vs_r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert sorted((row["mode"], row["r"]) for row in rows) == [("baseline", 0), ("tofu", R), ("tome", R)]
    gflops = {(row["mode"], row["r"]): row["gflops"] for row in rows}
    assert gflops["tofu", R] < gflops["baseline", 0]
    assert all(row["latency_ms"] > 0 for row in rows)
    assert "| baseline (r=0) |" in (out / "sweep.md").read_text()


def test_sweep_rerun_does_not_export_again(work: Path, second: SecondWave) -> None:
    run = second.runs["sweep_again"]
    assert run.returncode == 0, run
    assert len([name for name in second.sweep_mtimes_before if name.endswith("model.onnx")]) == 3  # one r=0
    assert _mtimes(work / "sweep" / "artifacts") == second.sweep_mtimes_before


def test_interleaved_sweep_retimes_every_point_without_exporting_again(
    work: Path, files: dict[str, Path], second: SecondWave, server: ForkServer
) -> None:
    out = work / "sweep"
    run = _run_all(server, {"interleave": [*CLI, "sweep", files["model.pth"], "--r", f"0,{R}", "--modes", "tome,tofu",
                                           "--iters", "3", "--interleave", "-o", out]}, work)["interleave"]
    assert run.returncode == 0, run
    assert _mtimes(out / "artifacts") == second.sweep_mtimes_before  # same exports, timed another way
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert len(rows) == 3 and all(row["latency_ms"] > 0 and row["images_per_s"] > 0 for row in rows)
    points = json.loads((out / "sweep_state.json").read_text())["points"].values()
    assert sum("interleaved" in point["config_key"] for point in points) == 3
