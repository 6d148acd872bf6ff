"""Zero-shot classification with a two-tower model's text tower (``eval --zero-shot``): the text embeddings are the
library's own (open_clip's ``encode_text``, transformers' ``get_text_features``), the class embeddings CLIP's
prompt ensemble, the scores what the full model scores; class names come from a file, ``labels.json`` or the
folders; and what cannot be classified zero-shot is refused with what to do, before any model is loaded.

The models are tiny random ones: an open_clip ``CLIP`` (open_clip's own BPE vocabulary, so its tokenizer is the
real one), and transformers ``CLIPModel`` / ``SiglipModel`` with a word-level tokenizer and SigLIP's own
(sentencepiece) tokenizer saved beside them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from two_towers import OPEN_CLIP_IMG, OPEN_CLIP_PREPROCESS, OPEN_CLIP_VISION, tiny_two_towers

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from tofu_export.class_names import ZeroShot, class_names  # noqa: E402
from tofu_export.cli import app  # noqa: E402
from tofu_export.errors import EvaluationError, UserError  # noqa: E402
from tofu_export.evaluation import image_folder, model_transform  # noqa: E402
from tofu_export.evaluation.zero_shot import class_embeddings  # noqa: E402
from tofu_export.models.family import patched  # noqa: E402
from tofu_export.models.loading import load_model, text_encoder  # noqa: E402

pytestmark = [pytest.mark.usefixtures("single_thread", "shared_traces"), pytest.mark.filterwarnings("ignore")]

IMG = OPEN_CLIP_IMG
CONFIG = {"embed_dim": 32, "vision_cfg": OPEN_CLIP_VISION,  # the visual tower test_open_clip_load exports too
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
PREPROCESS = OPEN_CLIP_PREPROCESS
CLASSES = ("golden_retriever", "tabby_cat", "fire_truck")
PROMPTS = ["a photo of a {}.", "a blurry photo of the {}"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An open_clip hub folder, the same weights as a bare safetensors file with its config as a JSON file, a hub
    folder of a ``CustomTextCLIP`` and an image folder of three named classes (4 images each)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = open_clip.CLIP(**CONFIG).state_dict()
    root = tmp_path_factory.mktemp("zero_shot")
    (root / "hub").mkdir()
    save_file(state, root / "hub" / "open_clip_model.safetensors")
    (root / "hub" / "open_clip_config.json").write_text(json.dumps({"model_cfg": CONFIG, "preprocess_cfg": PREPROCESS}))
    save_file(state, root / "bare.safetensors")
    (root / "tiny.json").write_text(json.dumps(CONFIG))
    custom = {**CONFIG, "text_cfg": {**CONFIG["text_cfg"], "pool_type": "last", "no_causal_mask": True}}
    (root / "custom").mkdir()  # SigLIP's layout: a custom text tower, its keys under text.
    save_file(open_clip.CustomTextCLIP(**custom).state_dict(), root / "custom" / "open_clip_model.safetensors")
    (root / "custom" / "open_clip_config.json").write_text(json.dumps({"model_cfg": {**custom, "custom_text": True}}))
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / "data" / name).mkdir(parents=True)
        for k in range(4):
            Image.fromarray(rng.integers(0, 256, (IMG, IMG, 3), dtype=np.uint8)).save(root / "data" / name / f"{k}.png")
    return {"hub": root / "hub", "bare": root / "bare.safetensors", "json": root / "tiny.json", "data": root / "data",
            "custom": root / "custom", "root": root}


@pytest.fixture(scope="module")
def full(files: dict[str, Path]) -> Any:
    """open_clip's own model of the hub folder, and its own tokenizer."""
    where = f"local-dir:{files['hub']}"
    return open_clip.create_model(where).eval(), open_clip.get_tokenizer(where)


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})
    return result.exit_code, result.output


def test_the_open_clip_text_tower_is_open_clips_encode_text(files: dict[str, Path], full: Any,
                                                            safetensors_reads: list[str]) -> None:
    """A hub folder, a bare file with its config named, and a custom text tower's folder (keys under ``text.``):
    the embeddings are open_clip's ``encode_text`` of its own tokens; of a safetensors file no visual tensor is
    read."""
    model, tokenize = full
    custom = open_clip.create_model(f"local-dir:{files['custom']}").eval()
    prompts = ["a photo of a golden retriever.", "a tabby cat", ""]
    with torch.no_grad():
        expected = model.encode_text(tokenize(prompts))
        expected_custom = custom.encode_text(tokenize(prompts))
    for path, arch, wanted in ((files["hub"], None, expected), (files["bare"], f"open_clip:{files['json']}", expected),
                               (files["custom"], None, expected_custom)):
        safetensors_reads.clear()
        got = text_encoder(path, arch=arch)(prompts)
        torch.testing.assert_close(got, wanted, rtol=0, atol=1e-6)
        assert safetensors_reads and not [name for name in safetensors_reads if name.startswith("visual.")]


def test_class_embeddings_are_clips_prompt_ensemble(files: dict[str, Path], full: Any) -> None:
    """Each class: its prompts' embeddings normalised, averaged, normalised again; one row per class, in order."""
    names = ["golden retriever", "tabby cat", "fire truck"]
    got = class_embeddings(text_encoder(files["hub"]), names, ZeroShot(tuple(PROMPTS)))
    expected = _open_clip_classes(full, names, PROMPTS)
    assert got.shape == (3, CONFIG["embed_dim"])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def _open_clip_classes(full: Any, names: list[str], prompts: list[str]) -> torch.Tensor:
    """``[K, D]``: CLIP's prompt ensemble by open_clip's own model and tokenizer, written out here."""
    model, tokenize = full
    with torch.no_grad():
        return torch.stack([F.normalize(F.normalize(model.encode_text(tokenize(
            [prompt.replace("{}", name) for prompt in prompts])), dim=-1).mean(0), dim=0) for name in names])


def _top1(logits_of: Any, data: Path, transform: Any) -> float:
    """Top-1 in % of ``logits_of(images [1, 3, H, W]) -> [1, K]`` on ``data``, outside the evaluation loops."""
    dataset = image_folder(data, transform)
    with torch.no_grad():
        hits = [int(logits_of(image.unsqueeze(0)).argmax()) == label for image, label in dataset]
    return 100.0 * sum(hits) / len(hits)


def _open_clip_top1(full: Any, names: list[str], data: Path, transform: Any,
                    prompts: list[str] = PROMPTS) -> tuple[float, torch.Tensor]:
    """open_clip's own zero-shot top-1 in % of the full model on ``data`` (``names`` in ``prompts``: its image and
    text encoders, its logit scale), and its class embeddings ``[K, D]``."""
    model, texts = full[0], _open_clip_classes(full, names, prompts)
    top1 = _top1(lambda images: model.logit_scale.exp() * model.encode_image(images, normalize=True) @ texts.T,
                 data, transform)
    return top1, texts


def test_eval_scores_what_the_full_model_scores(files: dict[str, Path], full: Any) -> None:
    """``eval --zero-shot`` (classes named by their folders, two prompts): the unreduced top-1 is open_clip's own
    zero-shot top-1 (its image and text encoders, its logit scale); ToFu's is the patched tower's; ToMe is scored
    against the same classes; the report says what the classes and prompts were."""
    code, output = _invoke("eval", str(files["hub"]), str(files["data"]), "--zero-shot", "--prompt", PROMPTS[0],
                           "--prompt", PROMPTS[1], "--r", "2", "--json")
    assert code == 0, output[-3000:]
    report = json.loads(output[output.index("{"):])
    assert report["task"] == "classification" and report["n_eval"] == 12
    assert report["zero_shot"]["classes"] == ["fire truck", "golden retriever", "tabby cat"]  # sorted folders
    assert report["zero_shot"]["prompts"] == PROMPTS and "class folders" in report["zero_shot"]["class_names"]
    assert any(note.startswith("zero-shot: 3 classes") for note in report["notes"])
    tower = load_model(files["hub"]).model
    unreduced, texts = _open_clip_top1(full, report["zero_shot"]["classes"], files["data"], model_transform(tower))
    assert report["metrics"]["reference_top1"] == pytest.approx(unreduced)
    with patched(tower, r=2, mode="tofu"):
        reduced = _top1(lambda images: F.normalize(tower(images), dim=-1) @ texts.T, files["data"],
                        model_transform(tower))
    assert report["metrics"]["candidate_top1"] == pytest.approx(reduced)
    assert report["tome"]["candidate_top1"] is not None and report["vs_tome"] is None  # accuracies: nothing paired


def test_an_exported_tower_is_scored_with_its_checkpoints_text_tower(files: dict[str, Path], tmp_path: Path) -> None:
    """An ONNX artifact: its image embeddings from ONNX Runtime, the class embeddings from the text tower of the
    checkpoint its manifest records; the unreduced model is that checkpoint's, scored as the checkpoint's own eval
    scores it."""
    code, output = _invoke("export", str(files["hub"]), "--r", "2", "--out", str(tmp_path / "out"), "--no-bench")
    assert code == 0, output[-3000:]
    scored = {}
    for name, model in (("artifact", tmp_path / "out" / "model.onnx"), ("checkpoint", files["hub"])):
        code, output = _invoke("eval", str(model), str(files["data"]), "--zero-shot", "--r", "2", "--no-compare-tome",
                               "--json")
        assert code == 0, output[-3000:]
        scored[name] = json.loads(output[output.index("{"):])
    artifact, checkpoint = scored["artifact"], scored["checkpoint"]
    assert Path(artifact["zero_shot"]["text_tower"]).resolve() == files["hub"].resolve()
    assert artifact["metrics"]["reference_top1"] == checkpoint["metrics"]["reference_top1"]
    assert artifact["metrics"]["top1_agreement"] >= 100.0 * 11 / 12  # float32 ORT vs PyTorch: one tie may flip
    assert abs(artifact["metrics"]["candidate_top1"] - checkpoint["metrics"]["candidate_top1"]) <= 100.0 / 12 + 1e-9


def test_clips_imagenet_protocol_is_named(files: dict[str, Path], full: Any) -> None:
    """``--class-names open_clip:imagenet --prompt open_clip:imagenet-simple``: CLIP's names of ImageNet's 1,000
    classes and its prompts, as open_clip ships them; ImageNet-indexed class folders (foolbox's samples' layout)
    are scored over all 1,000 classes, as open_clip's own model scores them. An unknown set is refused."""
    from open_clip import zero_shot_metadata

    from tofu_export.class_names import read_class_names

    simple = ZeroShot(("open_clip:imagenet-simple",))
    assert simple.templates == tuple(make("{}") for make in zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES)
    assert len(ZeroShot(("open_clip:imagenet", "a {}")).templates) == 81
    names = read_class_names(Path("open_clip:imagenet"))
    assert names == list(zero_shot_metadata.IMAGENET_CLASSNAMES) and len(names) == 1000
    with pytest.raises(EvaluationError, match="open_clip has no prompt set 'open_clip:cifar'"):
        ZeroShot(("open_clip:cifar",))
    data = files["root"] / "imagenet"
    for index, source in (("0022", "fire_truck"), ("0243", "tabby_cat")):  # 22: "bald eagle", 243: "Bullmastiff"
        (data / index).mkdir(parents=True)
        for image in sorted((files["data"] / source).iterdir())[:2]:
            (data / index / image.name).write_bytes(image.read_bytes())
    code, output = _invoke("eval", str(files["hub"]), str(data), "--zero-shot", "--class-names", "open_clip:imagenet",
                           "--prompt", "open_clip:imagenet-simple", "--r", "2", "--no-compare-tome", "--json")
    assert code == 0, output[-3000:]
    report = json.loads(output[output.index("{"):])
    assert report["zero_shot"]["classes"] == names and report["zero_shot"]["prompts"] == list(simple.templates)
    assert "each in 7 prompts (open_clip:imagenet-simple)" in report["notes"][0]
    unreduced, _ = _open_clip_top1(full, names, data, model_transform(load_model(files["hub"]).model),
                                   list(simple.templates))
    assert report["metrics"]["reference_top1"] == pytest.approx(unreduced)


def test_class_embeddings_are_kept_for_the_next_command(files: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A second eval of the same checkpoint, names and prompts reads the class embeddings an earlier one kept (its
    text tower not loaded) and scores the same; other prompts, the weights built from a named config, or an entry
    that is not readable, are encoded again;
    ``TOFU_EXPORT_CLASS_CACHE=off`` keeps nothing."""
    from tofu_export.models import loading

    monkeypatch.setenv("TOFU_EXPORT_CLASS_CACHE", str(tmp_path / "cache"))
    args = ["eval", str(files["hub"]), str(files["data"]), "--zero-shot", "--r", "2", "--no-compare-tome", "--json"]

    def run(*extra: str) -> dict[str, Any]:
        code, output = _invoke(*args, *extra)
        assert code == 0, output[-3000:]
        return json.loads(output[output.index("{"):])

    first = run()
    (entry,) = (tmp_path / "cache").iterdir()
    encoder = loading.text_encoder
    monkeypatch.setattr(loading, "text_encoder", None)  # loading the text tower would fail the command
    second = run()
    assert second["metrics"] == first["metrics"] and any(str(entry) in note for note in second["notes"])
    assert not any("read from" in note for note in first["notes"])
    monkeypatch.setattr(loading, "text_encoder", encoder)
    run("--prompt", "a blurry photo of the {}")  # other prompts: another entry
    run("--arch", f"open_clip:{files['json']}")  # the same weights built from a config named: another entry
    assert len(list((tmp_path / "cache").iterdir())) == 3
    entry.write_bytes(b"not safetensors")
    again = run()
    assert again["metrics"] == first["metrics"] and not any("read from" in note for note in again["notes"])
    assert entry.read_bytes() != b"not safetensors"  # replaced by the embeddings computed again
    monkeypatch.setenv("TOFU_EXPORT_CLASS_CACHE", "off")
    run("--prompt", "art of the {}")
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_a_sweep_scores_every_point_zero_shot(files: dict[str, Path], full: Any, tmp_path: Path) -> None:
    """``sweep --zero-shot``: each point's ONNX graph classifies against the checkpoint's text tower; the unreduced
    accuracy beside it is open_clip's own zero-shot top-1; the JSON and the Markdown say how the points were scored.
    Without an image folder it is refused before anything is loaded, and a model name (no text tower) before any
    export."""
    code, output = _invoke("sweep", str(files["hub"]), "--r", "2", "--modes", "tofu", "--data", str(files["data"]),
                           "--zero-shot", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--iters", "2",
                           "-o", str(tmp_path / "sweep"), "--json")
    assert code == 0, output[-3000:]
    result = json.loads(output[output.index("{"):])
    (row,) = result["rows"]
    unreduced, _ = _open_clip_top1(full, ["fire truck", "golden retriever", "tabby cat"], files["data"],
                                   model_transform(load_model(files["hub"]).model))
    assert row["accuracy_metric"] == "top-1" and row["reference_accuracy"] == pytest.approx(unreduced)
    assert 0 <= row["accuracy"] <= 100 and result["notes"][0].startswith("zero-shot: 3 classes")
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert saved["notes"][0] == result["notes"][0]
    assert f"Scored: {result['notes'][0]}" in (tmp_path / "sweep" / "sweep.md").read_text()
    code, output = _invoke("sweep", str(files["hub"]), "--r", "2", "--zero-shot", "-o", str(tmp_path / "none"))
    assert code == 2 and "--data" in output and not (tmp_path / "none").exists()
    code, output = _invoke("sweep", "deit_tiny_patch16_224", "--r", "2", "--data", str(files["data"]), "--zero-shot",
                           "-o", str(tmp_path / "named"))  # a model name: no text tower, said before any export
    assert code == 2 and "no text tower" in output and not (tmp_path / "named" / "artifacts").exists()


def _word_tokenizer(folder: Path) -> None:
    """A word-level tokenizer (``<s> words </s>``, padded with ``</s>``) saved in ``folder`` as a transformers
    fast tokenizer: what ``AutoTokenizer`` reads from a hub folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["a", "photo", "of", "the", "blurry", "golden", "retriever", "tabby", "cat", "fire", "truck", "."]
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0),
                                                                                                   ("</s>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>", pad_token="</s>").save_pretrained(folder)


def _text_features(model: torch.nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model.get_text_features(**tokens)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _sentencepiece_tokenizer(folder: Path) -> None:
    """A SigLIP tokenizer (transformers' ``SiglipTokenizer``, sentencepiece's model trained here on a few prompts)
    saved in ``folder`` as ``google/siglip-*`` holds it: ``spiece.model`` and its configs."""
    import io

    import sentencepiece

    model = io.BytesIO()
    lines = ["a photo of a golden retriever.", "a blurry photo of the tabby cat", "fire truck", "itap of a dog"] * 20
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=40,
                                             model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                             minloglevel=2, hard_vocab_limit=False)
    (folder / "spiece.model").write_bytes(model.getvalue())
    transformers.SiglipTokenizer(vocab_file=str(folder / "spiece.model")).save_pretrained(folder)


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipModel"])
def test_a_two_tower_transformers_folder_encodes_text_as_get_text_features(name: str, tmp_path: Path) -> None:
    """A ``CLIPModel`` / ``SiglipModel`` folder: the text tower built from its config, its text keys read, prompts
    tokenized by the folder's tokenizer (SigLIP's own sentencepiece tokenizer, its prompts padded to the full
    length) give the full model's ``get_text_features``."""
    model = tiny_two_towers(name, tmp_path)
    (_word_tokenizer if name == "CLIPModel" else _sentencepiece_tokenizer)(tmp_path)
    prompts = ["a photo of a golden retriever .", "a blurry photo of the tabby cat"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (type(tokenizer).__name__ == "SiglipTokenizer") == (name == "SiglipModel")
    padding = "max_length" if name == "SiglipModel" else True
    tokens = tokenizer(prompts, padding=padding, truncation=True, max_length=8, return_tensors="pt")
    with torch.no_grad():
        expected = _text_features(model, dict(tokens))
    got = text_encoder(tmp_path)(prompts)
    assert got.shape == (2, 16 if name == "CLIPModel" else 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_class_names_come_from_a_file_labels_json_or_the_folders(tmp_path: Path) -> None:
    """Numbered class folders (Fashion-MNIST's layout) take ``labels.json``'s names, or a given file's (a JSON list
    or object, or text); named folders their own names; a count that does not fit is refused."""
    data = tmp_path / "data"
    for label in ("0", "1", "2"):
        (data / label).mkdir(parents=True)
    with pytest.raises(EvaluationError, match=r"class folders of .* are numbers"):
        class_names(data, data, None)
    (data / "labels.json").write_text(json.dumps({"1": "Trouser", "0": "T-shirt/top", "2": "Pullover"}))
    assert class_names(data, data, None) == (["T-shirt/top", "Trouser", "Pullover"], str(data / "labels.json"))
    lines = tmp_path / "names.txt"
    lines.write_text("shirt\n\ntrousers\npullover\nbag\n")
    assert class_names(data, data, lines)[0] == ["shirt", "trousers", "pullover", "bag"]  # more names than folders
    lines.write_text("shirt\ntrousers\n")
    with pytest.raises(EvaluationError, match="names 2 classes, but class folder 2 is beyond them"):
        class_names(data, data, lines)
    (data / "labels.json").write_text(json.dumps({"0": "a", "2": "c"}))
    with pytest.raises(EvaluationError, match="keyed by every index from 0 to 1"):
        class_names(data, data, None)
    named = tmp_path / "named"
    for folder in ("tabby_cat", "fire_truck"):
        (named / folder).mkdir(parents=True)
    assert class_names(named, named, None)[0] == ["fire truck", "tabby cat"]  # sorted: the index order
    lines.write_text("one\ntwo\nthree\n")
    with pytest.raises(EvaluationError, match="holds 2 class folders, indexed by sorted name"):
        class_names(named, named, lines)
    with pytest.raises(EvaluationError, match="must hold \\{\\} once"):
        ZeroShot(("a photo",))


def test_a_model_without_a_text_tower_is_refused_with_what_to_do(tiny_checkpoint: Path, files: dict[str, Path],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A timm checkpoint has no text tower: the error says what zero-shot needs and how an image encoder is scored
    instead; a CLIPModel folder, or an open_clip folder naming a Hugging Face tokenizer, without the tokenizer's
    files says so. Numbered folders without names are refused
    before any model is loaded."""
    with pytest.raises(UserError, match="without a text tower: zero-shot classification needs a two-tower model"):
        text_encoder(tiny_checkpoint)
    tiny_two_towers("CLIPModel", files["root"] / "no_tokenizer")  # weights and config, no tokenizer files
    with pytest.raises(UserError, match="has no tokenizer transformers can read"):
        text_encoder(files["root"] / "no_tokenizer")
    named = files["root"] / "named_tokenizer"  # an open_clip folder whose config names a Hugging Face tokenizer
    named.mkdir()
    config = json.loads((files["custom"] / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = "timm/ViT-B-16-SigLIP"
    (named / "open_clip_config.json").write_text(json.dumps(config))
    (named / "open_clip_model.safetensors").symlink_to(files["custom"] / "open_clip_model.safetensors")
    with pytest.raises(UserError, match="tokenizes with the Hugging Face tokenizer timm/ViT-B-16-SigLIP, whose files"):
        text_encoder(named)
    numbered = files["root"] / "numbered"
    (numbered / "0").mkdir(parents=True)
    from tofu_export.models import loading

    monkeypatch.setattr(loading, "load_model", None)  # loading a model would fail the test
    code, output = _invoke("eval", str(files["hub"]), str(numbered), "--zero-shot")
    assert code == 2 and "are numbers" in output and "--class-names" in output
