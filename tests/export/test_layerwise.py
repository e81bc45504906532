"""export/layerwise.py: transformers' Llama4ForCausalLM run one decoder layer at a time gives the whole model's
logits, with a recipe's random weights drawn per layer, a checkpoint read per layer, and a quantization spec's
fake-quant simulation applied per layer."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from llama4_deploy.build.recipe import load_recipe
from llama4_deploy.export.layerwise import CheckpointWeights, Pass, RandomWeights, run_layer_by_layer
from llama4_deploy.export.reference import checkpoint_model, random_model, reference_logits

# x max|logit|: both sides are transformers' own modules running the same ops in the same order in fp32 on the
# same [1, T, H] tensors (one sequence at a time), so nothing but a change of summation order could separate them
# (observed: exactly equal)
TOLERANCE = 1e-5


def _ids(vocab: int, lengths=(37, 21, 44)) -> list[list[int]]:
    rng = np.random.default_rng(5)
    return [[int(t) for t in rng.integers(0, vocab, n)] for n in lengths]


def _assert_close(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.dtype == np.float32
        assert np.abs(g - e).max() <= TOLERANCE * np.abs(e).max()


def _random(recipe: str):
    r = load_recipe(recipe).random
    return (r.config, r.seed, r.logit_gain, r.router_gain)


@pytest.mark.parametrize("recipe", ["tiny", "maverick-mini"])
def test_random_weights_drawn_per_layer_are_the_whole_models_and_so_are_the_logits(recipe):
    import torch

    model = random_model(*_random(recipe))
    state = model.state_dict()
    global_rng = torch.get_rng_state()
    weights = RandomWeights(*_random(recipe))
    drawn = {"model.embed_tokens.weight": weights.embedding()}
    for index in range(weights.config.num_hidden_layers):
        drawn |= {f"model.layers.{index}.{name}": t for name, t in weights.layer(index).items()}
    drawn["model.norm.weight"], drawn["lm_head.weight"] = weights.head()
    assert torch.equal(torch.get_rng_state(), global_rng)  # the global generator is left alone
    assert drawn.keys() == state.keys()
    assert [name for name in state if not torch.equal(drawn[name], state[name])] == []  # bit for bit
    with pytest.raises(RuntimeError, match="in order"):
        RandomWeights(*_random(recipe)).layer(0)

    ids = _ids(model.config.vocab_size)
    got = run_layer_by_layer(RandomWeights(*_random(recipe)), [Pass(ids)])
    _assert_close(got[0], [reference_logits(model, sequence) for sequence in ids])


def test_checkpoint_read_per_layer_gives_the_whole_models_logits(checkpoint_dir):
    """The multimodal, sharded checkpoint (text model under `language_model.`), against from_pretrained's model."""
    model = checkpoint_model(checkpoint_dir)
    ids = _ids(model.config.vocab_size)
    got = run_layer_by_layer(CheckpointWeights(checkpoint_dir), [Pass(ids)])
    _assert_close(got[0], [reference_logits(model, sequence) for sequence in ids])


@pytest.mark.parametrize("precision", ["int4", "fp8"])
def test_simulation_applied_per_layer_is_the_whole_models(precision):
    """simulate(..., layers=[i]) on each materialized layer == simulate() on the whole model (int4 blocked weights;
    fp8 weights and calibrated per-tensor activations); a second pass over the same walk sees the fp32 weights."""
    import torch

    from llama4_deploy.export.observe import linear_inputs
    from llama4_deploy.export.simulate import simulate
    from llama4_deploy.graphs.quantize import QuantConfig, make_spec

    model = random_model(*_random("tiny"))
    spec = make_spec(QuantConfig(precision=precision, block_size=32))
    ids = _ids(model.config.vocab_size)
    amax: dict[str, float] = {}

    def record(name, x):
        amax[name] = max(amax.get(name, 0.0), float(x.detach().abs().max()))
        return x

    handles = linear_inputs(model, weights_shape(model), record)
    with torch.no_grad():
        for sequence in ids:
            model(input_ids=torch.tensor([sequence]), use_cache=False)
    for handle in handles:
        handle.remove()
    model = random_model(*_random("tiny"))  # without the recording forwards
    simulated = simulate(copy.deepcopy(model), spec, amax if spec.activations else None)
    expected = [reference_logits(simulated, sequence) for sequence in ids]
    fp32 = reference_logits(model, ids[0])

    def prepare(skeleton, index):
        simulate(skeleton, spec, amax if spec.activations else None, layers=[index])

    got = run_layer_by_layer(RandomWeights(*_random("tiny")), [Pass(ids, prepare), Pass(ids[:1])])
    _assert_close(got[0], expected)
    _assert_close(got[1], [fp32])
    # the simulation moves the logits by far more than the tolerance, so the comparison above means something
    assert np.abs(expected[0] - fp32).max() > 100 * TOLERANCE * np.abs(fp32).max()


def weights_shape(model):
    from llama4_deploy.export.shape import ModelShape

    return ModelShape.from_config(model.config.to_dict())
