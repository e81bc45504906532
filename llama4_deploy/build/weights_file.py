"""Write a bundle's weights.data: tensors streamed in order into one file, hashed from memory as they are written.

Why not onnx-ir's writer: its writes are buffered, and a build writes far more than the kernel lets sit dirty in
the page cache (20% of memory), so past the first few GB it writes at the page cache's writeback rate (docs/scale.md
has the figures). `WeightsFile` writes with O_DIRECT where the file system takes it, through page-aligned
bounce buffers (the tail is padded to the block and the file truncated to its size), and with ordinary writes
where it does not (tmpfs refuses O_DIRECT at open, another file system may at the first write).

Each full bounce buffer goes to three single-thread workers at once: one writes it, one feeds the whole file's
SHA-256 and one the 256 MiB parts' (runtime/integrity.RecordHasher's two halves: its record, byte for byte, which
the runtime checks at load), so the file is never read back to be hashed, and the two SHA-256 chains run on
different cores. A buffer is refilled only once all three are done with it.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx_ir as ir

from llama4_deploy.graphs.streamed import StreamedTensor
from llama4_deploy.runtime.integrity import PART_BYTES, RecordHasher

BUFFER_BYTES = 16 << 20  # one bounce buffer: a multiple of any block size O_DIRECT asks for
BUFFERS = 4  # in flight: one filling, up to three being written and hashed
BLOCK = 4096  # O_DIRECT alignment of offsets and lengths (512 on most disks; 4096 covers both)


class WeightsFile:
    """A write-only file of `path` (created; it must not exist) with `write(bytes-like)` and `tell()`, enough for
    the tensors' `tofile` (onnx-ir's TensorProtocol). `finish()` completes it and returns its integrity record;
    leaving the `with` block without `finish()`, or on an error, removes the file.

    `direct=False` writes through the page cache (a test's choice; O_DIRECT also falls back to it by itself)."""

    def __init__(self, path: Path, part_bytes: int = PART_BYTES, direct: bool = True, buffer_bytes: int = BUFFER_BYTES):
        if buffer_bytes % BLOCK:
            raise ValueError(f"buffer_bytes must be a multiple of {BLOCK}, got {buffer_bytes}")
        self.path = Path(path)
        self._buffer_bytes = buffer_bytes
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        self._fd = None
        self.direct = bool(direct and getattr(os, "O_DIRECT", 0))
        if self.direct:
            try:
                self._fd = os.open(self.path, flags | os.O_DIRECT, 0o644)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                self.direct = False
        if self._fd is None:
            self._fd = os.open(self.path, flags, 0o644)
        self._hasher = RecordHasher(part_bytes)
        self._buffers = [mmap.mmap(-1, buffer_bytes) for _ in range(BUFFERS)]  # anonymous maps: page-aligned
        self._free = deque(range(BUFFERS))
        self._busy: deque[tuple[int, list[Future]]] = deque()
        self._workers = [
            ThreadPoolExecutor(1, thread_name_prefix=f"weights-{role}") for role in ("write", "sha256", "parts")
        ]
        self._current, self._filled, self._flushed, self.size = self._free.popleft(), 0, 0, 0
        self._finished = False

    def __enter__(self) -> WeightsFile:
        return self

    def __exit__(self, *exc) -> None:
        if not self._finished:
            self._close()
            self.path.unlink(missing_ok=True)

    def tell(self) -> int:
        return self.size

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        written = len(view)
        while view:
            take = min(self._buffer_bytes - self._filled, len(view))
            self._buffers[self._current][self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == self._buffer_bytes:
                self._flush()
        self.size += written
        return written

    def finish(self) -> dict:
        """Write what is left, wait for the workers, truncate the padded tail; {size, sha256[, parts]}."""
        if self._filled:
            self._flush()
        self._release(everything=True)
        os.ftruncate(self._fd, self.size)  # the padded tail of an O_DIRECT write
        self._close()
        self._finished = True
        return self._hasher.record()

    def _flush(self) -> None:
        index, length, offset = self._current, self._filled, self._flushed
        data = memoryview(self._buffers[index])[:length]
        write, whole, parts = self._workers
        self._busy.append(
            (
                index,
                [
                    write.submit(self._pwrite, index, length, offset),
                    whole.submit(self._hasher.update_whole, data),
                    parts.submit(self._hasher.update_parts, data),
                ],
            )
        )
        self._flushed += length
        self._release()
        self._current, self._filled = self._free.popleft(), 0

    def _release(self, everything: bool = False) -> None:
        """Wait for the oldest busy buffers (raising a worker's error) until one is free, or all of them."""
        while self._busy and (everything or not self._free):
            index, futures = self._busy.popleft()
            for future in futures:
                future.result()
            self._free.append(index)

    def _pwrite(self, index: int, length: int, offset: int) -> None:
        # O_DIRECT writes whole blocks: the last buffer's tail is padded (finish truncates it off)
        padded = -(-length // BLOCK) * BLOCK if self.direct else length
        view = memoryview(self._buffers[index])[:padded]
        while view:
            try:
                done = os.pwrite(self._fd, view, offset)
            except OSError as err:
                if not (self.direct and err.errno == errno.EINVAL):
                    raise
                # the file system took O_DIRECT at open but not this write: write through the page cache
                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False
                view = view[: max(0, length - (padded - len(view)))]
                continue
            view, offset = view[done:], offset + done

    def _close(self) -> None:
        for worker in self._workers:
            worker.shutdown(wait=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def write_tensor(tensor, out: WeightsFile) -> None:
    """Stream one tensor (onnx-ir's TensorProtocol) into `out`. A streamed tensor that writes in pieces (a re-laid
    expert stack, graphs/lower_moe_native.relaid) writes itself; any other is evaluated and, when its numpy array
    holds exactly the bytes the file needs (a byte-sized little-endian dtype), written from that array rather than
    through `tobytes()`, a copy the size of the tensor."""
    if isinstance(tensor, StreamedTensor) and tensor.writes_in_pieces:
        tensor.tofile(out)
        return
    if isinstance(tensor, ir.LazyTensor):
        tensor = tensor.raw()  # the function that computes it: evaluated here, once
    if type(tensor).tofile is not ir.Tensor.tofile:
        tensor.tofile(out)
        return
    array = tensor.raw
    if (
        isinstance(array, np.ndarray)
        and tensor.dtype.bitwidth % 8 == 0
        and array.dtype == tensor.dtype.numpy()
        and array.dtype.byteorder in "=<|"
    ):
        out.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
    else:
        out.write(tensor.tobytes())
