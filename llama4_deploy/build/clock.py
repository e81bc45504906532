"""Wall time per build stage (load, trace, dispatch, link, lower, quantize, lint, save, golden, hash).

`build()` opens one StageClock for the build; stage functions time themselves with `timed(stage)`, which
charges the clock of the build in progress (a context variable), or nothing outside a build.
"""

from __future__ import annotations

import contextlib
import contextvars
import time

_CURRENT: contextvars.ContextVar["StageClock | None"] = contextvars.ContextVar("stage_clock", default=None)


class StageClock:
    """Seconds per stage, summed over repeats (link and lower run once per stage and MoE dispatch). `save`
    streams the weights: it reads, converts and quantizes each tensor as it writes it."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.spans: list[tuple[str, float, float]] = []  # (stage, start, end)
        self._nested: list[float] = []  # per open stage: seconds spent in stages inside it

    @contextlib.contextmanager
    def __call__(self, stage: str):
        """Time a stage; a stage inside another (link within dispatch planning) counts only as itself."""
        start = time.time()
        self._nested.append(0.0)
        try:
            yield
        finally:
            end = time.time()
            inner = self._nested.pop()
            if self._nested:
                self._nested[-1] += end - start
            self.seconds[stage] = self.seconds.get(stage, 0.0) + end - start - inner
            self.spans.append((stage, start, end))

    @contextlib.contextmanager
    def running(self):
        """Make this the clock `timed` charges, for the duration of a build."""
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)


def timed(stage: str):
    """A context manager timing `stage` on the build's clock (a no-op outside a build)."""
    clock = _CURRENT.get()
    return clock(stage) if clock is not None else contextlib.nullcontext()
