"""The comparator's statistics, on arrays whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from llama4_deploy.quality.compare import compare


def test_row_quantile_is_the_typical_rows_worst_element():
    expected = np.zeros((5, 4))
    actual = expected.copy()
    actual[0, 1] = 9.0  # one bad row (a rounding flip) ...
    actual[1:, 2] = [0.1, 0.2, 0.3, 0.4]  # ... and the rows' worst elements otherwise
    typical = compare(actual, expected, tolerance=0.25, stat="rowq0.5")
    assert typical.value == pytest.approx(0.3) and not typical.ok  # median of [9, .1, .2, .3, .4]
    assert compare(actual, expected, tolerance=0.35, stat="rowq0.5").ok
    assert compare(actual, expected, tolerance=0.35).value == 9.0  # max sees the flip
    assert compare(actual, expected, tolerance=1.0, stat="mean").value == pytest.approx(10.0 / 20)


def test_unknown_statistic_is_refused():
    with pytest.raises(ValueError, match="rowqN"):
        compare(np.zeros(3), np.zeros(3), 1.0, stat="median")
