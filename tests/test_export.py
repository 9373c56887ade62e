"""Export: I/O contract, dynamic dims, and onnxruntime == PyTorch FP32 through the KV-cache I/O."""

import numpy as np
import onnx_ir as ir
import torch

from compiler.frontend.export import BATCH, PAST, SEQ, TOTAL
from helpers import feeds_with_past, op_counts, run_onnx


def test_io_names_and_dynamic_dims(llama_export):
    path, io = llama_export
    model = ir.load(path)
    assert [v.name for v in model.graph.inputs] == io.input_names
    assert [v.name for v in model.graph.outputs] == io.output_names
    assert io.past_names[0] == "past_key_values.0.key" and io.present_names[-1] == f"present.{io.num_layers - 1}.value"
    shapes = {v.name: [str(d) for d in v.shape] for v in [*model.graph.inputs, *model.graph.outputs]}
    assert shapes["input_ids"] == [BATCH, SEQ]
    assert shapes["attention_mask"] == [BATCH, TOTAL]
    assert shapes["past_key_values.0.key"] == [BATCH, str(io.num_kv_heads), PAST, str(io.head_dim)]
    assert shapes["present.0.key"][2] == TOTAL
    assert model.opset_imports[""] == 23
    assert op_counts(model)["Attention"] == io.num_layers


def test_onnx_matches_pytorch_with_past(llama, llama_export):
    """Same inputs (batch 2, 3 new tokens after 4 cached) through HF's cache and through the graph."""
    from transformers import DynamicCache

    path, io = llama_export
    feeds = feeds_with_past(io, np.float32)
    got = run_onnx(path, feeds)
    cache = DynamicCache(config=llama.model.config)
    for layer in range(io.num_layers):
        cache.update(torch.from_numpy(feeds[io.past_names[2 * layer]]), torch.from_numpy(feeds[io.past_names[2 * layer + 1]]), layer)
    with torch.no_grad():
        ref = llama.model(
            input_ids=torch.from_numpy(feeds["input_ids"]),
            attention_mask=torch.from_numpy(feeds["attention_mask"]),
            position_ids=torch.from_numpy(feeds["position_ids"]),
            cache=cache,
            use_cache=True,
        )
    np.testing.assert_allclose(got["logits"], ref.logits.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got["present.0.key"], ref.past_key_values.layers[0].keys.numpy(), atol=1e-5)
    assert got["present.1.value"].shape == (2, io.num_kv_heads, 7, io.head_dim)
