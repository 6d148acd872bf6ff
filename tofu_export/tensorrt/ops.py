"""What the TensorRT ONNX parser of each target natively supports: operator tables and per-operator limits.

The tables are data, kept apart from the checks in ``check`` (which reads them) and ``rules``.
"""

from __future__ import annotations

TARGET_LABELS: dict[str, str] = {"8.5": "TensorRT 8.5 (JetPack 5)", "10": "TensorRT 10 (JetPack 6)"}

# Source: onnx/onnx-tensorrt, branch release/8.5-GA, docs/operators.md ("TensorRT 8.5 supports operators up
# to Opset 17"): every operator marked "Y". LayerNormalization is "N" there (it arrives in 8.6), so an
# opset-17 export that keeps nn.LayerNorm as one LayerNormalization node fails on JetPack 5: use opset 16.
_TRT85_NATIVE_OPS = frozenset(
    {
        "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh",
        "AveragePool", "BatchNormalization", "Cast", "Ceil", "Celu", "Clip", "Concat", "Constant",
        "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DepthToSpace",
        "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike",
        "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gemm", "GlobalAveragePool",
        "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample", "GRU", "HardSigmoid",
        "HardSwish", "Identity", "If", "ImageScaler", "InstanceNormalization", "IsNaN", "LeakyRelu", "Less",
        "LessOrEqual", "Log", "LogSoftmax", "Loop", "LRN", "LSTM", "LpNormalization", "LpPool", "MatMul",
        "Max", "MaxPool", "Mean", "MeanVarianceNormalization", "Min", "Mod", "Mul", "Neg",
        "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "Pad", "ParametricSoftplus", "Pow", "PRelu",
        "QuantizeLinear", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range",
        "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize",
        "ReverseSequence", "RNN", "RoiAlign", "Round", "ScaledTanh", "Scan", "Scatter", "ScatterElements",
        "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice",
        "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan",
        "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where",
        "Xor",
    }
)  # fmt: skip

# Source: onnx/onnx-tensorrt docs/operators.md of the 10.x line (10.0: opsets 9 to 20) cross-checked with
# its docs/Changelog.md. JetPack 6.1/6.2 ship TensorRT 10.3, so operators the changelog adds after 10.3
# (Blackman/Hamming/HannWindow 10.4, STFT 10.5, Attention 10.14, RMSNormalization/RotaryEmbedding/
# TensorScatter 10.15) are left out, as are Gelu and Mish, whose first supporting release could not be dated.
# No operator supported by 8.5 was dropped.
_TRT10_NATIVE_OPS = _TRT85_NATIVE_OPS | {
    "CastLike", "DeformConv", "GroupNormalization", "Hardmax", "IsInf", "LayerNormalization",
}  # fmt: skip

NATIVE_OPS: dict[str, frozenset[str]] = {"8.5": _TRT85_NATIVE_OPS, "10": frozenset(_TRT10_NATIVE_OPS)}
ALL_TARGETS = tuple(NATIVE_OPS)
# What to do about an op a target lacks, where there is a known fix at export time.
UNSUPPORTED_OP_HINTS: dict[str, str] = {
    "LayerNormalization": "native from TensorRT 8.6; export with opset 16 so LayerNorm is decomposed",
}
MIN_OPSET = 13
MAX_OPSET: dict[str, int] = {"8.5": 17, "10": 20}
# TensorRT < 9 casts INT64 down to INT32, clamping to +-INT_MAX (8.5 operators.md); 9.0+ has native INT64.
CASTS_INT64_TO_INT32: dict[str, bool] = {"8.5": True, "10": False}
# Parse, but make the engine's shapes or control flow depend on tensor values: never a static-shape engine.
DATA_DEPENDENT_OPS = frozenset({"If", "Loop", "Scan", "NonZero", "Unique", "NonMaxSuppression", "Compress"})
# (op, input index, input name) -> targets on which that input must be a build-time constant.
CONSTANT_INPUTS: dict[tuple[str, int, str], tuple[str, ...]] = {
    ("Slice", 3, "axes"): ("8.5",),  # tensor axes allowed from 10.3
    ("Squeeze", 1, "axes"): ("8.5", "10"),  # dynamic axes only from 10.7
    ("Unsqueeze", 1, "axes"): ("8.5", "10"),
    ("CumSum", 1, "axis"): ("8.5", "10"),  # dynamic axis only from 10.8
    ("TopK", 1, "K"): ("8.5",),  # dynamic K from 8.6
}
TOPK_MAX_K = 3840
RESIZE_MODES = frozenset({"nearest", "linear"})
RESIZE_COORDINATE_MODES = frozenset(
    {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
)
