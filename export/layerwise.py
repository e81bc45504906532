"""transformers' Llama4ForCausalLM run one decoder layer at a time: the same numbers as the whole model, in
O(one layer) of weights.

    weights = CheckpointWeights(checkpoint_dir)     # or RandomWeights(config, seed, logit_gain, router_gain)
    logits = run_layer_by_layer(weights, [Pass(ids), Pass(ids, prepare=fake_quant)])   # [pass][sequence] -> [T, V]

The model is created on the meta device (no memory). One forward per sequence with every decoder layer stubbed
out records each layer's call arguments (the attention mask of its kind, RoPE's cos/sin, positions) and the
embedding output; then each decoder layer in turn is materialized (`weights.layer(i)`, fp32), placed in the
skeleton, run on every sequence's hidden states, and dropped. Between layers only the hidden states ([1, T, H]
per sequence) and the recorded masks live. Last, the final norm and lm_head give the logits. transformers'
own modules do every operation, in the order its whole-model forward does, in fp32: the logits are the whole
model's (tests/export/test_layerwise.py checks it).

A `Pass` is one set of sequences through the layers, with an optional `prepare(model, index)` that transforms
layer `index` once it is in the skeleton (calibration hooks, the fake-quant simulation of a spec); each pass
that changes it gets it to itself, so one read of the weights serves, say, a simulation and its fp32 original.

Weights: `CheckpointWeights` reads one layer's tensors from the memory-mapped safetensors shards (a
pre-quantized checkpoint's FP8 dequantized, as export/reference.py's whole model holds them); `RandomWeights`
draws a recipe's seeded random model layer by layer with the very draws `reference.random_model` makes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Llama4ForCausalLM, Llama4TextConfig, initialization
from transformers.models.llama4.modeling_llama4 import (
    Llama4TextDecoderLayer,
    Llama4TextRMSNorm,
    Llama4TextRotaryEmbedding,
)

from llama4_deploy.export.checkpoint import Checkpoint
from llama4_deploy.export.shape import ModelShape
from llama4_deploy.export.weights import embed_weights, head_weights


def text_config(config: dict[str, Any]):
    """Llama4TextConfig (eager attention) of a checkpoint's config.json or a recipe's random config."""
    text = dict(config.get("text_config", config) if config.get("model_type") == "llama4" else config)
    text.pop("quantization_config", None)
    cfg = Llama4TextConfig.from_dict(text)
    cfg._attn_implementation = "eager"
    return cfg


def skeleton(config):
    """Llama4ForCausalLM on the meta device: every module, no memory, no random draws."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return Llama4ForCausalLM(config).eval()


def meta_layer(config, index: int):
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return Llama4TextDecoderLayer(config, index)


class CheckpointWeights:
    """A checkpoint's weights in fp32, one piece at a time, from its memory-mapped shards."""

    def __init__(self, path: str | Path):
        self.checkpoint = Checkpoint(path)
        self.shape = self.checkpoint.shape
        self.config = text_config(self.checkpoint.config)

    def _fp32(self, name: str):
        return self.checkpoint.tensor(name).to(torch.float32)

    def embedding(self):
        return self._fp32(embed_weights(self.shape)["embed"].checkpoint_name)

    def layer(self, index: int) -> dict[str, Any]:
        names = meta_layer(self.config, index).state_dict()
        return {name: self._fp32(f"model.layers.{index}.{name}") for name in names}

    def head(self):
        """(final norm weight, lm_head weight); a tied checkpoint's lm_head is its embedding (export/weights.py)."""
        sources = head_weights(self.shape)
        return self._fp32(sources["final_norm"].checkpoint_name), self._fp32(sources["lm_head"].checkpoint_name)


class RandomWeights:
    """`reference.random_model(config, seed, logit_gain, router_gain)`'s weights, drawn layer by layer.

    The whole model draws, from the global generator seeded with `seed`: first the module constructors' default
    inits (nn.Embedding, then each decoder layer's nn.Linear layers, in Llama4TextModel.__init__'s order), then
    Llama4TextModel.post_init's `_init_weights` over its modules in post-order (embedding, layer 0, ...,
    final norm), then lm_head's constructor and Llama4ForCausalLM.post_init's init of lm_head. The first phase's
    values are all overwritten by the second, but its draws move the generator: they are made here too (each
    layer constructed and dropped), then the second phase runs one module at a time as the layers are asked for,
    with transformers' own `_initialize_weights`. So pieces must be taken in order: embedding, layers 0..L-1,
    head. The generator's state is kept here, the global one is left as it was.
    """

    def __init__(self, config: dict[str, Any], seed: int, logit_gain: float = 1.0, router_gain: float = 1.0):
        self.config = text_config(config)
        self.shape = ModelShape.from_config(self.config.to_dict())
        self.logit_gain, self.router_gain = logit_gain, router_gain
        self._model = skeleton(self.config)  # supplies `_initialize_weights` and the config it reads
        self._next = "embedding"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            c = self.config
            torch.nn.Embedding(c.vocab_size, c.hidden_size, c.pad_token_id)  # constructor draws only
            for index in range(c.num_hidden_layers):
                Llama4TextDecoderLayer(c, index)
            self._state = torch.get_rng_state()

    def _initialized(self, module):
        """`module` (built on meta) materialized and initialized as PreTrainedModel.initialize_weights does:
        children first (post-order), with the generator where the previous piece left it."""
        module = module.to_empty(device="cpu")

        def post_order(m) -> Iterator:
            for child in m.children():
                yield from post_order(child)
            yield m

        with torch.random.fork_rng(devices=[]), torch.no_grad(), initialization.guard_torch_init_functions():
            torch.set_rng_state(self._state)
            for sub in post_order(module):
                self._model._initialize_weights(sub)
            self._state = torch.get_rng_state()
        return module

    def _take(self, piece, following):
        if self._next != piece:
            raise RuntimeError(f"RandomWeights draws in order: {self._next} is next, not {piece}")
        self._next = following

    def embedding(self):
        self._take("embedding", 0)
        c = self.config
        with torch.device("meta"):
            embed = torch.nn.Embedding(c.vocab_size, c.hidden_size, c.pad_token_id)
        return self._initialized(embed).weight.detach()

    def layer(self, index: int) -> dict[str, Any]:
        self._take(index, index + 1 if index + 1 < self.config.num_hidden_layers else "head")
        layer = self._initialized(meta_layer(self.config, index))
        router = getattr(layer.feed_forward, "router", None)
        if router is not None:
            router.weight.detach().mul_(self.router_gain)
        return {name: t.detach() for name, t in layer.state_dict().items()}

    def head(self):
        self._take("head", None)
        c = self.config
        with torch.device("meta"):
            norm = Llama4TextRMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        norm = self._initialized(norm)
        if c.tie_word_embeddings:
            raise NotImplementedError("random weights with tied embeddings are not drawn layer by layer")
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._state)
            lm_head = torch.nn.Linear(c.hidden_size, c.vocab_size, bias=False)  # the constructor's draws
            self._state = torch.get_rng_state()
        lm_head.to("meta")
        lm_head = self._initialized(lm_head)
        return norm.weight.detach(), lm_head.weight.detach().mul_(self.logit_gain)


@dataclasses.dataclass
class Pass:
    """Sequences through the layers; `prepare(model, index)` transforms layer `index` once it sits in the skeleton
    `model` and returns hook handles to remove after the layer ran (or None)."""

    ids: list[list[int]]
    prepare: Callable[[Any, int], list | None] | None = None


def run_layer_by_layer(
    weights,
    passes: list[Pass],
    logits: bool = True,
    after_layer: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[list[np.ndarray]] | None:
    """Every pass's sequences through the decoder one layer at a time; with `logits`, the logits [T, vocab] of
    every sequence of every pass (float32 numpy, as reference.reference_logits gives them). `after_layer(index)`
    runs once a layer has seen every sequence. Memory: one layer's weights (and a copy for each prepared pass but
    the last), the hidden states and the recorded masks."""
    config = weights.config
    model = skeleton(config)
    decoder = model.model
    decoder.embed_tokens = torch.nn.Embedding.from_pretrained(weights.embedding(), freeze=True)
    decoder.rotary_emb = Llama4TextRotaryEmbedding(config=config)
    empty_layers = list(decoder.layers)
    calls: list[list[list[dict]]] = [[[] for _ in empty_layers] for _ in passes]
    hidden: list[list] = [[] for _ in passes]

    def stub(p, index):
        def forward(hidden_states, **kwargs):
            calls[p][index].append(kwargs)
            if index == 0:
                hidden[p].append(hidden_states)
            return hidden_states

        return forward

    decoder.norm = torch.nn.Identity()  # applied with the head below
    with torch.no_grad():
        for p, run in enumerate(passes):
            for index, layer in enumerate(empty_layers):
                layer.forward = stub(p, index)
            for sequence in run.ids:
                decoder(input_ids=torch.tensor([sequence]), use_cache=False)
    for layer in empty_layers:
        del layer.forward
    decoder.embed_tokens = None  # the embedding is not needed again
    # passes that leave the weights as they are go first; the last prepared pass takes the layer as read and may
    # change it in place, earlier prepared passes (if any) get copies: one layer's weights in memory, not two
    order = sorted(range(len(passes)), key=lambda p: passes[p].prepare is not None)
    for index in range(len(empty_layers)):
        state = weights.layer(index)
        for p in order:
            run = passes[p]
            copy = run.prepare is not None and p != order[-1]
            layer = meta_layer(config, index)
            layer.load_state_dict({k: v.clone() if copy else v for k, v in state.items()}, assign=True)
            decoder.layers[index] = layer.eval()
            handles = run.prepare(model, index) if run.prepare is not None else None
            with torch.no_grad():
                hidden[p] = [layer(h, **kwargs) for h, kwargs in zip(hidden[p], calls[p][index])]
            for handle in handles or ():
                handle.remove()
            decoder.layers[index] = empty_layers[index]  # back to the empty meta layer: this copy is freed
            del layer
        del state
        for p in range(len(passes)):
            calls[p][index] = []  # this layer's masks and RoPE tables are not needed again
        if after_layer is not None:
            after_layer(index)
        if log is not None:
            log(f"layer {index + 1}/{len(empty_layers)}")
    if not logits:
        return None
    norm_weight, head_weight = weights.head()
    norm = Llama4TextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    norm.weight = torch.nn.Parameter(norm_weight, requires_grad=False)
    lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False, device="meta")
    lm_head.weight = torch.nn.Parameter(head_weight, requires_grad=False)
    with torch.no_grad():
        return [[lm_head(norm(h))[0].float().numpy() for h in hidden[p]] for p in range(len(passes))]
