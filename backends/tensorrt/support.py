"""The ONNX-TensorRT parser's operator support matrix, as data.

Source: `onnx/onnx-tensorrt` `docs/operators.md`, the TensorRT 10.15 revision ("TensorRT 10.15 supports operators in
the inclusive range of opset 9 to opset 24"; the parser changelog dates 10.15 GA 2026-02-02). The code-search index
this was read from does not expose that revision's commit id. Older revisions were read for comparison: 6d0ab7be
(TensorRT 8.5: INT64 cast down to INT32, TopK's K must be an initializer, Slice/Squeeze axes initializers) and the
9.2 revision (INT64 native; ConstantOfShape FP32 only; Slice/Squeeze axes still initializers; no TopK K limit
listed). Cross-checked against:

- the parser source `onnxOpImporters.cpp` @ onnx/onnx-tensorrt dd0a3a9f8794ae4f0316ed07ea68cda9b944bb3c: `TopK` feeds
  K to the layer as a tensor (`layer->setInput(1, K)`), so K may be computed at run time (dynamic K since TensorRT
  8.6, per docs/Changelog.md); `CumSum` still asserts its axis is weights ("Axis input for CumSum must be an
  initializer"); `ArgMax`/`ArgMin` implement `select_last_index=1` by flipping the input (supported);
- the TensorRT operator reference for TopK (docs.nvidia.com .../latest/_static/operators/TopK.html): "k <= d,
  k <= 3840". The matrix words it as "K input must be less than 3840"; we take the layer's inclusive bound.
- docs/Changelog.md: INT64 is native since TensorRT 9.0 ("The ONNX parser no longer automatically casts INT64 to
  INT32") -- the old "INT64 is cast down to INT32" note applies to TensorRT <= 8.6 only; tensor `axes` for `Slice`
  since 10.3 (the old "`axes` must be an initializer" is gone from the matrix); BF16/FP8 since 9.0.

What still holds in 10.15 and matters for dgopt: `Multinomial` is NOT supported; `RandomUniform(Like)` and
`RandomNormal(Like)` are supported but TensorRT ignores `seed`; `CumSum`'s axis and every `Reduce*` op's `axes` must be
initializers; `Squeeze`/`Unsqueeze` axes must resolve to constants; `TopK` needs `sorted=1` and K <= 3840; BOOL is
accepted by And/Or/Xor/Not/Where/Cast/Expand/Concat/Gather/Reshape/Slice/... but NOT by the comparison ops (Equal,
Less, ...: FP32/FP16/BF16/INT32/INT64 inputs), ScatterElements or the Reduce ops; DOUBLE is cast down to FLOAT.

`MATRIX[op]` is an `OpSupport`; `lookup(op)` returns None for ops the matrix does not list (the parser then looks
for a plugin of that name, which dgopt never ships).
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["OpSupport", "MATRIX", "lookup", "TRT_MATRIX_VERSION", "OPSET_RANGE", "TOPK_MAX_K", "DATA_TYPES",
           "SOURCE"]

TRT_MATRIX_VERSION = "10.15"
SOURCE = ("onnx/onnx-tensorrt docs/operators.md (TensorRT 10.15 revision); parser onnxOpImporters.cpp @ "
          "dd0a3a9f8794ae4f0316ed07ea68cda9b944bb3c; TensorRT TopK layer reference")
OPSET_RANGE = (9, 24)            # default-domain opsets the 10.15 parser imports
TOPK_MAX_K = 3840                # ITopKLayer: k <= 3840 (and k <= the reduced dimension)

# TensorRT's ONNX data types (10.15). INT8/INT4/FP8/FP4 only through Q/DQ quantization; UINT8 only as network I/O;
# DOUBLE is cast down to FLOAT (clamped to +-FLT_MAX).
DATA_TYPES = frozenset({"DOUBLE", "FP32", "FP16", "BF16", "FP8", "FP4", "INT32", "INT64", "INT8", "INT4", "UINT8",
                        "BOOL"})

_F = frozenset({"FP32", "FP16", "BF16"})
_F2 = frozenset({"FP32", "FP16"})
_I = frozenset({"INT32", "INT64"})
_B = frozenset({"BOOL"})
_FI = _F | _I
_FIB = _F | _I | _B
_CONST_T = _F | {"FP8", "FP4", "INT4"} | _I | _B


@dataclass(frozen=True)
class OpSupport:
    """One row of the matrix plus the machine-checkable part of its restrictions.

    types           the supported data types (of `typed_inputs`, and of the outputs when `typed_outputs`)
    typed_inputs    input indices the types constrain; "all" for every input; () for none
    typed_outputs   the types constrain the outputs (Constant, ConstantOfShape, Random*, Cast's target)
    initializer     input index -> why: must be weights (an initializer or a Constant node, as the parser's
                    `is_weights()`); computed at run time is an error
    constant        input index -> why: must be resolvable to a constant (folding over constant-only subgraphs)
    attrs           attribute -> (default, allowed values)
    no_outputs      output indices the parser does not produce (must be absent or unused)
    no_inputs       input indices the parser rejects when present
    static_dims     input indices whose shape must be fully static
    seed_ignored    a random op whose `seed` TensorRT ignores
    """
    op: str
    supported: bool
    types: frozenset = frozenset()
    restrictions: str = ""
    typed_inputs: tuple | str = (0,)
    typed_outputs: bool = False
    initializer: dict = field(default_factory=dict)
    constant: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    no_outputs: tuple = ()
    no_inputs: tuple = ()
    static_dims: tuple = ()
    seed_ignored: bool = False


def _y(op, types, restrictions="", **kw) -> OpSupport:
    return OpSupport(op, True, frozenset(types), restrictions, **kw)


def _n(op, restrictions="") -> OpSupport:
    return OpSupport(op, False, frozenset(), restrictions)


_ALL = "all"
_POOL = "2D or 3D pooling only; `dilations` must be empty or all ones"
_RAND = "`seed` is ignored by TensorRT (draws are not reproducible across runs or seeds)"
_REDUCE = "`axes` must be an initializer"
_SQ = "`axes` must be resolvable to a constant"

_ROWS = [
    _y("Abs", _FI), _y("Acos", _F), _y("Acosh", _F), _y("Add", _FI, typed_inputs=(0, 1)), _n("AffineGrid"),
    _y("And", _B, typed_inputs=_ALL),
    _y("ArgMax", _FI, "select_last_index=1 is supported (input flipped)"),
    _y("ArgMin", _FI, "select_last_index=1 is supported (input flipped)"),
    _y("Asin", _F), _y("Asinh", _F), _y("Atan", _F), _y("Atanh", _F),
    _y("Attention", _F | {"INT8", "FP8"},
       "Q, K, V and attn_mask must be 4D; past_key/past_value/nonpad_kv_seqlen inputs and present_key/present_value/"
       "qk_matmul_output outputs unsupported; qk_matmul_output_mode and softcap unsupported",
       typed_inputs=(0, 1, 2), no_inputs=(4, 5, 6), no_outputs=(1, 2, 3),
       attrs={"qk_matmul_output_mode": (0, (0,)), "softcap": (0.0, (0.0,))}),
    _y("AveragePool", _F, _POOL),
    _y("BatchNormalization", _F), _n("Bernoulli"), _n("BitShift"), _n("BitwiseAnd"), _n("BitwiseNot"),
    _n("BitwiseOr"), _n("BitwiseXor"), _y("BlackmanWindow", _F2, typed_inputs=()),
    _y("Cast", _FI | {"UINT8", "BOOL"}, typed_outputs=True),
    _y("CastLike", _FI | {"UINT8", "BOOL"}, typed_inputs=(0, 1)),
    _y("Ceil", _F), _n("Col2Im"), _y("Celu", _F), _n("CenterCropPad"), _y("Clip", _F), _n("Compress"),
    _y("Concat", _FIB, typed_inputs=_ALL), _n("ConcatFromSequence"),
    _y("Constant", _CONST_T, "`sparse_value`, `value_string` and `value_strings` attributes unsupported",
       typed_inputs=(), typed_outputs=True),
    _y("ConstantOfShape", _CONST_T, typed_inputs=(), typed_outputs=True),
    _y("Conv", _F), _n("ConvInteger"), _y("ConvTranspose", _F), _y("Cos", _F), _y("Cosh", _F),
    _y("CumSum", _F, "`axis` must be a build-time constant (initializer)",
       initializer={1: "CumSum's axis"}),
    _n("DFT"),
    _y("DeformConv", _F2, "input must have 1D or 2D spatial dims; begin/end pads per spatial axis must match"),
    _y("DepthToSpace", _FI), _y("DequantizeLinear", {"INT8", "FP8", "FP4", "INT4"}, "`x_zero_point` must be zero"),
    _n("Det"), _y("Div", _FI, typed_inputs=(0, 1)),
    _y("Dropout", _F, "`is_training` must be an initializer and evaluate to False", initializer={2: "is_training"}),
    _n("DynamicQuantizeLinear", "compose it from ONNX ops in a model local function"),
    _y("Einsum", _F, typed_inputs=_ALL), _y("Elu", _F), _y("Equal", _FI, typed_inputs=(0, 1)), _y("Erf", _F),
    _y("Exp", _F), _y("Expand", _FIB), _y("EyeLike", _FIB, "`input` must have static dimensions", static_dims=(0,)),
    _y("Flatten", _FIB), _y("Floor", _F), _y("Gather", _FIB), _y("GatherElements", _FIB), _y("GatherND", _FIB),
    _y("Gelu", _F | {"INT8"} | _I), _y("Gemm", _F, typed_inputs=(0, 1)), _y("GlobalAveragePool", _F),
    _y("GlobalLpPool", _F), _y("GlobalMaxPool", _F), _y("Greater", _FI, typed_inputs=(0, 1)),
    _y("GreaterOrEqual", _FI, typed_inputs=(0, 1)), _y("GridSample", _F2, "input must be 4D"),
    _y("GroupNormalization", _F),
    _y("GRU", _F, "bidirectional GRUs need the same activations in both directions"),
    _y("HammingWindow", _F2, typed_inputs=()), _y("HannWindow", _F2, typed_inputs=()),
    _y("HardSigmoid", _F), _y("HardSwish", _F),
    _y("Hardmax", _F, "the `axis` dimension of the input must be a build-time constant"),
    _y("Identity", _FIB),
    _y("If", _FIB, "both branches' outputs must have the same rank and different names", typed_inputs=()),
    _y("ImageScaler", _F), _n("ImageDecoder"), _y("InstanceNormalization", _F), _y("IsInf", _F),
    _y("IsNaN", _FI),
    _y("LayerNormalization", _F, "only the first output `Y` is supported", no_outputs=(1, 2)),
    _y("LeakyRelu", _F), _y("Less", _FI, typed_inputs=(0, 1)), _y("LessOrEqual", _FI, typed_inputs=(0, 1)),
    _y("Log", _F), _y("LogSoftmax", _F),
    _y("Loop", _FIB, "scan output length cannot be dynamic; loop-carried shapes must not change across iterations",
       typed_inputs=()),
    _y("LRN", _F),
    _y("LSTM", _F, "bidirectional LSTMs need the same activations in both directions; `input_forget` and `layout` "
       "must be 0", attrs={"input_forget": (0, (0,)), "layout": (0, (0,))}),
    _y("LpNormalization", _F), _y("LpPool", _F, "`dilations` must be empty or all ones"),
    _y("MatMul", _F, typed_inputs=(0, 1)), _n("MatMulInteger"), _y("Max", _FI, typed_inputs=_ALL),
    _y("MaxPool", _F, _POOL + "; the `Indices` output is unsupported", no_outputs=(1,)),
    _n("MaxRoiPool"), _n("MaxUnpool"), _y("Mean", _F | {"FP8"} | _I, typed_inputs=_ALL),
    _y("MeanVarianceNormalization", _F), _n("MelWeightMatrix"), _y("Min", _FI, typed_inputs=_ALL),
    _y("Mish", _F2), _y("Mod", _FI, typed_inputs=(0, 1)), _y("Mul", _FI, typed_inputs=(0, 1)),
    _n("Multinomial", "lower sampling to inverse-CDF (CumSum + compare) or Gumbel-max (ArgMax(x+g))"),
    _y("Neg", _FI), _n("NegativeLogLikelihoodLoss"), _y("NonMaxSuppression", _F2), _y("NonZero", _F2),
    _y("Not", _B), _y("OneHot", _FIB, "`depth` must be a build-time constant", typed_inputs=(2,),
                       constant={1: "OneHot's depth"}),
    _n("Optional"), _n("OptionalGetElement"), _n("OptionalHasElement"), _y("Or", _B, typed_inputs=_ALL),
    _y("Pad", _FI), _y("ParametricSoftplus", _F), _y("Pow", _FI), _y("PRelu", _F), _n("QLinearConv"),
    _n("QLinearMatMul"), _y("QuantizeLinear", _F, "`y_zero_point` must be 0"),
    _y("RandomNormal", _F, _RAND, typed_inputs=(), typed_outputs=True, seed_ignored=True),
    _y("RandomNormalLike", _F, _RAND, typed_inputs=(), typed_outputs=True, seed_ignored=True),
    _y("RandomUniform", _F, _RAND, typed_inputs=(), typed_outputs=True, seed_ignored=True),
    _y("RandomUniformLike", _F, _RAND, typed_inputs=(), typed_outputs=True, seed_ignored=True),
    _y("Range", _FI, typed_inputs=_ALL), _y("Reciprocal", _F),
    *[_y(op, _FI, _REDUCE, initializer={1: f"{op}'s axes"})
      for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
                 "ReduceProd", "ReduceSum", "ReduceSumSquare")],
    _n("RegexFullMatch"), _y("Relu", _FI), _y("Reshape", _FIB),
    _y("Resize", _F, "coordinate_transformation_mode: half_pixel, pytorch_half_pixel, tf_half_pixel_for_nn, "
       "asymmetric, align_corners; mode: nearest, linear; nearest_mode: floor, ceil, round_prefer_floor, "
       "round_prefer_ceil; keep_aspect_ratio_policy: stretch; no antialiasing; with tensor `scales`, `axes` must be "
       "an iota of length rank(input)",
       attrs={"coordinate_transformation_mode": ("half_pixel", ("half_pixel", "pytorch_half_pixel",
                                                                 "tf_half_pixel_for_nn", "asymmetric",
                                                                 "align_corners")),
              "mode": ("nearest", ("nearest", "linear")),
              "nearest_mode": ("round_prefer_floor", ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil")),
              "keep_aspect_ratio_policy": ("stretch", ("stretch",)), "antialias": (0, (0,))}),
    _y("ReverseSequence", _FIB), _y("RMSNormalization", _F),
    _y("RNN", _F, "bidirectional RNNs need the same activations in both directions"), _y("RoiAlign", _F2),
    _y("RotaryEmbedding", _F, "`position_ids` must be INT64"), _y("Round", _F),
    _y("STFT", {"FP32"}, "`frame_step` and `window` must be initializers; input must be real-valued",
       initializer={1: "STFT's frame_step", 2: "STFT's window"}),
    _y("ScaledTanh", _F), _y("Scan", _F, typed_inputs=()), _y("Scatter", _FI, typed_inputs=(0, 2)),
    _y("ScatterElements", _FI, typed_inputs=(0, 2)),
    _y("ScatterND", _FI, "`reduction` other than `none` is not supported", typed_inputs=(0, 2),
       attrs={"reduction": ("none", ("none",))}),
    _y("Selu", _F),
    *[_n(op) for op in ("SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
                        "SequenceLength", "SequenceMap")],
    _y("Shape", _FIB), _y("Shrink", _FI), _y("Sigmoid", _F), _y("Sign", _FI), _y("Sin", _F), _y("Sinh", _F),
    _y("Size", _FIB), _y("Slice", _FIB, "tensor `axes` supported since TensorRT 10.3 (earlier: initializer only)"),
    _y("Softmax", _F), _n("SoftmaxCrossEntropyLoss"), _y("Softplus", _F), _y("Softsign", _F),
    _y("SpaceToDepth", _FI), _y("Split", _FIB), _n("SplitToSequence"), _y("Sqrt", _F),
    _y("Squeeze", _FIB, _SQ, constant={1: "Squeeze's axes"}),
    _n("StringConcat"), _n("StringNormalizer"), _n("StringSplit"),
    _y("Sub", _FI, typed_inputs=(0, 1)), _y("Sum", _FI, typed_inputs=_ALL), _y("Tan", _F), _y("Tanh", _F),
    _y("TensorScatter", _F | {"INT32"}, "`past_cache` and `update` must be 4D; `axis` must be -2",
       typed_inputs=(0, 1), attrs={"axis": (-2, (-2,))}),
    _n("TfIdfVectorizer"), _y("ThresholdedRelu", _F), _y("Tile", _FIB),
    _y("TopK", _FI, f"`sorted` must be 1; K <= {TOPK_MAX_K} (matrix: \"less than 3840\"); K may be a run-time "
       "tensor since TensorRT 8.6", attrs={"sorted": (1, (1,))}),
    _y("Transpose", _FIB), _y("Trilu", _FIB), _n("Unique"),
    _y("Unsqueeze", _FIB, _SQ, constant={1: "Unsqueeze's axes"}),
    _y("Upsample", _F), _y("Where", _FIB, "condition is BOOL", typed_inputs=(1, 2)), _y("Xor", _B, typed_inputs=_ALL),
]

MATRIX: dict[str, OpSupport] = {r.op: r for r in _ROWS}


def lookup(op_type: str, domain: str = "") -> OpSupport | None:
    """The matrix row for a default-domain op, or None (not listed: TensorRT would need a plugin)."""
    if domain not in ("", "ai.onnx"):
        return None
    return MATRIX.get(op_type)
