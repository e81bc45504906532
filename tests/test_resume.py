"""Resumable builds (llama4_deploy/build/cache.py): a build interrupted by Ctrl-C (SIGINT) or killed
(SIGKILL) after some steps finished leaves no bundle at --out; the rerun reuses those steps (it logs
"[resume] reusing ...") and writes a bundle whose files equal an uninterrupted build's, byte for
byte (SHA-256 of every file, golden.npz included), and removes the build cache.

A small recipe (tiny, 2 stages) built in a subprocess, interrupted as soon as its log says a given
step was stored; the rerun runs in this process.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ARGS = ["--recipe", "tiny", "--stages", "2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    from llama4_deploy.build import build

    bundle = build("tiny", stages=2, out=tmp_path_factory.mktemp("resume") / "whole", log=lambda _: None).bundle
    assert not (bundle.parent / ".whole.build").exists()  # removed after a successful build
    return json.loads((bundle / "manifest.json").read_text())


def _interrupt(out: Path, after: str, sig: int) -> list[str]:
    """Run the build in a subprocess and send `sig` once it logs that step `after` was stored."""
    # the child holds still for a minute right after it stores `after`, so the signal lands between steps
    # whatever the machine's speed (a fast build otherwise finishes before the parent reads the line)
    # SIGINT gets Python's own handler back: a shell starts background jobs with SIGINT ignored, children inherit
    # that, and a Ctrl-C would then never reach the build (as when `make test &` runs this test)
    hold = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from llama4_deploy.build import cache as build_cache\n"
        "log = build_cache.BuildCache.__init__\n"
        "def init(self, out, log_fn):\n"
        "    def logged(message):\n"
        "        log_fn(message)\n"
        f"        if message.startswith('[cache] stored {after} '):\n"
        "            time.sleep(60)\n"
        "    log(self, out, logged)\n"
        "build_cache.BuildCache.__init__ = init\n"
        "from llama4_deploy.cli import main\n"
        "sys.argv = ['llama4-deploy'] + sys.argv[1:]\n"
        "main()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", hold, "build", *ARGS, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines = []
    deadline = time.time() + 120
    try:
        for line in process.stderr:
            lines.append(line.rstrip("\n"))
            if line.startswith(f"[cache] stored {after} "):
                process.send_signal(sig)
                break
            assert time.time() < deadline, "the build took too long to reach the step"
        lines += [line.rstrip("\n") for line in process.stderr]
    finally:
        if process.poll() is None and sig != signal.SIGINT:
            process.kill()
        process.wait(timeout=60)
    assert any(line.startswith(f"[cache] stored {after} ") for line in lines), lines
    return lines


def _rerun(out: Path) -> list[str]:
    from llama4_deploy.build import build

    logged: list[str] = []
    build("tiny", stages=2, out=out, log=logged.append)
    return logged


def _same_bundle(out: Path, want: dict) -> None:
    got = json.loads((out / "manifest.json").read_text())
    assert got["files"] == want["files"]  # every file's size and SHA-256
    got["build"].pop("seconds")
    assert got == {**want, "build": {k: v for k, v in want["build"].items() if k != "seconds"}}
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no cache, staging or lock left


def test_ctrl_c_then_rerun_resumes(uninterrupted, tmp_path):
    out = tmp_path / "b"
    lines = _interrupt(out, "stage0", signal.SIGINT)
    assert lines[-1] == "interrupted: no bundle was written; rerun the same command to resume", lines[-3:]
    assert not out.exists()
    cache = tmp_path / ".b.build"
    assert sorted(p.name.split("-")[0] for p in cache.iterdir() if p.is_dir()) == [
        "checkpoint",
        "plan",
        "stage0",
        "trace",
    ]
    logged = _rerun(out)
    reused = [line.split()[2] for line in logged if line.startswith("[resume] reusing ")]
    assert reused == ["checkpoint", "trace", "plan", "stage0"], logged
    assert not any(line.startswith(("[trace] embed", "[stage 0]")) for line in logged)
    assert any(line.startswith("[cache] stored stage1 ") for line in logged)
    _same_bundle(out, uninterrupted)


def test_kill_then_rerun_resumes(uninterrupted, tmp_path):
    out = tmp_path / "b"
    _interrupt(out, "checkpoint", signal.SIGKILL)  # before tracing, to keep the test short
    assert not out.exists()
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert ".b.build" in leftovers and any(name.startswith(".b.partial-") for name in leftovers), leftovers
    logged = _rerun(out)
    reused = [line.split()[2] for line in logged if line.startswith("[resume] reusing ")]
    assert reused == ["checkpoint"], logged
    assert not any(line.startswith("[load] recipe tiny: seeded random weights") for line in logged)
    assert any(line.startswith("[out] removed 1 staging dir") for line in logged), logged
    _same_bundle(out, uninterrupted)


# -- a cached step is reused only while it holds what it stored (issue 26) ------------------------------------------
KEY = "0123456789abcdef" * 4


def _stored_step(tmp_path: Path) -> tuple:
    from llama4_deploy.build.cache import BuildCache

    logged: list[str] = []
    cache = BuildCache(tmp_path / "x", logged.append).open()
    with cache.put("trace", KEY) as (directory, record):
        (directory / "a.onnx").write_bytes(b"graph a")
        (directory / "b.onnx").write_bytes(b"graph b")
        record["templates"] = ["a", "b"]
    return cache, logged


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "tamper, problem",
    [
        (lambda e: _flip_last_byte(e / "a.onnx"), "a.onnx has another SHA-256"),
        (lambda e: os.truncate(e / "b.onnx", 3), "b.onnx has 3 bytes, 7 were stored"),
        (lambda e: (e / "a.onnx").unlink(), "a.onnx is gone"),
        (lambda e: (e / "notes.txt").write_text("mine"), "notes.txt was added"),
        (lambda e: (e / "record.json").write_text("{"), "its record.json is unreadable"),
        (
            lambda e: (e / "record.json").write_text(json.dumps({"key": KEY, "record": {"templates": []}})),
            "its record.json was not written by this build",
        ),
    ],
    ids=["edited", "truncated", "removed", "added", "record-damaged", "record-without-hashes"],
)
def test_changed_cached_step_is_recomputed(tmp_path, tamper, problem):
    cache, logged = _stored_step(tmp_path)
    record = json.loads((cache.entry("trace", KEY) / "record.json").read_text())
    assert record["files"] == {
        name: {"size": 7, "sha256": hashlib.sha256(data).hexdigest()}
        for name, data in (("a.onnx", b"graph a"), ("b.onnx", b"graph b"))
    }
    assert cache.get("trace", KEY) == (cache.entry("trace", KEY), {"templates": ["a", "b"]})
    assert logged[-1] == f"[resume] reusing trace (key {KEY[:12]})"
    tamper(cache.entry("trace", KEY))
    assert cache.get("trace", KEY) is None
    assert logged[-1] == f"[resume] trace (key {KEY[:12]}) no longer holds what it stored ({problem}); recomputing it"
    assert not cache.entry("trace", KEY).exists()
    with cache.put("trace", KEY) as (directory, record):  # stored again under the same key
        (directory / "a.onnx").write_bytes(b"graph a")
    assert cache.get("trace", KEY)[1] == {}


def test_edited_cached_checkpoint_is_recomputed(tiny_bundle, tmp_path, monkeypatch):
    """The issue's case: a build stopped after `[cache] stored checkpoint`, the cached model.safetensors edited in
    place (same size, one weight's byte changed); the rerun says so, makes the weights again, and writes the bundle
    an uninterrupted build writes."""
    from llama4_deploy.build import build
    from llama4_deploy.build.steps import trace

    out = tmp_path / "b"
    logged: list[str] = []

    def interrupted(ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(trace, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build("tiny", out=out, log=logged.append)
    monkeypatch.undo()
    assert any(line.startswith("[cache] stored checkpoint ") for line in logged), logged
    [entry] = (tmp_path / ".b.build").glob("checkpoint-*")
    _flip_last_byte(entry / "model.safetensors")  # the last byte of the last tensor's data: still a valid file
    logged.clear()
    build("tiny", out=out, log=logged.append)
    key = entry.name.split("-")[1][:12]
    assert logged[0] == (
        f"[resume] checkpoint (key {key}) no longer holds what it stored (model.safetensors has another SHA-256); "
        f"recomputing it"
    ), logged[:3]
    assert not any(line.startswith("[resume] reusing") for line in logged), logged
    assert (
        json.loads((out / "manifest.json").read_text())["files"]
        == json.loads((tiny_bundle / "manifest.json").read_text())["files"]
    )


def test_calibration_key_is_its_content(tmp_path):
    # an edit that keeps the size and the mtime (a restored timestamp) still changes the calibration's key
    from llama4_deploy.build.steps.load import calibration_identity

    path = tmp_path / "calibration.txt"
    path.write_text("w1 w2 w3\n")
    stat = path.stat()
    before = calibration_identity(str(path))
    path.write_text("w1 w2 w4\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert calibration_identity(str(path)) != before
    assert calibration_identity(None) is None
