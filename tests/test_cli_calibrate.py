"""``tofu-export calibrate`` on a tiny random ViT: a policy and its plot are written, bad input exits 2 with a clear
message and writes nothing. In-process (CliRunner): a subprocess per case would mostly import torch.

The bad-input cases read the shared 2-block checkpoint (``tiny_checkpoint``). The one case refused only after
measuring (a budget no policy meets) gets a synthetic measurement (``synthetic_calibration``: no export, no timing)
in place of ``search.measure``; the budget check that refuses it is the real one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic_calibration import block_latency, late_blocks_look_free
from typer.testing import CliRunner

from tofu_export.calibration import search
from tofu_export.calibration.images import DAMAGE_IMAGES
from tofu_export.calibration.select import pareto_front
from tofu_export.calibration.state import Calibration
from tofu_export.cli.app import app

pytestmark = pytest.mark.usefixtures("single_thread")
MODEL = ["vit_tiny_patch16_224", "--img-size", "64", "--threads", "1"]  # timm name: random weights, 17 tokens


def _invoke(*args: str | Path):
    return CliRunner().invoke(app, ["calibrate", *map(str, args)], env={"COLUMNS": "200", "NO_COLOR": "1"})


def _measured_without_exports(model, images, *, r: int, **_) -> Calibration:
    """``search.measure``'s stand-in: three blocks' synthetic latency model and damage table, and their fronts."""
    damage, latency = late_blocks_look_free(r), block_latency([9, 13, 17], r)
    front = pareto_front(damage, latency, 17, 1)
    baseline_ms = latency.predict_ms(17, 1, [0, 0, 0], ["mean"] * 3)
    return Calibration(model, None, r, damage, latency, {}, {"damage": front, "linearity": front}, baseline_ms,
                       True, {})  # no trace: the budget is refused before any forward


def _images(folder: Path, count: int, size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        (folder / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / str(i % 2) / f"{i}.png")
    return folder


@pytest.mark.slow
def test_calibrate_writes_a_policy_and_its_plot(tmp_path) -> None:
    data = _images(tmp_path / "data", 10)
    out = tmp_path / "out" / "policy.json"
    # TorchScript block graphs (8x cheaper to trace), not simplified (onnxslim took 38% of this test): that the
    # user's settings, the defaults among them, reach the graphs is tested in test_calibration*.py
    result = _invoke(MODEL[0], data, *MODEL[1:], "--r", "4", "--images", "8", "--exporter", "torchscript",
                     "--no-simplify", "-o", out)
    assert result.exit_code == 0, result.output
    policy = json.loads(out.read_text())
    assert len(policy["modes"]) == 12 and policy["source"]["images"]["count"] == 8
    assert policy["source"]["checkpoint"]["source"] == "vit_tiny_patch16_224"
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "measured" in result.output and "wrote" in result.output
    lead = policy["measurements"]["held_out_vs_tome"]  # 2 held-out images: the note says when they cannot tell
    assert lead["images"] == 2
    noise = abs(lead["difference"]) <= 2 * lead["standard_error"]
    assert ("is within two standard errors" in " ".join(result.output.split())) == noise, result.output
    below = policy["measurements"]["held_out_cosine"] < 0.995  # the default floor, kept on the search images
    assert ("below the floor 0.995" in " ".join(result.output.split())) == below, result.output
    from tofu_export.cli.calibrate import json_answer  # what --json prints, from the policy just written
    from tofu_export.policy import Policy

    answer = json.loads(json.dumps(json_answer(Policy.load(out), out, out.with_suffix(".png"), 4, 1.0)))
    assert answer["modes"] == policy["modes"] and answer["r"] == policy["r"] and answer["held_out_vs_tome"] == lead
    assert answer["held_out_standard_error"] == policy["measurements"]["held_out_standard_error"] > 0
    assert answer["export_parity"] == policy["measurements"]["measured_latency"]["export_parity"]
    assert answer["plot"] == str(out.with_suffix(".png")) and answer["tome"]["r"] == 4
    for stage in ("damage per block", "latency per block and mode: exporting", "latency per block and mode: 40 "
                  "interleaved rounds", "the chosen policy's graph exported and timed: exporting it, the unreduced "
                  f"model and ToMe at {len(policy['measurements']['tome_at_measured_speedup']['r'])} r",
                  "the chosen policy's graph exported and timed: 20 interleaved rounds"):
        assert f"calibrate: {stage}" in result.output, result.output  # each stage says itself in a log too
    runner, env = CliRunner(), {"COLUMNS": "200", "NO_COLOR": "1"}
    fits = runner.invoke(app, ["schedule", MODEL[0], "--img-size", "64", "--policy", str(out), "--json"], env=env)
    assert fits.exit_code == 0, fits.output
    assert json.loads(fits.output)["modes"] == policy["modes"]
    other = runner.invoke(app, ["schedule", MODEL[0], "--img-size", "96", "--policy", str(out)], env=env)
    assert other.exit_code == 2
    assert "input size [96, 96] (policy: [64, 64])" in " ".join(other.output.split())


@pytest.mark.parametrize(
    ("setup", "extra", "message"),
    [
        ("empty", [], "holds no images (it is empty)"),
        ("text", [], "holds no images (found only ['notes.txt']"),
        ("few", [], "holds 3 images; calibration needs at least 8"),
        ("corrupt", [], "is not a readable image"),
        ("missing", [], "is not a folder"),
        ("ok", ["--images", "2"], "needs at least 8 images, asked for 2"),
        # refused only after measuring: "measured" stands in a synthetic measurement (_measured_without_exports)
        ("measured", ["--speedup", "50"], "no policy reaches a 50.00x speedup"),
        ("ok", ["--min-cosine", "0.9", "--speedup", "1.2"], "give exactly one budget"),
        ("ok", ["--r", "9"], "r must lie in [1, 8]"),
        ("ok", ["--rule", "coin"], "unknown mode rule 'coin'"),
        ("ok", ["--clock", "thread-cpu", "--threads", "2"], "the thread-CPU clock times one intra-op thread"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, tiny_checkpoint, monkeypatch, setup, extra, message) -> None:
    data = tmp_path / "data"
    if setup != "missing":
        data.mkdir()
    if setup == "text":
        (data / "notes.txt").write_text("not an image")
    elif setup == "few":
        _images(data, 3)
    elif setup == "corrupt":
        _images(data, 9)
        (data / "0" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    elif setup in ("ok", "measured"):
        _images(data, 10)
    if setup == "measured":
        monkeypatch.setattr(search, "measure", _measured_without_exports)
    out = tmp_path / "out" / "policy.json"
    result = _invoke(tiny_checkpoint, data, *MODEL[1:], "--r", "4", *extra, "-o", out)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_an_existing_file_that_is_not_a_policy_is_left_alone(tmp_path) -> None:
    data = _images(tmp_path / "data", 10)
    out = tmp_path / "policy.json"
    out.write_text("my notes")
    result = _invoke(MODEL[0], data, *MODEL[1:], "--r", "4", "-o", out)
    assert result.exit_code == 2 and "is not a tofu-export policy" in result.output
    assert out.read_text() == "my notes"


def test_the_comparison_table_shows_tome_at_the_policys_measured_speed() -> None:
    from rich.console import Console

    from tofu_export.cli.calibrate import comparison_table, comparison_verdict

    m = {"uniform": {"mean": {"measured_cosine": 0.9990, "predicted_ms": 50.0}}, "baseline_ms": 80.0,
         "latency": {"backend": "onnxruntime-cpu"}, "measured_cosine": 0.9995, "held_out_cosine": 0.9993,
         "held_out_images": 16, "predicted_ms": 52.0, "predicted_speedup": 1.54, "measured_speedup": 1.50,
         "measured_latency": {"exporter": "dynamo", "opset": 17, "rounds": 20, "speedup_iqr": [1.45, 1.55],
                              "clock": "thread-cpu"},
         "tome_at_measured_speedup": {"r": [12, 14, 16], "measured_speedup": [1.4, 1.5, 1.6], "cosine": 0.9992,
                                      "held_out_cosine": 0.9989, "extrapolated": False}}
    console = Console(width=80, record=True, file=open(__import__("os").devnull, "w"))  # noqa: SIM115
    console.print(comparison_table(m, 16))
    lines = console.export_text().splitlines()
    text = " ".join(" ".join(lines).split())
    header = [line.split("┃")[4].strip() for line in lines if line.startswith("┃")]  # "ToMe, same speed", wrapped
    assert " ".join(header) == "ToMe, same speed" and "r=12, 14 and 16, its cosine interpolated between the two " \
        "nearest" in text
    rows = {line.split("│")[1].strip(): line.split("│")[2:-1] for line in lines if line.startswith("│")}
    assert [cell.strip() for cell in rows["cosine, 16 held out"]] == ["1", "", "0.99890", "0.99930"]  # ToMe, policy
    assert [cell.strip() for cell in rows["speed-up, measured"]] == ["1.00x", "", "1.50x", "1.50x"]
    assert "on the thread-cpu clock" in text
    assert rows["quartiles over rounds"][-1].strip() == "1.45-1.55x"  # one line a row on an 80-column terminal
    assert comparison_verdict(m) == "held out: +0.00040 cosine vs ToMe at the same measured speed"
    m["held_out_vs_tome"] = {"difference": 0.0004, "standard_error": 0.0001, "images": 16}  # written since
    assert comparison_verdict(m) == ("held out: +0.00040 cosine vs ToMe at the same measured speed (± 0.00010 SE, "
                                     "16 images)")
    assert comparison_verdict({**m, "tome_at_measured_speedup": None}) == "closer than ToMe, predicted slower"


def test_a_floor_kept_on_the_search_images_but_missed_held_out_is_said_with_its_error_bar() -> None:
    """The default DINOv2-S/14 run of this README: 0.99497 on 16 held-out images under the 0.995 floor."""
    from tofu_export.calibration.select import Budget
    from tofu_export.cli.calibrate import floor_note

    m = {"held_out_cosine": 0.99497, "held_out_images": 16, "held_out_standard_error": 0.0004}
    floor = Budget(min_cosine=0.995)
    said = floor_note(m, floor)
    assert said.startswith("note: on the 16 held-out images the policy measures 0.99497, 0.00003 below the floor "
                           "0.995") and "within two standard errors (0.00040 each): these images cannot tell" in said
    far = floor_note({**m, "held_out_cosine": 0.9930}, floor)
    assert "0.00200 below" in far and "beyond two standard errors (0.00040 each)" in far
    assert "no error bar" in floor_note({**m, "held_out_images": 1, "held_out_standard_error": None}, floor)
    assert floor_note({**m, "held_out_cosine": 0.9951}, floor) is None  # kept held out too
    assert floor_note(m, Budget(speedup=1.5)) is None  # a latency budget promises no cosine
    assert floor_note({**m, "held_out_cosine": None, "held_out_images": 0}, floor) is None  # nothing held out


def test_the_held_out_lead_over_tome_says_whether_it_is_beyond_the_noise() -> None:
    """The figures of a DINOv2-S/14 calibration on 16 images (4 held out): a lead of -0.00193 with an SE of 0.00336."""
    from tofu_export.cli.calibrate import held_out_verdict, noise_note
    from tofu_export.evaluation.metrics import paired_difference

    lead = paired_difference([0.9, 0.8, 0.7, 0.6], [0.8, 0.7, 0.7, 0.6])  # differences 0.1, 0.1, 0, 0
    assert lead["difference"] == pytest.approx(0.05) and lead["images"] == 4
    assert lead["standard_error"] == pytest.approx((4 * 0.05**2 / 3 / 4) ** 0.5)  # sample SD / sqrt(n): 0.0289
    assert held_out_verdict(0.05, lead) == ("held out: +0.05000 cosine vs ToMe at the same measured speed "
                                            "(± 0.02887 SE, 4 images)")
    assert "within two standard errors (0.02887 each)" in noise_note({"held_out_vs_tome": lead})
    dinov2 = {"difference": -0.00193, "standard_error": 0.00336, "images": 4}
    assert noise_note({"held_out_vs_tome": dinov2}).startswith(
        "note: on the 4 held-out images the policy's lead over ToMe at the same speed, -0.00193 cosine, is within")
    assert noise_note({"held_out_vs_tome": {**lead, "standard_error": 0.02}}) is None  # 0.05 > 2 x 0.02: a lead
    assert noise_note({"held_out_vs_tome": {**lead, "difference": -0.05, "standard_error": 0.02}}) is None
    one = paired_difference([0.9], [0.8])
    assert one["standard_error"] is None and noise_note({"held_out_vs_tome": one}) is None
    with pytest.raises(ValueError, match="at least one image"):
        paired_difference([], [])
    assert held_out_verdict(0.1, one).endswith("at the same measured speed (no error bar, 1 image)")
    assert noise_note({}) is None  # a policy written before the per-image comparison
    assert noise_note({"held_out_vs_tome": dinov2}).endswith("Calibrate on more --images to tell them apart.")
    assert held_out_verdict(0.1, None) == "held out: +0.10000 cosine vs ToMe at the same measured speed"


def test_the_noise_note_says_how_many_images_would_show_the_lead() -> None:
    """n (2 SE / |lead|)^2 held-out images: the DINOv2 figures above need 4 x (0.00672 / 0.00193)^2 = 48.5 -> 49,
    and with 16 calibration images of which 4 are held out, --images 196."""
    from tofu_export.cli.calibrate import noise_note
    from tofu_export.evaluation.metrics import images_to_show

    dinov2 = {"difference": -0.00193, "standard_error": 0.00336, "images": 4}
    assert images_to_show(dinov2) == 49
    assert images_to_show({**dinov2, "difference": 0.00193}) == 49  # a lag needs as many as a lead
    assert images_to_show({**dinov2, "standard_error": 0.0005}) == 4  # already beyond two SE: the images at hand
    assert images_to_show({**dinov2, "difference": 0.0}) is None  # nothing to show
    assert images_to_show({**dinov2, "standard_error": None, "images": 1}) is None  # no error bar
    said = noise_note({"held_out_vs_tome": dinov2}, 16)
    assert said.endswith("A difference this size would stand two standard errors out on about 49 held-out images "
                         "(--images 196), the spread per image staying as measured here."), said
    big = {"difference": 0.00048, "standard_error": 0.00197, "images": 16}  # the default run's figures (README)
    # 16 x (0.00394 / 0.00048)^2 = 1078.03 -> 1079 held out, of 64 images 16 held out: --images 4316
    assert "about 1,079 held-out images (--images 4,316)" in noise_note({"held_out_vs_tome": big}, 64)


def test_tome_that_measured_as_fast_and_closer_than_the_policy_is_named() -> None:
    """Figures of a DINOv2-S/14 calibration on 16 images (before the floor search bisected): ToMe r=19, timed in the
    same rounds, was faster than the policy and closer on the held-out images."""
    from tofu_export.cli.calibrate import tome_note

    m = {"measured_speedup": 1.511, "measured_cosine": 0.99633, "held_out_cosine": 0.99631, "held_out_images": 4,
         "tome_at_measured_speedup": {"r": [15, 19], "measured_speedup": [1.448, 1.674],
                                      "cosine_at_r": [0.99933, 0.99520], "held_out_cosine_at_r": [0.99865, 0.99748]}}
    from tofu_export.calibration.versus_tome import better_tome

    assert better_tome(m) == {"r": 19, "measured_speedup": 1.674, "cosine": 0.99748, "policy_cosine": 0.99631,
                              "images": "held-out"}  # --json carries it
    text = tome_note(m)
    assert text is not None and "ToMe r=19" in text and "1.67x (the policy 1.51x)" in text
    assert "0.99748 on the 4 held-out images (the policy 0.99631)" in text and "--mode tome --r 19" in text
    slower = {**m, "measured_speedup": 1.70}  # no timed ToMe is as fast: nothing to say
    assert tome_note(slower) is None
    closer = {**m, "held_out_cosine": 0.9980}  # the faster ToMe keeps less of the output
    assert tome_note(closer) is None
    unheld = {**m, "held_out_cosine": None, "held_out_images": 0, "measured_cosine": 0.9950}  # the search images
    assert "0.99520 on the calibration images (the policy 0.99500)" in tome_note(unheld)
    assert tome_note({**m, "tome_at_measured_speedup": None}) is None


def test_a_policy_whose_graph_fails_the_export_gate_is_flagged() -> None:
    from tofu_export.cli.calibrate import parity_warning

    ok = {"ok": True, "min_cosine": 0.99999, "images_within_tolerance": 1.0, "advice": None}
    assert parity_warning(ok, Path("p.json")) is None and parity_warning(None, Path("p.json")) is None
    ties = {"ok": False, "min_cosine": 0.99614, "images_within_tolerance": 0.89,
            "advice": "reduce less in the last blocks"}
    text = parity_warning(ties, Path("p.json"))
    assert text is not None and "0.9961" in text and "89%" in text and "export --policy p.json" in text
    assert text.endswith("reduce less in the last blocks")



@pytest.mark.parametrize(("budget", "confirmed", "damage"), [
    (["--speedup", "1.2"], 2, DAMAGE_IMAGES), (["--confirm-images", "0", "--damage-images", "5"], 0, 5)])
def test_confirm_images_are_loaded_beyond_the_calibration_ones(tmp_path, tiny_checkpoint, monkeypatch, budget,
                                                               confirmed, damage) -> None:
    """``--confirm-images``: loaded beside ``--images`` from the same folder, none of them the measured ones;
    ``--damage-images`` reaches the measurement (its default the library's)."""
    data, seen = _images(tmp_path / "data", 12), {}

    def stop(model, images, *, confirm, damage_images, **_):
        seen.update(images=images, confirm=confirm, damage_images=damage_images)
        raise search.UserError("stop here")

    monkeypatch.setattr(search, "measure", stop)
    result = _invoke(tiny_checkpoint, data, *MODEL[1:], "--r", "4", "--images", "8", "--confirm-images", "2",
                     *budget, "-o", tmp_path / "policy.json")  # the last --confirm-images given counts
    assert result.exit_code == 2 and "stop here" in result.output, result.output
    assert len(seen["images"]) == 8 and len(seen["confirm"]) == confirmed and seen["damage_images"] == damage
    flat = [image.flatten() for image in (*seen["images"], *seen["confirm"])]
    assert all(not torch.equal(a, b) for i, a in enumerate(flat) for b in flat[i + 1:])  # ten distinct images
