"""``tofu-export finetune``: self-distillation with the reduction in the loop on a tiny random ViT. The loop lowers
its loss and trains only what it says; the written checkpoint is read back by every command as the model that was
scored; outputs that exist and bad settings are refused before any work. In-process (CliRunner)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_ARCH, TINY_IMG
from PIL import Image
from two_towers import tiny_two_towers
from typer.testing import CliRunner

import tofu_export
from tofu_export.cli.app import app
from tofu_export.finetune.distill import DistillSettings, cosine_loss, distill, trained_parameters
from tofu_export.finetune.job import FinetuneError, held_out_fidelity, outputs_of, split_images
from tofu_export.models.loading import load_model

pytestmark = pytest.mark.usefixtures("single_thread")
R = 2  # the tiny checkpoint: 17 tokens enter block 0


def _invoke(*args: str | Path):
    return CliRunner().invoke(app, ["finetune", *map(str, args)], env={"COLUMNS": "200", "NO_COLOR": "1"})


def _folder(folder: Path, count: int = 24, size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        (folder / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / str(i % 2) / f"{i}.png")
    return folder


def _student_and_targets(make_vit, make_images):
    teacher = make_vit("vit_tiny_patch16_224", depth=2, img_size=64)
    images = make_images(12, 64)
    targets = outputs_of(teacher, images)
    student = copy.deepcopy(teacher)
    tofu_export.patch(student, r=4, mode="tofu")
    return teacher, student, images, targets


def _only_vectors_moved(before: torch.nn.Module, after: torch.nn.Module) -> None:
    """What ``--weights vectors`` trains, as written back: every matrix as it was, some vector changed."""
    old, new = before.state_dict(), after.state_dict()
    assert old.keys() == new.keys()
    assert all(torch.equal(old[k], new[k]) for k in old if old[k].ndim > 1)
    assert any(not torch.equal(old[k], new[k]) for k in old if old[k].ndim == 1)


def _usual_mode(*paths: Path) -> bool:
    """Every file has the permissions a new file gets here (safetensors' writer makes its files private)."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    return all(path.stat().st_mode & 0o777 == 0o666 & ~umask for path in paths)


def _rescored(original: torch.nn.Module, tuned: torch.nn.Module, data: Path, r: int, images: int,
              holdout: int) -> float:
    """The held-out fidelity of ``tuned`` read back, scored again here: patched with ``r``, against the original's
    outputs on the held-out images a fine-tuning of ``images`` and ``holdout`` images of ``data`` kept aside."""
    from tofu_export.evaluation.data import model_transform
    from tofu_export.images import decode_images

    _, held_files, _ = split_images(data, images, holdout)
    held = decode_images(held_files, model_transform(original))
    tofu_export.patch(tuned, r=r, mode="tofu")
    return held_out_fidelity(tuned, held, outputs_of(original, held))["mean"]


@pytest.mark.parametrize(("weights", "lr"), [("vectors", 1e-3), ("all", 1e-5)])
def test_distillation_lowers_its_loss_and_trains_only_what_it_names(make_vit, make_images, weights, lr) -> None:
    teacher, student, images, targets = _student_and_targets(make_vit, make_images)
    with torch.no_grad():
        before = float(cosine_loss(student(images), targets))
    losses = distill(student, images, targets, DistillSettings(steps=25, batch=12, lr=lr, weights=weights))
    with torch.no_grad():
        after = float(cosine_loss(student(images), targets))
    assert len(losses) == 25 and before > 0
    assert after < 0.8 * before, (before, after)
    tuned = dict(student.named_parameters())
    changed = {name for name, original in teacher.named_parameters() if not torch.equal(original, tuned[name])}
    vectors = {name for name, p in teacher.named_parameters() if p.ndim == 1}
    assert vectors <= changed  # every vector trained
    assert (changed - vectors != set()) == (weights == "all")  # matrices only when asked for
    assert not student.training and all(p.requires_grad for p in student.parameters())  # as it was given


def test_trained_vectors_are_norms_biases_and_layer_scales(make_vit) -> None:
    model = make_vit("vit_small_patch14_dinov2", depth=2, img_size=56)
    names = {name for name, _ in trained_parameters(model, "vectors")}
    assert {"blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "blocks.0.ls1.gamma", "norm.bias"} <= names
    assert not {"blocks.0.attn.qkv.weight", "pos_embed", "cls_token", "patch_embed.proj.weight"} & names


def test_held_out_and_training_images_never_overlap(tmp_path) -> None:
    data = _folder(tmp_path / "data", 30)
    train, held, folder = split_images(data, 16, 8)
    assert folder == data and len(train) == 16 and len(held) == 8 and not set(train) & set(held)
    train, held, _ = split_images(data, 100, 100)  # fewer than asked: all of them, split in two
    assert len(train) + len(held) == 30 and len(held) == 15 and not set(train) & set(held)


@pytest.fixture(scope="module")
def tuned(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """One fine-tuning through the command: (data folder, tuned weights, its --json report)."""
    work = tmp_path_factory.mktemp("finetune")
    data = _folder(work / "data")
    out = work / "out" / "tuned.safetensors"
    result = _invoke(tiny_checkpoint, data, "--r", R, "--steps", 12, "--batch", 4, "--lr", "1e-3", "--images", 12,
                     "--holdout", 8, "--threads", 1, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    return data, out, json.loads(result.stdout)


def test_the_command_writes_weights_a_sidecar_and_a_plot(tuned) -> None:
    _, out, report = tuned
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sidecar["architecture"] == TINY_ARCH and sidecar["model_args"]["img_size"] == TINY_IMG
    assert sidecar["tuned_for"]["r"] == [R, R] and report["tuned_for"]["modes"] == ["mlerp", "mlerp"]
    assert report["images"] == 12 and report["held_out"] == 8 and report["settings"]["steps"] == 12
    assert report["trained_weights"] < report["weights"] / 50  # vectors only
    assert _usual_mode(out, out.with_suffix(".json"), out.with_suffix(".png"))


def test_the_tuned_checkpoint_is_read_back_as_the_model_that_was_scored(tiny_checkpoint, tuned) -> None:
    data, out, report = tuned
    original, loaded = load_model(tiny_checkpoint), load_model(out)  # no --arch: the sidecar states it
    assert loaded.arch.name == TINY_ARCH
    assert any("tuned by tofu-export finetune for mode tofu (tokens removed per block 2 x2, mlerp)" in note
               for note in loaded.arch.notes), loaded.arch.notes  # every command that loads it says so
    assert not any("tuned" in note for note in original.arch.notes)
    _only_vectors_moved(original.model, loaded.model)
    assert _rescored(original.model, loaded.model, data, R, 12, 8) == pytest.approx(report["held_out_after"]["mean"],
                                                                                    abs=1e-6)


def test_an_existing_output_is_refused_before_any_work(tuned, tiny_checkpoint) -> None:
    data, out, _ = tuned
    sizes = {p: p.stat().st_size for p in out.parent.iterdir()}
    result = _invoke(tiny_checkpoint, data, "--r", R, "-o", out)
    assert result.exit_code == 2 and "exists" in result.output and "tuned checkpoint" in result.output
    assert {p: p.stat().st_size for p in out.parent.iterdir()} == sizes


@pytest.mark.parametrize(("args", "words"), [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--holdout", "3"], "--holdout must be at least 8"),
    (["--lr", "0"], "--lr must be positive"),
    (["--weights", "matrices"], "--weights must be one of vectors, all"),
    (["-o", "tuned.pth"], "written as .safetensors"),
])
def test_bad_settings_are_refused_before_the_model_is_loaded(tmp_path, monkeypatch, args, words) -> None:
    monkeypatch.chdir(tmp_path)
    result = _invoke(tmp_path / "missing.safetensors", tmp_path, *args)  # a missing model: never reached
    assert result.exit_code == 2 and words in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_a_model_it_cannot_write_back_is_refused(make_vit, tmp_path, monkeypatch) -> None:
    """The refusal of a family whose weights finetune cannot write, shown on a timm model with its family's writer
    taken away (every image-encoder family has one)."""
    from tofu_export.finetune import job
    from tofu_export.models.family import ArchGuess, LoadedModel, family_of

    model = make_vit("vit_tiny_patch16_224", depth=1, img_size=32)
    monkeypatch.setattr(type(family_of(model)), "tuned_layout", "")
    loaded = LoadedModel(model, ArchGuess("vit", {}, "test"), None, None)
    with pytest.raises(FinetuneError, match="cannot write the weights of timm models back yet"):
        job.finetune(loaded, _folder(tmp_path / "data", 16), tofu_export.ToFuConfig(r=2), DistillSettings(steps=1),
                     tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.mark.parametrize(("difference", "se", "clear"), [(0.004, 0.001, True), (0.00005, 0.00005, False),
                                                          (-0.0002, 0.00001, False)])
def test_a_gain_under_two_standard_errors_is_said_to_be_unclear(tuned, capsys, difference, se, clear) -> None:
    from tofu_export.cli.finetune import gain_is_clear, print_report

    _, _, report = tuned
    report = dict(report, gain={"difference": difference, "standard_error": se, "images": 8})
    assert gain_is_clear(report["gain"]) == clear
    print_report(report, "--r 2 --mode tofu")
    printed = " ".join(capsys.readouterr().out.split())
    assert ("not clearly closer" in printed) != clear
    assert "next: tofu-export" in printed and "--r 2 --mode tofu" in printed and f"{difference:+.5f}" in printed


def test_a_timm_eva_is_tuned_and_read_back_with_its_rotary_embeddings(tmp_path) -> None:
    import timm
    from safetensors.torch import save_file

    from tofu_export.finetune.job import finetune

    torch.manual_seed(0)
    args = {"depth": 2, "img_size": 64, "embed_dim": 64, "num_heads": 2}
    model = timm.create_model("vit_small_patch16_dinov3", pretrained=False, **args).eval()
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_small_patch16_dinov3", "model_args": args}))
    loaded = load_model(tmp_path / "model.safetensors")
    out = tmp_path / "out" / "tuned.safetensors"
    report = finetune(loaded, _folder(tmp_path / "data", 20), tofu_export.ToFuConfig(r=4),
                      DistillSettings(steps=4, batch=4, lr=1e-3), out, images=10, holdout=8, progress=False)
    back = load_model(out)
    assert back.family.name == "timm_eva" and back.arch.name == "vit_small_patch16_dinov3"
    assert any("tuned by tofu-export finetune" in note for note in back.arch.notes)
    assert _rescored(loaded.model, back.model, tmp_path / "data", 4, 10, 8) == pytest.approx(
        report["held_out_after"]["mean"], abs=1e-6)


def test_an_impossible_r_is_refused_before_any_image_is_read(tiny_checkpoint, tmp_path) -> None:
    (tmp_path / "empty").mkdir()  # read first, it would be refused for holding no images
    result = _invoke(tiny_checkpoint, tmp_path / "empty", "--r", 40, "-o", tmp_path / "t.safetensors")
    assert result.exit_code == 2 and "r=40 is impossible" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_the_plots_running_mean_averages_the_last_steps() -> None:
    from tofu_export.finetune.plot import running_mean

    assert running_mean([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    assert running_mean([2.0] * 5) == [2.0] * 5


def test_eval_of_a_tuned_checkpoint_compares_with_the_one_it_was_tuned_from(tuned, tiny_checkpoint, tmp_path) -> None:
    """Its own unreduced outputs moved with its weights: the cost of the reduction is measured against the origin."""
    import shutil

    from tofu_export.finetune.origin import tuned_origin
    from tofu_export.jobs.evaluate import evaluate_model, tuned_reference

    data, out, _ = tuned
    assert tuned_origin(out).path == tiny_checkpoint.resolve() and tuned_origin(tiny_checkpoint) is None
    report = evaluate_model(out, data, tofu=tofu_export.ToFuConfig(r=R), limit=8, compare_tome=False)
    assert any("the reference is the checkpoint it was tuned from" in note for note in report["notes"])
    moved = tmp_path / "moved"  # the same file and sidecar, the origin's bytes changed where it was recorded
    moved.mkdir()
    for path in (out, out.with_suffix(".json")):
        shutil.copy(path, moved / path.name)
    statement = json.loads((moved / out.with_suffix(".json").name).read_text())
    statement["checkpoint_sha256"] = "0" * 64
    (moved / out.with_suffix(".json").name).write_text(json.dumps(statement))
    notes: list[str] = []
    assert tuned_reference(moved / out.name, notes) is None
    assert "pass --reference ORIGINAL" in notes[0]


@pytest.fixture(scope="module")
def tuned_hf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, dict]:
    """One fine-tuning of a tiny random transformers DINOv2 folder (with a preprocessor config) through the
    command: (source folder, data folder, tuned folder, its --json report)."""
    transformers = pytest.importorskip("transformers")
    work = tmp_path_factory.mktemp("finetune_hf")
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, image_size=32, patch_size=4)
    source = work / "dinov2"
    transformers.Dinov2Model(config).eval().save_pretrained(source)
    (source / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 36},
        "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "resample": 3,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    data = _folder(work / "data")
    out = work / "tuned"
    result = _invoke(source, data, "--r", 4, "--steps", 12, "--batch", 4, "--lr", "1e-3", "--images", 12,
                     "--holdout", 8, "--threads", 1, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    assert "Loading weights" not in result.output and "Writing model shards" not in result.output  # no foreign bars
    return source, data, out, json.loads(result.stdout)


def test_a_transformers_model_is_written_back_as_a_folder_that_loads_as_the_model_scored(tuned_hf) -> None:
    from tofu_export.evaluation.data import model_transform
    from tofu_export.finetune.origin import tuned_origin

    source, data, out, report = tuned_hf
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "loss.png", "model.safetensors",
                                                    "preprocessor_config.json", "tofu_finetune.json"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["data", "dinov2", "tuned"]  # no staging folder left
    assert (out / "preprocessor_config.json").read_bytes() == (source / "preprocessor_config.json").read_bytes()
    assert _usual_mode(*out.iterdir())
    statement = json.loads((out / "tofu_finetune.json").read_text())
    assert statement["written_by"] == "tofu-export finetune" and statement["tuned_for"]["r"] == [4, 4]
    assert report["outputs"]["checkpoint"] == str(out) and report["architecture"] == "Dinov2Model"
    original, loaded = load_model(source), load_model(out)
    assert loaded.family.name == "transformers" and loaded.arch.name == "Dinov2Model"
    assert any("tuned by tofu-export finetune for mode tofu" in note for note in loaded.arch.notes)
    assert model_transform(loaded.model).transforms[0].size == model_transform(original.model).transforms[0].size
    _only_vectors_moved(original.model, loaded.model)
    assert _rescored(original.model, loaded.model, data, 4, 12, 8) == pytest.approx(report["held_out_after"]["mean"],
                                                                                    abs=1e-6)
    assert tuned_origin(out).path == source.resolve()  # eval measures the reduction against the folder tuned from


@pytest.mark.parametrize(("name", "words"), [("tuned.safetensors", "written back as a folder"),
                                             ("tuned", "nothing is replaced")])
def test_a_transformers_output_that_is_a_file_name_or_exists_is_refused_before_any_work(tuned_hf, name,
                                                                                        words) -> None:
    source, data, out, _ = tuned_hf
    before = sorted(p.name for p in out.parent.iterdir())
    result = _invoke(source, data, "--r", 4, "-o", out.parent / name)
    assert result.exit_code == 2 and words in " ".join(result.output.split()), result.output
    assert sorted(p.name for p in out.parent.iterdir()) == before


@pytest.mark.parametrize("name", ["CLIPVisionModel", "SiglipVisionModel"])
def test_other_transformers_encoders_are_written_back_and_load_as_tuned(tuned_hf, tmp_path, name) -> None:
    """CLIP (a class token, a pre-norm) and SigLIP (no prefix token, an attention-pool head) through the job."""
    import transformers

    from tofu_export.finetune.job import finetune

    _, data, _, _ = tuned_hf
    torch.manual_seed(0)
    config = getattr(transformers, name.replace("Model", "Config"))(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=4)
    getattr(transformers, name)(config).eval().save_pretrained(tmp_path / "source")
    source = load_model(tmp_path / "source")
    finetune(source, data, tofu_export.ToFuConfig(r=4), DistillSettings(steps=3, batch=4, lr=1e-2),
             tmp_path / "tuned", images=8, holdout=8, progress=False)
    back = load_model(tmp_path / "tuned")
    assert back.arch.name == name and any("tuned by tofu-export finetune" in note for note in back.arch.notes)
    _only_vectors_moved(source.model, back.model)



def test_a_two_tower_transformers_model_is_written_back_whole(tuned_hf, tmp_path) -> None:
    """A CLIPModel folder (what openai/clip-vit-* holds) is tuned as its vision tower and written back as the whole
    CLIPModel: its text tower's tensors as they were, transformers' CLIPModel reads the tuned image tower that
    tofu-export scored and the source's text features."""
    import transformers
    from safetensors import safe_open

    from tofu_export.finetune.job import finetune

    _, data, _, _ = tuned_hf
    tiny_two_towers("CLIPModel", tmp_path / "clip")
    (tmp_path / "clip" / "tokenizer_config.json").write_text("{}")  # a companion file goes back with the weights
    source = load_model(tmp_path / "clip")
    assert source.arch.name == "CLIPVisionModelWithProjection"
    finetune(source, data, tofu_export.ToFuConfig(r=4), DistillSettings(steps=3, batch=4, lr=1e-2),
             tmp_path / "tuned", images=8, holdout=8, progress=False)
    assert sorted(p.name for p in (tmp_path / "tuned").iterdir()) == [
        "config.json", "loss.png", "model.safetensors", "tofu_finetune.json", "tokenizer_config.json"]
    back, whole = load_model(tmp_path / "tuned"), transformers.CLIPModel.from_pretrained(tmp_path / "tuned").eval()
    assert any("tuned by tofu-export finetune" in note for note in back.arch.notes)
    _only_vectors_moved(source.model, back.model)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([[0, 5, 7, 1]])
    with torch.no_grad():
        embeds = whole.get_image_features(pixel_values=images)
        embeds = embeds if isinstance(embeds, torch.Tensor) else embeds.pooler_output
        torch.testing.assert_close(back.model(images), embeds, rtol=0, atol=1e-6)
        original = transformers.CLIPModel.from_pretrained(tmp_path / "clip").eval()  # read as the tuned one is
        texts = [m.get_text_features(input_ids=ids) for m in (whole, original)]
        texts = [t if isinstance(t, torch.Tensor) else t.pooler_output for t in texts]
        torch.testing.assert_close(texts[0], texts[1], rtol=0, atol=0)
    with safe_open(str(tmp_path / "clip" / "model.safetensors"), "pt") as old, \
            safe_open(str(tmp_path / "tuned" / "model.safetensors"), "pt") as new:
        assert set(old.keys()) == set(new.keys())
        kept = [k for k in old.keys() if k.startswith(("text_model.", "text_projection", "logit_scale"))]  # noqa: SIM118
        assert kept and all(torch.equal(old.get_tensor(k), new.get_tensor(k)) for k in kept)

OPEN_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                             "head_width": 16},
             "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}


def _open_clip_hub(folder: Path, config: dict, text_dtype: torch.dtype = torch.float32) -> Path:
    """A hub folder of a tiny random open_clip CLIP (``config``), its text tower stored as ``text_dtype``."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = open_clip.CLIP(**config).state_dict()
    folder.mkdir()
    save_file({k: (v if k.startswith("visual.") else v.to(text_dtype)).contiguous() for k, v in state.items()},
              folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {
        "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}}))
    return folder


def _open_clip_reads_it_as_loaded(folder: Path) -> None:
    """open_clip's own ``local-dir:`` loader and tofu-export's read the tuned folder as the same tower."""
    import open_clip

    loaded = load_model(folder)
    theirs = open_clip.create_model(f"local-dir:{folder}").eval()
    images = torch.randn(2, 3, loaded.img_size, loaded.img_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images), theirs.encode_image(images), rtol=0, atol=1e-6)
    assert any("tuned by tofu-export finetune" in note for note in loaded.arch.notes), loaded.arch.notes


@pytest.fixture(scope="module")
def tuned_open_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, dict]:
    """One fine-tuning of a tiny random open_clip hub folder (its text tower in float16) through the command:
    (source folder, data folder, tuned folder, its --json report)."""
    pytest.importorskip("open_clip")
    work = tmp_path_factory.mktemp("finetune_open_clip")
    source = _open_clip_hub(work / "hub", OPEN_CLIP, torch.float16)
    data = _folder(work / "data")
    out = work / "tuned"
    result = _invoke(source, data, "--r", 4, "--steps", 12, "--batch", 4, "--lr", "1e-3", "--images", 12,
                     "--holdout", 8, "--threads", 1, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    return source, data, out, json.loads(result.stdout)


def test_an_open_clip_folder_is_written_back_whole_and_open_clip_loads_it(tuned_open_clip) -> None:
    """The CLIP model as it was (the text tower's tensors and dtypes), the tuned tower in float32, the same config:
    open_clip loads it as the tower tofu-export scored."""
    from safetensors import safe_open

    from tofu_export.finetune.origin import tuned_origin

    source, data, out, report = tuned_open_clip
    assert sorted(p.name for p in out.iterdir()) == ["loss.png", "open_clip_config.json",
                                                    "open_clip_model.safetensors", "tofu_finetune.json"]
    assert _usual_mode(*out.iterdir())
    assert json.loads((out / "open_clip_config.json").read_text()) == json.loads(
        (source / "open_clip_config.json").read_text())
    with safe_open(str(source / "open_clip_model.safetensors"), "pt") as old, \
            safe_open(str(out / "open_clip_model.safetensors"), "pt") as new:
        assert set(old.keys()) == set(new.keys())
        text = [k for k in old.keys() if not k.startswith("visual.")]  # noqa: SIM118
        assert text and all(old.get_tensor(k).dtype == torch.float16 for k in text)
        assert all(torch.equal(old.get_tensor(k), new.get_tensor(k)) and new.get_tensor(k).dtype == torch.float16
                   for k in text)
        assert {new.get_tensor(k).dtype for k in new.keys() if k.startswith("visual.")} == {torch.float32}  # noqa: SIM118
        assert new.metadata()["written_by"] == "tofu-export finetune"
    _open_clip_reads_it_as_loaded(out)
    original, loaded = load_model(source), load_model(out)
    _only_vectors_moved(original.model, loaded.model)
    assert _rescored(original.model, loaded.model, data, 4, 12, 8) == pytest.approx(report["held_out_after"]["mean"],
                                                                                    abs=1e-6)
    assert tuned_origin(out).path == source.resolve()


@pytest.mark.parametrize("kind", ["training checkpoint at another size", "timm trunk"])
def test_other_open_clip_checkpoints_are_written_back_as_folders_open_clip_loads(tuned_open_clip, tmp_path,
                                                                                 kind) -> None:
    """A training ``.pt`` (wrapped, with optimizer state) named by ``--arch`` and tuned at another input size (the
    config states the new size); a SigLIP-style tower that is a timm model alone (``visual.trunk.*``), which loads
    as a timm model and goes back as an open_clip folder."""
    from tofu_export.finetune.job import finetune

    _, data, _, _ = tuned_open_clip
    if kind == "timm trunk":
        config = {"embed_dim": 96, "vision_cfg": {"image_size": 160, "timm_model_name": "test_vit3",
                                                  "timm_model_pretrained": False, "timm_pool": "map",
                                                  "timm_proj": "none"}, "text_cfg": OPEN_CLIP["text_cfg"]}
        source = load_model(_open_clip_hub(tmp_path / "hub", config))
        assert source.family.name == "timm"
    else:
        from safetensors.torch import load_file

        hub = _open_clip_hub(tmp_path / "hub", OPEN_CLIP)
        state = load_file(hub / "open_clip_model.safetensors")
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()},
                    "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}, tmp_path / "epoch_3.pt")
        (tmp_path / "tiny.json").write_text(json.dumps(OPEN_CLIP))
        source = load_model(tmp_path / "epoch_3.pt", arch=f"open_clip:{tmp_path / 'tiny.json'}", img_size=48)
    finetune(source, data, tofu_export.ToFuConfig(r=4), DistillSettings(steps=3, batch=4, lr=1e-2),
             tmp_path / "tuned", images=8, holdout=8, progress=False)
    _open_clip_reads_it_as_loaded(tmp_path / "tuned")
    written = json.loads((tmp_path / "tuned" / "open_clip_config.json").read_text())["model_cfg"]
    assert written["vision_cfg"]["image_size"] == (160 if kind == "timm trunk" else 48)
    assert written["text_cfg"] == OPEN_CLIP["text_cfg"]


def test_writing_an_open_clip_folder_back_reads_no_visual_weight_of_a_safetensors_source(tuned_open_clip, tmp_path,
                                                                                       safetensors_reads) -> None:
    """The tuned tower replaces the source's: of a safetensors source only the other tensors are read (the visual
    ones' shapes come from its header), so the old tower is never held beside the new one."""
    from tofu_export.finetune.job import finetune

    source, data, _, _ = tuned_open_clip
    loaded = load_model(source)
    safetensors_reads.clear()  # the load reads the tower; what follows is the job's writing
    finetune(loaded, data, tofu_export.ToFuConfig(r=4), DistillSettings(steps=1, batch=4), tmp_path / "tuned",
             images=8, holdout=8, progress=False)
    assert safetensors_reads and not [key for key in safetensors_reads if key.startswith("visual.")]
    _open_clip_reads_it_as_loaded(tmp_path / "tuned")


def test_an_open_clip_source_changed_after_loading_is_not_written_beside(tuned_open_clip, tmp_path) -> None:
    """The text tower is read again when the tuned tower is written: a source whose bytes changed since it was
    loaded is refused, and nothing is left behind."""
    import shutil

    from tofu_export.errors import UserError
    from tofu_export.finetune.job import finetune

    source, data, _, _ = tuned_open_clip
    shutil.copytree(source, tmp_path / "hub")
    loaded = load_model(tmp_path / "hub")
    with open(tmp_path / "hub" / "open_clip_model.safetensors", "ab") as handle:
        handle.write(b" ")
    with pytest.raises(UserError, match="changed after it was loaded"):
        finetune(loaded, data, tofu_export.ToFuConfig(r=4), DistillSettings(steps=1, batch=4), tmp_path / "tuned",
                 images=8, holdout=8, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub"]

def test_a_hint_on_a_positional_argument_names_it_as_typed(tiny_checkpoint, tmp_path) -> None:
    """DATA is an argument of finetune (as of eval and calibrate), not a flag: the hint says 'DATA: ...', where it
    said 'Use --data ...' (export's --data is a flag and keeps its form)."""
    from tofu_export.cli.errors import render_hint
    from tofu_export.errors import Hint

    result = _invoke(tiny_checkpoint, tmp_path / "nowhere", "--r", R, "-o", tmp_path / "t.safetensors")
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "DATA: a folder of images" in said and "--data" not in said, said
    hint = Hint("data", None, "a folder of images", alternative=Hint("reference", "CKPT"))
    assert render_hint(hint, frozenset({"data"})) == "DATA: a folder of images, or --reference CKPT."
    assert render_hint(hint) == "Use --data a folder of images, or --reference CKPT."
