"""A small trained Llama 4: corpus, tokenizer, sparse training forward, training loop, model card.

`make train-tiny` (`python -m tools.train`) reproduces `checkpoints/tiny-trained/` from scratch:

    Debian python3.11-doc (.deb, unpacked, no system change) -> reST sources, split by file
      -> 4096-token byte-level BPE (tokenizers) -> Llama4ForCausalLM, every Llama 4 feature on
      -> AdamW, cosine LR, a fixed token budget (deterministic, independent of machine load)
      -> bf16 model.safetensors + tokenizer + model card + loss curve

The training forward is transformers' own model with each MoE block's forward swapped for one that
sends every token only to its chosen expert (transformers computes every expert on every token:
E x the FLOPs). It is the same function of the same parameters; tests/test_trained.py checks it
against transformers' forward. transformers 5.24 computes no load-balancing loss (its
`router_aux_loss_coef` is unused), so the loop adds a Switch-style one; without it the routers
collapse onto two or three experts within the first 50 steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT_DIR = REPO / "checkpoints" / "tiny-trained"
HELD_OUT_SAMPLE = CHECKPOINT_DIR / "held-out-sample.txt"  # shipped so eval and tests need no Debian package

CORPUS_PACKAGE = "python3.11-doc"
CORPUS_SOURCES = "usr/share/doc/python3.11/html/_sources"  # the reStructuredText the HTML was built from
CORPUS_LICENSE = "usr/share/doc/python3.11-doc/copyright"
HELD_OUT_EVERY = 20  # a file is held out when its path's hash is 0 mod 20: ~5% of files, fixed by name

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"

# Every Llama 4 feature on at 4 layers: layers 1 and 3 are MoE (interleave step 2), layers 0 and 2
# dense; transformers makes layer 3 (every 4th) NoPE with global attention and temperature tuning,
# layers 0-2 RoPE with chunked attention and QK norm. floor_scale 32 puts the temperature to work
# from position 31 of the 256-token training windows (scale 1.22 at position 255).
MODEL_CONFIG: dict[str, Any] = {
    "vocab_size": 4096,
    "hidden_size": 192,
    "intermediate_size": 384,  # per expert
    "intermediate_size_mlp": 768,  # dense layers
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_local_experts": 8,
    "num_experts_per_tok": 1,
    "interleave_moe_layer_step": 2,
    "use_qk_norm": True,
    "attention_chunk_size": 64,
    "attn_temperature_tuning": True,
    "floor_scale": 32,
    "attn_scale": 0.1,
    "max_position_embeddings": 1024,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "tie_word_embeddings": False,
}


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The recipe of the shipped checkpoint. The budget is tokens, not time: the same on any machine."""

    seed: int = 0
    seq_len: int = 256
    batch: int = 8  # sequences per step: 2048 tokens
    # a fixed budget of steps x batch x seq_len tokens; a larger one lowers perplexity (docs/training.md)
    steps: int = 1600
    lr: float = 3e-3
    warmup: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01
    eval_every: int = 128
    threads: int = 2

    @property
    def tokens(self) -> int:
        return self.steps * self.batch * self.seq_len


class TrainError(ValueError):
    """Training cannot proceed; the message is one sentence for the user."""


def _log_to(path: Path | None) -> Callable[[str], None]:
    handle = path.open("a") if path else None

    def log(message: str) -> None:
        print(message, flush=True)
        if handle:
            handle.write(message + "\n")
            handle.flush()

    return log


# -- corpus ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Corpus:
    root: Path  # the unpacked package
    version: str
    train: list[Path]
    held_out: list[Path]

    @property
    def sources(self) -> Path:
        return self.root / CORPUS_SOURCES


def _held_out(relative: str) -> bool:
    return int(hashlib.sha1(relative.encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0


def split_files(sources: Path) -> tuple[list[Path], list[Path]]:
    """Train and held-out files, split by a hash of each file's path (stable across machines)."""
    files = sorted(sources.rglob("*.txt"))
    held = [f for f in files if _held_out(f.relative_to(sources).as_posix())]
    return [f for f in files if f not in held], held


def fetch_corpus(workdir: Path, log=print) -> Corpus:
    """Download python3.11-doc with apt and unpack it under workdir (no system install)."""
    workdir.mkdir(parents=True, exist_ok=True)
    debs = sorted(workdir.glob(f"{CORPUS_PACKAGE}_*.deb"))
    if not debs:
        if shutil.which("apt-get") is None:
            raise TrainError(f"apt-get is not available; the corpus is Debian's {CORPUS_PACKAGE} package")
        log(f"[corpus] apt-get download {CORPUS_PACKAGE}")
        if subprocess.run(["apt-get", "download", CORPUS_PACKAGE], cwd=workdir).returncode != 0:
            log("[corpus] not in the package lists; apt-get update, then retry")
            subprocess.run(["apt-get", "update"], check=False)
            if subprocess.run(["apt-get", "download", CORPUS_PACKAGE], cwd=workdir).returncode != 0:
                raise TrainError(f"apt-get download {CORPUS_PACKAGE} failed; is a Debian mirror reachable?")
        debs = sorted(workdir.glob(f"{CORPUS_PACKAGE}_*.deb"))
    deb = debs[-1]
    version = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    root = workdir / "unpacked"
    if not (root / CORPUS_SOURCES).is_dir():
        log(f"[corpus] unpacking {deb.name}")
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    train, held = split_files(root / CORPUS_SOURCES)
    size = sum(f.stat().st_size for f in train + held)
    log(
        f"[corpus] {CORPUS_PACKAGE} {version}: {len(train) + len(held)} files, {size / 1e6:.1f} MB; "
        f"{len(train)} train, {len(held)} held out"
    )
    return Corpus(root, version, train, held)


def read_texts(files: list[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


# -- tokenizer ---------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style: every byte representable, no unknown token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
    }


def encode_documents(tokenizer, texts: list[str]):
    """One token stream: each document followed by the end-of-text token."""
    import numpy as np

    eos = tokenizer.token_to_id(EOS)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)
        ids.append(eos)
    return np.array(ids, dtype=np.int64)


# -- model and the sparse training forward ----------------------------------------------------


def build_model(config: dict[str, Any], seed: int, tokenizer=None):
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(seed)
    special = {}
    if tokenizer is not None:
        special = {
            "bos_token_id": tokenizer.token_to_id(BOS),
            "eos_token_id": tokenizer.token_to_id(EOS),
            "pad_token_id": tokenizer.token_to_id(PAD),
        }
    cfg = Llama4TextConfig(**config, **special)
    cfg._attn_implementation = "sdpa"
    return Llama4ForCausalLM(cfg)


def sparse_moe_forward(moe, hidden_states, router_logits_out: list | None = None):
    """Llama4TextMoe's forward with each token sent only to its top-k experts.

    Same math as transformers' (score = sigmoid(router logit) scales the expert *input*; shared
    expert added), but an expert runs on its own tokens only: (k/E) of the routed FLOPs.
    """
    import torch

    x = hidden_states.reshape(-1, moe.hidden_dim)  # [N, H]
    router_logits = torch.nn.functional.linear(x, moe.router.weight)  # [N, E]
    top_value, top_index = torch.topk(router_logits, moe.top_k, dim=1)  # [N, k]
    scores = torch.sigmoid(top_value.float()).to(x.dtype)
    out = moe.shared_expert(x)
    # token-expert pairs grouped by expert, so each expert's inputs are one contiguous slice
    flat_expert = top_index.reshape(-1)  # [N*k], token-major
    order = torch.argsort(flat_expert, stable=True)
    token_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(moe.top_k)[order]  # [N*k]
    routed_in = x.index_select(0, token_of) * scores.reshape(-1, 1)[order]  # [N*k, H]
    counts = torch.bincount(flat_expert, minlength=moe.num_experts).tolist()
    experts = moe.experts
    routed_out = []
    for expert, expert_in in enumerate(routed_in.split(counts)):
        if expert_in.shape[0] == 0:
            routed_out.append(expert_in)
            continue
        gate, up = (expert_in @ experts.gate_up_proj[expert]).chunk(2, dim=-1)
        routed_out.append((up * experts.act_fn(gate)) @ experts.down_proj[expert])
    out = out.index_add(0, token_of, torch.cat(routed_out))
    if router_logits_out is not None:
        router_logits_out.append(router_logits)
    return out, router_logits


def use_sparse_moe(model) -> list:
    """Swap every MoE block's forward for `sparse_moe_forward`; returns the list each forward
    appends its router logits [N, E] to (the caller clears it between steps)."""
    import functools

    if hasattr(model, "sparse_router_logits"):
        return model.sparse_router_logits
    router_logits: list = []
    model.sparse_router_logits = router_logits
    for layer in model.model.layers:
        if layer.is_moe_layer:
            moe = layer.feed_forward
            moe.forward = functools.partial(sparse_moe_forward, moe, router_logits_out=router_logits)
    return router_logits


def load_balancing_loss(router_logits: list, num_experts: int, top_k: int):
    """Switch Transformer's auxiliary loss per MoE layer, averaged: E * sum_e f_e * P_e, where f_e
    is the fraction of tokens routed to e and P_e the mean router probability of e. 1.0 when uniform."""
    import torch

    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = torch.topk(logits, top_k, dim=-1).indices
        fraction = torch.zeros(num_experts).scatter_add_(0, chosen.reshape(-1), torch.ones(chosen.numel()))
        fraction = fraction / chosen.numel()
        losses.append(num_experts * (fraction * probs.mean(0)).sum())
    return torch.stack(losses).mean()


# -- evaluation in torch (the engine's eval is llama4_deploy.quality.evaluate) ---------------------------


def windows(ids, seq_len: int):
    """Non-overlapping windows of seq_len tokens over a token stream (the last partial one dropped)."""
    count = len(ids) // seq_len
    return ids[: count * seq_len].reshape(count, seq_len)


def held_out_stats(model, ids, seq_len: int, batch: int = 16) -> tuple[float, list[list[float]]]:
    """Perplexity over held-out windows (each window's first token is context only), and the
    share of held-out tokens each expert takes in each MoE layer."""
    import torch

    router_logits = use_sparse_moe(model)
    model.eval()
    data = torch.from_numpy(windows(ids, seq_len))
    nll, count = 0.0, 0
    loads: list = []
    with torch.no_grad():
        for start in range(0, len(data), batch):
            chunk = data[start : start + batch]
            router_logits.clear()
            logits = model(input_ids=chunk, use_cache=False).logits
            nll += torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), chunk[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += chunk[:, 1:].numel()
            per_layer = [torch.bincount(r.argmax(-1), minlength=r.shape[-1]) for r in router_logits]
            loads = per_layer if not loads else [a + b for a, b in zip(loads, per_layer)]
    model.train()
    shares = [(load / load.sum()).tolist() for load in loads]
    return math.exp(nll / count), shares


# -- training ----------------------------------------------------------------------------------


def lr_at(step: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw(model, s):
    """AdamW over the model, weight decay `s.weight_decay` on the matrices but the embeddings (make train-tiny's and
    make train-passkey's optimizer)."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr,
        betas=(0.9, 0.95),
        fused=True,
    )


def train_model(model, train_ids, held_ids, s: TrainSettings, log) -> dict[str, Any]:
    import numpy as np
    import torch

    torch.set_num_threads(s.threads)
    router_logits = use_sparse_moe(model)
    cfg = model.config
    optimizer = adamw(model, s)
    rng = np.random.default_rng(s.seed)
    history: dict[str, list] = {"step": [], "tokens": [], "loss": [], "aux": [], "eval_tokens": [], "eval_ppl": []}
    model.train()
    started = time.time()
    window_loss, window_aux, window_start = [], [], time.time()
    for step in range(s.steps):
        starts = rng.integers(0, len(train_ids) - s.seq_len - 1, size=s.batch)
        batch = torch.from_numpy(np.stack([train_ids[i : i + s.seq_len + 1] for i in starts]))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, s)
        router_logits.clear()
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        aux = load_balancing_loss(router_logits, cfg.num_local_experts, cfg.num_experts_per_tok)
        optimizer.zero_grad(set_to_none=True)
        (loss + s.aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        window_loss.append(loss.item())
        window_aux.append(aux.item())
        done = step + 1
        if done % 25 == 0 or done == s.steps:
            tokens = done * s.batch * s.seq_len
            rate = len(window_loss) * s.batch * s.seq_len / (time.time() - window_start)
            elapsed = time.time() - started
            eta = elapsed / done * (s.steps - done)
            history["step"].append(done)
            history["tokens"].append(tokens)
            history["loss"].append(float(np.mean(window_loss)))
            history["aux"].append(float(np.mean(window_aux)))
            log(
                f"[train] step {done}/{s.steps}  tokens {tokens / 1e6:.2f}M  loss {np.mean(window_loss):.3f}  "
                f"aux {np.mean(window_aux):.3f}  lr {lr_at(step, s):.2e}  {rate:,.0f} tokens/s  "
                f"elapsed {elapsed / 60:.1f} min  eta {eta / 60:.1f} min"
            )
            window_loss, window_aux, window_start = [], [], time.time()
        if done % s.eval_every == 0 or done == s.steps:
            t = time.time()
            ppl, shares = held_out_stats(model, held_ids[: 64 * s.seq_len], s.seq_len)
            started += time.time() - t  # evaluation time is not training time
            history["eval_tokens"].append(done * s.batch * s.seq_len)
            history["eval_ppl"].append(ppl)
            lo, hi = min(min(x) for x in shares), max(max(x) for x in shares)
            log(
                f"[eval] step {done}: held-out perplexity {ppl:.2f} (first {64 * s.seq_len} tokens); "
                f"expert shares {lo:.1%}..{hi:.1%}"
            )
    seconds = time.time() - started
    return {"seconds": seconds, "tokens": s.tokens, "tokens_per_s": s.tokens / seconds, "history": history}


def plot_curve(history: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([t / 1e6 for t in history["tokens"]], history["loss"], label="train loss (mean of 25 steps)")
    ax.plot(
        [t / 1e6 for t in history["eval_tokens"]],
        [math.log(p) for p in history["eval_ppl"]],
        "o-",
        label="held-out loss (ln perplexity)",
    )
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("tiny-trained: Llama 4 (6.8M params) on python3.11-doc")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- the shipped checkpoint ----------------------------------------------------------------------


def save_checkpoint(model, tokenizer, out: Path) -> None:
    import torch

    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")


def write_held_out_sample(texts: list[str], path: Path, max_chars: int = 60_000) -> None:
    """The first held-out documents, up to ~60 kB: enough for a stable perplexity in a test."""
    parts, size = [], 0
    for text in texts:
        if size >= max_chars:
            break
        parts.append(text)
        size += len(text)
    path.write_text("".join(parts)[:max_chars])


def write_corpus_license(corpus: Corpus, path: Path) -> None:
    """The PSF License Agreement from the package's copyright file: the license asks that it travel
    with derived works (the weights and the held-out sample)."""
    text = (corpus.root / CORPUS_LICENSE).read_text()
    start = text.index("PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2")
    end = text.index("BEOPEN.COM LICENSE AGREEMENT", start)
    path.write_text(
        f"From the copyright file of Debian's {CORPUS_PACKAGE} {corpus.version}:\n\n" + text[start:end].rstrip() + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Reproduce checkpoints/tiny-trained from scratch.")
    parser.add_argument("--out", type=Path, default=CHECKPOINT_DIR)
    parser.add_argument("--workdir", type=Path, default=REPO / "build" / "train-tiny")
    parser.add_argument("--steps", type=int, default=TrainSettings.steps, help="optimizer steps (2048 tokens each)")
    args = parser.parse_args(argv)
    settings = TrainSettings(steps=args.steps)

    import numpy as np
    import torch

    args.workdir.mkdir(parents=True, exist_ok=True)
    log_path = args.workdir / "train.log"
    log_path.unlink(missing_ok=True)
    log = _log_to(log_path)
    log(
        f"[setup] {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; torch {torch.__version__}, "
        f"{settings.threads} threads; settings {dataclasses.asdict(settings)}"
    )
    try:
        corpus = fetch_corpus(args.workdir / "corpus", log)
    except TrainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    train_texts, held_texts = read_texts(corpus.train), read_texts(corpus.held_out)
    t = time.time()
    tokenizer = train_tokenizer(train_texts, MODEL_CONFIG["vocab_size"])
    train_ids, held_ids = encode_documents(tokenizer, train_texts), encode_documents(tokenizer, held_texts)
    log(
        f"[tokenizer] byte-level BPE of {tokenizer.get_vocab_size()} tokens in {time.time() - t:.0f}s; "
        f"{len(train_ids) / 1e6:.2f}M train tokens, {len(held_ids) / 1e6:.2f}M held-out tokens"
    )
    model = build_model(MODEL_CONFIG, settings.seed, tokenizer)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - experts + experts * model.config.num_experts_per_tok // model.config.num_local_experts
    log(
        f"[model] Llama4ForCausalLM {total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token; "
        f"layer types {model.config.layer_types}, MoE layers {model.config.moe_layers}"
    )
    result = train_model(model, train_ids, held_ids, settings, log)
    log(
        f"[train] done: {result['tokens'] / 1e6:.2f}M tokens in {result['seconds'] / 60:.1f} min, "
        f"{result['tokens_per_s']:,.0f} tokens/s (machine shared with other jobs)"
    )

    staging = args.out.with_name(f".{args.out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_checkpoint(model, tokenizer, staging)
    # the figures in the card are those of the shipped bf16 weights, read back in fp32
    from transformers import Llama4ForCausalLM

    shipped = Llama4ForCausalLM.from_pretrained(staging, dtype=torch.float32, use_safetensors=True)
    ppl, shares = held_out_stats(shipped, held_ids, settings.seq_len)
    log(
        f"[eval] shipped bf16 weights: held-out perplexity {ppl:.2f} over {len(held_ids) // settings.seq_len} "
        f"windows of {settings.seq_len} tokens"
    )
    for layer, share in zip(model.config.moe_layers, shares):
        log(f"[eval] layer {layer} expert load: " + " ".join(f"{x:.1%}" for x in share))
    plot_curve(result["history"], staging / "loss.png")
    write_held_out_sample(held_texts, staging / HELD_OUT_SAMPLE.name)
    write_corpus_license(corpus, staging / "PSF-LICENSE.txt")
    # the figure `llama4-deploy eval` reproduces on a bundle: the same windows of the shipped sample
    sample_ids = np.array(tokenizer.encode((staging / HELD_OUT_SAMPLE.name).read_text()).ids, dtype=np.int64)
    sample_ppl, _ = held_out_stats(shipped, sample_ids, settings.seq_len)
    log(
        f"[eval] shipped bf16 weights: perplexity {sample_ppl:.3f} on {HELD_OUT_SAMPLE.name} "
        f"({len(sample_ids) // settings.seq_len} windows of {settings.seq_len} tokens)"
    )
    (staging / "training.json").write_text(
        json.dumps(
            {
                "corpus": {
                    "package": CORPUS_PACKAGE,
                    "version": corpus.version,
                    "train_files": len(corpus.train),
                    "held_out_files": len(corpus.held_out),
                    "train_tokens": int(len(train_ids)),
                    "held_out_tokens": int(len(held_ids)),
                },
                "settings": dataclasses.asdict(settings),
                "parameters": total,
                "active_parameters": active,
                "seconds": round(result["seconds"], 1),
                "tokens_per_s": round(result["tokens_per_s"]),
                "held_out_perplexity": round(ppl, 3),
                "held_out_sample_perplexity": round(sample_ppl, 3),
                "expert_load": {str(layer): share for layer, share in zip(model.config.moe_layers, shares)},
                "history": result["history"],
            },
            indent=1,
        )
        + "\n"
    )
    shutil.copyfile(log_path, staging / "train.log")
    args.out.mkdir(parents=True, exist_ok=True)
    for produced in sorted(staging.iterdir()):  # replaces only what this script writes (the card stays)
        produced.replace(args.out / produced.name)
    staging.rmdir()
    log(f"[done] {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
