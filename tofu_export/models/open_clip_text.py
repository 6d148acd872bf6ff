"""The text tower of an open_clip checkpoint, for zero-shot classification with its visual tower.

The tower is built from the checkpoint's model config (``text_cfg``, as ``open_clip_config`` finds it) by open_clip's
own builder, and takes the checkpoint's text keys: CLIP's own layout keeps them at the top level
(``token_embedding.*``, ``transformer.*``, ``ln_final.*``, ``text_projection``), a custom text tower (SigLIP's)
under ``text.``; the visual tower's are never read from a safetensors file. Prompts are tokenized by the tokenizer
open_clip gives that config: its own BPE for CLIP's configs, a Hugging Face tokenizer from the hub folder's files
where the config names one (``hf_tokenizer_name``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tofu_export.checkpoint import CheckpointError
from tofu_export.models.family import TextEncoder, fit_problems
from tofu_export.models.hf_vit_towers import VOCABULARIES
from tofu_export.models.open_clip_config import PREFIX, config_beside, hub_config, open_clip_module
from tofu_export.models.open_clip_files import text_name, weights_file
from tofu_export.models.open_clip_load import read_tower

__all__ = ["load_open_clip_text"]

_BATCH = 256  # prompts encoded at once


def _tokenizer(path: Path, arch: str | None, text_cfg: dict[str, Any]) -> Callable[[list[str]], Tensor]:
    """open_clip's tokenizer for the checkpoint ``path``'s config: ``prompts [K] -> token ids [K, context]``."""
    open_clip = open_clip_module()
    name = arch.removeprefix(PREFIX) if arch else None
    folder = None if name else (path if path.is_dir() else path.parent if config_beside(path) else None)
    where = f"open_clip config {name}" if name else str(folder or path)
    hf_name = text_cfg.get("hf_tokenizer_name")
    if folder is not None and hf_name and not any((folder / file).is_file() for file in VOCABULARIES):
        raise CheckpointError(f"{folder}'s config tokenizes with the Hugging Face tokenizer {hf_name}, whose files are "
                              f"not in the folder (none of {', '.join(VOCABULARIES)}): copy them there from its hub "
                              "folder")  # else transformers makes a tokenizer of the special tokens alone
    try:
        if name in open_clip.list_models():
            return open_clip.get_tokenizer(name)
        if folder is not None:  # the config beside the weights, and a named tokenizer's files with it
            return open_clip.get_tokenizer(f"local-dir:{folder}")
        if not hf_name:
            from open_clip.tokenizer import SimpleTokenizer

            return SimpleTokenizer(context_length=int(text_cfg.get("context_length", 77)))
    except Exception as error:  # open_clip and the tokenizer libraries raise many kinds
        said = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"open_clip could not make the tokenizer of {where}: {said}") from error
    raise CheckpointError(f"{where} names the Hugging Face tokenizer {hf_name}, whose files are "
                          "not here: put the config and the tokenizer's files in a hub folder beside the weights")


def load_open_clip_text(path: Path, *, arch: str | None, trust_pickle: bool) -> TextEncoder:
    """The text tower of the open_clip checkpoint ``path`` (a file or a hub folder; ``arch`` names its config as
    for the visual tower), float32, eval mode, as ``prompts [K] -> embeddings [K, D]`` (CLIP's ``encode_text``)."""
    open_clip_module()
    from open_clip.model import _build_text_tower

    model_cfg = hub_config(path, arch)["model_cfg"]
    text_cfg = dict(model_cfg.get("text_cfg") or {})
    if text_cfg.get("hf_model_name"):
        raise CheckpointError(f"the text tower of {path} is the Hugging Face model {text_cfg['hf_model_name']}, "
                              "which open_clip downloads to build: zero-shot classification reads open_clip's own "
                              "text towers only")
    tokenize = _tokenizer(path, arch, text_cfg)  # before any weight is read
    tower = _build_text_tower(int(model_cfg.get("embed_dim", 512)), text_cfg,
                              quick_gelu=bool(model_cfg.get("quick_gelu", False)))
    expected = {name: tuple(tensor.shape) for name, tensor in tower.state_dict().items()}
    file = weights_file(path)
    state = read_tower(file, set(expected), trust_pickle, name_of=text_name)
    problems = fit_problems(expected, {name: tuple(tensor.shape) for name, tensor in state.items()}, "its config")
    if problems:
        raise CheckpointError(f"the text tower in {file} does not fit its open_clip config: {'; '.join(problems)}")
    tower.load_state_dict(state, strict=True)
    tower.eval()

    @torch.no_grad()
    def encode(prompts: Sequence[str]) -> Tensor:
        return torch.cat([_run(tower, tokenize(list(prompts[start:start + _BATCH])))
                          for start in range(0, len(prompts), _BATCH)]).float()

    return encode


def _run(tower: nn.Module, tokens: Tensor) -> Tensor:
    """``tower(tokens)`` for token ids ``[K, context]``; a causal tower pooled at the end-of-text token (CLIP's:
    the highest id) runs on the first ``L`` positions only, ``L`` the longest prompt's: no position attends to a
    later one, so what the pooled token sees is the same (a prompt of 10 tokens in a context of 77: ~1/7 the work)."""
    causal = getattr(tower, "attn_mask", None)
    if (causal is None or getattr(tower, "pool_type", None) != "argmax" or getattr(tower, "cls_emb", None) is not None
            or getattr(tower, "use_pad_mask", False)):
        return tower(tokens)
    length = int(tokens.argmax(dim=-1).max()) + 1
    tower.attn_mask = causal[:length, :length]  # the positions kept; the positional table is sliced by the tower
    try:
        return tower(tokens[:, :length])
    finally:
        tower.attn_mask = causal
