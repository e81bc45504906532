"""A text-in Python API over a bundle, like vLLM's `LLM`: prompts as text (or token ids), chat messages through
the checkpoint's chat template, the same sampling parameters as the server, run by the same scheduler.

    llm = llama4_deploy.LLM("build/tiny-trained")
    outputs = llm.generate(["The list of"], llama4_deploy.SamplingParams(max_tokens=16, temperature=0.7, seed=0))
    outputs[0].outputs[0].text
    llm.chat([{"role": "user", "content": "Hello"}])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from llama4_deploy.runtime import arguments, load
from llama4_deploy.runtime.sampling import SamplingParams as SamplerParams
from llama4_deploy.runtime.scheduler import Request, Scheduler
from llama4_deploy.runtime.tokenizer import load_tokenizer
from llama4_deploy.serving.protocol import SEED_LIMIT, scalar_values
from llama4_deploy.serving.server import ChatTemplate


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What to generate: vLLM's names and meanings (temperature 0 is greedy; sample j draws with seed + j; with
    best_of, best_of samples are drawn and the n with the highest cumulative log-probability returned, best first)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    seed: int | None = None
    n: int = 1
    best_of: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False

    def sampler(self, vocab_size: int) -> SamplerParams:
        """The runtime's parameters, each checked (one sentence naming the parameter when refused)."""
        return SamplerParams(
            arguments.temperature(self.temperature),
            arguments.top_p(self.top_p),
            arguments.integer(self.top_k, "top_k"),
            arguments.real(self.min_p, "min_p"),
            arguments.real(self.presence_penalty, "presence_penalty"),
            arguments.real(self.frequency_penalty, "frequency_penalty"),
            arguments.real(self.repetition_penalty, "repetition_penalty"),
            arguments.logit_bias(self.logit_bias),
            arguments.integer(self.min_tokens, "min_tokens"),
        ).check(vocab_size)


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    cumulative_logprob: float | None = None  # with best_of > n: what the samples were ranked by


@dataclasses.dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


class LLM:
    """A bundle with its tokenizer and chat template; `generate` and `chat` run prompts through a scheduler (all
    prompts of a call batched together, n samples sharing their prompt's prefill)."""

    def __init__(self, bundle, threads: int | None = None, chat_template: str | None = None):
        self.engine = load(bundle, threads=threads)
        self.tokenizer = load_tokenizer(self.engine.manifest)
        self.chat_template = ChatTemplate(self.engine.manifest.tokenizer_config_path, chat_template)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(
        self, prompts: str | Sequence[str] | Sequence[Sequence[int]], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        params = params or SamplingParams()
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        ids = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                try:
                    scalar_values(prompt)
                except ValueError as err:
                    raise ValueError(f"prompt {i} is {err}") from None
                ids.append(self.tokenizer.encode(prompt))
            else:
                ids.append(arguments.token_ids(prompt, self.engine.vocab_size, f"prompt {i}"))
        return self._run([p if isinstance(p, str) else None for p in prompts], ids, params)

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        """One conversation through the chat template (a list of {"role", "content"}), answered once."""
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("content", ""), str):
                raise TypeError(f"message {i} must be a dict with a string content, got {message!r}")
            scalar_values(message.get("content", ""))
        text = self.chat_template.render(messages)
        return self._run([text], [self.tokenizer.encode(text, add_special_tokens=False)], params or SamplingParams())[0]

    def _run(self, texts: list[str | None], ids: list[list[int]], params: SamplingParams) -> list[RequestOutput]:
        sampler = params.sampler(self.engine.vocab_size)
        max_tokens = arguments.integer(params.max_tokens, "max_tokens", 1)
        n = arguments.integer(params.n, "n", 1)
        count = n if params.best_of is None else arguments.integer(params.best_of, "best_of", 1)
        if count < n:
            raise ValueError(f"best_of is {count}, less than n {n}; best_of samples are drawn and the n best returned")
        field = "n" if params.best_of is None else "best_of"
        if count > self.engine.max_batch:
            raise ValueError(
                f"{field} is {count}; the samples of a prompt run together, at most {self.engine.max_batch}"
            )
        rank = count > n  # each sample's token log-probabilities are computed to rank the samples by their sum
        seed = arguments.seed(params.seed)
        stop = set(arguments.token_ids(params.stop_token_ids, self.engine.vocab_size, "stop_token_ids"))
        if not arguments.flag(params.ignore_eos, "ignore_eos"):
            stop |= set(self.engine.manifest.eos_token_ids)
        stop_strings = tuple(params.stop)
        if not all(isinstance(s, str) for s in stop_strings):
            raise TypeError(f"stop must be a list of strings, got {params.stop!r}")
        scheduler = Scheduler(self.engine, max_queue=len(ids) * count)
        runs = []
        for prompt in ids:
            group = []
            for j in range(count):
                request = Request(
                    prompt,
                    max_tokens,
                    temperature=sampler.temperature,
                    top_p=sampler.top_p,
                    seed=None if seed is None else (seed + j) % SEED_LIMIT,
                    stop_tokens=frozenset(stop),
                    top_k=sampler.top_k,
                    min_p=sampler.min_p,
                    presence_penalty=sampler.presence_penalty,
                    frequency_penalty=sampler.frequency_penalty,
                    repetition_penalty=sampler.repetition_penalty,
                    logit_bias=dict(sampler.logit_bias),
                    min_tokens=sampler.min_tokens,
                    logprobs=0 if rank else None,
                )
                group.append(_Text(self.tokenizer.stream(stop_strings), scheduler, request))
            group[0].request.siblings = [run.request for run in group[1:]]
            scheduler.submit(group[0].request)
            runs.append(group)
        scheduler.run_until_idle()
        outputs = []
        for text, prompt, group in zip(texts, ids, runs):
            kept = list(enumerate(group))  # index: the sample's own (seed + index), as vLLM's CompletionOutput.index
            if rank:
                kept = sorted(kept, key=lambda item: -item[1].cumulative_logprob)[:n]  # stable: ties in sample order
            completions = [
                CompletionOutput(j, run.text(), run.tokens, run.finish_reason, run.cumulative_logprob if rank else None)
                for j, run in kept
            ]
            outputs.append(RequestOutput(text, prompt, completions))
        return outputs


class _Text:
    """One sample's text as its tokens arrive: the server's rules (stop strings end the text, the stop token is
    not part of it, held-back text flushed at the end)."""

    def __init__(self, stream, scheduler: Scheduler, request: Request):
        self.stream, self.scheduler, self.request = stream, scheduler, request
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.cumulative_logprob = 0.0  # of every token taken, the stop token too (as the server's best_of)
        request.listener = self._on_output

    def _on_output(self, request: Request, output) -> None:
        if output.token is None:
            self.finish_reason = self.finish_reason or output.finish_reason
            return
        if self.finish_reason is not None:
            return
        if output.logprob is not None:
            self.cumulative_logprob += output.logprob
        if output.token in request.stop_tokens:
            return
        self.tokens.append(output.token)
        self.stream.push(output.token)
        if self.stream.stopped:
            self.finish_reason = "stop"
            self.scheduler.cancel(request)

    def text(self) -> str:
        self.stream.flush()
        return self.stream.text
