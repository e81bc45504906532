"""Paths a user gives: a file where a file is expected and a directory where a directory is, and text files read
as UTF-8. Anything else is refused in one sentence that names what the path is instead (a directory, a FIFO, ...),
never "does not exist" for something that does, and never by blocking on a FIFO that nothing writes to."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

# what a path that is not a regular file or a directory is, by its stat mode
_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)
_ESCAPED = re.compile("[\udc80-\udcff]")  # the bytes surrogateescape could not decode, one character each


class PathError(ValueError):
    """A path that is not what the command expects there; the message is one sentence."""


def kind(path: Path) -> str:
    """What the path is, as the object of "is ...": "a directory", "a file", "a FIFO (named pipe)", "missing"."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if os.path.islink(path) else "missing"
    except NotADirectoryError:
        return "missing"  # a parent is a file
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISDIR(mode):
        return "a directory"
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _given(path: str | os.PathLike, what: str) -> Path:
    if isinstance(path, str) and not path.strip():
        raise PathError(f"{what} is an empty path; give a path or leave the option out")
    return Path(path)


def regular_file(path: str | os.PathLike, what: str) -> Path:
    """`path` when it is a regular file (or a link to one); PathError naming what it is otherwise."""
    path = _given(path, what)
    found = kind(path)
    if found == "a file":
        return path
    if found == "missing":
        raise PathError(f"{what} {path} does not exist")
    raise PathError(f"{what} {path} is {found}, not a file")


def directory(path: str | os.PathLike, what: str) -> Path:
    """`path` when it is a directory (or a link to one); PathError naming what it is otherwise."""
    path = _given(path, what)
    found = kind(path)
    if found == "a directory":
        return path
    if found == "missing":
        raise PathError(f"{what} {path} does not exist")
    raise PathError(f"{what} {path} is {found}, not a directory")


def utf8(data: bytes, where: str, replace: bool = False, hint: str = "") -> tuple[str, int]:
    """(text, bytes replaced) of `data` decoded as UTF-8. Strict by default: an undecodable byte is refused, naming
    its offset (and `hint`, what to do about it); with `replace`, each undecodable byte becomes U+FFFD and is
    counted, so a caller can say how much of the text it made up."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError as err:
        if not replace:
            bad = data[err.start : err.start + 1].hex()
            raise PathError(
                f"{where} is not valid UTF-8 text (byte 0x{bad} at offset {err.start}){'; ' + hint if hint else ''}"
            ) from None
    escaped = data.decode("utf-8", "surrogateescape")
    return _ESCAPED.sub("\ufffd", escaped), len(_ESCAPED.findall(escaped))


def read_utf8(path: str | os.PathLike, what: str, replace: bool = False, hint: str = "") -> tuple[str, int]:
    """A regular file's text (`utf8`), the file checked first (`regular_file`)."""
    path = regular_file(path, what)
    return utf8(path.read_bytes(), f"{what} {path}", replace, hint)
