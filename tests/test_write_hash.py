"""Hashing weights.data while it is written (llama4_deploy/write_hash.py) gives integrity.file_record's record,
byte for byte: the whole-file SHA-256 and every part's, which the runtime checks at load."""

import os

from llama4_deploy.runtime.integrity import file_record
from llama4_deploy.write_hash import FollowingHasher

PART = 1 << 20  # small parts, so a 3.5 MiB file has several (the build's are 256 MiB)


def test_following_hasher_matches_file_record(tmp_path):
    path = tmp_path / "weights.data"
    data = os.urandom(3 * PART + PART // 2)
    hasher = FollowingHasher(lambda: path, PART)
    offsets = [0]
    with open(path, "wb") as stream:  # written like onnx-ir's writer: buffered, tensor by tensor, with a hole
        for start in range(0, len(data), 700_001):
            hasher.advance(offsets[-1])  # everything before the previous tensor is final
            offsets.append(stream.tell())
            stream.write(data[start:start + 700_001])
        stream.seek(4096, os.SEEK_CUR)
        stream.write(b"tail")
    record = hasher.finish(path)
    assert record == file_record(path, PART)
    assert len(record["parts"]["sha256"]) == 4 and record["size"] == len(data) + 4096 + 4


def test_following_hasher_falls_back_when_the_file_is_not_the_followed_one(tmp_path):
    followed, final = tmp_path / "a", tmp_path / "b"
    followed.write_bytes(b"x" * 100)
    final.write_bytes(b"y" * 5000)
    hasher = FollowingHasher(lambda: followed, PART)
    hasher.advance(50)
    assert hasher.finish(final) == file_record(final, PART)
