"""The model's own tokenizer files, copied into the artifact so `llmc generate` and servers need nothing else."""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


def copy_tokenizer(model_dir: Path, dest: Path) -> list[str]:
    """The model's own tokenizer files, so `llmc generate` and servers need nothing but the artifact."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, dest / name)
            copied.append(name)
    return copied


def vocabulary(model_dir: Path) -> dict[str, int]:
    """token -> id of the directory's tokenizer (an llmc artifact's `tokenizer/` or a model directory)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True).get_vocab()


def check_same_vocabulary(target: dict[str, int], draft: dict[str, int], draft_name) -> None:
    """A draft's token ids mean something to the target only if both use the same vocabulary: with
    another tokenizer it would propose ids the target reads as other words, and every proposal would
    be rejected (the output stays correct, only slower), so it is refused up front instead."""
    from compiler.errors import BadInputError

    if target != draft:
        differ = sum(target.get(t) != draft.get(t) for t in target.keys() | draft.keys())
        raise BadInputError(f"{draft_name}'s tokenizer differs from the target's ({len(draft)} vs {len(target)} "
                            f"tokens, {differ} of them missing or with another id): use a draft model with the "
                            "target's tokenizer")
