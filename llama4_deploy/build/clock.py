"""Wall time per build activity (load, trace, dispatch, link, lower, quantize, lint, save, golden, hash): the
steps, with link, lower, quantize and lint timed apart inside dispatch and save.

`build()` opens one StepClock for the build; the steps time themselves with `timed(name)`, which charges the clock
of the build in progress (a context variable), or nothing outside a build.
"""

from __future__ import annotations

import contextlib
import contextvars
import time

_CURRENT: contextvars.ContextVar[StepClock | None] = contextvars.ContextVar("step_clock", default=None)


class StepClock:
    """Seconds per activity, summed over repeats (link and lower run once per pipeline stage and MoE dispatch).
    `save` streams the weights: it reads, converts and quantizes each tensor as it writes it."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.spans: list[tuple[str, float, float]] = []  # (activity, start, end)
        self._nested: list[float] = []  # per open activity: seconds spent in activities inside it

    @contextlib.contextmanager
    def __call__(self, name: str):
        """Time an activity; one inside another (link within dispatch) counts only as itself."""
        start = time.time()
        self._nested.append(0.0)
        try:
            yield
        finally:
            end = time.time()
            inner = self._nested.pop()
            if self._nested:
                self._nested[-1] += end - start
            self.seconds[name] = self.seconds.get(name, 0.0) + end - start - inner
            self.spans.append((name, start, end))

    @contextlib.contextmanager
    def running(self):
        """Make this the clock `timed` charges, for the duration of a build."""
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)


def timed(name: str):
    """A context manager timing `name` on the build's clock (a no-op outside a build)."""
    clock = _CURRENT.get()
    return clock(name) if clock is not None else contextlib.nullcontext()
