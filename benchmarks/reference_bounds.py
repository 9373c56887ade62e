"""The two figures tests/test_measure_reference.py's bounds are stated multiples of, measured the way
those tests compute them on the trained model:

    python benchmarks/reference_bounds.py

max |reference_decode logits (HF cache) - one uncached forward| over the prompt and 4 greedy steps,
and max |held_out log-probabilities - float64 log-softmax| over 5 windows of 16 tokens.
"""

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from compiler.frontend.calibrate import tokenize_windows  # noqa: E402
from compiler.frontend.corpus import default_eval_text  # noqa: E402
from compiler.frontend.default_model import default_model_dir  # noqa: E402
from compiler.frontend.load import load_model  # noqa: E402
from compiler.measure.quality import held_out  # noqa: E402
from compiler.measure.validate import reference_decode  # noqa: E402
from test_measure_reference import _full_logits, _greedy, _log_softmax64  # noqa: E402

trained = load_model(default_model_dir())
prompt = [261, 277, 82, 507, 9]
logits, _ = reference_decode(trained, prompt, 4)
expected = _greedy(trained.model, prompt, 5)
err = [np.abs(logits[0] - _full_logits(trained.model, prompt)).max()]
err += [np.abs(logits[i][0] - _full_logits(trained.model, prompt + expected[:i])[-1]).max() for i in range(1, 5)]
print(f"max |cached - uncached logits| {max(err):.3g}")
text = default_eval_text()
held = held_out(trained, text, 16, max_windows=5, batch=2)
windows = tokenize_windows(trained.tokenizer, text, 16, 5)
want = np.stack([_log_softmax64(_full_logits(trained.model, w))[:-1] for w in windows])
print(f"max |held-out log-probability - float64| {np.abs(held.reference_logp[0:5] - want).max():.3g}")
