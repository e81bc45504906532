"""`make bench-peers`: this project's engines against llama.cpp on one scout-shaped checkpoint the bench writes.

The checkpoint keeps what llama.cpp hard-codes for Llama 4 (chunk 8192, temperature floor 8192 and scale 0.1, QK
norm with 16 experts, every 4th layer NoPE) and Scout's shape at reduced width: hidden 512, 8 layers, 16 experts of
1024 in every layer plus the shared expert, seeded random weights (about 1 GB fp32), with a small byte-level BPE
tokenizer of its own (llama.cpp's converter needs one; the bench feeds token ids). llama.cpp's own converter
(tools/peers_convert.py) makes the f32 GGUF and llama.cpp's quantizer Q8_0, Q4_0 and Q4_K_M from it; this project
builds fp32 and its int4 forms from the same checkpoint.

Each measurement is its own process (tools/peers_llama.py under build/peers/venv for llama.cpp, this module's
`--worker` for ours), the systems alternating round after round, 2 threads each; the table gives each figure's range
over the rounds: decode step at 100 / 2k / 4k cached tokens (batch 1), prefill of 1024 tokens, and quality against
transformers over one sequence (mean KL(transformers || system) per position, top-1 agreement).

    python -m tools.bench_peers --llama-cpp DIR --peers-python PYTHON [--quick] [--rounds N] [--work DIR]

--quick: a smoke run on a small checkpoint (same structure, hidden 128, 4 layers): shows the table prints, proves
nothing. Never part of `make test`. Figures taken on a shared or busy machine are not comparable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Sizes:
    hidden: int = 512
    layers: int = 8
    experts: int = 16  # llama.cpp turns QK norm on for any expert count but 128
    expert_size: int = 1024
    heads: tuple[int, int, int] = (16, 8, 128)  # query heads, kv heads, head_dim (Scout's geometry)
    vocab: int = 2048
    contexts: tuple[int, ...] = (100, 2000, 4000)
    prefill: int = 1024
    repeats: int = 20  # decode steps timed per context
    quality_tokens: int = 512
    rounds: int = 3


FULL = Sizes()
QUICK = Sizes(128, 4, 16, 128, (4, 2, 32), 512, (100, 300), 64, 3, 64, 1)

# our forms: name -> build() overrides
ALL_4BIT = {"int4_zero_point": "symmetric", "int8_weights": ()}
OURS = {
    "ours fp32": {},
    "ours int4 block 128, float activations": {
        "precision": "int4",
        "block_size": 128,
        "int4_compute": "float",
        **ALL_4BIT,
    },
    "ours int4 block 32, int8 activations": {"precision": "int4", **ALL_4BIT},
    "ours int4 (default build: block 32, int8 activations, asymmetric, V at 8 bits)": {"precision": "int4"},
}
PEERS = ("f32", "Q8_0", "Q4_0", "Q4_K_M")  # llama.cpp's


def config(sizes: Sizes) -> dict:
    q, k, d = sizes.heads
    return {
        "vocab_size": sizes.vocab,
        "hidden_size": sizes.hidden,
        "intermediate_size": sizes.expert_size,
        "intermediate_size_mlp": 2 * sizes.expert_size,
        "num_hidden_layers": sizes.layers,
        "num_attention_heads": q,
        "num_key_value_heads": k,
        "head_dim": d,
        "num_local_experts": sizes.experts,
        "num_experts_per_tok": 1,
        "interleave_moe_layer_step": 1,
        "use_qk_norm": True,
        "attention_chunk_size": 8192,  # llama.cpp's fixed chunk
        "attn_temperature_tuning": True,
        "floor_scale": 8192,
        "attn_scale": 0.1,
        "max_position_embeddings": 16384,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 16.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
        },
    }


def write_tokenizer(directory: Path, vocab: int) -> None:
    """A byte-level BPE (tokenizers' trainer on a fixed text), at most `vocab` ids, and its tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|begin_of_text|>", "<|eot|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab, 400), special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = ["the quick brown fox jumps over the lazy dog", "a peer benchmark of two inference engines"] * 50
    tokenizer.train_from_iterator(text, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": special[0], "eos_token": special[1]}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def prepare(sizes: Sizes, work: Path, llama_cpp: Path, peers_python: str, log) -> dict[str, Path]:
    """Checkpoint, our bundles, the GGUF files (each made once per work directory); name -> path."""
    from llama4_deploy.build import build
    from llama4_deploy.export.reference import random_model

    checkpoint = work / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        log(f"[peers] writing the checkpoint into {checkpoint}")
        random_model(config(sizes), seed=3, logit_gain=18.0, router_gain=7.0).save_pretrained(checkpoint)
        write_tokenizer(checkpoint, sizes.vocab)
    systems: dict[str, Path] = {}
    context = max(sizes.contexts) + sizes.repeats + 16
    for index, (name, overrides) in enumerate(OURS.items()):
        out = work / f"ours-{index}"
        if not (out / "manifest.json").is_file():
            log(f"[peers] building {name}")
            build(None, checkpoint=checkpoint, out=out, max_batch=1, prefill_tokens=min(sizes.prefill, 1024),
                  max_context=max(context, sizes.quality_tokens), log=lambda _: None, **overrides)  # fmt: skip
        systems[name] = out
    f32 = work / "model-f32.gguf"
    if not f32.is_file():
        log("[peers] converting with llama.cpp's convert_hf_to_gguf.py")
        subprocess.run([sys.executable, "-m", "tools.peers_convert", str(llama_cpp), str(checkpoint), str(f32)],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)  # fmt: skip
    systems["llama.cpp f32"] = f32
    for kind in PEERS[1:]:
        path = work / f"model-{kind}.gguf"
        if not path.is_file():
            log(f"[peers] quantizing to {kind} with llama.cpp")
            run_llama(peers_python, "quantize", str(f32), str(path), kind)
        systems[f"llama.cpp {kind}"] = path
    return systems


def run_llama(peers_python: str, *args: str) -> None:
    subprocess.run([peers_python, str(ROOT / "tools" / "peers_llama.py"), *args], check=True)


def measure(name: str, path: Path, sizes: Sizes, ids: Path, out: Path, peers_python: str, threads: int) -> dict:
    """One speed measurement of one system, in its own process."""
    common = ["--contexts", ",".join(map(str, sizes.contexts)), "--prefill", str(sizes.prefill),
              "--repeats", str(sizes.repeats), "--threads", str(threads)]  # fmt: skip
    if name.startswith("llama.cpp"):
        run_llama(peers_python, "speed", str(path), str(ids), str(out), *common)
    else:
        subprocess.run([sys.executable, "-m", "tools.bench_peers", "--worker", "speed", str(path), str(ids), str(out),
                        *common], check=True, cwd=ROOT)  # fmt: skip
    return json.loads(out.read_text())


def logits_of(name: str, path: Path, ids: Path, out: Path, peers_python: str, threads: int) -> np.ndarray:
    if name.startswith("llama.cpp"):
        run_llama(peers_python, "logits", str(path), str(ids), str(out), "--threads", str(threads))
    else:
        subprocess.run([sys.executable, "-m", "tools.bench_peers", "--worker", "logits", str(path), str(ids),
                        str(out), "--threads", str(threads)], check=True, cwd=ROOT)  # fmt: skip
    return np.load(out)


def quality(logits: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(mean KL(reference || logits) per position, top-1 agreement), log-softmax in float64."""

    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = log_softmax(reference), log_softmax(logits)
    kl = (np.exp(p) * (p - q)).sum(-1)
    return float(kl.mean()), float((logits.argmax(-1) == reference.argmax(-1)).mean())


def span(values: list[float], digits: int) -> str:
    lo, hi = min(values), max(values)
    return (
        f"{lo:.{digits}f}"
        if len(values) == 1 or f"{lo:.{digits}f}" == f"{hi:.{digits}f}"
        else (f"{lo:.{digits}f}–{hi:.{digits}f}")
    )


def table(sizes: Sizes, speeds: dict[str, list[dict]], qualities: dict[str, tuple[float, float]]) -> str:
    head = [f"decode b1, {c} cached (ms)" for c in sizes.contexts]
    head += [f"prefill {sizes.prefill} tok/s", "mean KL vs transformers", "top-1 agreement"]
    lines = ["| | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name, runs in speeds.items():
        decode = [span([run["decode_ms"][str(c)] for run in runs], 2) for c in sizes.contexts]
        prefill = span([run["prefill_tok_s"] for run in runs], 0)
        kl, top1 = qualities[name]
        lines.append(f"| {name} | " + " | ".join([*decode, prefill, f"{kl:.2e}", f"{top1:.1%}"]) + " |")
    return "\n".join(lines)


def worker(args) -> None:
    """This project's side of one measurement (`--worker speed|logits BUNDLE IDS OUT`)."""
    from llama4_deploy.runtime import load

    ids = [int(t) for t in np.load(args.ids)]
    with load(args.bundle, threads=args.threads) as engine:
        if args.command == "logits":
            np.save(args.out, engine.score(ids, mode="prefill").astype(np.float32))
            return
        contexts = [int(c) for c in args.contexts.split(",")]
        decode = {}
        for context in contexts:
            cache = engine.new_cache(1)
            engine.prefill(cache, [ids[:context]])  # untimed: fills the cache
            times = []
            for step in range(args.repeats):
                token = np.array([ids[context + step]])
                start = time.perf_counter()
                engine.decode_step(cache, token, np.array([True]))
                times.append(time.perf_counter() - start)
            decode[str(context)] = 1e3 * float(np.median(times))
        engine.prefill(engine.new_cache(1), [ids[: args.prefill]])  # warm-up
        start = time.perf_counter()
        engine.prefill(engine.new_cache(1), [ids[: args.prefill]])
        prefill = args.prefill / (time.perf_counter() - start)
    Path(args.out).write_text(json.dumps({"decode_ms": decode, "prefill_tok_s": prefill}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, help="llama.cpp's source tree (its converter)")
    parser.add_argument("--peers-python", help="the Python of the venv llama-cpp-python was built into")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, help="where the checkpoint, bundles and GGUF files are kept")
    parser.add_argument("--worker", dest="command", choices=["speed", "logits"], help=argparse.SUPPRESS)
    parser.add_argument("bundle", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("ids", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("out", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--contexts", default="100", help=argparse.SUPPRESS)
    parser.add_argument("--prefill", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=20, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.command:
        worker(args)
        return
    if args.llama_cpp is None or args.peers_python is None:
        parser.error("--llama-cpp and --peers-python are required (make bench-peers gives them)")
    sizes = QUICK if args.quick else FULL
    if args.rounds:
        sizes = dataclasses.replace(sizes, rounds=args.rounds)
    work = args.work or ROOT / "build" / "peers" / ("work-quick" if args.quick else "work")
    work.mkdir(parents=True, exist_ok=True)
    log = lambda line: print(line, flush=True)  # noqa: E731
    systems = prepare(sizes, work, args.llama_cpp, args.peers_python, log)

    from llama4_deploy.export.reference import random_model, reference_logits

    longest = max(max(sizes.contexts) + sizes.repeats, sizes.prefill, sizes.quality_tokens)
    rng = np.random.default_rng(0)
    ids = rng.integers(2, sizes.vocab, size=longest)
    ids_file = work / "ids.npy"
    np.save(ids_file, ids)
    log(f"[peers] transformers reference over {sizes.quality_tokens} tokens")
    reference = reference_logits(random_model(config(sizes), 3, 18.0, 7.0), ids[: sizes.quality_tokens].tolist())
    reference = np.asarray(reference, dtype=np.float32)
    quality_ids = work / "quality-ids.npy"
    np.save(quality_ids, ids[: sizes.quality_tokens])
    with tempfile.TemporaryDirectory() as scratch:
        qualities = {
            name: quality(
                logits_of(name, path, quality_ids, Path(scratch) / "logits.npy", args.peers_python, args.threads),
                reference,
            )  # fmt: skip
            for name, path in systems.items()
        }
        speeds: dict[str, list[dict]] = {name: [] for name in systems}
        for round_ in range(sizes.rounds):
            log(f"[peers] round {round_ + 1} of {sizes.rounds}")
            for name, path in systems.items():  # alternating: every system once per round
                out = Path(scratch) / "speed.json"
                speeds[name].append(measure(name, path, sizes, ids_file, out, args.peers_python, args.threads))
    print(f"\n{args.threads} threads, {sizes.rounds} round(s), each system in its own process; ranges over rounds\n")
    print(table(sizes, speeds, qualities))


if __name__ == "__main__":
    main()
