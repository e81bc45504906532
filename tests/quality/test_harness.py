"""lm-evaluation-harness on a bundle (llama4_deploy/quality/harness.py): tasks the test writes (YAML over a local
jsonl), every number lm-eval reports recomputed from the engine's own single-row paths."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from llama4_deploy.quality.harness import BundleLM, continuation_logprob, cut_at_stop
from tools.train import CHECKPOINT_DIR

# Each loglikelihood row is computed in a ragged batch of up to max_batch rows (harness) and checked against
# Engine.score on that row alone: the same fp32 graph, padded rows never touch valid ones, so only the order in
# which ONNX Runtime sums a batch may differ; a log-probability summed over a few tokens moves by ~1e-6 from that
LOGPROB_ABS_TOLERANCE = 1e-4


def _sentences(count: int) -> list[str]:
    """Distinct prose sentences of the held-out sample (documentation the model did not train on), 8-25 words of
    letters, commas and apostrophes only (no markup)."""
    text = " ".join((CHECKPOINT_DIR / "held-out-sample.txt").read_text().split())
    found = [s.strip() + "." for s in re.split(r"\.\s", text)]
    found = [s for s in found if re.fullmatch(r"[A-Za-z ,']+\.", s) and 8 <= len(s.split()) <= 25]
    return list(dict.fromkeys(found))[:count]


def write_tasks(folder) -> None:
    """A multiple-choice task (which four words follow a sentence's first half: its own or another's) and a
    generate_until task (continue the sentence, stop at a full stop)."""
    sentences = _sentences(12)
    rows = []
    for i, sentence in enumerate(sentences[:8]):
        words = sentence.split()
        head = " ".join(words[: len(words) // 2])
        others = [sentences[(i + k) % len(sentences)].split() for k in (3, 5, 7)]
        # four words each, so no choice wins by being short (acc sums log-probabilities)
        choices = [" " + " ".join(words[len(words) // 2 :][:4])] + [
            " " + " ".join(o[len(o) // 2 :][:4]) for o in others
        ]
        label = i % 4  # the true one moves so a model that always picks the first choice gets 25%
        choices[0], choices[label] = choices[label], choices[0]
        rows.append({"context": head, "choices": choices, "label": label})
    (folder / "choice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = [{"prompt": " ".join(s.split()[:6]), "answer": " ".join(s.split()[6:])} for s in sentences[:4]]
    (folder / "generate.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    (folder / "l4d_choice.yaml").write_text(f"""task: l4d_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "choice.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (folder / "l4d_generate.yaml").write_text(f"""task: l4d_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "generate.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
generation_kwargs:
  until: ["."]
  max_gen_toks: 24
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, monkeypatch_module):
    folder = tmp_path_factory.mktemp("tasks")
    write_tasks(folder)
    return folder


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def results(trained_bundle, tasks, tmp_path_factory, monkeypatch_module):
    from llama4_deploy.quality.harness import run_tasks

    # datasets' cache goes to a temporary folder, not the user's home; nothing is fetched
    monkeypatch_module.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets-cache")))
    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")
    return run_tasks(trained_bundle, ["l4d_choice", "l4d_generate"], include_path=tasks, threads=2)


def _score_alone(engine, context_ids, continuation_ids) -> tuple[float, bool]:
    logits = engine.score(context_ids + continuation_ids, mode="prefill")  # [T, V], one row, nothing else batched
    return continuation_logprob(logits[len(context_ids) - 1 : -1], continuation_ids)


def test_multiple_choice_loglikelihoods_equal_engine_score(results, trained_engine):
    lm = BundleLM(trained_engine)
    samples = results["samples"]["l4d_choice"]
    assert len(samples) == 8
    correct = 0
    for sample in samples:
        scored = []
        for (context, continuation), response in zip(sample["arguments"], sample["resps"]):
            context_ids, continuation_ids = lm._encode_pair(context, continuation)
            logprob, greedy = _score_alone(trained_engine, context_ids, continuation_ids)
            got_logprob, got_greedy = response[0]
            assert abs(got_logprob - logprob) <= LOGPROB_ABS_TOLERANCE, (context, continuation, got_logprob, logprob)
            assert got_greedy == greedy
            scored.append(logprob)
        correct += int(np.argmax(scored) == sample["target"])
    assert results["results"]["l4d_choice"]["acc,none"] == pytest.approx(correct / len(samples))
    # the model read documentation: it tells a sentence's own ending from another's better than chance (25%)
    assert correct / len(samples) >= 0.5, correct


def test_generate_until_equals_greedy_generate_cut_at_the_stop_string(results, trained_engine):
    samples = results["samples"]["l4d_generate"]
    assert len(samples) == 4
    matches = 0
    for sample in samples:
        context, gen_kwargs = sample["arguments"][0]
        assert gen_kwargs["until"] == ["."] and gen_kwargs["max_gen_toks"] == 24
        ids = BundleLM(trained_engine).tok_encode(context)
        tokens = trained_engine.generate([ids], 24, temperature=0.0).tokens[0]
        tokens = [t for t in tokens if t not in trained_engine.manifest.eos_token_ids]
        expected = cut_at_stop(trained_engine_decode(trained_engine, tokens), ["."])
        assert sample["resps"][0][0] == expected
        assert "." not in expected
        matches += int(expected.strip() == sample["target"].strip())
    assert results["results"]["l4d_generate"]["exact_match,none"] == pytest.approx(matches / len(samples))


def trained_engine_decode(engine, tokens):
    from llama4_deploy.runtime.tokenizer import load_tokenizer

    return load_tokenizer(engine.manifest).decode(tokens)


class _Instance:
    def __init__(self, *args):
        self.args = args


def test_loglikelihood_rolling_scores_every_token_in_context_windows(trained_engine):
    lm = BundleLM(trained_engine)
    text = (CHECKPOINT_DIR / "held-out-sample.txt").read_text()[:3000]
    ids = lm.tok_encode(text)
    window = trained_engine.manifest.max_context
    assert len(ids) > 2 * window  # three windows, the last partial
    expected = 0.0
    # each window from a fresh cache: full windows conditioned on the token before them (the first on the
    # begin-of-text token), then one full window ending at the text's end that predicts only the tokens left
    full = (len(ids) // window) * window
    for start in range(0, full, window):
        before = [lm.prefix_token_id] if start == 0 else [ids[start - 1]]
        predicted = ids[start : start + window]
        logits = trained_engine.score(before + predicted[:-1], mode="prefill")
        expected += continuation_logprob(logits, predicted)[0]
    if full < len(ids):
        left = len(ids) - full
        logits = trained_engine.score(ids[-window - 1 : -1], mode="prefill")
        expected += continuation_logprob(logits[-left:], ids[-left:])[0]
    (got,) = lm.loglikelihood_rolling([_Instance(text)], disable_tqdm=True)
    assert got == pytest.approx(expected, abs=LOGPROB_ABS_TOLERANCE * 3)


def test_generation_arguments_the_sampler_cannot_honour_are_refused(trained_engine):
    lm = BundleLM(trained_engine)
    with pytest.raises(ValueError, match=r"\['top_k'\] cannot be honoured"):
        lm.generate_until([_Instance("The list of", {"until": ["."], "top_k": 5})], disable_tqdm=True)
    with pytest.raises(ValueError, match="max_gen_toks is 256"):
        lm.generate_until([_Instance("The list of", {"max_gen_toks": 256})], disable_tqdm=True)


def test_eval_cli_runs_a_local_task_and_prints_lm_evals_table(trained_bundle, tasks, results):
    from tests.test_cli import invoke, user_error

    result = invoke("eval", trained_bundle, "--tasks", "l4d_choice", "--include-path", tasks, "--limit", "2")
    assert result.exit_code == 0, result.output
    assert re.search(r"\|\s*l4d_choice\s*\|.*\|\s*acc\s*\|", result.stdout), result.stdout
    # (an unknown task name reads lm-eval's whole task index, ~20 s, before it is refused: not repeated here)
    user_error(invoke("eval", trained_bundle, "--tasks", "x", "--include-path", tasks / "choice.jsonl"), "directory")
    user_error(invoke("eval", trained_bundle, "--limit", "2"), "--limit goes with --tasks")
    # a task whose data is on the Hub: nothing is fetched without --allow-downloads
    (tasks / "remote").mkdir(exist_ok=True)
    (tasks / "remote" / "l4d_remote.yaml").write_text(
        (tasks / "l4d_choice.yaml")
        .read_text()
        .replace("l4d_choice", "l4d_remote")
        .replace("dataset_path: json", "dataset_path: someone/data")
    )
    user_error(
        invoke("eval", trained_bundle, "--tasks", "l4d_remote", "--include-path", tasks / "remote"),
        "could not load the task data",
        "--allow-downloads",
    )
    user_error(invoke("eval", trained_bundle, "--tasks", "l4d_choice", "--text", tasks / "choice.jsonl"), "--text")
