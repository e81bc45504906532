"""Hash a file while it is being written: the build's weights.data is hashed from the page cache by a
thread that follows the writer, instead of being read again once it is complete.

The record is `integrity.file_record`'s, byte for byte (the same whole-file SHA-256 and per-part SHA-256s, by the
same `RecordHasher`). The writer tells the follower how far the file is final (`advance`); the follower hashes up to
there on its own file descriptor, so hashing overlaps the read, convert and write of the next tensors.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from llama4_deploy.runtime.integrity import PART_BYTES, READ_BYTES, RecordHasher, file_record


class FollowingHasher:
    """Hashes `open_path()`'s file up to the offset last passed to `advance` in a thread; `finish(final)` hashes
    the rest once the writer is done and returns `file_record(final)`'s record.

    The file is opened on the first `advance` (the writer's file must exist by then) and kept open, so a rename into
    place afterwards is followed; if `final` turns out not to be that file, it is hashed again from disk."""

    def __init__(self, open_path, part_bytes: int = PART_BYTES):
        self._open_path = open_path  # () -> Path of the file being written (it may be renamed later)
        self._part_bytes = part_bytes
        self._hasher = RecordHasher(part_bytes)
        self._fd: int | None = None
        self._ready = 0  # bytes below this offset are final
        self._done = 0  # bytes hashed
        self._closed = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="follow-hash", daemon=True)

    def advance(self, offset: int) -> None:
        with self._cond:
            if self._fd is None and self._error is None:
                try:
                    self._fd = os.open(self._open_path(), os.O_RDONLY)
                    self._thread.start()
                except OSError as err:
                    self._error = err
            self._ready = max(self._ready, offset)
            self._cond.notify()

    def _run(self) -> None:
        buffer = bytearray(READ_BYTES)
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._ready > self._done or self._closed)
                    limit, closed = self._ready, self._closed
                while self._done < limit:  # one reused buffer: no 16 MiB allocation per block
                    view = memoryview(buffer)[:min(READ_BYTES, limit - self._done)]
                    count = os.preadv(self._fd, [view], self._done)
                    if not count:  # shorter than the writer said: finish hashes the file again
                        raise EOFError(f"the followed file ended at {self._done} bytes, before {limit}")
                    self._hasher.update(view[:count])
                    self._done += count
                if closed and self._done >= self._ready:
                    return
        except BaseException as err:  # reported by finish, which falls back to hashing the file again
            self._error = err

    def finish(self, final: Path) -> dict:
        """The record of `final`, the written file (closed by its writer)."""
        size = final.stat().st_size
        if self._fd is None:
            return file_record(final, self._part_bytes)
        try:
            if os.fstat(self._fd).st_ino != final.stat().st_ino:
                self._error = self._error or RuntimeError("the followed file is not the final one")
            self.advance(size)
            with self._cond:
                self._closed = True
                self._cond.notify()
            self._thread.join()
        finally:
            os.close(self._fd)
        if self._error is not None or self._done != size:
            return file_record(final, self._part_bytes)
        return self._hasher.record()
