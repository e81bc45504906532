"""lm-evaluation-harness over a loaded bundle: `BundleLM`, the model class, and `run_tasks`, what
`llama4-deploy eval BUNDLE --tasks ...` runs (needs the `eval` extra: lm-eval is imported here, at the top,
so the rest of the package never needs it).

lm-eval asks a model three things; each goes through the runtime path that serves it in production:
- `loglikelihood(context, continuation)`: the engine's prefill path, the rows of a request batch fed together as
  one ragged batch (`Engine.prefill` with every position's logits kept, up to the engine's max_batch rows), and
  log-softmax in float64 over the continuation's positions; a sequence longer than the bundle's context keeps its
  last tokens, as lm-eval's transformers model does.
- `loglikelihood_rolling(text)`: the windows of `eval`'s perplexity (llama4_deploy/quality/evaluate.py):
  non-overlapping windows of the bundle's context, each scored from a fresh cache through the same path; lm-eval's
  rolling windows (its `get_rolling_token_windows`, as its transformers model uses them) also predict each window's
  first token (from the token before it, the first window's from the begin-of-text token), and the tokens past
  the last full window are predicted by one more full window ending at the text's end, so every token counts once.
- `generate_until(context, gen_kwargs)`: the continuous-batching scheduler (runtime/scheduler.py), every request
  submitted at once; a request stops at an end-of-sequence token, at `max_gen_toks`, or at the first of its
  `until` strings (watched token by token through the tokenizer's stream; the text is cut before it). A context
  longer than the bundle's context less `max_gen_toks` keeps its last tokens, as lm-eval's transformers model does.
  Generation arguments the sampler cannot honour are refused, not ignored.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from llama4_deploy.runtime import Engine, Request, Scheduler, load
from llama4_deploy.runtime.tokenizer import load_tokenizer

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default for generate_until tasks that set none
# gen_kwargs lm-eval tasks set that the sampler honours; anything else is refused (never silently dropped)
GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "seed"}


def continuation_logprob(logits: np.ndarray, continuation: Sequence[int]) -> tuple[float, bool]:
    """Sum of log p(token) over the continuation, logits [len(continuation), V] predicting its tokens (float64
    log-softmax), and whether each token is the argmax (lm-eval's `is_greedy`)."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
    targets = np.asarray(continuation)
    logprob = float((logits[np.arange(len(targets)), targets] - log_z).sum())
    return logprob, bool((logits.argmax(-1) == targets).all())


class BundleLM(TemplateLM):
    """An lm-eval model over a loaded Engine (see the module docstring)."""

    def __init__(self, engine: Engine, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS):
        super().__init__()
        self.engine = engine
        self.tokenizer = load_tokenizer(engine.manifest)
        self.max_length = engine.manifest.max_context
        self.max_gen_toks = max_gen_toks
        eos = engine.manifest.eos_token_ids
        if not eos:
            raise ValueError(f"bundle {engine.manifest.name} names no end-of-sequence token; lm-eval needs one")
        self._eot = eos[0]
        bos = engine.manifest.model.get("bos_token_id")
        self._prefix = bos if isinstance(bos, int) else self._eot

    # -- what TemplateLM asks ---------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._prefix  # the begin-of-text token the model was trained to see first, where it has one

    @property
    def tokenizer_name(self) -> str:
        return f"{self.engine.manifest.name}/tokenizer.json"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(
            string, add_special_tokens=True if add_special_tokens is None else add_special_tokens
        )

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    # -- loglikelihood ---------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids); rows go through the prefill path
        max_batch at a time."""
        rows = []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("lm-eval asked for the log-likelihood of an empty continuation")
            # the last max_length + 1 tokens, less the final one (predicted, never fed), as lm-eval's HF model does
            fed = (list(context) + list(continuation))[-(self.max_length + 1) :][:-1]
            rows.append((fed, list(continuation)))
        results: list[tuple[float, bool]] = []
        batch = self.engine.max_batch
        with tqdm(total=len(rows), desc="loglikelihood", disable=disable_tqdm) as progress:
            for start in range(0, len(rows), batch):
                group = rows[start : start + batch]
                every = self._prefill_all([fed for fed, _ in group])
                for (fed, continuation), logits in zip(group, every):
                    results.append(continuation_logprob(logits[len(fed) - len(continuation) :], continuation))
                progress.update(len(group))
        return results

    def _prefill_all(self, prompts: list[list[int]]) -> list[np.ndarray]:
        """Every position's logits [len(prompt), V] of each prompt, one ragged prefill batch from a fresh cache."""
        prompts = [self.engine._check_prompt(p, 0, "sequence") for p in prompts]
        with self.engine._calls:  # one caller at a time, as Engine.score
            cache = self.engine.new_cache(len(prompts))
            _, every = self.engine.prefill(cache, prompts, keep_all=True)
        return every

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for context, predicted in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append(((None, None), context, predicted))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[index] += logprob
        return totals

    # -- generate_until --------------------------------------------------------------------------
    def _request(self, context: str, gen_kwargs: dict) -> tuple[Request, tuple[str, ...]]:
        unknown = set(gen_kwargs) - GEN_KWARGS
        if unknown:
            raise ValueError(
                f"generation arguments {sorted(unknown)} cannot be honoured by the bundle's sampler "
                f"(it takes {', '.join(sorted(GEN_KWARGS))})"
            )
        until = gen_kwargs.get("until") or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        max_gen = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        if not 1 <= max_gen < self.max_length:
            raise ValueError(
                f"max_gen_toks is {max_gen}; the bundle's context of {self.max_length} allows 1 to "
                f"{self.max_length - 1}"
            )
        sampled = bool(gen_kwargs.get("do_sample", False))
        temperature = float(gen_kwargs.get("temperature", 1.0 if sampled else 0.0)) if sampled else 0.0
        if sampled and temperature == 0.0:
            raise ValueError("do_sample is true with temperature 0; give a positive temperature or do_sample false")
        prompt = self.tok_encode(context)[-(self.max_length - max_gen) :] if context else [self.prefix_token_id]
        request = Request(
            prompt,
            max_gen,
            temperature=temperature,
            top_p=float(gen_kwargs.get("top_p", 1.0)),
            seed=gen_kwargs.get("seed"),
            stop_tokens=frozenset(self.engine.manifest.eos_token_ids),
        )
        return request, until

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        scheduler = Scheduler(self.engine, max_queue=max(1, len(requests)))
        progress = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        streams, submitted = {}, []

        def listen(request: Request, output) -> None:
            stream = streams[request.id]
            if output.token is not None and stream.stop:
                stream.push(output.token)
                if stream.stopped:
                    scheduler.cancel(request)  # the rest would be cut anyway
            if output.finish_reason is not None:
                progress.update(1)

        for context, gen_kwargs in (request.args for request in requests):
            request, until = self._request(context, dict(gen_kwargs))
            streams[request.id] = self.tokenizer.stream(until)
            request.listener = listen
            submitted.append((scheduler.submit(request), until))
        with self.engine._calls:
            scheduler.run_until_idle()
        progress.close()
        texts = []
        for request, until in submitted:
            if request.finish_reason == "error":
                raise RuntimeError(f"generation failed: {request.error}")
            tokens = [t for t in request.tokens if t not in request.stop_tokens]
            texts.append(cut_at_stop(self.tok_decode(tokens), until))
        return texts


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string."""
    hits = [i for i in (text.find(s) for s in until if s) if i >= 0]
    return text[: min(hits)] if hits else text


def offline(allow_downloads: bool) -> None:
    """Without `allow_downloads`, datasets and huggingface_hub read only local files and their cache: lm-eval's
    own tasks fetch their data from the Hugging Face Hub, which this tool does only when asked. Set before either
    library is imported (both read the switch at import)."""
    if not allow_downloads:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"


def run_tasks(
    bundle: str | Path,
    tasks: Sequence[str],
    include_path: str | Path | None = None,
    limit: int | None = None,
    threads: int | None = None,
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
    allow_downloads: bool = False,
) -> dict:
    """lm-eval's simple_evaluate over the bundle; lm-eval's results dict (`lm_eval.utils.make_table` prints it).
    `allow_downloads`: let lm-eval fetch task data from the Hugging Face Hub (off: local files and the cache only)."""
    offline(allow_downloads)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("--tasks names no task")
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--include-path {include_path} is not a directory")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit is {limit}; it must be at least 1")
    # lm-eval's own index (thousands of YAML files) is read only when a task is not in --include-path alone
    manager = TaskManager(include_path=str(include_path), include_defaults=False) if include_path else None
    if manager is None or any(not manager.match_tasks([name]) for name in tasks):
        manager = TaskManager(include_path=str(include_path) if include_path else None)
    missing = [name for name in tasks if not manager.match_tasks([name])]
    if missing:
        raise ValueError(
            f"lm-eval knows no task {', '.join(missing)}"
            + ("" if include_path else " (a task of your own: --include-path DIR with its YAML)")
        )
    with load(bundle, threads=threads) as engine:
        try:
            return simple_evaluate(
                model=BundleLM(engine, max_gen_toks=max_gen_toks),
                tasks=list(tasks),
                limit=limit,
                task_manager=manager,
                log_samples=True,
            )
        except (ConnectionError, OSError) as err:  # task data that is neither local nor cached
            reason = " ".join(str(err).split())[:300]
            hint = "" if allow_downloads else "; --allow-downloads lets lm-eval fetch it from the Hugging Face Hub"
            raise ValueError(f"lm-eval could not load the task data ({reason}){hint}") from None
