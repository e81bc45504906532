"""Continuous batching without a socket: staggered arrivals equal `generate` alone, rows join and leave,
prefill chunks interleave with decode steps, cancellation, a full queue, an engine error."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from llama4_deploy.runtime import abi, load
from llama4_deploy.runtime.scheduler import QueueFull, Request, Scheduler, Unavailable, run_requests
from tests.conftest import fails_once
from tests.runtime.test_engine import prompts_of

# Scheduler vs generate on one bundle: only the batch composition differs, which changes summation
# order alone (~1e-6), far below this bound and the tiny model's logit gaps (whole units).
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    with load(tiny_bundle) as engine:
        yield engine


def alone(engine, prompt, max_tokens, **kwargs):
    return engine.generate([prompt], max_tokens, stop_tokens=[], **kwargs).tokens[0]


def test_staggered_arrivals_equal_generate_alone_and_prefill_interleaves_with_decode(engine):
    # tiny: 4 rows, prefill steps of 16 tokens, chunk 8. Seven requests of different lengths and
    # budgets arrive in two waves; the 40-token prompt needs 3 prefill steps while others decode.
    prompts = prompts_of([19, 3, 40, 8, 11, 2, 27], seed=4)
    budgets = [12, 20, 9, 5, 16, 7, 10]
    steps = []
    scheduler = Scheduler(engine, max_queue=8, on_step=lambda record: steps.append(record))
    requests = [Request(p, n) for p, n in zip(prompts, budgets)]
    seen = {}  # tokens of request 1 (decoding) when the long request 2 samples its first token
    requests[2].listener = lambda r, out: seen.setdefault("first", len(requests[1].tokens))
    occupancy = []
    for request in requests[:2]:
        scheduler.submit(request)
    for _ in range(3):
        scheduler.step()
        occupancy.append(scheduler.occupancy)
    before = len(requests[1].tokens)
    for request in requests[2:]:
        scheduler.submit(request)
    while not scheduler.idle:
        scheduler.step()
        occupancy.append(scheduler.occupancy)
    for prompt, budget, request in zip(prompts, budgets, requests):
        assert request.finish_reason == "length"
        assert request.tokens == alone(engine, prompt, budget)
    assert max(occupancy) == 4 and occupancy[-1] == 0  # the batch filled up, and every row left
    assert [record.kind for record in steps[:2]] == ["prefill", "decode"]
    # the long prompt's 3 chunks (16 + 16 + 8) do not stall request 1: it decodes between them
    assert seen["first"] - before >= 2


def test_seeded_sampling_in_a_batch_equals_generate_alone_with_the_seed(engine):
    prompts = prompts_of([6, 13, 9], seed=5)
    requests = run_requests(engine, prompts, 10, temperature=0.9, top_p=0.8, seed=11)
    for prompt, request in zip(prompts, requests):
        assert request.tokens == alone(engine, prompt, 10, temperature=0.9, top_p=0.8, seed=11)


def test_logprobs_are_the_log_softmax_of_generate_s_logits(engine):
    prompt = prompts_of([7], seed=6)[0]
    outputs = []
    scheduler = Scheduler(engine)
    request = scheduler.submit(Request(prompt, 4, logprobs=3, listener=lambda _, out: outputs.append(out)))
    scheduler.run_until_idle()
    reference = engine.generate([prompt], 4, stop_tokens=[], return_logits=True).logits[0].astype(np.float64)
    expected = reference - reference.max(-1, keepdims=True)
    expected -= np.log(np.exp(expected).sum(-1, keepdims=True))
    tokens = [out for out in outputs if out.token is not None]
    assert [out.token for out in tokens] == request.tokens and outputs[-1].finish_reason == "length"
    for step, out in enumerate(tokens):
        assert out.logprob == pytest.approx(expected[step, out.token], abs=LOGPROB_ATOL)
        assert [t for t, _ in out.top_logprobs] == np.argsort(-expected[step])[:3].tolist()
        assert out.top_logprobs[0][0] == out.token  # greedy: the chosen token is the most likely


def test_a_stop_token_ends_the_request_and_frees_its_row(engine):
    prompt = prompts_of([9], seed=7)[0]
    full = alone(engine, prompt, 8)
    stop = full[3]
    scheduler = Scheduler(engine)
    request = scheduler.submit(Request(prompt, 8, stop_tokens=frozenset([stop])))
    scheduler.run_until_idle()
    assert request.tokens == full[: full.index(stop) + 1] and request.finish_reason == "stop"
    assert scheduler.occupancy == 0


def test_a_step_feeds_the_rows_in_use_only(engine, monkeypatch):
    real, fed = engine.run_step, []

    def spy(cache, ids, positions):
        fed.append((ids.shape[0], cache.feeds()[abi.past_key(0)].shape[0]))
        return real(cache, ids, positions)

    monkeypatch.setattr(engine, "run_step", spy)
    scheduler = Scheduler(engine)  # 4 rows
    first = scheduler.submit(Request([1, 2, 3], 3))
    scheduler.run_until_idle()
    assert set(fed) == {(1, 1)}  # a lone request is a batch of one, cache views included
    fed.clear()
    a, b = scheduler.submit(Request([1, 2, 3], 6)), scheduler.submit(Request([4, 5], 2))
    scheduler.run_until_idle()
    assert {rows for rows, _ in fed} == {2, 1}  # the second row leaves first; then row 0 alone
    assert [first.tokens, a.tokens, b.tokens] == [
        alone(engine, [1, 2, 3], 3),
        alone(engine, [1, 2, 3], 6),
        alone(engine, [4, 5], 2),
    ]


def test_cancel_frees_the_row_at_the_next_step_and_tells_the_listener(engine):
    outputs = []
    scheduler = Scheduler(engine, max_batch=1, max_queue=1)
    first = scheduler.submit(Request(prompts_of([5])[0], 50, listener=lambda _, out: outputs.append(out)))
    scheduler.step()
    scheduler.step()
    assert scheduler.occupancy == 1 and len(first.tokens) == 3  # prefill + decode, then decode
    second = scheduler.submit(Request(prompts_of([4], seed=2)[0], 3))
    scheduler.cancel(first)
    scheduler.run_until_idle()
    assert first.finish_reason == "cancelled" and len(first.tokens) == 3
    assert outputs[-1].finish_reason == "cancelled" and outputs[-1].token is None
    assert second.tokens == alone(engine, second.prompt, 3)  # the freed row served the next request


def test_a_full_queue_refuses_and_bad_requests_are_one_sentence(engine):
    scheduler = Scheduler(engine, max_batch=1, max_queue=1)
    scheduler.submit(Request([1, 2], 4))
    with pytest.raises(QueueFull, match=r"1 requests are already waiting \(max_queue 1\)"):
        scheduler.submit(Request([1, 2], 4))  # the first still waits for its row
    scheduler.step()  # the first holds the row now; one may wait
    scheduler.submit(Request([3], 4))
    with pytest.raises(QueueFull):
        scheduler.submit(Request([4], 4))
    for request, message in [
        (Request([], 4), "prompt is empty"),
        (Request([512], 4), "token id 512, outside the vocabulary"),
        (Request([1] * 120, 9), "exceeds the bundle's context of 128 tokens"),
        (Request([1], 0), "max_tokens is 0"),
        (Request([1], 1, top_p=0.0), "top_p is 0.0"),
        (Request([1], 1, temperature=-1.0), "temperature is -1.0"),
    ]:
        with pytest.raises(ValueError, match=message):
            scheduler.submit(request)
    with pytest.raises(ValueError, match="the bundle's engine takes 1 to 4 rows"):
        Scheduler(engine, max_batch=5)


def test_an_engine_error_fails_only_the_requests_of_that_step(engine, monkeypatch, caplog):
    scheduler = Scheduler(engine)
    a, b = (scheduler.submit(Request(p, 6)) for p in prompts_of([5, 7], seed=8))
    scheduler.step()  # prefill of a and b, then their first decode step
    monkeypatch.setattr(engine, "run_step", fails_once(engine.run_step, "device lost"))
    c = scheduler.submit(Request(prompts_of([6], seed=9)[0], 6))
    scheduler.step()  # prefill of c fails: only c fails; a and b decode on
    scheduler.run_until_idle()
    assert c.finish_reason == "error" and c.error == "engine error: device lost"
    assert "prefill step failed" in caplog.text
    for request in (a, b):
        assert request.finish_reason == "length" and request.tokens == alone(engine, request.prompt, 6)
    assert scheduler.occupancy == 0


def test_the_worker_thread_serves_until_stopped(engine):
    done = threading.Event()
    scheduler = Scheduler(engine).start()
    try:
        request = scheduler.submit(Request([1, 2, 3], 5, listener=lambda r, out: out.finish_reason and done.set()))
        assert done.wait(60)
        assert request.tokens == alone(engine, [1, 2, 3], 5)
    finally:
        scheduler.stop()
    with pytest.raises(Unavailable, match="shutting down"):
        scheduler.submit(Request([1], 1))


def _finished(requests, timeout=60):
    done = threading.Event()
    left = set(requests)

    def listener(request, output):
        if output.finish_reason:
            left.discard(request)
            if not left:
                done.set()

    for request in requests:
        request.listener = listener
    return done


def test_a_step_fault_fails_the_requests_holding_rows_and_the_worker_goes_on(engine, monkeypatch):
    scheduler = Scheduler(engine, max_batch=1)
    monkeypatch.setattr(scheduler, "_emit", fails_once(scheduler._emit, "injected fault"))
    first, waiting = Request([1, 2, 3], 4), Request([4, 5], 4)
    done = _finished([first, waiting])
    scheduler.submit(first)
    scheduler.submit(waiting)  # no row for it yet: not in the failing step
    scheduler.start()
    try:
        assert done.wait(60)
        assert first.finish_reason == "error" and first.error == "internal error in the scheduler step: injected fault"
        assert waiting.finish_reason == "length" and waiting.tokens == alone(engine, [4, 5], 4)
        assert scheduler.alive
    finally:
        scheduler.stop()


def test_a_worker_that_dies_fails_everything_and_refuses_new_requests(engine, monkeypatch):
    scheduler = Scheduler(engine, max_batch=1)

    def dies():
        raise SystemExit("injected")

    monkeypatch.setattr(scheduler, "step", dies)
    requests = [Request([1, 2], 3), Request([3], 3)]
    done = _finished(requests)
    for request in requests:
        scheduler.submit(request)
    scheduler.start()
    assert done.wait(60)
    assert [r.finish_reason for r in requests] == ["error", "error"]
    assert requests[0].error == "the scheduler thread stopped (SystemExit: injected)"
    assert not scheduler.alive
    with pytest.raises(Unavailable, match="the scheduler thread has stopped"):
        scheduler.submit(Request([1], 1))


def test_drain_refuses_intake_and_cancels_what_is_left_after_the_timeout(engine):
    scheduler = Scheduler(engine, max_batch=1)
    running, waiting = Request([1, 2], 50), Request([3], 50)
    done = _finished([running, waiting])
    scheduler.submit(running)
    scheduler.submit(waiting)
    scheduler.step()  # `running` holds the row
    scheduler.drain(0)
    with pytest.raises(Unavailable, match="shutting down"):
        scheduler.submit(Request([1], 1))
    for _ in range(1000):  # the timer's thread cancels; the next step frees the row
        if running.finished:
            break
        done.wait(0.01)
        scheduler.step()
    assert len(running.tokens) < 50 and waiting.finish_reason == "cancelled" and running.finish_reason == "cancelled"
    assert scheduler.occupancy == 0


def test_siblings_share_the_prefill_and_sample_with_their_own_seeds(engine):
    prompt = list(range(1, 40))  # several prefill steps
    fed = []
    scheduler = Scheduler(engine, on_step=lambda r: fed.append((r.kind, r.tokens)))
    leader = Request(prompt, 5, temperature=1.0, seed=3)
    leader.siblings = [
        Request(list(prompt), 5, temperature=1.0, seed=4),
        Request(list(prompt), 5, temperature=1.0, seed=5),
    ]
    other = scheduler.submit(Request([7, 8], 4))  # an unrelated request shares the batch
    scheduler.submit(leader)
    scheduler.run_until_idle()
    for request, seed in zip([leader, *leader.siblings], (3, 4, 5)):
        assert request.tokens == alone(engine, prompt, 5, temperature=1.0, seed=seed)
    assert other.tokens == alone(engine, [7, 8], 4)
    assert sum(tokens for kind, tokens in fed if kind == "prefill") == len(prompt) + 2  # the prompt once


def test_kv_cache_usage_counts_the_busy_rows_tokens(engine):
    scheduler = Scheduler(engine, max_batch=2)
    request = scheduler.submit(Request([1, 2, 3], 3))
    assert scheduler.kv_cache_usage == 0
    scheduler.step()  # prefill (3 tokens) and the first decode step (1 more)
    assert scheduler.kv_cache_usage == 4 / (2 * engine.manifest.max_context) and request.admitted_at is not None
    scheduler.run_until_idle()
    assert scheduler.kv_cache_usage == 0


def _stepping(scheduler):
    """Record (kind, rows, start time) of each engine step the worker runs."""
    steps = []
    scheduler.on_step = lambda record: steps.append((record.kind, record.rows, time.monotonic() - record.seconds))
    return steps


def test_a_burst_reaching_an_idle_scheduler_prefills_as_one_step(engine):
    prompts = prompts_of([5, 9, 3, 7], seed=11)
    for wait, first_rows in ((0.6, 4), (0.0, 1)):
        scheduler = Scheduler(engine, admission_wait=wait)
        steps = _stepping(scheduler)
        requests = [Request(p, 4) for p in prompts]
        done = _finished(requests)
        scheduler.start()
        try:
            scheduler.submit(requests[0])
            # without the wait the worker starts on the first request at once; with it, the others (arriving
            # 0.3 s later, within the wait of 0.6 s) join the first prefill
            time.sleep(0.3)
            for request in requests[1:]:
                scheduler.submit(request)
            assert done.wait(60)
        finally:
            scheduler.stop()
        prefills = [rows for kind, rows, _ in steps if kind == "prefill"]
        assert prefills[0] == first_rows, (wait, prefills)
        assert [r.tokens for r in requests] == [alone(engine, p, 4) for p in prompts]


def test_the_admission_wait_never_delays_a_running_batch(engine):
    # a request arriving while another decodes joins at the next step: no gap between steps near the wait
    scheduler = Scheduler(engine, admission_wait=1.0)
    steps = _stepping(scheduler)
    first, second = Request([1, 2, 3], 30), Request([4, 5], 5)
    done = _finished([first, second])
    scheduler.start()
    try:
        submitted = time.monotonic()
        scheduler.submit(first)
        while len(steps) < 3:  # the first request is decoding
            time.sleep(0.001)
        scheduler.submit(second)
        assert done.wait(60)
    finally:
        scheduler.stop()
    starts = [start for _, _, start in steps]
    assert starts[0] - submitted >= 1.0  # alone on an idle scheduler: it waited for company, once
    assert max(b - a for a, b in zip(starts[1:], starts[2:])) < 0.5, "a step waited while rows were decoding"
    assert second.tokens == alone(engine, [4, 5], 5)


def test_admission_wait_out_of_range_is_one_sentence(engine):
    with pytest.raises(ValueError, match=r"admission_wait is 2 s; it must be in \[0, 1\]"):
        Scheduler(engine, admission_wait=2)
