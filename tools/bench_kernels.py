"""`make bench-kernels`: what ONNX Runtime's CPU kernels allow one decode-step linear layer (M = 1 row).

For each weight shape [K, N] (the real Scout/Maverick linears at hidden 5120, and the minis' own) it
times three kernels side by side in one run, each as a chain of distinct weights in one session so the
per-run overhead is spread over many matmuls:

    fp32        MatMul                                   4 bytes per weight
    int4        MatMulNBits, block 128, accuracy_level 0 0.5 bytes + a float scale per 128: float activations
                (MLAS CompFp32: each weight unpacked and converted to float in registers)
    int4-int8   MatMulNBits, accuracy_level 4            the same bytes; the row quantized to int8 per block
                (MLAS CompInt8: integer dot products)

in two regimes:

    hot         one weight set that the last-level cache holds, timed again and again (what the
                minis' decode sees where their whole decode weight set fits the L3; docs/benchmarks.md)
    streamed    distinct weights whose bytes are twice the last-level cache per kernel, so every
                run reads them from DRAM (what a real Scout/Maverick decode step sees: tens of GB)

Each row prints µs per matmul, the stored weight bytes read per µs (GB/s), and the ratio to fp32 in
the same regime. A 4-bit decode is bytes-bound only where the int4 column reaches the fp32 column's
GB/s at an eighth of the bytes; where it does not, the kernel's arithmetic is the ceiling.

    python -m tools.bench_kernels [--shapes 5120x8192,...] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# [K, N] of one decode linear. Real models: attention q (5120 -> 40 x 128), an expert's gate/up
# (5120 -> 8192) and down (8192 -> 5120), the dense MLP's up (5120 -> 16384). Minis: their widest linears.
REAL_SHAPES = ((5120, 5120), (5120, 8192), (8192, 5120), (5120, 16384))
MINI_SHAPES = ((512, 1024), (1024, 512), (512, 2048), (256, 1024), (1024, 256))
KERNELS = ("fp32", "int4", "int4-int8")
BLOCK = 128


def last_level_cache_bytes() -> int:
    """The largest CPU cache Linux reports (sysfs), or 32 MiB where it reports none."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 * 2**20)


def weight_bytes(kernel: str, k: int, n: int) -> int:
    """Bytes one weight stores: fp32, or 4-bit values plus one float32 scale per block of BLOCK."""
    return 4 * k * n if kernel == "fp32" else k * n // 2 + 4 * n * (k // BLOCK)


def chain_session(kernel: str, k: int, n: int, count: int, threads: int, seed: int = 0):
    """One ONNX Runtime session: x [1, K] times `count` distinct weights, outputs concatenated."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, initializers, outputs = [], [], []
    for i in range(count):
        if kernel == "fp32":
            initializers.append(numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), f"w{i}"))
            nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
        else:
            blocks = k // BLOCK
            packed = rng.integers(0, 256, (n, blocks, BLOCK // 2), dtype=np.uint8)
            scales = rng.uniform(0.005, 0.02, (n, blocks)).astype(np.float32)
            initializers += [numpy_helper.from_array(packed, f"q{i}"), numpy_helper.from_array(scales, f"s{i}")]
            nodes.append(
                helper.make_node(
                    "MatMulNBits",
                    ["x", f"q{i}", f"s{i}"],
                    [f"y{i}"],
                    domain="com.microsoft",
                    K=k,
                    N=n,
                    bits=4,
                    block_size=BLOCK,
                    accuracy_level=4 if kernel == "int4-int8" else 0,
                )
            )
        outputs.append(f"y{i}")
    nodes.append(helper.make_node("Concat", outputs, ["y"], axis=-1))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n * count])],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def matmul_us(kernel: str, k: int, n: int, count: int, threads: int, repeats: int) -> float:
    """Median µs of one matmul in a chain of `count` (each run reads every weight once)."""
    session = chain_session(kernel, k, n, count, threads)
    x = np.random.default_rng(1).standard_normal((1, k), dtype=np.float32)
    for _ in range(3):
        session.run(None, {"x": x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times) / count


def chain_length(kernel: str, k: int, n: int, regime: str, cache: int, budget: int) -> int:
    """Weights per chain: hot keeps the set within half the cache (up to 16 matmuls, so the per-run
    overhead is shared); streamed makes it twice the cache. 0 (not run) where the hot set would not fit
    or the streamed one would pass `budget` bytes."""
    one = weight_bytes(kernel, k, n)
    if regime == "hot":
        return min(16, cache // 2 // one)
    count = -(-2 * cache // one)
    return count if count * one <= budget else 0


def run(shapes, threads: int, repeats: int, cache: int, budget: int, log=print) -> list[dict]:
    rows = []
    log(f"last-level cache {cache / 2**20:.0f} MiB; {threads} threads; M = 1 row; int4 block {BLOCK}")
    log(
        f"{'K x N':<13}{'regime':<10}"
        + "".join(f"{k + ' µs':>14}{'GB/s':>8}" for k in KERNELS)
        + "".join(f"{k + ' / fp32':>18}" for k in KERNELS[1:])
    )
    for k, n in shapes:
        for regime in ("hot", "streamed"):
            row = {"k": k, "n": n, "regime": regime}
            for kernel in KERNELS:
                count = chain_length(kernel, k, n, regime, cache, budget)
                row[kernel] = matmul_us(kernel, k, n, count, threads, repeats) if count else None
            fp32 = row["fp32"]
            cells = "".join(
                (f"{row[kn]:>14.2f}{weight_bytes(kn, k, n) / row[kn] / 1e3:>8.1f}" if row[kn] else f"{'-':>14}{'-':>8}")
                for kn in KERNELS
            )
            ratios = "".join((f"{fp32 / row[kn]:>17.2f}x" if fp32 and row[kn] else f"{'-':>18}") for kn in KERNELS[1:])
            log(f"{f'{k}x{n}':<13}{regime:<10}{cells}{ratios}")
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes", default=None, help="KxN,KxN,... (default: the real models' linears, then the minis')"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--quick", action="store_true", help="small shapes and a 4 MiB 'cache' (the figures mean nothing)"
    )
    args = parser.parse_args(argv)
    try:
        shapes = (
            [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
            if args.shapes
            else list(REAL_SHAPES + MINI_SHAPES)
        )
        if any(len(s) != 2 or s[0] % BLOCK or s[0] <= 0 or s[1] <= 0 for s in shapes):
            raise ValueError
    except ValueError:
        print(f"error: --shapes takes KxN pairs with K a positive multiple of {BLOCK}, e.g. 5120x8192", file=sys.stderr)
        return 2
    cache = 4 * 2**20 if args.quick else last_level_cache_bytes()
    budget = 8 * 2**30  # streamed chains stay under 8 GiB of weights per session
    run(shapes if not args.quick else [(256, 256)], args.threads, 3 if args.quick else args.repeats, cache, budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
