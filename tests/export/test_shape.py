"""ModelShape reads every size from config.json, and derives layer kinds and RoPE as transformers does."""

from __future__ import annotations

import numpy as np
import pytest

from llama4_deploy.build.recipe import load_recipe
from llama4_deploy.export.shape import ConfigError, LayerKind, ModelShape

# the published config.json of Scout's and Maverick's text models, as their recipes hold them
SCOUT = load_recipe("scout").published_config
MAVERICK = load_recipe("maverick").published_config


def test_scout_layer_kinds():
    shape = ModelShape.from_config(SCOUT)
    assert shape.moe_layers == tuple(range(48))
    assert [i for i, rope in enumerate(shape.rope_layers) if not rope] == list(range(3, 48, 4))
    assert set(shape.layer_kinds) == {LayerKind(True, True), LayerKind(False, True)}


def test_maverick_layer_kinds():
    shape = ModelShape.from_config(MAVERICK)
    assert shape.moe_layers == tuple(range(1, 48, 2))
    assert len(set(shape.layer_kinds)) == 3  # NoPE layers (3, 7, ...) are all odd, hence MoE
    assert not shape.use_qk_norm and shape.rope_scaling is None


def test_multimodal_config_uses_text_config():
    shape = ModelShape.from_config({"model_type": "llama4", "text_config": dict(SCOUT, attention_chunk_size=4096)})
    assert shape.attention_chunk_size == 4096  # read from the config, never assumed to be 8192


@pytest.mark.parametrize("config", [SCOUT, MAVERICK], ids=["llama3", "default"])
def test_rope_frequencies_match_transformers(config):
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextRotaryEmbedding

    hf_config = Llama4TextConfig(**{k: v for k, v in config.items() if k != "model_type"})
    expected = Llama4TextRotaryEmbedding(hf_config).inv_freq.numpy()
    got = np.asarray(ModelShape.from_config(config).rope_inv_freq(), dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=2e-7)  # float64 vs float32 arithmetic: about one ulp


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "model_type 'llama'"),
        ({"attention_chunk_size": None}, "attention_chunk_size null"),
        ({"num_key_value_heads": 7}, "not a multiple"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, "rope_type 'yarn' is not supported"),
    ],
)
def test_rejects(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelShape.from_config(dict(SCOUT, **change))
