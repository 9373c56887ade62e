"""Speculative decoding changes how many target steps generation takes, never what it generates.

Greedy: token-for-token equality with plain greedy on real graphs (the bundled trained model's fp16
graph, the tiny Llama / Qwen2 / Mistral), with proposals all rejected, all accepted, per row in a
batch, across a stop token and up to the cache capacity. Sampling: the rejection rule's output
distribution is the target's (chi-square against exact probabilities), and a wrong rule fails it.
The exact distributions come from `PrefixModel`, a stand-in executor with the graph's cache
contract (slot p holds position p; a query at position p reads slots 0..p), whose logits are a
hash of everything it reads, so a stale or missing slot changes them.
"""

from __future__ import annotations

import itertools
import math
import shutil
import zlib

import numpy as np
import pytest
from click.testing import CliRunner

from compiler.runtime import speculative
from compiler.commands.cli import main
from compiler.frontend.default_model import default_model_dir
from compiler.runtime.proposers import DraftProposer, NgramProposer, Proposal
from compiler.runtime.runner import Runner, Sampling, distribution
from compiler.runtime.onnx_executor import OnnxRuntimeExecutor
from compiler.runtime.speculative import SpeculativeRunner, verify_greedy, verify_sampled
from compiler.graph_io import GraphIO


# --- a stand-in executor with exact, enumerable distributions -------------------------------------

class PrefixModel:
    """Executor whose next-token logits at position p are a seeded hash of cache slots 0..p.

    It refuses what the real graph cannot do: non-consecutive positions in a row, a write past the
    capacity, a read of a slot never written."""

    name = "prefix-model"

    def __init__(self, vocab: int = 4, capacity: int = 32, seed: int = 0, scale: float = 1.5, order: int | None = None):
        self.io = GraphIO(num_layers=1, num_kv_heads=1, head_dim=1, vocab_size=vocab, capacity=capacity)
        self.seed, self.scale, self.order = seed, scale, order
        self.slots = np.zeros((0, capacity), np.int64)
        self.steps = 0

    def logits_after(self, prefix) -> np.ndarray:
        """Logits of the token after `prefix` (its last `order` tokens, or all of it)."""
        key = tuple(int(t) for t in (prefix[-self.order:] if self.order else prefix))
        seed = zlib.crc32(np.array([self.seed, len(key) if not self.order else 0, *key], np.int64).tobytes())
        return self.scale * np.random.default_rng(seed).standard_normal(self.io.vocab_size)

    def start(self, batch: int) -> None:
        self.slots = np.full((batch, self.io.capacity), -1, np.int64)

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        self.steps += 1
        batch, width = input_ids.shape
        assert (position_ids == position_ids[:, :1] + np.arange(width)).all(), "a row's positions must be consecutive"
        if (position_ids[:, 0] + width > self.io.capacity).any():
            raise IndexError("write past the cache capacity")
        out = np.zeros((batch, width, self.io.vocab_size), np.float32)
        for b in range(batch):
            start = position_ids[b, 0]
            self.slots[b, start:start + width] = input_ids[b]
            for i in range(width):
                seen = self.slots[b, : start + i + 1]
                assert (seen >= 0).all(), "read a cache slot that was never written"
                out[b, i] = self.logits_after(seen)
        return out


def chi2_bound(df: int, z: float = 3.090) -> float:
    """The chi-square quantile at 1 - 1e-3 (z = 3.090), Wilson-Hilferty: within 0.5% for df >= 10."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def exact_probabilities(model: PrefixModel, prompt: list[int], length: int, sampling: Sampling) -> dict:
    """P(first `length` new tokens) under plain sampling from `model`."""
    vocab = model.io.vocab_size
    probs = {}
    for seq in itertools.product(range(vocab), repeat=length):
        p = 1.0
        for i, t in enumerate(seq):
            p *= distribution(model.logits_after([*prompt, *seq[:i]]), sampling)[t]
        probs[seq] = p
    return probs


def chi2_statistic(samples: list[tuple], probs: dict) -> float:
    counts = {seq: 0 for seq in probs}
    for s in samples:
        counts[s] += 1
    n = len(samples)
    return sum((counts[s] - n * p) ** 2 / (n * p) for s, p in probs.items())


SAMPLING = Sampling(temperature=1.0)
SAMPLE_PROMPT = [0, 1, 2, 0, 1]  # the last bigram occurred before: the n-gram proposer proposes


def sampled_runs(make_proposer, runs: int = 16, batch: int = 400, new: int = 3):
    """runs x batch seeded speculative generations of `new` tokens from SAMPLE_PROMPT (k = 2)."""
    samples, accepted, proposed = [], 0, 0
    for seed in range(runs):
        spec = SpeculativeRunner(Runner(PrefixModel(seed=1)), make_proposer(), num_draft_tokens=2)
        got = spec.generate([SAMPLE_PROMPT] * batch, new, Sampling(temperature=1.0, seed=seed))
        samples += [tuple(t) for t in got.tokens]
        accepted, proposed = accepted + got.accepted, proposed + got.proposed
    return samples, accepted, proposed


PROPOSERS = {
    "draft": lambda: DraftProposer(PrefixModel(seed=2)),  # another model: q differs from p
    "ngram": lambda: NgramProposer(),  # deterministic: q one-hot
}


@pytest.mark.parametrize("proposer", sorted(PROPOSERS))
def test_rejection_sampling_keeps_the_target_distribution(proposer):
    """6400 sampled 3-token continuations vs the exact plain-sampling probabilities of all 64: the
    chi-square statistic stays under its 0.999 quantile (df 63: ~103.5), with the seeds fixed."""
    probs = exact_probabilities(PrefixModel(seed=1), SAMPLE_PROMPT, 3, SAMPLING)
    samples, accepted, proposed = sampled_runs(PROPOSERS[proposer])
    assert 0.1 * proposed < accepted < 0.9 * proposed  # both branches of the rule ran, many times
    assert chi2_statistic(samples, probs) < chi2_bound(len(probs) - 1)


P_EXPLICIT = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
Q_EXPLICIT = np.array([0.1, 0.1, 0.2, 0.3, 0.3])


def explicit_draws(n: int = 20000, seed: int = 0) -> np.ndarray:
    """Counts of the first emitted token when a proposal x ~ q meets a target whose p is P_EXPLICIT."""
    rng = np.random.default_rng(seed)
    logits = np.log(np.stack([P_EXPLICIT, P_EXPLICIT])).astype(np.float32)
    counts = np.zeros(P_EXPLICIT.size)
    for x in rng.choice(Q_EXPLICIT.size, size=n, p=Q_EXPLICIT):
        counts[verify_sampled(Proposal([int(x)], Q_EXPLICIT[None]), logits, SAMPLING, rng)[1][0]] += 1
    return counts


def test_rejection_rule_on_explicit_distributions(monkeypatch):
    """p and q far apart (q puts 60% where p has 15%): 20000 draws x ~ q through the rule are distributed
    as p (chi-square, df 4, under its 0.999 quantile 18.47); resampling from p instead of (p - q)+ is not."""
    n, bound = 20000, 18.47

    def chi2(counts):
        return float(((counts - n * P_EXPLICIT) ** 2 / (n * P_EXPLICIT)).sum())

    assert chi2(explicit_draws(n)) < bound
    monkeypatch.setattr(speculative, "residual", lambda p, q: p)
    assert chi2(explicit_draws(n)) > 10 * bound


WRONG_RULES = {
    "resample from p instead of (p - q)+": ("residual", lambda p, q: p),
    "accept with min(1, q/p)": ("accept_probability", lambda p_x, q_x: min(1.0, q_x / p_x)),
}


@pytest.mark.parametrize("rule", sorted(WRONG_RULES))
def test_a_wrong_rule_fails_the_same_test(rule, monkeypatch):
    """The test above has the power to see a verifier bug: each classic mistake moves the statistic far past the bound."""
    name, wrong = WRONG_RULES[rule]
    monkeypatch.setattr(speculative, name, wrong)
    probs = exact_probabilities(PrefixModel(seed=1), SAMPLE_PROMPT, 3, SAMPLING)
    samples, _, _ = sampled_runs(PROPOSERS["draft"])
    assert chi2_statistic(samples, probs) > 2 * chi2_bound(len(probs) - 1)


def test_verify_rules_on_explicit_rows():
    logits = np.array([[0, 5, 0], [0, 0, 5], [5, 0, 0], [0, 5, 0]], np.float32)  # argmax 1, 2, 0, 1
    assert verify_greedy([1, 2, 0], logits) == (3, [1, 2, 0, 1])  # all kept + the bonus token
    assert verify_greedy([1, 0, 0], logits) == (1, [1, 2])  # the correction replaces the first miss
    assert verify_greedy([], logits) == (0, [1])
    rng = np.random.default_rng(0)
    # q = p exactly: every proposal is kept (min(1, p/q) = 1), whatever p is
    proposal = Proposal([2, 0], np.stack([distribution(logits[i], SAMPLING) for i in range(2)]))
    assert verify_sampled(proposal, logits, SAMPLING, rng)[0] == 2
    # a one-hot proposal the target gives ~0 probability is rejected and never re-drawn
    sharp = np.array([[0, 40, 0], [0, 40, 0]], np.float32)
    for _ in range(50):
        accepted, tokens = verify_sampled(Proposal([0]), sharp, SAMPLING, rng)
        assert accepted == 0 and tokens == [1]


def test_ngram_lookup_prefers_the_longest_then_the_most_recent_match():
    ngram = NgramProposer(max_n=3)
    assert ngram.lookup([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 3) == [7, 1, 2]  # latest [1 2 3], not the first
    assert ngram.lookup([5, 2, 3, 8, 6, 3, 4, 2, 3], 2) == [8, 6]  # [2 3] beats the later 1-gram [3]
    assert ngram.lookup([4, 1, 2, 8, 2], 3) == [8, 2]  # only a 1-gram matches; the proposal stops at the end
    assert ngram.lookup([1, 2, 3], 2) == [] and ngram.lookup([7], 2) == []


@pytest.mark.parametrize("order", [None, 2])
@pytest.mark.parametrize("proposer", sorted(PROPOSERS))
def test_greedy_stand_in_equals_plain_in_a_batch_to_the_capacity(proposer, order):
    """Unequal prompts, one batch, generation right up to the capacity (every slot written once):
    the stand-in would raise on a write past it or a read of an unwritten slot."""
    prompts = [[0, 1, 2, 3, 0, 1], [3], [2, 2, 1, 0, 3, 3, 1, 2, 0, 1]]
    new = 32 - len(prompts[2]) + 1
    plain = Runner(PrefixModel(seed=1, order=order)).generate(prompts, new)
    spec = SpeculativeRunner(Runner(PrefixModel(seed=1, order=order)), PROPOSERS[proposer](), num_draft_tokens=3)
    got = spec.generate(prompts, new)
    assert got.tokens == plain.tokens
    assert got.proposed > 0


class CheckedDraft(DraftProposer):
    """Each batched proposal must be the draft's own greedy continuation of the row's context,
    computed from scratch: what it proposes when its cache holds exactly the accepted tokens."""

    def propose(self, contexts, counts, sampling, rng):
        out = super().propose(contexts, counts, sampling, rng)
        for ctx, proposal in zip(contexts, out):
            if proposal.tokens:
                fresh = Runner(PrefixModel(seed=2)).generate([ctx], len(proposal.tokens)).tokens[0]
                assert proposal.tokens == fresh
        self.checked = getattr(self, "checked", 0) + 1
        return out


def test_draft_cache_rolls_back_to_the_accepted_context():
    """A draft of another model is often rejected; its next proposals are still computed from the
    accepted tokens only (its stale slots are never read) — in a batch whose rows accept differently."""
    prompts = [[0, 1, 2, 3, 0, 1], [3], [2, 2, 1, 0, 3, 3, 1, 2, 0, 1]]
    target = Runner(PrefixModel(seed=1, order=2))
    draft = CheckedDraft(PrefixModel(seed=2))
    got = SpeculativeRunner(target, draft, num_draft_tokens=3).generate(prompts, 16)
    assert got.tokens == target.generate(prompts, 16).tokens
    assert 0 < got.accepted < got.proposed and draft.checked >= 5
    assert len(set(got.accepted_per_row)) > 1  # rows accepted different counts


# --- real graphs: greedy speculation is plain greedy, token for token -----------------------------

def test_stale_slots_past_a_rejection_are_never_read(final_fp32):
    """The premise of rollback-free verification, on the real graph: after a verify step wrote three
    rejected tokens' K/V into slots n..n+2, the next token fed at position n gets the logits (FP32
    graph, |diff| < 1e-4) of a run that never wrote them, whatever they were; a query at n+2,
    which may see slot n+1, does depend on them (the control: the stale K/V are really there)."""
    ex = OnnxRuntimeExecutor(final_fp32("llama"))
    prompt = np.array([[5, 9, 2, 7, 1, 3]])
    n = prompt.shape[1]

    def prefill():
        ex.start(1)
        ex.step(prompt[:, :-1], np.arange(n - 1)[None])

    prefill()
    clean_first = ex.step(prompt[:, -1:], np.array([[n - 1]]))[0, 0]
    clean = ex.step(np.array([[11]]), np.array([[n]]))[0, 0]
    late = {}
    for rejected in ([40, 41, 42], [50, 51, 52]):
        prefill()
        verify = ex.step(np.array([[3, *rejected]]), np.arange(n - 1, n + 3)[None])[0]
        assert np.abs(verify[0] - clean_first).max() < 1e-4
        after = ex.step(np.array([[11]]), np.array([[n]]))[0, 0]
        assert np.abs(after - clean).max() < 1e-4
        late[rejected[0]] = ex.step(np.array([[11]]), np.array([[n + 2]]))[0, 0]  # sees stale slot n+1
    assert np.abs(late[40] - late[50]).max() > 1e-2


class ScriptedProposer:
    """Proposes, per row, the known plain continuation (right = True: always accepted) or a token that
    differs from it at every place (always rejected)."""

    name = "scripted"

    def __init__(self, prompts, plain_tokens, right: list[bool], vocab: int):
        self.full = [[*p, *t] for p, t in zip(prompts, plain_tokens)]
        self.right, self.vocab = right, vocab

    def start(self, prompts):
        pass

    def propose(self, contexts, counts, sampling, rng):
        out = []
        for b, (ctx, k) in enumerate(zip(contexts, counts)):
            assert ctx == self.full[b][: len(ctx)]  # the verifier only ever emits plain greedy's tokens
            follow = self.full[b][len(ctx): len(ctx) + k]
            out.append(Proposal(follow if self.right[b] else [(t + 1) % self.vocab for t in follow]))
        return out


@pytest.fixture(scope="module")
def bundled(trained_fp16):
    """The bundled trained model's fp16 graph (what `llmc build` makes, capacity 256) and its tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True)
    return trained_fp16, tokenizer


BUNDLED_PROMPTS = ["ROMEO:\nWhat light", "First Citizen:\nBefore we proceed any further, hear me speak.", "KING"]


def test_bundled_model_greedy_equals_plain_for_both_proposers(bundled):
    path, tokenizer = bundled
    ids = [tokenizer(p).input_ids for p in BUNDLED_PROMPTS]
    target = Runner(OnnxRuntimeExecutor(path), pad_token_id=tokenizer.pad_token_id)
    plain = target.generate(ids, 48)
    ngram = SpeculativeRunner(target, NgramProposer(), 4).generate(ids, 48)
    assert ngram.tokens == plain.tokens
    assert ngram.accepted > 0 and ngram.steps < plain.steps
    # the model as its own draft: every proposal matches, so 47 tokens take ceil(47 / 5) verify steps
    draft = DraftProposer(OnnxRuntimeExecutor(path), pad_token_id=tokenizer.pad_token_id)
    same = SpeculativeRunner(target, draft, 4).generate(ids, 48)
    assert same.tokens == plain.tokens
    assert same.acceptance_rate == 1.0 and same.verify_steps == math.ceil(47 / 5)


def test_all_rejected_all_accepted_and_per_row_acceptance(bundled):
    """One batch: row 0 always gets the right continuation, row 1 always a wrong one, row 2 the right one.
    Each row keeps its own position: row 0 and 2 advance k + 1 per step, row 1 one token per step."""
    path, tokenizer = bundled
    ids = [tokenizer(p).input_ids for p in BUNDLED_PROMPTS]
    target = Runner(OnnxRuntimeExecutor(path), pad_token_id=tokenizer.pad_token_id)
    plain = target.generate(ids, 40)
    proposer = ScriptedProposer(ids, plain.tokens, [True, False, True], 1024)
    got = SpeculativeRunner(target, proposer, 3).generate(ids, 40)
    assert got.tokens == plain.tokens
    # 39 tokens after the first: rows 0 and 2 take 10 steps of 3 kept + 1 (the last one 2 + 1: 40 is the limit)
    assert got.accepted_per_row == [29, 0, 29]
    assert got.verify_steps == 39  # the all-rejected row needs one step per token, as plain decoding
    # row 1 proposes 3 a step until its last tokens: 36 x 3 + 2 + 1, never more than it may still emit
    assert got.proposed == 29 + (36 * 3 + 2 + 1) + 29


@pytest.mark.parametrize("target_arch,draft_arch", [("llama", "mistral"), ("qwen2", "llama"), ("mistral", "qwen2")])
def test_tiny_architectures_greedy_equals_plain_with_a_random_draft(target_arch, draft_arch, loaded_models, final_fp32):
    """Random tiny models share one tokenizer: a draft of another architecture is mostly rejected,
    the n-gram proposer partly accepted; both give plain greedy's tokens, with a stop token crossed."""
    tokenizer = loaded_models[target_arch].tokenizer
    ids = [tokenizer(p).input_ids for p in ["The compiler reads", "one, two", "Once upon a time there was"]]
    target = Runner(OnnxRuntimeExecutor(final_fp32(target_arch)), pad_token_id=tokenizer.pad_token_id)
    free = target.generate(ids, 24).tokens
    stop = free[1][5]
    plain = target.generate(ids, 24, stop_tokens=(stop,))
    for proposer in (NgramProposer(), DraftProposer(OnnxRuntimeExecutor(final_fp32(draft_arch)), tokenizer.pad_token_id)):
        got = SpeculativeRunner(target, proposer, 4).generate(ids, 24, stop_tokens=(stop,))
        assert got.tokens == plain.tokens, proposer.name
        assert got.proposed > 0


def test_capacity_boundary_on_a_real_graph(final_fp32):
    """65 prompt tokens + 64 new fill the 128 slots exactly: proposals are cut as the end nears."""
    target = Runner(OnnxRuntimeExecutor(final_fp32("llama")))
    prompts = [[1] * 65, [5, 9, 2] * 7]
    plain = target.generate(prompts, 64)
    draft = DraftProposer(OnnxRuntimeExecutor(final_fp32("llama")))
    for proposer in (NgramProposer(), draft):
        got = SpeculativeRunner(target, proposer, 6).generate(prompts, 64)
        assert got.tokens == plain.tokens and got.accepted > 0
    with pytest.raises(ValueError, match="129 positions needed but the cache holds 128"):
        SpeculativeRunner(target, NgramProposer()).generate([[1] * 66], 64)


# --- the command ----------------------------------------------------------------------------------

def _artifact(root, graph, tokenizer_dir):
    """The part of an artifact `llmc generate` reads: model.onnx and tokenizer/."""
    root.mkdir()
    shutil.copyfile(graph, root / "model.onnx")
    shutil.copytree(tokenizer_dir, root / "tokenizer", ignore=shutil.ignore_patterns("*.safetensors", "*.json.bak"))
    return root


def test_generate_command_prints_the_same_text_and_the_acceptance(bundled, tmp_path, model_dirs, final_fp32):
    path, _ = bundled
    art = _artifact(tmp_path / "bundled", path, default_model_dir())
    args = ["generate", str(art), "--prompt", "ROMEO:\nWhat light", "--prompt", "KING", "--max-new-tokens", "24"]
    plain = CliRunner().invoke(main, args)
    assert plain.exit_code == 0, plain.output
    text = plain.stdout.split("executor ")[0]
    runs = {"ngram (k = 4": ["--speculate", "ngram"],
            "draft (k = 3": ["--speculate", "draft", "--draft-artifact", str(art), "--num-draft-tokens", "3"]}
    for heading, extra in runs.items():
        spec = CliRunner().invoke(main, [*args, *extra])
        assert spec.exit_code == 0, spec.output
        assert spec.stdout.split("executor ")[0] == text
        assert f"speculation {heading}, fixed): acceptance" in spec.stdout
        assert "accepted tokens per target step" in spec.stdout
    sampled = CliRunner().invoke(main, [*args, "--temperature", "0.8", "--seed", "1", *runs["draft (k = 3"]])
    assert sampled.exit_code == 0 and "speculation draft (k = 3, fixed)" in sampled.stdout, sampled.output
    # a draft with another tokenizer: one line, exit 2, naming the cause and the fix
    other = _artifact(tmp_path / "other", final_fp32("llama"), model_dirs["llama"])
    bad = CliRunner().invoke(main, [*args, "--speculate", "draft", "--draft-artifact", str(other)])
    assert bad.exit_code == 2 and "tokenizer differs from the target's" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    missing = CliRunner().invoke(main, [*args, "--speculate", "draft"])
    assert missing.exit_code == 2 and "needs --draft-artifact" in missing.stderr
    stray = CliRunner().invoke(main, [*args, "--speculate", "ngram", "--draft-artifact", str(art)])
    assert stray.exit_code == 2 and "only with --speculate draft" in stray.stderr
    zero = CliRunner().invoke(main, [*args, "--speculate", "ngram", "--num-draft-tokens", "0"])
    assert zero.exit_code == 2 and "--num-draft-tokens 0" in zero.stderr


def test_generate_on_a_built_artifact(cached_build):
    """A real `llmc build` output (the session's one build of the tiny Llama): the same text with
    either proposer, the artifact being its own draft (every proposal accepted)."""
    out = cached_build[0]
    args = ["generate", str(out), "--prompt", "The compiler reads", "--prompt", "one, two", "--max-new-tokens", "20"]
    plain = CliRunner().invoke(main, args)
    assert plain.exit_code == 0, plain.output
    for extra in (["--speculate", "ngram"], ["--speculate", "draft", "--draft-artifact", str(out)]):
        spec = CliRunner().invoke(main, [*args, *extra])
        assert spec.exit_code == 0, spec.output
        assert spec.stdout.split("executor ")[0] == plain.stdout.split("executor ")[0]
    assert "acceptance 100.0%" in spec.stdout


def test_paged_cache_greedy_equals_plain(final_fp16_llama, tmp_path):
    """The paged graph (attention-plugin, paged: true; onnxruntime runs the plugin's reference): the
    verify step's k + 1 tokens may straddle a block boundary of a shuffled block table."""
    import onnx_ir as ir

    from passes import PassContext, make_pass

    model = ir.load(final_fp16_llama)
    assert make_pass("attention-plugin", PassContext(max_positions=128), {"paged": True})(model).modified
    ir.save(model, tmp_path / "paged.onnx")
    target = Runner(OnnxRuntimeExecutor(tmp_path / "paged.onnx"))
    assert target.io.paged
    prompts = [[1, 5, 9, 200, 33, 7, 8, 100, 41, 3], [4, 4, 300]]
    plain = target.generate(prompts, 40)
    for proposer in (NgramProposer(), DraftProposer(OnnxRuntimeExecutor(tmp_path / "paged.onnx"))):
        got = SpeculativeRunner(target, proposer, 5).generate(prompts, 40)
        assert got.tokens == plain.tokens and got.accepted > 0
