"""Step `golden`: the engine's logits for a fixed short prompt, saved in the bundle (golden.npz) so a later backend
can be compared with it without torch. Skipped where ONNX Runtime's CPU cannot run the compute dtype (bfloat16)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from llama4_deploy.build.cache import link_or_copy, step_key
from llama4_deploy.build.clock import timed
from llama4_deploy.build.context import BuildContext
from llama4_deploy.runtime import load
from llama4_deploy.runtime.bundle import GOLDEN


def run(ctx: BuildContext) -> None:
    loaded = ctx.require("loaded")
    if loaded.spec.compute_dtype == "bfloat16":
        ctx.log("[golden] skipped: ONNX Runtime's CPU has no bfloat16 kernels to run the engine")
        return
    key = step_key("golden", [saved.key for saved in ctx.saved])
    if ctx.cache.get("golden", key) is not None:
        ctx.cache.link_files("golden", key, ctx.bundle)
        return
    ctx.log("[golden] engine logits for a fixed prompt")
    with timed("golden"):
        ids = [int(i) for i in np.random.default_rng(0).integers(0, loaded.shape.vocab_size, size=8)]
        # the hashes are recorded after this; weights stay memory-mapped (no prepacked copies): O(layer) heap.
        # int8 activations (QuantSpec.int8_activations) run only on prepacked weights
        with load(ctx.bundle, verify_files=False, prepack=loaded.spec.int8_activations) as engine:
            save_npz(ctx.bundle / GOLDEN, input_ids=np.array(ids), logits=engine.score(ids, mode="prefill"))
    with ctx.cache.put("golden", key) as (directory, _):
        link_or_copy(ctx.bundle / GOLDEN, directory / GOLDEN)


def save_npz(path: Path, **arrays) -> None:
    """np.savez's format with fixed zip timestamps, so the same arrays give the same bytes (np.savez
    stamps the current time into the archive)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asanyarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buffer.getvalue())
