"""llama4_deploy/build/weights_file.py: the bytes written are the bytes given, in order, and the record hashed from the
bounce buffers is integrity.file_record's of the finished file, byte for byte; with O_DIRECT, through the page
cache, on a file system that refuses O_DIRECT at open or at a write; an error leaves no file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from llama4_deploy.build import weights_file
from llama4_deploy.build.weights_file import WeightsFile, write_tensor
from llama4_deploy.runtime.integrity import file_record

PART = 1 << 20  # small parts, so a few MiB hold several (the build's are 256 MiB)
BUFFER = 64 << 10  # small bounce buffers, so a few MiB take many flushes and every buffer is reused


def _pieces(seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    sizes = [1, 4095, 70_001, BUFFER, 3 * PART + 17, 0, 123_457]  # ragged: pieces cross buffers and parts
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]


def _write(path: Path, pieces: list[bytes], **kwargs) -> tuple[dict, bool]:
    with WeightsFile(path, PART, buffer_bytes=BUFFER, **kwargs) as out:
        offsets = []
        for piece in pieces:
            offsets.append(out.tell())
            assert out.write(memoryview(piece)) == len(piece)
        record, direct = out.finish(), out.direct
    assert offsets == list(np.cumsum([0] + [len(p) for p in pieces[:-1]]))
    return record, direct


@pytest.mark.parametrize("direct", [True, False])
def test_bytes_and_record(tmp_path, direct):
    pieces = _pieces()
    record, used = _write(tmp_path / "weights.data", pieces, direct=direct)
    assert (tmp_path / "weights.data").read_bytes() == b"".join(pieces)  # the padded O_DIRECT tail truncated off
    assert record == file_record(tmp_path / "weights.data", PART)
    assert len(record["parts"]["sha256"]) == 4
    assert used == (direct and hasattr(os, "O_DIRECT"))  # this machine's ext4 takes O_DIRECT


def test_a_file_system_refusing_o_direct_at_open_is_written_through_the_page_cache(tmp_path, monkeypatch):
    real = os.open

    def refusing(path, flags, mode=0o777):  # as tmpfs did before Linux 6.6
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, mode)

    monkeypatch.setattr(weights_file.os, "open", refusing)
    path = tmp_path / "weights.data"
    pieces = _pieces(1)
    record, direct = _write(path, pieces)
    assert not direct
    assert path.read_bytes() == b"".join(pieces) and record == file_record(path, PART)


def test_a_write_refused_under_o_direct_falls_back(tmp_path, monkeypatch):
    real, calls = os.pwrite, []

    def refusing(fd, data, offset):
        calls.append(offset)
        if len(calls) == 3:  # the third write: a file system that took O_DIRECT at open but not here
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(weights_file.os, "pwrite", refusing)
    pieces = _pieces(2)
    record, direct = _write(tmp_path / "weights.data", pieces)
    assert not direct and len(calls) > 3
    assert (tmp_path / "weights.data").read_bytes() == b"".join(pieces)
    assert record == file_record(tmp_path / "weights.data", PART)


def test_an_error_leaves_no_file_and_an_existing_file_is_kept(tmp_path):
    path = tmp_path / "weights.data"
    with pytest.raises(RuntimeError, match="stop"):
        with WeightsFile(path, PART, buffer_bytes=BUFFER) as out:
            out.write(b"x" * (3 * BUFFER))
            raise RuntimeError("stop")
    assert not path.exists()
    path.write_bytes(b"kept")
    with pytest.raises(FileExistsError):
        WeightsFile(path, PART)
    assert path.read_bytes() == b"kept"


def test_write_tensor_writes_tobytes(tmp_path):
    """Each kind of tensor the build streams writes exactly its `tobytes()`: numpy-backed (the fast path), packed
    INT4 and bfloat16 (ml_dtypes), and a lazy one."""
    import ml_dtypes

    rng = np.random.default_rng(3)
    tensors = [
        ir.tensor(rng.standard_normal((33, 7)).astype(np.float32), name="f32"),
        ir.tensor(rng.standard_normal((5, 9)).astype(ml_dtypes.bfloat16), name="bf16"),
        ir.tensor(rng.integers(-8, 8, (3, 5)).astype(ml_dtypes.int4), dtype=ir.DataType.INT4, name="int4"),
        ir.LazyTensor(
            lambda: ir.tensor(np.arange(10, dtype=np.int64), name="lazy"),
            dtype=ir.DataType.INT64,
            shape=ir.Shape([10]),
            name="lazy",
        ),
    ]
    with WeightsFile(tmp_path / "w", PART, buffer_bytes=BUFFER) as out:
        for tensor in tensors:
            write_tensor(tensor, out)
        out.finish()
    assert (tmp_path / "w").read_bytes() == b"".join(t.tobytes() for t in tensors)
