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
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tools.train import (
    CHECKPOINT_DIR,
    REPO,
    _log_to,
    encode_documents,
    fetch_corpus,
    load_balancing_loss,
    lr_at,
    read_texts,
    use_sparse_moe,
)

PASSKEY_DIR = REPO / "checkpoints" / "tiny-passkey"
MAX_POSITIONS = 4096
SWEEP_LENGTHS = [128, 192, 252, 384, 512, 1024, 2044]  # 252 and 2044: room for the answer in 256 / 2048
SWEEP_CONTEXT = 2048


@dataclasses.dataclass(frozen=True)
class PasskeySettings:
    seed: int = 0
    seq_len: int = 256
    batch: int = 8
    steps: int = 200
    lr: float = 2e-3
    warmup: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01
    passkey_share: float = 0.75  # of the rows of a batch
    threads: int = 2

    @property
    def tokens(self) -> int:
        return self.steps * self.batch * self.seq_len


def passkey_document(tokenizer_ids, filler_ids, length: int, rng) -> tuple[list[int], list[int]]:
    """(ids of `length` tokens: intro, filler with the needle at a uniform depth, question, answer; the positions
    of the answer's tokens)."""
    from llama4_deploy.quality.needle import INTRO, KEY_DIGITS, NEEDLE, QUESTION

    encode = tokenizer_ids
    key = str(int(rng.integers(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS)))
    intro, needle = encode(INTRO), encode(NEEDLE.format(key=key))
    question, answer = encode(QUESTION), encode(" " + key)
    filler = length - len(intro) - len(needle) - len(question) - len(answer)
    start = int(rng.integers(0, len(filler_ids) - filler))
    stream = filler_ids[start : start + filler].tolist()
    at = int(rng.integers(0, filler + 1))
    ids = intro + stream[:at] + needle + stream[at:] + question + answer
    return ids, list(range(length - len(answer), length))


def train(model, tokenizer, train_ids, s: PasskeySettings, log) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(s.threads)
    router_logits = use_sparse_moe(model)
    cfg = model.config
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr,
        betas=(0.9, 0.95),
        fused=True,
    )
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    rng = np.random.default_rng(s.seed)
    passkey_rows = round(s.batch * s.passkey_share)
    history = {"step": [], "tokens": [], "loss": [], "answer_loss": [], "answer_accuracy": []}
    window = {"loss": [], "answer": [], "hit": []}
    started = time.time()
    model.train()
    for step in range(s.steps):
        rows, answers = [], []
        for _ in range(passkey_rows):
            ids, where = passkey_document(encode, train_ids, s.seq_len + 1, rng)
            rows.append(ids)
            answers.append(where)
        for start in rng.integers(0, len(train_ids) - s.seq_len - 1, size=s.batch - passkey_rows):
            rows.append(train_ids[start : start + s.seq_len + 1].tolist())
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
        aux = load_balancing_loss(router_logits, cfg.num_local_experts, cfg.num_experts_per_tok)
        optimizer.zero_grad(set_to_none=True)
        (lm + answer + s.aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        window["loss"].append(lm.item())
        window["answer"].append(answer.item())
        window["hit"].append((answer_logits.argmax(-1) == answer_targets).float().mean().item())
        done = step + 1
        if done % 10 == 0 or done == s.steps:
            elapsed = time.time() - started
            history["step"].append(done)
            history["tokens"].append(done * s.batch * s.seq_len)
            history["loss"].append(float(np.mean(window["loss"])))
            history["answer_loss"].append(float(np.mean(window["answer"])))
            history["answer_accuracy"].append(float(np.mean(window["hit"])))
            log(
                f"[train] step {done}/{s.steps}  lm loss {history['loss'][-1]:.3f}  answer loss "
                f"{history['answer_loss'][-1]:.3f}  answer tokens right {history['answer_accuracy'][-1]:.0%}  "
                f"lr {lr_at(step, s):.2e}  {done * s.batch * s.seq_len / elapsed:,.0f} tokens/s  elapsed "
                f"{elapsed / 60:.1f} min  eta {elapsed / done * (s.steps - done) / 60:.1f} min"
            )
            window = {"loss": [], "answer": [], "hit": []}
    seconds = time.time() - started
    return {"seconds": seconds, "tokens": s.tokens, "tokens_per_s": s.tokens / seconds, "history": history}


def plot_curve(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(7, 4), dpi=100)
    left.plot(history["step"], history["loss"], label="language-model loss")
    left.plot(history["step"], history["answer_loss"], label="passkey answer loss")
    left.set_xlabel("step (2048 tokens each)")
    left.set_ylabel("cross-entropy (nats/token)")
    right = left.twinx()
    right.plot(history["step"], history["answer_accuracy"], "g:", label="answer tokens right (training rows)")
    right.set_ylabel("fraction right")
    right.set_ylim(0, 1)
    left.set_title("tiny-passkey: tiny-trained fine-tuned on docs + passkey documents (256 tokens)")
    left.legend(loc="upper center", fontsize=8)
    right.legend(loc="center right", fontsize=8)
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
    return {"lengths": on["lengths"], "depths": on["depths"], "on": on["accuracy"], "off": off["accuracy"]}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Reproduce checkpoints/tiny-passkey from checkpoints/tiny-trained.")
    parser.add_argument("--out", type=Path, default=PASSKEY_DIR)
    parser.add_argument("--workdir", type=Path, default=REPO / "build" / "train-passkey")
    parser.add_argument("--steps", type=int, default=PasskeySettings.steps, help="optimizer steps (2048 tokens each)")
    parser.add_argument("--trials", type=int, default=5, help="needle trials per cell of each sweep")
    parser.add_argument("--no-sweep", action="store_true", help="train and save only (no bundles, no heatmaps)")
    args = parser.parse_args(argv)
    settings = PasskeySettings(steps=args.steps)

    import torch
    from tokenizers import Tokenizer
    from transformers import Llama4ForCausalLM

    args.workdir.mkdir(parents=True, exist_ok=True)
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
    result = train(model, tokenizer, train_ids, settings, log)
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
        "seconds": round(result["seconds"], 1),
        "tokens_per_s": round(result["tokens_per_s"]),
        "history": result["history"],
    }
    if not args.no_sweep:
        record["needle"] = sweep_both(staging, args.workdir, staging, log, args.trials)
    (staging / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    shutil.copyfile(log_path, staging / "train.log")
    args.out.mkdir(parents=True, exist_ok=True)
    for produced in sorted(staging.iterdir()):  # replaces only what this script writes (the card stays)
        shutil.move(produced, args.out / produced.name)
    staging.rmdir()
    shutil.rmtree(args.workdir / "checkpoint-tuning-off", ignore_errors=True)  # links into the staged files
    log(f"[done] {args.out}; {math.ceil((args.out / 'model.safetensors').stat().st_size / 2**20)} MiB of weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
