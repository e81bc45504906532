"""Layer bisection and verify --plot (llama4_deploy/quality/layers.py): a bundle with one layer damaged on purpose
is refused by verify, which names that layer; an intact one agrees at every layer."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import numpy as np
import onnx
import pytest

from llama4_deploy.quality.verify import verify

DAMAGED_LAYER = 2
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def damage_layer(bundle, layer: int, weight: str = "mlp_down", scale: float = 0.3, seed: int = 0) -> None:
    """Add noise (scale x the weight's own max |value|) to one fp32 weight of one layer in weights.data, then
    record the file's new hash in the manifest so the damage reaches the numbers, not the integrity check."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    graph = onnx.load(str(bundle / manifest["engine"]["graphs"]["prefill"]["file"]), load_external_data=False).graph
    (tensor,) = [t for t in graph.initializer if t.name == f"layers.{layer}.{weight}"]
    where = {entry.key: entry.value for entry in tensor.external_data}
    data = bundle / where["location"]
    raw = bytearray(data.read_bytes())
    start, length = int(where["offset"]), int(where["length"])
    values = np.frombuffer(bytes(raw[start : start + length]), dtype=np.float32)
    noise = np.random.default_rng(seed).standard_normal(values.shape).astype(np.float32)
    raw[start : start + length] = (values + scale * np.abs(values).max() * noise).astype(np.float32).tobytes()
    data.write_bytes(bytes(raw))
    manifest["files"][where["location"]]["sha256"] = hashlib.sha256(raw).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))


@pytest.fixture(scope="module")
def damaged_bundle(tiny_bundle, tmp_path_factory):
    bundle = tmp_path_factory.mktemp("damaged") / "tiny"
    shutil.copytree(tiny_bundle, bundle)
    damage_layer(bundle, DAMAGED_LAYER)
    return bundle


def test_verify_names_the_first_damaged_layer(damaged_bundle):
    report = verify(str(damaged_bundle), log=lambda _: None)
    assert not report.ok
    layers = report.layers
    assert layers is not None, "verify failed without the layer-by-layer comparison"
    assert layers.first_bad.layer == DAMAGED_LAYER, layers.table()
    # the layers before it agree to fp32 summation order: far inside the tolerance, not just under it
    for diff in layers.diffs[:DAMAGED_LAYER]:
        assert diff.max_dlogit < diff.tolerance / 100, layers.table()
    assert f"first layer outside the tolerance: layer {DAMAGED_LAYER}" in report.table()


def test_verify_plot_draws_every_layer_of_an_intact_bundle(tiny_bundle, tmp_path):
    from tests.test_cli import invoke, user_error

    png = tmp_path / "layers.png"
    result = invoke("verify", tiny_bundle, "--plot", png)
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == PNG_MAGIC
    rows = re.findall(r"^\s+(\d+)\s+\S+\s+\S+\s+\S+\s+\S+\s+ok$", result.stdout, re.M)
    assert rows == ["0", "1", "2", "3"], result.stdout
    assert "every layer within the tolerance" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers.png"]  # nothing partial left behind
    user_error(invoke("verify", tiny_bundle, "--plot", tmp_path / "no-such-dir" / "x.png"), "does not exist")
    user_error(invoke("verify", tiny_bundle, "--plot", tmp_path / "x.jpg"), ".png")
