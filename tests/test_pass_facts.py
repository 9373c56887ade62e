"""What each pass declares about itself (passes/base.py) is what the driver acts on: which recipes
calibrate, which need TensorRT plugin layers, which write quantized weights (the report's precision map,
the quality stage), and how far the per-pass check lets the logits move. The expectations below are the
passes' documented behaviour (README's pass table), not a copy of their attributes."""

from __future__ import annotations

import pytest

from passes import REGISTRY, LlmcPass, PassContext, make_pass, needs_calibration, needs_plugins, pass_class, \
    quantizes
from compiler.recipe import load_recipe
from passes.base import EXACT

CALIBRATING = {"quantize-int4-awq", "quantize-int4-gptq", "quantize-fp8", "quantize-int8-sq"}  # AWQ's scales; GPTQ's
# Hessian; the W8A8 passes' activation scales (and SmoothQuant's)
PLUGINS = {"attention-plugin", "attention-plugin-fp8kv"}  # write llmc:: custom-domain nodes
FORMATS = {"quantize-int4-rtn": "int4-rtn", "quantize-int4-awq": "int4-awq", "quantize-int4-gptq": "int4-gptq",
           "quantize-int8-wo": "int8", "quantize-int8-embedding": "int8", "quantize-int4-embedding": "int4-rtn",
           "quantize-fp8-wo": "fp8", "quantize-fp8": "fp8-w8a8", "quantize-int8-sq": "int8-sq"}
EXACT_REWRITES = {"gqa-native-attention", "kv-cache-scatter", "rotary-2d-cache"}  # re-association at most


def test_every_pass_declares_what_it_does():
    assert {n for n, c in REGISTRY.items() if c.needs_calibration} == CALIBRATING
    assert {n for n, c in REGISTRY.items() if c.needs_plugins} == PLUGINS
    assert {n: c.weight_format for n, c in REGISTRY.items() if c.weight_format} == FORMATS
    assert {n for n, c in REGISTRY.items() if c.check_tolerance == EXACT} == EXACT_REWRITES
    for name, cls in REGISTRY.items():
        max_diff, agreement = cls.check_tolerance
        assert 0 < max_diff <= 3.0 and 0.5 <= agreement <= 1.0, name


def test_a_pass_that_declares_nothing_gets_the_safe_defaults():
    """A test's own pass (or a new one) neither calibrates, needs plugins nor counts as quantizing, and
    is checked as an exact rewrite: the strictest tolerance, so an undeclared lowering fails loudly."""
    cls = pass_class("not-registered")
    assert cls is LlmcPass
    assert (cls.needs_calibration, cls.needs_plugins, cls.weight_format) == (False, False, None)
    assert cls.check_tolerance == EXACT == (1e-3, 1.0)
    assert not needs_calibration(["not-registered", "cleanup"]) and not needs_plugins(["cleanup"])
    assert not quantizes(["cleanup", "cast-fp16"])


@pytest.mark.parametrize("recipe, calibrates, plugins, quantizing", [
    ("fp16", False, False, False), ("int4-rtn", False, False, True), ("int4-awq", True, False, True),
    ("int4-gptq", True, False, True), ("fp16-plugin", False, True, False), ("int8-wo", False, False, True),
    ("fp8", True, False, True), ("int8-sq", True, False, True)])
def test_recipes_get_their_facts_from_their_passes(recipe, calibrates, plugins, quantizing):
    passes = load_recipe(recipe).passes
    assert (needs_calibration(passes), needs_plugins(passes), quantizes(passes)) == (calibrates, plugins, quantizing)


def test_from_context_passes_the_recipe_options_to_the_class():
    class Recorder(LlmcPass):
        def __init__(self, alpha: int = 0, beta: str = ""):
            super().__init__()
            self.alpha, self.beta = alpha, beta

        def call(self, model):  # pragma: no cover - never run here
            raise AssertionError

    made = Recorder.from_context(PassContext(max_positions=64), alpha=3, beta="x")
    assert isinstance(made, Recorder) and (made.alpha, made.beta) == (3, "x")
    with pytest.raises(TypeError, match="pass 'cleanup': bad option"):
        make_pass("cleanup", PassContext(max_positions=64), {"no_such_option": 1})
