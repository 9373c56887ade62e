"""The build's verdict: which measurements make a build pass (exit 0) or fail (exit 5).

Why a policy and not one check: the validation prompt (compiler/measure/validate.py) compares a dozen
positions, which says whether a graph is *wired* right; only held-out text (compiler/measure/quality.py, a
few thousand tokens) says what quantization cost. An absolute logit bound on one prompt failed a
real 135M INT4 build whose held-out perplexity rose 5.95% (inside its 10% budget) because one logit
moved by 4.6, and a broken graph could pass it on a lucky prompt. So:

- every build: the validation prompt within the recipe's `tolerance`. FP16 recipes bound the
  absolute error (the graph equals PyTorch up to FP16 rounding). Quantizing recipes bound the error
  relative to the reference logits' spread: a wiring check that a graph unrelated to the model
  cannot pass (it measures >= 1), while a quantized graph of a real model measures well under it;
- when the quality stage ran: held-out perplexity delta <= `max_ppl_delta`, mean KL <= `max_kl`,
  held-out greedy agreement >= `min_heldout_agreement` (each where the recipe sets it). For a
  quantizing recipe these decide: they measure the accuracy a user gets.

A quantizing build without the quality stage (`--no-measure-quality`) is judged on the wiring check
alone, and says so in its warnings.
"""

from __future__ import annotations

import dataclasses

from compiler.recipe import Recipe
from compiler.measure.validate import ValidationResult

POLICY = ("Pass/fail: the validation prompt vs PyTorch FP32 within the recipe's tolerance (quantizing recipes: "
          "a wiring check, the logit error relative to PyTorch's logit spread, which a graph unrelated to the model "
          "cannot pass) and, when held-out quality is measured, its perplexity delta, KL and greedy agreement within "
          "the recipe's max_ppl_delta / max_kl / min_heldout_agreement. For a quantizing recipe the held-out figures "
          "decide; one prompt's largest logit error does not.")


@dataclasses.dataclass
class Verdict:
    failures: list[str]
    basis: str  # what decided the verdict, for report.json and the card
    warnings: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures


def quality_failures(quality, recipe: Recipe) -> list[str]:
    """The held-out figures (a quality.QualityResult) against the recipe's quality limits."""
    failures = []
    if recipe.max_ppl_delta is not None and quality.ppl_delta > recipe.max_ppl_delta:
        failures.append(
            f"held-out perplexity rose {quality.ppl_delta:.2%} ({quality.reference_perplexity:.3f} -> "
            f"{quality.compiled_perplexity:.3f}), over the recipe's max_ppl_delta {recipe.max_ppl_delta:.2%}")
    if recipe.max_kl is not None and quality.kl_mean > recipe.max_kl:
        failures.append(f"held-out KL {quality.kl_mean:.4g} nats/token, over the recipe's max_kl {recipe.max_kl:g}")
    if recipe.min_heldout_agreement is not None and quality.greedy_agreement < recipe.min_heldout_agreement:
        failures.append(f"held-out greedy agreement {quality.greedy_agreement:.1%} over {quality.agreement_tokens} "
                        f"tokens, under the recipe's min_heldout_agreement {recipe.min_heldout_agreement:.1%}")
    return failures


def decide(validation: ValidationResult, quality, recipe: Recipe) -> Verdict:
    """`quality`: the quality stage's QualityResult, or None when it did not run."""
    failures = list(validation.failures)
    warnings = []
    if quality is not None:
        failures += quality_failures(quality, recipe)
        basis = "held-out quality and the validation prompt"
    else:
        basis = "the validation prompt"
        if recipe.quantizes or recipe.quality_limits:
            why, rest = (("quantizes", "the validation prompt's wiring check alone") if recipe.quantizes
                         else ("sets held-out limits", "the validation prompt alone, those limits unchecked"))
            warnings.append(f"recipe '{recipe.name}' {why} but held-out quality was not measured: the verdict "
                            f"rests on {rest} (drop --no-measure-quality)")
    return Verdict(failures, basis, warnings)
