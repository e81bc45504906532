"""`make loadtest`: concurrent streaming clients against `llama4-deploy serve` on loopback.

Starts the server as a subprocess on 127.0.0.1 with an ephemeral port, then for 1, 4, 8 and 16
concurrent clients sends a bounded number of streamed greedy completions (each client sends its next
request when the last one ends) and prints requests/s, tokens/s, p50/p99 latency and time to first
token. Every answer is checked against `generate` on its prompt: zero lost, duplicated or mixed-up
responses, or exit 1.

The clients are coroutines on one aiohttp event loop, as vLLM's benchmark_serving drives a server: on
loopback they share the server's cores, and OpenAI's Python client (one thread per client, a pydantic
model per chunk) spends several times their CPU per streamed token. The target rounds run OpenAI's
client too and print its figure beside.

The target row: 8 clients sending the same 8 prompts at once, aggregate decode tokens/s
(sum of tokens after the first, over the span from the first first-token to the last answer) against
`generate` on one batch of those 8 prompts in this process (decode time = generate(N tokens) -
generate(1 token)). Each round runs right after a round of generate and is divided by it; the target
is the median of those ratios, printed with their range: the speed of a shared machine drifts by tens
of percent within minutes, which a generate measured once at the start would count against the server.

Under the target row, where a round's time went: the server writes one line per engine step
(`serve --trace-steps`), and the table splits each round's span into engine decode steps, prefill
steps, and the rest (the scheduler's own work between steps — sampling, bookkeeping, handing tokens
to the event loop — and waiting for a core), with the CPU seconds the server and the clients used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

LEVELS = (1, 4, 8, 16)
TARGET = 0.8  # of generate's decode rate, by the server with 8 clients


def percentile(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


class ServerProcess:
    def __init__(self, bundle: Path, max_queue: int, extra: list[str] = ()):
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama4_deploy.cli",
                "serve",
                str(bundle),
                "--port",
                "0",
                "--max-queue",
                str(max_queue),
                *extra,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.process.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not match:
            self.process.kill()
            raise SystemExit(f"error: the server did not start: {line.strip() or self.process.stderr.read()[-500:]}")
        self.url = f"http://127.0.0.1:{match.group(1)}"

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the server process has used (all its threads)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(60)


class _Answer:
    """One streamed answer as its client saw it: tokens, finish reason, the response ids of its chunks, times."""

    def __init__(self, prompt: list[int]):
        self.prompt, self.start, self.first = prompt, time.perf_counter(), None
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.ids: set[str] = set()

    def chunk(self, rid: str, token_ids: list[int] | None = None, finish: str | None = None) -> None:
        self.ids.add(rid)
        if token_ids and self.first is None:
            self.first = time.perf_counter()
        self.tokens.extend(token_ids or [])
        self.finish = finish or self.finish

    def done(self) -> dict:
        return {**vars(self), "end": time.perf_counter()}


async def _stream(session, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed greedy completion read with aiohttp."""
    import aiohttp

    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    answer = _Answer(prompt)
    try:
        async with session.post(f"{url}/v1/completions", json=body) as response:
            if response.status != 200:
                raise SystemExit(f"error: the server answered {response.status}: {(await response.text())[:300]}")
            async for line in response.content:  # server-sent events: "data: {json}" lines, blank lines between
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                choice = chunk["choices"][0] if chunk["choices"] else {}
                answer.chunk(chunk["id"], choice.get("token_ids"), choice.get("finish_reason"))
    except aiohttp.ClientError as err:
        raise SystemExit(f"error: a client lost the server: {err}") from None
    return answer.done()


class Clients:
    """Streaming clients as coroutines on one event loop of their own, with one aiohttp session whose keep-alive
    connections every round reuses (as OpenAI's clients reuse theirs): a round pays no TCP or session set-up."""

    def __init__(self, url: str, model: str, time_limit: float):
        import aiohttp

        self.url, self.model, self.time_limit = url, model, time_limit
        self.loop = asyncio.new_event_loop()

        async def open_session():
            return aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=time_limit), connector=aiohttp.TCPConnector(limit=0)
            )

        self.session = self.loop.run_until_complete(open_session())

    def run(self, prompts: list[list[int]], clients: int, requests: int, max_tokens: int) -> tuple[list[dict], float]:
        """`clients` closed-loop clients share `requests` requests (prompt i % len(prompts)); they start together,
        so the first requests arrive as one burst."""
        queue = list(range(requests))
        deadline = time.monotonic() + self.time_limit

        async def client_loop():
            answers = []
            while queue and time.monotonic() < deadline:
                i = queue.pop(0)
                answer = await _stream(self.session, self.url, self.model, prompts[i % len(prompts)], max_tokens)
                answers.append({**answer, "index": i})
            return answers

        async def level():
            start = time.perf_counter()
            batches = await asyncio.gather(*(client_loop() for _ in range(clients)))
            return [a for batch in batches for a in batch], time.perf_counter() - start

        return self.loop.run_until_complete(level())

    def close(self) -> None:
        self.loop.run_until_complete(self.session.close())
        self.loop.close()


def make_openai_clients(url: str, clients: int, time_limit: float) -> list:
    """OpenAI's own clients, made once and reused: making one loads the CA bundle into an SSL context (tens of ms
    of CPU), which a round must not count."""
    import openai

    return [
        openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=time_limit) for _ in range(clients)
    ]


def _stream_openai(client, model: str, prompt: list[int], max_tokens: int) -> dict:
    answer = _Answer(prompt)
    for chunk in client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, extra_body={"ignore_eos": True}
    ):
        choice = chunk.choices[0] if chunk.choices else None
        if choice is None:
            answer.chunk(chunk.id)
        else:
            answer.chunk(chunk.id, (choice.model_extra or {}).get("token_ids"), choice.finish_reason)
    return answer.done()


def run_level_openai(made: list, model: str, prompts: list[list[int]], max_tokens: int, time_limit: float):
    """One request per OpenAI client (prompt i to client i), each client in its own thread, released together."""
    ready = threading.Barrier(len(made))

    def one(i):
        ready.wait(time_limit)
        return {**_stream_openai(made[i], model, prompts[i], max_tokens), "index": i}

    start = time.perf_counter()
    with ThreadPoolExecutor(len(made)) as pool:
        answers = list(pool.map(one, range(len(made))))
    return answers, time.perf_counter() - start


def check(answers: list[dict], requests: int, expected: dict[tuple, list[int]], level: int) -> list[str]:
    problems = []
    seen = [a["index"] for a in answers]
    if sorted(seen) != list(range(requests)):
        problems.append(f"{level} clients: {requests - len(set(seen))} lost, {len(seen) - len(set(seen))} duplicated")
    response_ids = [rid for a in answers for rid in a["ids"]]
    if len(response_ids) != len(set(response_ids)) or any(len(a["ids"]) != 1 for a in answers):
        problems.append(f"{level} clients: response ids repeat or one answer spans several ids")
    mixed = sum(a["tokens"] != expected[tuple(a["prompt"])] or a["finish"] != "length" for a in answers)
    if mixed:
        problems.append(f"{level} clients: {mixed} answers differ from generate on their prompt")
    return problems


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def breakdown(rounds: list[dict], steps: list[dict]) -> dict:
    """Medians over the target rounds of where each round went, on the server's clock: from the end of its first
    prefill step (the first token exists) to the end of its last step, split into engine steps and the rest. (The
    clients' span starts when the first token reaches a client, by which time a short step may be over already.)"""
    per = []
    for r in rounds:
        own = sorted((s for s in steps if r["sent"] <= s["started"] <= r["span_end"]), key=lambda s: s["started"])
        first = next(s for s in own if s["kind"] == "prefill")
        start = first["started"] + first["seconds"]
        after = [s for s in own if s["started"] >= start]
        end = max(s["started"] + s["seconds"] for s in after) if after else start
        decode = [s["seconds"] for s in after if s["kind"] == "decode"]
        prefill = [s["seconds"] for s in after if s["kind"] == "prefill"]
        per.append(
            {
                "span": r["span_end"] - r["span_start"],
                "decode_steps": len(decode),
                "decode_ms": 1e3 * statistics.mean(decode) if decode else float("nan"),
                "prefill_steps": len(prefill),
                "prefill_ms": 1e3 * sum(prefill),
                "outside_ms": 1e3 * ((end - start) - sum(decode) - sum(prefill)),
                "server_cpu": r["server_cpu"],
                "client_cpu": r["client_cpu"],
            }
        )
    return {key: statistics.median(p[key] for p in per) for key in per[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="build/scout-mini")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per answer")
    parser.add_argument("--prompt-tokens", type=int, default=24, help="tokens per prompt")
    parser.add_argument("--requests", type=int, default=2, help="requests per client at each level (at least 8 in all)")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per level at most")
    parser.add_argument(
        "--rounds", type=int, default=7, help="rounds of the target row and of generate; medians (a round takes <1 s)"
    )
    parser.add_argument(
        "--admission-wait-ms", type=float, help="the server's --admission-wait-ms (default: serve's own)"
    )
    args = parser.parse_args(argv)

    from llama4_deploy.runtime import load

    engine = load(args.bundle)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, engine.vocab_size, size=args.prompt_tokens).tolist() for _ in range(16)]
    print(
        f"loadtest: {engine.manifest.name}, max_batch {engine.max_batch}, prompts of {args.prompt_tokens} tokens, "
        f"{args.max_tokens} greedy tokens per answer; timings on a shared machine are noisy",
        flush=True,
    )
    # expected answers, and generate's decode rate on one batch of the 8 target prompts
    expected = {}
    for start in range(0, len(prompts), engine.max_batch):
        group = prompts[start : start + engine.max_batch]
        for prompt, tokens in zip(group, engine.generate(group, args.max_tokens, stop_tokens=[]).tokens):
            expected[tuple(prompt)] = tokens
    target = prompts[:8]

    def generate_round() -> tuple[float, float]:
        """generate's decode tokens/s on one batch of the target prompts, and its ms per decode step."""
        t0 = time.perf_counter()
        engine.generate(target, 1, stop_tokens=[])
        t1 = time.perf_counter()
        engine.generate(target, args.max_tokens, stop_tokens=[])
        t2 = time.perf_counter()
        decode = (t2 - t1) - (t1 - t0)
        return len(target) * (args.max_tokens - 1) / decode, 1e3 * decode / (args.max_tokens - 1)

    scratch = tempfile.TemporaryDirectory(prefix="loadtest-")
    trace = Path(scratch.name) / "steps.jsonl"
    extra = ["--trace-steps", str(trace)]
    if args.admission_wait_ms is not None:
        extra += ["--admission-wait-ms", str(args.admission_wait_ms)]
    server = ServerProcess(Path(args.bundle), max_queue=64, extra=extra)
    streaming = Clients(server.url, engine.manifest.name, args.time_limit)
    rows, problems = [], []
    try:
        for clients in LEVELS:
            requests = max(8, clients * args.requests)
            answers, wall = streaming.run(prompts, clients, requests, args.max_tokens)
            problems += check(answers, requests, expected, clients)
            latency = [a["end"] - a["start"] for a in answers]
            ttft = [a["first"] - a["start"] for a in answers if a["first"] is not None]
            tokens = sum(len(a["tokens"]) for a in answers)
            rows.append(
                (
                    f"{clients}",
                    len(answers),
                    len(answers) / wall,
                    tokens / wall,
                    percentile(latency, 50),
                    percentile(latency, 99),
                    percentile(ttft, 50),
                    percentile(ttft, 99),
                )
            )
        # the target: the same 8 prompts from 8 clients at once, each round next to a round of generate in this
        # process (the server idle meanwhile), so a machine that speeds up or slows down during the run moves both;
        # then the same 8 requests from OpenAI's own client, for comparison
        made = make_openai_clients(server.url, 8, args.time_limit)
        rounds, openai_rounds = [], []

        def measured(run) -> dict:
            cpu, sent = (server.cpu_seconds(), own_cpu_seconds()), time.perf_counter()
            answers, _ = run()
            problems.extend(check(answers, 8, expected, 8))
            start, end = min(a["first"] for a in answers), max(a["end"] for a in answers)
            return {
                "rate": sum(len(a["tokens"]) - 1 for a in answers) / (end - start),
                "sent": sent,
                "span_start": start,
                "span_end": end,
                "server_cpu": server.cpu_seconds() - cpu[0],
                "client_cpu": own_cpu_seconds() - cpu[1],
            }

        for _ in range(args.rounds):
            rate, ms = generate_round()
            # ONNX Runtime's threads spin-wait a while after a run for the next one: let this process's go idle
            # before the server's round, so they take no core from it
            time.sleep(0.2)
            r = measured(lambda: streaming.run(target, 8, 8, args.max_tokens))
            rounds.append({**r, "generate": rate, "generate_ms": ms, "ratio": r["rate"] / rate})
            r = measured(lambda: run_level_openai(made, engine.manifest.name, target, args.max_tokens, args.time_limit))
            openai_rounds.append({**r, "ratio": r["rate"] / rate})
    finally:
        streaming.close()
        code = server.stop()
        engine.close()
    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    scratch.cleanup()
    split = breakdown(rounds, steps)
    if code != 0:
        problems.append(f"the server exited {code} on SIGTERM")

    print(
        f"\n{'clients':>7} {'requests':>8} {'req/s':>7} {'tok/s':>7} {'p50 lat s':>9} {'p99 lat s':>9} "
        f"{'p50 TTFT s':>10} {'p99 TTFT s':>10}"
    )
    for row in rows:
        print(
            f"{row[0]:>7} {row[1]:>8} {row[2]:>7.2f} {row[3]:>7.1f} {row[4]:>9.3f} {row[5]:>9.3f} "
            f"{row[6]:>10.3f} {row[7]:>10.3f}"
        )

    def ratios(of: list[dict]) -> str:
        each = sorted(r["ratio"] for r in of)
        low = sum(x < TARGET for x in each)
        return (
            f"{statistics.median(each):.0%} of generate; per round {each[0]:.0%} to {each[-1]:.0%}, "
            f"{low} of {len(each)} below {TARGET:.0%}"
        )

    median = {key: statistics.median(r[key] for r in rounds) for key in ("generate", "rate", "generate_ms")}
    print(
        f"\ndecode tokens/s, 8 prompts: generate on one batch {median['generate']:.1f}, server with 8 concurrent "
        f"clients {median['rate']:.1f} ({ratios(rounds)}; target >= {TARGET:.0%} (median); "
        f"{args.rounds} rounds, each next to one of generate)"
    )
    client_cpu = {
        name: statistics.median(r["client_cpu"] for r in of) for name, of in (("a", rounds), ("o", openai_rounds))
    }
    print(
        f"the same rounds from OpenAI's Python client (8 threads, {client_cpu['o']:.2f} CPU s per round on the "
        f"server's cores against aiohttp's {client_cpu['a']:.2f}): {ratios(openai_rounds)}"
    )
    generate_ms = median["generate_ms"]
    print(
        f"\nwhere a target round went (8 answers x {args.max_tokens} tokens, medians of {args.rounds}; steps from the "
        "end of the round's first prefill, on the server's clock; span = first first token to last answer, at the "
        "clients):"
    )
    print(f"{'':44} {'generate':>9} {'server':>9}")
    print(f"{'decode steps after the first token':44} {args.max_tokens - 1:>9} {split['decode_steps']:>9.0f}")
    print(f"{'engine ms per decode step':44} {generate_ms:>9.2f} {split['decode_ms']:>9.2f}")
    prefill = f"{split['prefill_steps']:.0f} ({split['prefill_ms']:.0f})"
    outside = split["outside_ms"] / max(split["decode_steps"], 1)
    print(f"{'prefill steps after it (ms in all)':44} {'0 (0)':>9} {prefill:>9}")
    print(f"{'outside the engine, ms per decode step':44} {'':>9} {outside:>9.2f}")
    print(f"{'span ms':44} {generate_ms * (args.max_tokens - 1):>9.1f} {1e3 * split['span']:>9.1f}")
    print(f"{'CPU s of the server / of the clients':44} {'':>9} {split['server_cpu']:>4.2f}/{split['client_cpu']:.2f}")
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    print("every answer arrived once and equals generate on its prompt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
