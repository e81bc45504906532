"""runtime/devices.py: the stage -> device map (defaults per backend, validation in one sentence) and ONNX
Runtime's providers for a stage; the manifest's per-stage device field. Pure: no GPU, no bundle built."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama4_deploy.runtime.bundle import BundleError, Manifest, _validate_stages
from llama4_deploy.runtime.devices import Device, onnxruntime_providers, parse, placement


def _stage(index: int, layers: list[int], **extra) -> dict:
    return {
        "index": index,
        "layers": layers,
        "graphs": {"prefill": {"file": f"stage{index}.gather.onnx"}, "decode": {"file": f"stage{index}.gather.onnx"}},
        "external_data": f"stage{index}.weights.data",
        "weights_layout": "",
        "inputs": [],
        "outputs": [],
        **extra,
    }


def _manifest(stages: list[dict] | None) -> Manifest:
    engine = {"backend": "tensorrt", "graphs": {"prefill": {}, "decode": {}}, "external_data": "weights.data"}
    if stages is not None:
        engine["stages"] = stages
    return Manifest({"name": "mini", "engine": engine, "layers": [{"index": i} for i in range(4)]}, Path("."))


TWO = _manifest([_stage(0, [0, 2]), _stage(1, [2, 4])])


def test_names():
    assert [parse(n) for n in ("cpu", "cuda:0", " cuda:12 ")] == [Device("cpu"), Device("cuda", 0), Device("cuda", 12)]
    assert [str(d) for d in (Device("cpu"), Device("cuda", 3))] == ["cpu", "cuda:3"]
    for bad in ("gpu", "cuda", "cuda:-1", "cuda:x", "CPU", ""):
        with pytest.raises(ValueError, match="not a device name; use 'cpu' or 'cuda:N'"):
            parse(bad)
    with pytest.raises(TypeError, match="device name"):
        parse(0)


def test_defaults_per_backend():
    assert placement(TWO, "onnxruntime", None) == [Device("cpu"), Device("cpu")]  # this machine: the host
    assert placement(TWO, "tensorrt", None) == [Device("cuda", 0), Device("cuda", 1)]  # stage s on GPU s
    moved = _manifest([_stage(0, [0, 2], device=3), _stage(1, [2, 4], device=3)])  # a manifest's own choice
    assert placement(moved, "tensorrt", None) == [Device("cuda", 3), Device("cuda", 3)]
    assert placement(_manifest(None), "tensorrt", None) == [Device("cuda", 0)]  # one-stage layout


def test_overrides_are_validated_in_one_sentence():
    assert placement(TWO, "onnxruntime", ["cuda:1", "cpu"]) == [Device("cuda", 1), Device("cpu")]
    assert placement(TWO, "tensorrt", "cuda:1,cuda:0") == [Device("cuda", 1), Device("cuda", 0)]  # the CLI's form
    with pytest.raises(
        ValueError,
        match=r"^devices lists 1 device\(s\) but bundle mini has 2 pipeline stage\(s\); "
        r"give one device per stage",
    ):
        placement(TWO, "onnxruntime", ["cpu"])
    with pytest.raises(ValueError, match="^the device of stage 1 is 'gpu:1', which is not a device name"):
        placement(TWO, "onnxruntime", ["cpu", "gpu:1"])
    with pytest.raises(
        ValueError, match="^the tensorrt backend runs every stage on a GPU, but stage 0 is placed on the cpu"
    ):
        placement(TWO, "tensorrt", ["cpu", "cuda:0"])
    with pytest.raises(TypeError, match="list of device names"):
        placement(TWO, "onnxruntime", {"cpu": 0})


def test_onnxruntime_providers():
    assert onnxruntime_providers(Device("cpu")) == ["CPUExecutionProvider"]
    assert onnxruntime_providers(Device("cuda", 1), ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        ("CUDAExecutionProvider", {"device_id": 1}),
        "CPUExecutionProvider",
    ]
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the refusal below cannot happen here")
    with pytest.raises(ValueError, match=r"^cuda:0 was asked for, but this onnxruntime has no CUDAExecutionProvider"):
        onnxruntime_providers(Device("cuda", 0))


def test_manifest_stage_device_is_checked():
    _validate_stages(
        {"graphs": {"prefill": {}, "decode": {}}, "stages": [_stage(0, [0, 2], device=1), _stage(1, [2, 4])]},
        4,
        Path("m.json"),
    )
    for bad in (-1, "0", 1.0, True):
        engine = {"graphs": {"prefill": {}, "decode": {}}, "stages": [_stage(0, [0, 2]), _stage(1, [2, 4], device=bad)]}
        with pytest.raises(BundleError, match=r"engine\.stages\[1\]\.device must be a GPU index"):
            _validate_stages(engine, 4, Path("m.json"))
