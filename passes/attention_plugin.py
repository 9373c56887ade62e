"""Per layer: Attention + two TensorScatter -> one `llmc::PagedAttention` node (FP8 KV cache, sliding window).

Why: TensorRT's native attention and KV_CACHE_UPDATE cover a linear FP16 cache without a window.
An FP8-E4M3 cache (half the bytes: twice the batch or context in the same memory, and half the
decode time, benchmarks/NOTES.md) and Mistral's sliding window need the custom kernel
(plugins/attention_kernel.py), which TensorRT reaches through a plugin (plugins/trt_plugin.py)
registered for this node. One node per layer does the cache write and the attention, as the
kernel does.

The node keeps the graph runnable everywhere else: the model carries a model-local ONNX function
`llmc::PagedAttention` whose body is the reference decomposition (quantize the new K/V with the
per-head scales, scatter them into the cache at position_ids[:, 0], dequantize, mask causally and
by the window, standard Attention). onnxruntime inlines it, so CI checks the plugin graph's
numerics on the CPU; TensorRT with the plugin registered builds the node as a plugin layer.

Node contract (domain "llmc", op "PagedAttention"):
  inputs  query [B, Hq, S, D], key/value [B, Hkv, S, D] (new tokens), past_key/past_value
          [B, Hkv, C, D] (FP16 or FP8-E4M3: the cache dtype picks the variant), position_ids [B, S]
          int64, k_scale/v_scale [Hkv] float32 (real = fp8 * scale; ones and unused for FP16)
  outputs attention [B, Hq, S, D], present_key/present_value (the updated cache, aliased in place)
  attrs   scale (float), window (int, 0 = none); plugin_namespace "llmc" and aot 1 tell TensorRT's
          ONNX parser to build the node with the AOT plugin of plugins/trt_plugin.py
FP8 scales are per layer and per KV head, calibrated once at build time from the graph's own K/V
on calibration tokens (amax x margin / 448); `scales=` overrides them.

Paged variant (`paged: true`, `block_size` tokens per block, default 16; op `PagedAttentionBlockTable`,
plugin of the same name): the cache stops being per sequence. Each layer's past/present become a
block pool shared by the batch, and ONE new graph input addresses it for every layer:
  past_key_values.{i}.key/value, present.{i}.key/value  [num_blocks, Hkv, block_size, D] (num_blocks dynamic)
  block_tables  [B, capacity // block_size] int32: position p of sequence b lives in
                pool[block_tables[b, p // block_size], :, p % block_size] (plugins/attention_reference.py)
  node inputs   the nine: the eight above (past_* are the pools) + block_tables
  body          quantize (FP8) and ScatterND the new K/V rows into the pool at those slots, gather each
                sequence's blocks into [B, Hkv, max_blocks * block_size, D], then the same causal + window
                mask and Attention as the linear body (slot index = position)
Why paging: a server sizes the pool for the tokens in flight, not batch x capacity, and hands blocks
to sequences as they grow (vLLM's allocator); the graph is indifferent to how the executor allocates.

Requires kv-cache-scatter (and gqa-native-attention) first; runs before or after cast-fp16 (the
body is typed by the query's dtype).
"""

from __future__ import annotations


import numpy as np
import onnx_ir as ir

from compiler.graph_io import BLOCK_TABLES, LOGITS_AT, PAST_PREFIX, PRESENT_RE

from .kv_cache_scatter import layer_windows
from .base import LlmcPass

DOMAIN = "llmc"
OP = "PagedAttention"
PAGED_OP = "PagedAttentionBlockTable"  # a separate plugin: TensorRT plugins have a fixed input list
NUM_BLOCKS = "num_blocks"  # the pool's dynamic dim
OPSET = 24
FP8_MAX = 448.0
KV_DTYPES = {"float16": None, "float8e4m3fn": ir.DataType.FLOAT8E4M3FN}


def _const_node(name: str, array: np.ndarray) -> ir.Node:
    return ir.node("Constant", [], attributes={"value": ir.tensor(array, name=name)}, name=name)


class AttentionPluginPass(LlmcPass):
    """Replace every layer's Attention + TensorScatter pair with the llmc::PagedAttention node."""

    needs_plugins = True
    check_tolerance = (0.1, 0.9)

    @classmethod
    def from_context(cls, ctx, **options):
        return cls(window=ctx.sliding_window, **options)

    def __init__(self, kv_dtype: str = "float16", window: int = 0, scales: dict[str, np.ndarray] | None = None,
                 calibration_tokens: int = 48, margin: float = 1.25, seed: int = 0, paged: bool = False,
                 block_size: int = 16):
        super().__init__()
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype {kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
        if not isinstance(paged, bool):
            raise ValueError(f"paged must be true or false, not {paged!r}")
        if not isinstance(block_size, int) or block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1 (the kernel's paged addressing), not {block_size!r}")
        self.paged = paged
        self.block_size = block_size
        self.kv_dtype = kv_dtype
        self.window = int(window or 0)
        self.scales = scales
        self.calibration_tokens = calibration_tokens
        self.margin = margin
        self.seed = seed

    @property
    def fp8(self) -> bool:
        return KV_DTYPES[self.kv_dtype] is not None

    # --- matching ---------------------------------------------------------------------------

    def _layers(self, model: ir.Model) -> list[tuple[ir.Node, ir.Node, ir.Node]]:
        """(Attention, key TensorScatter, value TensorScatter) per layer, in graph order."""
        found = []
        for node in model.graph:
            if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
                continue
            scatters = [node.inputs[i].producer() if node.inputs[i] is not None else None for i in (1, 2)]
            if any(s is None or s.op_type != "TensorScatter" for s in scatters):
                raise ir.passes.PreconditionError(
                    f"{node.name}: K/V do not come from TensorScatter (run kv-cache-scatter before attention-plugin)")
            found.append((node, scatters[0], scatters[1]))
        return found

    def requires(self, model: ir.Model) -> None:
        if "position_ids" not in {v.name for v in model.graph.inputs}:
            raise ir.passes.PreconditionError("graph has no 'position_ids' input")
        layers = self._layers(model)
        if not layers:
            raise ir.passes.PreconditionError("no Attention nodes to replace")
        scales = {round(float(a.attributes["scale"].as_float()), 6) if "scale" in a.attributes else None
                  for a, _, _ in layers}
        if len(scales) != 1 or None in scales:
            raise ir.passes.PreconditionError(f"layers differ in (or lack) the softmax scale attribute: {scales}")
        for attention, *_ in layers:
            if attention.attributes.get("is_causal") is not None and attention.attributes["is_causal"].as_int():
                raise ir.passes.PreconditionError(f"{attention.name}: is_causal=1 (expected the explicit cache mask)")
        windows = set(layer_windows(model))
        capacity = layers[0][1].inputs[0].shape[2]
        if len(windows) > 1 and not (isinstance(capacity, int) and capacity <= min(w for w in windows if w)):
            raise ir.passes.PreconditionError(
                f"the layers' attention windows differ ({sorted(windows)}, 0 = full) and the plugin applies one "
                f"window to every layer: use a native recipe (fp16, int4-awq, ...) or a cache of at most "
                f"{min(w for w in windows if w)} positions")
        if self.paged:
            if BLOCK_TABLES in {v.name for v in model.graph.inputs}:
                raise ir.passes.PreconditionError(f"graph already has a '{BLOCK_TABLES}' input (paged twice?)")
            capacity = layers[0][1].inputs[0].shape[2]
            if not isinstance(capacity, int) or capacity % self.block_size:
                raise ir.passes.PreconditionError(
                    f"paged cache: capacity {capacity} (--max-seq) is not a multiple of block_size {self.block_size}; "
                    "pick a --max-seq that is, or a block_size that divides it")

    # --- calibration ------------------------------------------------------------------------

    def _calibrate(self, model: ir.Model) -> dict[str, np.ndarray]:
        """Per-head amax of every layer's K/V on calibration tokens, run through this very graph (onnxruntime)."""
        import onnxruntime as ort

        proto = ir.serde.serialize_model(model)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        vocab = int(model.graph.outputs[0].shape[-1])
        capacity = int(next(v for v in model.graph.inputs if v.name.startswith(PAST_PREFIX)).shape[2])
        length = min(self.calibration_tokens, capacity)
        rng = np.random.default_rng(self.seed)
        feeds = {"input_ids": rng.integers(0, vocab, (1, length), dtype=np.int64),
                 "position_ids": np.arange(length, dtype=np.int64)[None]}
        types = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        for inp in session.get_inputs():
            if inp.name.startswith(PAST_PREFIX):
                feeds[inp.name] = np.zeros([1, *inp.shape[1:]], types[inp.type])
            elif inp.name == LOGITS_AT:  # a graph after last-position-logits: any one position will do
                feeds[inp.name] = np.zeros((1, 1), np.int64)
        names = [o.name for o in session.get_outputs() if PRESENT_RE.fullmatch(o.name)]
        scales = {}
        for name, value in zip(names, session.run(names, feeds)):
            amax = np.abs(value[:, :, :length].astype(np.float32)).max(axis=(0, 2, 3))
            scales[name] = np.maximum(amax * self.margin / FP8_MAX, np.finfo(np.float32).tiny).astype(np.float32)
        return scales

    # --- the function body --------------------------------------------------------------------

    def _function(self, q_dtype: ir.DataType, scale: float) -> ir.Function:
        names = ["query", "key", "value", "past_key", "past_value", "position_ids", "k_scale", "v_scale"]
        if self.paged:
            names.append(BLOCK_TABLES)
        inputs = {n: ir.Value(name=n) for n in names}
        nodes: list[ir.Node] = []

        def add(op, ins, name, **attrs):
            node = ir.node(op, ins, attributes=attrs, name=name)
            node.outputs[0].name = name
            nodes.append(node)
            return node.outputs[0]

        def const(name, array):
            node = _const_node(name, array)
            node.outputs[0].name = name
            nodes.append(node)
            return node.outputs[0]

        zero, one = const("zero", np.array(0, np.int64)), const("one", np.array(1, np.int64))
        if self.paged:
            caches, cap = self._paged_cache_update(inputs, add, const, zero, one, q_dtype)
        else:
            caches, cap = self._linear_cache_update(inputs, add, const, zero, one, q_dtype)
        slots = add("Range", [zero, cap, one], "slots")
        slots = add("Unsqueeze", [slots, const("slot_axes", np.array([0, 1, 2], np.int64))], "slots_1x1x1xT")
        pos = add("Unsqueeze", [inputs["position_ids"], const("pos_axes", np.array([1, 3], np.int64))], "pos_Bx1xSx1")
        mask = add("LessOrEqual", [slots, pos], "causal")
        if self.window > 0:
            lowest = add("Sub", [pos, const("window", np.array(self.window, np.int64))], "window_floor")
            mask = add("And", [mask, add("Greater", [slots, lowest], "in_window")], "mask")
        attention = add("Attention", [inputs["query"], caches["key_att"], caches["value_att"], mask], "attention",
                        scale=float(scale))
        outputs = [attention, caches["key"], caches["value"]]
        op = PAGED_OP if self.paged else OP
        graph = ir.Graph(list(inputs.values()), outputs, nodes=nodes, opset_imports={"": OPSET}, name=op)
        return ir.Function(DOMAIN, op, "", graph=graph, attributes=[])

    def _linear_cache_update(self, inputs, add, const, zero, one, q_dtype):
        """Cache [B, Hkv, C, D]: TensorScatter the new rows at position_ids[:, 0]; slot index = position."""
        write_index = add("Gather", [inputs["position_ids"], zero], "write_index", axis=1)
        caches = {}
        for kv, scale_name in (("key", "k_scale"), ("value", "v_scale")):
            past, new = inputs[f"past_{kv}"], inputs[kv]
            if self.fp8:
                s = inputs[scale_name]
                past_f = add("DequantizeLinear", [past, s], f"past_{kv}_f32", axis=1)
                new_dq = self._fp8_round_trip(add, new, s, kv)
                full = add("TensorScatter", [past_f, new_dq, write_index], f"cache_{kv}_f32", axis=2)
                caches[kv] = add("QuantizeLinear", [full, s], f"present_{kv}", axis=1,
                                 output_dtype=ir.DataType.FLOAT8E4M3FN)
                caches[kv + "_att"] = add("Cast", [full], f"{kv}_att", to=q_dtype)
            else:
                caches[kv] = add("TensorScatter", [past, new, write_index], f"present_{kv}", axis=2)
                caches[kv + "_att"] = caches[kv]
        cap = add("Shape", [inputs["past_key"]], "capacity_1d", start=2, end=3)
        return caches, add("Squeeze", [cap], "capacity")

    def _fp8_round_trip(self, add, new, s, kv):
        """The new rows as the FP8 cache will hold them (quantized, then dequantized to float32)."""
        new_f = add("Cast", [new], f"{kv}_f32", to=ir.DataType.FLOAT)
        new_q = add("QuantizeLinear", [new_f, s], f"{kv}_fp8", axis=1, output_dtype=ir.DataType.FLOAT8E4M3FN)
        return add("DequantizeLinear", [new_q, s], f"{kv}_dq", axis=1)

    def _paged_cache_update(self, inputs, add, const, zero, one, q_dtype):
        """Pool [N, Hkv, bs, D] + block_tables [B, M]: ScatterND the new rows at (block, head, offset), then gather
        each sequence's M blocks into a linear [B, Hkv, M*bs, D] view (slot index = position, as linear)."""
        positions = inputs["position_ids"]
        block = const("block_size", np.array(self.block_size, np.int64))
        logical = add("Div", [positions, block], "logical_block")  # positions are >= 0: Div is floor division
        offset = add("Mod", [positions, block], "block_offset")
        physical = add("GatherElements", [inputs[BLOCK_TABLES], logical], "physical_block_i32", axis=1)
        physical = add("Cast", [physical], "physical_block", to=ir.DataType.INT64)
        # ScatterND indices [B, S, Hkv, 3] = (block, kv head, offset) of every new row
        heads_1d = add("Shape", [inputs["past_key"]], "kv_heads_1d", start=1, end=2)
        index_shape = add("Concat", [add("Shape", [positions], "batch_seq"), heads_1d,
                                     const("one_1d", np.array([1], np.int64))], "index_shape", axis=0)
        heads = add("Range", [zero, add("Squeeze", [heads_1d], "kv_heads"), one], "heads")
        heads = add("Reshape", [heads, const("heads_shape", np.array([1, 1, -1, 1], np.int64))], "heads_11H1")
        per_row = const("row_axes", np.array([2, 3], np.int64))
        parts = [add("Expand", [add("Unsqueeze", [physical, per_row], "physical_BS11"), index_shape], "index_block"),
                 add("Expand", [heads, index_shape], "index_head"),
                 add("Expand", [add("Unsqueeze", [offset, per_row], "offset_BS11"), index_shape], "index_offset")]
        indices = add("Concat", parts, "scatter_indices", axis=3)
        head_dim = add("Shape", [inputs["past_key"]], "head_dim_1d", start=3, end=4)
        linear_shape = add("Concat", [const("keep_b_h_flatten", np.array([0, 0, -1], np.int64)), head_dim],
                           "linear_shape", axis=0)
        caches = {}
        for kv, scale_name in (("key", "k_scale"), ("value", "v_scale")):
            past, new = inputs[f"past_{kv}"], inputs[kv]
            if self.fp8:
                s = inputs[scale_name]
                pool = add("DequantizeLinear", [past, s], f"past_{kv}_f32", axis=1)
                new = self._fp8_round_trip(add, new, s, kv)
            else:
                pool = past
            rows = add("Transpose", [new], f"{kv}_rows_BSHD", perm=[0, 2, 1, 3])
            full = add("ScatterND", [pool, indices, rows], f"pool_{kv}" if self.fp8 else f"present_{kv}")
            if self.fp8:
                caches[kv] = add("QuantizeLinear", [full, s], f"present_{kv}", axis=1,
                                 output_dtype=ir.DataType.FLOAT8E4M3FN)
            else:
                caches[kv] = full
            blocks = add("Gather", [full, inputs[BLOCK_TABLES]], f"{kv}_blocks_BMHbD", axis=0)
            blocks = add("Transpose", [blocks], f"{kv}_blocks_BHMbD", perm=[0, 2, 1, 3, 4])
            seq = add("Reshape", [blocks, linear_shape], f"{kv}_seq")
            caches[kv + "_att"] = add("Cast", [seq], f"{kv}_att", to=q_dtype) if self.fp8 else seq
        cap = add("Shape", [caches["key_att"]], "capacity_1d", start=2, end=3)
        return caches, add("Squeeze", [cap], "capacity")

    # --- rewrite ------------------------------------------------------------------------------

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        layers = self._layers(model)
        scales = (self.scales or self._calibrate(model)) if self.fp8 else {}
        position_ids = next(v for v in graph.inputs if v.name == "position_ids")
        scale = layers[0][0].attributes["scale"].as_float()
        q_dtype = layers[0][0].inputs[0].dtype
        cache_dtype = KV_DTYPES[self.kv_dtype]
        block_tables = self._add_block_tables(graph, layers) if self.paged else None
        for index, (attention, k_scatter, v_scatter) in enumerate(layers):
            past_k, new_k = k_scatter.inputs[0], k_scatter.inputs[1]
            past_v, new_v = v_scatter.inputs[0], v_scatter.inputs[1]
            ins = [attention.inputs[0], new_k, new_v, past_k, past_v, position_ids]
            for kv, scatter in (("key", k_scatter), ("value", v_scatter)):
                # One input list for both cache dtypes (the plugin's signature is fixed); FP16 ignores the ones.
                present = scatter.outputs[0].name
                if self.fp8 and present not in scales:
                    raise ir.passes.PreconditionError(f"no FP8 scale for {present} (scales has {sorted(scales)[:4]})")
                array = np.asarray(scales[present] if self.fp8 else np.ones(past_k.shape[1]), np.float32)
                value = ir.Value(name=f"kv_scale.{index}.{kv}", const_value=ir.tensor(array, name=f"kv_scale.{index}.{kv}"))
                value.type, value.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(array.shape)
                graph.register_initializer(value)
                ins.append(value)
            if block_tables is not None:
                ins.append(block_tables)
            node = ir.node(PAGED_OP if self.paged else OP, ins, domain=DOMAIN, num_outputs=3,
                           name=f"llmc.paged_attention.{index}",
                           attributes={"scale": float(scale), "window": self.window,
                                       # what TensorRT's ONNX parser needs to map the node to the AOT plugin
                                       "plugin_namespace": DOMAIN, "aot": 1})
            graph.insert_before(attention, node)
            attn_out, present_k, present_v = node.outputs
            for old, new in ((attention.outputs[0], attn_out), (k_scatter.outputs[0], present_k),
                             (v_scatter.outputs[0], present_v)):
                new.type, new.shape = old.type, old.shape
                name = old.name
                ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
                old.name = f"{name}.replaced"
                new.name = name
            if cache_dtype is not None:
                for value in (past_k, past_v, present_k, present_v):
                    value.type = ir.TensorType(cache_dtype)
            if self.paged:  # present aliases the pool: same shape
                dims = [NUM_BLOCKS, past_k.shape[1], self.block_size, past_k.shape[3]]
                for value in (past_k, past_v, present_k, present_v):
                    value.shape = ir.Shape(dims)
            graph.remove([attention, k_scatter, v_scatter], safe=True)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        function = self._function(q_dtype, scale)
        model.functions[function.identifier()] = function
        model.opset_imports[DOMAIN] = 1
        model.opset_imports[""] = max(model.opset_imports.get("", OPSET), OPSET)
        return ir.passes.PassResult(model, modified=True)

    def _add_block_tables(self, graph: ir.Graph, layers) -> ir.Value:
        """The one `block_tables` input [batch, capacity // block_size] int32, right after position_ids."""
        past = layers[0][1].inputs[0]
        for _, *scatters in layers:
            for scatter in scatters:
                if not scatter.inputs[0].is_graph_input():
                    raise ir.passes.PreconditionError(
                        f"{scatter.name}: its cache {scatter.inputs[0].name} is not a graph input (nothing to page)")
        self._detach_shape_reads(graph, layers)
        value = ir.Value(name=BLOCK_TABLES, type=ir.TensorType(ir.DataType.INT32),
                         shape=ir.Shape([past.shape[0], past.shape[2] // self.block_size]))
        names = [v.name for v in graph.inputs]
        graph.inputs.insert(names.index("position_ids") + 1, value)
        return value

    def _detach_shape_reads(self, graph: ir.Graph, layers) -> None:
        """Shape reads of a cache input (the exporter takes the batch size from one) move to input_ids / constants:
        a pool's dim 0 counts blocks, not sequences."""
        input_ids = next((v for v in graph.inputs if v.name == "input_ids"), None)
        scatters = {id(s) for _, *pair in layers for s in pair}
        for _, *pair in layers:
            for scatter in pair:
                past = scatter.inputs[0]
                for use in list(past.uses()):
                    node = use.node
                    if id(node) in scatters:
                        continue
                    if node.op_type != "Shape" or input_ids is None:
                        raise ir.passes.PreconditionError(
                            f"{node.name} ({node.op_type}) reads cache input {past.name}: only Shape reads can be "
                            "rewired when the cache becomes a block pool")
                    rank = len(past.shape)
                    start = node.attributes["start"].as_int() if "start" in node.attributes else 0
                    end = node.attributes["end"].as_int() if "end" in node.attributes else rank
                    dims = list(range(rank))[slice(start, end)]
                    if dims == [0]:
                        node.replace_input_with(0, input_ids)
                        continue
                    parts = []
                    for d in dims:
                        if d == 0:
                            part = ir.node("Shape", [input_ids], attributes={"start": 0, "end": 1},
                                           name=f"{node.name}.batch")
                        elif isinstance(past.shape[d], int):
                            part = _const_node(f"{node.name}.dim{d}", np.array([past.shape[d]], np.int64))
                        else:
                            raise ir.passes.PreconditionError(f"{node.name}: dim {d} of {past.name} is dynamic")
                        graph.insert_before(node, part)
                        parts.append(part.outputs[0])
                    concat = ir.node("Concat", parts, attributes={"axis": 0}, name=f"{node.name}.static")
                    graph.insert_before(node, concat)
                    ir.convenience.replace_all_uses_with(node.outputs[0], concat.outputs[0], replace_graph_outputs=True)
                    graph.remove(node, safe=True)

    def ensures(self, model: ir.Model) -> None:
        left = [n.name for n in model.graph if n.op_type in ("Attention", "TensorScatter") and n.domain in ("", "ai.onnx")]
        if left:
            raise ir.passes.PostconditionError(f"native attention / cache update left after attention-plugin: {left[:4]}")


class AttentionPluginFp8KvPass(AttentionPluginPass):
    """The plugin with an FP8 (E4M3) KV cache: half the cache bytes, per-head scales calibrated in the pass."""

    check_tolerance = (0.5, 0.75)

    @classmethod
    def from_context(cls, ctx, **options):
        return cls(kv_dtype="float8e4m3fn", window=ctx.sliding_window, **options)
