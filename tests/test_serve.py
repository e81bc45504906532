"""`llama4-deploy serve` on loopback: OpenAI's own client (completions, chat, streaming), concurrent
clients equal to `generate`, every error path, disconnects, metrics, SIGTERM draining.

Servers listen on 127.0.0.1 with an ephemeral port; every request loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
openai = pytest.importorskip("openai", reason="the test extra (openai client) is not installed")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from llama4_deploy.runtime import load  # noqa: E402
from llama4_deploy.runtime.scheduler import Request  # noqa: E402
from llama4_deploy.runtime.tokenizer import load_tokenizer  # noqa: E402
from llama4_deploy.serving.server import Server, _uvicorn_server, bind  # noqa: E402
from tests.conftest import fails_once, ranked_samples  # noqa: E402
from tests.runtime.test_engine import prompts_of  # noqa: E402

TIMEOUT = 60  # seconds any one request may take on a loaded 2-core machine


class Live:
    """A Server on a uvicorn thread in this process, on 127.0.0.1:<ephemeral>."""

    def __init__(self, engine, **kwargs):
        self.server = Server(engine, **kwargs)
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.uvicorn = _uvicorn_server(self.server.app, drain_timeout=5)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.uvicorn.serve(sockets=[self.sock])), daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self.uvicorn.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.uvicorn.should_exit = True
        self.thread.join(TIMEOUT)

    def client(self):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)

    def post(self, path, body, raw=False):
        """(status, headers, parsed JSON) of one POST; `body` as bytes is sent as is."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, data, {"content-type": "application/json"})
        response = conn.getresponse()
        payload = response.read().decode()
        conn.close()
        return response.status, dict(response.getheaders()), payload if raw else json.loads(payload)

    def get(self, path):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        conn.request("GET", path)
        response = conn.getresponse()
        payload = response.read().decode()
        conn.close()
        return response.status, payload

    def metrics(self) -> dict:
        """Samples by (name, sorted labels)."""
        _, text = self.get("/metrics")
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


@pytest.fixture(scope="module")
def engine(checkpoint_bundle):
    with load(checkpoint_bundle) as engine:
        yield engine


@pytest.fixture(scope="module")
def live(engine):
    with Live(engine, max_queue=16) as live:
        yield live


@pytest.fixture
def slow_steps(engine, monkeypatch):
    """Engine steps of at least 20 ms, so a request of 100 tokens lasts seconds."""
    real = engine.run_step

    def slow(*args):
        time.sleep(0.02)
        return real(*args)

    monkeypatch.setattr(engine, "run_step", slow)


def generated(engine, prompt, n):
    return engine.generate([prompt], n, stop_tokens=[]).tokens[0]


# -- OpenAI's client ----------------------------------------------------------------------------
def test_openai_client_completions_chat_streaming_and_models(live, engine):
    client, tokenizer = live.client(), load_tokenizer(engine.manifest)
    name = engine.manifest.name
    assert [model.id for model in client.models.list().data] == [name]

    prompt = "w5 w6 w7 w8"
    expected = generated(engine, tokenizer.encode(prompt), 8)
    done = client.completions.create(
        model=name, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert done.choices[0].text == tokenizer.decode(expected) and done.choices[0].finish_reason == "length"
    assert done.usage.prompt_tokens == 4 and done.usage.completion_tokens == 8
    by_ids = client.completions.create(
        model=name, prompt=tokenizer.encode(prompt), max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert by_ids.choices[0].text == done.choices[0].text
    chunks = list(
        client.completions.create(
            model=name,
            prompt=prompt,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8

    # chat: the bundle's tokenizer_config.json template (tests/conftest.py), not the built-in one
    messages = [{"role": "system", "content": "w3"}, {"role": "user", "content": "w10 w11 w12"}]
    rendered = "w1 w7 system w8 w3 w9 w7 user w8 w10 w11 w12 w9 w7 assistant w8"
    assert live.server.chat_template.source == "tokenizer_config.json"  # copied into the bundle by the build
    assert live.server.chat_template.render(messages) == rendered
    chat_prompt = tokenizer.encode(rendered, add_special_tokens=False)
    expected = generated(engine, chat_prompt, 6)
    reply = client.chat.completions.create(
        model=name, messages=messages, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert reply.choices[0].message.content == tokenizer.decode(expected)
    assert reply.usage.prompt_tokens == len(chat_prompt)
    deltas = list(
        client.chat.completions.create(
            model=name, messages=messages, max_tokens=6, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == reply.choices[0].message.content
    assert deltas[-1].choices[0].finish_reason == "length"


def test_sse_stream_ends_with_done_and_stop_strings_cut_the_text(live, engine):
    tokenizer = load_tokenizer(engine.manifest)
    expected = tokenizer.decode(generated(engine, [5, 6, 7], 10))
    stop = expected.split()[3]  # a word in the middle of the answer
    status, headers, body = live.post(
        "/v1/completions",
        {
            "model": engine.manifest.name,
            "prompt": [5, 6, 7],
            "max_tokens": 10,
            "temperature": 0,
            "stream": True,
            "stop": [stop],
            "ignore_eos": True,
        },
        raw=True,
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert body.endswith("data: [DONE]\n\n")
    events = [json.loads(line[6:]) for line in body.split("\n\n") if line.startswith("data: {")]
    text = "".join(e["choices"][0]["text"] for e in events)
    assert text == expected[: expected.index(stop)] and events[-1]["choices"][0]["finish_reason"] == "stop"


def test_concurrent_clients_each_get_what_generate_gives_alone(live, engine):
    # 8 clients on 4 rows (the engine's max_batch): rows join and leave while others decode
    prompts = prompts_of([3, 17, 9, 30, 5, 12, 2, 21], seed=12, vocab=engine.vocab_size)
    budgets = [9, 4, 12, 6, 10, 3, 8, 5]
    client = live.client()

    def ask(i):
        done = client.completions.create(
            model=engine.manifest.name,
            prompt=prompts[i],
            max_tokens=budgets[i],
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        return done.id, done.choices[0].token_ids

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert len({rid for rid, _ in answers}) == 8
    for prompt, budget, (_, tokens) in zip(prompts, budgets, answers):
        assert tokens == generated(engine, prompt, budget)


def test_seeded_sampling_over_http_equals_generate_with_the_seed(live, engine):
    done = live.client().completions.create(
        model=engine.manifest.name,
        prompt=[9, 8, 7],
        max_tokens=8,
        temperature=0.8,
        top_p=0.9,
        seed=3,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    expected = engine.generate([[9, 8, 7]], 8, temperature=0.8, top_p=0.9, seed=3, stop_tokens=[]).tokens[0]
    assert done.choices[0].token_ids == expected
    assert len(done.choices[0].logprobs.top_logprobs) == 8 and all(
        len(t) == 2 for t in done.choices[0].logprobs.top_logprobs
    )
    client = live.client()
    chosen_only = (
        client.completions.create(
            model=engine.manifest.name,
            prompt=[9, 8, 7],
            max_tokens=3,
            temperature=0,
            logprobs=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .logprobs
    )
    assert len(chosen_only.token_logprobs) == 3 and all(lp <= 0 for lp in chosen_only.token_logprobs)
    assert chosen_only.top_logprobs == [{}, {}, {}]
    chat = client.chat.completions.create(
        model=engine.manifest.name,
        messages=[{"role": "user", "content": "w4"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    ).choices[0]
    entries = chat.logprobs.content
    assert len(entries) == 3 and all(len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token for e in entries)


def test_the_built_in_chat_template_is_llama_4_s_header_format():
    from llama4_deploy.serving.server import ChatTemplate

    template = ChatTemplate(None)
    assert template.source == "built-in Llama 4 header format"
    assert template.render([{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hi"}]) == (
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\nBe brief.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nHi<|eot|><|header_start|>assistant<|header_end|>\n\n"
    )


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, param, message",
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "valid dictionary"),
        ({"prompt": "w1"}, "model", "Field required"),
        ({"model": "M", "prompt": "w1", "n": 0}, "n", "greater than or equal to 1"),
        ({"model": "M", "prompt": "w1", "n": 9}, "n", "n is 9; the samples of a prompt run together"),
        ({"model": "M", "prompt": "w1", "temperature": 5}, "temperature", "less than or equal to 2"),
        ({"model": "M", "prompt": "w1", "top_p": 0}, "top_p", "greater than 0"),
        ({"model": "M", "prompt": "w1", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"model": "M", "prompt": "w1", "logprobs": 50}, "logprobs", "less than or equal to 20"),
        ({"model": "M", "prompt": "w1", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"model": "M", "prompt": {"text": "w1"}}, "prompt", "must be a string, a list of token ids"),
        ({"model": "M", "prompt": [1, 99999]}, "prompt", "outside the vocabulary"),
        ({"model": "M", "prompt": []}, "prompt", "prompt is empty"),
        ({"model": "M", "prompt": [1] * 1020, "max_tokens": 10}, "prompt", "exceeds the bundle's context"),
    ],
)
def test_invalid_completions_are_400_with_an_openai_error_object(live, engine, body, param, message):
    if isinstance(body, dict) and body.get("model") == "M":
        body = {**body, "model": engine.manifest.name}
    status, _, answer = live.post("/v1/completions", body)
    assert status == 400, answer
    error = answer["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param or (param and error["param"].startswith(param))


def test_a_bundle_without_tokenizer_takes_token_ids_only(tiny_bundle):
    with load(tiny_bundle) as engine, Live(engine) as live:
        for path, body, param in [
            ("/v1/completions", {"model": "tiny", "prompt": "w1 w2"}, "prompt"),
            ("/v1/completions", {"model": "tiny", "prompt": [1], "stop": "x"}, "stop"),
            ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, "messages"),
        ]:
            status, _, answer = live.post(path, body)
            assert (
                status == 400
                and answer["error"]["param"] == param
                and "no tokenizer.json" in answer["error"]["message"]
            )
        full = generated(engine, [1, 2], 4)
        status, _, answer = live.post(
            "/v1/completions",
            {
                "model": "tiny",
                "prompt": [1, 2],
                "max_tokens": 4,
                "temperature": 0,
                "stop": [full[2]],
                "ignore_eos": True,
            },
        )
        assert status == 200 and answer["choices"][0]["finish_reason"] == "stop"  # an integer stop is a token id
        assert answer["choices"][0]["token_ids"] == full[: full.index(full[2])]  # the stop token itself is left out


def test_chat_errors_unknown_model_and_route(live, engine):
    name = engine.manifest.name
    for body, message in [
        ({"model": name, "messages": []}, "at least 1 item"),
        ({"model": name, "messages": [{"role": "wizard", "content": "w1"}]}, "messages.0.role"),
        ({"model": name, "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"model": name, "messages": [{"role": "user", "content": "w1"}], "top_logprobs": -1}, "top_logprobs"),
    ]:
        status, _, answer = live.post("/v1/chat/completions", body)
        assert status == 400 and message in answer["error"]["message"], answer
    status, _, answer = live.post("/v1/completions", {"model": "gpt-4", "prompt": "w1"})
    assert status == 404 and answer["error"]["code"] == "model_not_found"
    status, text = live.get("/v1/nothing")
    assert status == 404 and json.loads(text)["error"]["message"] == "Not Found"
    with pytest.raises(openai.BadRequestError, match="n is 5"):
        live.client().completions.create(model=name, prompt="w1", n=5)


def test_a_full_queue_answers_429_with_retry_after(engine, slow_steps):
    with Live(engine, max_batch=1, max_queue=0) as live:
        filler = live.server.scheduler.submit(Request([1, 2, 3], 100))  # holds the only row for 2 s and more
        status, headers, answer = live.post("/v1/completions", {"model": engine.manifest.name, "prompt": [4]})
        live.server.scheduler.cancel(filler)
        assert status == 429 and headers["retry-after"] == "1"
        assert answer["error"]["type"] == "rate_limit_error" and "busy" in answer["error"]["message"]
        assert live.metrics()[("llama4_deploy_requests_rejected_total", (("status", "429"),))] == 1


def test_an_engine_error_fails_that_request_with_500_and_the_next_one_works(live, engine, monkeypatch):
    monkeypatch.setattr(engine, "run_step", fails_once(engine.run_step, "device lost"))
    status, _, answer = live.post("/v1/completions", {"model": engine.manifest.name, "prompt": [3, 4], "max_tokens": 3})
    assert status == 500 and answer["error"] == {
        "message": "engine error: device lost",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    status, _, answer = live.post(
        "/v1/completions",
        {"model": engine.manifest.name, "prompt": [3, 4], "max_tokens": 3, "temperature": 0, "ignore_eos": True},
    )
    assert status == 200 and answer["choices"][0]["token_ids"] == generated(engine, [3, 4], 3)


# -- disconnects and metrics ----------------------------------------------------------------------
def _wait_for(condition, what):
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_client_that_disconnects_frees_its_row(engine, slow_steps):
    with Live(engine) as live:
        cancelled = lambda endpoint: live.metrics().get(
            ("llama4_deploy_requests_total", (("endpoint", endpoint), ("finish_reason", "cancelled"))), 0
        )
        body = {"model": engine.manifest.name, "prompt": [1, 2, 3], "max_tokens": 100, "ignore_eos": True}
        # streamed: read the first event, then hang up
        conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=TIMEOUT)
        conn.request(
            "POST", "/v1/completions", json.dumps({**body, "stream": True}), {"content-type": "application/json"}
        )
        response = conn.getresponse()
        assert response.read(7) == b"data: {"  # the first event has come
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        _wait_for(lambda: cancelled("completions") == 1, "the streamed request to be cancelled")
        # not streamed: hang up while it runs (100 steps of >= 20 ms)
        sock = socket.create_connection(("127.0.0.1", live.port), timeout=TIMEOUT)
        payload = json.dumps(body).encode()
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        _wait_for(lambda: live.server.scheduler.occupancy == 1, "the request to take a row")
        sock.close()
        _wait_for(lambda: cancelled("completions") == 2, "the unstreamed request to be cancelled")
        _wait_for(lambda: live.server.scheduler.occupancy == 0, "the rows to be free")
        assert live.metrics()[("llama4_deploy_batch_occupancy", ())] == 0


def test_metrics_are_prometheus_text_with_the_usual_series(live, engine):
    live.post("/v1/completions", {"model": engine.manifest.name, "prompt": [1, 2], "max_tokens": 2, "ignore_eos": True})
    samples = live.metrics()
    assert samples[("llama4_deploy_prompt_tokens_total", ())] >= 2
    assert samples[("llama4_deploy_generation_tokens_total", ())] >= 2
    assert samples[("llama4_deploy_requests_total", (("endpoint", "completions"), ("finish_reason", "length")))] >= 1
    assert samples[("llama4_deploy_queue_depth", ())] == 0
    assert samples[("llama4_deploy_batch_max_rows", ())] == engine.max_batch
    assert samples[("llama4_deploy_step_seconds_count", (("kind", "decode"),))] >= 1
    assert samples[("llama4_deploy_step_seconds_count", (("kind", "prefill"),))] >= 1
    assert samples[("llama4_deploy_time_to_first_token_seconds_count", ())] >= 1
    assert samples[("llama4_deploy_queue_time_seconds_count", ())] >= 1
    assert samples[("llama4_deploy_inter_token_latency_seconds_count", ())] >= 1
    assert samples[("llama4_deploy_kv_cache_usage_ratio", ())] == 0  # nothing running now
    assert samples[("llama4_deploy_model", (("model_name", engine.manifest.name),))] == 1
    assert samples[("process_resident_memory_bytes", ())] > 0
    status, text = live.get("/health")
    assert status == 200 and json.loads(text)["status"] == "ok"


# -- the CLI: SIGTERM drains, then exits 0 --------------------------------------------------------
def test_sigterm_stops_intake_drains_the_running_request_and_exits_0(tiny_bundle):
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama4_deploy.cli",
            "serve",
            str(tiny_bundle),
            "--port",
            "0",
            "--max-batch",
            "1",
            "--drain-timeout",
            "30",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stderr.readline()
        assert "serving tiny" in line, line
        port = int(line.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        body = {
            "model": "tiny",
            "prompt": [1, 2, 3],
            "max_tokens": 120,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
        response = conn.getresponse()
        first = response.read(7)
        assert first == b"data: {"  # the request is running
        server.send_signal(signal.SIGTERM)
        rest = response.read().decode()  # the request runs to its end
        events = [json.loads(e[6:]) for e in (first.decode() + rest).split("\n\n") if e.startswith("data: {")]
        assert rest.endswith("data: [DONE]\n\n") and events[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(len(e["choices"][0].get("token_ids", [])) for e in events) == 120
        assert server.wait(TIMEOUT) == 0
        log = server.stderr.read()
        assert "SIGTERM: no new requests; draining 1 in-flight request(s)" in log and "stopped" in log
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


@pytest.mark.parametrize(
    "args, message",
    [
        (["/no/such/bundle"], "is not a bundle"),
        (["BUNDLE", "--max-batch", "9"], "takes 1 to 4 rows"),
        (["BUNDLE", "--max-queue", "-1"], "--max-queue is -1"),
    ],
)
def test_serve_bad_arguments_are_one_sentence(tiny_bundle, args, message):
    from tests.test_cli import invoke, user_error

    args = [str(tiny_bundle) if a == "BUNDLE" else a for a in args]
    user_error(invoke("serve", *args, "--port", "0"), message)


# -- the server survives any request (issue 26) -------------------------------------------------------
def _greedy_still_equals_generate(live, engine):
    body = {"model": engine.manifest.name, "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    status, _, answer = live.post("/v1/completions", body)
    assert status == 200 and answer["choices"][0]["token_ids"] == generated(engine, [5, 6, 7], 3), answer


def test_a_scheduler_fault_fails_that_step_and_the_scheduler_goes_on(live, engine, monkeypatch):
    # a fault outside the engine call (in sampling, bookkeeping, ...) raised once on the scheduler thread
    scheduler = live.server.scheduler
    monkeypatch.setattr(scheduler, "_emit", fails_once(scheduler._emit, "injected fault"))
    status, _, answer = live.post("/v1/completions", {"model": engine.manifest.name, "prompt": [3, 4], "max_tokens": 3})
    assert status == 500 and answer["error"] == {
        "message": "internal error in the scheduler step: injected fault",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    assert scheduler.alive and scheduler.occupancy == 0
    status, text = live.get("/health")
    assert status == 200 and json.loads(text)["status"] == "ok"
    _greedy_still_equals_generate(live, engine)


def test_a_dead_scheduler_thread_answers_503_instead_of_hanging(engine):
    with Live(engine) as live:
        scheduler = live.server.scheduler

        def dies(*args):
            raise SystemExit("injected: the thread ends")  # what no `except Exception` catches

        scheduler.step = dies
        status, _, answer = live.post(
            "/v1/completions", {"model": engine.manifest.name, "prompt": [3], "max_tokens": 2}
        )
        assert status == 500 and "the scheduler thread stopped (SystemExit: injected" in answer["error"]["message"]
        _wait_for(lambda: not scheduler._worker.is_alive(), "the scheduler thread to end")
        status, text = live.get("/health")
        assert status == 503 and json.loads(text)["status"] == "error"
        assert "the scheduler thread has stopped" in json.loads(text)["reason"]
        status, _, answer = live.post(
            "/v1/completions", {"model": engine.manifest.name, "prompt": [3], "max_tokens": 2}
        )
        assert status == 503 and answer["error"]["type"] == "server_error" and answer["error"]["code"] == "unavailable"
        assert "the scheduler thread has stopped" in answer["error"]["message"]


def test_health_answers_while_a_10_mb_prompt_is_tokenized(live, engine):
    # 10 MiB of text, ~100k tokens: seconds of tokenizing on a worker thread, then refused for the context
    prompt = ("w5" * 50 + " ") * (10 * 2**20 // 101)
    result = {}

    def ask():
        result["answer"] = live.post("/v1/completions", {"model": engine.manifest.name, "prompt": prompt})

    asker = threading.Thread(target=ask)
    start = time.monotonic()
    asker.start()
    latencies = []
    while asker.is_alive():
        asked = time.monotonic()
        status, _ = live.get("/health")
        latencies.append(time.monotonic() - asked)
        assert status == 200
        time.sleep(0.05)
    took = time.monotonic() - start
    status, _, answer = result["answer"]
    assert status == 400 and "exceeds the bundle's context" in answer["error"]["message"]
    # the request took seconds; /health never waited for it (it waited 12 s when tokenizing blocked the loop)
    assert took > 1.0 and len(latencies) >= 5, (took, latencies)
    assert max(latencies) < 1.0, latencies
    _greedy_still_equals_generate(live, engine)


def test_a_body_over_max_request_bytes_is_413(engine):
    with Live(engine, max_request_bytes=4096) as live:
        body = {"model": engine.manifest.name, "prompt": "w1 " * 2000}
        status, _, answer = live.post("/v1/completions", body)
        assert status == 413 and answer["error"]["type"] == "invalid_request_error"
        assert answer["error"]["code"] == "request_too_large"
        assert "exceeds the server's limit of 4096 bytes (--max-request-bytes)" in answer["error"]["message"]
        # chunked: no Content-Length, refused once the bytes pass the limit
        conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=TIMEOUT)
        chunks = (json.dumps(body).encode()[i : i + 1000] for i in range(0, 7000, 1000))
        conn.request("POST", "/v1/completions", chunks, {"content-type": "application/json"}, encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
        conn.close()
        assert live.metrics()[("llama4_deploy_requests_rejected_total", (("status", "413"),))] == 2
        _greedy_still_equals_generate(live, engine)


def test_a_drain_answers_the_requests_it_cancels_with_503(engine, slow_steps):
    with Live(engine, max_batch=1) as live:
        name = engine.manifest.name
        body = {"model": name, "prompt": [1, 2, 3], "max_tokens": 100, "ignore_eos": True}
        conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=TIMEOUT)
        conn.request(
            "POST", "/v1/completions", json.dumps({**body, "stream": True}), {"content-type": "application/json"}
        )
        streamed = conn.getresponse()
        assert streamed.read(7) == b"data: {"  # it holds the only row
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(live.post, "/v1/completions", body)
            _wait_for(lambda: live.server.scheduler.queue_depth == 1, "the second request to wait")
            live.server.drain(0.2)
            status, text = live.get("/health")
            assert status == 503 and json.loads(text)["status"] == "draining"
            status, _, refused = live.post("/v1/completions", body)  # intake is closed
            assert status == 503 and "shutting down" in refused["error"]["message"]
            status, _, answer = queued.result(TIMEOUT)
        assert status == 503 and answer["error"]["type"] == "server_error"
        assert "cancelled (the server is shutting down)" in answer["error"]["message"]
        rest = streamed.read().decode()
        assert rest.endswith("data: [DONE]\n\n")
        last = json.loads([e for e in rest.split("\n\n") if e.startswith("data: {")][-1][6:])
        assert last["error"]["type"] == "server_error" and "shutting down" in last["error"]["message"]


def test_sigterm_past_the_drain_timeout_answers_503_without_a_traceback(tiny_bundle):
    args = ["serve", str(tiny_bundle), "--port", "0", "--max-batch", "1", "--drain-timeout", "0"]
    server = subprocess.Popen([sys.executable, "-m", "llama4_deploy.cli", *args], stderr=subprocess.PIPE, text=True)
    try:
        line = server.stderr.readline()
        port = int(line.rsplit(":", 1)[1])
        body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 120, "ignore_eos": True}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        conn.request(
            "POST", "/v1/completions", json.dumps({**body, "stream": True}), {"content-type": "application/json"}
        )
        streamed = conn.getresponse()
        assert streamed.read(7) == b"data: {"
        waiting = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        waiting.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})

        def queued_depth():
            health = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
            health.request("GET", "/health")
            depth = json.loads(health.getresponse().read())["queue_depth"]
            health.close()
            return depth

        _wait_for(lambda: queued_depth() == 1, "the second request to wait for the row")  # then SIGTERM
        server.send_signal(signal.SIGTERM)
        queued = waiting.getresponse()
        assert queued.status == 503 and "shutting down" in json.loads(queued.read())["error"]["message"]
        rest = streamed.read().decode()
        assert rest.endswith("data: [DONE]\n\n") and '"server_error"' in rest
        assert server.wait(TIMEOUT) == 0
        log = server.stderr.read()
        assert "Traceback" not in log and "CancelledError" not in log and "stopped" in log, log
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


# -- no silent ignoring (issue 27 item 1) --------------------------------------------------------------
# a value that asks for something, per refused field (the ones protocol.REFUSED lists)
ASKING = {
    "suffix": "w9",
    "best_of": 3,
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "w1"},
    "reasoning_effort": "high",
    "web_search_options": {},
    "service_tier": "flex",
    "response_format": {"type": "json_object"},
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "tool_choice": "required",
    "functions": [{"name": "f", "parameters": {}}],
    "function_call": "auto",
    "logit_bias": {"5": 100},
    "presence_penalty": 1.0,
    "frequency_penalty": 5.0,
    "top_k": 5,
    "min_p": 0.1,
    "repetition_penalty": 1.3,
    "min_tokens": 2,
    "guided_json": {"type": "object"},
    "guided_regex": "w[0-9]",
    "guided_choice": ["w1", "w2"],
    "guided_grammar": "root ::= 'w1'",
}
CHAT_ONLY = {"audio", "modalities", "prediction", "reasoning_effort", "web_search_options", "tools", "tool_choice"}
CHAT_ONLY |= {"functions", "function_call", "chat_template_kwargs"}


def test_every_refused_field_is_a_400_naming_it_unless_it_asks_for_nothing(live, engine):
    from llama4_deploy.serving.protocol import REFUSED

    assert set(ASKING) >= set(REFUSED)
    name = engine.manifest.name
    for field in REFUSED:
        path, body = (
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w1"}]})
            if field in CHAT_ONLY
            else ("/v1/completions", {"prompt": "w1"})
        )
        status, _, answer = live.post(path, {"model": name, **body, "max_tokens": 1, field: ASKING[field]})
        assert status == 400 and answer["error"]["param"] == field, (field, answer)
        assert answer["error"]["message"].startswith(f"{field}: not supported by this server ("), answer


def test_unknown_fields_are_400_naming_them_and_bookkeeping_fields_are_accepted(live, engine):
    name, client = engine.manifest.name, live.client()
    for path, body, param in [
        ("/v1/completions", {"prompt": [5, 6, 7], "temprature": 0}, "temprature"),
        ("/v1/completions", {"prompt": [5], "stream": True, "stream_options": {"include_usage": True, "x": 1}}, None),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w1", "weight": 2}]}, None),
    ]:
        status, _, answer = live.post(path, {"model": name, **body})
        param = param or answer["error"]["param"]
        assert status == 400 and answer["error"]["param"] in ("temprature", "stream_options.x", "messages.0.weight")
        assert (
            f"{param}: unknown field" in answer["error"]["message"]
            and "--ignore-unknown-fields" in answer["error"]["message"]
        )
    with pytest.raises(openai.BadRequestError, match="guided_decoding_backend: unknown field"):
        client.completions.create(model=name, prompt="w1", extra_body={"guided_decoding_backend": "xgrammar"})
    # store, metadata and user: accepted, without effect on the answer
    expected = generated(engine, [5, 6, 7], 3)
    done = client.completions.create(
        model=name,
        prompt=[5, 6, 7],
        max_tokens=3,
        temperature=0,
        user="u1",
        extra_body={"ignore_eos": True, "store": False, "metadata": {"k": "v"}},
    )
    assert done.choices[0].token_ids == expected


def test_ignore_unknown_fields_drops_them(engine):
    with Live(engine, ignore_unknown_fields=True) as live:
        body = {"model": engine.manifest.name, "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}
        status, _, answer = live.post("/v1/completions", {**body, "ignore_eos": True, "vendor_extra": {"a": 1}})
        assert status == 200 and answer["choices"][0]["token_ids"] == generated(engine, [5, 6, 7], 3)
        # a known field is still checked, and a refused one still refused
        assert live.post("/v1/completions", {**body, "max_tokens": "3"})[0] == 400
        assert live.post("/v1/completions", {**body, "suffix": "w1"})[0] == 400


# -- text that equals the tokens, logprobs as text (issue 27 item 4) ---------------------------------------
@pytest.fixture(scope="module")
def byte_level_tokenizer(engine, tmp_path_factory):
    """A byte-level BPE of the engine's 512 ids (trained here on text full of multi-byte characters): it spells any
    text, and random-weight completions end inside characters as a real model's can."""
    import random

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from llama4_deploy.runtime.tokenizer import Tokenizer

    rng = random.Random(0)
    chars = list("abcdefghij klmno ") + list("éñüß世界漢字日本語🦙😀ωπ")
    corpus = ["".join(rng.choice(chars) for _ in range(200)) for _ in range(200)]
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=engine.vocab_size, initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    assert bpe.get_vocab_size() == engine.vocab_size
    path = tmp_path_factory.mktemp("byte-level") / "tokenizer.json"
    bpe.save(str(path))
    return Tokenizer(path)


@pytest.fixture(scope="module")
def byte_level_live(engine, byte_level_tokenizer):
    """The module's engine served with the byte-level tokenizer."""
    with Live(engine) as live:
        live.server.tokenizer = byte_level_tokenizer
        yield live


def test_text_equals_decode_of_the_tokens_streamed_or_not(byte_level_live, engine):
    live, tokenizer = byte_level_live, byte_level_live.server.tokenizer
    client, name = live.client(), engine.manifest.name
    prompts = prompts_of([3, 5, 2, 7, 4, 6, 3, 8, 5, 2, 4, 6], seed=5, vocab=engine.vocab_size)
    ended_inside = 0
    for i, prompt in enumerate(prompts):
        kwargs = {"model": name, "prompt": prompt, "max_tokens": 5 + i % 4, "temperature": 0}
        kwargs["extra_body"] = {"ignore_eos": True}
        done = client.completions.create(**kwargs).choices[0]
        assert done.text == tokenizer.decode(done.token_ids), i
        chunks = list(client.completions.create(**kwargs, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == done.text, i
        ended_inside += done.text.endswith("\ufffd")
    assert ended_inside >= 2  # the case the flush is for happened (a character cut by max_tokens)


def test_logprobs_name_tokens_by_their_text_bytes_and_offsets(byte_level_live, engine):
    live, tokenizer = byte_level_live, byte_level_live.server.tokenizer
    client, name = live.client(), engine.manifest.name
    prompt = prompts_of([6], seed=9, vocab=engine.vocab_size)[0]
    done = client.completions.create(
        model=name, prompt=prompt, max_tokens=12, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    ).choices[0]
    lp = done.logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in done.token_ids]
    # each offset is where the token's text begins in the answer: the length of the tokens before it, decoded,
    # where they end on a whole character; the tokens of one character share the offset where it begins
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    whole = [i for i in range(len(done.token_ids)) if "\ufffd" not in tokenizer.decode(done.token_ids[:i])]
    assert len(whole) >= 3 and all(lp.text_offset[i] == len(tokenizer.decode(done.token_ids[:i])) for i in whole)
    chat = client.chat.completions.create(
        model=name,
        messages=[{"role": "user", "content": "ab 世界"}],
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    ).choices[0]
    entries = chat.logprobs.content
    raw = b"".join(bytes(e.bytes) for e in entries)  # each token's own bytes, a character's parts included
    assert raw.decode("utf-8", errors="replace") == chat.message.content
    assert all(e.top_logprobs[0].bytes == e.bytes for e in entries)


# -- sampling controls (issue 27 item 2): honored over HTTP as `generate` honors them --------------------------
@pytest.mark.parametrize(
    "controls",
    [
        {"top_k": 3},
        {"min_p": 0.2},
        {"presence_penalty": 2.0},
        {"frequency_penalty": -2.0},
        {"repetition_penalty": 1.8},
        {"logit_bias": {"7": 30.0, "9": -100}},
        {"top_k": 5, "min_p": 0.05, "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.2},
    ],
    ids=lambda c: "+".join(c),
)
def test_sampling_controls_over_http_equal_generate_with_them(live, engine, controls):
    prompt = [9, 8, 7, 9, 8]
    done = live.client().completions.create(
        model=engine.manifest.name,
        prompt=prompt,
        max_tokens=16,
        temperature=0.9,
        seed=11,
        extra_body={"ignore_eos": True, **controls},
    )
    as_python = {k: ({int(t): b for t, b in v.items()} if k == "logit_bias" else v) for k, v in controls.items()}
    expected = engine.generate([prompt], 16, temperature=0.9, seed=11, stop_tokens=[], **as_python).tokens[0]
    plain = engine.generate([prompt], 16, temperature=0.9, seed=11, stop_tokens=[]).tokens[0]
    assert done.choices[0].token_ids == expected
    assert expected != plain  # the control changed what was drawn: it is carried out, not accepted and ignored


def test_greedy_logit_bias_and_min_tokens(live, engine):
    name, client = engine.manifest.name, live.client()
    forced = client.completions.create(
        model=name, prompt=[1, 2], max_tokens=4, temperature=0, extra_body={"ignore_eos": True}, logit_bias={"42": 100}
    )
    assert forced.choices[0].token_ids == [42, 42, 42, 42]
    # min_tokens: the first greedy token made a stop token; it may end the answer only from the 4th token on
    first = generated(engine, [3, 4], 1)[0]
    body = {"model": name, "prompt": [3, 4], "max_tokens": 6, "temperature": 0, "stop_token_ids": [first]}
    status, _, stopped = live.post("/v1/completions", body)
    assert (
        status == 200 and stopped["choices"][0]["token_ids"] == [] and stopped["choices"][0]["finish_reason"] == "stop"
    )
    status, _, held = live.post("/v1/completions", {**body, "min_tokens": 3})
    expected = engine.generate([[3, 4]], 6, stop_tokens=[first], min_tokens=3).tokens[0]
    tokens = held["choices"][0]["token_ids"]
    assert status == 200 and len(tokens) >= 3 and first not in tokens[:3]
    assert tokens == [t for t in expected if t != first]  # the stop token itself is not in the answer


@pytest.mark.parametrize(
    "extra, param, words",
    [
        ({"top_k": -2}, "top_k", "greater than or equal to -1"),
        ({"min_p": 1.5}, "min_p", "less than or equal to 1"),
        ({"presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
        ({"frequency_penalty": 5.0}, "frequency_penalty", "less than or equal to 2"),
        ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5", "less than or equal to 100"),
        ({"logit_bias": {"w5": 1}}, "logit_bias", "key 'w5' is not a token id"),
        ({"logit_bias": {"99999": 1}}, "logit_bias", "token id 99999, outside the vocabulary"),
        ({"min_tokens": 20, "max_tokens": 4}, "min_tokens", "more than max_tokens 4"),
        ({"top_k": "5"}, "top_k", "valid integer"),
    ],
)
def test_sampling_controls_out_of_range_are_400_naming_them(live, engine, extra, param, words):
    status, _, answer = live.post("/v1/completions", {"model": engine.manifest.name, "prompt": [1], **extra})
    assert status == 400 and answer["error"]["param"] == param and words in answer["error"]["message"], answer


def test_chat_template_kwargs_reach_the_template(engine):
    with Live(engine) as live:
        # a template that reads a variable of its own, as Llama 4's and others' read tools or flags
        source = (
            "{{ bos_token }} {% for m in messages %}{{ m['content'] }} {% endfor %}"
            "{% if extra %}w{{ extra }}{% endif %}"
        )
        live.server.chat_template.template = live.server.chat_template.template.environment.from_string(source)
        body = {"model": engine.manifest.name, "messages": [{"role": "user", "content": "w3"}], "max_tokens": 1}
        status, _, plain = live.post("/v1/chat/completions", body)
        status2, _, extra = live.post("/v1/chat/completions", {**body, "chat_template_kwargs": {"extra": 5}})
        assert status == status2 == 200
        assert extra["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] + 1  # "w5" was rendered
        status, _, answer = live.post("/v1/chat/completions", {**body, "chat_template_kwargs": {"messages": []}})
        assert status == 400 and answer["error"]["param"] == "chat_template_kwargs"


def test_the_readme_table_names_every_request_field():
    # the table of OpenAI parameters cannot drift from the schemas: every field is in it, and nothing else
    import re
    from pathlib import Path

    from llama4_deploy.serving.protocol import ChatCompletionRequest, CompletionRequest, StreamOptions

    readme = Path(__file__).parent.parent.joinpath("README.md").read_text()
    table = readme.split("## OpenAI parameters of `serve`")[1].split("\n## ")[0]
    names = [name for row in table.splitlines()[6:] for name in re.findall(r"`([a-z_.]+)`", row.split("|")[1])]
    named = {part for name in names for part in name.split(".")}  # stream_options.include_usage: both fields
    fields = (
        set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields) | set(StreamOptions.model_fields)
    )
    assert named == fields, (named - fields, fields - named)


# -- operations (issue 27 item 7) ------------------------------------------------------------------------
def test_api_key_model_name_template_cors_tokenize_version_and_access_log(engine, tmp_path, caplog):
    import logging

    from llama4_deploy import __version__

    template = tmp_path / "t.jinja"
    template.write_text("{{ bos_token }} {% for m in messages %}w4 {{ m['content'] }} {% endfor %}w5")
    options = dict(api_key="s3cret", served_model_name="my-llama", chat_template=template)
    with Live(engine, **options, allowed_origins=("https://app.example",), log_requests=True) as live:
        caplog.set_level(logging.INFO, logger="llama4_deploy.serving.access")
        body = {"model": "my-llama", "prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0, "ignore_eos": True}
        status, headers, answer = live.post("/v1/completions", body)
        assert (
            status == 401
            and answer["error"]["code"] == "invalid_api_key"
            and "no API key" in answer["error"]["message"]
        )
        with pytest.raises(openai.AuthenticationError, match="the API key is not valid"):
            live.client().models.list()  # the client sends "Bearer unused"
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="s3cret", max_retries=0, timeout=TIMEOUT)
        assert [m.id for m in client.models.list().data] == ["my-llama"]
        assert client.models.retrieve("my-llama").id == "my-llama"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(engine.manifest.name)
        done = client.completions.create(
            model="my-llama", prompt=[5, 6, 7], max_tokens=2, temperature=0, extra_body={"ignore_eos": True}
        )
        assert done.choices[0].token_ids == generated(engine, [5, 6, 7], 2) and done.model == "my-llama"
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.completions.create(model=engine.manifest.name, prompt=[5], max_tokens=1)
        assert live.get("/health")[0] == 200 and live.get("/metrics")[0] == 200  # open without the key
        assert json.loads(live.get("/version")[1]) == {"version": __version__}

        # --chat-template: the file's template renders the messages; /tokenize shows it
        conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=TIMEOUT)
        auth = {"content-type": "application/json", "authorization": "Bearer s3cret"}

        def call(path, payload):
            conn.request("POST", path, json.dumps(payload), auth)
            response = conn.getresponse()
            return response.status, json.loads(response.read())

        messages = [{"role": "user", "content": "w9 w10"}]
        status, tokens = call("/tokenize", {"model": "my-llama", "messages": messages})
        tokenizer = load_tokenizer(engine.manifest)
        assert status == 200 and tokens["tokens"] == tokenizer.encode("w1 w4 w9 w10 w5", add_special_tokens=False)
        chat = client.chat.completions.create(model="my-llama", messages=messages, max_tokens=1)
        assert chat.usage.prompt_tokens == tokens["count"] == 5
        status, text = call("/detokenize", {"model": "my-llama", "tokens": tokens["tokens"]})
        assert status == 200 and text == {"prompt": "w1 w4 w9 w10 w5"}
        status, refused = call("/detokenize", {"model": "my-llama", "tokens": [99999]})
        assert status == 400 and "outside the vocabulary" in refused["error"]["message"]
        status, prompt_ids = call("/tokenize", {"model": "my-llama", "prompt": "w3 w4"})
        assert prompt_ids["tokens"] == tokenizer.encode("w3 w4")

        # CORS: a preflight from the allowed origin is answered (before the key is asked for); another is not
        for origin, allowed in [("https://app.example", True), ("https://evil.example", False)]:
            conn.request(
                "OPTIONS",
                "/v1/completions",
                headers={"origin": origin, "access-control-request-method": "POST"},
            )
            response = conn.getresponse()
            response.read()
            assert (response.getheader("access-control-allow-origin") == origin) == allowed, origin
        conn.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "llama4_deploy.serving.access"]
    assert any(" POST /v1/completions 401 " in line for line in lines), lines
    assert any(" POST /v1/completions 200 " in line for line in lines)
    assert not any("w9" in line for line in lines)  # never the prompt


def test_serve_options_reach_the_server_and_the_key_comes_from_the_environment(tiny_bundle, monkeypatch):
    from click.testing import CliRunner

    from llama4_deploy.cli import main
    from llama4_deploy.serving import server as server_module

    seen = {}
    monkeypatch.setattr(server_module, "serve", lambda bundle, **kwargs: seen.update(kwargs))
    args = ["serve", str(tiny_bundle), "--served-model-name", "m", "--allowed-origins", "*", "--log-requests"]
    result = CliRunner().invoke(main, args, env={"LLAMA4_DEPLOY_API_KEY": "from-env"})
    assert result.exit_code == 0, result.output
    assert seen["api_key"] == "from-env" and seen["served_model_name"] == "m" and seen["allowed_origins"] == ("*",)
    assert seen["log_requests"] is True and seen["ignore_unknown_fields"] is False


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda p: p.write_bytes(b"\xff{{ x }}"), "is not UTF-8 text"),
        (lambda p: p.write_text("{% for %}"), "is not a valid Jinja template"),
        (lambda p: p.mkdir(), "is not a file"),
    ],
)
def test_a_bad_chat_template_file_is_one_sentence(tiny_bundle, tmp_path, write, message):
    from tests.test_cli import invoke, user_error

    write(tmp_path / "t.jinja")
    user_error(invoke("serve", str(tiny_bundle), "--port", "0", "--chat-template", str(tmp_path / "t.jinja")), message)


# -- echo, prompt logprobs, prompt lists (issue 27 item 3, in part) ------------------------------------------
def _log_softmax(logits):
    import numpy as np

    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_echo_with_logprobs_scores_the_prompt_as_engine_score_does(live, engine):
    # what lm-eval's loglikelihood asks: echo + logprobs, then reads the prompt tokens' log-probabilities
    tokenizer = load_tokenizer(engine.manifest)
    text = "w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20 w21 w22 w23"  # more than one prefill chunk
    ids = tokenizer.encode(text)
    done = live.client().completions.create(
        model=engine.manifest.name, prompt=text, max_tokens=1, temperature=0, logprobs=1, echo=True
    )
    choice = done.choices[0]
    reference = _log_softmax(engine.score(ids))  # [T, V]
    expected = [None] + [float(reference[j - 1, ids[j]]) for j in range(1, len(ids))]
    lp = choice.logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    # the same logits through the same prefill: equal to float64 rounding of the log-softmax
    assert all(abs(a - b) < 1e-9 for a, b in zip(lp.token_logprobs[1 : len(ids)], expected[1:]))
    assert lp.top_logprobs[0] is None and all(len(t) == 1 for t in lp.top_logprobs[1:])
    assert choice.text.startswith(text) and lp.tokens[: len(ids)] == [tokenizer.decode([t]) for t in ids]
    assert lp.text_offset[: len(ids)] == [len(tokenizer.decode(ids[:j])) for j in range(len(ids))]
    assert lp.text_offset[len(ids)] == len(text)  # the completion's first token begins after the prompt
    assert choice.token_ids == generated(engine, ids, 1)


def test_a_list_of_prompts_gets_one_choice_each_streamed_or_not(live, engine):
    tokenizer = load_tokenizer(engine.manifest)
    prompts = ["w5 w6 w7", "w9 w8 w7 w6", "w20 w21"]
    ids = [tokenizer.encode(p) for p in prompts]
    expected = [generated(engine, p, 4) for p in ids]
    client = live.client()
    done = client.completions.create(
        model=engine.manifest.name, prompt=prompts, max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in done.choices] == [0, 1, 2]
    assert [c.token_ids for c in done.choices] == expected
    assert [c.text for c in done.choices] == [tokenizer.decode(e) for e in expected]
    assert done.usage.prompt_tokens == sum(len(p) for p in ids) and done.usage.completion_tokens == 12
    chunks = list(
        client.completions.create(
            model=engine.manifest.name,
            prompt=ids,  # as token ids this time
            max_tokens=4,
            temperature=0,
            stream=True,
            echo=True,
            extra_body={"ignore_eos": True},
        )
    )
    for i in range(len(prompts)):
        text = "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i)
        assert text == tokenizer.decode(ids[i]) + tokenizer.decode(expected[i])  # echo: the ids' text
    assert (
        sorted(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason) == ["length"] * 3
    )


def test_n_samples_share_the_prefill_and_each_equals_generate_with_its_seed(live, engine):
    prompt = [4, 9, 16, 25, 36]
    kinds = []
    live.server.scheduler.on_step = lambda record: kinds.append((record.kind, record.tokens))
    try:
        done = live.client().completions.create(
            model=engine.manifest.name,
            prompt=prompt,
            max_tokens=6,
            temperature=1.0,
            seed=21,
            n=3,
            extra_body={"ignore_eos": True},
        )
    finally:
        live.server.scheduler.on_step = live.server.metrics.observe_step
    for j, choice in enumerate(done.choices):
        assert choice.index == j
        assert choice.token_ids == engine.generate([prompt], 6, temperature=1.0, seed=21 + j, stop_tokens=[]).tokens[0]
    assert len({tuple(c.token_ids) for c in done.choices}) > 1  # three samples, not one answer three times
    assert sum(tokens for kind, tokens in kinds if kind == "prefill") == len(prompt)  # prefilled once
    assert done.usage.completion_tokens == 18
    chunks = list(
        live.client().chat.completions.create(
            model=engine.manifest.name,
            messages=[{"role": "user", "content": "w3 w4"}],
            max_tokens=3,
            temperature=0,
            n=2,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    texts = [
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        for i in (0, 1)
    ]
    assert texts[0] == texts[1] and texts[0]  # greedy: both samples alike


def test_best_of_returns_the_n_most_likely_samples_of_one_prefill(live, engine):
    prompt, name = [4, 9, 16, 25, 36], engine.manifest.name
    ranked = ranked_samples(engine, prompt, 4, 6, 30, temperature=1.0)
    # the case ranking is for: the best two are not simply the first two samples, and no near-tie decides it
    assert sorted(j for _, j, _ in ranked[:2]) != [0, 1] and ranked[1][0] - ranked[2][0] > 1e-3
    kinds = []
    live.server.scheduler.on_step = lambda record: kinds.append((record.kind, record.tokens))
    try:
        done = live.client().completions.create(
            model=name,
            prompt=prompt,
            max_tokens=6,
            temperature=1.0,
            seed=30,
            n=2,
            extra_body={"ignore_eos": True, "best_of": 4},  # this openai client has no best_of argument
        )
    finally:
        live.server.scheduler.on_step = live.server.metrics.observe_step
    assert [c.token_ids for c in done.choices] == [tokens for _, _, tokens in ranked[:2]]
    assert [c.index for c in done.choices] == [0, 1] and all(c.logprobs is None for c in done.choices)
    assert sum(tokens for kind, tokens in kinds if kind == "prefill") == len(prompt)  # prefilled once for all 4
    assert done.usage.completion_tokens == 4 * 6  # every generated token, the two not returned too
    # chat: the best of three, its logprobs (asked for) summing to the ranking's score
    messages = [{"role": "user", "content": "w3 w4"}]
    rendered = live.server.chat_template.render(messages)
    ids = live.server.tokenizer.encode(rendered, add_special_tokens=False)
    best = ranked_samples(engine, ids, 3, 4, 7, temperature=1.0)[0]
    reply = live.client().chat.completions.create(
        model=name,
        messages=messages,
        max_tokens=4,
        temperature=1.0,
        seed=7,
        logprobs=True,
        extra_body={"ignore_eos": True, "best_of": 3},
    )
    assert len(reply.choices) == 1 and reply.usage.completion_tokens == 3 * 4
    # 1e-5: the scheduler's steps hold other rows than generate's, so the fp32 logits differ in their last bits
    assert sum(e.logprob for e in reply.choices[0].logprobs.content) == pytest.approx(best[0], abs=1e-5)
    assert live.server.tokenizer.decode(best[2]) == reply.choices[0].message.content


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"n": 3, "best_of": 2}, "best_of is 2, less than n 3"),
        ({"best_of": 3, "stream": True}, "best_of 3 with n 1 cannot be streamed"),
        ({"best_of": 99}, "best_of is 99; the samples of a prompt run together in this server's"),
        ({"best_of": 0}, "greater than or equal to 1"),
        ({"best_of": "2"}, "valid integer"),
    ],
)
def test_best_of_combinations_that_cannot_be_carried_out_are_400(live, engine, extra, words):
    body = {"model": engine.manifest.name, "prompt": [1, 2], "max_tokens": 2, "temperature": 1.0, **extra}
    status, _, answer = live.post("/v1/completions", body)
    assert status == 400 and answer["error"]["param"] == "best_of" and words in answer["error"]["message"], answer


# -- structured output (issue 27 item 5) ---------------------------------------------------------------------


SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


def test_structured_output_parses_and_validates_while_free_requests_share_the_batch(byte_level_live, engine):
    pytest.importorskip("xgrammar")
    live, name = byte_level_live, engine.manifest.name
    client = live.client()
    free_prompt = [5, 6, 7]

    def constrained(kind):
        common = {"model": name, "max_tokens": 40, "temperature": 0.8, "seed": 1}
        if kind == "schema":
            fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
            reply = client.chat.completions.create(
                messages=[{"role": "user", "content": "ab"}], response_format=fmt, **common
            )
            return reply.choices[0].message.content, reply.choices[0].finish_reason
        extra = {"choice": {"guided_choice": ["yes", "no", "maybe"]}, "regex": {"guided_regex": "w[0-9]{2}"}}[kind]
        done = client.completions.create(prompt=[9, 8], extra_body=extra, **common)
        return done.choices[0].text, done.choices[0].finish_reason

    def free():
        done = client.completions.create(
            model=name, prompt=free_prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        return done.choices[0].token_ids

    with ThreadPoolExecutor(4) as pool:
        futures = {kind: pool.submit(constrained, kind) for kind in ("schema", "choice", "regex")}
        unconstrained = pool.submit(free)
        answers = {kind: f.result(TIMEOUT) for kind, f in futures.items()}
        assert unconstrained.result(TIMEOUT) == generated(engine, free_prompt, 12)  # unaffected by the masks
    text, reason = answers["schema"]
    document = json.loads(text)
    assert reason == "stop" and set(document) == {"ok", "n"}
    assert isinstance(document["ok"], bool) and document["n"] in (1, 2, 3)
    assert answers["choice"] == (answers["choice"][0], "stop") and answers["choice"][0] in ("yes", "no", "maybe")
    assert re.fullmatch(r"w[0-9]{2}", answers["regex"][0]) and answers["regex"][1] == "stop"


def test_structured_output_requests_that_cannot_be_compiled_are_400(byte_level_live, engine):
    pytest.importorskip("xgrammar")
    name = engine.manifest.name
    for extra, param, words in [
        ({"guided_regex": "w[0-9"}, "guided_regex", "cannot be compiled into a grammar"),
        ({"guided_regex": "w1", "guided_choice": ["a"]}, "response_format", "both ask for a structure"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
            "needs json_schema.schema",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "'text', 'json_object' or 'json_schema'"),
        ({"guided_choice": []}, "guided_choice", "at least 1 item"),
    ]:
        status, _, answer = byte_level_live.post("/v1/completions", {"model": name, "prompt": [1], **extra})
        assert status == 400 and answer["error"]["param"] == param and words in answer["error"]["message"], answer


# -- tool calls (issue 27 item 6) -----------------------------------------------------------------------------
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["paris", "rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def test_required_and_named_tool_choice_always_give_valid_calls(byte_level_live, engine):
    pytest.importorskip("xgrammar")
    client, name = byte_level_live.client(), engine.manifest.name
    messages = [{"role": "user", "content": "ab"}]
    common = {"model": name, "messages": messages, "tools": [WEATHER, CLOCK], "max_tokens": 60, "temperature": 0.7}
    reply = client.chat.completions.create(tool_choice="required", seed=3, **common).choices[0]
    assert reply.finish_reason == "tool_calls" and reply.message.content is None
    call = reply.message.tool_calls[0]
    assert call.function.name in ("get_weather", "get_time") and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert arguments == {} if call.function.name == "get_time" else arguments["city"] in ("paris", "rome")
    named = {"type": "function", "function": {"name": "get_weather"}}
    chunks = list(client.chat.completions.create(tool_choice=named, seed=4, stream=True, **common))
    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(calls) == 1 and calls[0][0].function.name == "get_weather"
    assert json.loads(calls[0][0].function.arguments)["city"] in ("paris", "rome")
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # earlier calls and their results go back through the template (the checkpoint's renders their content)
    history = messages + [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": call.id},
    ]
    follow = client.chat.completions.create(
        model=name, messages=history, tools=[WEATHER, CLOCK], tool_choice="none", max_tokens=3, temperature=0
    )
    assert follow.choices[0].message.tool_calls is None and follow.choices[0].finish_reason in ("stop", "length")


@pytest.fixture(scope="module")
def pythonic_live(engine, byte_level_tokenizer, tmp_path_factory):
    """The engine served with --tool-call-parser llama4_pythonic, the tests' pythonic template and the byte-level
    tokenizer (which spells any call)."""
    from tests.test_tools import PYTHONIC_TEMPLATE

    path = tmp_path_factory.mktemp("pythonic") / "template.jinja"
    path.write_text(PYTHONIC_TEMPLATE)
    with Live(engine, tool_call_parser="llama4_pythonic", chat_template=path) as live:
        live.server.tokenizer = byte_level_tokenizer
        yield live


def test_required_and_named_tool_choice_with_the_pythonic_parser_give_valid_calls(pythonic_live, engine):
    pytest.importorskip("xgrammar")
    jsonschema = pytest.importorskip("jsonschema")
    from tests.test_tools import CLOCK, FORECAST

    client, name = pythonic_live.client(), engine.manifest.name
    tools = [{"type": "function", "function": f} for f in (FORECAST, CLOCK)]
    schemas = {f["name"]: f["parameters"] for f in (FORECAST, CLOCK)}
    common = {"model": name, "messages": [{"role": "user", "content": "ab"}], "tools": tools, "max_tokens": 120}
    named = {"type": "function", "function": {"name": "forecast"}}
    seen = set()
    for seed in range(4):
        for choice, stream in (("required", False), ("required", True), (named, False), (named, True)):
            kwargs = {**common, "tool_choice": choice, "seed": seed, "temperature": 2.0}
            if stream:
                chunks = list(client.chat.completions.create(stream=True, **kwargs))
                calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
                reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
                assert len(calls) == 1 and reasons == ["tool_calls"], (seed, choice, chunks)
                call = calls[0][0]
            else:
                reply = client.chat.completions.create(**kwargs).choices[0]
                assert reply.finish_reason == "tool_calls" and reply.message.content is None, (seed, choice, reply)
                assert len(reply.message.tool_calls) == 1
                call = reply.message.tool_calls[0]
            assert call.function.name in (("forecast",) if choice is named else ("forecast", "get_time"))
            arguments = json.loads(call.function.arguments)
            jsonschema.validate(arguments, schemas[call.function.name])  # the reference validator, not ours
            seen.add((call.function.name, json.dumps(arguments)))
    assert len(seen) > 3, seen  # the grammar left the model choices: both functions, optional arguments or not
    # a function the pythonic form cannot call is refused, naming where
    body = {**common, "tools": [{"type": "function", "function": {"name": "get-time"}}], "tool_choice": "required"}
    status, _, answer = pythonic_live.post("/v1/chat/completions", body)
    assert status == 400 and answer["error"]["param"] == "tools", answer
    assert "'get-time' is not a name vLLM's pythonic parser reads" in answer["error"]["message"]


@pytest.mark.parametrize(
    "extra, param, words",
    [
        ({"tool_choice": "required"}, "tool_choice", "tools is empty"),
        (
            {"tools": [CLOCK], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "'nope', which is not in tools",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name", "pattern"),
        (
            {"tools": [CLOCK], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            "both ask",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [
                            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
                        ],
                    }
                ]
            },
            "messages.0.tool_calls",
            "is not JSON",
        ),
    ],
)
def test_tool_requests_that_cannot_be_carried_out_are_400(byte_level_live, engine, extra, param, words):
    body = {"model": engine.manifest.name, "messages": [{"role": "user", "content": "ab"}], "max_tokens": 2, **extra}
    status, _, answer = byte_level_live.post("/v1/chat/completions", body)
    assert status == 400 and answer["error"]["param"] == param and words in answer["error"]["message"], answer


def test_health_answers_503_while_the_bundle_loads(engine):
    from llama4_deploy.serving.server import Loading

    release = threading.Event()

    def make_server():
        release.wait(TIMEOUT)  # the weights are "loading" until the test says so
        return Server(engine)

    app = Loading(make_server)
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    uv = _uvicorn_server(app, drain_timeout=5)
    thread = threading.Thread(target=lambda: asyncio.run(uv.serve(sockets=[sock])), daemon=True)
    thread.start()
    try:
        _wait_for(lambda: uv.started, "the server to listen")

        def get(path, body=None):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
            conn.request("POST" if body else "GET", path, json.dumps(body) if body else None)
            response = conn.getresponse()
            answer = (response.status, response.getheader("retry-after"), json.loads(response.read()))
            conn.close()
            return answer

        assert get("/health") == (503, "1", {"status": "loading"})
        status, retry, answer = get("/v1/completions", {"model": engine.manifest.name, "prompt": [1]})
        assert status == 503 and retry == "1" and answer["error"]["code"] == "loading"
        release.set()
        _wait_for(lambda: get("/health")[0] == 200, "the bundle to load")
        body = {
            "model": engine.manifest.name,
            "prompt": [5, 6, 7],
            "max_tokens": 3,
            "temperature": 0,
            "ignore_eos": True,
        }
        status, _, answer = get("/v1/completions", body)
        assert status == 200 and answer["choices"][0]["token_ids"] == generated(engine, [5, 6, 7], 3)
    finally:
        release.set()
        uv.should_exit = True
        thread.join(TIMEOUT)
    assert app.server.scheduler._worker is None  # shutdown stopped its scheduler (the engine is the caller's)


def test_a_load_that_fails_after_listening_exits_with_its_one_sentence(tiny_bundle, tmp_path):
    import shutil

    from tests.test_cli import invoke, user_error

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    weights = next(bundle.glob("*.data"))
    weights.write_bytes(weights.read_bytes()[:-64])  # found by the file check when the engine loads
    user_error(invoke("serve", str(bundle), "--port", "0"), weights.name)


# -- where the time goes (issue 27 item 10) ----------------------------------------------------------------
def test_trace_steps_writes_one_line_per_engine_step(engine, tmp_path):
    trace = tmp_path / "steps.jsonl"
    with open(trace, "x", buffering=1) as file, Live(engine, trace_steps=file) as live:
        body = {"model": engine.manifest.name, "prompt": [1, 2, 3], "max_tokens": 5, "ignore_eos": True}
        status, _, answer = live.post("/v1/completions", body)
        assert status == 200 and len(answer["choices"][0]["token_ids"]) == 5, answer
    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    # a 3-token prompt: one prefill step feeding 3 tokens (its first token), then 4 decode steps of 1 token
    assert [(s["kind"], s["rows"], s["tokens"]) for s in steps] == [("prefill", 1, 3)] + [("decode", 1, 1)] * 4
    assert all(s["seconds"] > 0 for s in steps)
    assert all(b["started"] >= a["started"] + a["seconds"] for a, b in zip(steps, steps[1:]))


def test_trace_steps_never_writes_over_a_file(tiny_bundle, tmp_path):
    from tests.test_cli import invoke, user_error

    existing = tmp_path / "mine.jsonl"
    existing.write_text("keep me\n")
    user_error(invoke("serve", str(tiny_bundle), "--port", "0", "--trace-steps", str(existing)), "exists")
    assert existing.read_text() == "keep me\n"


def test_handoff_delivers_every_output_in_order_and_its_thread_ends():
    """The scheduler thread's outputs reach each request's asyncio queue in the order they were put, however the
    handoff thread batches them; close() ends that thread, and so does a loop that has gone away."""
    from llama4_deploy.serving.server import _Handoff

    steps, rows = 300, 4

    async def main():
        handoff = _Handoff(asyncio.get_running_loop())
        queues = [asyncio.Queue() for _ in range(rows)]
        producer = threading.Thread(
            target=lambda: [handoff.put(q, (step, i)) for step in range(steps) for i, q in enumerate(queues)]
        )
        producer.start()
        got = [[await asyncio.wait_for(q.get(), TIMEOUT) for _ in range(steps)] for q in queues]
        producer.join(TIMEOUT)
        handoff.close()
        handoff._thread.join(TIMEOUT)
        assert not handoff._thread.is_alive()
        assert got == [[(step, i) for step in range(steps)] for i in range(rows)]
        return _Handoff(asyncio.get_running_loop())

    orphan = asyncio.run(main())  # its loop is closed now
    orphan.put(asyncio.Queue(), "late")  # a scheduler still finishing a request after shutdown
    orphan._thread.join(TIMEOUT)
    assert not orphan._thread.is_alive()
