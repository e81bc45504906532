"""A synthetic Maverick-shaped checkpoint: real layout, seeded random values, written shard by shard.

`make synth-checkpoint` (python -m tools.synth) writes what the build at scale is measured on
(bench_build.py): Maverick's structure (48 layers, 128 routed experts plus the shared expert in every
second layer, dense layers with intermediate_size_mlp, no QK norm, NoPE every 4th layer, chunk 8192)
at reduced width, as a Hugging Face checkpoint directory: config.json (model_type llama4_text),
bf16 shards `model-0000i-of-0000n.safetensors` and `model.safetensors.index.json`.

Tensor names and shapes are those of transformers' Llama4ForCausalLM state dict (export/weights.py
maps them; the test checks them against transformers' own model). Memory stays bounded by CHUNK
elements: transformers never builds the model, and each tensor is generated and written in pieces
straight into its shard, after a header computed from the shapes alone (the safetensors format: an
8-byte little-endian header length, a JSON header of dtype, shape and data_offsets per tensor, padded
with spaces to 8 bytes, then the raw little-endian data).

Values: uniform with standard deviation STD from a generator seeded by (seed, tensor index), norms 1.
bf16 is the float32 value's upper 16 bits (truncation; these are random numbers, not a model).
The directory appears only when complete (staging dir, rename); an existing directory is reused
when it is a synth checkpoint of the same config, and refused otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

from llama4_deploy.export.shape import ModelShape
from llama4_deploy.export.weights import all_weights

CHUNK = 1 << 24  # elements generated at once (64 MB of float32)
STD = 0.02
MARKER = "synth.json"
DEFAULT_OUT = Path("build/synth-maverick")


class SynthError(ValueError):
    """A synth request that cannot be carried out; one sentence for the user."""


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Sizes of the synthetic checkpoint; the defaults give Maverick's structure in 4.46 GB of bf16."""

    hidden_size: int = 512
    intermediate_size: int = 448  # per expert and shared expert
    intermediate_size_mlp: int = 1536  # dense layers
    num_hidden_layers: int = 48
    num_local_experts: int = 128
    interleave_moe_layer_step: int = 2
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 64
    vocab_size: int = 8192
    attention_chunk_size: int = 8192
    shard_bytes: int = 1 << 30  # a shard closes once it holds this much
    seed: int = 0

    def config_json(self) -> dict:
        """config.json of a Llama 4 text checkpoint (the keys transformers' Llama4TextConfig reads)."""
        return {
            "architectures": ["Llama4ForCausalLM"],
            "model_type": "llama4_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "intermediate_size_mlp": self.intermediate_size_mlp,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": 1048576,
            "rms_norm_eps": 1e-05,
            "rope_theta": 500000.0,
            "rope_scaling": None,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": 1,
            "interleave_moe_layer_step": self.interleave_moe_layer_step,
            "use_qk_norm": False,
            "attention_chunk_size": self.attention_chunk_size,
            "attn_temperature_tuning": True,
            "floor_scale": 8192,
            "attn_scale": 0.1,
            "attention_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "torch_dtype": "bfloat16",
        }

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(checkpoint name, shape) of every tensor, in layer order."""
        shape = ModelShape.from_config(self.config_json())
        seen: dict[str, tuple[int, ...]] = {}
        for source in all_weights(shape).values():
            seen.setdefault(source.checkpoint_name, source.checkpoint_shape)
        return list(seen.items())

    @property
    def total_bytes(self) -> int:
        return sum(2 * int(np.prod(dims)) for _, dims in self.tensors())


def _shards(tensors: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, current, size = [], [], 0
    for name, dims in tensors:
        current.append((name, dims))
        size += 2 * int(np.prod(dims))
        if size >= shard_bytes:
            shards.append(current)
            current, size = [], 0
    if current:
        shards.append(current)
    return shards


def _header(tensors: list[tuple[str, tuple[int, ...]]]) -> bytes:
    entries, offset = {}, 0
    for name, dims in tensors:
        size = 2 * int(np.prod(dims))
        entries[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + size]}
        offset += size
    entries["__metadata__"] = {"format": "pt"}
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _write_values(handle, name: str, dims: tuple[int, ...], seed: int, index: int, progress) -> None:
    """One tensor's bf16 values, CHUNK elements at a time."""
    count = int(np.prod(dims))
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        one = np.array([0x3F80], dtype="<u2")  # bf16 1.0
        for start in range(0, count, CHUNK):
            n = min(CHUNK, count - start)
            handle.write(np.broadcast_to(one, (n,)).tobytes())
            progress(2 * n)
        return
    rng = np.random.default_rng([seed, index])
    half_width = np.float32(STD * np.sqrt(3.0))  # uniform [-a, a] has std a / sqrt(3)
    for start in range(0, count, CHUNK):
        n = min(CHUNK, count - start)
        values = rng.random(n, dtype=np.float32)
        values *= 2 * half_width
        values -= half_width
        handle.write((values.view("<u4") >> 16).astype("<u2").tobytes())
        progress(2 * n)


def write_checkpoint(
    out: str | os.PathLike = DEFAULT_OUT,
    config: SynthConfig = SynthConfig(),
    log=lambda message: print(message, file=sys.stderr, flush=True),
) -> Path:
    """Write the checkpoint into `out` (reused if it holds this very synth checkpoint); returns its path."""
    from tqdm import tqdm

    out = Path(out)
    record = dataclasses.asdict(config)
    if out.exists():
        marker = out / MARKER
        if not marker.is_file():
            raise SynthError(f"{out} exists and is not a synth checkpoint this tool wrote; choose another --out")
        if json.loads(marker.read_text()) != record:
            raise SynthError(f"{out} holds a synth checkpoint of another config; remove it or choose another --out")
        log(f"[synth] {out} already holds this checkpoint ({config.total_bytes / 1e9:.2f} GB)")
        return out
    tensors = config.tensors()
    shards = _shards(tensors, config.shard_bytes)
    staging = out.parent / f".{out.name}.synth-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    weight_map, index, written = {}, 0, [0]

    def progress(n: int) -> None:  # a disabled tqdm (no terminal) counts nothing, so the log keeps its own count
        written[0] += n
        bar.update(n)

    try:
        with tqdm(
            total=config.total_bytes, unit="B", unit_scale=True, desc="[synth] shards", file=sys.stderr, disable=None
        ) as bar:
            for number, shard in enumerate(shards, 1):
                file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
                with open(staging / file, "wb") as handle:
                    handle.write(_header(shard))
                    for name, dims in shard:
                        _write_values(handle, name, dims, config.seed, index, progress)
                        weight_map[name] = file
                        index += 1
                if not bar.disable:
                    continue
                log(
                    f"[synth] shard {number}/{len(shards)} written "
                    f"({written[0] / 1e9:.2f} of {config.total_bytes / 1e9:.2f} GB)"
                )
        (staging / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": config.total_bytes}, "weight_map": weight_map}, indent=2)
        )
        (staging / "config.json").write_text(json.dumps(config.config_json(), indent=2))
        (staging / MARKER).write_text(json.dumps(record, indent=2))
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"[synth] wrote {out}: {len(tensors)} tensors, {len(shards)} shards, {config.total_bytes / 1e9:.2f} GB bf16")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"checkpoint directory (default {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        write_checkpoint(args.out, SynthConfig(seed=args.seed))
    except (SynthError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
