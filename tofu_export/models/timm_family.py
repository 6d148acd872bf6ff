"""The timm ``VisionTransformer`` family: checkpoints with timm key names, the patch of ``timm_vit.py``, and the
calibration hooks (a block run as its two residual halves)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from tofu_export.checkpoint import CheckpointError, read_checkpoint
from tofu_export.errors import Hint
from tofu_export.hashing import sha256_file
from tofu_export.models import timm_vit
from tofu_export.models.family import ArchGuess, FlopCosts, LoadedModel, ModelFamily
from tofu_export.models.reduction import ToFuState, head_mean_keys, start_forward
from tofu_export.models.timm_hub import hub_weights_file, is_timm_hub_folder
from tofu_export.models.timm_vit_torchvision import is_torchvision_vit, torchvision_as_timm
from tofu_export.schedule import RSpec, TokenPlan
from tofu_export.sizes import as_pair


def with_keys(block: nn.Module, attention_half: Callable[[], Tensor]) -> tuple[Tensor, Tensor]:
    """``attention_half()`` run on ``block`` of a timm model, and the keys its attention computed (caught by a hook
    on ``attn.k_norm``, as the patch catches them), averaged over heads: ``[B, N, C]``, ``[B, N, D]``."""
    captured: list[Tensor] = []
    hook = block.attn.k_norm.register_forward_hook(lambda _m, _a, keys: captured.append(head_mean_keys(keys)))
    try:
        y = attention_half()
    finally:
        hook.remove()
    return y, captured[0]


class TimmFamily(ModelFamily):
    """timm ``VisionTransformer`` (ViT, DeiT, DINOv2, MAE, ...) with standard pre-norm ``Block``s."""

    name = "timm"
    classes = "timm VisionTransformer (ViT, DeiT, DINOv2, MAE, ...)"

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def recognises(self, path: Path) -> bool:
        """Any file (the fallback, which names what it cannot read), and a timm hub folder (``timm_hub``)."""
        return not path.is_dir() or is_timm_hub_folder(path)

    def digest(self, path: Path) -> str:
        return sha256_file(hub_weights_file(path) if path.is_dir() else path)  # a hub folder's: its weights file's

    def load(self, path: Path, *, arch: str | None, img_size: int | None, trust_pickle: bool,
             num_heads: int | None = None) -> LoadedModel:
        from tofu_export.models.timm_eva_build import build_eva, names_eva
        from tofu_export.models.timm_vit_build import build_model
        from tofu_export.models.timm_vit_evidence import read_evidence

        if is_timm_hub_folder(path):  # read as its weights file, with the folder's config.json beside it
            path = hub_weights_file(path)
        state_dict, record = read_checkpoint(path, trust_pickle=trust_pickle)  # names a missing file or a folder
        digest = sha256_file(path)
        evidence = read_evidence(path, record)
        if is_torchvision_vit(state_dict):  # torchvision's ViT is timm's of the same shape, under other names
            state_dict, evidence = torchvision_as_timm(state_dict, evidence, path.name)
        if names_eva(arch or evidence.architecture):  # EVA-02, DINOv3: rotary embeddings, built by timm's name
            model, guess = build_eva(state_dict, arch or str(evidence.architecture), img_size=img_size,
                                     source=f"--arch {arch}" if arch else evidence.source,
                                     preprocessing=None if arch else evidence.preprocessing,
                                     model_args=None if arch else evidence.model_args, num_heads=num_heads)
        else:
            model, guess = build_model(state_dict, arch=arch, img_size=img_size, num_heads=num_heads,
                                       evidence=evidence, take_weights=True)  # read for it alone
        if "unused_ema" in record:  # said, not chosen silently: a model validated on its EMA weights differs
            used, ema = record["weights"], record["unused_ema"]
            note = (f"{path.name} also holds an EMA copy of the weights under {ema!r}, not used: these are the "
                    f"weights under {used!r} (as timm's validate.py loads without --use-ema). To export the EMA "
                    f"weights: tofu-export clean-checkpoint {path.name} --use-ema -o {path.name.split('.')[0]}"
                    "-ema.safetensors, then pass that file (the architecture this file names goes with it).")
            guess = dataclasses.replace(guess, notes=(*guess.notes, note),
                                        provenance={**guess.provenance, "weights": f"{used} (not {ema})"})
        return LoadedModel(model, guess, path, digest)

    def load_name(self, name: str, *, img_size: int | None, num_heads: int | None = None) -> LoadedModel:
        """A timm model name with random weights (fine for counting tokens and timing, not for accuracy); ``num_heads``
        replaces the name's head count."""
        import timm

        if not timm.is_model(name):
            raise CheckpointError(
                f"{name} is neither a file nor a timm model name: pass a checkpoint path, or a timm name such as "
                "deit_small_patch16_224", hint=Hint("checkpoint", None, "a checkpoint file or folder"),
            )
        kwargs = {k: v for k, v in (("img_size", img_size), ("num_heads", num_heads)) if v is not None}
        try:
            model = timm.create_model(name, pretrained=False, **kwargs).eval()
        except (TypeError, AssertionError, ValueError) as error:  # e.g. a head count that does not divide the width
            raise CheckpointError(f"timm could not create {name} with {kwargs} ({type(error).__name__}: {error})",
                                  hint=Hint("num_heads", None, "that divides the model's width, or leave it out"),
                                  ) from error
        if not (hasattr(model, "blocks") and hasattr(model, "patch_embed")):  # a ResNet, a ConvNeXt: no tokens
            raise CheckpointError(f"{name} is a timm {type(model).__name__}, not a Vision Transformer; tofu-export "
                                  "reduces the tokens of ViTs: pass a ViT name such as deit_small_patch16_224",
                                  hint=Hint("checkpoint", None, "a ViT checkpoint or timm ViT name"))
        provenance = {"architecture": f"timm registry {name}", **({"num_heads": "given"} if num_heads else {})}
        guess = ArchGuess(name=name, kwargs=kwargs, reason="timm model name (random weights)", provenance=provenance)
        return LoadedModel(model, guess, None, None)

    tuned_layout = "file"

    def write_weights(self, model: nn.Module, loaded: LoadedModel, target: Path,
                      metadata: Mapping[str, str]) -> dict[str, Any]:
        """A ``.safetensors`` state dict; the statement beside it names the architecture, the arguments it was
        built with and its preprocessing, as a timm hub ``config.json`` does (``timm_vit_evidence`` reads it)."""
        from tofu_export.weights_file import save_safetensors

        save_safetensors(model.state_dict(), target, metadata)
        config = self.data_config(model)
        pretrained_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if k != "input_size"}
        return {"architecture": loaded.arch.name, "model_args": loaded.arch.kwargs, "pretrained_cfg": pretrained_cfg}

    # -- geometry -------------------------------------------------------------------------------------------------
    def owns(self, model: nn.Module) -> bool:
        if not type(model).__module__.startswith("timm."):
            return False
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def depth(self, model: nn.Module) -> int:
        return len(model.blocks)

    def num_prefix(self, model: nn.Module) -> int:
        return int(model.num_prefix_tokens)

    def img_size(self, model: nn.Module) -> tuple[int, int]:
        return as_pair(tuple(model.patch_embed.img_size))

    def num_tokens(self, model: nn.Module, img_size: int | Sequence[int] | None = None) -> int:
        return timm_vit.num_tokens(model, img_size)

    def embed_dim(self, model: nn.Module) -> int:
        return int(model.embed_dim)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.blocks

    def with_blocks(self, model: nn.Module, blocks: Sequence[nn.Module]) -> nn.Module:
        skeleton = copy.copy(model)  # shares embedding and head; the timm patch only touches blocks and attributes
        skeleton._modules = dict(model._modules, blocks=nn.Sequential(*blocks))
        return skeleton

    def costs(self, model: nn.Module) -> FlopCosts:
        block, proj = model.blocks[0], model.patch_embed.proj
        head_out = getattr(model.head, "out_features", 0)
        dim = int(model.embed_dim)
        return FlopCosts(
            dim=dim,
            hidden=int(block.mlp.fc1.out_features),
            metric_dim=dim // int(block.attn.num_heads),
            embed_per_patch=proj.in_channels * proj.out_channels * proj.kernel_size[0] * proj.kernel_size[1],
            head=dim * head_out * (2 if hasattr(model, "head_dist") else 1),
        )

    def arch_name(self, model: nn.Module) -> str:
        return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__

    # -- patching -------------------------------------------------------------------------------------------------
    def patch(self, model: nn.Module, r: RSpec = 16, mode: str | Sequence[str] = "tofu", prop_attn: bool = True,
              img_size: int | Sequence[int] | None = None, *, prune_layers: int | None = None,
              strict: bool = False, plan: TokenPlan | None = None) -> nn.Module:
        return timm_vit.patch(model, r, mode, prop_attn, img_size, prune_layers=prune_layers, strict=strict,
                              plan=plan)

    def unpatch(self, model: nn.Module) -> nn.Module:
        return timm_vit.unpatch(model)

    def state(self, model: nn.Module) -> ToFuState | None:
        return timm_vit.tofu_state(model)

    # -- calibration hooks ----------------------------------------------------------------------------------------
    def embed(self, model: nn.Module, images: Tensor) -> Tensor:
        x = model.patch_embed(images)  # [B, N - prefix, C] (or a grid, flattened by _pos_embed)
        x = model._pos_embed(x)  # [B, N, C]
        x = model.patch_drop(x)
        return model.norm_pre(x)

    def attention_half(self, model: nn.Module, index: int, x: Tensor) -> tuple[Tensor, Tensor]:
        block = model.blocks[index]
        return with_keys(block, lambda: x + block.drop_path1(block.ls1(block.attn(block.norm1(x)))))

    def mlp_half(self, model: nn.Module, index: int, y: Tensor) -> Tensor:
        block = model.blocks[index]
        return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))

    def run_blocks(self, model: nn.Module, x: Tensor, start: int) -> Tensor:
        state = self.state(model)
        if state is not None:
            start_forward(state)
        for block in model.blocks[start:]:
            x = block(x)  # block 0 of a patched model restarts the forward too (no-op here: same reset)
        return x

    def pooled_output(self, model: nn.Module, x: Tensor) -> Tensor:
        return model.forward_head(model.norm(x), pre_logits=True)  # a patched model's pool is size-weighted
