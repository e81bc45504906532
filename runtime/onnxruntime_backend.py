"""ONNX Runtime backend: a runner with one public surface, used as a context manager.

    with OnnxRuntimeRunner(path, threads) as runner:
        outputs = runner.infer(feeds)

`infer` checks feeds against the engine's declared inputs (names, dtypes, ranks, fixed dims)
before calling ONNX Runtime. onnxruntime is imported lazily.
"""

from __future__ import annotations

import threading
import weakref
from pathlib import Path

import numpy as np

# inputs and outputs of at most this many bytes (ids, positions, lengths, a decode step's logits) live in arrays of
# the runner's that stay bound; larger ones are bound where they are
SMALL_BYTES = 1 << 16
# feed signatures remembered (checked, output shapes learnt): a server sees a new one for each prefill width, bucket
# and row count, so the memo is emptied when it reaches this many rather than growing for the process's life
SIGNATURES_KEPT = 4096
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


class OnnxRuntimeRunner:
    def __init__(
        self,
        model_path: str | Path,
        threads: int | None = None,
        providers: list[str] | None = None,
        spin: bool = True,
        prepack: bool = True,
        serialized: bytes | None = None,
    ):
        self.model_path = Path(model_path)
        # a changed copy of the graph at model_path, held in memory (verify's layer probes): its external data is
        # still read from model_path's folder
        self.serialized = serialized
        self.threads = threads
        self.spin = spin  # intra-op threads spin-wait for the next run (ONNX Runtime's default)
        # ONNX Runtime memory-maps external initializers (file-backed pages, shared with the page cache), but
        # prepacking copies every MatMul weight into anonymous memory in the kernel's layout: faster steps,
        # O(model) heap. prepack=False keeps the weights mapped (the build's golden step, verify)
        self.prepack = prepack
        self.providers = providers or ["CPUExecutionProvider"]
        self.session = None
        self.inputs: dict[str, tuple[type, list]] = {}
        self.output_names: list[str] = []
        self._validated: set[tuple] = set()  # feed signatures already checked
        self._binding = None  # infer_in_place's I/O binding, kept from call to call
        self._lock = threading.Lock()  # one binding: one in-place call at a time
        self._held = None  # (layout ref, rows, buffers' signature) of the cache buffers bound now (`holds`)
        self._staged: dict[tuple[str, str], np.ndarray] = {}  # ("in" | "out", name) -> the runner's own small array
        self._bound: dict[tuple[str, str], tuple | None] = {}  # ("in" | "out", name) -> (array ref, where)
        self._output_shapes: dict[
            tuple, dict[str, tuple]
        ] = {}  # in-place call signature -> other outputs' (shape, dtype, staged)

    def activate(self) -> OnnxRuntimeRunner:
        import onnxruntime as ort  # deferred: importing the runtime (the CLI, the build) need not load ONNX Runtime

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
        # ONNX Runtime fuses a Q/DQ graph's blocked int4 DequantizeLinear -> MatMul into MatMulNBits with
        # int8 activations (level 4) by default; level 1 keeps float activations, the spec's numbers
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        if not self.spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not self.prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
            # and no CPU arena: the arena keeps every intermediate it ever allocated (a Q/DQ graph's dequantized
            # expert stacks, layer after layer) for the session's life; without it each is freed after its node
            options.enable_cpu_mem_arena = False
        if self.serialized is not None:
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(self.model_path.parent)
            )
        model = self.serialized if self.serialized is not None else str(self.model_path)
        self.session = ort.InferenceSession(model, options, providers=self.providers)
        self.inputs = {i.name: (_ORT_TYPES.get(i.type), list(i.shape)) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        return self

    def deactivate(self) -> None:
        self.session = None
        self._binding, self._bound, self._held, self._staged = None, {}, None, {}

    def __enter__(self) -> OnnxRuntimeRunner:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def validate(self, feeds: dict[str, np.ndarray], complete: bool = True) -> None:
        """Names, dtypes, ranks and fixed dims of `feeds` against the engine's inputs; `complete`: every input fed
        (infer_in_place's feeds leave out the cache buffers it holds bound)."""
        missing = set(self.inputs) - set(feeds) if complete else set()
        extra = set(feeds) - set(self.inputs)
        if missing or extra:
            raise ValueError(
                f"feeds do not match the engine's inputs (missing {sorted(missing)}, unknown {sorted(extra)})"
            )
        for name, array in feeds.items():
            dtype, dims = self.inputs[name]
            if array.dtype != dtype:
                raise ValueError(f"input {name} is {array.dtype}, the engine declares {np.dtype(dtype)}")
            if array.ndim != len(dims):
                raise ValueError(f"input {name} has rank {array.ndim}, the engine declares {len(dims)}")
            for axis, (got, want) in enumerate(zip(array.shape, dims)):
                if isinstance(want, int) and got != want:
                    raise ValueError(f"input {name} has {got} on axis {axis}, the engine declares {want}")

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_active()
        # a float16 engine takes float32 feeds (caches the runtime keeps in float32): narrowed here
        feeds = {
            name: array.astype(np.float16)
            if array.dtype == np.float32 and self.inputs.get(name, (None,))[0] is np.float16
            else array
            for name, array in feeds.items()
        }
        signature = tuple((name, array.dtype, array.shape) for name, array in feeds.items())
        if signature not in self._validated:  # a decode loop repeats one signature: check it once
            self._remember()
            self.validate(feeds)
            self._validated.add(signature)
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))

    def holds(self, key) -> bool:
        """Whether the buffers of `key` (KVCache.binding_key: its buffers' layout object and the rows stepped) are
        the ones bound now: a call with that key may then leave them out of its feeds."""
        held = self._held
        return key is not None and held is not None and held[0]() is key[0] and held[1] == key[1]

    def infer_in_place(
        self, feeds: dict[str, np.ndarray], shared: dict[str, str], key=None, buffers=None
    ) -> dict[str, np.ndarray]:
        """Run with I/O binding: each output named in `shared` (output -> input) is bound to its input's buffer, so
        the graph writes it in place (the gqa attention form's cache, graphs/lower_attention_gqa.py); returns the
        other outputs. The feeds must already have the engine's dtypes: a buffer written in place is not narrowed.

        One binding serves every call: a decode loop feeds the same cache buffers step after step, and wrapping
        each of them in an OrtValue and reading every output back through one costs a sizeable share of a small
        model's step. Arrays are bound by address, shape and dtype (ONNX Runtime's raw-buffer binding, which keeps
        no reference): a name is rebound only when its array changed, and an array bound earlier and since freed is
        never read, as every input is compared with the array fed now. The other outputs go, from the second call
        of a feed signature on, into arrays allocated here with the shapes the first call returned (the graphs'
        shapes follow from their input shapes alone: graphs/lint.py).

        `key` (KVCache.binding_key) names the cache buffers and `buffers()` returns them ({name: array}); the
        feeds then hold only the small inputs, and `buffers()` is called only when this runner does not hold that
        key's buffers bound already (`holds`). A step then touches only its few small inputs, not every layer's
        buffers: after a step has streamed the weights through the caches, each Python object touched is a cache
        miss. The key holds its layout object weakly and the cache replaces that object whenever it reallocates a
        buffer, so a key never vouches for buffers that are gone. Calls are serialized (one binding per runner)."""
        self._check_active()
        with self._lock:
            if buffers is not None and not self.holds(key):
                feeds = {**feeds, **buffers()}
            return self._bound_run(feeds, shared, key)

    def _bound_run(self, feeds: dict[str, np.ndarray], shared: dict[str, str], key) -> dict[str, np.ndarray]:
        if self._binding is None:
            self._binding, self._bound, self._held = self.session.io_binding(), {}, None
        cache_names = set(shared.values())
        held = self.holds(key) and cache_names.isdisjoint(feeds)
        small = tuple((name, array.dtype, array.shape) for name, array in feeds.items() if name not in cache_names)
        if held:
            layout = self._held[2]
        else:
            layout = tuple((name, array.dtype, array.shape) for name, array in feeds.items() if name in cache_names)
        signature = (small, layout, tuple(shared.items()))
        if signature not in self._validated:
            self._remember()
            self.validate(feeds, complete=not held)
            self._validated.add(signature)
        binding = self._binding
        arrays = {}
        for name, array in feeds.items():
            if name not in cache_names and array.nbytes <= SMALL_BYTES:
                # a step's small input (ids, positions, lengths) is copied into an array of the runner's that stays
                # bound: a copy of a few bytes costs less than binding a new array
                array = self._staged_copy(("in", name), array)
            else:
                # a C-contiguous host array is used where it is, not copied: the kernel's writes land in its buffer
                array = np.ascontiguousarray(array)
            arrays[name] = array
            self._bind(binding.bind_input, ("in", name), array)
        if not held:
            self._held = (weakref.ref(key[0]), key[1], layout) if key is not None else None
        shapes = self._output_shapes.get(signature)
        fresh = {}
        for name in self.output_names:
            if name in shared:
                if not held:
                    self._bind(binding.bind_output, ("out", name), arrays[shared[name]])
            elif shapes is not None:
                shape, dtype, staged = shapes[name]
                # a decode step's logits go into an array of the runner's (copied out below), larger ones anew
                fresh[name] = self._staged_array(("out", name), shape, dtype) if staged else np.empty(shape, dtype)
                self._bind(binding.bind_output, ("out", name), fresh[name])
            else:  # ONNX Runtime allocates it (bound anew: the binding keeps a run's output for the next one)
                binding.bind_output(name, "cpu")
                self._bound[("out", name)] = None
        self.session.run_with_iobinding(binding)
        if shapes is not None:  # the runner's own output arrays are overwritten by the next call: copies out
            return {name: array.copy() if shapes[name][2] else array for name, array in fresh.items()}
        outputs = {
            name: value.numpy() for name, value in zip(self.output_names, binding.get_outputs()) if name not in shared
        }
        self._output_shapes[signature] = {
            name: (array.shape, array.dtype, array.nbytes <= SMALL_BYTES) for name, array in outputs.items()
        }
        return outputs

    def _remember(self) -> None:
        """Room for one more signature: the memos are emptied once they hold SIGNATURES_KEPT."""
        if len(self._validated) >= SIGNATURES_KEPT or len(self._output_shapes) >= SIGNATURES_KEPT:
            self._validated.clear()
            self._output_shapes.clear()

    def _staged_array(self, key: tuple[str, str], shape: tuple, dtype) -> np.ndarray:
        """The runner's own array for `key` with this shape and dtype (made anew when they change)."""
        staged = self._staged.get(key)
        if staged is None or staged.shape != tuple(shape) or staged.dtype != dtype:
            staged = self._staged[key] = np.empty(shape, dtype)
        return staged

    def _staged_copy(self, key: tuple[str, str], array: np.ndarray) -> np.ndarray:
        staged = self._staged_array(key, array.shape, array.dtype)
        np.copyto(staged, array)
        return staged

    def _bind(self, bind, key: tuple[str, str], array: np.ndarray) -> None:
        """Bind `array` by its address, unless that name is bound to it already: the very array (a weak reference:
        nothing is kept alive) or one at the same address with the same shape and dtype."""
        seen = self._bound.get(key)
        if seen is not None and seen[0]() is array:
            return
        where = (array.__array_interface__["data"][0], array.shape, array.dtype)
        if seen is None or seen[1] != where:
            bind(key[1], "cpu", 0, array.dtype.type, list(array.shape), where[0])
        self._bound[key] = (weakref.ref(array), where)

    def _check_active(self) -> None:
        if self.session is None:
            raise RuntimeError("runner is not active; use it as a context manager or call activate()")
