"""The kernel bench times the kernels it names: its MatMulNBits chains compute x @ dequantize(W) (MLAS's
default zero point 8, low nibble first), and its byte counts and chain lengths follow the regimes."""

import numpy as np
import pytest

from tools import bench_kernels as bk


def _dequantize(packed: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """[N, blocks, BLOCK/2] uint8 + [N, blocks] -> W [K, N]: (q - 8) * scale, low nibble first."""
    low, high = packed & 0x0F, packed >> 4
    q = np.stack([low, high], axis=-1).reshape(packed.shape[0], -1)[:, :k].astype(np.float32) - 8
    return (q.reshape(packed.shape[0], -1, bk.BLOCK) * scales[..., None]).reshape(packed.shape[0], k).T


@pytest.mark.parametrize("kernel", bk.KERNELS)
def test_chain_computes_the_named_kernel(kernel):
    k, n, count = 256, 64, 3
    session = bk.chain_session(kernel, k, n, count, threads=1, seed=5)
    rng = np.random.default_rng(5)  # the weights chain_session drew, in the same order
    weights = []
    for _ in range(count):
        if kernel == "fp32":
            weights.append(rng.standard_normal((k, n), dtype=np.float32))
        else:
            packed = rng.integers(0, 256, (n, k // bk.BLOCK, bk.BLOCK // 2), dtype=np.uint8)
            scales = rng.uniform(0.005, 0.02, (n, k // bk.BLOCK)).astype(np.float32)
            weights.append(_dequantize(packed, scales, k))
    x = np.random.default_rng(0).standard_normal((1, k), dtype=np.float32)
    got = session.run(None, {"x": x})[0]
    want = np.concatenate([x @ w for w in weights], axis=-1)
    # fp32 and int4 (float activations): float rounding of a 256-term sum; int4-int8 quantizes x to int8
    # per block of 128 (step max|x|/127, ~1% of a typical |x|), so its error is ~1% of the outputs' scale
    tolerance = 2e-2 if kernel == "int4-int8" else 1e-4
    assert np.abs(got - want).max() <= tolerance * np.abs(want).max()


def test_byte_counts_and_chain_lengths():
    assert bk.weight_bytes("fp32", 256, 64) == 4 * 256 * 64
    assert bk.weight_bytes("int4", 256, 64) == 256 * 64 // 2 + 4 * 64 * 2
    cache = 2**20
    assert bk.chain_length("fp32", 256, 64, "hot", cache, 2**30) == 8  # 64 KiB weights in half a MiB
    assert bk.chain_length("fp32", 1024, 1024, "hot", cache, 2**30) == 0  # 4 MiB does not fit
    streamed = bk.chain_length("int4", 256, 64, "streamed", cache, 2**30)
    assert streamed * bk.weight_bytes("int4", 256, 64) >= 2 * cache
    assert bk.chain_length("fp32", 1024, 1024, "streamed", cache, 2**20) == 0  # over the budget


def test_quick_run_prints_every_kernel(capsys):
    assert bk.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "256x256" in out and "streamed" in out and "int4-int8 / fp32" in out


def test_bad_shapes_exit_2(capsys):
    assert bk.main(["--shapes", "100x8"]) == 2
    assert capsys.readouterr().err.startswith("error: --shapes")
