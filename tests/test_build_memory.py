"""The build's and verify's memory is O(largest layer), not O(model): a synthetic checkpoint written by synth.py,
built, then verified, each in a child process whose RssAnon is sampled (bench_build.py). `make bench-build`
measures the 4.46 GB one's build."""

from __future__ import annotations

import json
import math

import pytest

from tools.bench_build import largest_layer_bytes, measure, measure_verify, model_bytes
from tools.synth import SynthConfig, SynthError, main, write_checkpoint

# 24 layers, 64 experts in every second one: 12 MoE layers of 50 MiB in fp32 and 0.65 GB of fp32 weights in
# all, so a build that held the model (on top of its ~0.3 GB of imports and traced templates) would exceed
# the bound below, while one that holds a layer or two stays under it. Chunk 8: verify's prompts cross two
# chunks, so they are 11 to 20 tokens long (Maverick's 8192 would make them 20k)
SMALL = SynthConfig(
    hidden_size=256,
    intermediate_size=256,
    intermediate_size_mlp=1024,
    num_hidden_layers=24,
    num_local_experts=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=4096,
    attention_chunk_size=8,
    shard_bytes=96 << 20,
    seed=3,
)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    lines = []
    out = write_checkpoint(tmp_path_factory.mktemp("synth") / "small", SMALL, log=lines.append)
    # without a terminal (CI, a log file) the progress is one line per shard, counting the bytes written so far
    shard_lines = [line for line in lines if " written (" in line]
    assert len(shard_lines) > 1 and shard_lines[0] != shard_lines[-1], lines
    total = f"{SMALL.total_bytes / 1e9:.2f}"
    assert shard_lines[-1].endswith(f"({total} of {total} GB)"), lines
    return out


@pytest.fixture(scope="module")
def int4_build(tmp_path_factory, small_checkpoint):
    """The int4 build, measured (the quantizer's temporaries: the higher peak), and its bundle. Float activations:
    a bundle with int8 ones (the ort form's default) runs its int8 kernels only on prepacked weights, so verify
    prepacks it, an O(model) heap copy by design (docs/precision.md), which the verify bound below does not cover."""
    out = tmp_path_factory.mktemp("int4") / "bundle"
    return measure(small_checkpoint, out, "int4", block_size=128, int4_compute="float"), out


def test_synth_checkpoint_is_what_transformers_expects(small_checkpoint):
    import torch
    from safetensors import safe_open
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    config = json.loads((small_checkpoint / "config.json").read_text())
    with torch.device("meta"):
        reference = Llama4ForCausalLM(Llama4TextConfig(**config))
    expected = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    index = json.loads((small_checkpoint / "model.safetensors.index.json").read_text())
    stored = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(small_checkpoint / shard), framework="pt") as handle:
            for name in handle.keys():
                assert index["weight_map"][name] == shard
                stored[name] = tuple(handle.get_slice(name).get_shape())
                assert handle.get_slice(name).get_dtype() == "BF16"
    assert stored == expected
    assert index["metadata"]["total_size"] == SMALL.total_bytes == sum(2 * math.prod(s) for s in stored.values())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    with safe_open(
        str(small_checkpoint / index["weight_map"]["model.layers.1.feed_forward.experts.gate_up_proj"]), framework="pt"
    ) as handle:
        experts = handle.get_tensor("model.layers.1.feed_forward.experts.gate_up_proj").float()
    assert abs(experts.std().item() - 0.02) < 1e-3 and abs(experts.mean().item()) < 1e-3
    # the default is the 4 GB Maverick shape: 48 layers, 128 experts every second layer
    assert SynthConfig().total_bytes >= 4e9
    assert SynthConfig().config_json()["interleave_moe_layer_step"] == 2


def test_synth_refuses_a_directory_it_did_not_write(tmp_path, capsys):
    mine = tmp_path / "ckpt"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["--out", str(mine)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not a synth checkpoint" in err[0]
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    with pytest.raises(SynthError):
        write_checkpoint(mine, SMALL)


def test_build_anonymous_memory_is_bounded_by_the_largest_layer(small_checkpoint, int4_build):
    layer = largest_layer_bytes(small_checkpoint)
    assert 49 << 20 <= layer <= 52 << 20  # the MoE layer: 64 x 3 x 256 x 256 fp32 plus attention
    result, bundle = int4_build
    assert result.peak_anon <= result.target_anon == 2 * layer + (512 << 20), result.summary()
    # the golden step runs the engine on the bundle's memory-mapped weights (no prepacked copies): O(layer) too
    assert result.peak_anon_by_stage["save"] > 0 and result.peak_anon_by_stage["golden"] > 0
    assert set(result.step_seconds) >= {"load", "trace", "link", "lower", "quantize", "save", "golden", "hash"}
    assert (bundle / "manifest.json").is_file()


def test_verify_anonymous_memory_is_bounded_by_the_largest_layer(small_checkpoint, int4_build):
    """verify's reference runs one decoder layer at a time (export/layerwise.py): the int4 simulation's copy of a
    layer and its fp32 original, plus the engine on memory-mapped weights. The whole-model reference it replaced
    held the model twice (simulation and fp32 original, 2 x 648 MiB) on top of the imports: 1683 MiB measured,
    against 528 MiB now (chunk 32, a loaded machine)."""
    result, bundle = int4_build
    measured = measure_verify(bundle, small_checkpoint)
    assert measured.exit_code == 0 and measured.output.strip().endswith("PASS"), measured.output
    assert "fake-quant simulation (int4)" in measured.output
    layer = largest_layer_bytes(small_checkpoint)
    assert measured.peak_anon <= measured.target_anon == 2 * layer + (512 << 20), measured.summary()
    # the bound is below one copy of the model's fp32 weights, which a whole-model reference needs twice here
    assert measured.target_anon < model_bytes(small_checkpoint) == measured.model_bytes
