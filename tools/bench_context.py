"""`make bench` (context part): decode and prefill at Llama 4's real chunk size, against the same
weights at a small chunk, and against the cache layout this runtime had before.

The recipe (scout-context) keeps what sets the attention's cost in the real models: chunk 8192,
head_dim 128, 8 KV heads, three chunked layers per global one. Two bundles are built from the same
seeded weights, one at chunk 8192 and one at chunk 64; a third column runs the chunk-8192 bundle with
the previous cache layout (`FullRingCache`: every ring fed at its full C slots from the first token,
global caches allocated at max_context and their bucket copied every step), so before and after are
measured side by side in one run.

For each context (128, 1k, 4k, 8k tokens already cached, filled with random keys/values through the
cache's own write path: a decode step's cost does not depend on their values) it prints the median
decode step at batch 1 and the KV bytes the engine is handed per step, then prefill tokens/s for a
1024-token prompt. At chunk 8192 the chunked layers really attend every cached token below 8192, so
past ~1k tokens the step grows by that attention work, which the KV column shows.

    python -m tools.bench_context [--threads 2] [--quick]
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

from llama4_deploy.runtime import abi
from llama4_deploy.runtime.kv_cache import KVCache
from tools.bench import median_seconds, precision_build_options


@dataclasses.dataclass(frozen=True)
class Sizes:
    recipe: str = "scout-context"
    chunks: tuple[int, int] = (8192, 64)  # real, small
    contexts: tuple[int, ...] = (128, 1024, 4096, 8192)
    prefill_tokens: int = 1024
    decode_repeats: int = 30
    prefill_repeats: int = 3
    # the real-chunk bundle again at these precisions (tools/bench.py's `precision[-form]` choices): decode ms/step
    # against context per precision, the second table and the plot's other lines
    precisions: tuple[str, ...] = ("fp8", "int4-ort")


FULL = Sizes()
QUICK = Sizes("tiny", (64, 8), (16, 40), 32, 2, 1, ("int4-ort",))  # a smoke run: every path, proves nothing


class FullRingCache(KVCache):
    """The cache layout before context-sized caches: rings of C slots from the first token, global
    buffers of max_context slots whose bucket (a power of two covering the longest row) is copied
    into a contiguous array every step."""

    def __init__(self, manifest, batch: int):
        super().__init__(manifest, batch)
        for layer in self._layers:
            B, K, D = self._shape
            shape = (B, K, layer.ring or self.max_context, D)
            self.keys[layer.index] = self.storage.allocate(shape, self.dtype)
            self.values[layer.index] = self.storage.allocate(shape, self.dtype)

    def _slots(self, layer, bucket=None):
        return layer.ring or self.max_context  # never grows

    def binding_key(self, rows=None):
        return None  # feeds() copies the global buffers every step

    def feeds(self):
        feeds = {}
        for layer in self._layers:
            key, value = self.keys[layer.index], self.values[layer.index]
            if not layer.ring:
                key = np.ascontiguousarray(key[:, :, : self.bucket])
                value = np.ascontiguousarray(value[:, :, : self.bucket])
            feeds[layer.feeds[0]], feeds[layer.feeds[1]] = key, value
        return feeds

    def _reserve(self, tokens):
        from llama4_deploy.runtime.kv_cache import context_bucket

        self.bucket = max(self.bucket, context_bucket(tokens, self.max_context))

    def kv_bytes_read(self):
        B, K, D = self._shape
        return sum(2 * B * K * (layer.ring or self.bucket) * D * self.dtype.itemsize for layer in self._layers)


def fill(cache: KVCache, tokens: int, manifest, seed: int = 0) -> None:
    """`tokens` cached positions of random keys/values in row 0, written as prefill steps would."""
    rng = np.random.default_rng(seed)
    K, D = manifest.model["num_kv_heads"], manifest.model["head_dim"]
    step = 1024
    for start in range(0, tokens, step):
        width = min(step, tokens - start)
        outputs = {
            name: rng.standard_normal((1, K, width, D), dtype=np.float32)
            for name in abi.present_names(layer.index for layer in manifest.layers)
        }
        cache.write(outputs, np.arange(start, start + width)[None])


def decode_ms(engine, cache_type, context: int, repeats: int) -> tuple[float, int]:
    """Median ms of a decode step at batch 1 after `context` cached tokens, and KV bytes handed in."""
    cache = cache_type(engine.manifest, 1)
    fill(cache, context, engine.manifest)
    token, active = np.array([1]), np.array([True])
    ms = 1e3 * median_seconds(lambda: engine.decode_step(cache, token, active), repeats, warmup=3)
    return ms, cache.kv_bytes_read()


def prefill_tps(engine, cache_type, tokens: int, repeats: int) -> float:
    prompt = [[int(t) for t in np.random.default_rng(1).integers(0, engine.vocab_size, tokens)]]
    return tokens / median_seconds(lambda: engine.prefill(cache_type(engine.manifest, 1), prompt), repeats, warmup=1)


def _recipe_with_chunk(name: str, chunk: int, directory: Path) -> Path:
    from llama4_deploy.build.recipe import load_recipe

    recipe = load_recipe(name).model_dump()
    recipe["name"] = f"{name}-c{chunk}"
    recipe["random"]["config"]["attention_chunk_size"] = chunk
    path = directory / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    from llama4_deploy.build import build
    from llama4_deploy.runtime import load

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run at tiny sizes (the figures mean nothing)")
    parser.add_argument(
        "--plot", type=Path, default=Path("build/bench/decode-context.png"), help="PNG of decode ms/step vs context"
    )
    parser.add_argument("--precisions", help="comma-separated precisions of the real-chunk bundle besides fp32")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.precisions is not None:
        sizes = dataclasses.replace(sizes, precisions=tuple(p for p in args.precisions.split(",") if p))
    real, small = sizes.chunks
    max_context = max(sizes.contexts) + 512

    print(
        f"\n== context: {sizes.recipe}, chunk {real} vs the same weights at chunk {small}; decode b1, "
        f"{args.threads} threads; 'before' = chunk {real} with the previous cache layout",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="llama4-bench-context-") as scratch:
        engines = {}
        for chunk in sizes.chunks:
            bundle = build(
                str(_recipe_with_chunk(sizes.recipe, chunk, Path(scratch))),
                out=Path(scratch) / f"c{chunk}",
                max_context=max_context,
                prefill_tokens=sizes.prefill_tokens,
                log=lambda _: None,
            ).bundle
            engines[chunk] = load(bundle, threads=args.threads)
        columns = [
            ("before", engines[real], FullRingCache),
            (f"c{real}", engines[real], KVCache),
            (f"c{small}", engines[small], KVCache),
        ]
        print(
            f"{'context':>8}{'before ms':>11}{f'c{real} ms':>11}{f'c{small} ms':>10}{f'c{real}/c{small}':>11}"
            f"{'before/now':>11}{'KV MB before':>13}{f'KV MB c{real}':>13}{f'KV MB c{small}':>12}",
            flush=True,
        )
        curves = {name: [] for name, _, _ in columns}
        for context in sizes.contexts:
            figures = [decode_ms(engine, cache, context, sizes.decode_repeats) for _, engine, cache in columns]
            for (name, _, _), (ms, _) in zip(columns, figures):
                curves[name].append(ms)
            (before, kv_before), (now, kv_now), (base, kv_base) = figures
            print(
                f"{context:>8}{before:>11.2f}{now:>11.2f}{base:>10.2f}{now / base:>10.2f}x{before / now:>10.2f}x"
                f"{kv_before / 1e6:>13.1f}{kv_now / 1e6:>13.1f}{kv_base / 1e6:>12.1f}",
                flush=True,
            )
        tps = [prefill_tps(engine, cache, sizes.prefill_tokens, sizes.prefill_repeats) for _, engine, cache in columns]
        print(
            f"prefill {sizes.prefill_tokens} tokens, tok/s: before {tps[0]:.0f}, c{real} {tps[1]:.0f}, "
            f"c{small} {tps[2]:.0f}; c{small}/c{real} {tps[2] / tps[1]:.2f}x, now/before {tps[1] / tps[0]:.2f}x",
            flush=True,
        )
        for engine in engines.values():
            engine.close()
        by_precision = precision_curves(sizes, real, max_context, args.threads, Path(scratch))
    lines = {f"c{real} fp32": curves[f"c{real}"], **by_precision, f"c{small} fp32": curves[f"c{small}"]}
    lines[f"c{real} fp32, previous cache layout"] = curves["before"]
    plot_curves(lines, sizes, args.plot)
    print(f"wrote {args.plot}", flush=True)
    return 0


def precision_curves(sizes: Sizes, chunk: int, max_context: int, threads: int, scratch: Path) -> dict[str, list]:
    """Decode ms/step at each context of the real-chunk bundle built at each of sizes.precisions."""
    from llama4_deploy.build import build
    from llama4_deploy.runtime import load

    if not sizes.precisions:
        return {}
    print(
        f"{'context':>8}" + "".join(f"{f'{choice} ms':>14}" for choice in sizes.precisions) + f"   (chunk {chunk})",
        flush=True,
    )
    curves = {}
    for choice in sizes.precisions:
        bundle = build(
            str(_recipe_with_chunk(sizes.recipe, chunk, scratch)),
            out=scratch / f"c{chunk}-{choice}",
            max_context=max_context,
            prefill_tokens=sizes.prefill_tokens,
            log=lambda _: None,
            **{k: v for k, v in precision_build_options(choice).items() if v is not None},
        ).bundle
        with load(bundle, threads=threads) as engine:
            curves[f"c{chunk} {choice}"] = [
                decode_ms(engine, KVCache, context, sizes.decode_repeats)[0] for context in sizes.contexts
            ]
    for i, context in enumerate(sizes.contexts):
        print(f"{context:>8}" + "".join(f"{curves[f'c{chunk} {c}'][i]:>14.2f}" for c in sizes.precisions), flush=True)
    return curves


def plot_curves(curves: dict[str, list], sizes: Sizes, path: Path) -> None:
    """Decode ms/step against tokens already cached, one line per bundle (matplotlib, PNG written whole)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for name, values in curves.items():
        ax.plot(sizes.contexts, values, "o-" if "previous" not in name else "x--", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes.contexts, [str(c) for c in sizes.contexts])
    ax.set_xlabel("tokens already cached (context)")
    ax.set_ylabel("decode step, batch 1 (ms, median)")
    ax.set_title(f"{sizes.recipe}: decode ms/step vs context, per chunk and precision")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial.png")
    fig.savefig(partial)
    plt.close(fig)
    partial.replace(path)


if __name__ == "__main__":
    sys.exit(main())
