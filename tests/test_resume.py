"""Resumable builds (llama4_deploy/build/cache.py): a build interrupted by Ctrl-C (SIGINT) or killed
(SIGKILL) after some steps finished leaves no bundle at --out; the rerun reuses those steps (it logs
"[resume] reusing ...") and writes a bundle whose files equal an uninterrupted build's, byte for
byte (SHA-256 of every file, golden.npz included), and removes the build cache.

A small recipe (tiny, 2 stages) built in a subprocess, interrupted as soon as its log says a given
step was stored; the rerun runs in this process.
"""

from __future__ import annotations

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
