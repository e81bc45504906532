"""verify on specs that round activations (fp8): the rounding-tie noise floor, and wiring errors it must not hide.

On the trained checkpoint an fp8 engine is tie-sensitive: two float orders of the same graph (its own prefill and
decode paths) differ by ~0.11 in logits, over the tight bound 2e-3 x max|logit| (0.035). verify measures that floor
on the simulation (jittered rounded activations, verify.ROUNDING_JITTER) and bounds max|dlogit| by twice it, and
bounds the typical position (median over positions of max|dlogit|) by twice its own floor, which on this model stays
under the tight bound.

The miswired bundles below are built with one site wired wrong, each a valid graph that computes another
quantization than the spec's: one weight's fp8 scales along the wrong axis (per input channel), or one weight's
activation Q/DQ left out. They are the four single-site errors, out of eight measured, whose max|dlogit| over the
scored sequence stays under the noise bound on tiny-trained (0.25-0.34 against 0.38), so the max bound alone can
miss them; they move the typical position by 0.045-0.075, over its bound of 0.035.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from llama4_deploy.build import build
from llama4_deploy.graphs import lower_quant_qdq
from llama4_deploy.quality.verify import NOISE_MARGIN, verify


@pytest.fixture(scope="module")
def fp8_report(tmp_path_factory):
    bundle = build(
        recipe="tiny-trained", precision="fp8", out=tmp_path_factory.mktemp("fp8") / "b", log=lambda _: None
    ).bundle
    return verify(str(bundle), log=lambda _: None, perplexity=False)


def test_correct_fp8_bundle_passes_with_its_noise_floor(fp8_report):
    report = fp8_report
    assert report.ok, report.table()
    moved, typical, typical_generated, flipped = report.rounding_noise
    assert moved > 0 and typical_generated >= typical  # the moves grow along the sequence
    # tiny-trained's argmax hardly moves under the jitter, and a correct engine flips at most one near-tie position
    # (none on some CPUs, one of the prefill path's on others: the fp32 GEMMs' summation order varies with the CPU)
    assert flipped < 0.01
    assert report.greedy_allowed == math.ceil(NOISE_MARGIN * flipped * sum(r.greedy_total for r in report.rows) - 1e-9)
    assert report.greedy_disagreements <= min(report.greedy_allowed, 1)
    for row in report.rows:
        assert row.greedy_pooled
        assert row.comparison.tolerance >= NOISE_MARGIN * moved
        generated = row.path == "generate"
        assert row.typical.tolerance >= NOISE_MARGIN * (typical_generated if generated else typical)
        assert row.typical.stat == "rowq0.5" and row.typical.ok
        # a correct engine's typical position stays within one rounding-tie noise floor of the simulation (the
        # single-site wiring errors below move it past two); how far within depends on the CPU's summation order
        assert row.typical.value < row.typical.tolerance / NOISE_MARGIN
    # over the whole sequence (the score rows) the typical position's floor stays near the fixed bound (2e-3 x
    # max|logit| ~ 0.035; measured 2 x 0.021 = 0.041) and below the smallest move of the 8 single-site wiring errors
    # measured (0.045), which is what lets the wiring errors below fail
    assert NOISE_MARGIN * typical < 0.045
    assert "rounding-tie noise floor" in report.table()


def test_greedy_disagreements_are_pooled_against_the_jittered_rate(fp8_report):
    # one disagreement per row: allowed only where the noise floor allows that many over all rows together, and
    # never on a row checked exactly (the fp32 / fp16 rule)
    rows = [dataclasses.replace(row, greedy_agree=row.greedy_total - 1) for row in fp8_report.rows]
    assert not dataclasses.replace(fp8_report, rows=rows, greedy_allowed=0).ok
    assert not dataclasses.replace(fp8_report, rows=rows, greedy_allowed=len(rows) - 1).ok
    assert "FAIL" in dataclasses.replace(fp8_report, rows=rows, greedy_allowed=len(rows) - 1).table()
    assert dataclasses.replace(fp8_report, rows=rows, greedy_allowed=len(rows)).ok
    exact = [dataclasses.replace(row, greedy_pooled=False) for row in rows]
    assert not dataclasses.replace(fp8_report, rows=exact, greedy_allowed=len(rows)).ok


def _wrong_axis(target):
    original = lower_quant_qdq.reduction_axis

    def axis(value):
        found = original(value)
        return ({-1: -2, -2: -1}[found]) if value.name == target and isinstance(found, int) else found

    return "reduction_axis", axis


def _no_activation_qdq(target):
    original = lower_quant_qdq.activation_consumers

    def consumers(dequantized):
        return [] if dequantized.name == f"{target}.dq" else original(dequantized)

    return "activation_consumers", consumers


@pytest.mark.parametrize("miswire", [_wrong_axis, _no_activation_qdq], ids=["scales-on-the-wrong-axis", "no-act-qdq"])
@pytest.mark.parametrize("target", ["layers.1.o", "layers.1.experts_down"])
def test_single_site_wiring_error_fails(miswire, target, tmp_path, monkeypatch):
    name, replacement = miswire(target)
    with monkeypatch.context() as patch:
        patch.setattr(lower_quant_qdq, name, replacement)
        bundle = build(recipe="tiny-trained", precision="fp8", out=tmp_path / "b", log=lambda _: None).bundle
    report = verify(str(bundle), log=lambda _: None, perplexity=False)
    assert not report.ok, report.table()
    assert not all(row.typical.ok for row in report.rows), report.table()
