"""The passkey model's training code (tools/train_passkey.py): its documents are the needle sweep's prompts with
their answers, and a few training steps run on a small model (the shipped run is `make train-passkey`)."""

from __future__ import annotations

import math
import re

import numpy as np
from tokenizers import Tokenizer

from llama4_deploy.quality.needle import INTRO, KEY_DIGITS, NEEDLE, QUESTION, Prompts
from llama4_deploy.runtime.tokenizer import Tokenizer as RuntimeTokenizer
from tools.train import CHECKPOINT_DIR, HELD_OUT_SAMPLE, MODEL_CONFIG, build_model
from tools.train_passkey import PasskeySettings, passkey_document, train


def _tokenizer():
    return Tokenizer.from_file(str(CHECKPOINT_DIR / "tokenizer.json"))


def _encode(tokenizer):
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids


def test_passkey_document_is_the_needle_prompt_followed_by_its_answer():
    tokenizer = _tokenizer()
    encode = _encode(tokenizer)
    filler = np.array(encode(HELD_OUT_SAMPLE.read_text()), dtype=np.int64)
    rng = np.random.default_rng(0)
    keys = set()
    for _ in range(20):
        ids, answer = passkey_document(encode, filler, 257, rng)
        assert len(ids) == 257 and answer == list(range(257 - len(answer), 257))
        key = tokenizer.decode([ids[p] for p in answer]).strip()
        assert re.fullmatch(rf"\d{{{KEY_DIGITS}}}", key)
        keys.add(key)
        text = tokenizer.decode(ids)
        assert text.startswith(INTRO) and text.endswith(QUESTION + " " + key)
        assert NEEDLE.format(key=key) in text
        # the prompt part is laid out as eval --needle lays out its prompts: intro, filler with the needle, question
        prompt = ids[: answer[0]]
        needle = encode(NEEDLE.format(key=key))
        at = next(i for i in range(len(prompt)) if prompt[i : i + len(needle)] == needle)
        prompts = Prompts(RuntimeTokenizer(CHECKPOINT_DIR / "tokenizer.json"), "x " * 100)
        assert prompt[: len(prompts.intro)] == prompts.intro and prompt[-len(prompts.question) :] == prompts.question
        assert len(prompts.intro) <= at <= len(prompt) - len(prompts.question) - len(needle)
    assert len(keys) == 20


def test_a_few_training_steps_run_and_change_the_weights():
    import torch

    tokenizer = _tokenizer()
    config = dict(MODEL_CONFIG, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, head_dim=16)
    model = build_model(config, seed=0)
    model.config._attn_implementation = "sdpa"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    filler = np.array(_encode(tokenizer)(HELD_OUT_SAMPLE.read_text()), dtype=np.int64)
    settings = PasskeySettings(steps=3, batch=4, seq_len=160, warmup=1, threads=1)
    result = train(model, tokenizer, filler, settings, log=lambda _: None)
    history = result["history"]
    assert history["step"] == [3]
    assert all(math.isfinite(x) for x in history["loss"] + history["answer_loss"])
    assert 0.0 <= history["answer_accuracy"][0] <= 1.0
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "lm_head.weight" in changed and any(".experts." in n for n in changed), changed
