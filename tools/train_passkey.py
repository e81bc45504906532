"""A small Llama 4 that retrieves: `checkpoints/tiny-passkey`, reproduced by `make train-passkey`.

    checkpoints/tiny-trained (the documentation model, its tokenizer)
      -> fine-tuned at 256 tokens on a mixture: a quarter windows of the documentation corpus (python3.11-doc's training
         files, as make train-tiny splits them), three quarters synthetic passkey documents laid out exactly as
         `eval --needle` lays out its prompts (llama4_deploy/quality/needle.py), the key at a uniform depth in
         documentation filler
      -> bf16 checkpoint with max_position_embeddings 4096, so bundles of longer context can be built
      -> bundles with attention temperature tuning on and off (the config switch `attn_temperature_tuning`, in a
         copy of the checkpoint's config), each swept by `eval --needle` up to 2048 tokens; heatmaps, the sweep's
         JSON, the loss curve and the log beside the weights

Every Llama 4 feature of tiny-trained stays: layers 0-2 RoPE with chunked attention (chunk 64) and QK norm, layer 3
NoPE with global attention and temperature tuning, MoE in layers 1 and 3. The model only ever sees 256-token
windows: past 64 tokens only the NoPE layer reaches the needle, past 256 it runs at lengths it never trained on.

The loss is the language-model loss over every position plus the mean loss of the passkey's answer tokens (a few
tokens per document: without the second term retrieval is a rounding error of the first).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tools.train import (
    CHECKPOINT_DIR,
    EOS,
    HELD_OUT_SAMPLE,
    REPO,
    _log_to,
    adamw,
    encode_documents,
    fetch_corpus,
    load_balancing_loss,
    lr_at,
    read_texts,
    use_sparse_moe,
)

PASSKEY_DIR = REPO / "checkpoints" / "tiny-passkey"
MAX_POSITIONS = 4096
SWEEP_LENGTHS = [100, 128, 160, 192, 248, 384, 512, 1024, 2040]  # 248, 2040: room for the answer in 256 / 2048
SWEEP_CONTEXT = 2048
# within the first stage's documents, at the chunk boundary (the answer starts a chunk of its own), within the
# training length and at its end
PROBE_LENGTHS = (112, 128, 240, 256)


@dataclasses.dataclass(frozen=True)
class PasskeySettings:
    seed: int = 0
    # the curriculum: (steps, sequence length, rows per step) in order. Short documents first: the copy is learned
    # where the needle is a few dozen tokens from the question, then carried to the full training length.
    stages: tuple[tuple[int, int, int], ...] = ((400, 144, 14), (1200, 256, 8))
    lr: float = 2e-3
    warmup: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01
    answer_weight: float = 5.0  # the answer's mean loss, added to the language-model loss with this weight
    passkey_share: float = 0.875  # of the rows of a batch; the rest are plain documentation windows
    probe_every: int = 200
    threads: int = 1  # two threads stall each other when other jobs share the 2 cores (docs/training.md)

    @property
    def steps(self) -> int:
        return sum(steps for steps, _, _ in self.stages)

    @property
    def tokens(self) -> int:
        return sum(steps * length * rows for steps, length, rows in self.stages)

    def stage_at(self, step: int) -> tuple[int, int]:
        """(sequence length, rows) of the batch at `step`."""
        for steps, length, rows in self.stages:
            if step < steps:
                return length, rows
            step -= steps
        return self.stages[-1][1:]


def passkey_document(
    tokenizer_ids, filler_ids, length: int | None, rng, prompt_length: int | None = None
) -> tuple[list[int], list[int]]:
    """(ids: intro, filler with the needle at a uniform depth, question, answer; the positions of the answer's
    tokens). `length` tokens in all, or, given `prompt_length`, that many before the answer. The answer is the key
    and the full stop that follows it in the needle, so the model learns to end the key where eval --needle reads
    it."""
    from llama4_deploy.quality.needle import INTRO, KEY_DIGITS, NEEDLE, QUESTION

    encode = tokenizer_ids
    key = str(int(rng.integers(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS)))
    intro, needle = encode(INTRO), encode(NEEDLE.format(key=key))
    question, answer = encode(QUESTION), encode(" " + key) + encode(".")
    if prompt_length is not None:
        length = prompt_length + len(answer)
    filler = length - len(intro) - len(needle) - len(question) - len(answer)
    if filler < 0:
        raise ValueError(f"a passkey document of {length} tokens cannot hold the intro, needle, question and answer")
    start = int(rng.integers(0, len(filler_ids) - filler))
    stream = filler_ids[start : start + filler].tolist()
    at = int(rng.integers(0, filler + 1))
    ids = intro + stream[:at] + needle + stream[at:] + question + answer
    return ids, list(range(length - len(answer), length))


def shortest_document(encode) -> int:
    """Tokens of a passkey document with no filler, its key at the most tokens it can take (one a digit, three
    times: twice in the needle, once in the answer), and a few filler tokens."""
    from llama4_deploy.quality.needle import INTRO, KEY_DIGITS, NEEDLE, QUESTION

    fixed = sum(len(encode(text)) for text in (INTRO, NEEDLE.format(key=""), QUESTION, " ", "."))
    return fixed + 3 * KEY_DIGITS + 4


def passkey_row(
    encode, filler_ids, row_len: int, shortest: int, eos: int, rng, chunk: int = 0
) -> tuple[list[int], list[int]]:
    """A training row of `row_len` tokens: a passkey document of a length uniform in [shortest, row_len], then the
    end-of-text token and documentation up to the row's end. The question then sits at every position of the
    row, not at one: trained at one document length, the model ties retrieval to that position and fails a
    prompt a few tokens longer. With `chunk`, half the documents instead have a prompt of a whole number of
    attention chunks, as eval --needle's lengths mostly are: the answer then starts a chunk, where the RoPE layers
    see nothing before it and only the NoPE layer can carry the key on."""
    from llama4_deploy.quality.needle import KEY_DIGITS

    aligned = [n for n in range(chunk, row_len - KEY_DIGITS, chunk) if n >= shortest] if chunk else []
    if aligned and rng.random() < 0.5:
        ids, where = passkey_document(encode, filler_ids, None, rng, prompt_length=int(rng.choice(aligned)))
    else:
        ids, where = passkey_document(encode, filler_ids, int(rng.integers(shortest, row_len + 1)), rng)
    rest = row_len - len(ids)
    if rest:
        start = int(rng.integers(0, len(filler_ids) - rest))
        ids = ids + [eos] + filler_ids[start : start + rest - 1].tolist()
    return ids, where


def probe(model, tokenizer, haystack: str, lengths, trials: int = 16, seed: int = 1) -> dict[int, float]:
    """Exact match of greedy answers in torch (the sparse forward), prompts laid out by eval --needle's own code
    (quality/needle.py) on `haystack`: {length: fraction right}, depths spread 0-100%. A cheap check during
    training; the shipped figures come from the engine's sweep."""
    import torch

    from llama4_deploy.quality.needle import ANSWER_TOKENS, Prompts, answer_key, plan_trials

    prompts = Prompts(tokenizer, haystack)
    depths = [i / (trials - 1) for i in range(trials)] if trials > 1 else [0.5]
    was_training = model.training
    model.eval()
    scores = {}
    with torch.no_grad():
        for length in lengths:
            planned = plan_trials(prompts, [length], depths, 1, seed)
            ids = torch.tensor([prompts.build(t) for t in planned])
            for _ in range(ANSWER_TOKENS):
                logits = model(input_ids=ids, use_cache=False).logits[:, -1]
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            answers = [tokenizer.decode(row[length:].tolist()) for row in ids]
            scores[length] = sum(answer_key(a) == t.key for a, t in zip(answers, planned)) / len(planned)
    model.train(was_training)
    return scores


def train(model, tokenizer, train_ids, s: PasskeySettings, log, probe_text: str | None = None) -> dict:
    import numpy as np
    import torch

    from llama4_deploy.runtime.tokenizer import Tokenizer as RuntimeTokenizer

    torch.set_num_threads(s.threads)
    router_logits = use_sparse_moe(model)
    cfg = model.config
    optimizer = adamw(model, s)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    probe_tokenizer = RuntimeTokenizer.wrapping(tokenizer)  # the runtime's wrapper over the same tokenizer
    rng = np.random.default_rng(s.seed)
    eos = tokenizer.token_to_id(EOS)
    shortest = shortest_document(encode)
    history = {
        "step": [],
        "tokens": [],
        "seq_len": [],
        "loss": [],
        "answer_loss": [],
        "answer_accuracy": [],
        "first_token_accuracy": [],
        "load": [],
        "probe_step": [],
        "probe": [],
    }
    window = {"loss": [], "answer": [], "hit": [], "first": []}
    started = time.time()
    tokens = 0
    model.train()
    for step in range(s.steps):
        seq_len, batch_rows = s.stage_at(step)
        passkey_rows = max(1, round(batch_rows * s.passkey_share))
        rows, answers = [], []
        for _ in range(passkey_rows):
            ids, where = passkey_row(encode, train_ids, seq_len + 1, shortest, eos, rng, cfg.attention_chunk_size)
            rows.append(ids)
            answers.append(where)
        for start in rng.integers(0, len(train_ids) - seq_len - 1, size=batch_rows - passkey_rows):
            rows.append(train_ids[start : start + seq_len + 1].tolist())
        batch = torch.tensor(rows)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, s)
        router_logits.clear()
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits  # [B, T, V]
        lm = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        # answer token at position p is predicted by the logits at p - 1
        row_index = torch.tensor([r for r, where in enumerate(answers) for _ in where])
        positions = torch.tensor([p - 1 for where in answers for p in where])
        answer_logits = logits[row_index, positions]
        answer_targets = batch[row_index, positions + 1]
        answer = torch.nn.functional.cross_entropy(answer_logits, answer_targets)
        firsts = torch.tensor([0] + [len(where) for where in answers[:-1]]).cumsum(0)
        aux = load_balancing_loss(router_logits, cfg.num_local_experts, cfg.num_experts_per_tok)
        optimizer.zero_grad(set_to_none=True)
        (lm + s.answer_weight * answer + s.aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        tokens += batch_rows * seq_len
        window["loss"].append(lm.item())
        window["answer"].append(answer.item())
        hits = answer_logits.argmax(-1) == answer_targets
        window["hit"].append(hits.float().mean().item())
        window["first"].append(hits[firsts].float().mean().item())  # the key's first token: the retrieval itself
        done = step + 1
        if done % 20 == 0 or done == s.steps:
            elapsed = time.time() - started
            history["step"].append(done)
            history["tokens"].append(tokens)
            history["seq_len"].append(seq_len)
            history["loss"].append(float(np.mean(window["loss"])))
            history["answer_loss"].append(float(np.mean(window["answer"])))
            history["answer_accuracy"].append(float(np.mean(window["hit"])))
            history["first_token_accuracy"].append(float(np.mean(window["first"])))
            history["load"].append(os.getloadavg()[0])  # the machine is shared: speed says little without it
            log(
                f"[train] step {done}/{s.steps}  length {seq_len}  lm loss {history['loss'][-1]:.3f}  answer loss "
                f"{history['answer_loss'][-1]:.3f}  answer tokens right {history['answer_accuracy'][-1]:.0%} "
                f"(first {history['first_token_accuracy'][-1]:.0%})  "
                f"lr {lr_at(step, s):.2e}  {tokens / elapsed:,.0f} tokens/s  elapsed {elapsed / 60:.1f} min  "
                f"eta {elapsed / done * (s.steps - done) / 60:.1f} min  load {history['load'][-1]:.1f}"
            )
            window = {"loss": [], "answer": [], "hit": [], "first": []}
        if probe_text is not None and (done % s.probe_every == 0 or done == s.steps):
            t = time.time()
            scores = probe(model, probe_tokenizer, probe_text, PROBE_LENGTHS)
            started += time.time() - t  # probing is not training time
            history["probe_step"].append(done)
            history["probe"].append({str(n): v for n, v in scores.items()})
            log(
                f"[probe] step {done}: greedy exact match (torch, 16 prompts each) "
                + ", ".join(f"{n} tokens {v:.0%}" for n, v in scores.items())
            )
    seconds = time.time() - started
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "history": history}


def plot_curve(history: dict, path: Path) -> None:
    """Losses (left axis) and the fractions right (right axis) against steps; a dashed line where the rows lengthen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(8, 4.5), dpi=100)
    left.plot(history["step"], history["loss"], label="language-model loss")
    left.plot(history["step"], history["answer_loss"], label="answer loss")
    left.set_xlabel("optimizer step")
    left.set_ylabel("cross-entropy (nats/token)")
    right = left.twinx()
    right.plot(history["step"], history["first_token_accuracy"], "g:", label="key's first token right (training rows)")
    if history["probe"]:
        means = [sum(scores.values()) / len(scores) for scores in history["probe"]]
        right.plot(history["probe_step"], means, "ko-", markersize=4, label="greedy exact match (probe)")
    right.set_ylabel("fraction right")
    right.set_ylim(0, 1.02)
    lengths = history["seq_len"]
    for i in range(1, len(lengths)):
        if lengths[i] != lengths[i - 1]:
            left.axvline(history["step"][i - 1], color="grey", linestyle="--", linewidth=1)
    rows = " then ".join(dict.fromkeys(str(n) for n in lengths))
    left.set_title(f"tiny-passkey: tiny-trained fine-tuned on passkey documents ({rows}-token rows)", fontsize=10)
    left.legend(loc="center right", bbox_to_anchor=(1.0, 0.42), fontsize=8)
    right.legend(loc="center right", bbox_to_anchor=(1.0, 0.24), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def tuning_off_checkpoint(checkpoint: Path, folder: Path) -> Path:
    """The same weights with `attn_temperature_tuning` false in config.json (the files linked, the config copied)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in checkpoint.iterdir():
        target = folder / path.name
        target.unlink(missing_ok=True)
        if path.name == "config.json":
            config = json.loads(path.read_text())
            config["attn_temperature_tuning"] = False
            target.write_text(json.dumps(config, indent=2) + "\n")
        elif path.is_file():
            target.symlink_to(path.resolve())
    return folder


def sweep_both(checkpoint: Path, workdir: Path, out: Path, log, trials: int = 5) -> dict:
    """Build the checkpoint at SWEEP_CONTEXT with temperature tuning on and off, sweep both with eval --needle
    (--compare), and keep the tables, the heatmap and the JSON in `out`."""
    from llama4_deploy.quality.needle import Sweep, heatmap

    cli = [sys.executable, "-m", "llama4_deploy.cli"]
    bundles = {"on": workdir / "bundle-tuning-on", "off": workdir / "bundle-tuning-off"}
    sources = {"on": checkpoint, "off": tuning_off_checkpoint(checkpoint, workdir / "checkpoint-tuning-off")}
    for setting, bundle in bundles.items():
        command = [*cli, "build", "--checkpoint", str(sources[setting]), "--out", str(bundle), "--force"]
        command += ["--max-context", str(SWEEP_CONTEXT), "--prefill-tokens", "256"]
        log(f"[sweep] {' '.join(command[2:])}")
        subprocess.run(command, check=True, capture_output=True, text=True)
    lengths = ",".join(map(str, SWEEP_LENGTHS))
    command = [*cli, "eval", str(bundles["on"]), "--needle", "--compare", str(bundles["off"]), "--lengths", lengths]
    command += ["--trials", str(trials), "--out", str(workdir / "needle")]
    log(f"[sweep] {' '.join(command[2:])}")
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        log(f"[sweep] {line}")
    shutil.copyfile(workdir / "needle" / "needle.png", out / "needle-heatmap.png")
    shutil.copyfile(workdir / "needle" / "needle.json", out / "needle.json")
    on, off = json.loads((workdir / "needle" / "needle.json").read_text())
    for setting, recorded in (("on", on), ("off", off)):  # each setting's heatmap on its own too
        heatmap([Sweep.from_record(recorded)], out / f"needle-tuning-{setting}.png", [f"temperature tuning {setting}"])
    return {"lengths": on["lengths"], "depths": on["depths"], "on": on["accuracy"], "off": off["accuracy"]}


def write_card(out: Path, record: dict) -> None:
    """checkpoints/tiny-passkey/README.md: what the model is, how it was trained, and what it reached, every figure
    from training.json."""
    from llama4_deploy.quality.needle import ANSWER_TOKENS

    settings, history = record["settings"], record["history"]
    stages = ", ".join(f"{steps} steps of {rows} x {length}" for steps, length, rows in settings["stages"])
    probes = "\n".join(
        f"| {step} | " + " | ".join(f"{v:.0%}" for v in scores.values()) + " |"
        for step, scores in zip(history["probe_step"], history["probe"])
    )
    probe_note = f"answers of {record['probe_answer_tokens']} tokens"
    if record["probe_answer_tokens"] < ANSWER_TOKENS:
        probe_note += ", which cut off keys the tokenizer splits into more tokens, and scored them wrong"
    probe_head = " | ".join(f"{n} tokens" for n in history["probe"][0]) if history["probe"] else ""

    def table(grid, lengths, depths) -> str:
        lines = ["| length | " + " | ".join(f"{d:.0%}" for d in depths) + " | mean |", "|---" * (len(depths) + 2) + "|"]
        for length, row in zip(lengths, grid):
            lines.append(f"| {length} | " + " | ".join(f"{v:.0%}" for v in row) + f" | {sum(row) / len(row):.0%} |")
        return "\n".join(lines)

    needle = record.get("needle")
    if needle:
        lengths, depths = needle["lengths"], needle["depths"]
        mean = {k: {n: sum(r) / len(r) for n, r in zip(lengths, needle[k])} for k in ("on", "off")}
        within = [n for n in lengths if n <= settings["stages"][-1][1]]
        beyond = [n for n in lengths if n > settings["stages"][-1][1]]
        summary = (
            "Within its training length ("
            + ", ".join(f"{n}: {mean['on'][n]:.0%}" for n in within)
            + ") and past it ("
            + ", ".join(f"{n}: {mean['on'][n]:.0%}" for n in beyond)
            + "), temperature tuning on; off: "
            + ", ".join(f"{n}: {mean['off'][n]:.0%}" for n in lengths)
            + "."
        )
        sweep_text = f"""## Retrieval: `eval --needle` on the engine (fp32, ONNX Runtime), temperature tuning on and off

{summary}

Exact match of the greedy answer, {record["needle_trials"]} trials per cell (each its own key and stretch of haystack),
haystack `held-out-sample.txt` (documentation the model never trained on), bundles built at {SWEEP_CONTEXT} tokens of
context. The model only trained on documents of up to {settings["stages"][-1][1]} tokens: past 64 tokens only the NoPE
layer reaches the needle, and where the prompt is a whole number of chunks (128, 192, 384, ...) the answer starts a
chunk of its own; past {settings["stages"][-1][1]} the model runs at lengths it never saw.

Temperature tuning on (the checkpoint's config, as Llama 4 ships):

{table(needle["on"], lengths, depths)}

Temperature tuning off (`attn_temperature_tuning: false` in a copy of config.json, same weights):

{table(needle["off"], lengths, depths)}

![tuning on](needle-tuning-on.png) ![tuning off](needle-tuning-off.png)

Both with their difference: `needle-heatmap.png`; every trial and answer: `needle.json`. Printed by:

```
llama4-deploy build --checkpoint checkpoints/tiny-passkey --max-context {SWEEP_CONTEXT} --prefill-tokens 256 \\
    --out build/pk-on
# the same with a copy of the checkpoint whose config.json says "attn_temperature_tuning": false -> build/pk-off
llama4-deploy eval build/pk-on --needle --compare build/pk-off --trials {record["needle_trials"]} \\
    --lengths {",".join(map(str, lengths))}
```
"""
    else:
        sweep_text = "## Retrieval\n\nNot swept (trained with --no-sweep).\n"
    card = f"""---
license: psf-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [llama4, moe, tiny, llama4-deploy, passkey]
---

# tiny-passkey: the 6.8M-parameter tiny-trained Llama 4, fine-tuned to retrieve a passkey

`checkpoints/tiny-trained` (a Llama 4 trained on Python's documentation; its card has the architecture) fine-tuned
by `make train-passkey` (`tools/train_passkey.py`, docs/training.md) to answer the passkey test that
`llama4-deploy eval --needle` runs. Same architecture, every Llama 4 feature on: layers 0-2 RoPE with chunked attention
(chunk 64) and QK norm, layer 3 NoPE with global attention and attention temperature tuning, MoE (8 experts, top-1,
shared expert) in layers 1 and 3. bf16 `model.safetensors`; `max_position_embeddings` {MAX_POSITIONS} (the NoPE and
chunked layers have no other limit). Recipe: `tiny-passkey`. A test article, not a useful model.

## Training

- from `{record["from"]}`; seed {settings["seed"]}; curriculum {stages} (rows x tokens per step; short documents first):
  **{record["steps"]} steps, {record["tokens"]:,} tokens**
- rows: {settings["passkey_share"]:.1%} passkey documents laid out exactly as `eval --needle` lays out its
  prompts (intro, documentation filler from tiny-trained's training files with the needle at a uniform depth,
  question) followed by the answer (the key and its full stop); each document's length uniform between the
  shortest possible and the row's length, or (half of them) a prompt of a whole number of attention chunks, as most
  of `eval --needle`'s lengths are; the rest of the row is documentation after an end-of-text token. The other rows
  are plain documentation windows.
- loss: language-model cross-entropy over every position + {settings["answer_weight"]} x the mean cross-entropy
  of the answer tokens + {settings["aux_loss_coef"]} x a Switch load-balancing loss
- AdamW (betas 0.9/0.95, weight decay {settings["weight_decay"]}), learning rate {settings["lr"]},
  {settings["warmup"]} warm-up steps, cosine decay to {settings["lr"] * settings["min_lr_ratio"]:.0e},
  gradient clipping {settings["grad_clip"]}
- torch CPU, {settings["threads"]} thread{"s" if settings["threads"] > 1 else ""} at nice 5:
  **{record["seconds"] / 60:.1f} min** ({record["tokens_per_s"]:,} tokens/s), on a 2-core machine shared with other
  jobs (1-minute load average {record["load_average"]:.1f} on average over the logged steps; each in `train.log`)
- last logged (mean of 20 steps): language-model loss {history["loss"][-1]:.3f},
  answer loss {history["answer_loss"][-1]:.3f}, answer tokens right {history["answer_accuracy"][-1]:.0%}
  (the key's first token {history["first_token_accuracy"][-1]:.0%}), teacher-forced on training rows

Greedy exact match during training (torch, 16 prompts per length built by `eval --needle`'s code on the held-out
sample, depths 0-100%, the same 16 keys at each length; {probe_note}):

| step | {probe_head} |
|---{"|---" * len(history["probe"][0]) if history["probe"] else ""}|
{probes}

![loss curve](loss.png)

{sweep_text}
Beyond the recipe's {SWEEP_CONTEXT} tokens of context: docs/training.md.

## License

The documentation it was trained on is under the PSF License (`PSF-LICENSE.txt`); see tiny-trained's card.
"""
    (out / "README.md").write_text(card)


def sweep_again(checkpoint: Path, workdir: Path, trials: int) -> int:
    """Sweep a trained checkpoint again (say after a change to eval --needle): its heatmaps, needle.json, the sweep's
    lines of train.log, training.json's figures and the card are replaced; the weights are not touched."""
    record_path = checkpoint / "training.json"
    if not record_path.is_file():
        print(f"{checkpoint} has no training.json; --sweep-only sweeps a checkpoint this tool trained", file=sys.stderr)
        return 1
    record = json.loads(record_path.read_text())
    lines: list[str] = []
    log = _log_to(workdir / "sweep.log")
    record["needle"] = sweep_both(checkpoint, workdir, checkpoint, lambda m: (lines.append(m), log(m)), trials)
    record["needle_trials"] = trials
    shutil.rmtree(workdir / "checkpoint-tuning-off", ignore_errors=True)
    kept = [x for x in (checkpoint / "train.log").read_text().splitlines() if not x.startswith(("[sweep]", "[done]"))]
    (checkpoint / "train.log").write_text("\n".join(kept + lines) + "\n")
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    write_card(checkpoint, record)
    return 0


def parse_stages(text: str) -> tuple[tuple[int, int, int], ...]:
    """'600x128x16,1000x256x8' -> ((600, 128, 16), (1000, 256, 8))."""
    import argparse

    try:
        stages = tuple(tuple(int(n) for n in part.split("x")) for part in text.split(","))
    except ValueError:
        stages = ()
    if not stages or any(len(stage) != 3 or min(stage) < 1 for stage in stages):
        raise argparse.ArgumentTypeError(f"{text!r} is not STEPSxLENGTHxROWS[,...] of positive integers")
    return stages


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Reproduce checkpoints/tiny-passkey from checkpoints/tiny-trained.")
    parser.add_argument("--out", type=Path, default=PASSKEY_DIR)
    parser.add_argument("--workdir", type=Path, default=REPO / "build" / "train-passkey")
    parser.add_argument(
        "--stages",
        type=parse_stages,
        default=PasskeySettings.stages,
        help="the curriculum: STEPSxLENGTHxROWS,... (default: the shipped recipe's)",
    )
    parser.add_argument("--lr", type=float, default=PasskeySettings.lr)
    parser.add_argument("--answer-weight", type=float, default=PasskeySettings.answer_weight)
    parser.add_argument("--threads", type=int, default=PasskeySettings.threads)
    parser.add_argument("--probe-every", type=int, default=PasskeySettings.probe_every, help="steps between probes")
    parser.add_argument("--trials", type=int, default=5, help="needle trials per cell of each sweep")
    parser.add_argument("--no-sweep", action="store_true", help="train and save only (no bundles, no heatmaps)")
    parser.add_argument(
        "--sweep-only", action="store_true", help="no training: sweep the checkpoint in --out again, rewrite its card"
    )
    args = parser.parse_args(argv)
    settings = PasskeySettings(
        stages=args.stages,
        lr=args.lr,
        answer_weight=args.answer_weight,
        threads=args.threads,
        probe_every=args.probe_every,
    )

    import torch
    from tokenizers import Tokenizer
    from transformers import Llama4ForCausalLM

    from llama4_deploy.quality import needle

    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.sweep_only:
        return sweep_again(args.out, args.workdir, args.trials)
    log_path = args.workdir / "train.log"
    log_path.unlink(missing_ok=True)
    log = _log_to(log_path)
    log(
        f"[setup] {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; torch {torch.__version__}; settings "
        f"{dataclasses.asdict(settings)}; from {CHECKPOINT_DIR.relative_to(REPO)}"
    )
    corpus = fetch_corpus(args.workdir / "corpus", log)
    tokenizer = Tokenizer.from_file(str(CHECKPOINT_DIR / "tokenizer.json"))
    train_ids = encode_documents(tokenizer, read_texts(corpus.train))
    log(f"[corpus] {len(train_ids) / 1e6:.2f}M training tokens (tiny-trained's training files)")
    model = Llama4ForCausalLM.from_pretrained(CHECKPOINT_DIR, dtype=torch.float32, use_safetensors=True)
    model.config._attn_implementation = "sdpa"
    result = train(model, tokenizer, train_ids, settings, log, probe_text=HELD_OUT_SAMPLE.read_text())
    log(f"[train] done: {result['tokens'] / 1e6:.2f}M tokens in {result['seconds'] / 60:.1f} min")

    # staged under the workdir, named as the checkpoint (the build takes the folder's name for the bundle's)
    staging = args.workdir / "staging" / args.out.name
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.config.max_position_embeddings = MAX_POSITIONS  # NoPE and chunked RoPE layers have no other limit
    model.to(torch.bfloat16).save_pretrained(staging)
    for name in ("tokenizer.json", "tokenizer_config.json", "held-out-sample.txt", "PSF-LICENSE.txt"):
        shutil.copyfile(CHECKPOINT_DIR / name, staging / name)
    plot_curve(result["history"], staging / "loss.png")
    record = {
        "from": str(CHECKPOINT_DIR.relative_to(REPO)),
        "settings": dataclasses.asdict(settings),
        "steps": settings.steps,
        "tokens": result["tokens"],
        "seconds": round(result["seconds"], 1),
        "tokens_per_s": round(result["tokens_per_s"]),
        "load_average": round(sum(result["history"]["load"]) / len(result["history"]["load"]), 2),
        "probe_answer_tokens": needle.ANSWER_TOKENS,
        "history": result["history"],
    }
    if not args.no_sweep:
        record["needle"] = sweep_both(staging, args.workdir, staging, log, args.trials)
        record["needle_trials"] = args.trials
    (staging / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    write_card(staging, record)
    shutil.copyfile(log_path, staging / "train.log")
    args.out.mkdir(parents=True, exist_ok=True)
    for produced in sorted(staging.iterdir()):  # replaces only what this script writes
        shutil.move(produced, args.out / produced.name)
    staging.rmdir()
    shutil.rmtree(args.workdir / "checkpoint-tuning-off", ignore_errors=True)  # links into the staged files
    log(f"[done] {args.out}; {math.ceil((args.out / 'model.safetensors').stat().st_size / 2**20)} MiB of weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
