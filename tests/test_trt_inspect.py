"""Engine-inspector parsing: which blocks' attention TensorRT fused into an MHA kernel. The sample is hand-written in
the inspector's JSON layout (``tests/data/trt_inspector_sample.json`` says so): no GPU was available to record one."""

from __future__ import annotations

import json
from pathlib import Path

from tofu_export.tensorrt.inspect import attention_fusion, parse_layers

SAMPLE = Path(__file__).parent / "data" / "trt_inspector_sample.json"


def test_attention_fusion_per_block() -> None:
    report = attention_fusion(SAMPLE.read_text())
    assert [(item.block, item.fusion) for item in report] == [(0, "fused_mha"), (1, "one_region"), (2, "unfused")]
    assert report[0].layers == ["/blocks/blocks.0/attn/qkv/MatMul", json.loads(SAMPLE.read_text())["Layers"][3]["Name"]]
    assert len(report[2].layers) == 4 and report[2].to_dict()["fusion"] == "unfused"


def test_layer_names_only_and_empty_information() -> None:
    names_only = {"Layers": ["/blocks/blocks.3/attn/MatMul", "/blocks/blocks.3/attn/Softmax"], "Bindings": []}
    assert parse_layers(names_only)[0] == {"name": "/blocks/blocks.3/attn/MatMul", "type": "", "tactic": ""}
    assert [(item.block, item.fusion) for item in attention_fusion(names_only)] == [(3, "unfused")]
    assert attention_fusion("{}") == []


def test_every_familys_attention_scope_is_a_block() -> None:
    """transformers' ViT / DINOv2 / DINOv3 (``layer.N/attention/``), CLIP / SigLIP (``layers.N/self_attn/``) and
    open_clip (``resblocks.N/attn/``) name their attention otherwise than timm."""
    layers = [
        "/hf/encoder/layer.0/attention/attention/query/MatMul",
        "{ForeignNode[/hf/encoder/layer.0/attention/attention/MatMul.../hf/encoder/layer.0/attention/attention/MatMul_1]}",
        "/hf/encoder/layers.1/self_attn/q_proj/MatMul",
        "/hf/encoder/layers.1/self_attn/MatMul + /hf/encoder/layers.1/self_attn/Softmax",
        "/transformer/resblocks.2/attn/MatMul",
        "/transformer/resblocks.2/attn/Softmax",
        "/transformer/resblocks.2/mlp/c_fc/MatMul",
        "/down_blocks.0/attentions.0/proj_in/Conv",  # no block: not a ViT block's attention scope
    ]
    report = attention_fusion({"Layers": layers})
    assert [(item.block, item.fusion) for item in report] == [(0, "one_region"), (1, "one_region"), (2, "unfused")]
    assert report[2].layers == layers[4:6]
