"""The build's one lazy-tensor type: a weight computed when the saver writes it into weights.data.

    checkpoint tensor ─read─► as stored (a torch view, its own dtype, graph layout)
                      ─convert─► fp32, NaN/Inf checked             llama4_deploy/build/steps/lower.py
                      ─transform─► re-laid                          graphs/lower_moe_native.py
                                   narrowed to the compute dtype    graphs/compute_dtype.py
                                   quantized, sliced per expert     graphs/lower_quant_qdq.py, lower_quant_ort.py

Every weight of a linked graph is a StreamedTensor whose function reads its source only when evaluated, so nothing
is read or computed before the save streams the tensors into the file one at a time (build memory is O(layer)). A
tensor read from a checkpoint keeps `stored` (the tensor as stored and the conversion's check), so a transform that
copies the whole tensor anyway (a re-layout) asks for it, by type, and converts in that same copy; a transform that
can write its result in pieces gives a `writer`, and the save (llama4_deploy/build/weights_file.py) lets it write
itself without ever holding the whole result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import onnx_ir as ir


class Stored(NamedTuple):
    """A checkpoint tensor before conversion: `read()` gives it as stored (a torch tensor in the checkpoint's dtype,
    in graph layout); `checked(fp32 torch tensor, name)` is the conversion's check, giving an ir tensor."""

    read: Callable[[], Any]
    checked: Callable[[Any, str], ir.TensorProtocol]


class StreamedTensor(ir.LazyTensor):
    """`compute()` when the tensor is read (onnx-ir's LazyTensor, not cached). `stored`: set on a checkpoint read
    that a transform may convert itself; `writer(file)`: writes the tensor's bytes in pieces."""

    def __init__(
        self,
        compute: Callable[[], ir.TensorProtocol],
        dtype: ir.DataType,
        shape: Sequence[int] | ir.Shape,
        name: str,
        stored: Stored | None = None,
        writer: Callable[[Any], None] | None = None,
    ):
        super().__init__(
            compute, dtype=dtype, shape=shape if isinstance(shape, ir.Shape) else ir.Shape(shape), name=name
        )
        self.stored, self._writer = stored, writer

    @property
    def writes_in_pieces(self) -> bool:
        return self._writer is not None and not self.cache

    def tofile(self, file) -> None:
        if self.writes_in_pieces:
            self._writer(file)
        else:
            super().tofile(file)
