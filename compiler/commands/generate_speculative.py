"""`llmc generate --speculate ngram|draft`: the proposer the options name, with the draft's tokenizer checked.

A draft's token ids mean something to the target only if both use the same vocabulary: a draft
with another tokenizer would propose ids the target reads as other words, and every proposal would
be rejected (the output stays correct, only slower), so it is refused up front instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from compiler.errors import BadInputError
from compiler.runtime.proposers import DraftProposer, NgramProposer
from compiler.runtime.runner import Runner
from compiler.runtime.speculative import SpeculativeRunner

PROPOSERS = ("ngram", "draft")


def check_same_vocabulary(target_tokenizer, draft_tokenizer, draft_artifact: Path) -> None:
    target, draft = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if target != draft:
        differ = len(set(target.items()) ^ set(draft.items()))
        raise BadInputError(f"{draft_artifact}'s tokenizer differs from the target's ({len(draft)} vs {len(target)} "
                            f"tokens, {differ} entries differ): build the draft from a model with the target's tokenizer")


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
        raise BadInputError("--speculate draft needs --draft-artifact DIR (a draft built by `llmc build DRAFT_MODEL`)")
    from transformers import AutoTokenizer

    check_same_vocabulary(tokenizer, AutoTokenizer.from_pretrained(draft_artifact / "tokenizer", local_files_only=True),
                          draft_artifact)
    draft = open_draft()
    if draft.io.vocab_size != target.io.vocab_size:
        raise BadInputError(f"{draft_artifact}'s logits cover {draft.io.vocab_size} ids, the target's "
                            f"{target.io.vocab_size}: build the draft from a model with the target's vocabulary size")
    try:
        proposer = DraftProposer(draft, pad_token_id=target.pad)
    except ValueError as exc:
        raise BadInputError(f"{draft_artifact}: {exc}") from exc
    return SpeculativeRunner(target, proposer, num_draft_tokens)
