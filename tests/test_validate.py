"""validate: the compiled graph vs PyTorch through the KV-cache I/O; a wrong graph must fail."""

import numpy as np
import onnx_ir as ir
import pytest

from compiler.recipe import Tolerance
from compiler.measure.validate import validate

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
    from compiler.measure.validate import reference_decode, reference_greedy

    for loaded in (trained, loaded_models["qwen2"]):
        vocab = loaded.model.config.vocab_size
        rng = np.random.default_rng(0)
        prompts = [rng.integers(1, vocab, size=n).tolist() for n in (3, 11, 1, 7)]
        batched = reference_greedy(loaded, prompts, 12)
        assert [len(row) for row in batched] == [12] * 4
        assert batched == [reference_decode(loaded, p, 11)[1] for p in prompts]


# --- compare / judge arithmetic over a scripted executor (milliseconds; what mutation testing runs) ----

def _scripted_reference(perturb: dict[int, np.ndarray], wrong_token_at: int | None = None):
    """A DecodeReference whose logits are the scripted model's plus `perturb[step]`, and whose greedy
    tokens are the scripted model's (one replaced by another token at `wrong_token_at`)."""
    from test_runner_loop import VOCAB, ScriptedExecutor, next_token

    from compiler.runtime.runner import Runner
    from compiler.measure.validate import DecodeReference

    prompt, steps = [2, 7, 1], 3
    tokens = [next_token(prompt)]
    for _ in range(steps):
        tokens.append(next_token(prompt + tokens))
    if wrong_token_at is not None:
        tokens[wrong_token_at] = (tokens[wrong_token_at] + 1) % VOCAB
    exact = Runner(ScriptedExecutor()).teacher_forced(prompt, tokens[:steps])
    logits = [step + perturb.get(i, 0) for i, step in enumerate(exact)]
    return DecodeReference("p", prompt, logits, tokens, steps), ScriptedExecutor


def test_compare_reports_the_errors_and_agreement_it_measured():
    from compiler.measure.validate import compare

    bumps = {0: np.zeros((3, 13)), 2: np.zeros((1, 13))}
    bumps[0][1, 4], bumps[2][0, 9] = -0.25, 0.75  # errors in a prompt row and in a decode step
    reference, executor = _scripted_reference(bumps, wrong_token_at=3)
    loose = Tolerance(max_abs_logit_error=1.0, mean_abs_logit_error=0.1, min_greedy_agreement=0.7)
    result = compare(reference, executor(), loose)
    elements = (3 + 3) * 13  # 3 prompt rows, then one row per decode step
    assert result.max_abs_error == 0.75 and result.mean_abs_error == pytest.approx(1.0 / elements)
    assert result.greedy_agreement == 0.75  # 3 of 4 tokens: the reference's last is not the graph's
    assert result.compiled_tokens[:3] == reference.tokens[:3] and result.compiled_tokens[3] != reference.tokens[3]
    assert result.passed and result.failures == [] and (result.prompt_tokens, result.decode_steps) == (3, 3)
    assert result.prompt == "p" and result.reference_tokens == reference.tokens and result.tolerance == loose
    assert 0 < result.seconds < 60
    strict = compare(reference, executor(), STRICT)
    assert not strict.passed and strict.failures == ["max |logit error| 0.75 > 0.001",
                                                     "mean |logit error| 0.01282 > 0.0001",
                                                     "greedy agreement 75.0% < 100.0%"]


def test_compare_turns_non_finite_logits_into_a_failure():
    from compiler.measure.validate import compare

    reference, executor = _scripted_reference({1: np.full((1, 13), np.nan)})
    result = compare(reference, executor(), Tolerance(1e9, 1e9, 0.0))
    assert np.isnan(result.max_abs_error) and np.isnan(result.mean_abs_error)
    assert result.failures == ["non-finite logits in the compiled graph"] and not result.passed


def test_compare_names_a_graph_it_cannot_run():
    from compiler.errors import BadInputError
    from compiler.measure.validate import compare

    reference, executor = _scripted_reference({})
    with pytest.raises(BadInputError, match=r"^cannot validate the compiled graph: 6 positions needed but the cache holds 5"):
        compare(reference, executor(capacity=5), STRICT)


def test_judge_fails_only_beyond_each_bound():
    from compiler.measure.validate import judge, rejudge

    tol = Tolerance(max_abs_logit_error=0.5, mean_abs_logit_error=0.05, max_rel_logit_error=0.8,
                    min_greedy_agreement=0.9)
    assert judge(0.5, 0.05, 0.8, 0.9, tol) == []  # at the bound passes
    assert judge(0.5001, 0.05, 0.8, 0.9, tol) == ["max |logit error| 0.5001 > 0.5"]
    assert judge(0.5, 0.0501, 0.8, 0.9, tol) == ["mean |logit error| 0.0501 > 0.05"]
    assert judge(0.5, 0.05, 0.8001, 0.9, tol) == [
        "wiring check: relative logit error 0.8 > 0.8 (rms error / std of PyTorch's logits at the worst position; "
        "a graph unrelated to the model measures >= 1)"]
    assert judge(0.5, 0.05, 0.8, 0.899, tol) == ["greedy agreement 89.9% < 90.0%"]
    assert judge(float("inf"), 0.0, 0.0, 1.0, tol)[0] == "non-finite logits in the compiled graph"
    assert judge(0.0, float("nan"), 0.0, 1.0, tol) == ["non-finite logits in the compiled graph"]
    assert judge(0.0, 0.0, float("nan"), 1.0, tol) == ["non-finite logits in the compiled graph"]
    unset = Tolerance(min_greedy_agreement=0.9)  # bounds the recipe leaves out are not checked
    assert judge(1e9, 1e9, 1e9, 0.9, unset) == []
    reference, executor = _scripted_reference({})
    from compiler.measure.validate import compare

    passed = compare(reference, executor(), tol)
    failed = rejudge(passed, Tolerance(max_abs_logit_error=-1.0, mean_abs_logit_error=0.05, min_greedy_agreement=0.9))
    assert passed.passed is True and failed.passed is False and failed.tolerance.max_abs_logit_error == -1.0
    assert failed.failures == ["max |logit error| 0 > -1"] and failed.max_abs_error == passed.max_abs_error


def test_relative_errors_equal_a_hand_computed_case_and_floor_a_flat_reference():
    """rms(compiled - reference) / std(reference) per position; a reference with no spread (std 0) divides by
    1e-12, so any error there reads as enormous rather than as a division by zero."""
    from compiler.measure.validate import relative_errors

    reference = np.array([[1.0, -1.0, 1.0, -1.0], [0.02, 0.0, 0.02, 0.0], [3.0, 3.0, 3.0, 3.0]])
    compiled = reference + np.array([[0.5, -0.5, 0.5, -0.5], [0.003, 0.004, 0.003, 0.004], [0.0, 0.0, 0.0, 2.0**-20]])
    # std: 1, 0.01, 0; rms error: 0.5, sqrt((0.003^2 + 0.004^2) / 2) = 0.0035355, 2^-20 / 2 (exact in float32)
    np.testing.assert_allclose(relative_errors(compiled.astype(np.float32), reference),
                               [0.5, 0.35355339, 2.0**-21 / 1e-12], rtol=1e-5)
