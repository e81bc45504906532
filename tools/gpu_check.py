"""`make gpu-check`: the TensorRT path end to end on one H100/H200, in one call (budget: 8 minutes).

    prepare()   CPU side, any machine: TensorRT-form bundles of tiny and maverick-mini at bf16, fp8 and
                int4 (bf16 compute), maverick-mini bf16 in 2 pipeline stages too, and CPU reference logits
                for each: transformers' fp32 model turned into the fake-quant simulation of the bundle's own
                spec (export/simulate.py), on a fixed prompt. Runs in a test (tests/test_gpu_check.py, tiny only).
    run()       GPU side, needs TensorRT: compile each bundle (llama4-deploy compile), load it on the
                tensorrt backend, compare its prefill logits with the reference through polygraphy's
                comparator, time decode and prefill, and print tokens/s and decode's achieved HBM bandwidth
                as a fraction of a device-to-device copy's bandwidth measured in the same run. A staged
                bundle runs stage s on cuda:s where the machine has that many GPUs, else on cuda:0 (its
                stages then share one GPU and hand hidden states over in place), and says which.

One log, `<work>/gpu-check.log`, holds everything printed. Without TensorRT it says so and exits 2.

Tolerance (bf16 compute against the fp32 simulation of the same spec): bfloat16 keeps 8 significant
bits (relative rounding 2^-9 per op), and the four layers' residual stream accumulates a few hundred
such roundings, so max |dlogit| <= 5e-2 x max(1, max |logit|); greedy tokens of the prompt positions
are reported, not required. NOT YET RUN ON A GPU: the first run on one settles whether this bound holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from llama4_deploy.runtime import abi

MODELS = ("tiny", "maverick-mini")
PRECISIONS = ("bf16", "fp8", "int4")
STAGED = (("maverick-mini", "bf16", 2),)  # (model, precision, pipeline stages) also built split
REL_TOLERANCE = 5e-2  # bf16 compute vs the fp32 simulation (module docstring)
PROMPT_TOKENS = 48
DECODE_STEPS = 64
LOG = "gpu-check.log"


@dataclasses.dataclass
class Prepared:
    name: str  # e.g. tiny-int4
    bundle: Path
    reference: Path  # reference.npz: input_ids, logits (fp32 simulation of the bundle's spec)


class Log:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")

    def __call__(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)
        self.file.write(message + "\n")
        self.file.flush()


def _prompt(vocab_size: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(7).integers(0, vocab_size, size=PROMPT_TOKENS)]


def reference_logits_for(bundle: Path, ids: list[int]) -> np.ndarray:
    """Logits of `ids` from transformers' fp32 model of the bundle's source, fake-quantized to its spec where its
    weights are quantized; one decoder layer in memory at a time (verify's reference, export/layerwise.py)."""
    from llama4_deploy.export.layerwise import Pass, run_layer_by_layer
    from llama4_deploy.graphs.quantize import QuantSpec
    from llama4_deploy.quality.verify import bundle_simulation, reference_weights
    from llama4_deploy.runtime.bundle import read_manifest

    manifest = read_manifest(bundle)
    spec = QuantSpec.model_validate(manifest.engine["quantization"])
    simulation = bundle_simulation(manifest)[1] if spec.quantized else None  # bf16/fp16: against fp32, as on the GPU
    return run_layer_by_layer(reference_weights(manifest), [Pass([list(ids)], simulation)])[0][0]


def prepare(work: str | Path, models=MODELS, precisions=PRECISIONS, log=print) -> list[Prepared]:
    """Build the bundles and their reference logits under `work` (reused when already there)."""
    from llama4_deploy.build import build
    from llama4_deploy.runtime.bundle import read_manifest

    work = Path(work)
    out = []
    variants = [(m, p, 1) for m in models for p in precisions]
    variants += [(m, p, n) for m, p, n in STAGED if m in models and p in precisions]
    for model, precision, stages in variants:
        name = f"{model}-{precision}" + (f"-{stages}stages" if stages > 1 else "")
        bundle, reference = work / name, work / f"{name}.reference.npz"
        if not (bundle / "manifest.json").is_file():
            t = time.time()
            build(
                model, out=bundle, target="tensorrt", precision=precision, stages=stages, force=True, log=lambda _: None
            )
            log(f"[prepare] built {name} (TensorRT form, bf16 compute) in {time.time() - t:.1f}s")
        if not reference.is_file():
            ids = _prompt(read_manifest(bundle).vocab_size)
            np.savez(reference, input_ids=np.array(ids), logits=reference_logits_for(bundle, ids))
            log(f"[prepare] reference logits for {name} ({len(ids)} tokens, fp32 simulation of its spec)")
        out.append(Prepared(name, bundle, reference))
    return out


def measured_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), measured now: the roofline's denominator."""
    from cuda.bindings import runtime as cudart

    _, src = cudart.cudaMalloc(nbytes)
    _, dst = cudart.cudaMalloc(nbytes)
    try:
        kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        cudart.cudaMemcpy(dst, src, nbytes, kind)
        cudart.cudaDeviceSynchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            cudart.cudaMemcpy(dst, src, nbytes, kind)
        cudart.cudaDeviceSynchronize()
        return 2 * nbytes * repeats / (time.perf_counter() - start)
    finally:
        cudart.cudaFree(src)
        cudart.cudaFree(dst)


def _compare(name: str, got: np.ndarray, expected: np.ndarray, log) -> bool:
    from polygraphy.comparator import CompareFunc
    from polygraphy.comparator.struct import IterationResult

    tolerance = REL_TOLERANCE * max(1.0, float(np.abs(expected).max()))
    compare = CompareFunc.simple(
        atol={abi.LOGITS: tolerance}, rtol={abi.LOGITS: 0.0}, check_error_stat={abi.LOGITS: "max"}
    )
    result = compare(
        IterationResult({abi.LOGITS: got.astype(np.float32)}, runner_name="tensorrt"),
        IterationResult({abi.LOGITS: expected.astype(np.float32)}, runner_name="cpu-reference"),
    )
    ok = bool(result[abi.LOGITS])
    greedy = int((got.argmax(-1) == expected.argmax(-1)).sum())
    log(
        f"[compare] {name}: max |dlogit| {float(np.abs(got - expected).max()):.3e} (tolerance {tolerance:.3e}), "
        f"greedy {greedy}/{len(expected)}: {'ok' if ok else 'FAIL'}"
    )
    return ok


def _throughput(engine, prepared: Prepared, peak: float, log) -> None:
    from llama4_deploy.planning.costs import bundle_costs

    manifest = engine.manifest
    ids = _prompt(manifest.vocab_size)
    cache = engine.new_cache(1)
    engine.prefill(cache, [ids])
    token = np.array([ids[-1]])
    engine.decode_step(cache, token, np.array([True]))  # warm
    start = time.perf_counter()
    for _ in range(DECODE_STEPS):
        engine.decode_step(cache, token, np.array([True]))
    step = (time.perf_counter() - start) / DECODE_STEPS
    weights = next(r.weight_bytes for r in bundle_costs(prepared.bundle) if r.point == "decode b1")
    moved = weights + cache.kv_bytes_read()
    tokens = min(manifest.profiles["prefill_tokens"], manifest.max_context - 1)
    prompt = (ids * (tokens // len(ids) + 1))[:tokens]
    engine.prefill(engine.new_cache(1), [prompt])  # warm
    start = time.perf_counter()
    engine.prefill(engine.new_cache(1), [prompt])
    prefill = tokens / (time.perf_counter() - start)
    log(
        f"[speed] {prepared.name}: decode b1 {1 / step:,.0f} tokens/s ({step * 1e3:.3f} ms/step, "
        f"{moved / 1e6:.2f} MB/step, {moved / step / peak:.1%} of the measured {peak / 1e12:.2f} TB/s); "
        f"prefill {tokens} tokens {prefill:,.0f} tokens/s"
    )


def _devices(bundle: Path, log) -> list[str]:
    """Stage s on cuda:s where this machine has the GPUs, else every stage on cuda:0."""
    from cuda.bindings import runtime as cudart

    from llama4_deploy.runtime.bundle import read_manifest

    stages = len(read_manifest(bundle).stages)
    count = cudart.cudaGetDeviceCount()[1]
    devices = [f"cuda:{s}" for s in range(stages)] if count >= stages else ["cuda:0"] * stages
    if stages > 1:
        log(f"[devices] {bundle.name}: stages on {', '.join(devices)} ({count} GPU(s) here)")
    return devices


def run(work: str | Path, models=MODELS, precisions=PRECISIONS) -> int:
    from llama4_deploy.targets.tensorrt_compile import compile_bundle, tensorrt_missing

    work = Path(work)
    log = Log(work / LOG)
    missing = tensorrt_missing()
    if missing:
        log(f"error: {missing}")
        return 2
    start = time.time()
    prepared = prepare(work, models, precisions, log)
    from llama4_deploy.runtime import load

    peak = measured_bandwidth()
    log(f"[bandwidth] device-to-device copy: {peak / 1e12:.2f} TB/s")
    failed = []
    for item in prepared:
        t = time.time()
        compile_bundle(item.bundle, log=log)
        log(f"[compile] {item.name} in {time.time() - t:.1f}s")
        reference = np.load(item.reference)
        with load(item.bundle, backend="tensorrt", devices=_devices(item.bundle, log)) as engine:
            got = engine.score([int(i) for i in reference["input_ids"]], mode="prefill")
            if not _compare(item.name, got, reference["logits"], log):
                failed.append(item.name)
            _throughput(engine, item, peak, log)
    log(
        f"[gpu-check] {len(prepared) - len(failed)}/{len(prepared)} bundles match their CPU reference; "
        f"{time.time() - start:.0f}s; log {work / LOG}"
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="build/gpu-check", help="bundles, references and the log")
    args = parser.parse_args(argv)
    return run(args.work)


if __name__ == "__main__":
    sys.exit(main())
