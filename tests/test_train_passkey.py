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
from tools.train_passkey import PROBE_LENGTHS, PasskeySettings, passkey_row, shortest_document, train


def _tokenizer():
    return Tokenizer.from_file(str(CHECKPOINT_DIR / "tokenizer.json"))


def _encode(tokenizer):
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids


def test_passkey_rows_hold_the_needle_prompt_followed_by_its_answer():
    tokenizer = _tokenizer()
    encode = _encode(tokenizer)
    filler = np.array(encode(HELD_OUT_SAMPLE.read_text()), dtype=np.int64)
    eos = tokenizer.token_to_id("<|end_of_text|>")
    shortest = shortest_document(encode)
    prompts = Prompts(RuntimeTokenizer(CHECKPOINT_DIR / "tokenizer.json"), "x " * 100)
    rng = np.random.default_rng(0)
    keys, prompt_lengths = set(), []
    for _ in range(40):
        ids, answer = passkey_row(encode, filler, 257, shortest, eos, rng, chunk=64)
        assert len(ids) == 257 and answer == list(range(answer[0], answer[0] + len(answer)))
        key = tokenizer.decode([ids[p] for p in answer[:-1]]).strip()
        assert re.fullmatch(rf"\d{{{KEY_DIGITS}}}", key) and tokenizer.decode([ids[answer[-1]]]) == "."
        keys.add(key)
        document, rest = ids[: answer[-1] + 1], ids[answer[-1] + 1 :]
        text = tokenizer.decode(document)
        assert text.startswith(INTRO) and text.endswith(QUESTION + " " + key + ".")
        assert NEEDLE.format(key=key) in text
        assert rest == [] or rest[0] == eos  # documentation after the document, never part of its answer
        # the prompt part is laid out as eval --needle lays out its prompts: intro, filler with the needle, question
        prompt = ids[: answer[0]]
        prompt_lengths.append(len(prompt))
        needle = encode(NEEDLE.format(key=key))
        at = next(i for i in range(len(prompt)) if prompt[i : i + len(needle)] == needle)
        assert prompt[: len(prompts.intro)] == prompts.intro and prompt[-len(prompts.question) :] == prompts.question
        assert len(prompts.intro) <= at <= len(prompt) - len(prompts.question) - len(needle)
        assert len(document) >= shortest - 4  # shortest_document bounds every document from below
    assert len(keys) == 40
    # half the prompts are whole chunks (eval --needle's lengths), the others spread over the row
    aligned = [n for n in prompt_lengths if n % 64 == 0]
    assert 10 <= len(aligned) <= 30 and set(aligned) <= {128, 192}
    assert len(set(prompt_lengths) - set(aligned)) >= 10


def test_a_few_training_steps_run_and_change_the_weights():
    import torch

    tokenizer = _tokenizer()
    config = dict(MODEL_CONFIG, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, head_dim=16)
    model = build_model(config, seed=0)
    model.config._attn_implementation = "sdpa"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    filler = np.array(_encode(tokenizer)(HELD_OUT_SAMPLE.read_text()), dtype=np.int64)
    settings = PasskeySettings(stages=((2, 100, 4), (1, 160, 3)), warmup=1, threads=1)
    # the greedy probe runs at the last step, on prompts eval --needle's code lays out through the runtime's tokenizer
    result = train(model, tokenizer, filler, settings, log=lambda _: None, probe_text=HELD_OUT_SAMPLE.read_text())
    history = result["history"]
    assert history["probe_step"] == [3] and list(history["probe"][0]) == [str(n) for n in PROBE_LENGTHS]
    assert all(v in {i / 16 for i in range(17)} for v in history["probe"][0].values())  # 16 prompts per length
    assert history["step"] == [3] and history["seq_len"] == [160] and result["tokens"] == 2 * 100 * 4 + 160 * 3
    assert all(math.isfinite(x) for x in history["loss"] + history["answer_loss"])
    assert 0.0 <= history["answer_accuracy"][0] <= 1.0
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "lm_head.weight" in changed and any(".experts." in n for n in changed), changed
