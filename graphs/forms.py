"""What a graph can be lowered to, declared once: precisions, compute dtypes, quantized forms, MoE dispatches,
attention forms. The passes, the recipe schema (llama4_deploy/build/recipe.py) and the CLI's choices read these;
this module imports nothing heavy, so the CLI can build its choices at start-up."""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

AUTO = "auto"  # a choice the build resolves per target and engine role

Precision = Literal["fp32", "fp16", "bf16", "fp8", "int4"]
ComputeDtype = Literal["float32", "float16", "bfloat16"]
QuantForm = Literal["qdq", "ort"]  # standard Q/DQ (TensorRT's contract), ONNX Runtime's 4-bit kernels
QuantMethod = Literal["rtn", "awq"]
Int4Compute = Literal["float", "int8"]  # int8: MatMulNBits and QMoE quantize their activations per block
Int4ZeroPoint = Literal["symmetric", "asymmetric"]  # asymmetric: a 4-bit zero point per block (as Q4_1 / Q4_K)
Int8Weight = Literal["q", "k", "v", "o", "shared", "mlp"]  # an int4 build's projections kept at 8 bits
BlockSize = Literal[32, 64, 128]  # int4 block along the reduction axis
MoEDispatch = Literal["dense", "gather", "capacity", "native"]
AttentionForm = Literal["decomposed", "onnx23", "gqa"]  # gqa: ONNX Runtime's kernel over an in-place cache


class Int4Defaults(NamedTuple):
    block_size: BlockSize
    int4_compute: Int4Compute
    int4_zero_point: Int4ZeroPoint
    int8_weights: tuple[Int8Weight, ...]


# what an unset block size / int4 compute / zero point / 8-bit projections mean, per quantized form (resolved per
# target: targets/base.py). ort: blocks of 32 with int8 activations, asymmetric, attention V kept at 8 bits (as
# llama.cpp's Q4_K_M keeps it at 6): the fastest of ONNX Runtime's 4-bit kernels, and the zero points and V's bits
# bring it closest to the reference at no measurable cost in speed (docs/precision.md); qdq: TensorRT's contract,
# whose INT4 DequantizeLinear takes symmetric blocks of 64 or 128 only, and no int8 activations
INT4_DEFAULTS: dict[QuantForm, Int4Defaults] = {
    "ort": Int4Defaults(32, "int8", "asymmetric", ("v",)),
    "qdq": Int4Defaults(128, "float", "symmetric", ()),
}


def values(literal) -> tuple:
    """The allowed values of a Literal (nested Literals and `X | None` flattened, None left out)."""
    out: list = []
    for arg in get_args(literal):
        if arg is type(None):
            continue
        out.extend(values(arg) if get_args(arg) else [arg])
    return tuple(dict.fromkeys(out))
