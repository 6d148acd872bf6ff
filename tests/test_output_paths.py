"""May tofu-export write here? New paths and tofu-export's own files (recognised by content) only; never a link,
a special file, a user's file, two outputs at one path, an input, or an artifact folder holding someone's file."""

from __future__ import annotations

import gc
import io
import json
import os
import warnings
from pathlib import Path

import pytest
from PIL import Image

from tofu_export.artifacts import ArtifactExistsError, check_output
from tofu_export.output_paths import (
    FileOutput,
    OutputPathError,
    check_file_outputs,
    check_not_an_input,
    check_output_folder,
    is_policy_file,
    is_profile_json,
    is_profile_markdown,
    is_sweep_folder,
    is_tofu_png,
)


def _png(path: Path, software: str | None) -> Path:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if software:
        info.add_text("Software", software)
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    return path


def test_recognisers_claim_only_tofu_exports_own_files(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text(json.dumps({"format": "tofu-export/policy", "format_version": 1}))
    (tmp_path / "mine.json").write_text(json.dumps({"format": "mine"}))
    assert is_policy_file(tmp_path / "p.json") and not is_policy_file(tmp_path / "mine.json")
    assert is_tofu_png(_png(tmp_path / "ours.png", "tofu-export"))
    assert not is_tofu_png(_png(tmp_path / "theirs.png", "Matplotlib")) and not is_tofu_png(_png(tmp_path / "x.png",
                                                                                                  None))
    (tmp_path / "r.md").write_text("# Latency profile of m.onnx\n\n| backend | batch | n |\n")
    (tmp_path / "notes.md").write_text("# Latency profile ideas\n")
    assert is_profile_markdown(tmp_path / "r.md") and not is_profile_markdown(tmp_path / "notes.md")
    (tmp_path / "r.json").write_text(json.dumps([{"backend": "ort", "batches": []}]))
    assert is_profile_json(tmp_path / "r.json") and not is_profile_json(tmp_path / "mine.json")
    os.mkfifo(tmp_path / "fifo.json")
    assert not is_policy_file(tmp_path / "fifo.json")  # never opened (it would block)


def test_every_png_tofu_export_writes_carries_the_marker_the_recogniser_reads(tmp_path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from tofu_export.reports.png import save_png

    assert is_tofu_png(save_png(Figure(), tmp_path / "policy.png"))  # calibration, sweep, profile, artifact plots
    buffer = io.BytesIO()
    FigureCanvasAgg(Figure()).print_png(buffer)  # any other matplotlib PNG: a user's file
    (tmp_path / "user.png").write_bytes(buffer.getvalue())
    assert not is_tofu_png(tmp_path / "user.png")


def test_file_outputs_refuse_user_files_special_files_links_and_collisions(tmp_path: Path) -> None:
    policy = FileOutput(tmp_path / "policy.json", is_policy_file, "policy")
    plot = FileOutput(tmp_path / "policy.png", is_tofu_png, "policy plot")
    check_file_outputs([policy, plot])  # both new: fine
    _png(tmp_path / "policy.png", None)
    with pytest.raises(OutputPathError, match=r"policy\.png exists and is not a tofu-export policy plot"):
        check_file_outputs([policy, plot])
    _png(tmp_path / "policy.png", "tofu-export")
    check_file_outputs([policy, plot])  # our own plot: replaced
    same = FileOutput(tmp_path / "result.png", is_policy_file, "policy")
    with pytest.raises(OutputPathError, match="both the policy and the policy plot"):
        check_file_outputs([same, FileOutput(tmp_path / "result.png", is_tofu_png, "policy plot")])
    os.mkfifo(tmp_path / "pipe.md")
    with pytest.raises(OutputPathError, match="is a FIFO"):
        check_file_outputs([FileOutput(tmp_path / "pipe.md", is_profile_markdown, "profile report")])
    (tmp_path / "link.json").symlink_to(tmp_path / "policy.json")
    with pytest.raises(OutputPathError, match="symbolic link"):
        check_file_outputs([FileOutput(tmp_path / "link.json", is_policy_file, "policy")])
    if Path("/dev/null").exists():
        with pytest.raises(OutputPathError, match="character device"):
            check_file_outputs([FileOutput(Path("/dev/null"), is_profile_markdown, "profile report")])
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match=r"cannot write|is a file"):
        check_file_outputs([FileOutput(tmp_path / "notes.txt" / "p.json", is_policy_file, "policy")])


def test_an_output_that_is_or_holds_an_input_is_refused(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "model.pth").write_bytes(b"w")
    with pytest.raises(OutputPathError, match="contains the input"):
        check_not_an_input(tmp_path / "in", [tmp_path / "in" / "model.pth"])
    with pytest.raises(OutputPathError, match="is the input"):
        check_not_an_input(tmp_path / "in" / "model.pth", [tmp_path / "in" / "model.pth"])
    check_not_an_input(tmp_path / "out", [tmp_path / "in" / "model.pth"])


def _artifact(folder: Path, listed: list[str]) -> Path:
    folder.mkdir()
    for name in listed:
        (folder / name).write_text(name)
    files = [{"name": name, "bytes": 1, "sha256": "0"} for name in listed]
    (folder / "manifest.json").write_text(json.dumps({"tool": "tofu-export", "files": files}))
    return folder


def test_force_replaces_an_artifact_folder_only_when_it_holds_only_what_its_manifest_lists(tmp_path: Path) -> None:
    artifact = _artifact(tmp_path / "a", ["model.onnx", "report.md"])
    assert check_output(artifact, force=True) is not None
    (artifact / "weights.pth").write_bytes(b"the user's checkpoint")
    with pytest.raises(ArtifactExistsError, match=r"files tofu-export did not write \(weights\.pth\)"):
        check_output(artifact, force=True)
    with pytest.raises(OutputPathError, match="contains the input"):
        check_output(artifact, force=True, inputs=[artifact / "weights.pth"])


def test_a_sweep_writes_only_into_a_new_empty_or_sweep_folder(tmp_path: Path) -> None:
    check_output_folder(tmp_path / "new", is_sweep_folder, what="sweep")
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty", is_sweep_folder, what="sweep")
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "sweep_state.json").write_text('{"version": 1, "points": {}}')
    (tmp_path / "sw" / "sweep.md").write_text("table")
    with warnings.catch_warnings(record=True) as caught:  # a rerun's check leaves no directory handle open
        warnings.simplefilter("always")
        check_output_folder(tmp_path / "sw", is_sweep_folder, what="sweep")
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]
    (tmp_path / "sw" / "thesis.tex").write_text("mine")
    with pytest.raises(OutputPathError, match="not made by tofu-export"):
        check_output_folder(tmp_path / "sw", is_sweep_folder, what="sweep")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="not a folder"):
        check_output_folder(tmp_path / "file", is_sweep_folder, what="sweep")
