"""Feed Attention the un-repeated K/V heads: GQA handled inside TensorRT's attention, not by Expand.

Why: HF's `repeat_kv` materializes every KV head `n_rep` times (Unsqueeze -> Expand -> Reshape)
before attention, so the exported graph reads and writes `n_rep` x the cache it needs and
TensorRT sees an MHA. ONNX Attention (opset 23) takes K/V with fewer heads than Q and groups
query heads onto them (q head h reads kv head h // n_rep: the same mapping as repeat_kv).

Why not onnxscript's own GQA fusion: `onnxscript.rewriter.rules.fusion._gqa` also folds the KV
Concat into a *three-output* Attention with past/present K/V inputs, which TensorRT's ONNX
parser rejects. This rule only removes the head repetition and keeps a single-output Attention;
the cache update is a separate rewrite (passes/kv_cache_scatter.py).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import _fusion_utils, pattern
from .base import LlmcPass

REPEAT_AXIS = 2  # repeat_kv: [B, Hkv, T, D] -> Unsqueeze(2) -> [B, Hkv, n_rep, T, D] -> [B, Hkv*n_rep, T, D]


class UnrepeatedKVAttention(pattern.RewriteRuleClassBase):
    """Attention(q, repeat(k), repeat(v), mask) -> Attention(q, k, v, mask), same attributes, one output."""

    def __init__(self):
        super().__init__("UnrepeatedKVAttention", remove_nodes=True)

    def pattern(self, op, query_BHSD, key_BHkvTD, value_BHkvTD, k_axes, v_axes):
        key_BHTD = op.Reshape(op.Expand(op.Unsqueeze(key_BHkvTD, k_axes), pattern.ANY_VALUE), pattern.ANY_VALUE,
                              _allow_other_attributes=True, _outputs=["key_BHTD"])
        value_BHTD = op.Reshape(op.Expand(op.Unsqueeze(value_BHkvTD, v_axes), pattern.ANY_VALUE), pattern.ANY_VALUE,
                                _allow_other_attributes=True, _outputs=["value_BHTD"])
        return op.Attention(query_BHSD, key_BHTD, value_BHTD, pattern.Var("mask", can_match_none=True),
                            _allow_other_attributes=True, _outputs=["attention_BHSD"])

    def check(self, context, query_BHSD, key_BHkvTD, value_BHkvTD, k_axes, v_axes, key_BHTD, value_BHTD, **_):
        result = pattern.MatchResult()
        for axes in (k_axes, v_axes):
            tensor = ir.convenience.get_const_tensor(axes)
            if tensor is None or tensor.numpy().tolist() not in ([REPEAT_AXIS], REPEAT_AXIS):
                return result.fail(f"Unsqueeze axes {axes.name} is not the constant [{REPEAT_AXIS}]")
        bindings: dict = {}
        shapes_ok = (
            _fusion_utils.check_shape_bool(bindings, query_BHSD, ["B", "H", "S", "D"])
            and _fusion_utils.check_shape_bool(bindings, key_BHkvTD, ["B", "Hkv", "T", "D"])
            and _fusion_utils.check_shape_bool(bindings, value_BHkvTD, ["B", "Hkv", "T", "D"])  # T: symbolic names of the
            # repeated tensors differ from the cache's (exporter-derived "past + seq"), so they bind separately
            and _fusion_utils.check_shape_bool(bindings, key_BHTD, ["B", "H", "T_rep", "D"])
            and _fusion_utils.check_shape_bool(bindings, value_BHTD, ["B", "H", "T_rep", "D"])
        )
        if not shapes_ok:
            return result.fail("shapes are not those of repeat_kv feeding Attention")
        heads, kv_heads = bindings["H"], bindings["Hkv"]
        if not (isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads == 0):
            return result.fail(f"q heads {heads} not a static multiple of kv heads {kv_heads}")
        return result

    def rewrite(self, op, query_BHSD, key_BHkvTD, value_BHkvTD, mask, attention_BHSD, **_):
        attrs = {name: attr.value for name, attr in attention_BHSD.producer().attributes.items()}
        return op.Attention(query_BHSD, key_BHkvTD, value_BHkvTD, mask, **attrs)


def rules() -> pattern.RewriteRuleSet:
    """A fresh rule set per run: onnxscript's matcher keeps the last graph it matched on, so a
    module-level rule set would keep the graph alive after the pass (see passes/rewriter_state.py)."""
    return pattern.RewriteRuleSet([UnrepeatedKVAttention.rule()])


class GqaNativeAttentionPass(LlmcPass):
    """Apply the rule everywhere, then drop the dead repeat chains."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = rules().apply_to_model(model)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=bool(count))

    def ensures(self, model: ir.Model) -> None:
        for node in model.graph:
            if node.op_type == "Attention":
                for value in node.inputs[1:3]:
                    producer = value.producer() if value is not None else None
                    if producer is not None and producer.op_type == "Reshape":
                        raise ir.passes.PostconditionError(f"{node.name}: K/V still come through a Reshape (repeat_kv)")
