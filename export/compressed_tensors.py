"""Pre-quantized FP8 checkpoints in llm-compressor's compressed-tensors layout (Meta's FP8 Llama 4 release).

The layout, as transformers' compressed-tensors integration (integrations/compressed_tensors_fp8.py:
`weight_scale` is the dequantization multiplier, per channel [out, 1]) and the Llama 4 loaders of vLLM
(models/llama4.py: per-expert `experts.{e}.gate_proj` names for quantized checkpoints, stacked
`experts.gate_up_proj` otherwise) and tpu-inference read it:

    config.json  quantization_config:
                   quant_method "compressed-tensors", format "float-quantized"
                   config_groups.*: targets ["Linear"],
                                    weights           {num_bits 8, type float, strategy channel|tensor, symmetric}
                                    input_activations {num_bits 8, type float, strategy token, dynamic true} | null
                   ignore: modules left unquantized, by name or "re:<regex>" (Meta's: attention, routers, shared
                           experts, dense MLPs, lm_head, the vision tower)
    tensors      per quantized nn.Linear M:   M.weight        float8_e4m3fn [out, in]
                                              M.weight_scale  [out, 1] (or one value per tensor)
                                              dequantized weight = M.weight * M.weight_scale
                 routed experts are stored per expert (llm-compressor unpacks Llama4TextExperts into Linear
                 modules): model.layers.L.feed_forward.experts.E.{gate,up,down}_proj.weight(+_scale), while the
                 bf16 release stacks them as experts.gate_up_proj [E, H, 2I] and experts.down_proj [E, I, H].

`CompressedTensorsFP8` validates the scheme; `LogicalTensors` gives the checkpoint's tensors under
Llama4ForCausalLM's own names: `float_tensor` (dequantized, for the reference and calibration) and `fp8`
(the stored bytes and scales, re-laid out only: transposed and stacked, never rounded). The build puts the
latter into the qdq form's FLOAT8E4M3FN initializers as they are (`deploy_fp8`). Dynamic per-token activation
scaling becomes a static per-tensor scale from calibration (TensorRT takes only per-tensor activation
scales); docs/precision.md gives what that costs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np

from llama4_deploy.export.weights import all_weights
from llama4_deploy.graphs.quantize import checkpoint_spec

EXPERTS = re.compile(r"^(?P<prefix>.*\.feed_forward\.experts)\.(?P<which>gate_up_proj|down_proj)$")


class CompressedTensorsError(ValueError):
    """A quantization_config this build cannot take; the message is one sentence."""


class CompressedTensorsFP8:
    """The FP8 scheme of a checkpoint's quantization_config (None from `from_config` when there is none)."""

    def __init__(self, ignore: list[str], dynamic_activations: bool | None):
        self.ignore = tuple(ignore)
        self.dynamic_activations = dynamic_activations  # None: weight-only FP8

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CompressedTensorsFP8 | None:
        q = config.get("quantization_config")
        if q is None and isinstance(config.get("text_config"), dict):
            q = config["text_config"].get("quantization_config")
        if q is None:
            return None
        method = q.get("quant_method") if isinstance(q, dict) else None
        if method != "compressed-tensors":
            raise CompressedTensorsError(
                f"quantization_config has quant_method {method!r}; pre-quantized checkpoints "
                f"are read in llm-compressor's compressed-tensors FP8 layout only"
            )
        if q.get("format") not in ("float-quantized", "naive-quantized"):
            raise CompressedTensorsError(
                f"compressed-tensors format {q.get('format')!r} is not supported; FP8 checkpoints use float-quantized"
            )
        groups = q.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise CompressedTensorsError("compressed-tensors quantization_config has no config_groups")
        dynamic = set()
        for name, group in groups.items():
            w = (group or {}).get("weights") or {}
            if not (
                w.get("num_bits") == 8
                and w.get("type") == "float"
                and w.get("strategy") in ("channel", "tensor")
                and w.get("symmetric", True)
                and not w.get("dynamic", False)
            ):
                raise CompressedTensorsError(
                    f"config group {name} quantizes weights as {w.get('type')} {w.get('num_bits')}-bit "
                    f"{w.get('strategy')}; only symmetric FP8 (8-bit float) per channel or per tensor is supported"
                )
            a = group.get("input_activations")
            if a is None:
                dynamic.add(None)
            elif a.get("num_bits") == 8 and a.get("type") == "float" and a.get("dynamic") is True:
                dynamic.add(True)
            else:
                raise CompressedTensorsError(
                    f"config group {name} has input activations {a.get('type')} {a.get('num_bits')}-bit "
                    f"{'dynamic' if a.get('dynamic') else 'static'} {a.get('strategy')}; supported: dynamic FP8 or none"
                )
            if group.get("output_activations") is not None:
                raise CompressedTensorsError(
                    f"config group {name} quantizes output activations, which is not supported"
                )
        if len(dynamic) > 1:
            raise CompressedTensorsError("config groups mix weight-only and activation-quantized FP8")
        ignore = q.get("ignore") or []
        if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
            raise CompressedTensorsError("compressed-tensors ignore must be a list of module names")
        return cls(ignore, dynamic.pop())

    def ignored(self, module: str) -> bool:
        """compressed-tensors' matching: an exact module name, or `re:` followed by a regex (re.match)."""
        return any(re.match(entry[3:], module) if entry.startswith("re:") else entry == module for entry in self.ignore)


def _numpy_fp8(tensor) -> np.ndarray:
    import ml_dtypes  # deferred with torch: the CLI imports checkpoint.py, and so this module, without them
    import torch  # deferred: the CLI imports checkpoint.py, and so this module, without torch

    return tensor.contiguous().view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)


class LogicalTensors:
    """A compressed-tensors checkpoint's tensors under Llama4ForCausalLM's names.

    `raw_has(name)`, `raw_shape(name)`, `raw_dtype(name)` (safetensors' dtype string, read from the header) and
    `raw_tensor(name)` read the stored tensors (without the multimodal prefix; `prefix` is prepended for `ignore`
    matching)."""

    def __init__(
        self,
        scheme: CompressedTensorsFP8,
        raw_has: Callable,
        raw_shape: Callable,
        raw_dtype: Callable,
        raw_tensor: Callable,
        prefix: str,
        num_experts: int,
    ):
        self.scheme, self.prefix, self.num_experts = scheme, prefix, num_experts
        self._has, self._shape, self._dtype, self._tensor = raw_has, raw_shape, raw_dtype, raw_tensor

    # -- names --------------------------------------------------------------------------------
    def _experts(self, name: str) -> tuple[str, str] | None:
        """(experts prefix, which) when `name` is a stacked expert tensor the checkpoint stores per expert."""
        m = EXPERTS.match(name)
        if m is None or self._has(name) or not self._has(f"{m['prefix']}.0.down_proj.weight"):
            return None
        return m["prefix"], m["which"]

    def _parts(self, prefix: str, which: str) -> list[str]:
        """Per-expert Linear modules making up the stacked tensor, in stacking order (experts, then gate before up)."""
        kinds = ("gate_proj", "up_proj") if which == "gate_up_proj" else ("down_proj",)
        return [f"{prefix}.{e}.{kind}" for e in range(self.num_experts) for kind in kinds]

    def stored_modules(self, name: str) -> list[str] | None:
        """The per-expert Linear modules a stacked expert tensor is read from, or None for a tensor stored as named."""
        experts = self._experts(name)
        return None if experts is None else self._parts(*experts)

    def has(self, name: str) -> bool:
        experts = self._experts(name)
        if experts is None:
            return self._has(name)
        return all(self._has(f"{module}.weight") for module in self._parts(*experts))

    def shape(self, name: str) -> tuple[int, ...]:
        experts = self._experts(name)
        if experts is None:
            return tuple(self._shape(name))
        prefix, which = experts
        out, k = self._shape(f"{prefix}.0.{'gate_proj' if which == 'gate_up_proj' else 'down_proj'}.weight")
        return (self.num_experts, k, 2 * out if which == "gate_up_proj" else out)

    # -- quantized or not ---------------------------------------------------------------------
    def _module_quantized(self, module: str) -> bool:
        stored = self._dtype(f"{module}.weight") == "F8_E4M3"
        full = self.prefix + module
        if stored and self.scheme.ignored(full):
            raise CompressedTensorsError(f"{full} is listed in quantization_config.ignore but stored in float8_e4m3fn")
        if stored and not self._has(f"{module}.weight_scale"):
            raise CompressedTensorsError(f"{full}.weight is float8_e4m3fn but has no weight_scale")
        return stored

    def quantized(self, name: str) -> bool:
        """Whether the tensor `name` (a Linear's `.weight` or a stacked expert tensor) is stored in FP8."""
        experts = self._experts(name)
        if experts is not None:
            flags = {self._module_quantized(m) for m in self._parts(*experts)}
            if len(flags) > 1:
                raise CompressedTensorsError(f"{self.prefix}{name}: some experts are FP8 and some are not")
            return flags.pop()
        return name.endswith(".weight") and self._module_quantized(name[: -len(".weight")])

    # -- values -------------------------------------------------------------------------------
    def _module_fp8(self, module: str):
        """(q float8 torch [out, in], scale float32 torch [out, 1]) of one quantized Linear."""
        import torch  # deferred: the CLI imports checkpoint.py, and so this module, without torch

        q = self._tensor(f"{module}.weight")
        scale = self._tensor(f"{module}.weight_scale").to(torch.float32)
        if scale.numel() == 1:  # per-tensor: one scale for every output channel
            scale = scale.reshape(1, 1).expand(q.shape[0], 1)
        if tuple(scale.shape) not in ((q.shape[0], 1), (q.shape[0],)):
            raise CompressedTensorsError(
                f"{self.prefix}{module}.weight_scale has shape {list(scale.shape)}; "
                f"per-channel FP8 needs [{q.shape[0]}, 1]"
            )
        finite = torch.isfinite(q.to(torch.float32)).all() and torch.isfinite(scale).all()
        if not bool(finite):
            raise CompressedTensorsError(
                f"{self.prefix}{module} holds NaN or Inf FP8 values or scales; the build refuses non-finite weights"
            )
        return q, scale.reshape(-1, 1)

    def fp8(self, name: str):
        """(q, scale) of a quantized tensor in the checkpoint's (logical) layout, the scale keeping the reduction
        axis as size 1: a Linear's [out, in] with [out, 1]; stacked experts [E, K, N] with [E, 1, N]. The FP8
        bytes are moved (transposed, stacked), never rounded."""
        import torch  # deferred: the CLI imports checkpoint.py, and so this module, without torch

        experts = self._experts(name)
        if experts is None:
            return self._module_fp8(name[: -len(".weight")])
        prefix, which = experts
        qs, scales = [], []
        for e in range(self.num_experts):
            kinds = ("gate_proj", "up_proj") if which == "gate_up_proj" else ("down_proj",)
            parts = [self._module_fp8(f"{prefix}.{e}.{kind}") for kind in kinds]
            qs.append(torch.cat([q.view(torch.uint8).t() for q, _ in parts], dim=-1))  # [K, N]
            scales.append(torch.cat([s.t() for _, s in parts], dim=-1))  # [1, N]
        return torch.stack(qs).view(torch.float8_e4m3fn), torch.stack(scales)

    def float_tensor(self, name: str):
        """The tensor in float32 (dequantized when stored in FP8), stacked when the checkpoint splits experts."""
        import torch  # deferred: the CLI imports checkpoint.py, and so this module, without torch

        if self.quantized(name):
            q, scale = self.fp8(name)
            return q.to(torch.float32) * scale
        experts = self._experts(name)
        if experts is None:
            return self._tensor(name)
        prefix, which = experts
        kinds = ("gate_proj", "up_proj") if which == "gate_up_proj" else ("down_proj",)
        return torch.stack(
            [
                torch.cat([self._tensor(f"{prefix}.{e}.{k}.weight").to(torch.float32).t() for k in kinds], dim=-1)
                for e in range(self.num_experts)
            ]
        )


def deploy_fp8(tensors: LogicalTensors, checkpoint_name: str, transpose: bool) -> tuple[np.ndarray, np.ndarray]:
    """(q float8_e4m3fn, scale float32) in the deploy form's matmul layout [.., K, N], scale [.., 1, N]."""
    q, scale = tensors.fp8(checkpoint_name)
    q, scale = _numpy_fp8(q), scale.numpy()
    if transpose:
        q, scale = np.swapaxes(q, -1, -2), np.swapaxes(scale, -1, -2)
    return np.ascontiguousarray(q), np.ascontiguousarray(scale)


def stored_fp8(checkpoint, shape) -> dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]]:
    """Deploy-form weight name -> a reader of its stored FP8 (q, scale), for every weight the checkpoint quantized."""
    tensors = checkpoint.logical
    if tensors is None:
        return {}
    return {
        name: (lambda s=source: deploy_fp8(tensors, s.checkpoint_name, s.transpose))
        for name, source in all_weights(shape).items()
        if tensors.quantized(source.checkpoint_name)
    }


def weight_patterns(names: list[str], shape) -> tuple[str, ...]:
    """Spec patterns naming exactly `names`: `layers.*.q` where every layer's q is quantized, exact names otherwise."""
    everything = list(all_weights(shape))
    chosen = set(names)
    patterns = []
    for suffix in dict.fromkeys(n.split(".", 2)[2] for n in names if n.startswith("layers.")):
        having = [n for n in everything if n.startswith("layers.") and n.split(".", 2)[2] == suffix]
        if all(n in chosen for n in having):
            patterns.append(f"layers.*.{suffix}")
        else:
            patterns.extend(n for n in having if n in chosen)
    patterns.extend(n for n in names if not n.startswith("layers."))
    return tuple(patterns)


def checkpoint_quant_spec(checkpoint, precision: str, compute_dtype: str | None, quant_form: str):
    """The spec of a pre-quantized checkpoint's build: its FP8 weights as stored, the rest in the compute dtype.
    `precision` fp8, or fp32 (a recipe's default) meaning "as the checkpoint is"; anything else would requantize."""
    if precision not in ("fp8", "fp32"):
        raise CompressedTensorsError(
            f"the checkpoint is pre-quantized FP8 (compressed-tensors), so it builds as fp8 only: {precision} would "
            f"requantize its FP8 weights (use --compute-dtype float16 to run them in float16)"
        )
    if quant_form == "ort":
        raise CompressedTensorsError(
            "fp8 has no ONNX Runtime 4-bit kernel form; use --quant-form qdq (ONNX Runtime runs it)"
        )
    names = list(stored_fp8(checkpoint, checkpoint.shape))
    if not names:
        raise CompressedTensorsError(
            "the checkpoint declares compressed-tensors FP8 but stores none of the "
            "decoder's linear weights in float8_e4m3fn"
        )
    return checkpoint_spec(
        weight_patterns(names, checkpoint.shape),
        bool(checkpoint.logical.scheme.dynamic_activations),
        compute_dtype or "float32",
    )
