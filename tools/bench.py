"""`make bench`: the ONNX Runtime engine vs transformers eager, same model, same threads, fp32.

For each recipe (scout-mini, maverick-mini) and MoE dispatch it prints, measured side by side in
one run: decode step latency at batch 1 and 8, prefill tokens/s at 256 and 1024 tokens, and
decode's roofline fraction: the time of one plain MatMul that streams exactly the step's ideal
weight bytes (active parameters only), divided by the step's time. On a shared VM timings drift
by tens of percent over minutes, so each row's decode b1 ratio is taken against transformers'
decode b1 measured again right after that row's engine (its `eager b1` column); the other ratios
use the figures measured once per recipe.

    python -m tools.bench [--recipes scout-mini,maverick-mini] [--threads 2]
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DISPATCHES = ("auto", "native", "gather", "capacity", "dense")


@dataclasses.dataclass(frozen=True)
class Sizes:
    decode_batches: tuple[int, int] = (1, 8)
    prefill_tokens: tuple[int, int] = (256, 1024)
    context: int = 64  # tokens already cached when a decode step is timed
    decode_repeats: int = 40  # timed decode steps; with 3 warm-up steps the cache stays under 128
    prefill_repeats: int = 3
    roofline_repeats: int = 30


FULL = Sizes()
QUICK = Sizes((1, 2), (16, 32), 8, 2, 1, 2)  # a smoke run on tiny: exercises every path, proves nothing


def median_seconds(run, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclasses.dataclass
class Figures:
    decode_ms: dict[int, float]  # batch -> ms per step
    prefill_tps: dict[int, float]  # tokens -> tokens/s


def transformers_decode_ms(model, vocab: int, batch: int, sizes: Sizes = FULL, seed: int = 0) -> float:
    """Median ms of one cached decode step of transformers eager after `sizes.context` tokens."""
    import torch

    rng = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        ids = torch.randint(0, vocab, (batch, sizes.context), generator=rng)
        out = model(input_ids=ids, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        step = torch.randint(0, vocab, (batch, 1), generator=rng)
        return 1e3 * median_seconds(
            lambda: model(input_ids=step, cache=cache, use_cache=True), sizes.decode_repeats, warmup=3
        )


def bench_transformers(model, vocab: int, threads: int, sizes: Sizes = FULL) -> Figures:
    import torch

    torch.set_num_threads(threads)
    rng = torch.Generator().manual_seed(0)
    decode = {batch: transformers_decode_ms(model, vocab, batch, sizes) for batch in sizes.decode_batches}
    with torch.inference_mode():
        prefill = {}
        for tokens in sizes.prefill_tokens:
            ids = torch.randint(0, vocab, (1, tokens), generator=rng)
            prefill[tokens] = tokens / median_seconds(
                lambda ids=ids: model(input_ids=ids, use_cache=False), sizes.prefill_repeats, warmup=1
            )
    return Figures(decode, prefill)


def bench_engine(engine, vocab: int, sizes: Sizes = FULL) -> tuple[Figures, int, int]:
    from llama4_deploy.runtime.kv_cache import KVCache

    rng = np.random.default_rng(0)
    decode = {}
    for batch in sizes.decode_batches:
        prompts = [list(rng.integers(0, vocab, sizes.context)) for _ in range(batch)]
        cache = KVCache(engine.manifest, batch)
        engine.prefill(cache, prompts)
        tokens = rng.integers(0, vocab, batch)
        active = np.ones(batch, dtype=bool)
        decode[batch] = 1e3 * median_seconds(
            lambda cache=cache, tokens=tokens, active=active: engine.decode_step(cache, tokens, active),
            sizes.decode_repeats,
            warmup=3,
        )
    prefill = {}
    for count in sizes.prefill_tokens:
        prompt = [list(rng.integers(0, vocab, count))]
        prefill[count] = count / median_seconds(
            lambda prompt=prompt: engine.prefill(KVCache(engine.manifest, 1), prompt), sizes.prefill_repeats, warmup=1
        )
    return Figures(decode, prefill), engine.steps, engine.overflow_reruns


def roofline_ms(weight_bytes: float, threads: int, repeats: int = FULL.roofline_repeats) -> float:
    """One MatMul [1, K] x [K, 1024] in ONNX Runtime whose weight is exactly `weight_bytes`."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    columns = 1024
    rows = max(1, int(weight_bytes // (4 * columns)))
    weight = np.random.default_rng(0).standard_normal((rows, columns), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "roofline",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, columns])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.ones((1, rows), dtype=np.float32)
    return 1e3 * median_seconds(lambda: session.run(None, {"x": x}), repeats, warmup=5)


# precision-form[-int4 compute]; each against fp32, both `auto` dispatch. int4-ort-int8: --int4-compute int8
PRECISIONS = ("fp16", "fp8-qdq", "int4-qdq", "int4-ort", "int4-ort-int8")


def precision_build_options(choice: str) -> dict[str, str | int | None]:
    """build() keywords of a `precision[-form[-int4 compute]]` choice: int4-ort-int8 -> int4, ort, int8 (the ort form's
    default block, 32). An int4 choice without `-int8` is block 128 with float activations, symmetric, all 4-bit, as
    its name says, on either form (the target's defaults would give the ort form int8 activations at block 32,
    asymmetric blocks and attention V at 8 bits)."""
    precision, _, form = choice.partition("-")
    form, _, compute = form.partition("-")
    options = {"precision": precision, "quant_form": form or None, "int4_compute": compute or None}
    if precision == "int4" and not compute:
        options.update(int4_compute="float", block_size=128, int4_zero_point="symmetric", int8_weights=())
    return options


def bundle_bytes(bundle: Path) -> int:
    """Bytes of every file of a bundle (a bundle is one flat directory)."""
    return sum(p.stat().st_size for p in Path(bundle).iterdir() if p.is_file())


@dataclasses.dataclass(frozen=True)
class DecodeSpeed:
    step_ms: float  # this engine's decode step at batch `batch`, median of the rounds' medians
    fp32_ms: float  # the fp32 engine's, timed alternately with it (equal to step_ms for the fp32 engine itself)
    stored_bytes: float  # weight bytes one decode step reads at the stored precision (cost model, decode graph)
    roofline: float  # time of one MatMul streaming stored_bytes / step_ms
    batch: int

    @property
    def x_fp32(self) -> float:
        return self.fp32_ms / self.step_ms


def decode_speed(engine, bundle: Path, base, threads: int, sizes: Sizes = FULL, rounds: int = 3) -> DecodeSpeed:
    """Decode at batch `sizes.decode_batches[0]` of `engine` against the fp32 engine `base`, the two timed
    alternately (`rounds` rounds of each, medians) so machine drift hits both alike; `base` None times `engine`
    alone (the fp32 row itself). Bytes per step are counted from the decode graph at the stored precision."""
    import onnx_ir as ir

    from llama4_deploy.graphs.cost import graph_cost, with_ring

    batch = sizes.decode_batches[0]
    vocab = engine.vocab_size
    pairs = []
    for _ in range(rounds):
        base_ms = bench_engine_decode(base, vocab, batch, sizes) if base is not None else None
        pairs.append((base_ms, bench_engine_decode(engine, vocab, batch, sizes)))
    step_ms = statistics.median(p[1] for p in pairs)
    fp32_ms = statistics.median(p[0] for p in pairs) if base is not None else step_ms
    graph = ir.load(Path(bundle) / engine.graphs["decode"]["file"])
    # the chunked layers' ring dimension too, or their nodes stay unresolved and uncounted
    dims = with_ring({"batch": batch, "new": 1, "context": 128}, engine.manifest.model)
    stored, _, _ = graph_cost(graph, dims)
    roof = roofline_ms(stored.weight_bytes, threads, sizes.roofline_repeats) / step_ms
    return DecodeSpeed(step_ms, fp32_ms, stored.weight_bytes, roof, batch)


def bench_precisions(name: str, precisions: list[str], threads: int, sizes: Sizes, scratch: Path) -> None:
    """Per precision x form: decode b1 against the fp32 engine (decode_speed: timed alternately), bytes per
    step at the stored precision and the roofline fraction of those bytes; bundle size against fp32."""
    from llama4_deploy.build import build
    from llama4_deploy.runtime import load

    b1 = sizes.decode_batches[0]
    fp32 = build(name, out=scratch / f"{name}-fp32", log=lambda _: None).bundle
    print(
        f"{'precision':<15}{'dispatch':<10}{f'decode b{b1} ms':>13}{f'fp32 b{b1} ms':>13}{'x fp32':>8}"
        f"{'MB/step':>9}{f'roofline b{b1}':>13}{'size x fp32':>12}"
    )
    with load(fp32, threads=threads) as base:
        for choice in precisions:
            bundle = build(
                name, out=scratch / f"{name}-{choice}", **precision_build_options(choice), log=lambda _: None
            ).bundle
            with load(bundle, threads=threads) as engine:
                speed = decode_speed(engine, bundle, base, threads, sizes)
                print(
                    f"{choice:<15}{engine.graphs['decode']['moe_dispatch']:<10}{speed.step_ms:>13.3f}"
                    f"{speed.fp32_ms:>13.3f}{speed.x_fp32:>7.2f}x{speed.stored_bytes / 1e6:>9.2f}"
                    f"{100 * speed.roofline:>12.0f}%{bundle_bytes(bundle) / bundle_bytes(fp32):>11.3f}x",
                    flush=True,
                )


def bench_engine_decode(engine, vocab: int, batch: int, sizes: Sizes) -> float:
    """Median ms of one decode step at `batch` after `sizes.context` cached tokens."""
    from llama4_deploy.runtime.engine import KVCache

    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, vocab, sizes.context)) for _ in range(batch)]
    cache = KVCache(engine.manifest, batch)
    engine.prefill(cache, prompts)
    tokens = rng.integers(0, vocab, batch)
    active = np.ones(batch, dtype=bool)
    return 1e3 * median_seconds(lambda: engine.decode_step(cache, tokens, active), sizes.decode_repeats, warmup=3)


def main(argv: list[str] | None = None) -> int:
    import argparse

    import onnx_ir as ir

    from llama4_deploy.build import build
    from llama4_deploy.build.recipe import load_recipe
    from llama4_deploy.export.reference import random_model
    from llama4_deploy.graphs.cost import step_cost
    from llama4_deploy.runtime import load

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="scout-mini,maverick-mini")
    parser.add_argument("--dispatch", default=",".join(DISPATCHES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--precisions", default=",".join(PRECISIONS), help="precision-form rows against fp32 (empty: none)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run at tiny sizes (the figures mean nothing)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    (b1, bn), (p1, p2) = sizes.decode_batches, sizes.prefill_tokens

    print(f"fp32, {args.threads} threads for both ONNX Runtime and torch; decode after {sizes.context} cached tokens")
    with tempfile.TemporaryDirectory(prefix="llama4-bench-") as scratch:
        for name in args.recipes.split(","):
            recipe = load_recipe(name)
            r = recipe.random
            reference = random_model(r.config, r.seed, r.logit_gain, r.router_gain)
            vocab = r.config["vocab_size"]
            print(f"\n== {name}: transformers eager", flush=True)
            hf = bench_transformers(reference, vocab, args.threads, sizes)
            print(
                f"decode b{b1} {hf.decode_ms[b1]:.2f} ms, b{bn} {hf.decode_ms[bn]:.2f} ms; "
                f"prefill {p1} {hf.prefill_tps[p1]:.0f} tok/s, {p2} {hf.prefill_tps[p2]:.0f} tok/s"
            )
            header = (
                f"{'dispatch':<22}{f'decode b{b1} ms':>13}{f'eager b{b1}':>9}{'x eager':>9}"
                f"{f'decode b{bn} ms':>13}{'x eager':>9}"
                f"{f'prefill{p1} t/s':>15}{'x eager':>9}{f'prefill{p2} t/s':>16}{'x eager':>9}"
                f"{f'roofline b{b1}':>12}{'reruns':>9}"
            )
            rows = []
            for dispatch in args.dispatch.split(","):
                bundle = build(
                    name, out=Path(scratch) / f"{name}-{dispatch}", moe_dispatch=dispatch, log=lambda _: None
                ).bundle
                with load(bundle, threads=args.threads) as engine:
                    graphs = engine.graphs
                    label = (
                        dispatch
                        if dispatch != "auto"
                        else f"auto({graphs['decode']['moe_dispatch']}/{graphs['prefill']['moe_dispatch']})"
                    )
                    figures, steps, reruns = bench_engine(engine, vocab, sizes)
                    decode_graph = ir.load(bundle / graphs["decode"]["file"])
                    ideal = step_cost(
                        decode_graph, engine.manifest.model, {"batch": b1, "new": 1, "context": 128}
                    ).ideal
                    step_ms = figures.decode_ms[b1]
                    roof = roofline_ms(ideal.weight_bytes, args.threads, sizes.roofline_repeats) / step_ms
                eager_b1 = transformers_decode_ms(reference, vocab, b1, sizes)  # adjacent in time to this row
                rows.append(
                    f"{label:<22}{step_ms:>13.3f}{eager_b1:>9.2f}{eager_b1 / step_ms:>8.1f}x"
                    f"{figures.decode_ms[bn]:>13.3f}{hf.decode_ms[bn] / figures.decode_ms[bn]:>8.1f}x"
                    f"{figures.prefill_tps[p1]:>15.0f}{figures.prefill_tps[p1] / hf.prefill_tps[p1]:>8.1f}x"
                    f"{figures.prefill_tps[p2]:>16.0f}{figures.prefill_tps[p2] / hf.prefill_tps[p2]:>8.1f}x"
                    f"{100 * roof:>11.0f}%{f'{reruns}/{steps}':>9}"
                )
                print(rows[-1] if len(rows) > 1 else header + "\n" + rows[-1], flush=True)
            if args.precisions:
                print(f"\n== {name}: precisions against fp32 (auto dispatch)", flush=True)
                bench_precisions(name, args.precisions.split(","), args.threads, sizes, Path(scratch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
