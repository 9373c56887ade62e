"""The accuracy verdict (compiler/measure/verdict.py): a quantizing build is decided on held-out quality; the
validation prompt is a wiring check relative to the logits' spread, which a broken graph cannot pass.

Measured on the shipped trained model with INT4-RTN (block 128), the recipe int4-rtn's quantizer.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from compiler.frontend.corpus import default_eval_text
from compiler.errors import BadInputError
from compiler.measure.quality import measure_quality
from compiler.recipe import load_recipe, parse_recipe
from compiler.runtime.onnx_executor import OnnxRuntimeExecutor
from compiler.recipe import Tolerance
from compiler.measure.validate import compare, decode_reference, judge, relative_errors
from compiler.measure.verdict import decide

OLD_INT4_TOLERANCE = Tolerance(max_abs_logit_error=3.0, mean_abs_logit_error=0.5, min_greedy_agreement=0.5)
LOGIT_SCALE = 3.0  # lm_head x3: the same trained model with three times its logit spread


def _initializer(model: ir.Model, name: str) -> ir.Value:
    return next(v for k, v in model.graph.initializers.items() if k == name)


def lm_head_weight(path) -> str:
    """The initializer the logits are a MatMul of (through any Cast): FP16, lm_head is not quantized."""
    model = ir.load(path)
    node = next(o for o in model.graph.outputs if o.name == "logits").producer()
    while node.op_type == "Cast":
        node = node.inputs[0].producer()
    assert node.op_type == "MatMul" and node.inputs[1].is_initializer()
    return node.inputs[1].name


def embedding_table(path) -> str:
    """The Gather of input_ids: the token embedding table."""
    model = ir.load(path)
    ids = next(i for i in model.graph.inputs if i.name == "input_ids")
    gather = next(use for use, _ in ids.uses() if use.op_type == "Gather")
    return gather.inputs[0].name


def _edited(source, path, name: str, edit) -> Path:
    model = ir.load(source)
    value = _initializer(model, name)
    value.const_value = ir.tensor(edit(value.const_value.numpy().copy()), name=name)
    ir.save(model, path)
    return path


def _measure(loaded, onnx_path, recipe, **quality_options):
    """What the build's validate and quality stages measure (by default its 16 windows and 4 x 64 tokens)."""
    result = compare(decode_reference(loaded), OnnxRuntimeExecutor(onnx_path, arena=False), recipe.tolerance)
    return result, measure_quality(loaded, onnx_path, default_eval_text(), **quality_options)


@pytest.fixture(scope="module")
def int4(trained_quantized):
    return trained_quantized("quantize-int4-rtn")


@pytest.fixture(scope="module")
def scaled(trained, int4, tmp_path_factory):
    """The trained model and its INT4 graph with lm_head x LOGIT_SCALE on both sides (PyTorch and ONNX)."""
    model = copy.deepcopy(trained.model)
    model.lm_head.weight.data.mul_(LOGIT_SCALE)
    path = _edited(int4, tmp_path_factory.mktemp("scaled") / "model.onnx", lm_head_weight(int4),
                   lambda w: (w.astype(np.float32) * LOGIT_SCALE).astype(w.dtype))
    loaded = dataclasses.replace(trained, model=model)
    return loaded, path, _measure(loaded, path, load_recipe("int4-rtn"))


def test_int4_within_budget_passes_though_one_logit_moved_more_than_the_old_bound(scaled):
    recipe = load_recipe("int4-rtn")
    _, _, (result, quality) = scaled
    # The old absolute wiring bound fails this build on its largest single-logit error ...
    assert result.max_abs_error > OLD_INT4_TOLERANCE.max_abs_logit_error
    assert any("max |logit error|" in f for f in judge(result.max_abs_error, result.mean_abs_error,
                                                       result.max_rel_error, result.greedy_agreement,
                                                       OLD_INT4_TOLERANCE))
    # ... while what a user gets is within the recipe's budget, and the verdict follows that.
    assert quality.ppl_delta <= recipe.max_ppl_delta and quality.kl_mean <= recipe.max_kl
    verdict = decide(result, quality, recipe)
    assert verdict.passed, verdict.failures
    assert verdict.basis.startswith("held-out quality")
    # The scale does not move the relative error: it is INT4's, not the logits' size.
    assert result.max_rel_error < 0.5


def test_int4_passes_its_budget_and_fails_a_tighter_one_naming_the_figure(trained, int4):
    """The trained model's INT4-RTN graph costs about +1% perplexity: inside int4-rtn's 15%, over 0.5%."""
    recipe = load_recipe("int4-rtn")
    result, quality = _measure(trained, int4, recipe)
    assert 0.005 < quality.ppl_delta <= recipe.max_ppl_delta
    assert decide(result, quality, recipe).passed
    verdict = decide(result, quality, dataclasses.replace(recipe, max_ppl_delta=0.005))
    assert not verdict.passed and len(verdict.failures) == 1
    assert verdict.failures[0] == (f"held-out perplexity rose {quality.ppl_delta:.2%} "
                                   f"({quality.reference_perplexity:.3f} -> {quality.compiled_perplexity:.3f}), "
                                   "over the recipe's max_ppl_delta 0.50%")


def test_a_broken_graph_fails_the_wiring_check_and_every_quality_floor(trained, int4, tmp_path):
    """Embedding rows permuted: every layer is right, the graph reads the wrong token vectors."""
    recipe = load_recipe("int4-rtn")
    perm = np.random.default_rng(0).permutation(trained.spec.vocab_size)
    broken = _edited(int4, tmp_path / "broken.onnx", embedding_table(int4), lambda w: w[perm])
    result, quality = _measure(trained, broken, recipe, max_windows=4, new_tokens=16)
    assert result.max_rel_error > 1  # no better than logits unrelated to the model's
    assert any(f.startswith("wiring check: relative logit error") for f in result.failures)
    failures = decide(result, quality, recipe).failures
    for what in ("held-out perplexity rose", "held-out KL", "held-out greedy agreement"):
        assert any(f.startswith(what) for f in failures), (what, failures)


def test_relative_error_is_scale_free_and_at_least_one_for_unrelated_logits():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((20, 1000)) * 4
    close = ref + 0.3 * rng.standard_normal(ref.shape)
    np.testing.assert_allclose(relative_errors(7 * close, 7 * ref), relative_errors(close, ref))
    for scale in (0.01, 0.3, 1.0, 5.0):  # unrelated logits of any scale (the optimum is 0 * ref: exactly 1)
        assert relative_errors(scale * rng.standard_normal(ref.shape), ref).min() >= 0.99


def test_quantizing_build_without_quality_is_judged_on_wiring_alone_and_says_so(scaled):
    recipe = load_recipe("int4-rtn")
    _, _, (result, _) = scaled
    verdict = decide(result, None, recipe)
    assert verdict.passed and verdict.basis == "the validation prompt"
    assert len(verdict.warnings) == 1 and "--no-measure-quality" in verdict.warnings[0]
    assert decide(result, None, load_recipe("fp16")).warnings == []  # fp16 does not quantize


def test_held_out_limits_of_a_recipe_that_does_not_quantize_are_measured_or_warned(scaled, tmp_path):
    """A recipe that sets max_kl (or another held-out limit) gets the quality stage even if it does not
    quantize; without it (--no-measure-quality) the verdict says the limit went unchecked."""
    from compiler.driver.build import BuildRequest, read_texts

    recipe = _recipe("tolerance: {max_abs_logit_error: 0.1, min_greedy_agreement: 0.9}\nmax_kl: 0.01\n")
    assert not recipe.quantizes and recipe.quality_limits
    request = BuildRequest(model=tmp_path, output=tmp_path / "out")
    assert read_texts(request, recipe).evaluation is not None
    assert read_texts(request, load_recipe("fp16")).evaluation is None
    _, _, (result, _) = scaled
    warnings = decide(result, None, recipe).warnings
    assert len(warnings) == 1 and "those limits unchecked" in warnings[0]


def test_quality_window_is_reported_and_cut_to_the_graph(trained, int4):
    """The graph holds --max-seq positions (KV cache, rotary table): a shorter one cuts the window."""
    full = measure_quality(trained, int4, default_eval_text(), max_windows=4, new_tokens=4)
    assert (full.window, full.windows, full.window_cut_to_max_seq) == (128, 4, False)
    cut = measure_quality(trained, int4, default_eval_text(), capacity=64, max_windows=4, new_tokens=4)
    assert (cut.window, cut.windows, cut.window_cut_to_max_seq) == (64, 4, True)
    assert cut.eval_tokens == 4 * 63


def _recipe(text: str):
    return parse_recipe("name: x\npasses: [cleanup]\n" + text, Path("r.yaml"))


def test_recipe_quality_limits_and_relative_tolerance_parse():
    r = _recipe("tolerance: {max_rel_logit_error: 0.8, min_greedy_agreement: 0.5}\nmax_kl: 0.5\n"
                "min_heldout_agreement: 0.7\n")
    assert r.tolerance == Tolerance(min_greedy_agreement=0.5, max_rel_logit_error=0.8)
    assert (r.max_kl, r.min_heldout_agreement, r.max_ppl_delta) == (0.5, 0.7, None)
    with pytest.raises(BadInputError, match="r.yaml:4: tolerance needs min_greedy_agreement and at least one of"):
        _recipe("tolerance:\n  min_greedy_agreement: 0.5\n")
    with pytest.raises(BadInputError, match=r"r.yaml:4: max_kl must be in \[0, "):
        _recipe("tolerance: {max_rel_logit_error: 0.8, min_greedy_agreement: 0.5}\nmax_kl: -1\n")
