"""What a precision means, as data: the quantization spec, its presets, and the numbers.

A spec is a list of rules; each rule names weights by pattern (fnmatch over the linked graph's
initializer names, which are the deploy-form parameter names under their stamp: `layers.3.q`,
`layers.3.experts_gate_up`, and the MoE lowerings' re-laid-out copies such as
`layers.3.experts_gate_up.native_fc1`) and says how they are stored:

    rule     patterns      ["layers.*.experts_*", "layers.*.shared_*", "layers.*.mlp_*", "layers.*.[qkvo]"]
             weight        int4 | int8 | fp8     storage format of the weight (int8: an int4 build's projections kept at
                                                 8 bits, --int8-weights, as llama.cpp's Q4_K_M keeps attention V at 6)
             granularity   block | channel       int4/int8: blocks along the reduction axis; fp8: per output channel
             block_size    32 | 64 | 128         int4/int8 only; the last block of an axis shorter than it is partial
             activation    none | fp8_tensor     fp8: static per-tensor scale on each activation feeding the MatMul
                           | int8_block          int4 with --int4-compute int8: ONNX Runtime's MatMulNBits and QMoE
                                                 quantize each matmul input to int8 per row and block
                                                 (accuracy_level 4; QMoE: both expert matmuls)
             method        rtn | awq | checkpoint   round to nearest; activation-aware scales (export/awq.py);
                                                  stored FP8 taken as the pre-quantized checkpoint holds it
             zero_point    false | true          int4 only: asymmetric blocks with a 4-bit zero point each
                                                 (--int4-zero-point asymmetric; the ort form's kernels take it)

Presets follow Meta's deployment notes and ModelOpt's FP8_DEFAULT_CFG / INT4 configs: every
linear layer of the decoder (routed experts per expert, shared expert, dense MLPs, attention
projections) is quantized; router, embeddings, lm_head and norms stay in the compute dtype.

The numbers (one definition, used by the graph passes and by the fake-quant simulation alike):

    int4   scale[b, n] = amax(|w[block b, n]|) / 7, rounded to the compute dtype (1 where amax is 0)
           q = clip(rint(w / scale), -8, 7)                      symmetric, zero point 0
    int4   lo = min(min(w[block]), 0), hi = max(max(w[block]), 0)        asymmetric (zero_point), as Q4_1 / Q4_K
           scale = (hi - lo) / 15, rounded to the compute dtype (1 where hi == lo)
           z = clip(rint(-lo / scale), 0, 15);  u = clip(rint(w / scale) + z, 0, 15);  w' = (u - z) * scale
    int8   scale[b, n] = amax(|w[block b, n]|) / 127, rounded to the compute dtype (1 where amax is 0)
           q = clip(rint(w / scale), -127, 127)                  symmetric, zero point 0
    fp8    scale[n] = amax(|w[:, n]|) / 448, rounded to the compute dtype (1 where amax is 0)
           q = float8_e4m3fn(clip(w / scale, -448, 448))          round to nearest even
    dequantized w' = q * scale (asymmetric int4: (u - z) * scale; 0 is exact, as every representable range holds it)
"""

from __future__ import annotations

import fnmatch
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from llama4_deploy.graphs.forms import (
    AUTO,
    INT4_DEFAULTS,
    BlockSize,
    ComputeDtype,
    Int4Compute,
    Int4ZeroPoint,
    Int8Weight,
    Precision,
    QuantForm,
    QuantMethod,
    values,
)

INT4_MAX = 7
INT8_MAX = 127
FP8_MAX = 448.0  # largest finite float8_e4m3fn
LINEAR_PATTERNS = (
    "layers.*.experts_*",
    "layers.*.shared_*",
    "layers.*.mlp_*",
    "layers.*.q",
    "layers.*.k",
    "layers.*.v",
    "layers.*.o",
)

# --int8-weights: the projections an int4 build may keep at 8 bits (2-D weights: MatMulNBits; the routed experts are
# one QMoE kernel with one bit width)
INT8_WEIGHT_PATTERNS = {
    "q": "layers.*.q",
    "k": "layers.*.k",
    "v": "layers.*.v",
    "o": "layers.*.o",
    "shared": "layers.*.shared_*",
    "mlp": "layers.*.mlp_*",
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuantRule(Strict):
    patterns: tuple[str, ...]
    weight: Literal["int4", "int8", "fp8"]
    granularity: Literal["block", "channel"]
    block_size: int | None = None
    activation: Literal["none", "fp8_tensor", "int8_block"] = "none"
    method: Literal["rtn", "awq", "checkpoint"] = "rtn"
    zero_point: bool = False  # int4: asymmetric blocks, a 4-bit zero point each

    @property
    def bits(self) -> int | None:
        """Bits per stored value of a blocked integer weight (int4, int8); None for fp8."""
        return {"int4": 4, "int8": 8}.get(self.weight)

    def matches(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") for p in self.patterns)


class QuantSpec(Strict):
    """Precision of a build: compute dtype plus the rules for quantized weights (none for fp32/fp16/bf16)."""

    precision: Precision
    compute_dtype: ComputeDtype
    rules: tuple[QuantRule, ...] = ()
    form: QuantForm = "qdq"

    def rule_for(self, name: str) -> QuantRule | None:
        return next((rule for rule in self.rules if rule.matches(name)), None)

    @property
    def quantized(self) -> bool:
        return bool(self.rules)

    @property
    def activations(self) -> bool:
        """Whether activations carry static fp8 scales (which need calibration)."""
        return any(rule.activation == "fp8_tensor" for rule in self.rules)

    @property
    def int8_activations(self) -> bool:
        """Whether some MatMulNBits or QMoE quantizes its input to int8 (--int4-compute int8). ONNX Runtime 1.32
        takes the int8 path only on prepacked weights: without prepacking (session.disable_prepacking) accuracy_level
        4 dequantizes the weight and multiplies in float, so whatever checks these numbers must prepack."""
        return any(rule.activation == "int8_block" for rule in self.rules)

    @property
    def int8_experts(self) -> QuantRule | None:
        """The rule of the routed experts where their activations are int8 (QMoE with accuracy_level 4), else None."""
        rule = self.rule_for("layers.0.experts_gate_up")
        return rule if rule is not None and rule.activation == "int8_block" else None

    def qmoe_refusal(self, hidden: int, intermediate: int) -> str | None:
        """Why a model of this hidden and expert intermediate size cannot have its routed experts as the spec says
        (None: it can, or nothing in the spec needs QMoE): int8 expert activations and asymmetric int4 experts are
        QMoE's alone, and QMoE needs both sizes to be multiples of the block (quantized builds keep experts whole:
        lower_moe_native.py's part split is 1)."""
        rule = self.rule_for("layers.0.experts_gate_up")
        if rule is None or rule.weight != "int4" or not (hidden % rule.block_size or intermediate % rule.block_size):
            return None
        needs = ["int8 activations (--int4-compute int8)"] if rule.activation == "int8_block" else []
        needs += ["zero points (--int4-zero-point asymmetric)"] if rule.zero_point else []
        if not needs:
            return None
        fits = [b for b in values(BlockSize) if not hidden % b and not intermediate % b]
        return (
            f"{' and '.join(needs)} put the routed experts on ONNX Runtime's QMoE kernel, which needs the hidden size "
            f"({hidden}) and the expert intermediate size ({intermediate}) to be multiples of the block size "
            f"({rule.block_size}); "
            + (f"use --block-size {' or '.join(map(str, fits))}" if fits else "no supported block size divides both")
            + " (the ort form's defaults: block 32, int8, asymmetric; --int4-compute float --int4-zero-point "
            "symmetric take any size)"
        )

    def native_moe_refusal(self) -> str | None:
        """Why the native MoE kernel cannot run this spec (None: it can)."""
        if self.activations:
            return (
                f"precision {self.precision} quantizes expert activations, which the native MoE kernel cannot "
                f"take; use --moe-dispatch dense, gather, capacity or auto"
            )
        if any(rule.method == "checkpoint" for rule in self.rules):
            return (
                "the checkpoint's FP8 experts go in as stored, and the native MoE kernel has no FP8 form; "
                "use --moe-dispatch dense, gather, capacity or auto"
            )
        return None

    def dispatch_refusals(self) -> dict[str, str]:
        """MoE dispatches this spec cannot run on any target, each with its one-sentence reason (a target adds its
        own: llama4_deploy/targets/)."""
        native = self.native_moe_refusal()
        refusals = {"native": native} if native else {}
        if any(rule.zero_point for rule in self.rules):
            # the other dispatches keep stacked expert weights, which only the qdq form (zero point 0) would take
            reason = (
                "asymmetric int4 experts are ONNX Runtime's QMoE kernel (zero points); use --moe-dispatch native "
                "or auto"
            )
            refusals.update({strategy: reason for strategy in ("dense", "gather", "capacity")})
        elif self.int8_experts is not None:
            # the other dispatches' experts go through the qdq form's DequantizeLinear -> MatMul, in float
            reason = (
                "int8 expert activations (--int4-compute int8) are ONNX Runtime's QMoE kernel (accuracy_level 4); "
                "use --moe-dispatch native or auto"
            )
            refusals.update({strategy: reason for strategy in ("dense", "gather", "capacity")})
        return refusals

    def summary(self) -> str:
        if not self.rules:
            return f"{self.precision}: {self.compute_dtype} compute, no quantized weights"
        parts = []
        for rule in self.rules:
            what = f"{rule.weight} {rule.granularity}" + (f" {rule.block_size}" if rule.block_size else "")
            what += " asymmetric" if rule.zero_point else ""
            act = "" if rule.activation == "none" else f", activations {rule.activation}"
            parts.append(f"{what} ({rule.method}{act}) on {', '.join(rule.patterns)}")
        return f"{self.precision} [{self.form}]: {self.compute_dtype} compute; " + "; ".join(parts)


class QuantConfig(Strict):
    """The build's precision choices (recipe keys and CLI flags map onto these)."""

    precision: Precision = "fp32"
    compute_dtype: ComputeDtype | None = None  # None: from the precision
    # block_size and int4_compute default to the qdq form's; a build passes both, resolved per target (targets/base.py)
    block_size: int = Field(INT4_DEFAULTS["qdq"].block_size, description="int4 block along the reduction axis")
    form: Literal[QuantForm, "auto"] = "auto"
    method: QuantMethod = "rtn"  # awq: int4 only (export/awq.py)
    # int4: "float" keeps activations in the compute dtype (the spec's weight-only INT4); "int8" lets ONNX Runtime's
    # MatMulNBits and QMoE quantize their activations to int8 per block (accuracy_level 4, the fast CPU kernels)
    int4_compute: Int4Compute = INT4_DEFAULTS["qdq"].int4_compute
    # int4: "asymmetric" stores a 4-bit zero point per block (MatMulNBits' and QMoE's zero_points inputs)
    int4_zero_point: Int4ZeroPoint = "symmetric"
    # int4: projections kept at 8 bits (symmetric blocks of the same size; MatMulNBits bits=8), for the few weights
    # whose rounding moves the logits most, as llama.cpp's Q4_K_M keeps attention V at 6 bits
    int8_weights: tuple[Int8Weight, ...] = ()


def default_compute_dtype(precision: str) -> str:
    return {"fp16": "float16", "bf16": "bfloat16"}.get(precision, "float32")


def form_for(precision: str, choice: str = AUTO, int4_form: QuantForm = "ort") -> QuantForm:
    """auto: the target's form for int4 (`int4_form`: ONNX Runtime's 4-bit kernels by default); Q/DQ otherwise (FP8
    has no fast CPU kernel)."""
    if choice != AUTO:
        return choice
    return int4_form if precision == "int4" else "qdq"


def make_spec(config: QuantConfig, int4_form: QuantForm = "ort") -> QuantSpec:
    """The preset spec of a precision; `int4_form`: what form auto means for int4 on the build's target. Raises
    ValueError (one sentence) on a bad combination."""
    if config.block_size not in values(BlockSize):
        raise ValueError(
            f"block size {config.block_size} is not supported; choose one of {', '.join(map(str, values(BlockSize)))}"
        )
    compute = config.compute_dtype or default_compute_dtype(config.precision)
    form = form_for(config.precision, config.form, int4_form)
    if config.precision == "fp16" and compute != "float16" or config.precision == "bf16" and compute != "bfloat16":
        raise ValueError(f"precision {config.precision} is a compute dtype; it cannot run in {compute}")
    if config.precision == "fp8" and form == "ort":
        raise ValueError("fp8 has no ONNX Runtime 4-bit kernel form; use --quant-form qdq (ONNX Runtime runs it)")
    if config.precision not in ("fp8", "int4") and config.form == "ort":
        raise ValueError(f"precision {config.precision} quantizes nothing; the ort form needs int4")
    if config.method == "awq" and config.precision != "int4":
        raise ValueError(f"--quant-method awq is for int4 weights; precision {config.precision} uses rtn")
    if config.int4_compute == "int8" and not (config.precision == "int4" and form == "ort"):
        raise ValueError(
            "--int4-compute int8 is ONNX Runtime's MatMulNBits and QMoE kernels (accuracy_level 4): it needs "
            "--precision int4 and the ort form"
        )
    asymmetric = config.int4_zero_point == "asymmetric"
    if asymmetric and not (config.precision == "int4" and form == "ort"):
        raise ValueError(
            "--int4-zero-point asymmetric is ONNX Runtime's MatMulNBits / QMoE zero points: it needs "
            "--precision int4 and the ort form"
        )
    if config.int8_weights and not (config.precision == "int4" and form == "ort"):
        raise ValueError(
            "--int8-weights keeps projections of an int4 build at 8 bits on ONNX Runtime's MatMulNBits: it needs "
            "--precision int4 and the ort form"
        )
    rules: tuple[QuantRule, ...] = ()
    int4 = dict(
        weight="int4", granularity="block", block_size=config.block_size, method=config.method, zero_point=asymmetric
    )
    if config.precision == "int4":
        # int8: MatMulNBits takes the 2-D linear layers and QMoE the routed experts, both with int8 activations; the
        # qdq form computes neither, so what would fall through to it is refused (dispatch_refusals, the qdq pass)
        activation = "int8_block" if config.int4_compute == "int8" else "none"
        rules = (QuantRule(patterns=LINEAR_PATTERNS, activation=activation, **int4),)
        if config.int8_weights:  # first: a weight takes the first rule that names it
            eight = QuantRule(
                patterns=tuple(INT8_WEIGHT_PATTERNS[w] for w in dict.fromkeys(config.int8_weights)),
                weight="int8",
                granularity="block",
                block_size=config.block_size,
                method=config.method,
                activation=activation,
            )
            rules = (eight, *rules)
    elif config.precision == "fp8":
        rules = (QuantRule(patterns=LINEAR_PATTERNS, weight="fp8", granularity="channel", activation="fp8_tensor"),)
    return QuantSpec(precision=config.precision, compute_dtype=compute, rules=rules, form=form if rules else "qdq")


def checkpoint_spec(patterns: tuple[str, ...], activations: bool, compute_dtype: str = "float32") -> QuantSpec:
    """The spec of a pre-quantized FP8 checkpoint: exactly the weights it stores in FP8 (`patterns`), taken as
    stored; with `activations`, static per-tensor FP8 activation scales from calibration."""
    rule = QuantRule(
        patterns=patterns,
        weight="fp8",
        granularity="channel",
        activation="fp8_tensor" if activations else "none",
        method="checkpoint",
    )
    return QuantSpec(precision="fp8", compute_dtype=compute_dtype, rules=(rule,), form="qdq")


def numpy_dtype(compute_dtype: str):
    if compute_dtype == "bfloat16":
        import ml_dtypes  # deferred: `plan` imports this module for its specs, and ml_dtypes is slow to load

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(compute_dtype)


# -- numbers ------------------------------------------------------------------------------------
def _rounded_scale(amax: np.ndarray, top: float, compute_dtype: str) -> np.ndarray:
    scale = np.where(amax > 0, amax / np.float32(top), np.float32(1)).astype(np.float32)
    return scale.astype(numpy_dtype(compute_dtype)).astype(np.float32)


def int4_blocked(w: np.ndarray, axis: int, block: int, compute_dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """(q int8 in [-8, 7] shaped like w, scale float32 with axis shrunk to ceil(K / block))."""
    return int_blocked(w, axis, block, compute_dtype, bits=4)


def int_blocked(
    w: np.ndarray, axis: int, block: int, compute_dtype: str = "float32", bits: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 shaped like w: in [-8, 7] for 4 bits, [-127, 127] for 8; scale float32 with axis shrunk to
    ceil(K / block)): the module docstring's symmetric int4 and int8.

    Computed a slab of the leading axis at a time (an expert stack's experts), in place within each slab, so
    the temporaries stay a fraction of w: the build quantizes while it streams, one weight at a time."""
    w = np.asarray(w, dtype=np.float32)
    axis %= w.ndim
    k = w.shape[axis]
    blocks = -(-k // block)
    q = np.empty(w.shape, dtype=np.int8)
    scale = np.empty(w.shape[:axis] + (blocks,) + w.shape[axis + 1 :], dtype=np.float32)
    if axis == 0 or w.ndim == 1:
        _int_slab(w, q, scale, axis, block, compute_dtype, bits)
        return q, scale
    slab = max(1, SLAB_ELEMENTS // max(1, w[0].size))
    for start in range(0, w.shape[0], slab):
        part = slice(start, start + slab)
        _int_slab(w[part], q[part], scale[part], axis, block, compute_dtype, bits)
    return q, scale


SLAB_ELEMENTS = 1 << 22  # int_blocked's working set: 16 MB of float32 per temporary


def _int_slab(
    w: np.ndarray, q: np.ndarray, scale: np.ndarray, axis: int, block: int, compute_dtype: str, bits: int
) -> None:
    """q and scale of `w` (a slab), written into the given arrays; the last block along `axis` may be partial."""
    top, low = (INT4_MAX, -8) if bits == 4 else (INT8_MAX, -INT8_MAX)
    k = w.shape[axis]
    blocks = scale.shape[axis]
    padded_k = blocks * block
    moved = np.moveaxis(w, axis, -1)
    if padded_k != k:  # zeros do not change a block's amax
        padded = np.zeros(moved.shape[:-1] + (padded_k,), dtype=np.float32)
        padded[..., :k] = moved
        moved = padded
    grouped = moved.reshape(moved.shape[:-1] + (blocks, block))  # a copy when `axis` is not last
    amax = np.abs(grouped).max(-1)  # [..., blocks]
    s = _rounded_scale(amax, top, compute_dtype)
    np.moveaxis(scale, axis, -1)[...] = s
    values = grouped / s[..., None]
    np.rint(values, out=values)
    np.clip(values, low, top, out=values)
    np.moveaxis(q, axis, -1)[...] = values.reshape(values.shape[:-2] + (padded_k,))[..., :k]


def int4_blocked_asymmetric(
    w: np.ndarray, axis: int, block: int, compute_dtype: str = "float32"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u uint8 in [0, 15] shaped like w, scale float32 and zero point uint8 in [0, 15], both with `axis` shrunk to
    ceil(K / block)): the module docstring's asymmetric int4. A partial last block is padded with zeros, which do
    not move its range (0 is always inside it)."""
    w = np.asarray(w, dtype=np.float32)
    axis %= w.ndim
    k = w.shape[axis]
    blocks = -(-k // block)
    moved = np.moveaxis(w, axis, -1)
    padded = np.zeros(moved.shape[:-1] + (blocks * block,), dtype=np.float32)
    padded[..., :k] = moved
    grouped = padded.reshape(moved.shape[:-1] + (blocks, block))
    lo = np.minimum(grouped.min(-1), 0)
    hi = np.maximum(grouped.max(-1), 0)
    span = hi - lo
    scale = np.where(span > 0, span / np.float32(15), np.float32(1)).astype(np.float32)
    scale = scale.astype(numpy_dtype(compute_dtype)).astype(np.float32)
    zero = np.clip(np.rint(-lo / scale), 0, 15)
    u = np.clip(np.rint(grouped / scale[..., None]) + zero[..., None], 0, 15).astype(np.uint8)
    u = np.moveaxis(u.reshape(padded.shape)[..., :k], -1, axis)
    return np.ascontiguousarray(u), np.moveaxis(scale, -1, axis), np.moveaxis(zero.astype(np.uint8), -1, axis)


def int4_dequantize_asymmetric(u: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int, block: int):
    take = lambda a: np.take(np.repeat(a, block, axis=axis), np.arange(u.shape[axis]), axis=axis)  # noqa: E731
    return (u.astype(np.float32) - take(zero).astype(np.float32)) * take(scale)


def int4_dequantize(q: np.ndarray, scale: np.ndarray, axis: int, block: int) -> np.ndarray:
    """q * scale with each scale repeated over its block (int4 and int8 alike)."""
    expanded = np.repeat(scale, block, axis=axis)
    expanded = np.take(expanded, np.arange(q.shape[axis]), axis=axis)
    return q.astype(np.float32) * expanded


def fp8_channel(w: np.ndarray, axis: int, compute_dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """(q float8_e4m3fn shaped like w, scale float32 with the reduction `axis` kept as size 1)."""
    import ml_dtypes  # deferred: `plan` imports this module for its specs, and ml_dtypes is slow to load

    w = np.asarray(w, dtype=np.float32)
    scale = _rounded_scale(np.abs(w).max(axis=axis, keepdims=True), FP8_MAX, compute_dtype)
    q = np.clip(w / scale, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


def fp8_dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale


def fp8_activation_scale(amax: float, compute_dtype: str = "float32") -> float:
    return float(_rounded_scale(np.asarray(amax, dtype=np.float32), FP8_MAX, compute_dtype))


def fake_quant(w: np.ndarray, rule: QuantRule, axis: int, compute_dtype: str = "float32") -> np.ndarray:
    """w quantized and dequantized per `rule` along reduction `axis` (what the engine computes with)."""
    if rule.weight == "int4" and rule.zero_point:
        u, scale, zero = int4_blocked_asymmetric(w, axis, rule.block_size, compute_dtype)
        return int4_dequantize_asymmetric(u, scale, zero, axis, rule.block_size)
    if rule.bits:
        q, scale = int_blocked(w, axis, rule.block_size, compute_dtype, bits=rule.bits)
        return int4_dequantize(q, scale, axis, rule.block_size)
    q, scale = fp8_channel(w, axis, compute_dtype)
    return fp8_dequantize(q, scale)


def fake_quant_int8_blocks(x: np.ndarray, block: int) -> np.ndarray:
    """x [.., K] as MatMulNBits (and QMoE, which runs each expert's two matmuls on MatMulNBits' MLAS kernels) with
    accuracy_level 4 sees it: per row and block of K, scale = amax / 127,
    q = rint(x * (127 / amax)) (round half to even), x' = q * scale; a partial last block is its own block."""
    x = np.asarray(x, dtype=np.float32)
    k = x.shape[-1]
    blocks = -(-k // block)
    padded = np.zeros(x.shape[:-1] + (blocks * block,), dtype=np.float32)
    padded[..., :k] = x
    grouped = padded.reshape(x.shape[:-1] + (blocks, block))
    amax = np.abs(grouped).max(-1, keepdims=True)
    scale = (amax / np.float32(127)).astype(np.float32)
    # MLAS (QuantizeARow_CompInt8) multiplies by 127 / amax rather than dividing by the scale
    inverse = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.clip(np.rint(grouped * inverse), -127, 127)
    return (q * scale).reshape(padded.shape)[..., :k].astype(np.float32)


def fake_quant_activation(x: np.ndarray, scale: float) -> np.ndarray:
    import ml_dtypes  # deferred: `plan` imports this module for its specs, and ml_dtypes is slow to load

    return np.clip(x / np.float32(scale), -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn).astype(
        np.float32
    ) * np.float32(scale)


def pack_uint4(u: np.ndarray, block: int) -> np.ndarray:
    """uint4 values [..., K] (in [0, 15], stored as they are) -> [..., ceil(K/block), block/2] uint8, element 2j in
    the low nibble of byte j, a partial last block padded with 0: MatMulNBits' / QMoE's B with zero points."""
    k = u.shape[-1]
    blocks = -(-k // block)
    stored = np.zeros(u.shape[:-1] + (blocks * block,), dtype=np.uint8)
    stored[..., :k] = u
    packed = stored[..., 0::2] | (stored[..., 1::2] << 4)
    return packed.reshape(u.shape[:-1] + (blocks, block // 2))


def pack_zero_points(zero: np.ndarray) -> np.ndarray:
    """zero points [..., blocks] (in [0, 15]) -> [..., ceil(blocks / 2)] uint8, low nibble first (the kernels'
    packed zero_points; an odd count's last high nibble is 0)."""
    blocks = zero.shape[-1]
    stored = np.zeros(zero.shape[:-1] + (blocks + blocks % 2,), dtype=np.uint8)
    stored[..., :blocks] = zero
    return stored[..., 0::2] | (stored[..., 1::2] << 4)


def pack_int4_rows(q: np.ndarray, block: int) -> np.ndarray:
    """int4 values [..., K] (in [-8, 7]) -> ONNX Runtime's MatMulNBits / QMoE storage [..., ceil(K/block), block/2]
    uint8: stored value q + 8 (the kernels' default zero point 8), element 2j in the low nibble of byte j,
    a partial last block padded with stored 8 (zero)."""
    k = q.shape[-1]
    blocks = -(-k // block)
    stored = np.full(q.shape[:-1] + (blocks * block,), 8, dtype=np.uint8)
    # q + 8 in one pass: int8 [-8, 7] seen as uint8 is 248..255, 0..7, and + 8 wraps those to 0..15
    np.add(np.asarray(q, dtype=np.int8).view(np.uint8), np.uint8(8), out=stored[..., :k])
    packed = stored[..., 0::2] | (stored[..., 1::2] << 4)
    return packed.reshape(q.shape[:-1] + (blocks, block // 2))


def pack_int8_rows(q: np.ndarray, block: int) -> np.ndarray:
    """int8 values [..., K] (in [-127, 127]) -> MatMulNBits' 8-bit storage [..., ceil(K/block), block] uint8:
    stored value q + 128 (the kernel's default zero point for 8 bits), a partial last block padded with 128."""
    k = q.shape[-1]
    blocks = -(-k // block)
    stored = np.full(q.shape[:-1] + (blocks * block,), 128, dtype=np.uint8)
    np.add(np.asarray(q, dtype=np.int8).view(np.uint8), np.uint8(128), out=stored[..., :k])  # wraps, as int4's
    return stored.reshape(q.shape[:-1] + (blocks, block))
