"""A transformers model of two towers (``CLIPModel``, ``SiglipModel``: what ``openai/clip-vit-*``, ``laion/*`` and
``google/siglip-*`` hold) read as its vision tower, a tuned tower written back into the whole model, and its text
tower read to classify zero-shot.

The vision class (``CLIPVisionModelWithProjection``, ``SiglipVisionModel``) is built from the full config's
``vision_config`` (CLIP's projection width from the top level), and takes the full checkpoint's vision keys
(``vision_model.*``, CLIP's ``visual_projection.*``), which are its own names: nothing else is read into it, and any
vision key missing, unexpected or mis-shaped is an error. Written back (``finetune``), the folder is the whole
model again: the source's ``config.json`` and its processor's and tokenizer's files, and
``model.safetensors`` with every tensor of the source as it was, the vision tower's replaced by the tuned ones.
The text tower (``CLIPTextModelWithProjection``, ``SiglipTextModel``) is read the same way from the text keys, and
encodes prompts tokenized by the folder's own tokenizer files (SigLIP's padded to the full length, as it was
trained).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tofu_export.checkpoint import CheckpointError, load_state_dict
from tofu_export.models.family import fit_problems
from tofu_export.models.write_back import check_maps_back, read_rest

__all__ = ["TWO_TOWERS", "VOCABULARIES", "load_text_tower", "load_vision_tower", "save_whole", "vision_class"]

# the two-tower class -> (its vision class, the prefixes of the vision tower's keys in the full checkpoint)
TWO_TOWERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "CLIPModel": ("CLIPVisionModelWithProjection", ("vision_model.", "visual_projection.")),
    "SiglipModel": ("SiglipVisionModel", ("vision_model.",)),
}
# the two-tower class -> (its text class, the prefixes of the text tower's keys, the output that is the embedding)
TEXT_TOWERS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "CLIPModel": ("CLIPTextModelWithProjection", ("text_model.", "text_projection."), "text_embeds"),
    "SiglipModel": ("SiglipTextModel", ("text_model.",), "pooler_output"),
}
# a tokenizer's vocabulary, one of which a folder holds for transformers to tokenize as the model was trained (without
# any, transformers 5 makes a tokenizer of the special tokens alone, and every word would be unknown)
VOCABULARIES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model", "vocab.txt")
# what goes back beside the weights: the config, and the files its processor and tokenizer read
_COMPANIONS = ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "spiece.model")


def vision_class(config: dict[str, Any]) -> tuple[str, str] | None:
    """``(two-tower class, vision class)`` where ``config`` (a ``config.json``) names a two-tower model, else None."""
    named = config.get("architectures") or []
    name = named[0] if isinstance(named, list) and named else None
    return (name, TWO_TOWERS[name][0]) if name in TWO_TOWERS else None


def _is_vision_key(name: str, two_towers: str) -> bool:
    return name.startswith(TWO_TOWERS[two_towers][1])


def _outer_prefix(tower: Any, prefix: str = "vision_model.") -> str:
    """What the full checkpoint puts before the tower class's own key names: nothing where the class keeps its
    ``prefix`` (CLIP's vision class, both text classes), ``prefix`` where it does not (SigLIP's vision class)."""
    return "" if any(name.startswith(prefix) for name in tower.state_dict()) else prefix


def _tower(folder: Path, two_towers: str, half: str, files: list[Path], trust_pickle: bool) -> Any:
    """The ``half`` ("vision" or "text") of the ``two_towers`` model in ``folder`` (weights ``files``), float32, eval
    mode."""
    import transformers

    tower_class, prefixes = (TWO_TOWERS if half == "vision" else TEXT_TOWERS)[two_towers][:2]
    config = getattr(transformers, two_towers.replace("Model", "Config")).from_pretrained(str(folder))
    own = getattr(config, f"{half}_config")
    if hasattr(config, "projection_dim"):  # CLIP: the projection's width is the full model's
        own.projection_dim = config.projection_dim
    model = getattr(transformers, tower_class)(own)
    outer = _outer_prefix(model, prefixes[0])
    state: dict[str, Tensor] = {}
    for path in files:
        state.update({name.removeprefix(outer): tensor
                      for name, tensor in load_state_dict(path, trust_pickle=trust_pickle).items()
                      if name.startswith(prefixes)})
    problems = fit_problems({name: tensor.shape for name, tensor in model.state_dict().items()},
                            {name: tensor.shape for name, tensor in state.items()}, tower_class)
    if problems:
        raise CheckpointError(f"{folder}'s {half} tower does not fit {tower_class} built from its config.json: "
                              f"{'; '.join(problems)}")
    model.load_state_dict(state, strict=True)  # copied into the float32 parameters
    return model.eval()


def load_vision_tower(folder: Path, two_towers: str, files: list[Path], trust_pickle: bool) -> Any:
    """The vision tower of the ``two_towers`` model in ``folder`` (weights ``files``), float32, eval mode."""
    return _tower(folder, two_towers, "vision", files, trust_pickle)


def load_text_tower(folder: Path, two_towers: str, files: list[Path], trust_pickle: bool) -> Any:
    """The text tower of the ``two_towers`` model in ``folder`` (weights ``files``) with the folder's tokenizer, as
    ``prompts [K] -> embeddings [K, D]`` (the full model's ``get_text_features``)."""
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in VOCABULARIES):  # transformers would make an empty one
        raise CheckpointError(f"{folder} has no tokenizer transformers can read (none of {', '.join(VOCABULARIES)}), "
                              "and its prompts need the model's own: copy the tokenizer's files from the model's hub "
                              "folder beside its config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)  # before any weight is read
    except (OSError, ValueError, TypeError, ImportError) as error:
        raise CheckpointError(f"{folder} has no tokenizer transformers can read (its tokenizer's files are needed to "
                              f"classify zero-shot): {str(error).splitlines()[0]}") from error
    model = _tower(folder, two_towers, "text", files, trust_pickle)
    output = TEXT_TOWERS[two_towers][2]
    padding = "max_length" if two_towers == "SiglipModel" else True  # SigLIP was trained on prompts padded in full
    length = model.config.max_position_embeddings

    @torch.no_grad()
    def encode(prompts: Sequence[str]) -> Tensor:
        tokens = tokenizer(list(prompts), padding=padding, truncation=True, max_length=length, return_tensors="pt")
        inputs = {key: tokens[key] for key in ("input_ids", "attention_mask") if key in tokens}
        return getattr(model(**inputs), output).float()

    return encode


def save_whole(tower: Any, two_towers: str, source: Path, folder: Path, files: list[Path]) -> None:
    """Write the tuned vision ``tower`` back into the whole ``two_towers`` model of ``source`` (weights ``files``),
    in the existing empty ``folder``: ``model.safetensors`` (the source's tensors, the vision tower's replaced, in
    float32), the source's config (its vision image size the tower's) and its processor's and tokenizer's files."""
    from tofu_export.weights_file import save_safetensors

    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    vision, size = config.get("vision_config", {}), tower.config.image_size
    rest, shapes = read_rest(files, lambda name: _is_vision_key(name, two_towers))
    outer = _outer_prefix(tower)
    tuned = {f"{outer}{name}": tensor.detach().float() for name, tensor in tower.state_dict().items()}
    resized = vision.get("image_size") != size  # tuned at another input size: its position table resampled
    check_maps_back(source, shapes, tuned, {key for key in shapes if ".embeddings.position" in key} if resized else ())
    save_safetensors({**rest, **tuned}, folder / "model.safetensors", {"format": "pt"})
    for name in _COMPANIONS:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    if resized:
        config["vision_config"] = {**vision, "image_size": size}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
