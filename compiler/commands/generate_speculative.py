"""`llmc generate --speculate ngram|draft`: the proposer the options name, with the draft's tokenizer checked
(compiler/frontend/tokenizer_files.py: check_same_vocabulary says why)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from compiler.errors import BadInputError
from compiler.frontend.tokenizer_files import check_same_vocabulary
from compiler.runtime.proposers import DraftProposer, NgramProposer
from compiler.runtime.runner import Runner
from compiler.runtime.speculative import SpeculativeRunner

PROPOSERS = ("ngram", "draft")


def speculative_runner(target: Runner, tokenizer, speculate: str, num_draft_tokens: int,
                       draft_artifact: Path | None, open_draft: Callable[[], object]) -> SpeculativeRunner:
    """open_draft() -> the draft's executor (onnxruntime or TensorRT, as the target's)."""
    if speculate not in PROPOSERS:
        raise BadInputError(f"--speculate {speculate!r}: choose one of {', '.join(PROPOSERS)}")
    if num_draft_tokens < 1:
        raise BadInputError(f"--num-draft-tokens {num_draft_tokens}: propose at least 1 token per step")
    if speculate == "ngram":
        if draft_artifact is not None:
            raise BadInputError("--draft-artifact is used only with --speculate draft")
        return SpeculativeRunner(target, NgramProposer(), num_draft_tokens)
    if draft_artifact is None:
        raise BadInputError("--speculate draft needs --draft-artifact DIR, or an artifact built with "
                            "`llmc build MODEL --draft DRAFT_MODEL` (it then holds draft/)")
    from transformers import AutoTokenizer

    check_same_vocabulary(tokenizer.get_vocab(), AutoTokenizer.from_pretrained(
        draft_artifact / "tokenizer", local_files_only=True).get_vocab(), draft_artifact)
    draft = open_draft()
    if draft.io.vocab_size != target.io.vocab_size:
        raise BadInputError(f"{draft_artifact}'s logits cover {draft.io.vocab_size} ids, the target's "
                            f"{target.io.vocab_size}: build the draft from a model with the target's vocabulary size")
    try:
        proposer = DraftProposer(draft, pad_token_id=target.pad)
    except ValueError as exc:
        raise BadInputError(f"{draft_artifact}: {exc}") from exc
    return SpeculativeRunner(target, proposer, num_draft_tokens)
