"""Make onnxscript's pattern matchers forget the last graph they matched on.

Why: `SimplePatternMatcher.match` keeps the graph, node and match it is working on in its own
attributes (`_graph`, `_current_node`, `_match`) and never clears them, and the rules that
`onnxscript.optimizer` and torch.onnx's export (`optimize=True`, its RMSNorm / rotary fusions)
apply are module-level objects. So after a rewrite, the whole graph it ran on, initializers
included, stays reachable from those rules until a later match on another graph replaces it.
Measured on a Llama-3.2-1B-shaped fp16 build: 3.6 GB of the export's FP32 weights stayed resident
through the engine build and validation.
"""

from __future__ import annotations

import gc

MATCH_STATE = ("_graph", "_current_node", "_match", "_tracer")


def forget_matched_graphs() -> int:
    """Clear the match state of every live matcher; returns how many references were dropped.

    Every matcher, not a list of known rule sets: the rules live in several onnxscript modules
    (and in ours), and a missed one keeps the whole graph."""
    try:  # a private class: if onnxscript moves it, the build loses this memory fix, not its output
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:
        return 0
    dropped = 0
    for obj in gc.get_objects():
        if isinstance(obj, SimplePatternMatcher):
            for attr in MATCH_STATE:
                if getattr(obj, attr, None) is not None:
                    setattr(obj, attr, None)
                    dropped += 1
    return dropped
