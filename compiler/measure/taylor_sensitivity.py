"""Per-matmul quantization damage estimated in one forward + backward per window (Fisher / Taylor).

Why: measuring one graph per matmul (precision_search.measure_sensitivity) costs a full onnxruntime
evaluation per matmul: ~2 s each on the bundled model, minutes each on a real model's 126-210
matmuls. The precision search needs an order, not a measurement, for every unit: the measured
bisection over that order is the proof (compiler/measure/precision_search.py).

Method (ModelOpt's `auto_quantize` score, NVIDIA TensorRT Model Optimizer, after the second-order
Taylor / empirical-Fisher expansion of the loss that HAWQ-V2 (Dong et al. 2020) and SqueezeLLM (Kim
et al. 2023) use for mixed precision): a weight change dW of one linear layer changes its output by
dY = X dW^T, and the loss by dL ~ 1/2 sum_t dY_t^T F_t dY_t with F_t approximated by the diagonal of
the empirical Fisher, g_t g_t^T with g_t = dL/dY_t of the next-token cross entropy of the calibration
text. So the damage of format f on that layer is

    D_f = 1/2 sum over tokens and output channels of (G * (X (W_f - W)^T))^2    / tokens,

in nats per token (an estimate of the KL the format adds), with X the layer's input and G the
gradient at its output, both captured by hooks during one forward + backward of the FP32 PyTorch
model per window; every format's D_f comes from the same X and G, with no further forwards.
Damage is additive over layers by construction, which is what the exact solver
(compiler/measure/lagrangian.py) needs.

W_f is the weight the format's own pass produces, read from the pass (`format_deltas`): AWQ folds a
scale s into the weight (W diag(s), and up_proj's columns by down_proj's 1/s) and its producer,
so the delta in the model's own coordinates is (Q(W') - W') * W / W' elementwise, W' the scaled
weight the pass rounded. A zero weight has no defined ratio; its rounding error (zero for symmetric
RTN, small for GPTQ's feedback) is dropped.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from passes.weight_quant import QuantizedWeight, WeightQuantPass


def format_deltas(model, quantizer: WeightQuantPass) -> dict[str, np.ndarray]:
    """Run `quantizer` on `model` (an onnx_ir Model, changed in place: give it a copy) and return, per
    module it quantized, the weight change it made in the model's coordinates: FP16 [K, N]."""
    originals: dict[str, np.ndarray] = {}
    deltas: dict[str, np.ndarray] = {}
    prepare, quantize = quantizer.prepare, quantizer.quantize

    def prepare_(m, targets):
        for t in targets:
            originals[t.name] = t.weight.const_value.numpy().astype(np.float32)  # a copy, before any folding
        prepare(m, targets)

    def quantize_(w, target):
        qw = quantize(w, target)
        scale = qw.scale.astype(np.float16) if qw.scale.dtype != w.dtype and w.dtype == np.float16 else qw.scale
        dq = QuantizedWeight(qw.q, scale, qw.axis, qw.block_size).dequantize().astype(np.float32)
        scaled = w.astype(np.float32)
        original = originals.pop(target.name)
        ratio = np.divide(original, scaled, out=np.ones_like(original), where=scaled != 0)
        deltas[target.name] = ((dq - scaled) * ratio).astype(np.float16)
        return qw

    quantizer.prepare, quantizer.quantize = prepare_, quantize_
    try:
        quantizer(model)
    finally:
        del quantizer.prepare, quantizer.quantize  # back to the class's methods
    return deltas


def _module(model, name: str):
    return model.get_output_embeddings() if name == "lm_head" else model.get_submodule(name)


def estimate_damage(model, windows: list[list[int]], deltas: dict[str, dict[str, np.ndarray]],
                    on_progress: Callable[[int, int], None] | None = None) -> dict[str, dict[str, float]]:
    """D_f per module and format label (nats/token) over `windows` of token ids.

    deltas: module name -> format label -> FP16 [K, N] weight change (format_deltas). One forward and
    one backward per window; parameters get no gradients (the embedding output is made to require
    one, so the backward reaches every layer)."""
    import torch

    tensors = {name: {label: torch.from_numpy(d) for label, d in per.items()} for name, per in deltas.items()}
    totals = {name: {label: 0.0 for label in per} for name, per in deltas.items()}
    hooks = []

    def capture(name):
        def forward_hook(_module, args, out):
            x = args[0].detach()

            def backward_hook(g, x=x):
                g2 = g.detach().float().reshape(-1, g.shape[-1]).square()
                xf = x.float().reshape(-1, x.shape[-1])
                for label, d in tensors[name].items():
                    dy = xf @ d.float()  # X dW^T, with dW^T stored [K, N]
                    totals[name][label] += 0.5 * float((g2 * dy.square_()).sum())
            if out.requires_grad:
                out.register_hook(backward_hook)
        return forward_hook

    for name in deltas:
        hooks.append(_module(model, name).register_forward_hook(capture(name)))
    embedding = model.get_input_embeddings()
    hooks.append(embedding.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True)))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    tokens = 0
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for i, window in enumerate(windows):
                ids = torch.tensor([window])
                logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
                loss.backward()
                tokens += len(window) - 1
                del logits, loss
                if on_progress:
                    on_progress(i + 1, len(windows))
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return {name: {label: value / max(tokens, 1) for label, value in per.items()} for name, per in totals.items()}
