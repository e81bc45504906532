"""Step `hash`: every file's size and SHA-256 recorded in the manifest (runtime/integrity.py), which load checks.
The stages' files were hashed as they were written (and kept with their cached step); the rest are hashed here."""

from __future__ import annotations

import time
from typing import Any

from llama4_deploy.build.clock import timed
from llama4_deploy.build.context import BuildContext
from llama4_deploy.runtime.bundle import MANIFEST, write_manifest
from llama4_deploy.runtime.integrity import hash_files


def run(ctx: BuildContext) -> dict[str, Any]:
    manifest = ctx.require("manifest")
    started = time.time()
    written = {name: record for saved in ctx.saved for name, record in saved.files.items()}
    with timed("hash"):
        fresh = hash_files(
            ctx.bundle, [p.name for p in ctx.bundle.iterdir() if p.name != MANIFEST and p.name not in written]
        )
    manifest["files"] = dict(sorted({**written, **fresh}.items()))
    write_manifest(ctx.bundle, manifest)
    ctx.log(f"[hash] SHA-256 of {len(manifest['files'])} files in {time.time() - started:.1f}s")
    return manifest
