"""categorize() on exporter, torch and TensorRT names; summarize() sums and ranks."""

import pytest

from tofu_export.engines.base import OpTime
from tofu_export.profiling.breakdown import CATEGORIES, categorize, summarize


@pytest.mark.parametrize(
    ("name", "op_type", "expected"),
    [
        ("/blocks.3/attn/qkv/MatMul", "MatMul", "attention"),
        ("/blocks/blocks.0/attn/Softmax", "Softmax", "attention"),
        ("/blocks.3/mlp/fc1/MatMul", "MatMul", "mlp"),
        ("/blocks.3/reduce/ArgMax", "ArgMax", "token_reduction"),
        ("/blocks.3/reduce/attn_like/MatMul", "MatMul", "token_reduction"),  # reduce wins over attn
        ("/patch_embed/proj/Conv_output_0_nchwc", "Conv", "embed"),
        ("/head/Gemm", "Gemm", "head"),
        ("/norm/LayerNormalization", "LayerNormalization", "head"),
        ("/blocks.3/norm1/LayerNormalization", "LayerNormalization", "other"),
        ("/blocks.3/Add_1", "Add", "other"),
        ("/Concat", "Concat", "other"),
        ("BiasGelu_token_14", "BiasGelu", "mlp"),
        ("Transpose_token_2", "Transpose", "other"),
        ("blocks.3.attn", "Attention", "attention"),
        ("blocks.3.attn.qkv", "Linear", "attention"),
        ("blocks.3.mlp.act", "GELU", "mlp"),
        ("blocks.3.reduce", "TokenFusion", "token_reduction"),
        ("patch_embed.proj", "Conv2d", "embed"),
        ("fc_norm", "Identity", "head"),
        ("norm", "LayerNorm", "head"),
        ("<model>", "VisionTransformer", "other"),
        ("/blocks.1/mlp/fc1/MatMul + /blocks.1/mlp/act/Mul", "", "mlp"),
        ("{ForeignNode[/blocks.0/attn/Transpose.../blocks.0/attn/proj/MatMul]}", "", "attention"),
        ("Reformatting CopyNode for Input Tensor 0 to /head/Gemm", "", "head"),
        # transformers (inside HFVisionEncoder's ``hf``) and open_clip, as their exports name them
        ("/hf/encoder/layers.0/self_attn/k_proj/MatMul", "MatMul", "attention"),  # CLIP, SigLIP
        ("/hf/encoder/layer.0/attention/attention/query/MatMul", "MatMul", "attention"),
        ("/hf/encoder/layers.0/mlp/fc1/MatMul", "MatMul", "mlp"),
        ("/hf/embeddings/patch_embeddings/projection/Conv", "Conv", "embed"),
        ("/hf/pre_layrnorm/LayerNormalization", "LayerNormalization", "embed"),
        ("/hf/layernorm/LayerNormalization", "LayerNormalization", "head"),  # ViT, DINOv2
        ("/hf/norm/LayerNormalization", "LayerNormalization", "head"),  # DINOv3
        ("/hf/post_layernorm/LayerNormalization", "LayerNormalization", "head"),  # CLIP, SigLIP
        ("/hf/pooler/dense/Gemm", "Gemm", "head"),
        ("/hf/head/attention/MatMul", "MatMul", "head"),  # SigLIP's attention pool
        ("/hf/encoder/layer.0/norm1/LayerNormalization", "LayerNormalization", "other"),
        ("hf.encoder.layers.0.self_attn", "CLIPAttention", "attention"),
        ("/transformer/resblocks.0/attn/MatMul", "MatMul", "attention"),
        ("/transformer/resblocks.0/mlp/c_fc/MatMul", "MatMul", "mlp"),
        ("/conv1/Conv", "Conv", "embed"),
        ("/ln_pre/LayerNormalization", "LayerNormalization", "embed"),
        ("/ln_post/LayerNormalization", "LayerNormalization", "head"),
        ("/down_blocks.0/resnets.0/conv1/Conv", "Conv", "other"),  # a top-level name only counts at the top
    ],
)
def test_categorize(name: str, op_type: str, expected: str) -> None:
    assert categorize(name, op_type) == expected


def test_summarize_sums_per_category_and_ranks_top_ops() -> None:
    ops = [
        OpTime("/blocks.0/attn/qkv/MatMul", "MatMul", 2.0),
        OpTime("/blocks.0/attn/Softmax", "Softmax", 0.5),
        OpTime("/blocks.0/mlp/fc1/MatMul", "MatMul", 3.0),
        OpTime("/blocks.0/reduce/TopK", "TopK", 0.25),
        OpTime("/Concat", "Concat", 0.125),
    ]
    result = summarize(ops, top_n=2)
    assert list(result.by_category_ms) == list(CATEGORIES)
    assert result.by_category_ms["attention"] == pytest.approx(2.5)
    assert result.by_category_ms["mlp"] == pytest.approx(3.0)
    assert result.by_category_ms["token_reduction"] == pytest.approx(0.25)
    assert result.by_category_ms["other"] == pytest.approx(0.125)
    assert result.by_category_ms["embed"] == result.by_category_ms["head"] == 0.0
    assert result.total_ms == pytest.approx(5.875)
    assert [op.ms for op in result.top_ops] == [3.0, 2.0]
    assert result.to_dict()["top_ops"][0]["category"] == "mlp"
