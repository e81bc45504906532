"""Lower `llama4_deploy.MoE` to ONNX Runtime's fused contrib op `com.microsoft.MoE` (`native`).

    before:  y = MoE(x, router, gate_up, down, shared_gate, shared_up, shared_down; top_k=1)

    after:   logits        = MatMul(x, router)                         # [N, E]
             value, index  = TopK(logits, 1)                           # [N, 1]
             routed_in     = x * Sigmoid(value)                        # [N, H]  score scales the input
             picks         = ScatterElements(full[N, E](lowest), index, zeros[N, 1], axis=1)
             picks         = Tile(picks, [1, P])                       # [N, P*E]  (only when P > 1)
             routed        = com.microsoft.MoE(routed_in, picks, fc1, None, fc2;
                                 k=P, activation_type="swiglu", swiglu_fusion=1,
                                 activation_alpha=1, activation_beta=0,
                                 normalize_routing_weights=1, use_sparse_mixer=0)
             y             = shared(x) + routed

    weights (new initializers, computed lazily from the originals at serialization time), each
    expert split into P parts along its intermediate dimension (Ip = I / P), part p of expert e
    being virtual expert v = p * E + e:
             fc1 = `<gate_up>.native_fc1`  [P*E, 2*Ip, H]  row 2i = gate column p*Ip + i, 2i+1 = up's
             fc2 = `<down>.native_fc2`     [P*E, H, Ip]    P * (rows p*Ip.. of down), transposed
             (named `.native<P>_fc1` / `.native<P>_fc2` when P > 1)

The op (ORT 1.32 CPU kernel, moe_cpu.cc): `router_probs` are *logits*: per token the kernel
takes softmax over its experts, picks the top k, and with normalize_routing_weights=1 weights
each pick by p / sum(top-k p); it computes expert(x_n) = fc2 @ act(fc1 @ x_n) (both weights used
transposed, i.e. stored [out, in]) and returns sum over picks of weight * expert(x_n). With
swiglu_fusion=1 FC1's output row is interleaved [g0, l0, g1, l1, ...] and act = G * sigmoid(alpha
* G) * (L + beta) with no clamp unless swiglu_limit is given. The CPU kernel accepts only
swiglu_fusion=1 for swiglu (2, concatenated [g | l], throws at session creation), and no FC3.

Why split (P): the kernel spreads *experts* over its threads in contiguous ranges and runs each
expert's GEMMs on one thread, so a decode step whose one token picks one expert streams that
expert's weights on a single core. The SwiGLU expert is a sum over its intermediate units,
expert(x) = sum_p down_p^T (silu(gate_p^T x) * up_p^T x), so P parts of it are P experts whose
outputs add up to it; laid out part-major (v = p * E + e), a thread range holds different parts
of the same expert and all threads share the stream. P is a power of two chosen from the
expert's size (`parts`), so small experts, where the per-expert overhead dominates, stay whole.

Why it is exact: `picks` holds 0 at the P virtual experts of the expert TopK chose and the
dtype's lowest finite value elsewhere, so the kernel's softmax gives exactly 1/P to each of them
(exp(0) = 1, exp(lowest) = 0, P a power of two) and 0 to every other expert; it routes the token
to exactly those P, and normalization leaves 1/P. Scaling fc2 by P (a power of two: exact)
makes each part's weighted output exactly that part's contribution; only the summation order of
the parts differs from one GEMM. alpha=1, beta=0, no limit makes the activation silu(g) * u, the
Llama 4 expert. Llama 4 scales the expert's *input* by sigmoid(logit) (not its output, the
expert being nonlinear), so the score goes into routed_in, as in the reference. The kernel's own
softmax routing is bypassed entirely (Llama 4 routes by sigmoid, not softmax), and the choice is
TopK's, with ONNX's tie rule (lowest index), like the other lowerings.

Only top_k == 1: for k > 1 the kernel's weights would have to be sigmoid(logit) per pick on
experts fed with differently scaled inputs, which a single pre-scaled input cannot express.
token_valid is ignored: the op has no capacity for padding to take. The CPU kernel runs float
and float16. Cost: the routed FLOPs exactly; expert weights are read in place, once.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes  # finfo for bfloat16 too
import numpy as np
import onnx_ir as ir

from llama4_deploy.graphs import ops
from llama4_deploy.graphs.lower_moe_dense import shared_expert
from llama4_deploy.graphs.moe_pass import MoeLoweringPass, route, top_score
from llama4_deploy.graphs.rewrite import scoped
from llama4_deploy.graphs.streamed import StreamedTensor

STRATEGY = "native"
MS_DOMAIN = "com.microsoft"
MS_VERSION = 1
MAX_PARTS = 4  # the thread counts a CPU decode step is usually given, 2 to 4
# small experts run slower split (the kernel's per-expert cost dominates), large ones faster: docs/dispatch.md
MIN_PART_BYTES = 2 << 20


def parts(intermediate: int, expert_bytes: int) -> int:
    """How many parts to split each expert into: the largest power of two up to MAX_PARTS whose
    parts keep at least MIN_PART_BYTES of weights each and divide the intermediate size."""
    p = 1
    while p < MAX_PARTS and expert_bytes // (2 * p) >= MIN_PART_BYTES and intermediate % (2 * p) == 0:
        p *= 2
    return p


def weight_names(gate_up: str, down: str, p: int) -> tuple[str, str]:
    tag = "native" if p == 1 else f"native{p}"
    return f"{gate_up}.{tag}_fc1", f"{down}.{tag}_fc2"


def _constant_weight(value: ir.Value) -> bool:
    return value.const_value is not None and value.is_initializer()


def check(node: ir.Node, any_top_k: bool = False, split: int | None = None) -> str | None:
    """Why `node` cannot be lowered, or None. `any_top_k`: only the weights' checks (the native layout
    gather takes any top_k); `split`: the parts each expert is split into must divide its intermediate size."""
    if len(node.inputs) not in (len(ops.MOE_INPUTS) - 1, len(ops.MOE_INPUTS)) or any(
        v is None for v in node.inputs[: len(ops.MOE_INPUTS) - 1]
    ):
        return f"has {len(node.inputs)} inputs, expected {len(ops.MOE_INPUTS)}"
    top_k = node.attributes.get("top_k")
    if top_k is None or top_k.as_int() < 1:
        return "has no positive top_k attribute"
    if top_k.as_int() != 1 and not any_top_k:
        return (
            f"has top_k {top_k.as_int()}; com.microsoft.MoE can express only top_k 1 "
            "(Llama 4 scales each expert's input by its own score, the op weights outputs)"
        )
    gate_up, down = node.inputs[2], node.inputs[3]
    for role, value in (("gate_up", gate_up), ("down", down)):
        if not _constant_weight(value):
            return (
                f"has a {role} input ({value.name}) that is not an initializer with a value, "
                "so it cannot be re-laid out"
            )
    gu, dn = gate_up.const_value.shape, down.const_value.shape
    if len(gu) != 3 or len(dn) != 3 or gu[2] % 2 or gu[0] != dn[0] or gu[2] != 2 * dn[1] or gu[1] != dn[2]:
        return f"has expert weights of shapes {list(gu)} and {list(dn)}, expected [E, H, 2I] and [E, I, H]"
    router_shape = node.inputs[1].shape
    if router_shape is not None and isinstance(router_shape[-1], int) and router_shape[-1] != gu[0]:
        return f"has a router over {router_shape[-1]} experts but {gu[0]} expert weights"
    if split is not None and dn[1] % split:
        return f"has an intermediate size of {dn[1]}, not divisible by split {split}"
    return None


# bytes of re-laid output a streamed write converts at a time (`relaid`): a few experts, so the
# buffer stays in cache-sized pieces and is reused, instead of page-faulting a fresh tensor of the whole stack
CHUNK_BYTES = 8 << 20


def _as_torch(source):
    """(a torch tensor of `source`, the numpy dtype to view the result as or None). A numpy dtype torch lacks
    (ml_dtypes' bfloat16) is moved as unsigned integers of its width: a permutation is exact."""
    import torch  # deferred: `lint` loads the passes (through the targets) without torch

    if not isinstance(source, np.ndarray):
        return source, None
    try:
        return torch.from_numpy(source), None
    except TypeError:  # not a torch dtype
        return torch.from_numpy(source.view(f"u{source.dtype.itemsize}")), source.dtype


class Relayout:
    """One re-layout of an expert stack: `view` maps the stack to a permuted view whose two leading dims are
    [P, E], which flatten into the output's first, virtual-expert dim; the output is that view made contiguous
    (in `dtype`: a torch dtype converted to in the same copy, None keeps the source's), times `scale`.

    Calling it copies the whole stack at once; `chunks` yields it a few experts at a time, in output order,
    through two reused buffers (the build's streamed save, `relaid`)."""

    def __init__(self, view: Callable, shape: Callable, scale: int = 1):
        self.view, self.shape, self.scale = view, shape, scale

    def __call__(self, source, dtype=None):
        import torch  # deferred: `lint` loads the passes (through the targets) without torch

        tensor, stored = _as_torch(source)
        permuted = self.view(tensor)
        out = torch.empty(permuted.shape, dtype=dtype or tensor.dtype)
        out.copy_(permuted)  # one torch copy: converts and permutes in the same pass
        out = out.reshape(self.shape(tuple(tensor.shape)))
        if isinstance(source, np.ndarray):  # scaled after the view back: `stored` moved as integers
            out = out.numpy() if stored is None else out.numpy().view(stored)
        if self.scale != 1:
            out *= out.dtype.type(self.scale) if isinstance(out, np.ndarray) else self.scale
        return out

    def chunks(self, source, dtype, chunk_bytes: int | None = None, finish: Callable | None = None):
        """The output's rows (virtual experts) in consecutive pieces, `finish(piece)` of each (the torch piece
        itself by default). Each piece is computed on a worker thread while the caller consumes the one before
        (writes it, in the build), through two buffers: a piece is valid until the next one is asked for."""
        import torch  # deferred: `lint` loads the passes (through the targets) without torch

        permuted = self.view(source)
        parts, experts, *rest = permuted.shape
        shape = self.shape(tuple(source.shape))
        row = int(np.prod(shape[1:])) * torch.empty((), dtype=dtype).element_size()
        step = max(1, min(experts, (chunk_bytes or CHUNK_BYTES) // max(row, 1)))
        pieces = [
            (part, first, min(step, experts - first)) for part in range(parts) for first in range(0, experts, step)
        ]
        buffers = [torch.empty((step, *rest), dtype=dtype) for _ in range(min(2, len(pieces)))]

        def fill(index: int):
            part, first, count = pieces[index]
            piece = buffers[index % 2][:count]
            piece.copy_(permuted[part, first : first + count])
            if self.scale != 1:
                piece *= self.scale
            piece = piece.reshape(count, *shape[1:])
            return piece if finish is None else finish(piece)

        with ThreadPoolExecutor(1, thread_name_prefix="relayout") as pool:
            ahead = pool.submit(fill, 0) if pieces else None
            for index in range(len(pieces)):
                current = ahead.result()
                # the next piece fills the other buffer while this one is consumed
                ahead = pool.submit(fill, index + 1) if index + 1 < len(pieces) else None
                yield current


def fc1_relayout(p: int = 1) -> Relayout:
    """[E, H, 2I] (gate columns, then up) -> [P*E, 2I/P, H]: virtual expert p*E + e holds part p
    of expert e's intermediate units, gate and up rows interleaved.

    Column s*I + q*(I/P) + j of expert e (s: 0 gate, 1 up) becomes row 2j + s of virtual expert q*E + e:
    one strided copy into the output, no intermediate (the build streams these one layer at a time)."""

    def view(t):
        e, h, two_i = t.shape
        return t.reshape(e, h, 2, p, two_i // 2 // p).permute(3, 0, 4, 2, 1)  # [P, E, Ip, 2, H]

    return Relayout(view, lambda s: (p * s[0], s[2] // p, s[1]))


def fc2_relayout(p: int = 1) -> Relayout:
    """[E, I, H] -> [P*E, H, I/P]: part p of expert e's rows, transposed, times P (exact); as fc1_relayout."""

    def view(t):
        e, i, h = t.shape
        return t.reshape(e, p, i // p, h).permute(1, 0, 3, 2)  # [P, E, H, Ip]

    return Relayout(view, lambda s: (p * s[0], s[2], s[1] // p), scale=p)


def fc1_layout(gate_up, p: int = 1, dtype=None):
    """fc1_relayout(p) of a numpy array or a torch tensor (`dtype`: a torch dtype to convert to in the same copy,
    for a checkpoint's bf16), as the source type."""
    return fc1_relayout(p)(gate_up, dtype)


def fc2_layout(down, p: int = 1, dtype=None):
    """fc2_relayout(p) of a numpy array or a torch tensor, as fc1_layout."""
    return fc2_relayout(p)(down, dtype)


def relaid(source: ir.TensorProtocol, name: str, shape: tuple[int, ...], layout: Relayout) -> StreamedTensor:
    """`layout(source)` as a streamed tensor: nothing is read or computed until it is serialized. A checkpoint read
    (a StreamedTensor with `stored`) is re-laid and converted to fp32 in one copy; written to a file (the build's
    save), it is converted, checked and written a few experts at a time through one buffer (Relayout.chunks), so the
    whole stack is never in memory."""
    import torch  # deferred: `lint` loads the passes (through the targets) without torch

    stored = source.stored if isinstance(source, StreamedTensor) else None
    if stored is None:
        return StreamedTensor(
            lambda: ir.tensor(layout(source.numpy()), dtype=source.dtype, name=name), source.dtype, shape, name
        )

    def compute() -> ir.TensorProtocol:
        return stored.checked(layout(stored.read(), dtype=torch.float32), name)

    def write(file) -> None:
        raw = stored.read()
        threads = torch.get_num_threads()
        # one thread per piece: the writer and the hashers (llama4_deploy/build/weights_file.py) have the
        # other cores, and a two-way split of each copy would wait on whichever half shares a core with them
        torch.set_num_threads(1)

        def checked(piece):
            try:
                return stored.checked(piece, name)
            except Exception:  # a bad value: the whole stack's check names it, with its count over the stack
                stored.checked(layout(raw, dtype=torch.float32), name)
                raise

        try:
            for piece in layout.chunks(raw, torch.float32, finish=checked):
                file.write(memoryview(piece.numpy()).cast("B"))  # the piece itself, not a tobytes() copy
        finally:
            torch.set_num_threads(threads)

    return StreamedTensor(compute, source.dtype, shape, name, stored=stored, writer=write)


def _weight(
    tape: ir.tape.Tape, node: ir.Node, value: ir.Value, name: str, layout: Relayout, shape: tuple[int, ...]
) -> ir.Value:
    existing = node.graph.initializers.get(name) if node.graph is not None else None
    if existing is not None:  # another MoE node shares these weights and was lowered already
        return existing
    return tape.initializer(relaid(value.const_value, name, shape, layout), name=name)


def native_weights(tape: ir.tape.Tape, node: ir.Node, split: int | None = None) -> tuple[ir.Value, ir.Value, int]:
    """(fc1, fc2, P) of `node`'s experts: its re-laid-out weights (lazy initializers, shared with any graph
    lowered from the same weights and split, since their names and bytes are the same)."""
    gate_up, down = node.inputs[2:4]
    e, h, two_i = (int(d) for d in gate_up.const_value.shape)
    p = split or parts(two_i // 2, 3 * h * (two_i // 2) * gate_up.const_value.dtype.itemsize)
    fc1_name, fc2_name = weight_names(gate_up.name, down.name, p)
    fc1 = _weight(tape, node, gate_up, fc1_name, fc1_relayout(p), (p * e, two_i // p, h))
    fc2 = _weight(tape, node, down, fc2_name, fc2_relayout(p), (p * e, h, two_i // 2 // p))
    return fc1, fc2, p


def replacement(tape: ir.tape.Tape, node: ir.Node, prefix: str, split: int | None = None) -> list[ir.Value]:
    x = node.inputs[0]
    np_dtype = (x.dtype or node.inputs[2].const_value.dtype).numpy()
    fc1, fc2, p = native_weights(tape, node, split)

    op, const = scoped(tape, prefix)

    logits, top_value, top_index = route(op, const, node)  # top_k 1 (check)
    score = top_score(op, top_value)  # [N, 1]
    routed_in = op("Mul", [x, score], name="experts/ScaleInput")  # [N, H]
    lowest = op(
        "ConstantOfShape",
        [op("Shape", [logits], name="router/Shape")],
        {"value": ir.tensor(np.array([ml_dtypes.finfo(np_dtype).min], dtype=np_dtype))},
        name="router/Lowest",
    )
    zeros = op(
        "ConstantOfShape",
        [op("Shape", [top_index], name="router/IndexShape")],
        {"value": ir.tensor(np.array([0], dtype=np_dtype))},
        name="router/Zeros",
    )
    picks = op("ScatterElements", [lowest, top_index, zeros], {"axis": 1}, name="router/Picks")  # [N, E]
    if p > 1:
        picks = op(
            "Tile", [picks, const("router/parts", np.array([1, p], dtype=np.int64))], name="router/PerPart"
        )  # [N, P*E]: part q of expert e is column q*E + e

    routed = op(
        "MoE",
        [routed_in, picks, fc1, None, fc2],
        {
            "k": p,
            "activation_type": "swiglu",
            "swiglu_fusion": 1,
            "activation_alpha": 1.0,
            "activation_beta": 0.0,
            "normalize_routing_weights": 1,
            "use_sparse_mixer": 0,
        },
        name="experts/MoE",
        domain=MS_DOMAIN,
    )
    if x.dtype is not None:  # ONNX shape inference does not know the contrib op: annotate its output
        routed.dtype = x.dtype
    if x.shape is not None:
        routed.shape = ir.Shape(x.shape)
    return [op("Add", [shared_expert(tape, node, prefix), routed], name="Add")]


class LowerMoeNativePass(MoeLoweringPass):
    """Replace every MoE node by `com.microsoft.MoE`; raises LoweringError for one `check` refuses. `split`
    forces the number of parts per expert (a power of two dividing I); by default `parts` picks it.

    The original gate_up / down initializers of lowered nodes are dropped once nothing reads them
    (their re-laid-out copies replace them; the copies read them lazily, at serialization)."""

    strategy = STRATEGY
    opset_imports = {MS_DOMAIN: MS_VERSION}
    relays_weights = True

    def __init__(self, split: int | None = None):
        if split is not None and (split < 1 or split & (split - 1)):
            raise ValueError(f"split must be a power of two, got {split}")
        self.split = split

    def check(self, node: ir.Node) -> str | None:
        return check(node, split=self.split)

    def replacement(self, tape: ir.tape.Tape, node: ir.Node, prefix: str) -> list[ir.Value]:
        return replacement(tape, node, prefix, self.split)
