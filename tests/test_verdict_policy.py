"""The verdict's policy (compiler/measure/verdict.py) on hand-made measurements: which limit fails a
build, at which side of each bound, with which words, and what the verdict says it rests on.

tests/test_verdict.py checks the policy on the trained model's real INT4 graphs (seconds to
minutes); this file runs in milliseconds, which is what lets mutation testing
(benchmarks/mutation_summary.md) run it for every mutant of verdict.py.
"""

from __future__ import annotations

import dataclasses

import pytest

from compiler.measure.quality import QualityResult
from compiler.measure.validate import ValidationResult
from compiler.measure.verdict import decide, quality_failures
from compiler.recipe import Recipe, Tolerance

LIMITS = dict(max_ppl_delta=0.10, max_kl=0.05, min_heldout_agreement=0.80)


def _recipe(passes=("cleanup", "quantize-int4-rtn"), **limits) -> Recipe:
    return Recipe("r", "", tuple(passes), Tolerance(max_rel_logit_error=0.8), **limits)


def _quality(ppl_delta=0.10, kl=0.05, agreement=0.80) -> QualityResult:
    return QualityResult(reference_perplexity=20.0, compiled_perplexity=20.0 * (1 + ppl_delta), ppl_delta=ppl_delta,
                         kl_mean=kl, greedy_agreement=agreement, agreement_tokens=256, eval_tokens=2032, seconds=1.0)


def _validation(failures=()) -> ValidationResult:
    return ValidationResult("p", 3, 4, 0.1, 0.01, 0.05, 1.0, [1], [1], Tolerance(), not failures, list(failures), 0.1)


def test_each_quality_limit_passes_at_its_bound_and_fails_just_beyond_with_its_figures():
    recipe = _recipe(**LIMITS)
    assert quality_failures(_quality(), recipe) == []  # every figure exactly at its bound
    assert quality_failures(_quality(ppl_delta=0.1001), recipe) == [
        "held-out perplexity rose 10.01% (20.000 -> 22.002), over the recipe's max_ppl_delta 10.00%"]
    assert quality_failures(_quality(kl=0.0501), recipe) == [
        "held-out KL 0.0501 nats/token, over the recipe's max_kl 0.05"]
    assert quality_failures(_quality(agreement=0.799), recipe) == [
        "held-out greedy agreement 79.9% over 256 tokens, under the recipe's min_heldout_agreement 80.0%"]
    # All three at once: one failure each, in the order perplexity, KL, agreement.
    worst = quality_failures(_quality(ppl_delta=0.5, kl=1.0, agreement=0.1), recipe)
    assert [f.split(" ")[1] for f in worst] == ["perplexity", "KL", "greedy"]


def test_unset_quality_limits_are_not_checked():
    terrible = _quality(ppl_delta=9.0, kl=9.0, agreement=0.0)
    assert quality_failures(terrible, _recipe()) == []
    for key in LIMITS:  # each limit alone fails only its own figure
        failures = quality_failures(terrible, _recipe(**{key: LIMITS[key]}))
        assert len(failures) == 1 and key in failures[0], (key, failures)


def test_decide_adds_quality_failures_to_the_validation_prompts_and_leaves_them_unchanged():
    validation = _validation(["max |logit error| 2 > 1"])
    verdict = decide(validation, _quality(kl=0.2), _recipe(**LIMITS))
    assert verdict.failures == ["max |logit error| 2 > 1",
                                "held-out KL 0.2 nats/token, over the recipe's max_kl 0.05"]
    assert validation.failures == ["max |logit error| 2 > 1"]  # the validation result is not edited
    assert not verdict.passed and verdict.warnings == []
    assert verdict.basis == "held-out quality and the validation prompt"
    ok = decide(_validation(), _quality(), _recipe(**LIMITS))
    assert ok.passed is True and ok.failures == [] and ok.warnings == []


@pytest.mark.parametrize("passes, limits, warning", [
    (("quantize-int4-rtn",), {}, "recipe 'r' quantizes but held-out quality was not measured: the verdict rests on "
                                 "the validation prompt's wiring check alone (drop --no-measure-quality)"),
    (("quantize-int4-rtn",), LIMITS, "recipe 'r' quantizes but held-out quality was not measured: the verdict rests "
                                     "on the validation prompt's wiring check alone (drop --no-measure-quality)"),
    (("cleanup",), {"max_kl": 0.01}, "recipe 'r' sets held-out limits but held-out quality was not measured: the "
                                     "verdict rests on the validation prompt alone, those limits unchecked (drop "
                                     "--no-measure-quality)"),
    (("cleanup",), {}, None),
])
def test_without_quality_the_verdict_rests_on_the_prompt_and_warns_when_that_leaves_something_unchecked(
        passes, limits, warning):
    verdict = decide(_validation(), None, _recipe(passes, **limits))
    assert verdict.passed and verdict.failures == [] and verdict.basis == "the validation prompt"
    assert verdict.warnings == ([warning] if warning else [])


def test_a_failed_validation_fails_the_verdict_without_quality():
    verdict = decide(_validation(["greedy agreement 50.0% < 90.0%"]), None, _recipe(("cleanup",)))
    assert verdict.failures == ["greedy agreement 50.0% < 90.0%"] and verdict.passed is False
    assert dataclasses.replace(verdict, failures=[]).passed is True
