"""`llama4-deploy serve`: an OpenAI-compatible HTTP server over a bundle (FastAPI + uvicorn).

This layer only translates: request bodies (llama4_deploy.serving.protocol) become scheduler `Request`s,
their `Output`s become OpenAI responses or server-sent-event chunks. Batching lives in
runtime/scheduler.py, which a worker thread steps; each request's outputs cross to the event loop
through an asyncio queue.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus text).
Faults: invalid input -> 400 with an OpenAI error object (never 500); a full queue -> 429 with
Retry-After; a client that disconnects cancels its request and frees its row; an engine error fails
that step's requests (500 / an error event); SIGTERM stops intake, drains in-flight requests for
at most `drain_timeout` seconds, then exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
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
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama4_deploy.runtime import load
from llama4_deploy.runtime.engine import Engine
from llama4_deploy.runtime.scheduler import Output, QueueFull, Request, Scheduler, StepRecord
from llama4_deploy.runtime.tokenizer import Tokenizer, load_tokenizer
from llama4_deploy.serving.protocol import ChatCompletionRequest, CompletionRequest, error_body

log = logging.getLogger("llama4_deploy.serving.server")
RETRY_AFTER_S = 1
# Llama 4's header format; used when the bundle has no tokenizer_config.json with a chat_template
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|header_start|>{{ message['role'] }}<|header_end|>\n\n{{ message['content'] | trim }}<|eot|>"
    "{% endfor %}{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)
DEFAULT_BOS = "<|begin_of_text|>"


class ClientError(ValueError):
    """Bad client input that only shows once the request is interpreted (400)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


# -- chat template ------------------------------------------------------------------------------
class ChatTemplate:
    """The checkpoint's Jinja chat template (tokenizer_config.json) or Llama 4's header format,
    rendered in Jinja's immutable sandbox as transformers does."""

    def __init__(self, config_path: Path | None):
        config = json.loads(config_path.read_text()) if config_path and config_path.is_file() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.source = "tokenizer_config.json" if template else "built-in Llama 4 header format"
        self.special = {key: self._token(config.get(key)) for key in ("bos_token", "eos_token")}
        self.special["bos_token"] = (
            self.special["bos_token"] if template else (self.special["bos_token"] or DEFAULT_BOS)
        )
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = self._raise
        self.template = env.from_string(template or DEFAULT_CHAT_TEMPLATE)

    @staticmethod
    def _token(value) -> str:
        return (value.get("content") if isinstance(value, dict) else value) or ""

    @staticmethod
    def _raise(message: str):
        raise ClientError(message, "messages")

    def render(self, messages: list[dict]) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, **self.special)
        except TemplateError as err:
            raise ClientError(f"the chat template cannot render these messages ({err})", "messages") from None


# -- metrics ------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics, named as serving dashboards already graph them."""

    def __init__(self, scheduler: Scheduler):
        disable_created_metrics()  # no *_created series: they double the text and nobody graphs them
        self.registry = CollectorRegistry()
        r = self.registry
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
class _Run:
    """A submitted request seen from the event loop: its outputs as text deltas."""

    def __init__(self, server: Server, request: Request, stop_strings: tuple[str, ...], endpoint: str):
        self.server = server
        self.request = request
        self.endpoint = endpoint
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        request.listener = lambda _, output: loop.call_soon_threadsafe(self.queue.put_nowait, output)
        tokenizer = server.tokenizer
        if stop_strings and tokenizer is None:
            raise ClientError(
                f"bundle {server.model} has no tokenizer.json, so stop strings cannot be matched; "
                "give stop token ids instead",
                "stop",
            )
        self.stream = tokenizer.stream(stop_strings) if tokenizer else None
        self.tokens: list[int] = []  # tokens whose text is in the answer
        self.finish_reason: str | None = None
        self.error: str | None = None

    def submit(self) -> None:
        try:
            self.server.scheduler.submit(self.request)
        except QueueFull as err:
            raise ClientError(
                f"the server is busy ({err}); retry after {RETRY_AFTER_S} s", status=429, code="queue_full"
            ) from None
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
                if output.token in self.request.stop_tokens:  # its text is not part of the answer
                    continue
                self.tokens.append(output.token)
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
        if request.first_token_at is not None:
            metrics.ttft.observe(request.first_token_at - request.arrived)
            metrics.latency.observe(time.monotonic() - request.arrived)

    def usage(self) -> dict:
        prompt = len(self.request.prompt)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": len(self.tokens),
            "total_tokens": prompt + len(self.tokens),
        }


# -- the server ---------------------------------------------------------------------------------
class Server:
    """Engine + scheduler + tokenizer + chat template + metrics behind one FastAPI app."""

    def __init__(self, engine: Engine, max_batch: int | None = None, max_queue: int = 64):
        self.engine = engine
        self.model = engine.manifest.name
        self.created = int(time.time())
        self.tokenizer: Tokenizer | None = None
        if engine.manifest.tokenizer_path is not None and engine.manifest.tokenizer_path.is_file():
            self.tokenizer = load_tokenizer(engine.manifest)
        self.chat_template = ChatTemplate(engine.manifest.tokenizer_config_path)
        self.scheduler = Scheduler(engine, max_batch=max_batch, max_queue=max_queue)
        self.metrics = Metrics(self.scheduler)
        self.scheduler.on_step = self.metrics.observe_step
        self.app = self._make_app()

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

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one prompt
        if isinstance(prompt, str):
            return self._encode(prompt, "prompt")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return prompt
        raise ClientError("prompt holds several prompts; send one prompt per request", "prompt")

    def _request(self, body, prompt: list[int], max_tokens: int, logprobs: int | None) -> Request:
        stop = set(body.stop_ids()) | (set() if body.ignore_eos else set(self.engine.manifest.eos_token_ids))
        return Request(
            prompt,
            max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop_tokens=frozenset(stop),
            logprobs=logprobs,
        )

    def _token_text(self, token: int) -> str:
        return self.tokenizer.token_text(token) if self.tokenizer else str(token)

    # -- endpoints -------------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, http: HttpRequest):
        self._check_model(body.model)
        prompt = self._prompt_ids(body.prompt)
        max_tokens = body.max_tokens or 16
        run = _Run(self, self._request(body, prompt, max_tokens, body.logprobs), body.stop_strings(), "completions")
        run.submit()
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.model}
        want_logprobs = body.logprobs is not None

        def logprobs_of(outputs: list[Output]) -> dict | None:
            if not want_logprobs:
                return None
            return {
                "tokens": [self._token_text(o.token) for o in outputs],
                "token_logprobs": [o.logprob for o in outputs],
                "top_logprobs": [{self._token_text(t): lp for t, lp in o.top_logprobs} for o in outputs],
                "text_offset": [],
            }

        if body.stream:

            async def events():
                async for text, outputs in run.deltas():
                    choice = {
                        "index": 0,
                        "text": text,
                        "logprobs": logprobs_of(outputs),
                        "finish_reason": None,
                        "token_ids": [o.token for o in outputs],
                    }
                    yield _sse({**head, "choices": [choice]})
                for chunk in _stream_end(
                    run, head, {"index": 0, "text": "", "logprobs": None, "finish_reason": run.finish_reason}, body
                ):
                    yield chunk

            return StreamingResponse(events(), media_type="text/event-stream")

        text, outputs = await _collect(run, http)
        if run.error or run.finish_reason == "cancelled":
            return _error_response(run)
        choice = {
            "index": 0,
            "text": text,
            "logprobs": logprobs_of(outputs),
            "finish_reason": run.finish_reason,
            "token_ids": run.tokens,
        }
        return {**head, "choices": [choice], "usage": run.usage()}

    async def chat_completions(self, body: ChatCompletionRequest, http: HttpRequest):
        self._check_model(body.model)
        rendered = self.chat_template.render([{"role": m.role, "content": m.text()} for m in body.messages])
        prompt = self._encode(rendered, "messages", special=False)
        room = self.engine.manifest.max_context - len(prompt)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(room, 1)
        top = (body.top_logprobs or 0) if body.logprobs else None
        run = _Run(self, self._request(body, prompt, max_tokens, top), body.stop_strings(), "chat.completions")
        run.submit()
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def entry(o: Output) -> dict:
            name = self._token_text(o.token)
            return {
                "token": name,
                "logprob": o.logprob,
                "bytes": list(name.encode()),
                "top_logprobs": [
                    {"token": self._token_text(t), "logprob": lp, "bytes": list(self._token_text(t).encode())}
                    for t, lp in o.top_logprobs
                ],
            }

        if body.stream:
            head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model}

            async def events():
                yield _sse(
                    {
                        **head,
                        "choices": [
                            {
                                "index": 0,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ],
                    }
                )
                async for text, outputs in run.deltas():
                    logprobs = {"content": [entry(o) for o in outputs]} if body.logprobs else None
                    yield _sse(
                        {
                            **head,
                            "choices": [
                                {"index": 0, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": None}
                            ],
                        }
                    )
                for chunk in _stream_end(
                    run, head, {"index": 0, "delta": {}, "logprobs": None, "finish_reason": run.finish_reason}, body
                ):
                    yield chunk

            return StreamingResponse(events(), media_type="text/event-stream")

        text, outputs = await _collect(run, http)
        if run.error or run.finish_reason == "cancelled":
            return _error_response(run)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": {"content": [entry(o) for o in outputs]} if body.logprobs else None,
            "finish_reason": run.finish_reason,
        }
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": self.model,
            "choices": [choice],
            "usage": run.usage(),
        }

    # -- app ---------------------------------------------------------------------------------------
    def _make_app(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.scheduler.start()
            yield
            self.scheduler.stop()

        app = FastAPI(title="llama4-deploy", lifespan=lifespan)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat_completions)

        @app.get("/v1/models")
        async def models():
            return {
                "object": "list",
                "data": [
                    {
                        "id": self.model,
                        "object": "model",
                        "created": self.created,
                        "owned_by": "llama4-deploy",
                        "max_model_len": self.engine.manifest.max_context,
                    }
                ],
            }

        @app.get("/health")
        async def health():
            return {"status": "ok", "queue_depth": self.scheduler.queue_depth, "running": self.scheduler.occupancy}

        @app.get("/metrics")
        async def metrics():
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.exception_handler(RequestValidationError)
        async def invalid(_, err: RequestValidationError):
            first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
            if first.get("type") == "json_invalid":
                where, message = (
                    None,
                    f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})",
                )
            else:
                where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
                message = f"{where}: {first['msg']}" if where else f"the request body: {first['msg']}"
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
                else "invalid_request_error"
            )
            return JSONResponse(
                error_body(str(err), kind, err.param, err.code), status_code=err.status, headers=headers
            )

        @app.exception_handler(StarletteHTTPException)
        async def http_error(_, err: StarletteHTTPException):
            return JSONResponse(error_body(str(err.detail), "invalid_request_error"), status_code=err.status_code)

        return app


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _stream_end(run, head: dict, last_choice: dict, body):
    """The closing events of a stream: an error event, or the choice that carries finish_reason (and usage,
    when asked); then OpenAI's terminator."""
    if run.error or run.finish_reason == "cancelled":
        yield _sse(_run_error(run))
    else:
        yield _sse({**head, "choices": [last_choice]})
        if body.stream_options and body.stream_options.include_usage:
            yield _sse({**head, "choices": [], "usage": run.usage()})
    yield "data: [DONE]\n\n"


def _run_error(run: _Run) -> dict:
    message = run.error or "the request was cancelled (the server is shutting down)"
    return error_body(message, "server_error")


def _error_response(run: _Run) -> JSONResponse:
    return JSONResponse(_run_error(run), status_code=500 if run.error else 503)


async def _collect(run: _Run, http: HttpRequest) -> tuple[str, list[Output]]:
    """Gather a non-streamed answer; if the client disconnects first, cancel the request."""

    async def gather():
        text, outputs = [], []
        async for piece, new in run.deltas():
            text.append(piece)
            outputs.extend(new)
        return "".join(text), outputs

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
def _uvicorn_server(app, drain_timeout: float, on_signal=None):
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

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=drain_timeout, lifespan="on")
    return DrainingServer(config)


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
) -> None:
    """Load a bundle and serve it until SIGTERM/SIGINT; `echo` gets the one-line status messages. `devices`:
    load's (one device per pipeline stage)."""
    if max_queue < 0:
        raise ValueError(f"--max-queue is {max_queue}; it must be 0 or more")
    if drain_timeout < 0:
        raise ValueError(f"--drain-timeout is {drain_timeout}; it must be 0 or more")
    engine = load(bundle, threads=threads, devices=devices)
    try:
        server = Server(engine, max_batch=max_batch, max_queue=max_queue)
        sock = bind(host, port)
        bound = sock.getsockname()[1]

        def on_signal(sig):
            echo(
                f"{signal.Signals(sig).name}: no new requests; draining "
                f"{server.scheduler.occupancy + server.scheduler.queue_depth} "
                f"in-flight request(s) for at most {drain_timeout:g} s"
            )

        echo(
            f"serving {server.model} ({server.scheduler.max_batch} rows, queue {max_queue}, chat template: "
            f"{server.chat_template.source}) on http://{host}:{bound}"
        )
        uv = _uvicorn_server(server.app, drain_timeout, on_signal)
        asyncio.run(uv.serve(sockets=[sock]))
        echo("stopped")
    finally:
        engine.close()
