"""The tokenizer the Triton models use: tokenizer.json through the `tokenizers` library.

That is the code transformers' fast tokenizers run, without importing transformers, which
imports torch: 26 s per Triton stub on this project's 2-core machines, for every Python model.
Tokenizers with no tokenizer.json (SentencePiece-only) fall back to transformers' AutoTokenizer.
tests/test_triton_server.py checks the served text against `llmc generate` (AutoTokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path

_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # transformers' clean_up_tokenization


class ServingTokenizer:
    def __init__(self, directory: Path):
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.cleanup = bool(config.get("clean_up_tokenization_spaces", False))
        if (directory / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self.fast = Tokenizer.from_file(str(directory / "tokenizer.json"))
            self.hf = None
        else:
            from transformers import AutoTokenizer

            self.fast = None
            self.hf = AutoTokenizer.from_pretrained(directory, local_files_only=True)

    def encode(self, text: str) -> list[int]:
        if self.hf is not None:
            return self.hf(text).input_ids
        return self.fast.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        if self.hf is not None:
            return self.hf.decode(ids, skip_special_tokens=True)
        text = self.fast.decode(ids, skip_special_tokens=True)
        if self.cleanup:
            for old, new in _CLEANUPS:
                text = text.replace(old, new)
        return text
