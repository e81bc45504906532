"""The build at scale, measured: `make bench-build` (python -m tools.bench_build).

Writes the synthetic Maverick-shaped checkpoint (synth.py, 4.46 GB of bf16) if it is not there, builds it at
fp32 and at int4, each in a child process, and prints per build:

- peak anonymous memory: RssAnon of the child sampled from /proc/PID/status every SAMPLE_SECONDS by a thread
  here (RssAnon counts the heap, not the page cache of the memory-mapped shards or of weights.data), overall and
  per stage, against the largest layer's fp32 bytes (the build converts to fp32 as it streams) and the target
  2 x largest layer + 0.5 GB;
- checkpoint read throughput: the checkpoint's bytes over the whole build's wall time (load to hash), and over
  the `save` stage alone, which is where the weights stream (read, convert, quantize, write);
- the seconds of every build step, as the build records them (llama4_deploy/build/clock.py).

The child runs `build()` and writes its BuildResult's figures as JSON; the build is niced by the caller.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SAMPLE_SECONDS = 0.02
MB = 1e6
MIB = 1024**2
TARGET_SLACK = 512 * MIB  # the target: anonymous peak <= 2 x largest layer + 0.5 GB
TARGET_MB_S = 150.0


@dataclasses.dataclass
class Measurement:
    precision: str
    seconds: float
    peak_anon: int  # bytes
    peak_anon_by_stage: dict[str, int]
    step_seconds: dict[str, float]
    checkpoint_bytes: int
    largest_layer_bytes: int  # fp32
    bundle_bytes: int

    @property
    def target_anon(self) -> int:
        return 2 * self.largest_layer_bytes + TARGET_SLACK

    @property
    def mb_per_s(self) -> float:
        return self.checkpoint_bytes / MB / self.seconds

    @property
    def save_mb_per_s(self) -> float:
        return self.checkpoint_bytes / MB / max(self.step_seconds.get("save", 0.0), 1e-9)

    def summary(self) -> str:
        stages = ", ".join(f"{name} {s:.1f}s" for name, s in self.step_seconds.items())
        by_stage = ", ".join(f"{name} {b / MIB:.0f}" for name, b in self.peak_anon_by_stage.items())
        anon_ok = "met" if self.peak_anon <= self.target_anon else "NOT met"
        rate_ok = "met" if self.mb_per_s >= TARGET_MB_S else "NOT met"
        return "\n".join(
            [
                f"{self.precision}: built in {self.seconds:.1f}s, bundle {self.bundle_bytes / 1e9:.2f} GB",
                f"  peak RssAnon {self.peak_anon / MIB:.0f} MiB; "
                f"largest layer {self.largest_layer_bytes / MIB:.0f} MiB "
                f"(fp32); target 2 x layer + 512 MiB = {self.target_anon / MIB:.0f} MiB: {anon_ok}",
                f"  peak RssAnon by stage (MiB): {by_stage}",
                f"  checkpoint read: {self.checkpoint_bytes / 1e9:.2f} GB in {self.seconds:.1f}s = "
                f"{self.mb_per_s:.0f} MB/s "
                f"over the whole build (target {TARGET_MB_S:.0f}: {rate_ok}); {self.save_mb_per_s:.0f} MB/s over the "
                f"save stage, where the weights stream",
                f"  stages: {stages}",
            ]
        )


def rss_anon(pid: int) -> int | None:
    """RssAnon of a process in bytes (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class AnonSampler:
    """Samples a process's RssAnon in a thread until stopped: (time, bytes) pairs."""

    def __init__(self, pid: int, interval: float = SAMPLE_SECONDS):
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = rss_anon(self.pid)
            if value is not None:
                self.samples.append((time.time(), value))
            self._stop.wait(self.interval)

    def __enter__(self) -> AnonSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        return max((value for _, value in self.samples), default=0)

    def peak_between(self, start: float, end: float) -> int:
        return max((value for t, value in self.samples if start <= t <= end), default=0)


def largest_layer_bytes(checkpoint: Path) -> int:
    """fp32 bytes of the largest decoder layer, from the checkpoint's config alone."""
    import math as _math

    from llama4_deploy.export.checkpoint import Checkpoint
    from llama4_deploy.export.weights import layer_weights

    shape = Checkpoint(checkpoint).shape
    return max(
        sum(4 * _math.prod(s.checkpoint_shape) for s in layer_weights(shape, i, kind).values())
        for i, kind in enumerate(shape.layer_kinds)
    )


def checkpoint_bytes(checkpoint: Path) -> int:
    return sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))


def measure(
    checkpoint: Path, out: Path, precision: str, threads: int | None = None, **options: str | int
) -> Measurement:
    """Build `checkpoint` at `precision` into `out` in a child process, sampling its RssAnon; `options`: more build()
    keywords (block_size, int4_compute)."""
    with tempfile.TemporaryDirectory() as scratch:
        result_file = Path(scratch) / "result.json"
        args = {"checkpoint": str(checkpoint), "out": str(out), "precision": precision, "result": str(result_file)}
        args["options"] = options
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        child = subprocess.Popen([sys.executable, "-m", "tools.bench_build", "--child", json.dumps(args)], env=env)
        with AnonSampler(child.pid) as sampler:
            code = child.wait()
        if code != 0:
            raise RuntimeError(f"the {precision} build of {checkpoint} failed (exit {code})")
        result = json.loads(result_file.read_text())
    by_stage: dict[str, int] = {}
    for stage, start, end in result["step_spans"]:
        by_stage[stage] = max(by_stage.get(stage, 0), sampler.peak_between(start, end))
    return Measurement(
        precision,
        result["seconds"],
        sampler.peak,
        by_stage,
        result["step_seconds"],
        checkpoint_bytes(checkpoint),
        largest_layer_bytes(checkpoint),
        sum(p.stat().st_size for p in out.iterdir()),
    )


@dataclasses.dataclass
class VerifyMeasurement:
    seconds: float
    peak_anon: int  # bytes
    exit_code: int  # verify's: 0 PASS, 1 FAIL
    output: str  # its report (stdout)
    largest_layer_bytes: int  # fp32
    model_bytes: int  # the whole model's fp32 bytes, what a whole-model reference would hold

    @property
    def target_anon(self) -> int:
        return 2 * self.largest_layer_bytes + TARGET_SLACK

    def summary(self) -> str:
        ok = "met" if self.peak_anon <= self.target_anon else "NOT met"
        return (
            f"verify: {'PASS' if self.exit_code == 0 else f'exit {self.exit_code}'} in {self.seconds:.1f}s; peak "
            f"RssAnon {self.peak_anon / MIB:.0f} MiB; largest layer {self.largest_layer_bytes / MIB:.0f} MiB (fp32), "
            f"whole model {self.model_bytes / MIB:.0f} MiB (fp32); target 2 x layer + 512 MiB = "
            f"{self.target_anon / MIB:.0f} MiB: {ok}"
        )


def measure_verify(bundle: Path, checkpoint: Path, threads: int | None = None) -> VerifyMeasurement:
    """`llama4-deploy verify BUNDLE` in a child process, sampling its RssAnon; `checkpoint` is the bundle's source."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.time()
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from llama4_deploy.cli import main; main(['verify', sys.argv[1]])",
            str(bundle),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    with AnonSampler(child.pid) as sampler:
        output, _ = child.communicate()
    return VerifyMeasurement(
        time.time() - start,
        sampler.peak,
        child.returncode,
        output,
        largest_layer_bytes(checkpoint),
        model_bytes(checkpoint),
    )


def model_bytes(checkpoint: Path) -> int:
    """fp32 bytes of every weight the model holds, from the checkpoint's config alone."""
    import math as _math

    from llama4_deploy.export.checkpoint import Checkpoint
    from llama4_deploy.export.weights import all_weights

    tensors = {s.checkpoint_name: s.checkpoint_shape for s in all_weights(Checkpoint(checkpoint).shape).values()}
    return sum(4 * _math.prod(shape) for shape in tensors.values())  # a tied lm_head is the embedding, once


def _child(spec: str) -> None:
    from llama4_deploy.build import build

    args = json.loads(spec)
    result = build(
        checkpoint=args["checkpoint"], out=args["out"], precision=args["precision"], force=True, **args["options"]
    )
    Path(args["result"]).write_text(
        json.dumps({"seconds": result.seconds, "step_seconds": result.step_seconds, "step_spans": result.step_spans})
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="build the synthetic Maverick-shaped checkpoint, measured")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default="build/synth-maverick")
    parser.add_argument("--out", default="build/bench-build", help="bundles go to OUT-fp32 and OUT-int4")
    parser.add_argument("--precisions", default="fp32,int4")
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child)
        return 0
    from tools.synth import write_checkpoint

    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "config.json").is_file():  # any checkpoint given is measured as it is
        write_checkpoint(checkpoint)
    print(
        f"checkpoint {checkpoint}: {checkpoint_bytes(checkpoint) / 1e9:.2f} GB in "
        f"{len(list(checkpoint.glob('*.safetensors')))} shards; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}",
        flush=True,
    )
    measurements = []
    for precision in args.precisions.split(","):
        measurements.append(measure(checkpoint, Path(f"{args.out}-{precision}"), precision))
        print(measurements[-1].summary(), flush=True)
    ok = all(m.peak_anon <= m.target_anon and m.mb_per_s >= TARGET_MB_S for m in measurements)
    print("all targets met" if ok else "some targets not met (see above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
