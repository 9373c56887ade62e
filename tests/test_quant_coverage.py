"""The coverage record of the weight quantizers (passes/quant_coverage.py) as data: its one-line error,
its report.json form and the min_coverage check, on hand-made plans (no graph)."""

from __future__ import annotations

import pytest

from passes.quant_coverage import Coverage, MatmulPlan, check_min_coverage


def _plans() -> list[MatmulPlan]:
    """1000 of 6600 elements quantized (15.15%, shown 15.1%); four skip reasons, the first for two matmuls."""
    return [MatmulPlan("q", 10, 100, block=32), MatmulPlan("tied_a", 10, 10, skipped="tied"),
            MatmulPlan("tied_b", 10, 10, skipped="tied"), MatmulPlan("odd", 10, 20, skipped="K=10 is odd"),
            MatmulPlan("wide", 10, 20, skipped="too wide"), MatmulPlan("last", 10, 500, skipped="why not")]


def test_shortfall_names_the_reasons_and_the_min_coverage_that_would_pass():
    message = Coverage(_plans(), 0.95).shortfall("quantize-int4-rtn")
    assert message == (
        "quantize-int4-rtn: only 1 of 6 targeted matmuls quantized (15.1% of the targeted linear weight elements), "
        "under min_coverage 95.0% (skipped tied_a and 1 more: tied; odd: K=10 is odd; wide: too wide; and 1 other "
        "reasons); allow it with `min_coverage: 0.15` on the recipe's quantize-int4-rtn entry, or quantize these "
        "matmuls with another format (int8-wo, fp8-wo)")
    few = Coverage(_plans()[:4], 0.95).shortfall("p")  # three reasons or fewer: all named, no "other reasons"
    assert "(skipped tied_a and 1 more: tied; odd: K=10 is odd); allow it with `min_coverage: 0.71`" in few
    three = Coverage(_plans()[:5], 0.95).shortfall("p")
    assert "(skipped tied_a and 1 more: tied; odd: K=10 is odd; wide: too wide); allow it" in three


def test_coverage_at_min_coverage_passes_and_percentages_never_round_up():
    plans = [MatmulPlan("a", 1, 9996), MatmulPlan("b", 1, 4, skipped="tied")]
    assert Coverage(plans, 0.9996).shortfall("p") is None  # exactly at the bound
    message = Coverage(plans, 0.9997).shortfall("p")
    assert "(99.9% of the targeted" in message and "under min_coverage 99.9%" in message  # 99.96% is not 100%
    assert "`min_coverage: 0.99`" in message  # floor, so the suggestion passes
    assert Coverage([], 0.95).fraction == 1.0 and Coverage([], 1.0).shortfall("p") is None


def test_report_form():
    assert Coverage(_plans()[:2], 0.5).as_dict() == {
        "targeted": 2, "quantized": 1, "targeted_elements": 1100, "quantized_elements": 1000,
        "fraction": 1000 / 1100, "min_coverage": 0.5,
        "summary": "1 of 2 targeted matmuls quantized (90.9% of the targeted linear weight elements)",
        "matmuls": {"q": {"k": 10, "n": 100, "block": 32}, "tied_a": {"k": 10, "n": 10, "skipped": "tied"}}}


@pytest.mark.parametrize("value", [0, 0.5, 1])
def test_min_coverage_takes_fractions_in_the_closed_unit_interval(value):
    assert check_min_coverage(value) == float(value) and type(check_min_coverage(value)) is float


@pytest.mark.parametrize("value", [-0.01, 1.01, True, "0.5", None])
def test_min_coverage_refuses_anything_else(value):
    with pytest.raises(ValueError, match=r"^min_coverage must be a fraction of the targeted weight elements in "
                                         r"\[0, 1\] \(0.5 = half\), got " + repr(value).replace(".", r"\.") + "$"):
        check_min_coverage(value)
