"""A client we did not write: lm-evaluation-harness against the server, on a task whose data this test writes.

`local-completions` scores each choice by loglikelihood (echo + logprobs: the prompt tokens' log-probabilities
the server reports) and generates with `until`; `local-chat-completions` generates through the chat template.
The loglikelihoods are checked against `engine.score` on the same tokens.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
lm_eval = pytest.importorskip("lm_eval", reason="the test extra (lm-eval) is not installed")

from llama4_deploy.runtime import load  # noqa: E402
from llama4_deploy.runtime.tokenizer import load_tokenizer  # noqa: E402
from tests.test_serve import Live  # noqa: E402

DOCS = [
    {"question": "w5 w6 w7", "choices": ["w8", "w9 w10", "w11"], "answer": 0, "id": 0},
    {"question": "w20 w21", "choices": ["w22 w23", "w24"], "answer": 1, "id": 1},
]


def write_task(root, name: str, output_type: str) -> None:
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    lines = [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {data}",
        "test_split: test",
        f"output_type: {output_type}",
        "doc_to_text: '{{question}}'",
    ]
    if output_type == "multiple_choice":
        lines += ["doc_to_choice: '{{choices}}'", "doc_to_target: '{{answer}}'", "metric_list:", "  - metric: acc"]
    else:
        lines += [
            "doc_to_target: '{{choices[0]}}'",
            "generation_kwargs:",
            "  until: ['w0']",
            "  max_gen_toks: 4",
            "  do_sample: false",
            "metric_list:",
            "  - metric: exact_match",
        ]
    (root / f"{name}.yaml").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def served(checkpoint_bundle):
    with load(checkpoint_bundle) as engine, Live(engine) as live:
        yield live, engine


def evaluate(live, engine, bundle, tmp_path, model: str, task: str, **extra):
    from lm_eval.tasks import TaskManager

    endpoint = "chat/completions" if model == "local-chat-completions" else "completions"
    args = {
        "model": engine.manifest.name,
        "base_url": f"{live.url}/v1/{endpoint}",
        # local-completions finds the server's /tokenizer_info and /tokenize and uses the bundle's own tokenizer
        "num_concurrent": 1,
        "max_retries": 1,
    }
    return lm_eval.simple_evaluate(
        model=model,
        model_args={k: v for k, v in args.items() if v is not None},
        tasks=[task],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
        **extra,
    )


def test_lm_eval_loglikelihood_equals_engine_score(served, checkpoint_bundle, tmp_path):
    live, engine = served
    write_task(tmp_path, "l4d_choice", "multiple_choice")
    results = evaluate(live, engine, checkpoint_bundle, tmp_path, "local-completions", "l4d_choice")
    tokenizer = load_tokenizer(engine.manifest)
    samples = results["samples"]["l4d_choice"]
    assert len(samples) == sum(len(d["choices"]) for d in DOCS) or len(samples) == len(DOCS)
    checked = 0
    for sample in samples:
        doc = sample["doc"]
        for choice, response in zip(doc["choices"], sample["resps"]):
            loglikelihood = response[0][0]
            context = tokenizer.encode(doc["question"], add_special_tokens=False)
            continuation = tokenizer.encode(" " + choice, add_special_tokens=False)
            ids = context + continuation
            logits = engine.score(ids).astype(np.float64)
            logprobs = (
                logits
                - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
                - logits.max(-1, keepdims=True)
            )
            expected = sum(logprobs[j - 1, ids[j]] for j in range(len(context), len(ids)))
            assert abs(loglikelihood - expected) < 1e-4, (doc, choice)  # float64 sums of the same float32 logits
            checked += 1
    assert checked == sum(len(d["choices"]) for d in DOCS)
    assert "acc,none" in results["results"]["l4d_choice"]


def test_lm_eval_generate_until_on_completions_and_chat(served, checkpoint_bundle, tmp_path):
    live, engine = served
    write_task(tmp_path, "l4d_gen", "generate_until")
    tokenizer = load_tokenizer(engine.manifest)
    done = evaluate(live, engine, checkpoint_bundle, tmp_path, "local-completions", "l4d_gen")
    for sample in done["samples"]["l4d_gen"]:
        ids = tokenizer.encode(sample["doc"]["question"], add_special_tokens=False)
        expected = engine.generate([ids], 4, stop_tokens=list(engine.manifest.eos_token_ids)).tokens[0]
        text = tokenizer.decode([t for t in expected if t not in engine.manifest.eos_token_ids])
        assert sample["resps"][0][0] == text.split("w0")[0]
    chat = evaluate(
        live, engine, checkpoint_bundle, tmp_path, "local-chat-completions", "l4d_gen", apply_chat_template=True
    )
    assert len(chat["samples"]["l4d_gen"]) == len(DOCS) and all(
        isinstance(s["resps"][0][0], str) for s in chat["samples"]["l4d_gen"]
    )
