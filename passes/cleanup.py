"""Constant folding, common-subexpression elimination and dead-code removal.

Why: the exporter leaves shape arithmetic and per-layer duplicates that a rewrite rule must not
have to look through, and every rewrite leaves dead producers behind. Runs onnxscript's optimizer
(constant folding + its basic rules) and onnx-ir's CSE / unused-node / unused-initializer passes.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

from .rewriter_state import forget_matched_graphs, forget_removed_io
from .base import LlmcPass


def _fingerprint(model: ir.Model) -> tuple:
    return (
        tuple((n.op_type, len(n.inputs)) for n in model.graph),
        tuple(sorted(model.graph.initializers)),
    )


def _keep_quantized(node: ir.Node) -> bool | None:
    return False if node.op_type == "DequantizeLinear" else None


class CleanupPass(LlmcPass):
    """Fold constants, dedupe, and drop whatever no output depends on."""

    check_tolerance = (2e-2, 1.0)  # after cast-fp16 it folds in FP16: re-rounding, not a rewrite of meaning

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import onnxscript.optimizer

        before = _fingerprint(model)
        # Never fold a weight's DequantizeLinear back into a float constant: that would undo quantization.
        onnxscript.optimizer.optimize_ir(model, num_iterations=2, should_fold=_keep_quantized)
        forget_matched_graphs()  # else onnxscript's module-level rules keep this graph alive
        forget_removed_io(model.graph)  # passes that rewire the graph's I/O ran before this
        common.CommonSubexpressionEliminationPass()(model)
        common.RemoveUnusedNodesPass()(model)
        common.RemoveUnusedOpsetsPass()(model)
        return ir.passes.PassResult(model, modified=_fingerprint(model) != before)
