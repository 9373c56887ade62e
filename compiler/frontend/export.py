"""Export (the export stage): the PyTorch model -> ONNX (opset 23) with the KV cache as explicit graph I/O.

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

from passes.rewriter_state import forget_matched_graphs, forget_removed_io

from compiler.graph_io import BATCH, PAST, SEQ, TOTAL, ExportedGraph, GraphIO
from compiler.frontend.model import LoadedModel

OPSET = 23



def graph_io(loaded: LoadedModel) -> GraphIO:
    spec = loaded.spec
    return GraphIO(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.vocab_size)


def _wrapper(model):
    """A module with flat tensor I/O: HF's Cache object is rebuilt inside forward."""
    import torch
    from transformers import DynamicCache

    class FlatKVCausalLM(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            # No config: plain full-length layers (the export's past/present keep every position). With
            # config, sliding layers would slice the cache; the window is the mask's job instead (HF's mask
            # here, passes/kv_cache_scatter.py's after the passes).
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

    return FlatKVCausalLM(model).eval()


def example_inputs(loaded: LoadedModel, batch: int = 2, seq: int = 3, past: int = 5, num_layers: int | None = None):
    """Inputs of distinct sizes so torch.export keeps batch/sequence/past dims symbolic."""
    import torch

    spec = loaded.spec
    num_layers = spec.num_layers if num_layers is None else num_layers
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = [
        torch.randn(batch, spec.num_kv_heads, past, spec.head_dim, generator=gen)
        for _ in range(2 * num_layers)
    ]
    return (ids, mask, pos, *kv)


METHODS = ("auto", "full", "stamp")
STAMP_MIN_LAYERS = 5  # auto stamps deeper models only: below this the shallow export saves little


def export_onnx(loaded: LoadedModel, verbose: bool = False, method: str = "auto") -> ExportedGraph:
    """Export with torch.onnx (dynamo), dynamic batch / sequence / past length, FP32.

    method: "full" traces every layer; "stamp" exports a 2-layer copy and clones its last layer for
    the rest (compiler/frontend/stamp.py: export time and memory flat in depth); "auto" stamps models with
    more than 4 homogeneous layers and falls back to "full" when stamping does not apply.
    """
    from compiler.errors import UnsupportedModelError
    from compiler.frontend.stamp import StampError, heterogeneity

    if method not in METHODS:
        raise ValueError(f"export method {method!r} is not one of {METHODS}")
    if method == "full":
        return _export_full(loaded, verbose)
    n = loaded.spec.num_layers
    reason = heterogeneity(loaded.model, n)
    if method == "auto" and (reason or n < STAMP_MIN_LAYERS):
        return _export_full(loaded, verbose)
    if reason:
        raise UnsupportedModelError(f"cannot stamp the export of {loaded.name}: {reason}; use method='full'")
    try:
        return _export_stamped(loaded, verbose)
    except StampError as exc:
        if method == "stamp":
            raise UnsupportedModelError(f"cannot stamp the export of {loaded.name}: {exc}; use method='full'") from exc
        logging.getLogger(__name__).warning("stamped export does not apply (%s); exporting every layer", exc)
        return _export_full(loaded, verbose)


def _export_full(loaded: LoadedModel, verbose: bool) -> ExportedGraph:
    start = time.perf_counter()
    model = _export_fp32(loaded.model, loaded, loaded.spec.num_layers, verbose)
    _finish(model, loaded)
    return ExportedGraph(model=model, io=graph_io(loaded), seconds=time.perf_counter() - start)


def _export_stamped(loaded: LoadedModel, verbose: bool) -> ExportedGraph:
    from compiler.frontend.stamp import SHALLOW_LAYERS, decoder_layers, shallow_model, stamp_layers

    start = time.perf_counter()
    n = loaded.spec.num_layers
    path, _ = decoder_layers(loaded.model, n)
    shallow = shallow_model(loaded.model, n, SHALLOW_LAYERS)
    model = _export_fp32(shallow, loaded, SHALLOW_LAYERS, verbose)  # stamped layers widen their half weights on read
    stamp_layers(model, loaded.model, path, n)
    _finish(model, loaded)
    return ExportedGraph(model=model, io=graph_io(loaded), seconds=time.perf_counter() - start)


STACK_TRACE = "pkg.torch.onnx.stack_trace"


def _finish(model, loaded: LoadedModel) -> None:
    """Name the dims, record the layers' windows, and drop torch.onnx's per-node stack traces.

    Why drop them: they hold the absolute paths of the llmc checkout and of the Python environment
    (`File "/home/me/.venv/.../modeling_llama.py", line 212`), so the same model, recipe and versions
    built from two checkouts would give different `model.onnx` bytes. The node's module scopes and FX
    node (what stamping and the per-pass check read) stay."""
    _name_dims(model)
    _record_windows(model, loaded)
    model.producer_name = "llmc"
    for node in model.graph:
        node.metadata_props.pop(STACK_TRACE, None)


def _export_fp32(module, loaded: LoadedModel, num_layers: int, verbose: bool):
    """Export `module` as the FP32 model, whatever its storage (compiler/frontend/half_storage.py).

    The traced modules go back to plain FP32 (the exporter traces those; half-stored Linears cost
    2x their memory from here on), except half-stored embeddings: they are traced through an FP32
    stand-in that takes no memory, and the graph then views the half weight (compiler/frontend/lazy_weights.py).
    If the exporter did not use a stand-in as expected (it read or folded it), export again without.
    """
    from compiler.frontend.half_storage import fp32_stand_ins, restore_fp32

    with fp32_stand_ins(module) as stand_ins:
        restore_fp32(module)
        model = _export_program(_wrapper(module), loaded, num_layers, verbose)
        # Inside the block: the exporter's initializers hold the Parameter itself, which reads half again after it.
        problem = _adopt_stand_ins(model.graph, stand_ins) if stand_ins else None
    if problem:
        logging.getLogger(__name__).warning("%s; exporting with the embedding in FP32", problem)
        model = None
        restore_fp32(module)
        model = _export_program(_wrapper(module), loaded, num_layers, verbose)
    return model


def _adopt_stand_ins(graph, stand_ins) -> str | None:
    """Point each initializer over a stand-in at the half weight; returns what went wrong, if anything.

    A stand-in must be exactly one initializer with as many uses as modules hold its Parameter (an
    embedding's Gather, a tied lm_head's Transpose): a folded use would be one fewer, and its result
    was computed from uninitialized memory.
    """
    import torch

    from compiler.frontend.lazy_weights import ParameterView

    found: dict[int, list] = {}
    for value in graph.initializers.values():
        raw = getattr(value.const_value, "raw", None)
        if isinstance(raw, torch.Tensor) and raw.data_ptr() in stand_ins:
            found.setdefault(raw.data_ptr(), []).append(value)
    for ptr, stand_in in stand_ins.items():
        values = found.get(ptr, [])
        if len(values) != 1 or len(values[0].uses()) != stand_in.users:
            return (f"the exporter did not use the stand-in of a {tuple(stand_in.half.shape)} embedding as expected "
                    f"({len(values)} initializers, {sum(len(v.uses()) for v in values)} uses, {stand_in.users} expected)")
    for ptr, stand_in in stand_ins.items():
        value = found[ptr][0]
        value.const_value = ParameterView(stand_in.half, value.dtype, value.const_value.name)
    return None


def _export_program(module, loaded: LoadedModel, num_layers: int, verbose: bool):
    """torch.onnx.export of the flat-KV wrapper with `num_layers` past/present pairs; returns the ir.Model."""
    import torch

    io_spec = GraphIO(num_layers, loaded.spec.num_kv_heads, loaded.spec.head_dim, loaded.spec.vocab_size)
    args = example_inputs(loaded, num_layers=num_layers)
    b, s, p, t = (torch.export.Dim(n) for n in (BATCH, SEQ, PAST, TOTAL))
    dynamic_shapes = {
        "input_ids": {0: b, 1: s},
        "attention_mask": {0: b, 1: t},
        "position_ids": {0: b, 1: s},
        "past": tuple([{0: b, 2: p}] * (2 * num_layers)),
    }
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
    forget_matched_graphs()  # optimize=True ran onnxscript's module-level rules on this graph
    forget_removed_io(program.model.graph)  # the lifted parameters, inputs no more
    return program.model


def _record_windows(model, loaded: LoadedModel) -> None:
    """Write each layer's attention window into the graph (passes/kv_cache_scatter.py builds its masks
    from it: the exported mask it replaces is the only place the window was), and whether its residual
    stream needs FP32. Only where a layer slides / the stream does, so other exports stay byte-identical."""
    from passes.kv_cache_scatter import LAYER_WINDOWS
    from passes.residual_fp32 import mark

    windows = loaded.spec.layer_windows
    if any(windows):
        model.graph.metadata_props[LAYER_WINDOWS] = ",".join(str(w) for w in windows)
    mark(model, loaded.spec.architecture)  # a residual stream beyond FP16 (passes/residual_fp32.py)


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
