"""Text llmc ships for calibration, evaluation and training the bundled trained model.

Why a shipped corpus: quantization must be calibrated on real text and its cost measured on
*different* real text, with no hub or network. The corpus is Tiny Shakespeare (public-domain
Shakespeare, 1,115,394 bytes, from github.com/karpathy/char-rnn data/tinyshakespeare/input.txt at
commit 6f9487a, sha256 86c4e6aa...dc565ed). It is split once, here, by byte offset:

  train   [0, 90%)        the trained test model's training text; calibration samples from it
  heldout [90%, 100%)     never trained on, never calibrated on: perplexity / KL evaluation text

`--calib-data FILE` / `--eval-data FILE` replace the defaults (plain text, or JSONL with a "text"
field per line).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from compiler.errors import BadInputError

CORPUS_FILE = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TRAIN_FRACTION = 0.9


def corpus_text() -> str:
    data = CORPUS_FILE.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != CORPUS_SHA256:
        raise BadInputError(f"{CORPUS_FILE} is modified (sha256 {digest[:12]}...); reinstall llmc")
    return data.decode("utf-8")


def split_corpus() -> tuple[str, str]:
    """(train, heldout), cut at a line boundary near 90%."""
    text = corpus_text()
    cut = text.rfind("\n\n", 0, int(len(text) * TRAIN_FRACTION)) + 2
    return text[:cut], text[cut:]


def default_calibration_text(chars: int = 24_000) -> str:
    """A slice from the middle of the training split (what the model has seen, like real calibration)."""
    train, _ = split_corpus()
    start = train.find("\n\n", len(train) // 2) + 2
    return train[start:start + chars]


def default_eval_text(chars: int = 12_000) -> str:
    """The start of the held-out split: disjoint from both training and calibration text."""
    _, heldout = split_corpus()
    return heldout[:chars]


def read_text_file(path: str | Path, what: str) -> str:
    """Plain text, or JSONL whose lines are objects with a "text" field (joined by blank lines)."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{what} file not found: {path} (pass a plain-text or JSONL file)")
    raw = path.read_text(encoding="utf-8", errors="strict")
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise BadInputError(f"{path}:{lineno}: not a JSON object with a \"text\" field ({exc})") from exc
        raw = "\n\n".join(texts)
    if len(raw.strip()) < 200:
        raise BadInputError(f"{what} file {path} has under 200 characters of text; give at least a few paragraphs")
    return raw
