"""Where a build writes: the `--out` policy, the lock, the staging directory and stale staging.

- `check_out`: `--out` may replace only a bundle this tool wrote (its manifest says
  `written_by: llama4-deploy`, or is a format-1 manifest with a build record, and the directory
  holds nothing the manifest does not list) or an empty directory; anything else needs `force`.
  A file at `--out` is refused, `force` or not, and so is an `--out` that
  holds the checkpoint being read. All before any work.
- `Staging`: a build holds an exclusive lock, `.NAME.lock` beside `--out` (flock: the kernel
  drops it when the process dies, SIGKILL included), for its whole run; a second build to the
  same `--out` is refused. Under the lock it removes the staging dirs of the same `--out` whose
  owner process is gone, then writes into `.NAME.partial-<pid>-<start token>-<random>` and
  renames that into place. The owner is in the name, so it is recorded
  the moment the directory exists; the start token (the process's start time) tells a live
  owner from a later process that reused its pid.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from llama4_deploy.runtime.bundle import MANIFEST, written_by_this_tool


class OutDirError(ValueError):
    """An --out that this build must not touch; the message is one sentence."""


def check_out(out: Path, force: bool, checkpoint: Path | None = None) -> None:
    """Refuse an --out this build may not replace, before any work is done."""
    if checkpoint is not None:
        source = checkpoint.resolve()
        if source == out or out in source.parents:
            raise OutDirError(f"--out {out} holds the checkpoint {source}; choose another --out")
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise OutDirError(f"--out {out} is a file, not a directory; choose another --out")
    blocking = next((parent for parent in out.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise OutDirError(f"--out {out} cannot be created: {blocking} is a file")
    if not out.is_dir() or force:
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    files = written_by_this_tool(out)
    if files is None:
        raise OutDirError(
            f"--out {out} exists and is not a bundle written by llama4-deploy; pass --force to "
            f"replace it, or choose another --out"
        )
    listed = set(files) | {MANIFEST}
    foreign = [name for name in entries if name not in listed]
    if foreign:
        raise OutDirError(
            f"--out {out} is a bundle but also holds {foreign[0]}, which the build did not write; "
            f"pass --force to replace it all, or move that file"
        )


def _start_token(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), '0' where there is no /proc; None: gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "0"
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _owner_alive(pid: int, token: str) -> bool:
    now = _start_token(pid)
    return now is not None and (token == "0" or now == token)


class Staging:
    """The lock and staging directory of one build to `out`; a context manager.

    `dir` is where the bundle is written; `commit()` renames it into place (replacing an old bundle only after
    the new one is complete).
    Leaving the context without commit removes the staging dir; the lock goes either way.
    """

    def __init__(self, out: Path):
        self.out = out
        self.lock_path = out.parent / f".{out.name}.lock"
        self.prefix = f".{out.name}.partial-"
        self.dir: Path | None = None
        self._lock_fd: int | None = None
        self.removed_stale: list[str] = []

    def __enter__(self) -> Staging:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self._remove_stale()
            pid = os.getpid()
            self.dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}{pid}-{_start_token(pid)}-", dir=self.out.parent))
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.dir is not None and self.dir.exists():
                shutil.rmtree(self.dir, ignore_errors=True)
        finally:
            self._unlock()

    def commit(self) -> None:
        """Move the finished bundle to `out`: the old one (if any) is moved aside first and removed after."""
        old = None
        if self.out.exists():
            old = self.dir.with_name(self.dir.name + "-replaced")
            self.out.rename(old)
        self.dir.rename(self.out)
        self.dir = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    # -- lock -------------------------------------------------------------------------------------
    def _lock(self) -> None:
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutDirError(
                        f"another build is writing {self.out} (it holds {self.lock_path.name}); "
                        f"wait for it or choose another --out"
                    ) from None
                raise
            try:  # the holder before us may have removed the file after we opened it: lock the live one
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._lock_fd = fd
                return
            os.close(fd)

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        try:
            self.lock_path.unlink(missing_ok=True)  # while still holding it, so no one locks a removed file
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- stale staging ----------------------------------------------------------------------------
    def _remove_stale(self) -> None:
        """Remove staging dirs of this --out whose owner process is gone (a killed build's)."""
        for path in self.out.parent.glob(f"{self.prefix}*"):
            owner = path.name[len(self.prefix) :].split("-")
            if len(owner) < 3 or not owner[0].isdigit() or not path.is_dir():
                continue  # not named by this tool: leave it alone
            if not _owner_alive(int(owner[0]), owner[1]):
                shutil.rmtree(path, ignore_errors=True)
                self.removed_stale.append(path.name)
