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
