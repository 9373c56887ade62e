"""`llmc build TARGET --draft DRAFT`: the draft built into draft/, validated like any build; the build's
speculation check (greedy with the draft proposing == plain greedy); `llmc generate --speculate draft`
finding it; a draft with another tokenizer refused before any work; a wrong verifier failing the build.

The tiny random Llama and Mistral share one tokenizer (compiler/frontend/default_model.py), so the
Mistral is a (useless, but valid) draft for the Llama: random weights make acceptance low, not wrong.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
from click.testing import CliRunner

from compiler.commands.cli import main


def _build(model_dirs, build_cache, out, *extra):
    return CliRunner().invoke(main, ["build", str(model_dirs["llama"]), "--max-seq", "128", "-o", str(out),
                                     "--cache-dir", str(build_cache), "--draft", str(model_dirs["mistral"]), *extra])


@pytest.fixture(scope="module")
def with_draft(model_dirs, build_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("draft") / "out"
    result = _build(model_dirs, build_cache, out)
    assert result.exit_code == 0, result.output
    return out, result


def test_the_draft_is_a_validated_build_inside_the_artifact(with_draft, model_dirs):
    out, result = with_draft
    report = json.loads((out / "report.json").read_text())
    draft_report = json.loads((out / "draft" / "report.json").read_text())
    assert report["draft"]["status"] == "pass" and report["draft"]["architecture"] == "MistralForCausalLM"
    assert draft_report["model"]["architecture"] == "MistralForCausalLM" and draft_report["status"] == "pass"
    assert draft_report["numerics"]["passed"]  # validated against its own PyTorch model
    for name in ("model.onnx", "model.plan", "tokenizer/tokenizer.json", "manifest.json", "report.md"):
        assert (out / "draft" / name).is_file(), name
    assert not (out / "draft" / "triton").exists()  # only the outer artifact is served
    assert (out / "triton").is_dir()
    inspected = CliRunner().invoke(main, ["inspect", str(out / "draft")])
    assert inspected.exit_code == 0, inspected.output
    assert "MistralForCausalLM" in inspected.stdout or "mistral" in inspected.stdout
    progress = " ".join(result.stderr.split())  # the terminal width wraps long lines
    assert "draft package: done in" in progress and "speculation identical to plain greedy on 4 prompts" in progress


def test_speculation_check_proves_greedy_output_unchanged(with_draft):
    out, _ = with_draft
    spec = json.loads((out / "report.json").read_text())["speculation"]
    assert spec["identical"] is True and spec["divergences"] == []
    assert spec["prompts"] == 4 and spec["new_tokens"] == 4 * 32
    assert 0 <= spec["acceptance_rate"] <= 1 and spec["target_steps"] <= spec["plain_steps"]
    assert spec["num_draft_tokens"] == 4 and spec["fixed_k"] is True


def test_the_card_shows_the_speculation_figures(with_draft):
    out, _ = with_draft
    spec = json.loads((out / "report.json").read_text())["speculation"]
    card = (out / "report.md").read_text()
    section = card.split("## Speculative decoding")[1].split("\n## ")[0]
    assert "identical to plain greedy" in section
    assert f"| acceptance rate | {spec['acceptance_rate']:.1%} |" in section
    assert f"| target steps, speculative vs plain | {spec['target_steps']} vs {spec['plain_steps']} |" in section


def test_generate_speculates_with_the_built_in_draft(with_draft):
    out, _ = with_draft
    result = CliRunner().invoke(main, ["generate", str(out), "--prompt", "To be, or not", "--max-new-tokens", "12",
                                       "--speculate", "draft"])
    assert result.exit_code == 0, result.output
    assert "speculation draft (k = 4, fixed)" in result.stdout
    assert "output identical to plain decoding" in result.stdout


def test_a_verifier_that_accepts_everything_fails_the_build(model_dirs, build_cache, tmp_path, monkeypatch):
    import compiler.runtime.speculative as speculative

    monkeypatch.setattr(speculative, "verify_greedy", lambda proposed, logits: (len(proposed), [
        *proposed, int(logits[len(proposed)].argmax())]))
    out = tmp_path / "out"
    result = _build(model_dirs, build_cache, out)
    assert result.exit_code == 5, result.output
    assert "a verification bug" in result.output and "speculative greedy output differs" in result.output
    assert not out.exists() and (tmp_path / "out.failed" / "report.json").is_file()


def test_a_draft_with_another_tokenizer_is_refused_before_any_work(model_dirs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(model_dirs["mistral"], other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # two ids swapped: same size, other meaning
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["build", str(model_dirs["llama"]), "-o", str(tmp_path / "out"),
                                       "--draft", str(other)])
    assert result.exit_code == 2, result.output
    assert "tokenizer differs from the target's" in result.output and "2 of them missing or with another id" in result.output
    assert not (tmp_path / "out").exists() and time.perf_counter() - start < 30


def test_plan_lists_the_draft_stage(model_dirs, tmp_path):
    runner = CliRunner()
    args = ["build", str(model_dirs["llama"]), "-o", str(tmp_path / "out"), "--plan"]
    without = runner.invoke(main, args)
    assert without.exit_code == 0 and "draft     skipped: no --draft" in without.stdout
    with_draft = runner.invoke(main, [*args, "--draft", str(model_dirs["mistral"])])
    assert with_draft.exit_code == 0 and "draft     run" in with_draft.stdout
    lines = with_draft.stdout.splitlines()
    draft_rows = [line.split()[0] for line in lines[[i for i, line in enumerate(lines) if "draft     run" in line][0] + 1:]]
    assert draft_rows[:2] == ["draft/load", "draft/calibrate"] and "draft/package" in draft_rows
    assert "draft/draft" in draft_rows  # its own draft stage, skipped: the draft has no draft


def test_every_prompt_is_judged_and_only_a_near_tie_is_excused():
    from compiler.measure.speculation import NEAR_TIE, unexcused

    tie = {"prompt": 0, "position": 3, "plain": 5, "speculative": 6, "margin": NEAR_TIE / 2}
    wrong = {"prompt": 2, "position": 0, "plain": 7, "speculative": 9, "margin": 4.0}
    reversed_preference = {"prompt": 1, "position": 1, "plain": 7, "speculative": 9, "margin": -12.0}
    stopped_early = {"prompt": 3, "position": 4, "plain": None, "speculative": None, "margin": float("inf")}
    assert unexcused([tie]) == []
    failures = unexcused([tie, wrong, reversed_preference, stopped_early])
    assert [f.split(",")[0] for f in failures] == [
        "speculative greedy output differs from plain greedy at prompt 2",
        "speculative greedy output differs from plain greedy at prompt 1",
        "speculative greedy output differs from plain greedy at prompt 3"]


def test_the_bundled_draft_works_out_of_the_box(build_cache, tmp_path):
    """`llmc build --draft bundled` (the bundled model and the draft trained with it) then `llmc generate
    --speculate draft`: the same text as plain decoding, and a trained draft is accepted (a random one is
    not: the tiny-model tests above see ~0%)."""
    from compiler.frontend.default_model import TRAINED_DRAFT_DIR, default_model_dir

    assert (TRAINED_DRAFT_DIR / "tokenizer.json").read_bytes() == (default_model_dir() / "tokenizer.json").read_bytes()
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", "-o", str(out), "--cache-dir", str(build_cache), "--draft", "bundled"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["draft"]["model"] == str(TRAINED_DRAFT_DIR) and report["speculation"]["identical"]
    assert report["speculation"]["acceptance_rate"] > 0.2
    result = CliRunner().invoke(main, ["generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "32",
                                       "--speculate", "draft"])
    assert result.exit_code == 0 and "output identical to plain decoding" in result.stdout, result.output
