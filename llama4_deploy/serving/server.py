"""`llama4-deploy serve`: an OpenAI-compatible HTTP server over a bundle (FastAPI + uvicorn).

This layer only translates: request bodies (llama4_deploy.serving.protocol) become scheduler `Request`s,
their `Output`s become OpenAI responses or server-sent-event chunks. Batching lives in
runtime/scheduler.py, which a worker thread steps; each request's outputs cross to the event loop
through an asyncio queue.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus text).
Faults: invalid input -> 400 with an OpenAI error object (never 500); a body over `max_request_bytes`
-> 413; a full queue -> 429 with Retry-After; a client that disconnects cancels its request and frees its
row; an error in a scheduler step fails that step's requests (500 / an error event) and the scheduler
goes on; should its thread ever stop, /health and new requests answer 503. SIGTERM stops intake (503),
drains in-flight requests for at most `drain_timeout` seconds, answers what is left with a 503 error
object, then exits 0. Tokenizing and chat-template rendering run on worker threads, so a huge prompt
never stalls the event loop (/health answers meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import queue
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama4_deploy import __version__
from llama4_deploy.runtime import load, read_manifest
from llama4_deploy.runtime.engine import Engine
from llama4_deploy.runtime.grammar import GrammarError, Grammars
from llama4_deploy.runtime.images import image_from_url
from llama4_deploy.runtime.scheduler import Output, QueueFull, Request, Scheduler, StepRecord, Unavailable
from llama4_deploy.runtime.tokenizer import Tokenizer, load_tokenizer
from llama4_deploy.serving.protocol import (
    SEED_LIMIT,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
)
from llama4_deploy.serving.tools import PARSERS, ToolSchemaError, call_schema, parse, pythonic_call_grammar

log = logging.getLogger("llama4_deploy.serving.server")
RETRY_AFTER_S = 1
MAX_REQUEST_BYTES = 32 * 2**20  # a body above it is answered 413 before it is read; --max-request-bytes
# a burst of requests reaching an idle server arrives over a few milliseconds: waiting that long lets it prefill as
# one step (Scheduler's admission_wait); a lone request pays it once in its time to first token
ADMISSION_WAIT_MS = 5.0
DRAIN_GRACE_S = 5  # uvicorn cancels handlers this long after the drain has answered what was left
# Llama 4's header format; used when the bundle has no tokenizer_config.json with a chat_template
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|header_start|>{{ message['role'] }}<|header_end|>\n\n{{ message['content'] | trim }}<|eot|>"
    "{% endfor %}{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)
DEFAULT_BOS = "<|begin_of_text|>"


# where an image part stands in the rendered chat (a private-use character no tokenizer merges with text)
IMAGE_MARKER = "\ue000image\ue000"


class ClientError(ValueError):
    """Bad client input that only shows once the request is interpreted (400)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


# -- chat template ------------------------------------------------------------------------------
class ChatTemplate:
    """The checkpoint's Jinja chat template (tokenizer_config.json) or Llama 4's header format,
    rendered in Jinja's immutable sandbox as transformers does."""

    def __init__(self, config_path: Path | None, template_file: Path | None = None):
        config = json.loads(config_path.read_text()) if config_path and config_path.is_file() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.source = "tokenizer_config.json" if template else "built-in Llama 4 header format"
        if template_file is not None:  # --chat-template FILE: the operator's template over the checkpoint's
            template, self.source = _read_template(Path(template_file)), str(template_file)
        self.special = {key: self._token(config.get(key)) for key in ("bos_token", "eos_token")}
        self.special["bos_token"] = (
            self.special["bos_token"] if template else (self.special["bos_token"] or DEFAULT_BOS)
        )
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = self._raise
        self.text = template or DEFAULT_CHAT_TEMPLATE
        self.template = env.from_string(self.text)

    @staticmethod
    def _token(value) -> str:
        return (value.get("content") if isinstance(value, dict) else value) or ""

    @staticmethod
    def _raise(message: str):
        raise ClientError(message, "messages")

    def render(self, messages: list[dict], variables: dict | None = None) -> str:
        """The prompt text; `variables` (the request's chat_template_kwargs) are more names the template sees."""
        try:
            return self.template.render(
                **(variables or {}), messages=messages, add_generation_prompt=True, **self.special
            )
        except TemplateError as err:
            raise ClientError(f"the chat template cannot render these messages ({err})", "messages") from None


def _read_template(path: Path) -> str:
    """A --chat-template file: UTF-8 Jinja that parses, or one sentence saying what is wrong with it."""
    if not path.is_file():
        raise ValueError(f"--chat-template {path} is not a file")
    try:
        template = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--chat-template {path} is not UTF-8 text (byte at offset {err.start})") from None
    try:
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).parse(template)
    except TemplateError as err:
        raise ValueError(f"--chat-template {path} is not a valid Jinja template ({err})") from None
    return template


# -- metrics ------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics, named as serving dashboards already graph them."""

    def __init__(self, scheduler: Scheduler, model_name: str):
        disable_created_metrics()  # no *_created series: they double the text and nobody graphs them
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        info = Gauge("llama4_deploy_model", "The served model (always 1)", ["model_name"], registry=r)
        info.labels(model_name).set(1)
        usage = Gauge("llama4_deploy_kv_cache_usage_ratio", "Cached tokens of the busy rows over capacity", registry=r)
        usage.set_function(lambda: scheduler.kv_cache_usage)
        self.queue_time = Histogram(
            "llama4_deploy_queue_time_seconds",
            "Arrival to taking a batch row",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30),
            registry=r,
        )
        self.inter_token = Histogram(
            "llama4_deploy_inter_token_latency_seconds",
            "Time between two tokens of a request",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
            registry=r,
        )
        self.requests = Counter(
            "llama4_deploy_requests",
            "Requests finished, by endpoint and finish reason",
            ["endpoint", "finish_reason"],
            registry=r,
        )
        self.rejected = Counter(
            "llama4_deploy_requests_rejected", "Requests refused, by HTTP status", ["status"], registry=r
        )
        self.prompt_tokens = Counter("llama4_deploy_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("llama4_deploy_generation_tokens", "Tokens generated", registry=r)
        queue = Gauge("llama4_deploy_queue_depth", "Requests waiting for a batch row", registry=r)
        queue.set_function(lambda: scheduler.queue_depth)
        rows = Gauge("llama4_deploy_batch_occupancy", "Batch rows holding a request", registry=r)
        rows.set_function(lambda: scheduler.occupancy)
        size = Gauge("llama4_deploy_batch_max_rows", "Rows of the running batch", registry=r)
        size.set(scheduler.max_batch)
        self.step = Histogram(
            "llama4_deploy_step_seconds",
            "Engine step time, by kind (prefill, decode)",
            ["kind"],
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
            registry=r,
        )
        self.ttft = Histogram(
            "llama4_deploy_time_to_first_token_seconds",
            "Arrival to first token",
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
            registry=r,
        )
        self.latency = Histogram(
            "llama4_deploy_request_seconds",
            "Arrival to last token",
            buckets=(0.01, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=r,
        )

    def observe_step(self, record: StepRecord) -> None:
        self.step.labels(record.kind).observe(record.seconds)


# -- one request's run ----------------------------------------------------------------------------
class _Handoff:
    """Outputs from the scheduler thread to the event loop's request queues, through a thread of its own.

    Waking the loop is a write to its self-pipe; a syscall releases the GIL, and getting it back makes the scheduler
    wait while the woken loop streams the step's tokens, between two engine steps. Here the scheduler only puts into
    a SimpleQueue (C code that never gives the GIL up), and the handoff thread wakes the loop once for everything that
    has arrived: it gets the GIL when the scheduler gives it up for the next engine step, so the loop's work overlaps
    the engine instead of delaying it."""

    _CLOSE = object()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._arrived: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._wake, name="llama4-deploy-handoff", daemon=True)
        self._thread.start()

    def put(self, target: asyncio.Queue, output: Output) -> None:
        self._arrived.put((target, output))

    def close(self) -> None:
        self._arrived.put(self._CLOSE)

    def _wake(self) -> None:
        while True:
            arrived = [self._arrived.get()]
            while not self._arrived.empty():
                arrived.append(self._arrived.get_nowait())
            batch = [item for item in arrived if item is not self._CLOSE]
            closing = len(batch) < len(arrived)  # what came with the close is still delivered
            if batch:
                try:
                    self.loop.call_soon_threadsafe(self._deliver, batch)
                except RuntimeError:  # the loop is closed: nobody waits for these any more
                    return
            if closing:
                return

    @staticmethod
    def _deliver(batch: list) -> None:
        for target, output in batch:
            target.put_nowait(output)


class _Run:
    """A submitted request seen from the event loop: its outputs as text deltas."""

    def __init__(self, server: Server, request: Request, stop_strings: tuple[str, ...], endpoint: str):
        self.server = server
        self.request = request
        self.endpoint = endpoint
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        handoff = server.handoff(asyncio.get_running_loop())
        request.listener = lambda _, output: handoff.put(self.queue, output)
        tokenizer = server.tokenizer
        if stop_strings and tokenizer is None:
            raise ClientError(
                f"bundle {server.model} has no tokenizer.json, so stop strings cannot be matched; "
                "give stop token ids instead",
                "stop",
            )
        self.stream = tokenizer.stream(stop_strings) if tokenizer else None
        self.tokens: list[int] = []  # tokens whose text is in the answer
        self._last_token_at: float | None = None
        self.offsets: list[int] = []  # the character offset in the answer where each token's text begins
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.cumulative_logprob = 0.0  # of every token taken, the stop token too (best_of ranks by it, as vLLM)

    def submit(self) -> None:
        try:
            self.server.scheduler.submit(self.request)
        except QueueFull as err:
            raise ClientError(
                f"the server is busy ({err}); retry after {RETRY_AFTER_S} s", status=429, code="queue_full"
            ) from None
        except Unavailable as err:
            raise ClientError(f"the server takes no requests: {err}", status=503, code="unavailable") from None
        except ValueError as err:
            raise ClientError(str(err), "prompt") from None
        self.server.metrics.prompt_tokens.inc(len(self.request.prompt))

    async def deltas(self) -> AsyncIterator[tuple[str, list[Output]]]:
        """(text, outputs) per step until the request ends; sets finish_reason."""
        try:
            while self.finish_reason is None:
                output = await self.queue.get()
                if output.token is None:
                    self.finish_reason = output.finish_reason
                    self.error = output.error
                    tail = self.stream.flush() if self.stream else ""
                    if tail:
                        yield tail, []
                    break
                if output.logprob is not None:
                    self.cumulative_logprob += output.logprob
                if output.token in self.request.stop_tokens:  # its text is not part of the answer
                    continue
                now = time.monotonic()
                if self._last_token_at is not None:
                    self.server.metrics.inter_token.observe(now - self._last_token_at)
                self._last_token_at = now
                self.tokens.append(output.token)
                self.offsets.append(len(self.stream.text) if self.stream else 0)  # where its text begins
                self.server.metrics.generation_tokens.inc()
                piece = self.stream.push(output.token) if self.stream else ""
                if self.stream and self.stream.stopped:
                    self.server.scheduler.cancel(self.request)
                    self.finish_reason = "stop"
                yield piece, [output]
        finally:
            if self.finish_reason is None:  # the client went away: free the row
                self.server.scheduler.cancel(self.request)
                self.finish_reason = "cancelled"
            self._record()

    def _record(self) -> None:
        metrics, request = self.server.metrics, self.request
        metrics.requests.labels(self.endpoint, self.finish_reason).inc()
        if request.admitted_at is not None:
            metrics.queue_time.observe(request.admitted_at - request.arrived)
        if request.first_token_at is not None:
            metrics.ttft.observe(request.first_token_at - request.arrived)
            metrics.latency.observe(time.monotonic() - request.arrived)


# -- the server ---------------------------------------------------------------------------------
class Server:
    """Engine + scheduler + tokenizer + chat template + metrics behind one FastAPI app."""

    def __init__(
        self,
        engine: Engine,
        max_batch: int | None = None,
        max_queue: int = 64,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        ignore_unknown_fields: bool = False,
        tool_call_parser: str = "llama4_json",
        api_key: str | None = None,
        served_model_name: str | None = None,
        chat_template: Path | None = None,
        allowed_origins: tuple[str, ...] = (),
        log_requests: bool = False,
        allowed_local_media_path: Path | None = None,
        admission_wait_ms: float = ADMISSION_WAIT_MS,
        trace_steps=None,
    ):
        """`trace_steps`: an open text file that gets one JSON line per engine step (serve --trace-steps)."""
        if api_key is not None and not api_key:
            raise ValueError("--api-key is empty; give a key, or leave the option out to serve without one")
        if served_model_name is not None and not served_model_name.strip():
            raise ValueError("--served-model-name is empty")
        self.api_key = api_key
        self.allowed_origins = tuple(allowed_origins)
        # image_url parts may name files only under this directory (None: data: URLs only)
        self.allowed_local_media_path = allowed_local_media_path
        self.log_requests = log_requests
        self.ignore_unknown_fields = ignore_unknown_fields
        if tool_call_parser not in PARSERS:
            raise ValueError(f"--tool-call-parser is {tool_call_parser!r}; choose {' or '.join(PARSERS)}")
        self.tool_call_parser = tool_call_parser
        if max_request_bytes < 1:
            raise ValueError(f"--max-request-bytes is {max_request_bytes}; it must be at least 1")
        self.max_request_bytes = max_request_bytes
        self.engine = engine
        self.model = served_model_name or engine.manifest.name
        self.created = int(time.time())
        self.tokenizer: Tokenizer | None = None
        if engine.manifest.tokenizer_path is not None and engine.manifest.tokenizer_path.is_file():
            self.tokenizer = load_tokenizer(engine.manifest)
        self.chat_template = ChatTemplate(engine.manifest.tokenizer_config_path, chat_template)
        self.grammars = (
            Grammars(self._token_bytes_of, engine.vocab_size, engine.manifest.eos_token_ids) if self.tokenizer else None
        )
        if not 0 <= admission_wait_ms <= 1000:
            raise ValueError(f"--admission-wait-ms is {admission_wait_ms}; it must be in [0, 1000]")
        self.scheduler = Scheduler(
            engine, max_batch=max_batch, max_queue=max_queue, admission_wait=admission_wait_ms / 1000
        )
        self.metrics = Metrics(self.scheduler, self.model)
        self.trace_steps = trace_steps
        self._handoff: _Handoff | None = None
        self.scheduler.on_step = self._on_step
        self.app = self._make_app()

    def handoff(self, loop: asyncio.AbstractEventLoop) -> _Handoff:
        """The one _Handoff into `loop` (the server runs one event loop; a new one, in tests, gets its own)."""
        if self._handoff is None or self._handoff.loop is not loop:
            if self._handoff is not None:
                self._handoff.close()
            self._handoff = _Handoff(loop)
        return self._handoff

    def _on_step(self, record: StepRecord) -> None:
        self.metrics.observe_step(record)
        if self.trace_steps is not None:
            # vars(), not dataclasses.asdict: asdict deep-copies every field, on the scheduler thread between steps
            self.trace_steps.write(json.dumps(vars(record)) + "\n")

    def _model_card(self) -> dict:
        return {
            "id": self.model,
            "object": "model",
            "created": self.created,
            "owned_by": "llama4-deploy",
            "max_model_len": self.engine.manifest.max_context,
        }

    # -- request translation ------------------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model != self.model:
            raise ClientError(
                f"model {model!r} does not exist; this server serves {self.model!r}",
                "model",
                status=404,
                code="model_not_found",
            )

    def _encode(self, text: str, param: str, special: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise ClientError(
                f"bundle {self.model} has no tokenizer.json, so text cannot be encoded; send the prompt as token ids",
                param,
            )
        return self.tokenizer.encode(text, add_special_tokens=special)

    @staticmethod
    def _prompts(prompt) -> list[str | list[int]]:
        """OpenAI's four prompt forms as a list of prompts (a string or token ids each)."""
        if isinstance(prompt, str) or all(isinstance(t, int) for t in prompt):
            return [prompt]
        return list(prompt)

    def _prompt_ids(self, prompts: list, max_tokens: int) -> list[list[int]]:
        """Token ids of each completion prompt (on a worker thread: tokenizing may take seconds)."""
        ids = []
        for i, prompt in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt.{i}"
            ids.append(self._encode(prompt, param) if isinstance(prompt, str) else prompt)
            self._check_length(ids[-1], max_tokens, param)
        return ids

    def _echo(self, prompt: str | list[int], ids: list[int], scores, k: int | None, head: int) -> tuple[str, dict]:
        """The prompt's text as given (or decoded from its ids), and its logprobs part: each prompt token's
        text, log-probability (None for the first), top-k and offset."""
        text = prompt if isinstance(prompt, str) else (self.tokenizer.decode(ids) if self.tokenizer else "")
        if k is None:
            return text, {}
        stream, offsets = (self.tokenizer.stream() if self.tokenizer else None), []
        for token in ids:
            offsets.append(head + (len(stream.text) if stream else 0))
            if stream:
                stream.push(token)
        return text, {
            "tokens": [self._token_text(t) for t in ids],
            "token_logprobs": [lp for lp, _ in scores],
            "top_logprobs": [None if lp is None else {self._token_text(t): v for t, v in top} for lp, top in scores],
            "text_offset": offsets,
        }

    def _chat_ids(self, messages: list[dict], variables: dict | None = None) -> list[int]:
        """The rendered chat template's token ids (on a worker thread)."""
        ids = self._encode(self.chat_template.render(messages, variables), "messages", special=False)
        self._check_length(ids, 1, "messages")
        return ids

    def _chat_image_ids(self, messages: list[dict], variables: dict | None, urls: list[tuple[str, str]]):
        """(expanded token ids, image features) of a chat with image parts (on a worker thread): the template's
        text around each image's marker encoded as text, the marker as the <|image|> id, then the runtime's own
        expansion and encoding (runtime/images.py, Engine.prepare_images)."""
        pieces = self.chat_template.render(messages, variables).split(IMAGE_MARKER)
        if len(pieces) != len(urls) + 1:
            raise ClientError(
                f"the chat template placed {len(pieces) - 1} of the {len(urls)} images; it must render each "
                "message's content once",
                "messages",
            )
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            ids += self._encode(piece, "messages", special=False) if piece else []
            if k < len(urls):
                ids.append(self.engine.image_tokens.image)
        try:
            sources = [image_from_url(url, self.allowed_local_media_path, param) for param, url in urls]
            prompts, features = self.engine.prepare_images([ids], [sources], 1)
        except ValueError as err:
            raise ClientError(str(err), "messages") from None
        self._check_length(prompts[0], 1, "messages")
        return prompts[0], features[0]

    def _check_length(self, ids: list[int], max_tokens: int, param: str) -> None:
        """The context check before the per-token checks of `submit`, which a huge prompt would make slow."""
        context = self.engine.manifest.max_context
        if len(ids) + max_tokens > context:
            what = "prompt" if param == "prompt" else "the rendered messages"
            raise ClientError(
                f"{what} of {len(ids)} tokens plus {max_tokens} new ones exceeds the bundle's context of "
                f"{context} tokens",
                param,
            )

    def _request(self, body, prompt: list[int], max_tokens: int, logprobs: int | None) -> Request:
        stop = set(body.stop_ids()) | (set() if body.ignore_eos else set(self.engine.manifest.eos_token_ids))
        request = Request(
            prompt,
            max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop_tokens=frozenset(stop),
            logprobs=logprobs,
            top_k=body.top_k or 0,
            min_p=body.min_p or 0.0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            logit_bias={int(token): bias for token, bias in (body.logit_bias or {}).items()},
            min_tokens=body.min_tokens or 0,
        )
        try:  # the checks that need the vocabulary (logit_bias ids) or two fields (min_tokens, max_tokens)
            request.sampling.check(self.engine.vocab_size)
        except ValueError as err:
            raise ClientError(str(err), str(err).split()[0]) from None
        if request.min_tokens > max_tokens:
            raise ClientError(f"min_tokens is {request.min_tokens}, more than max_tokens {max_tokens}", "min_tokens")
        return request

    def _sample_count(self, body) -> int:
        """How many samples of each prompt are generated: best_of (of which the n best are returned), else n."""
        count, field = (body.n, "n") if body.best_of is None else (body.best_of, "best_of")
        if count < body.n:
            raise ClientError(
                f"best_of is {count}, less than n {body.n}; best_of samples are generated and the n best returned",
                "best_of",
            )
        if body.stream and count > body.n:
            raise ClientError(
                f"best_of {count} with n {body.n} cannot be streamed: the best are known only once all are done",
                "best_of",
            )
        if count > self.scheduler.max_batch:
            raise ClientError(
                f"{field} is {count}; the samples of a prompt run together in this server's "
                f"{self.scheduler.max_batch} rows",
                field,
            )
        return count

    def _samples(self, body, prompt: list[int], max_tokens: int, logprobs: int | None) -> list[Request]:
        """The samples of one prompt (n, or best_of): the first request carries the others as siblings, so the
        scheduler prefills the prompt once; sample j draws with seed + j (each equals generate with its seed). With
        best_of > n each sample's token log-probabilities are computed, to rank the samples by their sum."""
        count = self._sample_count(body)
        if count > body.n and logprobs is None:
            logprobs = 0
        requests = [self._request(body, prompt, max_tokens, logprobs) for _ in range(count)]
        for j, request in enumerate(requests):
            request.seed = None if body.seed is None else (body.seed + j) % SEED_LIMIT
        requests[0].siblings = requests[1:]
        return requests

    def _message(self, i: int, m) -> dict:
        """A request message as the chat template sees it: earlier tool calls' arguments as objects (Llama 4's
        templates write them with tojson), a tool message's call id."""
        message = {"role": m.role, "content": m.text(IMAGE_MARKER)}
        if m.name is not None:
            message["name"] = m.name
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            calls = []
            for j, call in enumerate(m.tool_calls):
                try:
                    arguments = json.loads(call.function.arguments)
                except ValueError:
                    raise ClientError(
                        f"messages.{i}.tool_calls.{j}.function.arguments is not JSON", f"messages.{i}.tool_calls"
                    ) from None
                calls.append(
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": arguments},
                    }
                )
            message["tool_calls"] = calls
        return message

    def _tools(self, body) -> tuple[list[dict], tuple[str, dict | str] | None]:
        """The tools the template sees (none with tool_choice "none") and, for "required" or a named function,
        what every reply must satisfy: ("schema", a JSON schema) for the JSON call form, ("ebnf", a grammar) for
        the pythonic one."""
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
        choice = body.tool_choice
        if choice is None or choice == "none" or not tools:
            if choice not in (None, "none", "auto"):
                raise ClientError("tool_choice asks for a tool call but tools is empty", "tool_choice")
            return ([] if choice == "none" else tools), None
        if choice == "auto":
            return tools, None
        functions = [{**tool["function"], "index": i} for i, tool in enumerate(tools)]
        if not isinstance(choice, str):
            functions = [f for f in functions if f["name"] == choice.function.name]
            if not functions:
                raise ClientError(f"tool_choice names {choice.function.name!r}, which is not in tools", "tool_choice")
        if self.tool_call_parser == "llama4_pythonic":
            try:
                return tools, ("ebnf", pythonic_call_grammar(functions))
            except ToolSchemaError as err:
                raise ClientError(str(err), "tools") from None
        return tools, ("schema", call_schema([{k: v for k, v in f.items() if k != "index"} for f in functions]))

    def _compile_tools(self, kind: str, source):
        if self.grammars is None:
            raise ClientError(
                f"bundle {self.model} has no tokenizer.json, so tool calls cannot be enforced", "tool_choice"
            )
        try:
            return self.grammars.json_schema(source) if kind == "schema" else self.grammars.ebnf(source)
        except GrammarError as err:
            raise ClientError(f"the tools' parameters {err}", "tools") from None

    def _token_bytes_of(self, token: int) -> bytes:
        return self.tokenizer.token_bytes(token)

    def _grammar(self, body):
        """The compiled grammar a request asks for, or None (on a worker thread: the first compile takes seconds)."""
        try:
            asked = body.structure()
        except ValueError as err:
            raise ClientError(str(err), "response_format") from None
        if asked is None:
            return None
        field, kind, source = asked
        if self.grammars is None:
            raise ClientError(f"bundle {self.model} has no tokenizer.json, so {field} cannot be enforced", field)
        make = {
            "json": lambda: self.grammars.json_object(),
            "schema": lambda: self.grammars.json_schema(source),
            "regex": lambda: self.grammars.regex(source),
            "choice": lambda: self.grammars.choice(source),
            "ebnf": lambda: self.grammars.ebnf(source),
        }[kind]
        try:
            return make()
        except GrammarError as err:
            raise ClientError(f"{field} {err}", field) from None

    def _token_text(self, token: int) -> str:
        return self.tokenizer.token_text(token) if self.tokenizer else str(token)

    def _token_bytes(self, token: int) -> list[int]:
        return list(self.tokenizer.token_bytes(token) if self.tokenizer else str(token).encode())

    # -- endpoints -------------------------------------------------------------------------------
    async def _body(self, http: HttpRequest, schema):
        """The request body validated by `schema`, with unknown fields refused or (--ignore-unknown-fields)
        dropped; errors go through the same 400 handler as FastAPI's own."""
        raw = await http.body()
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as err:
            reason = str(err).split("\n")[0] if isinstance(err, ValueError) else "nested too deeply"
            raise RequestValidationError(
                [{"type": "json_invalid", "loc": ("body",), "ctx": {"error": reason}}]
            ) from None
        try:
            return schema.model_validate(data, context={"ignore_unknown": self.ignore_unknown_fields})
        except ValidationError as err:
            raise RequestValidationError(
                [{**e, "loc": ("body", *e["loc"])} for e in err.errors(include_url=False)]
            ) from None

    async def completions(self, http: HttpRequest):
        body = await self._body(http, CompletionRequest)
        self._check_model(body.model)
        max_tokens = body.max_tokens or 16
        prompts = self._prompts(body.prompt)
        if len(prompts) > self.scheduler.max_queue + self.scheduler.max_batch:
            raise ClientError(
                f"prompt holds {len(prompts)} prompts; this server takes at most "
                f"{self.scheduler.max_queue + self.scheduler.max_batch} in one request (--max-queue + rows)",
                "prompt",
            )
        ids = await asyncio.to_thread(self._prompt_ids, prompts, max_tokens)
        grammar = await asyncio.to_thread(self._grammar, body)
        k = body.logprobs
        runs = []
        for prompt in ids:  # run index: prompt i's sample j is i * samples + j
            for request in self._samples(body, prompt, max_tokens, k):
                request.prompt_logprobs = k if body.echo and k is not None else None
                request.grammar = grammar
                runs.append(_Run(self, request, body.stop_strings(), "completions"))
        _submit_all(runs)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.model}

        def logprobs_of(run: _Run, outputs: list[Output], shift: int = 0) -> dict | None:
            if k is None:
                return None
            return {
                "tokens": [self._token_text(o.token) for o in outputs],
                "token_logprobs": [o.logprob for o in outputs],
                "top_logprobs": [{self._token_text(t): lp for t, lp in o.top_logprobs} for o in outputs],
                "text_offset": [shift + o for o in run.offsets[len(run.offsets) - len(outputs) :]],
            }

        samples = len(runs) // len(ids)

        def echoed(i: int, text: str, logprobs: dict | None) -> tuple[str, dict | None]:
            """Prepend run i's prompt text (and its logprobs) when echo asks for it."""
            if not body.echo:
                return text, logprobs
            run = runs[i]
            prompt_text, part = self._echo(prompts[i // samples], run.request.prompt, run.request.prompt_scores, k, 0)
            if logprobs is not None:
                logprobs = {key: part[key] + logprobs[key] for key in logprobs}
            return prompt_text + text, logprobs

        if body.stream:

            async def events():
                first = [True] * len(runs)
                async for i, text, outputs in _merged(runs):
                    logprobs = logprobs_of(runs[i], outputs)
                    if first[i]:
                        first[i] = False
                        shift = len(echoed(i, "", None)[0]) if body.echo else 0
                        if logprobs is not None and shift:
                            logprobs["text_offset"] = [shift + o for o in logprobs["text_offset"]]
                        text, logprobs = echoed(i, text, logprobs)
                    choice = {
                        "index": i,
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": None,
                        "token_ids": [o.token for o in outputs],
                    }
                    yield _sse({**head, "choices": [choice]})
                for chunk in _stream_end(runs, head, lambda i, run: {"index": i, "text": "", "logprobs": None}, body):
                    yield chunk

            return StreamingResponse(events(), media_type="text/event-stream")

        answers = await _collect(runs, http)
        failed = next((run for run in runs if run.error or run.finish_reason == "cancelled"), None)
        if failed is not None:
            return _error_response(failed)
        choices = []
        for index, i in enumerate(_best(runs, samples, body.n)):
            run, (text, outputs) = runs[i], answers[i]
            shift = len(echoed(i, "", None)[0]) if body.echo else 0
            text, logprobs = echoed(i, text, logprobs_of(run, outputs, shift))
            choices.append(
                {
                    "index": index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": run.finish_reason,
                    "token_ids": run.tokens,
                }
            )
        return {**head, "choices": choices, "usage": _usage(runs)}

    async def chat_completions(self, http: HttpRequest):
        body = await self._body(http, ChatCompletionRequest)
        self._check_model(body.model)
        urls = [
            (f"messages[{i}].content[{j}].image_url", url)
            for i, m in enumerate(body.messages)
            for j, url in m.image_urls()
        ]
        if urls and self.engine.vision is None:
            raise ClientError(
                f"bundle {self.model} has no vision engine (built from a text-only checkpoint or with --no-vision); "
                "send text only",
                urls[0][0],
            )
        messages = [self._message(i, m) for i, m in enumerate(body.messages)]
        tools, enforced = self._tools(body)
        variables = {**(body.chat_template_kwargs or {}), **({"tools": tools} if tools else {})}
        features = None
        if urls:  # the placeholders expanded and the images encoded before the request is queued
            prompt, features = await asyncio.to_thread(self._chat_image_ids, messages, variables, urls)
        else:
            prompt = await asyncio.to_thread(self._chat_ids, messages, variables)
        room = self.engine.manifest.max_context - len(prompt)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(room, 1)
        top = (body.top_logprobs or 0) if body.logprobs else None
        if enforced is not None:  # tool_choice "required" or a named function: the call is enforced
            if body.structure() is not None:
                raise ClientError("tool_choice and response_format both ask for a structure; give one", "tool_choice")
            grammar = await asyncio.to_thread(self._compile_tools, *enforced)
        else:
            grammar = await asyncio.to_thread(self._grammar, body)
        requests = self._samples(body, prompt, max_tokens, top)
        for request in requests:
            request.grammar = grammar
            request.features = features  # read only: the samples of one prompt share its image features
        runs = [_Run(self, r, body.stop_strings(), "chat.completions") for r in requests]
        _submit_all(runs)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def entry(o: Output) -> dict:
            name = self._token_text(o.token)
            return {
                "token": name,
                "logprob": o.logprob,
                "bytes": self._token_bytes(o.token),
                "top_logprobs": [
                    {"token": self._token_text(t), "logprob": lp, "bytes": self._token_bytes(t)}
                    for t, lp in o.top_logprobs
                ],
            }

        names = {tool["function"]["name"] for tool in tools}

        def message(run: _Run, text: str) -> dict:
            """The reply: tool calls when the text is wholly calls to the request's functions, else content."""
            calls = parse(self.tool_call_parser, text, names) if names else None
            if calls is None:
                return {"role": "assistant", "content": text}
            run.finish_reason = "tool_calls"
            return {"role": "assistant", "content": None, "tool_calls": [call.openai() for call in calls]}

        if body.stream:
            head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model}

            async def events():
                for i in range(len(runs)):
                    role = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                    yield _sse({**head, "choices": [{**role, "finish_reason": None}]})
                if names:  # a reply is a call or content only once it is whole: sent at its end
                    texts = [""] * len(runs)
                    async for i, text, _ in _merged(runs):
                        texts[i] += text
                    for i, run in enumerate(runs):
                        if run.error or run.finish_reason == "cancelled":
                            continue
                        reply = message(run, texts[i])
                        if reply["content"] is None:
                            calls = [{"index": j, **c} for j, c in enumerate(reply["tool_calls"])]
                            delta = {"tool_calls": calls}
                        else:
                            delta = {"content": reply["content"]}
                        yield _sse(
                            {**head, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]}
                        )
                    for chunk in _stream_end(
                        runs, head, lambda i, run: {"index": i, "delta": {}, "logprobs": None}, body
                    ):
                        yield chunk
                    return
                async for i, text, outputs in _merged(runs):
                    logprobs = {"content": [entry(o) for o in outputs]} if body.logprobs else None
                    delta = {"index": i, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": None}
                    yield _sse({**head, "choices": [delta]})
                for chunk in _stream_end(runs, head, lambda i, run: {"index": i, "delta": {}, "logprobs": None}, body):
                    yield chunk

            return StreamingResponse(events(), media_type="text/event-stream")

        answers = await _collect(runs, http)
        failed = next((run for run in runs if run.error or run.finish_reason == "cancelled"), None)
        if failed is not None:
            return _error_response(failed)
        kept = [(runs[i], answers[i]) for i in _best(runs, len(runs), body.n)]
        choices = [
            {
                "index": i,
                "message": message(run, text),
                "logprobs": {"content": [entry(o) for o in outputs]} if body.logprobs else None,
                "finish_reason": run.finish_reason,
            }
            for i, (run, (text, outputs)) in enumerate(kept)
        ]
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": self.model,
            "choices": choices,
            "usage": _usage(runs),
        }

    # -- app ---------------------------------------------------------------------------------------
    def _make_app(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.scheduler.start()
            yield
            self.stop()

        app = FastAPI(title="llama4-deploy", lifespan=lifespan)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat_completions)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [self._model_card()]}

        @app.get("/v1/models/{model_id:path}")
        async def model(model_id: str):
            self._check_model(model_id)
            return self._model_card()

        @app.post("/tokenize")
        async def tokenize(http: HttpRequest):
            body = await self._body(http, TokenizeRequest)
            if body.model is not None:
                self._check_model(body.model)
            if body.messages is not None:
                messages = [{"role": m.role, "content": m.text()} for m in body.messages]
                text = self.chat_template.render(messages)
                ids = await asyncio.to_thread(self._encode, text, "messages", False)
            elif body.prompt is not None:
                ids = await asyncio.to_thread(self._encode, body.prompt, "prompt", body.add_special_tokens)
            else:
                raise ClientError("give prompt or messages", "prompt")
            return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.manifest.max_context}

        @app.post("/detokenize")
        async def detokenize(http: HttpRequest):
            body = await self._body(http, DetokenizeRequest)
            if body.model is not None:
                self._check_model(body.model)
            if self.tokenizer is None:
                raise ClientError(f"bundle {self.model} has no tokenizer.json, so tokens cannot be decoded", "tokens")
            vocab = self.engine.vocab_size
            outside = [t for t in body.tokens if t >= vocab]
            if outside:
                raise ClientError(f"tokens has token id {outside[0]}, outside the vocabulary [0, {vocab})", "tokens")
            return {"prompt": self.tokenizer.decode(body.tokens)}

        @app.get("/tokenizer_info")
        async def tokenizer_info():  # vLLM's: what a remote-tokenizer client (lm-eval) needs besides /tokenize
            special = self.chat_template.special
            return {
                "eos_token": special.get("eos_token") or None,
                "bos_token": special.get("bos_token") or None,
                "pad_token": None,
                "chat_template": self.chat_template.text,
                "model_max_length": self.engine.manifest.max_context,
            }

        @app.get("/version")
        async def version():
            return {"version": __version__}

        @app.get("/health")
        async def health():
            scheduler = self.scheduler
            state = {"queue_depth": scheduler.queue_depth, "running": scheduler.occupancy}
            if not scheduler.alive:
                reason = f"the scheduler thread has stopped ({scheduler.died})"
                return JSONResponse({"status": "error", "reason": reason, **state}, status_code=503)
            if scheduler.draining:
                return JSONResponse({"status": "draining", **state}, status_code=503)
            return {"status": "ok", **state}

        @app.get("/metrics")
        async def metrics():
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.exception_handler(RequestValidationError)
        async def invalid(_, err: RequestValidationError):
            first = _most_telling(err.errors())
            if first.get("type") == "extra_forbidden":
                loc = first.get("loc", ())
                where = ".".join(filter(None, [_param(loc[:-1]), str(loc[-1])]))
                message = (
                    f"{where}: unknown field; this server does not carry it out "
                    "(--ignore-unknown-fields makes it ignore fields it does not know)"
                )
            elif first.get("type") == "json_invalid":
                where, message = (
                    None,
                    f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})",
                )
            else:
                where = _param(first.get("loc", ()))
                reason = first["msg"]
                if first.get("type") == "value_error":  # our validators' sentences, without pydantic's prefix
                    reason = str(first.get("ctx", {}).get("error", reason))
                message = f"{where}: {reason}" if where else f"the request body: {reason}"
            self.metrics.rejected.labels("400").inc()
            return JSONResponse(error_body(message, param=where or None), status_code=400)

        @app.exception_handler(ClientError)
        async def client_error(_, err: ClientError):
            self.metrics.rejected.labels(str(err.status)).inc()
            headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status == 429 else None
            kind = (
                "rate_limit_error"
                if err.status == 429
                else "not_found_error"
                if err.status == 404
                else "server_error"
                if err.status >= 500
                else "invalid_request_error"
            )
            return JSONResponse(
                error_body(str(err), kind, err.param, err.code), status_code=err.status, headers=headers
            )

        @app.exception_handler(StarletteHTTPException)
        async def http_error(_, err: StarletteHTTPException):
            return JSONResponse(error_body(str(err.detail), "invalid_request_error"), status_code=err.status_code)

        @app.exception_handler(Exception)
        async def internal(_, err: Exception):  # a bug must still answer with an error object, not plain text
            log.error("request failed: %s: %s", type(err).__name__, err)
            return JSONResponse(error_body(f"internal server error ({type(err).__name__})", "server_error"), 500)

        outer = _BodyLimit(app, self.max_request_bytes, lambda: self.metrics.rejected.labels("413").inc())
        if self.api_key is not None:
            outer = _ApiKey(outer, self.api_key, lambda: self.metrics.rejected.labels("401").inc())
        if self.log_requests:
            outer = _AccessLog(outer)
        if self.allowed_origins:  # outermost: a preflight OPTIONS is answered before the key is asked for
            outer = CORSMiddleware(
                outer, allow_origins=list(self.allowed_origins), allow_methods=["*"], allow_headers=["*"]
            )
        return outer

    def drain(self, timeout: float) -> None:
        """Stop intake (503 from now on) and cancel what still runs after `timeout` seconds (a 503 each)."""
        self.scheduler.drain(timeout)

    def stop(self) -> None:
        """Stop the scheduler (what still runs is cancelled and told so), then the handoff thread."""
        self.scheduler.stop()
        if self._handoff is not None:
            self._handoff.close()


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}
_TAG_PREFIXES = ("function-", "constrained-", "lax-", "strict-", "json-")


def _most_telling(errors: list) -> dict:
    """The error to report from pydantic's list: a union field fails once per member, and the member the
    client meant is the one our own validators speak for (a value_error), else the one it got deepest in."""
    if not errors:
        return {"loc": (), "msg": "invalid request"}
    ours = [e for e in errors if e.get("type") in ("value_error", "extra_forbidden")]
    return ours[0] if ours else max(errors, key=lambda e: len(_param(e.get("loc", ())).split(".")))


def _param(loc) -> str:
    """A field's path from a pydantic error location, without the union member tags pydantic inserts
    (`prompt.list[int].0` -> `prompt.0`)."""
    parts = []
    for part in loc:
        if part == "body" and not parts:
            continue
        tag = isinstance(part, str) and (part in _TYPE_NAMES or "[" in part or part.startswith(_TAG_PREFIXES))
        if not tag:
            parts.append(str(part))
    return ".".join(parts)


PROTECTED = (
    "/v1/",
    "/tokenize",
    "/detokenize",
    "/tokenizer_info",
)  # what --api-key guards; /health, /metrics, /version stay open
access_log = logging.getLogger("llama4_deploy.serving.access")


class _ApiKey:
    """ASGI middleware: with --api-key, the OpenAI routes need `Authorization: Bearer <key>` (compared in
    constant time, so the answer's timing says nothing about the key); otherwise 401 with an error object."""

    def __init__(self, app, key: str, on_reject):
        self.app, self.key, self.on_reject = app, key.encode(), on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED) or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.key):
            return await self.app(scope, receive, send)
        self.on_reject()
        reason = "no API key was given" if not header else "the API key is not valid"
        body = json.dumps(
            error_body(
                f"{reason}; send it as 'Authorization: Bearer <key>'", "invalid_request_error", code="invalid_api_key"
            )
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _AccessLog:
    """ASGI middleware (--log-requests): one line per request: method, path, status, seconds, body bytes; never
    the prompt's text."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, size = time.monotonic(), [0], [0]

        async def counting_receive():
            message = await receive()
            size[0] += len(message.get("body", b""))
            return message

        async def watching_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        finally:
            client = scope.get("client") or ("-", 0)
            access_log.info(
                "%s %s %s %d %.3fs %dB",
                client[0],
                scope["method"],
                scope["path"],
                status[0],
                time.monotonic() - start,
                size[0],
            )


class _BodyLimit:
    """ASGI middleware: a request body above `limit` bytes is answered 413 with an OpenAI error object,
    by its Content-Length before anything is read, or as soon as a chunked body passes the limit."""

    def __init__(self, app, limit: int, on_reject):
        self.app, self.limit, self.on_reject = app, limit, on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send, int(length))
        body, more = [], True
        size = 0
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            body.append(message.get("body", b""))
            size += len(body[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await self._refuse(send, None)
        buffered = {"type": "http.request", "body": b"".join(body), "more_body": False}

        async def replay():
            nonlocal buffered
            if buffered is not None:
                message, buffered = buffered, None
                return message
            return await receive()  # after the body: the disconnect a handler may watch for

        return await self.app(scope, replay, send)

    async def _refuse(self, send, length: int | None) -> None:
        self.on_reject()
        size = f"of {length} bytes " if length is not None else ""
        body = json.dumps(
            error_body(
                f"the request body {size}exceeds the server's limit of {self.limit} bytes (--max-request-bytes)",
                code="request_too_large",
            )
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _stream_end(runs: list[_Run], head: dict, last_choice, body):
    """The closing events of a stream: an error event, or per choice the one that carries finish_reason
    (`last_choice(index, run)` without it), and usage when asked; then OpenAI's terminator."""
    failed = next((run for run in runs if run.error or run.finish_reason == "cancelled"), None)
    if failed is not None:
        yield _sse(_run_error(failed))
    else:
        for i, run in enumerate(runs):
            yield _sse({**head, "choices": [{**last_choice(i, run), "finish_reason": run.finish_reason}]})
        if body.stream_options and body.stream_options.include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(runs)})
    yield "data: [DONE]\n\n"


def _best(runs: list[_Run], samples: int, n: int) -> list[int]:
    """Indices of the runs to answer with: of each prompt's `samples` runs (consecutive), the n with the highest
    cumulative log-probability, best first (vLLM's best_of), or all of them in order when no more than n ran."""
    if samples == n:
        return list(range(len(runs)))
    kept = []
    for start in range(0, len(runs), samples):
        group = range(start, start + samples)
        kept += sorted(group, key=lambda i: -runs[i].cumulative_logprob)[:n]  # stable: ties keep sample order
    return kept


def _usage(runs: list[_Run]) -> dict:
    """Tokens of every run, those of best_of's samples not returned too (all were generated, as OpenAI bills)."""
    prompt = sum(len(run.request.prompt) for run in runs)
    completion = sum(len(run.tokens) for run in runs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _submit_all(runs: list[_Run]) -> None:
    """Submit every run, or none: if one is refused (a full queue), the ones already queued are cancelled.
    Siblings go in with the request that carries them."""
    siblings = {id(s) for run in runs for s in run.request.siblings}
    for i, run in enumerate(runs):
        if id(run.request) in siblings:
            continue
        try:
            run.submit()
        except ClientError:
            for queued in runs[:i]:
                queued.server.scheduler.cancel(queued.request)
            raise


async def _merged(runs: list[_Run]) -> AsyncIterator[tuple[int, str, list[Output]]]:
    """(choice index, text, outputs) of several runs as they come; cancels them all if the stream is dropped."""
    if len(runs) == 1:
        async for text, outputs in runs[0].deltas():
            yield 0, text, outputs
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, run: _Run) -> None:
        try:
            async for text, outputs in run.deltas():
                await queue.put((i, text, outputs))
        finally:
            await queue.put(None)

    tasks = [asyncio.ensure_future(pump(i, run)) for i, run in enumerate(runs)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()  # a run's deltas() cancels its request when stopped early
        await asyncio.gather(*tasks, return_exceptions=True)


def _run_error(run: _Run) -> dict:
    message = run.error or "the request was cancelled (the server is shutting down)"
    return error_body(message, "server_error")


def _error_response(run: _Run) -> JSONResponse:
    return JSONResponse(_run_error(run), status_code=500 if run.error else 503)


async def _collect(runs: list[_Run], http: HttpRequest) -> list[tuple[str, list[Output]]]:
    """Gather the non-streamed answers (text, outputs) of runs; if the client disconnects first, cancel them."""

    async def one(run: _Run):
        text, outputs = [], []
        async for piece, new in run.deltas():
            text.append(piece)
            outputs.extend(new)
        return "".join(text), outputs

    async def gather():
        return await asyncio.gather(*(one(run) for run in runs))

    async def disconnected():
        while (await http.receive())["type"] != "http.disconnect":
            pass

    answer = asyncio.ensure_future(gather())
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([answer, watch], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not answer.done():
            answer.cancel()  # the generator's finally cancels the request
            with contextlib.suppress(asyncio.CancelledError):
                await answer
    if answer.cancelled():
        raise asyncio.CancelledError  # nobody is listening; the connection is gone
    return answer.result()


# -- running it ---------------------------------------------------------------------------------------
class Loading:
    """The ASGI app of `serve`: it listens at once and loads the bundle on a thread; meanwhile /health answers
    503 {"status": "loading"} and every other route a 503 error object with Retry-After. Once loaded, the
    server's app answers (its scheduler started here, stopped at shutdown). A load that fails is kept in `failed`
    and `on_failure` stops the server, whose caller then raises it."""

    def __init__(self, make_server):
        self.make_server = make_server
        self.server: Server | None = None
        self.failed: BaseException | None = None
        self.on_failure = lambda: None
        self.on_ready = lambda server: None
        self._thread: threading.Thread | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if self.server is not None:
            return await self.server.app(scope, receive, send)
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            body = {"status": "loading"}
        else:
            body = error_body("the server is still loading its bundle; retry shortly", "server_error", code="loading")
        payload = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"retry-after", str(RETRY_AFTER_S).encode())]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    def _load(self) -> None:
        try:
            server = self.make_server()
            server.scheduler.start()
            self.server = server
            self.on_ready(server)
        except BaseException as err:  # said by the caller once the server has stopped
            self.failed = err
            self.on_failure()

    async def _lifespan(self, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._thread = threading.Thread(target=self._load, name="llama4-deploy-load", daemon=True)
                self._thread.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await asyncio.to_thread(self.close)
                await send({"type": "lifespan.shutdown.complete"})
                return

    def close(self) -> None:
        """Wait for the load and stop the scheduler (the caller closes the engine it made)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.server is not None:
            self.server.stop()


def _uvicorn_server(app, drain_timeout: float, on_signal=None):
    """uvicorn with our signal handling; it cancels handlers only DRAIN_GRACE_S after the drain, by which time
    the drain has answered every request left (so no handler dies with a CancelledError)."""

    class DrainingServer(uvicorn.Server):
        """uvicorn re-raises SIGTERM after a graceful shutdown (exit 143); a drained server exits 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():  # embedded (tests): no signals
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame):
            if on_signal is not None and not self.should_exit:
                on_signal(sig)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=drain_timeout + DRAIN_GRACE_S, lifespan="on"
    )
    return DrainingServer(config)


def _new_trace(path: Path):
    """The --trace-steps file, created here (an existing file is never overwritten), line-buffered."""
    try:
        return open(path, "x", buffering=1, encoding="utf-8")  # noqa: SIM115 (closed by _close_trace)
    except FileExistsError:
        raise ValueError(
            f"--trace-steps {path} exists; name a new file (an existing one is never overwritten)"
        ) from None
    except OSError as err:
        raise ValueError(f"--trace-steps {path} cannot be created ({err.strerror})") from None


def _close_trace(trace, keep: bool) -> None:
    """Close the trace file; one the server never got to write (it did not load) is removed."""
    if trace is None:
        return
    trace.close()
    if not keep:
        Path(trace.name).unlink(missing_ok=True)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one (read it back with getsockname)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({err.strerror})") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def serve(
    bundle,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int | None = None,
    max_queue: int = 64,
    threads: int | None = None,
    drain_timeout: float = 30.0,
    echo=print,
    devices=None,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    ignore_unknown_fields: bool = False,
    tool_call_parser: str = "llama4_json",
    api_key: str | None = None,
    served_model_name: str | None = None,
    chat_template: str | None = None,
    allowed_origins: tuple[str, ...] = (),
    log_requests: bool = False,
    allowed_local_media_path: str | None = None,
    admission_wait_ms: float = ADMISSION_WAIT_MS,
    trace_steps: str | None = None,
) -> None:
    """Load a bundle and serve it until SIGTERM/SIGINT; `echo` gets the one-line status messages. `devices`:
    load's (one device per pipeline stage). `trace_steps`: a new file for one JSON line per engine step (kind,
    seconds, rows, tokens, started on time.perf_counter's clock)."""
    if max_queue < 0:
        raise ValueError(f"--max-queue is {max_queue}; it must be 0 or more")
    if drain_timeout < 0:
        raise ValueError(f"--drain-timeout is {drain_timeout}; it must be 0 or more")
    # what can be refused without loading the weights is refused before anything listens
    manifest = read_manifest(bundle)
    rows = manifest.profiles["max_batch"]
    if max_batch is not None and not 1 <= max_batch <= rows:
        raise ValueError(f"max_batch is {max_batch}; the bundle's engine takes 1 to {rows} rows")
    if chat_template is not None:
        _read_template(Path(chat_template))
    if log_requests:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s access %(message)s"))
        access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)
    trace = _new_trace(Path(trace_steps)) if trace_steps is not None else None
    try:
        sock = bind(host, port)
    except BaseException:
        _close_trace(trace, keep=False)
        raise
    bound = sock.getsockname()[1]

    def make_server() -> Server:
        engine = load(bundle, threads=threads, devices=devices)
        try:
            server = Server(
                engine,
                max_batch=max_batch,
                max_queue=max_queue,
                max_request_bytes=max_request_bytes,
                ignore_unknown_fields=ignore_unknown_fields,
                tool_call_parser=tool_call_parser,
                api_key=api_key,
                served_model_name=served_model_name,
                chat_template=Path(chat_template) if chat_template is not None else None,
                allowed_origins=allowed_origins,
                log_requests=log_requests,
                allowed_local_media_path=None if allowed_local_media_path is None else Path(allowed_local_media_path),
                admission_wait_ms=admission_wait_ms,
                trace_steps=trace,
            )
        except BaseException:
            engine.close()
            raise
        return server

    app = Loading(make_server)
    app.on_ready = lambda server: echo(  # once it answers: a client reading this line may send at once
        f"serving {server.model} ({server.scheduler.max_batch} rows, queue {max_queue}, chat template: "
        f"{server.chat_template.source}) on http://{host}:{bound}"
    )

    def on_signal(sig):
        server = app.server
        running = server.scheduler.occupancy + server.scheduler.queue_depth if server else 0
        echo(
            f"{signal.Signals(sig).name}: no new requests; draining {running} "
            f"in-flight request(s) for at most {drain_timeout:g} s"
        )
        if server is not None:
            server.drain(drain_timeout)

    uv = _uvicorn_server(app, drain_timeout, on_signal)
    app.on_failure = lambda: setattr(uv, "should_exit", True)
    try:
        asyncio.run(uv.serve(sockets=[sock]))
    finally:
        app.close()
        if app.server is not None:
            app.server.engine.close()
        _close_trace(trace, keep=app.server is not None)
    if app.failed is not None:
        raise app.failed
    echo("stopped")
