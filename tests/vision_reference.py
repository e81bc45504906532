"""transformers' Llama 4 image processor and processor as the tests' reference, run in a subprocess.

transformers 5.24's `Llama4ImageProcessor` exists only on its torchvision backend. The torchvision release paired
with the project's torch (0.28.0; it pins torch==2.13.0) is a CUDA build: its compiled extension cannot load beside
the CPU torch wheel, and its Python modules then fail at import on two fake-kernel registrations for ops that
extension would have defined (`torchvision::nms`, `torchvision::qnms`). Where torchvision is importable, transformers
imports it for every model, so installed in the venv it would break the build itself. `make setup` therefore puts it
in `.venv/reference`, outside the venv's path, and this module runs in a child process with that directory on its
path, declaring the two schemas (no kernels: nothing here calls them) before the import. The processor's transforms
(resize with antialias, pad, normalize) are torch's own ops, so the reference computes what it computes anywhere.

Used as `run_reference(jobs, workdir)`: jobs are JSON-able dicts (see `_run_job`); the results come back as lists
of numpy arrays and JSON values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REFERENCE_DIR = Path(sys.prefix) / "reference"


def reference_available() -> bool:
    return (REFERENCE_DIR / "torchvision").is_dir()


def run_reference(jobs: list[dict], workdir: Path) -> list[dict]:
    """Run the jobs in a child process with torchvision importable; each result a dict of arrays / values."""
    assert reference_available(), f"the image processor reference needs torchvision in {REFERENCE_DIR}: run make setup"
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REFERENCE_DIR), str(Path(__file__).resolve().parents[1])]))
    done = subprocess.run(
        [sys.executable, "-m", "tests.vision_reference", str(workdir)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = []
    for i in range(len(jobs)):
        with np.load(workdir / f"result-{i}.npz", allow_pickle=False) as stored:
            results.append({key: stored[key] for key in stored.files})
    return results


# -- the child process --------------------------------------------------------------------------------------------


def _declare_torchvision_ops() -> None:
    import torch

    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP.append(library)


_KEEP: list = []


def _load_input(spec: dict):
    """The reference's input for one image: a PNG keeps a PIL image's mode (palette transparency included); an
    encoded file is opened and EXIF-transposed first, as transformers' `load_image` does; an array as saved."""
    from PIL import Image, ImageOps

    if spec["kind"] == "array":
        return np.load(spec["path"], allow_pickle=False)
    image = Image.open(spec["path"])
    image.load()
    return ImageOps.exif_transpose(image) if spec["kind"] == "file" else image


def _run_job(job: dict) -> dict:
    from transformers import Llama4ImageProcessor, Llama4Processor, PreTrainedTokenizerFast

    side = job.get("tile_size", 336)
    image_processor = Llama4ImageProcessor(size={"height": side, "width": side}, max_patches=job.get("max_patches", 16))
    if job["op"] == "pixels":
        out = image_processor(images=[_load_input(job["image"])], return_tensors=None)
        return {
            "pixel_values": out["pixel_values"][0].float().numpy(),
            "aspect_ratio": np.asarray(out["aspect_ratios"][0]),
        }
    tokenizer = PreTrainedTokenizerFast.from_pretrained(job["tokenizer"])
    processor = Llama4Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=job.get("patch_size", 14),
        pixel_shuffle_ratio=job.get("pixel_shuffle_ratio", 0.5),
    )
    if job["op"] == "save":
        # processor_config.json (transformers 5 nests the image processor in it) and preprocessor_config.json (the
        # image processor alone, the file the published Llama 4 checkpoints carry)
        processor.save_pretrained(job["directory"])
        image_processor.save_pretrained(job["directory"])
        return {}
    if job["op"] == "ids":
        images = [_load_input(spec) for spec in job["images"]]
        out = processor(text=job["text"], images=images or None, return_tensors="pt")
        result = {"input_ids": out["input_ids"][0].numpy().astype(np.int64)}
        if images:
            result["pixel_values"] = out["pixel_values"].float().numpy()
        return result
    raise ValueError(f"unknown job {job['op']!r}")


def _main(workdir: str) -> None:
    _declare_torchvision_ops()
    import torchvision  # noqa: F401 - fails here, naming the cause, if the schemas were not enough

    jobs = json.loads((Path(workdir) / "jobs.json").read_text())
    for i, job in enumerate(jobs):
        np.savez(Path(workdir) / f"result-{i}.npz", **_run_job(job))


if __name__ == "__main__":
    _main(sys.argv[1])
