"""`make bench` (images): image encoding on a vision bundle, tiles/s, against transformers eager on the same tiles.

For a tiny-vision bundle (built here, or --bundle DIR) it prints, measured side by side in one run: preprocessing
(runtime/images.py, numpy + Pillow) in images/s for a photo-sized image, and the vision engine (ONNX Runtime) and
transformers' `get_image_features` + projector (torch eager, same threads) in tiles/s at 1 tile and at the
profile's most tiles. On a shared VM timings drift by tens of percent; the two engines are timed alternately.

    python -m tools.bench_images [--bundle DIR] [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench(bundle: Path, threads: int, repeats: int) -> list[str]:
    import torch

    from llama4_deploy.export.reference import multimodal_reference
    from llama4_deploy.export.vision import reference_features
    from llama4_deploy.runtime import images as im
    from llama4_deploy.runtime import load

    torch.set_num_threads(threads)
    lines = []
    with load(bundle, threads=threads) as engine:
        spec, vision = engine.image_spec, engine.vision
        photo = np.random.default_rng(0).integers(0, 256, size=(768, 1024, 3), dtype=np.uint8)
        seconds = _median_seconds(lambda: im.preprocess(photo, spec), repeats)
        grid = im.preprocess(photo, spec).aspect_ratio
        lines.append(
            f"preprocess 1024x768 -> {grid[0]}x{grid[1]} tiles of {spec.tile_size}: {seconds * 1e3:.1f} ms "
            f"({1 / seconds:.1f} images/s)"
        )
        published = im.ImageSpec()  # Scout/Maverick's processor: tiles of 336, at most 16
        seconds = _median_seconds(lambda: im.preprocess(photo, published), repeats)
        lines.append(
            f"preprocess 1024x768 at the published tiles of 336: {seconds * 1e3:.1f} ms ({1 / seconds:.1f} images/s)"
        )
        reference = multimodal_reference(engine.manifest.raw["source"])
        side = spec.tile_size
        lines.append(f"{'tiles':>6}{'engine ms':>11}{'tiles/s':>10}{'eager ms':>10}{'tiles/s':>10}{'speedup':>9}")
        runner = engine.vision_runner
        for tiles in sorted({1, vision["max_tiles"]}):
            pixels = np.random.default_rng(tiles).uniform(-1, 1, size=(tiles, 3, side, side)).astype(np.float32)
            ours = _median_seconds(lambda p=pixels: runner.infer({vision["input"]: p}), repeats)
            tensor = torch.from_numpy(pixels)
            eager = _median_seconds(lambda t=tensor: reference_features(reference, t), repeats)
            lines.append(
                f"{tiles:>6}{ours * 1e3:>11.2f}{tiles / ours:>10.1f}{eager * 1e3:>10.2f}{tiles / eager:>10.1f}"
                f"{eager / ours:>8.2f}x"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="a vision bundle (default: build tiny-vision in a temp dir)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(args.bundle) if args.bundle else None
        if bundle is None:
            from llama4_deploy.build import build

            bundle = build("tiny-vision", out=Path(tmp) / "tiny-vision", log=lambda _: None).bundle
        print("\n".join(bench(bundle, args.threads, args.repeats)))


if __name__ == "__main__":
    main()
