"""What a training checkpoint wraps around its weights: the wrapper keys (``{"model": sd, "epoch": 3}``, DDP's
``module``), the EMA copy (timm ``train.py --model-ema``, DeiT's ``main.py``) and the model it names (timm's training
record). Pure functions of the object ``torch.load`` returned; reading files safely is ``checkpoint.py``'s."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from tofu_export.checkpoint_limits import CheckpointError

WRAPPER_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema", "module")
EMA_KEYS = ("model_ema", "state_dict_ema")  # the EMA copies DeiT's main.py (model_ema) and timm's train.py save
PREPROCESSING_KEYS = ("mean", "std", "interpolation", "crop_pct", "crop_mode")  # of a timm pretrained_cfg


def unwrap(obj: Any) -> Any:
    """Descend through ``{"model": ...}``-style training wrappers and pickled modules to the state dict (preferring
    ``model``, then ``state_dict``, then the EMA copies, as timm's ``validate.py`` without ``--use-ema``)."""
    inner = _innermost(obj)
    return inner.state_dict() if isinstance(inner, nn.Module) else inner


def _innermost(obj: Any) -> Any:
    """What the training wrappers around ``obj`` hold: a state dict, a pickled module, or ``obj`` itself."""
    while isinstance(obj, Mapping) and (key := _inner_key(obj)) is not None:
        obj = obj[key]
    return obj


def _first_holding(wrapper: Any, keys: tuple[str, ...]) -> str | None:
    """The first of ``keys`` under which ``wrapper`` (a mapping) holds a state dict or a module, or None."""
    if not isinstance(wrapper, Mapping):
        return None
    return next((key for key in keys if isinstance(wrapper.get(key), Mapping | nn.Module)), None)


def _inner_key(wrapper: Mapping) -> str | None:
    """The first of ``WRAPPER_KEYS`` that holds a state dict or a module in ``wrapper``, or None."""
    return _first_holding(wrapper, WRAPPER_KEYS)


def _ema_copy(raw: Any) -> str | None:
    """The first of ``EMA_KEYS`` under which a training wrapper holds weights, or None."""
    return _first_holding(raw, EMA_KEYS)


def ema_key(raw: Any, path: Path) -> str:
    """The key of the EMA copy in a training checkpoint, or a ``CheckpointError`` naming what the file holds."""
    found = _ema_copy(raw)
    if found is None:
        keys = ", ".join(repr(k) for k in list(raw)[:8]) if isinstance(raw, Mapping) else type(raw).__name__
        raise CheckpointError(f"{path} holds no EMA copy of the weights (looked for {', '.join(EMA_KEYS)}; the "
                              f"file holds {keys or 'nothing'}): drop --use-ema to read its weights as they are.")
    return found


def unused_ema(raw: Any) -> dict[str, str]:
    """``{"weights": key, "unused_ema": ema_key}`` where a training wrapper holds an EMA copy of the weights beside
    the ones :func:`unwrap` takes, else ``{}``."""
    if not isinstance(raw, Mapping):
        return {}
    used = _inner_key(raw)
    if used is None or used in EMA_KEYS:
        return {}
    ema = _ema_copy(raw)
    return {} if ema is None else {"weights": used, "unused_ema": ema}


def training_record(raw: Any) -> dict[str, Any]:
    """The model a training checkpoint names: timm's ``train.py`` (``CheckpointSaver``) saves ``{"arch": args.model,
    "args": argparse.Namespace, "state_dict": ..., "epoch": ...}``; ``args.model`` is the timm model name and
    ``args.model_kwargs`` the ``--model-kwargs`` it was created with. Without ``args`` timm stores the class name
    (``"visiontransformer"``), which names no architecture. A pickled timm ViT (``torch.save(model)``, read with
    ``--trust-pickle``) states its own model: :func:`pickled_vit_record`. ``{}`` when the file states nothing."""
    pickled = pickled_vit_record(raw)
    if pickled:
        return pickled
    if not isinstance(raw, Mapping):
        return {}
    args = raw.get("args")
    fields = args if isinstance(args, Mapping) else vars(args) if isinstance(args, argparse.Namespace) else {}
    name = fields.get("model") if isinstance(fields.get("model"), str) else raw.get("arch")
    kwargs = fields.get("model_kwargs")
    if not isinstance(name, str):
        return {}
    return {"architecture": name, "model_args": dict(kwargs) if isinstance(kwargs, Mapping) else {}}


def pickled_vit_record(raw: Any) -> dict[str, Any]:
    """What a pickled timm ``VisionTransformer`` (alone or in a training wrapper) states of itself: its head count
    (``blocks[i].attn.num_heads``, the same in every block) where every block is timm's pre-norm ``Block``, the
    timm name ``create_model`` recorded in its ``pretrained_cfg`` (absent for a class built directly) and that
    config's preprocessing (``PREPROCESSING_KEYS``). ``{}`` for anything else (another block kind is left to the
    weights' evidence)."""
    module = _innermost(raw)
    blocks = list(getattr(module, "blocks", None) or []) if isinstance(module, nn.Module) else []
    kinds = {(type(block).__module__, type(block).__qualname__) for block in blocks}
    heads = {getattr(getattr(block, "attn", None), "num_heads", None) for block in blocks}
    if kinds != {("timm.models.vision_transformer", "Block")} or len(heads) != 1:
        return {}
    (num_heads,) = heads
    if not isinstance(num_heads, int) or num_heads <= 0:
        return {}
    config = getattr(module, "pretrained_cfg", None)
    config = dict(config) if isinstance(config, Mapping) else {}
    name = config.get("architecture")
    preprocessing = {key: config[key] for key in PREPROCESSING_KEYS if key in config}
    return {"architecture": name if isinstance(name, str) else None, "model_args": {"num_heads": num_heads},
            "stated_by": "pickled timm model", "args_source": "(attn.num_heads of its blocks)",
            "pretrained_cfg": preprocessing}
