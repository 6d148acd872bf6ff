"""timm ``Eva`` models (EVA-02, DINOv3: rotary position embeddings) through the ``timm_eva`` family: r=0 is the
identity and the patch comes off cleanly, eager and static agree, a token keeps its rotation through a reduction
(checked against timm's own blocks fed the kept tokens and their rotations), the calibration hooks compute the
forward, pooling is size-weighted, the static graph exports with parity and passes the TensorRT check, and a
checkpoint whose config names a timm Eva is built as that model.

Models are random and small: DINOv3's layout (4 register tokens and a class token, rotary only, average pool),
EVA-02's (class token, absolute and rotary positions, SwiGLU MLP) and Perception Encoder's (``AttentionRope``, an
attention-pool head), 64 px, 64 wide, 2 heads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch

from tofu_export import load_model
from tofu_export.checkpoint import CheckpointError
from tofu_export.merge import reduce_tokens
from tofu_export.models.family import family_of, is_patched, patch, patched, unpatch
from tofu_export.models.timm_eva import ToFuEvaBlock, rope_of

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore")]

IMG = 64
NAMES = {"dinov3": "vit_small_patch16_dinov3", "eva02": "eva02_small_patch14_224", "pe": "vit_pe_core_tiny_patch16_384"}


def build(key: str, depth: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(NAMES[key], pretrained=False, depth=depth, img_size=IMG, embed_dim=64, num_heads=2).eval()


def _images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("key", NAMES)
def test_r0_is_the_identity_and_unpatch_leaves_plain_timm(key: str) -> None:
    model = build(key)
    assert family_of(model).name == "timm_eva"
    with torch.no_grad():
        plain = model(_images())
        with patched(model, r=0):
            torch.testing.assert_close(model(_images()), plain, rtol=0, atol=0)
        patch(model, r=3, mode="tofu")
        unpatch(model)
        torch.testing.assert_close(model(_images()), plain, rtol=0, atol=0)
    assert not is_patched(model) and not any(isinstance(block, ToFuEvaBlock) for block in model.blocks)
    assert not any(hasattr(block, "reduce") for block in model.blocks) and "pool" not in vars(model)


@pytest.mark.parametrize("key", NAMES)
@pytest.mark.parametrize("mode", ["tofu", "tome", "prune"])
def test_static_path_equals_eager_path(key: str, mode: str) -> None:
    model = build(key)
    with torch.no_grad():
        with patched(model, r=3, mode=mode):
            eager = model(_images())
        with patched(model, r=3, mode=mode, img_size=IMG):
            static = model(_images())
        plain = model(_images())
    scale = plain.abs().max()  # PE's random init outputs ~1e-5
    torch.testing.assert_close(static, eager, rtol=0, atol=1e-5 * min(scale.item(), 1.0))
    assert (eager - plain).abs().max() > 1e-3 * scale  # tokens were removed


@pytest.mark.parametrize("key", NAMES)
def test_kept_tokens_keep_their_rotations(key: str) -> None:
    """Block 0 prunes; block 1 of the patched model computes what timm's own block 1 computes on the tokens block 0
    kept, each rotated as at its grid position (the per-sample layout timm's patch dropout hands its blocks)."""
    model = build(key, depth=2)
    with torch.no_grad():  # sharper attention than random init gives (and no 1e-5 layer scale: DINOv3's), so
        for block in model.blocks:  # that where a token is matters
            block.attn.qkv.weight.mul_(20)
            if block.gamma_1 is not None:
                block.gamma_1.fill_(1.0)
    family = family_of(model)
    x = family.embed(model, _images())  # [B, N, C]
    grid = model.patch_embed.grid_size
    rope = rope_of(model, grid)  # [N - p, 2D]
    prefix = model.num_prefix_tokens
    plain = [type(block).__mro__[0] for block in model.blocks]
    with torch.no_grad():
        y0 = model.blocks[0](x, rope=rope)  # timm's own
        with patched(model, r=[5, 0], mode="prune", img_size=IMG):
            reduced = model.blocks[0](x, rope=rope)  # [B, N - 5, C]
            order = torch.arange(x.shape[1]).float().view(1, -1, 1).expand(2, -1, 1)
            positions, _ = reduce_tokens(order, None, model.blocks[0].reduce.matching, "prune", prefix)  # [B, N - 5, 1]
            out = model.blocks[1](reduced, rope=rope)  # handed the full rotations: it must use the kept ones
        kept = positions.long().squeeze(-1)  # [B, N - 5]: original index of every kept token
        torch.testing.assert_close(reduced, torch.stack([y0[b, kept[b]] for b in range(2)]), rtol=0, atol=0)
        kept_rope = torch.stack([rope[kept[b, prefix:] - prefix] for b in range(2)]).unsqueeze(1)  # [B, 1, N', 2D]
        expected = model.blocks[1](reduced, rope=kept_rope)
        unrotated = model.blocks[1](reduced, rope=rope[: reduced.shape[1] - prefix])
    assert plain == [type(block) for block in model.blocks]  # the patch is off again
    assert kept[:, :prefix].eq(torch.arange(prefix)).all()  # the prefix tokens stay first
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert (out - unrotated).abs().max() > 1e-3


@pytest.mark.parametrize("key", NAMES)
def test_calibration_hooks_compute_the_forward(key: str) -> None:
    model = build(key)
    family = family_of(model)
    with torch.no_grad():
        y = family.embed(model, _images())
        for index in range(family.depth(model)):
            y, metric = family.attention_half(model, index, y)
            y = family.mlp_half(model, index, y)
        expected = model.forward_head(model.forward_features(_images()), pre_logits=True)
        torch.testing.assert_close(family.pooled_output(model, y), expected, rtol=0, atol=1e-6)
        assert metric.shape == (2, y.shape[1], 32)
        with patched(model, r=3, mode="tofu", img_size=IMG):
            ran = family.pooled_output(model, family.run_blocks(model, family.embed(model, _images()), 0))
            torch.testing.assert_close(ran, model.forward_head(model.forward_features(_images()), pre_logits=True),
                                       rtol=0, atol=1e-6)


def test_average_pool_is_size_weighted() -> None:
    model = build("dinov3")  # global_pool="avg" over the patch tokens
    prefix = model.num_prefix_tokens
    with torch.no_grad(), patched(model, r=3, mode="tome"):
        tokens = model.forward_features(_images())
        size = model._tofu.size  # [B, N', 1]
        pooled = model.forward_head(tokens, pre_logits=True)
        weighted = model.fc_norm((tokens[:, prefix:] * size[:, prefix:]).sum(1) / size[:, prefix:].sum(1))
        plain = model.fc_norm(tokens[:, prefix:].mean(1))
    torch.testing.assert_close(pooled, weighted, rtol=0, atol=1e-6)
    assert size.max() > 1 and (pooled - plain).abs().max() > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("key", NAMES)
def test_static_graph_exports_with_parity_and_passes_the_tensorrt_check(key: str, tmp_path: Path) -> None:
    import onnxruntime as ort

    from tofu_export.exporters.graph_costs import reduction_costs
    from tofu_export.exporters.onnx import export_onnx
    from tofu_export.tensorrt import check as trt_check

    model = build(key, depth=2)
    patch(model, r=4, mode="tofu", img_size=IMG)
    result = export_onnx(model, tmp_path / "eva.onnx", IMG)
    assert result.parity is not None and result.parity.ok
    nodes = onnx.load(str(tmp_path / "eva.onnx")).graph.node
    assert not {node.op_type for node in nodes} & {"ScatterElements", "ScatterND", "If", "Loop", "NonZero"}
    # the kept tokens' rotations are gathered inside block 0's reduce scope, where `check --costs` counts them
    gathers = [node.name for node in nodes if node.op_type == "GatherND"]  # row gathers (attention's are Gather)
    assert gathers and all("/reduce/" in name for name in gathers), gathers
    costs = reduction_costs(tmp_path / "eva.onnx")
    assert costs.blocks[0].ops["GatherND"] == costs.blocks[1].ops["GatherND"] - 1  # + rotations, - the sizes' 2
    assert trt_check.check_tensorrt_compat(tmp_path / "eva.onnx", targets=("10",)).ok
    session = ort.InferenceSession(str(tmp_path / "eva.onnx"), providers=["CPUExecutionProvider"])
    images = _images(3, seed=5)
    with torch.no_grad():
        expected = model(images).numpy()
    got = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_a_checkpoint_whose_config_names_a_timm_eva_is_that_model(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0).eval()
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_small_patch16_dinov3", "pretrained_cfg": {
        "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}}))
    loaded = load_model(tmp_path / "model.safetensors")
    assert loaded.family.name == "timm_eva" and loaded.arch.name == "vit_small_patch16_dinov3"
    assert loaded.family.data_config(loaded.model)["mean"] == (0.1, 0.2, 0.3)
    images = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images), model(images), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="does not fit timm's eva02_small_patch14_224") as caught:
        load_model(tmp_path / "model.safetensors", arch="eva02_small_patch14_224")
    assert caught.value.hint is not None and caught.value.hint.option == "arch"
    for args, expected in (({"global_pool": "token"}, "token"), ({"no_such_kwarg": 1}, None)):  # the config's kwargs
        (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_small_patch16_dinov3",
                                                          "model_args": args}))
        if expected is None:
            with pytest.raises(CheckpointError, match="timm could not create vit_small_patch16_dinov3"):
                load_model(tmp_path / "model.safetensors")
        else:
            assert load_model(tmp_path / "model.safetensors").model.global_pool == expected


def test_another_input_size_resamples_the_position_embedding_as_timm_loads_it(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from timm.models.eva import checkpoint_filter_fn

    torch.manual_seed(0)
    native = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=0).eval()
    save_file(native.state_dict(), tmp_path / "eva02.safetensors")
    loaded = load_model(tmp_path / "eva02.safetensors", arch="eva02_tiny_patch14_224", img_size=112)
    resized = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=0, img_size=112).eval()
    resized.load_state_dict(checkpoint_filter_fn(native.state_dict(), resized))  # what timm's own loading does
    assert loaded.img_size == 112 and loaded.family.num_tokens(loaded.model) == 65 and loaded.arch.notes
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images), resized(images), rtol=0, atol=1e-6)


@pytest.mark.parametrize("key", NAMES)
def test_one_block_latency_graphs_get_their_rotations(key: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``calibrate``'s one-block graphs hand the block the rotations of as many patch tokens as it receives."""
    import onnx

    from tofu_export.calibration import latency
    from tofu_export.calibration.measured import ExportSettings

    model = build(key)
    handed: list[dict] = []
    original = latency._SizedBlock.forward

    def spy(self: latency._SizedBlock, x: torch.Tensor) -> torch.Tensor:
        handed.append({name: tuple(value.shape) for name, value in self.inputs.items()})
        return original(self, x)

    monkeypatch.setattr(latency._SizedBlock, "forward", spy)
    tokens = family_of(model).num_tokens(model) - 2  # a later block's count
    path = latency.block_graph(model, "mlerp", tokens, 4, settings=ExportSettings("dynamo", 17), folder=tmp_path)
    dims = [d.dim_value or d.dim_param for d in onnx.load(str(path)).graph.output[0].type.tensor_type.shape.dim]
    assert dims[1:] == [tokens - 4, 64]
    assert handed and handed[-1] == {"rope": (tokens - model.num_prefix_tokens, 64)}  # [N - p, 2D]: D = 32 a head
