"""Fixed-capacity KV cache updated in place: Concat(past, new) -> TensorScatter(cache, new, write_index).

Why: the exported graph grows the cache with Concat, so every decode step copies all of it
(reads P and writes P+1 tokens of K and V per layer) and its shape changes every step. A serving
engine keeps one buffer per layer of capacity --max-seq (a static dim) and writes only the new
tokens; ONNX opset-24 TensorScatter expresses exactly that and TensorRT maps it to its
KV_CACHE_UPDATE layer, which updates the buffer in place when the runtime binds the output
`present.{i}.*` to the same memory as the input `past_key_values.{i}.*`.

The write index of sequence b is `position_ids[b, 0]`: the token at position p lives in cache
slot p, so the caller feeds only input_ids, position_ids and the cache buffers. The causal mask
becomes `slot <= position_ids[b, i]`, which is correct for prefill, decode (queries at the end of
the cache) and batches whose sequences have different lengths (each row has its own positions;
right-padded prompt tokens write slots that the sequence's later tokens overwrite before any
real query can see them). The `attention_mask` input is no longer needed and is removed.

Sliding-window layers (Mistral; Gemma 3's local layers) see only the last `window` positions:
their mask is `pos - window < slot <= pos`, the window HF's `sliding_window_overlay` applies, so
--max-seq may exceed the window. Which layers slide comes from the export (`LAYER_WINDOWS`, the
graph metadata compiler/frontend/export.py writes from config.json), one window per layer, 0 = full.

Requires gqa-native-attention first: Attention must read the cache values directly.
"""

from __future__ import annotations


import numpy as np
import onnx_ir as ir

from compiler.graph_io import PRESENT_RE, past_name

from .base import LlmcPass, register_constant

POSITION_IDS = "position_ids"
OPSET = 24  # TensorScatter
LAYER_WINDOWS = "llmc.layer_windows"  # graph metadata: comma-separated attention window per layer, 0 = full


def layer_windows(model: ir.Model) -> tuple[int, ...]:
    """The per-layer windows the export recorded (empty: no layer slides)."""
    text = model.graph.metadata_props.get(LAYER_WINDOWS, "")
    return tuple(int(w) for w in text.split(",")) if text else ()


def _cache_concats(model: ir.Model) -> list[tuple[ir.Node, ir.Value, ir.Value]]:
    """(Concat node, past input, graph output) for every present.{i}.{key,value} made by Concat."""
    inputs = {v.name: v for v in model.graph.inputs}
    found = []
    for out in model.graph.outputs:
        match = PRESENT_RE.fullmatch(out.name or "")
        node = out.producer()
        if not match or node is None or node.op_type != "Concat":
            continue
        past = inputs.get(past_name(int(match[1]), match[2]))
        if past is None or node.inputs[0] is not past or len(node.inputs) != 2:
            raise ir.passes.PreconditionError(f"{out.name} is a Concat, but not of {past and past.name} and new entries")
        if node.attributes["axis"].as_int() not in (2, -2):
            raise ir.passes.PreconditionError(f"{node.name}: cache Concat on axis {node.attributes['axis'].as_int()}, not 2")
        found.append((node, past, out))
    return found


class KvCacheScatterPass(LlmcPass):
    """Concat-grown cache -> fixed-capacity buffers updated by TensorScatter at position_ids[:, 0].

    The capacity is a static dim (TensorRT: "the KV cache tensor must have a static sequence
    length dimension"), equal to the engine's --max-seq.
    """


    @classmethod
    def from_context(cls, ctx, **options):
        return cls(capacity=ctx.max_positions, **options)

    def __init__(self, capacity: int, windows: tuple[int, ...] | None = None):
        """windows: the attention window of each layer (0 = full); None reads the export's LAYER_WINDOWS."""
        super().__init__()
        self.capacity = capacity
        self.windows = windows

    def requires(self, model: ir.Model) -> None:
        if POSITION_IDS not in {v.name for v in model.graph.inputs}:
            raise ir.passes.PreconditionError(f"graph has no '{POSITION_IDS}' input")
        for node in model.graph:
            if node.op_type == "Attention":
                producer = node.inputs[1].producer()
                if producer is None or producer.op_type not in ("Concat", "TensorScatter"):
                    raise ir.passes.PreconditionError(
                        f"{node.name}: Attention's key does not come straight from the cache "
                        "(run gqa-native-attention before kv-cache-scatter)"
                    )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        concats = _cache_concats(model)
        if not concats:
            return ir.passes.PassResult(model, modified=False)
        position_ids = next(v for v in graph.inputs if v.name == POSITION_IDS)
        attention_windows = self._attention_windows(model, concats)
        first = graph.node(0)

        # write_index[b] = position_ids[b, 0]; slot[j] = j for j < capacity; mask = slot <= position.
        zero = register_constant(graph, "kv_cache.zero", np.array(0, np.int64))
        one = register_constant(graph, "kv_cache.one", np.array(1, np.int64))
        slot_axes = register_constant(graph, "kv_cache.slot_axes", np.array([0, 1, 2], np.int64))
        pos_axes = register_constant(graph, "kv_cache.pos_axes", np.array([1, 3], np.int64))
        some_past = concats[0][1]
        nodes = [
            ir.node("Gather", [position_ids, zero], attributes={"axis": 1}, name="kv_cache.write_index"),
            ir.node("Shape", [some_past], attributes={"start": 2, "end": 3}, name="kv_cache.capacity_1d"),
        ]
        write_index = nodes[0].outputs[0]
        write_index.name = "kv_cache.write_index"
        nodes.append(ir.node("Squeeze", [nodes[1].outputs[0]], name="kv_cache.capacity"))
        nodes.append(ir.node("Range", [zero, nodes[2].outputs[0], one], name="kv_cache.slots"))
        nodes.append(ir.node("Unsqueeze", [nodes[3].outputs[0], slot_axes], name="kv_cache.slots_1x1x1xT"))
        nodes.append(ir.node("Unsqueeze", [position_ids, pos_axes], name="kv_cache.positions_Bx1xSx1"))
        nodes.append(ir.node("LessOrEqual", [nodes[4].outputs[0], nodes[5].outputs[0]], name="kv_cache.causal_mask"))
        mask = nodes[-1].outputs[0]
        mask.name = "kv_cache.causal_mask_Bx1xSxT"
        masks = {0: mask}
        for window in sorted({w for w in attention_windows.values() if w > 0}):
            # in_window = slot > pos - window, the same Bx1xSxT broadcast as the causal mask
            floor = ir.node("Sub", [nodes[5].outputs[0], register_constant(graph, f"kv_cache.window_{window}",
                                                                 np.array(window, np.int64))],
                            name=f"kv_cache.window_floor_{window}")
            inside = ir.node("Greater", [nodes[4].outputs[0], floor.outputs[0]], name=f"kv_cache.in_window_{window}")
            both = ir.node("And", [mask, inside.outputs[0]], name=f"kv_cache.window_mask_{window}")
            both.outputs[0].name = f"kv_cache.window_mask_{window}_Bx1xSxT"
            nodes += [floor, inside, both]
            masks[window] = both.outputs[0]
        graph.insert_before(first, nodes)

        batch = some_past.shape[0]
        for concat, past, present in concats:
            kv_heads, head_dim = past.shape[1], past.shape[3]
            past.shape = ir.Shape([batch, kv_heads, self.capacity, head_dim])
            scatter = ir.node("TensorScatter", [past, concat.inputs[1], write_index],
                              attributes={"axis": 2}, name=f"kv_cache.update.{present.name}")
            graph.insert_before(concat, scatter)
            new_out = scatter.outputs[0]
            new_out.type, new_out.shape = past.type, ir.Shape([batch, kv_heads, self.capacity, head_dim])
            ir.convenience.replace_all_uses_with(present, new_out, replace_graph_outputs=True)
            name = present.name
            present.name = f"{name}.concat_unused"
            new_out.name = name
        for node, window in attention_windows.items():
            node.resize_inputs(max(len(node.inputs), 4))
            node.replace_input_with(3, masks[window])
        ir.passes.common.RemoveUnusedNodesPass()(model)
        for value in list(graph.inputs):
            if value.name == "attention_mask" and not value.uses():
                graph.inputs.remove(value)
        model.opset_imports[""] = max(model.opset_imports.get("", OPSET), OPSET)
        return ir.passes.PassResult(model, modified=True)

    def _attention_windows(self, model: ir.Model, concats) -> dict[ir.Node, int]:
        """Each Attention's window, by the layer of the cache Concat its key comes from (checked before
        anything changes, so a mismatch leaves the graph as it was)."""
        windows = layer_windows(model) if self.windows is None else tuple(self.windows)
        layers = {concat: int(PRESENT_RE.fullmatch(present.name)[1]) for concat, _, present in concats}
        if windows and len(windows) != len(concats) // 2:
            raise ir.passes.PreconditionError(f"{len(windows)} layer windows for {len(concats) // 2} cached layers")
        found = {}
        for node in model.graph:
            if node.op_type != "Attention":
                continue
            layer = layers.get(node.inputs[1].producer())
            if windows and layer is None:
                raise ir.passes.PreconditionError(f"{node.name}: its key is not a cache Concat, so its layer (and "
                                                  "window) is unknown")
            window = windows[layer] if windows else 0
            found[node] = window if window < self.capacity else 0  # a window the cache can't exceed masks nothing
        return found

    def ensures(self, model: ir.Model) -> None:
        left = [o.name for o in model.graph.outputs if PRESENT_RE.fullmatch(o.name or "")
                and (o.producer() is None or o.producer().op_type != "TensorScatter")]
        if left:
            raise ir.passes.PostconditionError(f"cache outputs not updated by TensorScatter: {left[:4]}")
