"""Continuous batching over one Engine: requests join a running batch after their prefill and leave
the moment they finish. Usable without any server; the HTTP layer (llama4_deploy.serving.server) only
translates requests into `Request`s and `Output`s back into responses.

One KVCache of `max_batch` rows lives as long as the scheduler. A free row is padding (position
-1 in every step); a finished row is recycled with `KVCache.reset_row`. Each `step()`:

1. drops cancelled requests and admits waiting ones into the lowest free rows (first come, first
   served);
2. runs one prefill step: the next chunk (at most the prefill profile's tokens) of every row still
   prefilling, all other rows padding. A row whose prompt is complete samples its first token;
3. runs one decode step for every decoding row.

A step feeds the engine the cache's leading rows up to the last one it uses (zero-copy views), so a
lone request costs a batch of one, not of max_batch.

So a long prompt is fed chunk by chunk with a decode step between chunks: it never stalls the
running requests for more than one prefill step. Each row samples from its own logits with its own
generator, so a request's output equals `Engine.generate` run alone on it (greedy, and sampled with
the same seed).

A burst that finds the batch empty prefills as one step: with `admission_wait` set, the worker, woken by
a request while no row is in use, waits until no further request arrived for `admission_wait` seconds
(at most four times that, or until the waiting requests fill every row) before its first step. Requests
that arrive while rows are decoding never wait: they join at the next step.

Thread model: `submit` and `cancel` may be called from any thread; `step` runs on one thread at a
time (`start()` runs it on a worker thread that sleeps while there is no work). Outputs reach each
request's `listener`, called on the stepping thread.

Faults: an engine error fails the requests of that step; any other exception raised by a step fails the
requests holding a row (the step's) and the worker goes on with the next step. Should the worker
thread itself end, every waiting and running request is failed, `alive` turns False and `submit`
raises `Unavailable`, so nothing waits for a thread that is gone.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llama4_deploy.runtime.abi import PAD_POSITION
from llama4_deploy.runtime.engine import Engine, prefill_chunk
from llama4_deploy.runtime.kv_cache import KVCache
from llama4_deploy.runtime.sampling import History, SamplingParams, sample

log = logging.getLogger("llama4_deploy.runtime.scheduler")
_ids = itertools.count(1)


class QueueFull(RuntimeError):
    """The waiting queue holds max_queue requests; retry later."""


class Unavailable(RuntimeError):
    """The scheduler takes no requests: it is draining for shutdown, or its worker thread has stopped."""


@dataclasses.dataclass(frozen=True)
class Output:
    """One event of a request: a new token, or the end (finish_reason set, token None)."""

    token: int | None
    logprob: float | None = None  # log-probability of `token` under the row's logits
    top_logprobs: tuple[tuple[int, float], ...] = ()  # the k most likely tokens, best first
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    error: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_tokens: frozenset[int] = frozenset()  # ending tokens; the one hit is the last output token
    logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and the k most likely
    listener: Callable[[Request, Output], None] | None = None
    # the rest of runtime/sampling.py's parameters
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)
    min_tokens: int = 0
    # images for the prompt's <|image|> placeholders, in order (Engine.generate's `images` for one prompt); at submit
    # the prompt is expanded and the images encoded (on the submitting thread), their features kept here
    images: list | None = None
    features: np.ndarray | None = dataclasses.field(default=None, repr=False)  # [patch tokens, H]
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's log-probability and the k most likely
    # more samples of the same prompt (OpenAI's n): admitted with this request, each in its own row, their
    # cache rows copied from this one's once its prefill is done instead of prefilling the prompt again
    siblings: list[Request] = dataclasses.field(default_factory=list)
    grammar: Any = None  # a compiled grammar (runtime/grammar.py): the tokens are masked to what it allows
    # set by the scheduler
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    tokens: list[int] = dataclasses.field(default_factory=list)
    # with prompt_logprobs: (logprob, top) per prompt token, (None, ()) for the first
    prompt_scores: list[tuple[float | None, tuple[tuple[int, float], ...]]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    first_token_at: float | None = None
    admitted_at: float | None = None  # when it took a batch row (queue time: admitted_at - arrived)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(
            self.temperature,
            self.top_p,
            self.top_k,
            self.min_p,
            self.presence_penalty,
            self.frequency_penalty,
            self.repetition_penalty,
            self.logit_bias,
            self.min_tokens,
        )


@dataclasses.dataclass(eq=False)
class _Row:
    request: Request
    rng: np.random.Generator
    params: SamplingParams
    history: History
    prefilled: int = 0  # prompt tokens already in the cache
    last_token: int = 0  # fed in the next decode step
    features_used: int = 0  # image features already scattered into prefill steps
    forks: list[int] = dataclasses.field(default_factory=list)  # rows waiting for this row's prefill
    constraint: Any = None  # runtime/grammar.py's Constraint, for a request with a grammar
    waiting: bool = False  # a sibling whose cache row is copied from its leader's when that prefill is done

    @property
    def prefilling(self) -> bool:
        return not self.waiting and self.prefilled < len(self.request.prompt)

    @property
    def decoding(self) -> bool:
        return not self.waiting and self.prefilled >= len(self.request.prompt)


@dataclasses.dataclass
class StepRecord:
    kind: str  # "prefill" or "decode"
    seconds: float
    rows: int  # rows with real tokens in the step
    tokens: int  # real tokens fed
    started: float = 0.0  # time.perf_counter() when the engine call began (the host's monotonic clock)


class _LeadingRows:
    """The first `rows` rows of a KVCache, seen the way `Engine.run_step` sees a cache. A leading-axis
    slice of a C-contiguous buffer is itself contiguous, so the engine reads it in place: a step costs
    the rows in use, not max_batch. Rows of the step index the full cache, so `write` goes through."""

    def __init__(self, cache: KVCache, rows: int):
        self.cache, self.rows = cache, rows

    @property
    def lengths(self) -> np.ndarray:
        return self.cache.lengths[: self.rows]  # [b]

    def feeds(self) -> dict:
        return {name: buffer[: self.rows] for name, buffer in self.cache.feeds().items()}  # [b, K, S, D] views

    def binding_key(self) -> tuple | None:
        return self.cache.binding_key(self.rows)

    def write(self, outputs: dict, positions: np.ndarray) -> None:
        self.cache.write(outputs, positions)  # positions [b, T]: its rows are the cache's first b rows

    def step_width(self, tokens: int, idle: np.ndarray) -> int:
        return self.cache.step_width(tokens, idle, self.lengths)

    def reserve_step(self, width: int, idle: np.ndarray) -> None:
        self.cache.reserve_step(width, idle, self.lengths)

    def advance(self, positions: np.ndarray) -> None:
        self.cache.advance(positions)  # positions [b, T]: its rows are the cache's first b rows


def top_logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """Log-probability of `token` and the k most likely tokens under logits [V] (log-softmax in float64)."""
    shifted = logits.astype(np.float64) - logits.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    top = np.argsort(-logprobs, kind="stable")[:k] if k else []
    return float(logprobs[token]), tuple((int(t), float(logprobs[t])) for t in top)


class Scheduler:
    """Continuous batching over `engine`; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        max_batch: int | None = None,
        max_queue: int = 64,
        on_step: Callable[[StepRecord], None] | None = None,
        admission_wait: float = 0.0,
    ):
        max_batch = engine.max_batch if max_batch is None else max_batch
        if not 1 <= max_batch <= engine.max_batch:
            raise ValueError(f"max_batch is {max_batch}; the bundle's engine takes 1 to {engine.max_batch} rows")
        if max_queue < 0:
            raise ValueError(f"max_queue is {max_queue}; it must be 0 or more")
        if not 0 <= admission_wait <= 1:
            raise ValueError(f"admission_wait is {admission_wait} s; it must be in [0, 1]")
        self.admission_wait = admission_wait
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.on_step = on_step
        self.cache = engine.new_cache(max_batch)
        self.rows: list[_Row | None] = [None] * max_batch
        self._waiting: collections.deque[Request] = collections.deque()
        self._cancelled: set[Request] = set()
        self._work = threading.Condition(threading.RLock())  # a listener may call cancel()
        self._worker: threading.Thread | None = None
        self._stopping = False
        self._draining: str | None = None  # why intake is closed while running requests finish
        self.died: str | None = None  # why the worker thread ended, if it did

    # -- intake (any thread) --------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        """Queue a request; raises ValueError for a request the engine cannot run, QueueFull when
        max_queue requests are already waiting."""
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens is {request.max_tokens}; it must be at least 1")
        request.sampling.check(self.engine.vocab_size)
        if request.min_tokens > request.max_tokens:
            raise ValueError(f"min_tokens is {request.min_tokens}, more than max_tokens {request.max_tokens}")
        if request.logprobs is not None and not 0 <= request.logprobs <= self.engine.vocab_size:
            raise ValueError(f"logprobs is {request.logprobs}; it must be in [0, {self.engine.vocab_size}]")
        if request.features is not None:  # prepared by the caller (Engine.prepare_images): expanded, encoded
            if request.images is not None:
                raise ValueError("give a request either its images or their prepared features, not both")
            request.prompt = self.engine._check_prompt(request.prompt, request.max_tokens)
        elif request.images is not None or self.engine.vision is not None:
            prompts, features = self.engine.prepare_images([request.prompt], [request.images], request.max_tokens)
            request.prompt, request.features = prompts[0], features[0]
        else:
            request.prompt = self.engine._check_prompt(request.prompt, request.max_tokens)
        if 1 + len(request.siblings) > self.max_batch:
            raise ValueError(
                f"n is {1 + len(request.siblings)}; the samples of a prompt run together, at most {self.max_batch}"
            )
        for sibling in request.siblings:
            sibling.sampling.check(self.engine.vocab_size)
            sibling.prompt = request.prompt
        with self._work:
            if self.died is not None:
                raise Unavailable(f"the scheduler thread has stopped ({self.died})")
            if self._draining is not None:
                raise Unavailable(self._draining)
            if self._stopping:
                raise Unavailable("the scheduler is shutting down")
            if len(self._waiting) >= self.max_queue and self._free_rows_locked() <= 0:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (max_queue {self.max_queue})")
            self._waiting.append(request)
            self._work.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (a client went away); its row is freed at the start of the next step."""
        with self._work:
            if not request.finished:
                self._cancelled.add(request)
                self._work.notify()

    def _free_rows_locked(self) -> int:
        return sum(row is None for row in self.rows) - len(self._waiting)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def occupancy(self) -> int:
        """Rows holding a request (prefilling or decoding)."""
        return sum(row is not None for row in self.rows)

    @property
    def kv_cache_usage(self) -> float:
        """Cached tokens of the rows holding requests over what the rows can hold (0 to 1)."""
        used = sum(int(self.cache.lengths[b]) for b, row in enumerate(self.rows) if row is not None)
        return used / (self.max_batch * self.engine.manifest.max_context)

    @property
    def alive(self) -> bool:
        """False once a started worker thread has ended other than by `stop()`."""
        return self.died is None

    @property
    def draining(self) -> bool:
        return self._draining is not None

    def drain(self, timeout: float, reason: str = "the server is shutting down") -> None:
        """Refuse new requests from now on; requests still waiting or running after `timeout` seconds are
        cancelled (finish_reason "cancelled", `error` None) so their callers can answer them."""
        with self._work:
            if self._draining is not None:
                return
            self._draining = reason
        timer = threading.Timer(timeout, self.cancel_all)
        timer.daemon = True
        timer.start()

    def cancel_all(self) -> None:
        """End every waiting request now and every running one at the start of the next step, as cancelled
        (rows change only on the stepping thread, never under a step that is running)."""
        with self._work:
            for request in list(self._waiting):
                self._finish_locked(request, "cancelled")
            self._cancelled.update(row.request for row in self.rows if row is not None)
            self._work.notify_all()

    @property
    def idle(self) -> bool:
        return not self._waiting and not self.occupancy

    # -- one iteration (the stepping thread) ----------------------------------------------------
    def step(self) -> bool:
        """Admit, run at most one prefill step and one decode step; returns whether any ran."""
        self._admit()
        ran = False
        prefilling = [b for b, row in enumerate(self.rows) if row is not None and row.prefilling]
        if prefilling:
            self._prefill_step(prefilling)
            ran = True
        decoding = [b for b, row in enumerate(self.rows) if row is not None and row.decoding]
        if decoding:
            self._decode_step(decoding)
            ran = True
        return ran

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        """Step until no request is waiting or running (for callers without a worker thread)."""
        for _ in range(max_steps):
            if self.idle and not self._cancelled:
                return
            self.step()
        raise RuntimeError(f"requests still running after {max_steps} steps")

    def _admit(self) -> None:
        with self._work:
            for request in list(self._cancelled):
                self._finish_locked(request, "cancelled")
            self._cancelled.clear()
            while self._waiting:
                request = self._waiting[0]
                group = [request, *[s for s in request.siblings if not s.finished]]
                free = [b for b, row in enumerate(self.rows) if row is None]
                if len(free) < len(group):  # a group joins together, first come first served
                    break
                self._waiting.popleft()
                if request.finished:  # cancelled while it waited: its siblings run on their own
                    group = group[1:]
                share = self.cache.can_copy_rows and len(group) > 1 and group[0] is request
                for i, (b, member) in enumerate(zip(free, group)):
                    try:
                        rng = np.random.default_rng(member.seed)
                    except (TypeError, ValueError) as err:  # only this request fails
                        member.finish_reason, member.error = "error", f"cannot seed the sampler: {err}"
                        self._notify(member, Output(None, finish_reason="error", error=member.error))
                        continue
                    self.cache.reset_row(b)
                    member.admitted_at = time.monotonic()
                    params = member.sampling
                    history = History(member.prompt, self.engine.vocab_size, params)
                    constraint = None
                    if member.grammar is not None:
                        from llama4_deploy.runtime.grammar import Constraint  # deferred: xgrammar imports torch

                        constraint = Constraint(member.grammar, self.engine.vocab_size)
                    self.rows[b] = _Row(member, rng, params, history, waiting=share and i > 0, constraint=constraint)
                    if share and i > 0:
                        self.rows[free[0]].forks.append(b)

    def _finish_locked(self, request: Request, reason: str, error: str | None = None) -> None:
        """End a request wherever it is (waiting or in a row) and tell its listener once."""
        if request.finished:
            return
        if request in self._waiting:
            at = self._waiting.index(request)
            self._waiting.remove(request)
            for sibling in reversed([s for s in request.siblings if not s.finished]):
                self._waiting.insert(at, sibling)  # they wait on as requests of their own
        for b, row in enumerate(self.rows):
            if row is not None and row.request is request:
                for fork in row.forks:  # siblings still waiting for this prefill: they prefill on their own
                    if self.rows[fork] is not None:
                        self.rows[fork].waiting = False
                self.rows[b] = None
        request.finish_reason, request.error = reason, error
        self._notify(request, Output(None, finish_reason=reason, error=error))

    def _notify(self, request: Request, output: Output) -> None:
        if request.listener is None:
            return
        try:
            request.listener(request, output)
        except Exception:  # a broken listener must not take the batch down
            log.exception("listener of request %d failed", request.id)

    def _run(
        self, kind: str, rows: list[int], ids: np.ndarray, positions: np.ndarray, images: bool = False
    ) -> np.ndarray | None:
        """One engine call; on an engine error only the requests in this step fail (and are logged). `images`: a
        prefill step holding image features, run through the embedding step (Engine.run_embeds_step)."""
        start = time.perf_counter()
        used = max(rows) + 1  # admission fills the lowest free row, so rows in use stay near the front
        try:
            cache = _LeadingRows(self.cache, used)
            if images:
                logits = self.engine.run_embeds_step(
                    cache, self._embeds(rows, ids[:used], positions[:used]), positions[:used]
                )
            else:
                logits = self.engine.run_step(cache, ids[:used], positions[:used])
        except Exception as err:
            log.exception("%s step failed; failing its %d request(s)", kind, len(rows))
            with self._work:
                for b in rows:
                    self._finish_locked(self.rows[b].request, "error", f"engine error: {err}")
            return None
        if self.on_step is not None:
            self.on_step(StepRecord(kind, time.perf_counter() - start, len(rows), int((positions >= 0).sum()), start))
        return logits

    def _prefill_step(self, rows: list[int]) -> None:
        prompts: list[Sequence[int]] = [()] * self.max_batch  # rows not prefilling feed nothing: padding
        done = [0] * self.max_batch
        for b in rows:
            prompts[b], done[b] = self.rows[b].request.prompt, self.rows[b].prefilled
        ids, positions, take = prefill_chunk(prompts, done, self.engine.prefill_tokens)  # [B, T]
        images = any(self.rows[b].request.features is not None for b in rows)
        logits = self._run("prefill", rows, ids, positions, images)  # [b, T, V], b = rows up to the last one in use
        if logits is None:
            return
        complete, source = [], []  # rows whose first token is due, and the (row, position) of their logits
        for b in rows:
            row = self.rows[b]
            if row.request.prompt_logprobs is not None:
                self._score_prompt(row, logits[b, : take[b]])
            row.prefilled += take[b]
            if not row.prefilling:
                for ready in (b, *self._fork(b)):  # siblings sample their first token from the same logits
                    complete.append(ready)
                    source.append((b, take[b] - 1))
        if complete:
            self._emit(complete, logits[[b for b, _ in source], [t for _, t in source]])

    def _fork(self, b: int) -> list[int]:
        """Copy row b's cache into the rows of its waiting siblings; returns those rows."""
        forks = []
        for fork in self.rows[b].forks:
            sibling = self.rows[fork]
            if sibling is None or not sibling.waiting:
                continue
            self.cache.copy_row(b, fork)
            sibling.prefilled, sibling.waiting = len(sibling.request.prompt), False
            sibling.request.prompt_scores = list(self.rows[b].request.prompt_scores)
            forks.append(fork)
        self.rows[b].forks = []
        return forks

    @staticmethod
    def _score_prompt(row: _Row, logits: np.ndarray) -> None:
        """Log-probabilities of the prompt's tokens from this chunk's logits [t, V]: position j predicts token
        j + 1 (the first token has none)."""
        request, start = row.request, row.prefilled
        if start == 0:
            request.prompt_scores.append((None, ()))
        for t in range(len(logits)):
            target = start + t + 1
            if target < len(request.prompt):
                request.prompt_scores.append(top_logprobs(logits[t], request.prompt[target], request.prompt_logprobs))

    def _embeds(self, rows: list[int], ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """The embedding step for a prefill chunk, each image row's next features at its <|patch|> positions."""
        embeds = self.engine.embed(ids)  # [b, T, H]
        patch = self.engine.image_tokens.patch
        for b in rows:
            row = self.rows[b]
            if row.request.features is None:
                continue
            slots = np.flatnonzero((ids[b] == patch) & (positions[b] >= 0))  # padding is never a patch
            embeds[b, slots] = row.request.features[row.features_used : row.features_used + len(slots)]
            row.features_used += len(slots)
        return embeds

    def _decode_step(self, rows: list[int]) -> None:
        ids = np.zeros((self.max_batch, 1), dtype=np.int64)  # [B, 1]
        positions = np.full((self.max_batch, 1), PAD_POSITION, dtype=np.int64)
        for b in rows:
            ids[b, 0] = self.rows[b].last_token
            positions[b, 0] = self.cache.lengths[b]
        logits = self._run("decode", rows, ids, positions)  # [b, 1, V]
        if logits is None:
            return
        self._emit(rows, logits[rows, 0])

    def _emit(self, rows: list[int], logits: np.ndarray) -> None:
        """Sample the next token of each of `rows` from logits [n, V] (one sampler call for them all), hand each
        to its listener, finish the requests that are done."""
        live = [self.rows[b] for b in rows]
        if any(row.constraint is not None for row in live):
            logits = logits.copy()  # the engine's logits stay as they were; the masked ones are sampled
            for i, row in enumerate(live):
                if row.constraint is not None:
                    logits[i, ~row.constraint.allowed()] = -np.inf
        chosen = sample(
            logits,
            [row.params for row in live],
            [row.rng for row in live],
            [row.history for row in live],
            [row.request.stop_tokens for row in live],
        )
        now = time.monotonic()
        for i, row in enumerate(live):
            request, token = row.request, int(chosen[i])
            k = request.logprobs
            logprob, top = (None, ()) if k is None else top_logprobs(logits[i], token, k)
            request.tokens.append(token)
            row.history.add(token)
            if request.first_token_at is None:
                request.first_token_at = now
            row.last_token = token
            self._notify(request, Output(token, logprob, top))
            if row.constraint is not None:
                row.constraint.accept(token)
            if token in request.stop_tokens or (row.constraint is not None and row.constraint.complete):
                reason = "stop"
            elif len(request.tokens) >= request.max_tokens:
                reason = "length"
            else:
                continue
            with self._work:
                self._finish_locked(request, reason)

    # -- worker thread ----------------------------------------------------------------------------
    def start(self) -> Scheduler:
        """Step on a daemon worker thread until `stop()`; it sleeps while there is no work."""
        if self._worker is None:
            self._worker = threading.Thread(target=self._serve, name="llama4-deploy-scheduler", daemon=True)
            self._worker.start()
        return self

    def _serve(self) -> None:
        try:
            while True:
                with self._work:
                    while not self._stopping and not self._waiting and not self._cancelled and not self.occupancy:
                        self._work.wait()
                    if self._stopping:
                        return
                    if not self.occupancy:
                        self._settle_burst()
                try:
                    self.step()
                except Exception as err:
                    self._fail_step(err)
        except BaseException as err:  # the thread ends here: say why, and let nothing wait for it
            self._on_death(err)

    def _settle_burst(self) -> None:
        """(holding the lock, no row in use) Let arrivals settle so a burst prefills as one step rather than one
        request alone and the rest a step later, behind its first token: wait while each request follows the last
        within `admission_wait`, for at most 4 × admission_wait, or until the waiting requests fill the rows."""
        if self.admission_wait <= 0:
            return
        deadline = time.monotonic() + 4 * self.admission_wait
        while not self._stopping and len(self._waiting) < self.max_batch:
            seen, left = len(self._waiting), deadline - time.monotonic()
            if left <= 0:
                return
            self._work.wait(min(self.admission_wait, left))
            if len(self._waiting) <= seen:  # nothing new within admission_wait: the burst is over
                return

    def _fail_step(self, err: Exception) -> None:
        """A step raised outside the engine call: fail the requests holding rows (the step's), keep the rest."""
        with self._work:
            failed = [row.request for row in self.rows if row is not None]
            log.exception("scheduler step failed; failing its %d request(s)", len(failed))
            for request in failed:
                self._finish_locked(request, "error", f"internal error in the scheduler step: {err}")

    def _on_death(self, err: BaseException) -> None:
        """The worker thread is ending on an exception: nothing may wait for it any more."""
        with self._work:
            self.died = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            log.critical("the scheduler thread stopped (%s); failing every request", self.died, exc_info=err)
            for request in list(self._waiting) + [row.request for row in self.rows if row is not None]:
                self._finish_locked(request, "error", f"the scheduler thread stopped ({self.died})")

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests, let the worker finish its step, then cancel what is left."""
        with self._work:
            self._stopping = True
            self._work.notify_all()
        if self._worker is not None:
            self._worker.join(timeout)
            self._worker = None
        with self._work:
            for request in list(self._waiting) + [row.request for row in self.rows if row is not None]:
                self._finish_locked(request, "cancelled")


def run_requests(
    engine: Engine, prompts: Sequence[Sequence[int]], max_tokens: int, images=None, **kwargs
) -> list[Request]:
    """Run prompts through a Scheduler to completion (all submitted at once); for tests and benchmarks. `images`:
    one list per prompt, as Engine.generate's."""
    scheduler = Scheduler(engine, max_queue=len(prompts))
    given = images if images is not None else [None] * len(prompts)
    requests = [scheduler.submit(Request(list(p), max_tokens, images=g, **kwargs)) for p, g in zip(prompts, given)]
    scheduler.run_until_idle()
    return requests
