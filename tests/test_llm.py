"""The text-in Python API (`llama4_deploy.LLM`): the server's sampling and text rules without a socket, checked
against `Engine.generate` on the same bundle."""

from __future__ import annotations

import pytest

pytest.importorskip("jinja2", reason="the serve extra is not installed")

import llama4_deploy  # noqa: E402
from llama4_deploy import LLM, SamplingParams  # noqa: E402
from tests.conftest import ranked_samples  # noqa: E402


@pytest.fixture(scope="module")
def llm(checkpoint_bundle):
    with LLM(checkpoint_bundle) as llm:
        yield llm


def test_generate_text_prompts_equal_the_engine(llm):
    tokenizer, engine = llm.tokenizer, llm.engine
    prompts = ["w5 w6 w7", "w9 w10"]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs):
        ids = tokenizer.encode(prompt)
        expected = engine.generate([ids], 5, stop_tokens=[]).tokens[0]
        assert out.prompt == prompt and out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == expected and out.outputs[0].text == tokenizer.decode(expected)
        assert out.outputs[0].finish_reason == "length"
    sampled = llm.generate(
        [[9, 8, 7]], SamplingParams(max_tokens=6, temperature=0.8, top_k=20, seed=2, n=2, ignore_eos=True)
    )
    for j, out in enumerate(sampled[0].outputs):
        expected = engine.generate([[9, 8, 7]], 6, temperature=0.8, top_k=20, seed=2 + j, stop_tokens=[]).tokens[0]
        assert out.index == j and out.token_ids == expected


def test_best_of_returns_the_n_most_likely_samples(llm):
    ranked = ranked_samples(llm.engine, [4, 9, 16, 25, 36], 4, 6, 30, temperature=1.0)
    assert sorted(j for _, j, _ in ranked[:2]) != [0, 1]  # the ranking decides, not the sample order
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=30, n=2, best_of=4, ignore_eos=True)
    outputs = llm.generate([[4, 9, 16, 25, 36]], params)[0].outputs
    assert [(o.index, o.token_ids) for o in outputs] == [(j, tokens) for _, j, tokens in ranked[:2]]
    # 1e-5: the scheduler's steps hold other rows than generate's, so the fp32 logits differ in their last bits
    assert [o.cumulative_logprob for o in outputs] == pytest.approx([score for score, _, _ in ranked[:2]], abs=1e-5)
    with pytest.raises(ValueError, match="best_of is 1, less than n 2"):
        llm.generate("w1", SamplingParams(n=2, best_of=1))


def test_stop_strings_and_chat(llm):
    tokenizer, engine = llm.tokenizer, llm.engine
    full = tokenizer.decode(engine.generate([tokenizer.encode("w5 w6 w7")], 8, stop_tokens=[]).tokens[0])
    stop = full.split()[2]
    out = llm.generate("w5 w6 w7", SamplingParams(max_tokens=8, temperature=0, stop=[stop], ignore_eos=True))[0]
    assert out.outputs[0].text == full[: full.index(stop)] and out.outputs[0].finish_reason == "stop"
    messages = [{"role": "user", "content": "w10 w11"}]
    reply = llm.chat(messages, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    rendered = llm.chat_template.render(messages)
    expected = engine.generate([tokenizer.encode(rendered, add_special_tokens=False)], 4, stop_tokens=[]).tokens[0]
    assert reply.outputs[0].token_ids == expected


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda llm: llm.generate("w1", SamplingParams(max_tokens="4")), TypeError, "max_tokens must be an integer"),
        (lambda llm: llm.generate("w1", SamplingParams(top_k=-5)), ValueError, "top_k is -5"),
        (lambda llm: llm.generate("w1", SamplingParams(temperature=float("nan"))), ValueError, "temperature is nan"),
        (lambda llm: llm.generate("a \ud800", SamplingParams()), ValueError, "prompt 0 is not valid Unicode text"),
        (lambda llm: llm.generate([[1, True]], SamplingParams()), TypeError, "token id True"),
        (lambda llm: llm.generate("w1", SamplingParams(seed=-1)), ValueError, "seed is -1"),
    ],
)
def test_bad_parameters_are_one_sentence(llm, call, error, message):
    with pytest.raises(error, match=message):
        call(llm)


def test_the_root_package_stays_light():
    assert "LLM" in llama4_deploy.__all__
    with pytest.raises(AttributeError):
        llama4_deploy.NoSuchThing  # noqa: B018
