"""The generation runner over the final graph vs Hugging Face `generate` (PyTorch FP32)."""

import copy

import numpy as np
import pytest
import torch

from compiler.runtime.runner import Runner, Sampling
from compiler.runtime.onnx_executor import OnnxRuntimeExecutor

PROMPTS = ["The compiler reads", "Once upon a time there was a small model that wanted", "one, two"]
NEW_TOKENS = 64


def hf_greedy(loaded, prompt_ids, new_tokens):
    cfg = copy.deepcopy(loaded.model.generation_config)
    cfg.eos_token_id = []  # generate exactly `new_tokens`, as the runner does without stop tokens (None falls back to eos)
    cfg.pad_token_id = loaded.tokenizer.pad_token_id
    with torch.no_grad():
        out = loaded.model.generate(torch.tensor([prompt_ids]), generation_config=cfg,
                                    max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_greedy_batch_of_unequal_prompts_equals_hf_generate(arch, loaded_models, final_fp32):
    loaded = loaded_models[arch]
    ids = [loaded.tokenizer(p).input_ids for p in PROMPTS]
    assert len({len(i) for i in ids}) == 3  # three different lengths, one batch
    runner = Runner(OnnxRuntimeExecutor(final_fp32(arch)), pad_token_id=loaded.tokenizer.pad_token_id)
    got = runner.generate(ids, NEW_TOKENS)
    for prompt_ids, tokens in zip(ids, got.tokens):
        assert tokens == hf_greedy(loaded, prompt_ids, NEW_TOKENS)
    assert got.steps == NEW_TOKENS and got.time_to_first_token_s > 0


@pytest.mark.parametrize("at", [3, 0], ids=["decode-step", "first-new-token"])
def test_stop_tokens_end_each_sequence_on_its_own(loaded_models, final_fp32, at):
    """A stop token the second sequence emits at new token `at` ends that sequence there and no other;
    the first new token comes from prefill, outside the decode loop: a stop there counts too."""
    loaded = loaded_models["llama"]
    ids = [loaded.tokenizer(p).input_ids for p in PROMPTS]
    runner = Runner(OnnxRuntimeExecutor(final_fp32("llama")))
    free = runner.generate(ids, 12).tokens
    stop = free[1][at]
    stopped = runner.generate(ids, 12, stop_tokens=(stop,)).tokens
    assert stopped[1] == free[1][: free[1].index(stop) + 1]
    for full, cut in zip(free, stopped):
        assert cut == (full[: full.index(stop) + 1] if stop in full else full)


def test_stream_yields_each_step_as_it_is_decoded(loaded_models, final_fp32):
    """What servers stream: one entry per step, None for a sequence that has stopped."""
    loaded = loaded_models["llama"]
    ids = [loaded.tokenizer(p).input_ids for p in PROMPTS]
    runner = Runner(OnnxRuntimeExecutor(final_fp32("llama")))
    free = runner.generate(ids, 10).tokens
    stop = free[1][2]
    expected = runner.generate(ids, 10, stop_tokens=(stop,))
    steps = list(runner.stream(ids, 10, stop_tokens=(stop,)))
    assert len(steps) == expected.steps
    for b, tokens in enumerate(expected.tokens):
        column = [step[b] for step in steps]
        assert [t for t in column if t is not None] == tokens
        assert all(t is None for t in column[len(tokens):])  # nothing after a sequence stopped
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        next(runner.stream(ids, 0))


def test_sampling_is_seeded_and_respects_top_k(loaded_models, final_fp32):
    loaded = loaded_models["llama"]
    ids = [loaded.tokenizer(PROMPTS[0]).input_ids]
    runner = Runner(OnnxRuntimeExecutor(final_fp32("llama")))
    a = runner.generate(ids, 16, Sampling(temperature=1.0, top_k=5, seed=7)).tokens
    b = runner.generate(ids, 16, Sampling(temperature=1.0, top_k=5, seed=7)).tokens
    c = runner.generate(ids, 16, Sampling(temperature=1.0, top_k=5, seed=8)).tokens
    assert a == b and a != c
    top1 = runner.generate(ids, 16, Sampling(temperature=1.0, top_k=1, seed=3)).tokens
    assert top1 == runner.generate(ids, 16).tokens  # top-1 sampling is greedy


def test_cache_capacity_boundary(final_fp32):
    runner = Runner(OnnxRuntimeExecutor(final_fp32("llama")))
    # 65 prompt tokens + 64 new: positions 0..127 are written, the 64th new token is never fed back.
    assert len(runner.generate([[1] * 65], 64).tokens[0]) == 64
    with pytest.raises(ValueError, match="129 positions needed but the cache holds 128"):
        runner.generate([[1] * 66], 64)
    with pytest.raises(ValueError, match="max_new_tokens"):
        runner.generate([[1]], 0)


def test_concat_cache_graph_is_refused_with_the_fix(llama_export):
    path, _ = llama_export
    with pytest.raises(ValueError, match="kv-cache-scatter"):
        Runner(OnnxRuntimeExecutor(path)).generate([[1, 2]], 2)


def test_fp16_graph_leaves_hf_greedy_only_at_near_ties(llama, final_fp16_llama):
    """FP16 rounding (~1e-2 on these logits) may flip a greedy choice only where FP32's top-2 margin is smaller."""
    from compiler.recipe import load_recipe

    budget = load_recipe("fp16").tolerance.max_abs_logit_error
    ids = [llama.tokenizer(p).input_ids for p in PROMPTS]
    runner = Runner(OnnxRuntimeExecutor(final_fp16_llama), pad_token_id=llama.tokenizer.pad_token_id)
    got = runner.generate(ids, NEW_TOKENS).tokens
    agree = 0
    for prompt_ids, tokens in zip(ids, got):
        ref = hf_greedy(llama, prompt_ids, NEW_TOKENS)
        first = next((i for i, (a, b) in enumerate(zip(ref, tokens)) if a != b), None)
        agree += NEW_TOKENS if first is None else first
        if first is not None:
            with torch.no_grad():
                logits = llama.model(torch.tensor([prompt_ids + ref[:first]])).logits[0, -1]
            top2 = torch.topk(logits, 2).values
            assert float(top2[0] - top2[1]) < budget, f"divergence at step {first} without a near-tie"
            assert tokens[first] in torch.topk(logits, 2).indices.tolist()
    assert agree >= NEW_TOKENS  # at least one prompt's worth of identical tokens before any tie


def test_without_the_memory_arena_the_numbers_are_the_same(final_fp32):
    """arena=False (a build's checks) sets the session's option and changes no logit: the arena is
    where intermediates live between runs, not how they are computed."""
    ids = np.array([[5, 9, 2, 7, 1, 3]], np.int64)
    outs = []
    for arena in (True, False):
        ex = OnnxRuntimeExecutor(final_fp32("llama"), arena=arena)
        assert ex.session.get_session_options().enable_cpu_mem_arena is arena
        ex.start(1)
        prefill = ex.step(ids, np.arange(ids.shape[1])[None])
        outs.append((prefill, ex.step(np.array([[4]]), np.array([[ids.shape[1]]]))))
    assert all(np.array_equal(a, b) for a, b in zip(*outs))
