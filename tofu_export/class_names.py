"""What zero-shot classification names each class with, and in which words; read without torch (the CLI checks
these before any model is loaded).

A class is named by its folder (``golden_retriever`` -> "golden retriever"), unless a file names the classes in
their index order: a JSON list of names, a JSON object ``{"0": "T-shirt/top", ...}``, or a text file of one name a
line. Without a file given, ``labels.json`` in the data folder is read where there is one (``scripts/prepare_data.py``
writes it for Fashion-MNIST and MNIST, whose class folders are numbers). Each name goes into every prompt in place
of ``{}`` (CLIP's ensemble: the prompts' embeddings are averaged per class).

CLIP's own ImageNet protocol is named rather than written out: ``open_clip:imagenet`` as the class names is the
1,000 names CLIP's authors wrote for ImageNet's classes (in index order, which is also the sorted order of the
synset folders of ImageNet's ``val/``), and as a prompt their 80 templates (``open_clip:imagenet-simple``: the 7
that do as well); open_clip ships both (``open_clip.zero_shot_metadata``), read when first used.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tofu_export.errors import EvaluationError, Hint

__all__ = ["DEFAULT_PROMPT", "LABELS_FILE", "NAMED_CLASSES", "NAMED_PROMPTS", "ZeroShot", "class_names",
           "read_class_names"]

DEFAULT_PROMPT = "a photo of a {}."  # CLIP's own, for ImageNet
LABELS_FILE = "labels.json"
_FILE_KINDS = "(a JSON list or object, or one name a line, or open_clip:imagenet)"
# a name -> the list of open_clip.zero_shot_metadata it stands for
NAMED_CLASSES = {"open_clip:imagenet": "IMAGENET_CLASSNAMES"}
NAMED_PROMPTS = {"open_clip:imagenet": "OPENAI_IMAGENET_TEMPLATES",
                 "open_clip:imagenet-simple": "SIMPLE_IMAGENET_TEMPLATES"}


def _open_clip_list(name: str) -> list[Any]:
    """open_clip's ``zero_shot_metadata.<name>``, or an error naming the extra."""
    try:
        from open_clip import zero_shot_metadata
    except ImportError as error:
        raise EvaluationError("open_clip's ImageNet class names and prompts come with open_clip, which is not "
                              "installed", hint=Hint("checkpoint", None, "pip install 'tofu-export[openclip]'")
                              ) from error
    return list(getattr(zero_shot_metadata, name))


@dataclass(frozen=True)
class ZeroShot:
    """Zero-shot classification with a two-tower model's text tower: each class named in ``prompts`` (``{}`` is
    the class name), the names read from ``names_file`` (None: the data's ``labels.json``, else its class folders)."""

    prompts: tuple[str, ...] = (DEFAULT_PROMPT,)
    names_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.prompts:
            raise EvaluationError("zero-shot classification needs at least one prompt",
                                  hint=Hint("prompt", f'"{DEFAULT_PROMPT}"'))
        for prompt in self.prompts:
            if prompt.startswith("open_clip:") and prompt not in NAMED_PROMPTS:
                raise EvaluationError(f"open_clip has no prompt set {prompt!r}; it has {', '.join(NAMED_PROMPTS)}",
                                      hint=Hint("prompt", "open_clip:imagenet"))
            if prompt not in NAMED_PROMPTS and prompt.count("{}") != 1:
                raise EvaluationError(f"the prompt {prompt!r} must hold {{}} once, where the class name goes",
                                      hint=Hint("prompt", f'"{DEFAULT_PROMPT}"'))
        named = self.names_file is not None and str(self.names_file) in NAMED_CLASSES
        if self.names_file is not None and not named and not self.names_file.is_file():
            raise EvaluationError(f"the class names file {self.names_file} does not exist",
                                  hint=Hint("class_names", "FILE", _FILE_KINDS))

    @functools.cached_property
    def templates(self) -> tuple[str, ...]:
        """The prompts, a named set's written out (``{}`` where the class name goes)."""
        return tuple(template for prompt in self.prompts for template in (
            [make("{}") for make in _open_clip_list(NAMED_PROMPTS[prompt])] if prompt in NAMED_PROMPTS else [prompt]))

    def note(self, classes: int, names_from: str) -> str:
        """What a zero-shot score is: how many classes, named from where, in which prompts."""
        count = len(self.templates)
        said = (", ".join(self.prompts) if any(prompt in NAMED_PROMPTS for prompt in self.prompts) else
                repr(self.templates[0]) + ", ..." * (count > 1))
        return (f"zero-shot: {classes} classes named from {names_from}, each in {count} prompt{'s' * (count > 1)} "
                f"({said}), scored by the cosine of the image embedding to each class's text embedding")

    def texts(self, names: Sequence[str]) -> list[str]:
        """Every prompt for every class, class by class: ``[K * P]``."""
        return [template.replace("{}", name) for name in names for template in self.templates]


def read_class_names(file: Path) -> list[str]:
    """The class names ``file`` lists in index order: a JSON list, a JSON object keyed ``"0"`` to ``"K-1"``, or
    text, one name a line (blank lines skipped); a name of ``NAMED_CLASSES``: that list."""
    if str(file) in NAMED_CLASSES:
        return _open_clip_list(NAMED_CLASSES[str(file)])
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise EvaluationError(f"the class names file {file} is not readable text: {error}") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):
        keys = sorted(data, key=lambda key: int(key) if str(key).isdigit() else -1)
        if [str(key) for key in keys] != [str(index) for index in range(len(keys))]:
            raise EvaluationError(f"{file} names classes by the keys {', '.join(map(str, keys[:5]))}...: a JSON object "
                                  f"of class names must be keyed by every index from 0 to {len(keys) - 1}")
        data = [data[key] for key in keys]
    if not isinstance(data, list) or not data or not all(isinstance(name, str) and name.strip() for name in data):
        raise EvaluationError(f"{file} lists no class names: a JSON list of names, a JSON object keyed 0 to K-1, or "
                              "one name a line")
    return [name.strip() for name in data]


def class_names(data: Path, eval_dir: Path, names_file: Path | None) -> tuple[list[str], str]:
    """``(names, where they came from)``: each class of the image folder ``eval_dir`` (the split scored, in
    ``data``) named at its index (``evaluation.data``'s rule: a folder named by a number is that class index,
    other folders index by sorted name)."""
    folders = sorted(entry.name for entry in eval_dir.iterdir() if entry.is_dir())
    numbered = bool(folders) and all(name.isdigit() for name in folders)
    file = names_file or (data / LABELS_FILE if (data / LABELS_FILE).is_file() else None)
    if file is None:
        if numbered:
            shown = ", ".join(folders[:3]) + (", ..." if len(folders) > 3 else "")
            raise EvaluationError(f"the class folders of {eval_dir} are numbers ({shown}), which "
                                  "name no class for a prompt: give the class names in index order",
                                  hint=Hint("class_names", "FILE", _FILE_KINDS))
        return [name.replace("_", " ") for name in folders], f"the class folders of {eval_dir}"
    names = read_class_names(file)
    beyond = [name for name in folders if int(name) >= len(names)] if numbered else []
    if beyond or (not numbered and len(names) != len(folders)):
        said = (f"class folder {beyond[0]} is beyond them" if beyond else
                f"{eval_dir} holds {len(folders)} class folders, indexed by sorted name")
        raise EvaluationError(f"{file} names {len(names)} classes, but {said}: name every class in index order")
    return names, str(file)
