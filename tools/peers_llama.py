"""`make bench-peers`' llama.cpp side, run by build/peers/venv's Python (llama-cpp-python built from source there):
imports numpy and llama_cpp only, never this project. One process per call, so each measurement has the machine's
caches to itself and nothing of the other system loaded (tools/bench_peers.py alternates them).

    python tools/peers_llama.py quantize IN.gguf OUT.gguf TYPE       # TYPE: Q4_0, Q4_K_M, Q8_0
    python tools/peers_llama.py speed MODEL.gguf IDS.npy OUT.json --contexts 100,2000 --prefill 1024 --repeats 20
    python tools/peers_llama.py logits MODEL.gguf IDS.npy OUT.npy    # [len(ids), vocab] float32, every position
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

FTYPES = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


def quantize(source: str, target: str, kind: str, threads: int) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[kind])
    params.nthread = threads
    if llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params)) != 0:
        sys.exit(f"llama.cpp could not quantize {source} to {kind}")


def _model(path: str, context: int, batch: int, threads: int, logits_all: bool = False):
    from llama_cpp import Llama

    return Llama(
        model_path=path,
        n_ctx=context,
        n_batch=batch,
        n_ubatch=batch,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        verbose=False,
    )


def speed(path: str, ids: np.ndarray, contexts: list[int], prefill: int, repeats: int, threads: int) -> dict:
    """Median decode step (ms) after each context of cached tokens, and prefill tokens/s of `prefill` tokens."""
    tokens = [int(t) for t in ids]
    model = _model(path, max(max(contexts) + repeats + 8, prefill + 8), prefill, threads)
    decode = {}
    for context in contexts:
        model.reset()
        model.eval(tokens[:context])  # untimed: fills the cache
        times = []
        for step in range(repeats):
            start = time.perf_counter()
            model.eval([tokens[context + step]])
            times.append(time.perf_counter() - start)
        decode[str(context)] = 1e3 * float(np.median(times))
    model.reset()
    model.eval(tokens[:prefill])  # warm-up
    model.reset()
    start = time.perf_counter()
    model.eval(tokens[:prefill])
    return {"decode_ms": decode, "prefill_tok_s": prefill / (time.perf_counter() - start)}


def logits(path: str, ids: np.ndarray, threads: int) -> np.ndarray:
    tokens = [int(t) for t in ids]
    model = _model(path, len(tokens) + 8, min(len(tokens), 1024), threads, logits_all=True)
    model.eval(tokens)
    return np.asarray(model.scores[: len(tokens)], dtype=np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["quantize", "speed", "logits"])
    parser.add_argument("model")
    parser.add_argument("arg1")
    parser.add_argument("arg2")
    parser.add_argument("--contexts", default="100")
    parser.add_argument("--prefill", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.command == "quantize":
        quantize(args.model, args.arg1, args.arg2, args.threads)
        return
    ids = np.load(args.arg1)
    if args.command == "speed":
        contexts = [int(c) for c in args.contexts.split(",")]
        result = speed(args.model, ids, contexts, args.prefill, args.repeats, args.threads)
        with open(args.arg2, "w") as f:
            json.dump(result, f)
    else:
        np.save(args.arg2, logits(args.model, ids, args.threads))


if __name__ == "__main__":
    main()
