"""Stage 2, export: the PyTorch model -> ONNX (opset 23) with the KV cache as explicit graph I/O.

One graph serves prefill and decode: `past_key_values.{i}.key/value` come in (length 0 for
prefill), `present.{i}.key/value` go out. Export runs in FP32, the reference precision;
lowering to FP16 is a pass (passes/cast_fp16.py) so that the rotary tables and other
constants are computed in FP32 first.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings

from .types import ExportedGraph, GraphIO, LoadedModel

OPSET = 23

# Dim names in the exported graph (what users of onnxruntime-genai / Optimum expect to see).
BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"


def graph_io(loaded: LoadedModel) -> GraphIO:
    spec = loaded.spec
    return GraphIO(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.vocab_size)


def _wrapper(loaded: LoadedModel):
    """A module with flat tensor I/O: HF's Cache object is rebuilt inside forward."""
    import torch
    from transformers import DynamicCache

    class FlatKVCausalLM(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            # No config: plain full-length layers. With config, Mistral/Qwen2 get sliding-window layers
            # that slice the cache; llmc requires --max-seq <= sliding_window instead (driver check).
            cache = DynamicCache()
            for layer in range(len(past) // 2):
                cache.update(past[2 * layer], past[2 * layer + 1], layer)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            )
            flat = [out.logits]
            for layer in out.past_key_values.layers:
                flat += [layer.keys, layer.values]
            return tuple(flat)

    return FlatKVCausalLM(loaded.model).eval()


def example_inputs(loaded: LoadedModel, batch: int = 2, seq: int = 3, past: int = 5):
    """Inputs of distinct sizes so torch.export keeps batch/sequence/past dims symbolic."""
    import torch

    spec = loaded.spec
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = [
        torch.randn(batch, spec.num_kv_heads, past, spec.head_dim, generator=gen)
        for _ in range(2 * spec.num_layers)
    ]
    return (ids, mask, pos, *kv)


def export_onnx(loaded: LoadedModel, verbose: bool = False) -> ExportedGraph:
    """Export with torch.onnx (dynamo), dynamic batch / sequence / past length, FP32."""
    import torch

    io_spec = graph_io(loaded)
    module = _wrapper(loaded)
    args = example_inputs(loaded)
    b, s, p, t = (torch.export.Dim(n) for n in (BATCH, SEQ, PAST, TOTAL))
    dynamic_shapes = {
        "input_ids": {0: b, 1: s},
        "attention_mask": {0: b, 1: t},
        "position_ids": {0: b, 1: s},
        "past": tuple([{0: b, 2: p}] * (2 * loaded.spec.num_layers)),
    }
    start = time.perf_counter()
    sink = io.StringIO()
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(sink)
    with quiet, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=OPSET,
            dynamic_shapes=dynamic_shapes,
            input_names=io_spec.input_names,
            output_names=io_spec.output_names,
            optimize=True,
            verify=False,
        )
    model = program.model
    _name_dims(model)
    model.producer_name = "llmc"
    return ExportedGraph(model=model, io=io_spec, seconds=time.perf_counter() - start)


def _name_dims(model) -> None:
    """Give the symbolic dims stable, readable names (torch.export names them after Dim objects)."""
    import onnx_ir as ir

    rename = {"past + sequence_length": TOTAL, "past_sequence_length + sequence_length": TOTAL}
    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.shape is None:
            continue
        dims = []
        for d in value.shape:
            if isinstance(d, ir.SymbolicDim) and d.value in rename:
                dims.append(ir.SymbolicDim(rename[d.value]))
            else:
                dims.append(d)
        value.shape = ir.Shape(dims)
