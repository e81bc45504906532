"""One comparator for export, quantization and backend parity.

    result = compare(actual, expected, tolerance=1e-3 * max(1, |expected|max), stat="max")

`stat` picks the statistic of |actual - expected| that must stay within `tolerance`: "max",
"mean", a quantile such as "q0.99", or a quantile over rows of each row's max, such as "rowq0.5" (the
typical position's worst logit, for [positions, vocab] logits). On failure the result says which tolerance would have
passed and where the worst element is.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Comparison:
    ok: bool
    stat: str
    value: float  # the statistic of |actual - expected|
    tolerance: float
    worst_index: tuple[int, ...]
    worst_actual: float
    worst_expected: float

    def __str__(self) -> str:
        verdict = "ok" if self.ok else f"FAILED (a tolerance of {self.value:.3g} would pass)"
        return (
            f"{self.stat} |diff| {self.value:.3g} vs tolerance {self.tolerance:.3g}: {verdict}; worst at "
            f"{self.worst_index}: {self.worst_actual:.6g} vs {self.worst_expected:.6g}"
        )


def relative_logit_tolerance(expected: np.ndarray, rel: float = 1e-3) -> float:
    """The parity rule for logits: rel x max(1, max |logit|)."""
    return rel * max(1.0, float(np.abs(expected).max()))


def compare(actual: np.ndarray, expected: np.ndarray, tolerance: float, stat: str = "max") -> Comparison:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: actual {actual.shape}, expected {expected.shape}")
    diff = np.abs(actual - expected)
    if not np.isfinite(diff).all():
        diff = np.where(np.isfinite(diff), diff, np.inf)
    if stat == "max":
        value = float(diff.max())
    elif stat == "mean":
        value = float(diff.mean())
    elif stat.startswith("q"):
        value = float(np.quantile(diff, float(stat[1:])))
    elif stat.startswith("rowq"):
        value = float(np.quantile(diff.reshape(len(diff), -1).max(-1), float(stat[4:])))
    else:
        raise ValueError(f"unknown statistic {stat!r}; use max, mean, qN (e.g. q0.99) or rowqN (e.g. rowq0.5)")
    worst = np.unravel_index(int(diff.argmax()), diff.shape)
    return Comparison(
        ok=value <= tolerance,
        stat=stat,
        value=value,
        tolerance=tolerance,
        worst_index=tuple(int(i) for i in worst),
        worst_actual=float(actual[worst]),
        worst_expected=float(expected[worst]),
    )
