"""validate: the compiled graph vs PyTorch through the KV-cache I/O; a wrong graph must fail."""

import numpy as np
import onnx_ir as ir

from compiler.types import Tolerance
from compiler.validate import validate

STRICT = Tolerance(max_abs_logit_error=1e-3, mean_abs_logit_error=1e-4, min_greedy_agreement=1.0)


def test_fp32_final_graph_matches_reference(llama, final_fp32):
    result = validate(llama, final_fp32("llama"), STRICT, decode_steps=16)
    assert result.passed, result.failures
    assert len(result.reference_tokens) == 17 and result.compiled_tokens == result.reference_tokens
    assert result.max_abs_error < 1e-3


def test_corrupted_graph_is_caught(llama, final_fp32, tmp_path):
    model = ir.load(final_fp32("llama"))
    # Perturb one decoder weight a little: the kind of silent damage a bad pass would do.
    weights = [n.inputs[1] for n in model.graph if n.op_type == "MatMul" and n.inputs[1].is_initializer()]
    init = weights[len(weights) // 2]  # a projection in the middle of the network
    name = init.name
    arr = init.const_value.numpy().copy()
    arr *= 1.5
    init.const_value = ir.tensor(arr, name=name)
    bad = tmp_path / "bad.onnx"
    ir.save(model, bad)
    result = validate(llama, bad, STRICT, decode_steps=4)
    assert not result.passed
    assert any("max |logit error|" in f for f in result.failures)
    assert np.isfinite(result.max_abs_error) and result.max_abs_error > 1e-3


def test_prompt_longer_than_graph_positions_is_bad_input(llama, final_fp32):
    import pytest

    from compiler.errors import BadInputError

    with pytest.raises(BadInputError, match="--max-seq"):
        validate(llama, final_fp32("llama"), STRICT, decode_steps=16, max_positions=8)


def test_batched_greedy_reference_equals_one_prompt_at_a_time(loaded_models, trained):
    """Left padding, the mask and explicit positions make each row decode exactly its own prompt."""
    from compiler.validate import reference_decode, reference_greedy

    for loaded in (trained, loaded_models["qwen2"]):
        vocab = loaded.model.config.vocab_size
        rng = np.random.default_rng(0)
        prompts = [rng.integers(1, vocab, size=n).tolist() for n in (3, 11, 1, 7)]
        batched = reference_greedy(loaded, prompts, 12)
        assert [len(row) for row in batched] == [12] * 4
        assert batched == [reference_decode(loaded, p, 11)[1] for p in prompts]
