"""GPTQ's options on a real checkpoint, in PyTorch alone: which variant to build.

Why: a build re-runs calibration and measures one recipe (~10 minutes on the 2-core machine); this
script calibrates once and scores many weight roundings on the quality stage's held-out windows.
Each decoder Linear's weight is cast to FP16 (as cast-fp16 leaves it), rounded by llmc's own
functions (passes/quantize_int4_rtn.py `quantize_blockwise`, passes/quantize_int4_gptq.py `gptq`),
dequantized and put back into the FP32 PyTorch model. The graph's FP16 activations are not modelled:
the figures rank variants; the build's quality stage is the measurement of record.

    python benchmarks/gptq_sweep.py /work/models/gemma3-270m [--only rtn-b128,gptq-b128]

`awq-*` variants run the pass's own searches (`search_scales` per group sharing an input, `search_clip`
per matmul) and fold as the pass does, in float: W_eff = diag(1/s) DQ(Q(diag(s) W)); o_proj keeps s = 1.
`asym-*` / `awq-asym-*` round to a min/scale grid (16 levels from each block's min to its max): a screen
of asymmetric INT4, which TensorRT's weight DequantizeLinear cannot express (zero point must be 0), so
no recipe emits it.

`+emb8` variants also round the (tied) embedding table per row to INT8 as quantize-int8-embedding
does (`quantize_per_channel_int8` of E^T), so the lm_head reads it too; `+emb4` variants round it to
block-wise INT4 along H as quantize-int4-embedding does (`quantize_rows_int4`; block 128, `-b64` and `-b32` smaller).

Calibration rows: the build keeps 1024 evenly strided rows of its 4096 calibration tokens per layer
(`calibrate(sample_rows=1024)`); this script keeps all 4096 and takes every 4th for the 1024-row
variants, the same rows.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compiler.frontend.calibrate import calibrate, tokenize_windows  # noqa: E402
from compiler.frontend.corpus import default_calibration_text, default_eval_text  # noqa: E402
from compiler.frontend.load import load_model  # noqa: E402
from passes.quantize_int4_embedding import quantize_rows_int4  # noqa: E402
from passes.quantize_int4_gptq import gptq, hessian  # noqa: E402
from passes.quantize_int4_rtn import int4_block, quantize_blockwise  # noqa: E402
from passes.quantize_int8_wo import quantize_per_channel_int8  # noqa: E402
from passes.weight_quant import QuantizedWeight  # noqa: E402

# name -> (method, block, options): rows = calibration rows the Hessian is made of
VARIANTS = {
    "rtn-b128": ("rtn", 128, {}),
    "rtn-b64": ("rtn", 64, {}),
    "rtn-b32": ("rtn", 32, {}),
    "asym-b128": ("asym", 128, {}),
    "asym-b64": ("asym", 64, {}),
    "asym-b32": ("asym", 32, {}),
    "awq-b128": ("awq", 128, {"clip": True}),
    "awq-b64": ("awq", 64, {"clip": True}),
    "awq-b32": ("awq", 32, {"clip": False}),
    "awq-b32-clip": ("awq", 32, {"clip": True}),
    "awq-duo-b128": ("awq", 128, {"clip": True, "duo": True}),
    "awq-duo-b64": ("awq", 64, {"clip": True, "duo": True}),
    "awq-duo-b32": ("awq", 32, {"clip": False, "duo": True}),
    "awq-duo-b32-clip": ("awq", 32, {"clip": True, "duo": True}),
    "awq-asym-b128": ("awq", 128, {"clip": False, "asym": True}),
    "awq-asym-b64": ("awq", 64, {"clip": False, "asym": True}),
    "gptq-b128": ("gptq", 128, {"rows": 1024}),
    "gptq-b128-rows4096": ("gptq", 128, {"rows": 4096}),
    "gptq-b128-damp0.1": ("gptq", 128, {"rows": 1024, "damp": 0.1}),
    "gptq-b128-clip": ("gptq", 128, {"rows": 1024, "clip": True}),
    "gptq-b128-act_order": ("gptq", 128, {"rows": 1024, "act_order": True}),
    "gptq-b128-rows4096-clip": ("gptq", 128, {"rows": 4096, "clip": True}),
    "gptq-b128-rows4096-clip-act_order": ("gptq", 128, {"rows": 4096, "clip": True, "act_order": True}),
    "gptq-b64-rows4096-clip": ("gptq", 64, {"rows": 4096, "clip": True}),
    "fp16+emb8": ("none", 0, {"emb8": True}),
    "fp16+emb4": ("none", 0, {"emb4": 128}),
    "fp16+emb4-b64": ("none", 0, {"emb4": 64}),
    "fp16+emb4-b32": ("none", 0, {"emb4": 32}),
    "rtn-b128+emb8": ("rtn", 128, {"emb8": True}),
}


# AWQ as the pass folds it (passes/quantize_int4_awq.py): the groups whose producer absorbs 1/s
# (q/k/v after the input norm, gate/up after the pre-MLP norm, down_proj into up_proj); o_proj keeps s = 1.
# In float arithmetic the fold is W_eff = diag(1/s) DQ(Q(diag(s) W)).
_AWQ_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("down_proj",))


def _awq_scales(linears, original, cal, largest, duo=False):
    from passes.quantize_int4_awq import group_search_weight, search_rows, search_scales

    torch.set_num_threads(2)
    scales = {}
    layers = sorted({n.rsplit(".", 2)[0] for n in linears})
    for layer in layers:
        for group in _AWQ_GROUPS:
            names = [n for n in linears if n.startswith(layer + ".") and n.rsplit(".", 1)[1] in group]
            if not names:
                continue
            ws = [original[n].T.contiguous().numpy().astype(np.float16) for n in names]
            block, _ = int4_block(ws[0].shape[0], largest)
            x = torch.from_numpy(np.ascontiguousarray(cal.activations[names[0]], dtype=np.float32))
            w = group_search_weight(ws)
            s, *_ = search_scales(search_rows(x, w), w, block, duo=duo)
            scales.update({n: s for n in names})
    return scales


def _awq_weight(w_KN, block, activations, s, clip, asym=False):
    from passes.quantize_int4_awq import search_clip, search_rows

    x = torch.from_numpy(np.ascontiguousarray(activations, dtype=np.float32))
    w = w_KN.astype(np.float32)
    if s is not None:
        w = (torch.from_numpy(w) * s[:, None]).numpy().astype(np.float16).astype(np.float32)
        x = x / s
    if asym:  # the scales AWQ's (symmetric) search chose, then the min/scale grid
        dq = _asym_screen(w.astype(np.float16), block).astype(np.float32)
    else:
        ratios = search_clip(search_rows(x, torch.from_numpy(w)), torch.from_numpy(w), block).numpy() if clip else None
        q, scale = quantize_blockwise(w.astype(np.float16), block, ratios)
        dq = QuantizedWeight(q, scale, 0, block).dequantize().astype(np.float32)
    return dq if s is None else dq / s.numpy()[:, None]


def _asym_screen(w_KN, block):
    k, n = w_KN.shape
    b = w_KN.astype(np.float32).reshape(k // block, block, n)
    lo, hi = b.min(1), b.max(1)
    s = np.maximum(hi - lo, 1e-8) / 15
    q = np.clip(np.rint((b - lo[:, None]) / s[:, None]), 0, 15)
    return (q * s[:, None] + lo[:, None]).reshape(k, n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--window", type=int, default=128)
    args = ap.parse_args()
    wanted = [v for v in VARIANTS if not args.only or v in args.only.split(",")]
    torch.set_num_threads(2)
    loaded = load_model(args.model)
    model = loaded.model.float().eval()
    start = time.perf_counter()
    if any(VARIANTS[v][0] in ("gptq", "awq") for v in wanted):
        cal = calibrate(loaded, default_calibration_text(), sample_rows=4096)
        print(f"calibrated {cal.tokens} tokens in {time.perf_counter() - start:.0f} s", flush=True)
    embedding = model.get_input_embeddings().weight
    original_embedding = embedding.detach().clone()
    windows = torch.tensor(tokenize_windows(loaded.tokenizer, default_eval_text(), args.window, args.windows))
    targets = windows[:, 1:]
    linears = {name: m for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")}
    original = {name: m.weight.detach().clone() for name, m in linears.items()}

    def logprobs() -> list[torch.Tensor]:
        with torch.no_grad():
            return [torch.log_softmax(model(w[None]).logits[0, :-1].float(), -1) for w in windows]

    ref = logprobs()
    ref_nll = -sum(float(lp.gather(-1, t[:, None]).sum()) for lp, t in zip(ref, targets)) / targets.numel()
    print(f"reference perplexity {math.exp(ref_nll):.3f} ({targets.numel()} tokens)", flush=True)
    hessians: dict[tuple, torch.Tensor] = {}
    for label in wanted:
        method, largest, opts = VARIANTS[label]
        opts = dict(opts)
        rows = opts.pop("rows", None)
        start = time.perf_counter()
        if opts.pop("emb8", False):
            qw = quantize_per_channel_int8(original_embedding.T.contiguous().numpy().astype(np.float16))
            with torch.no_grad():
                embedding.copy_(torch.from_numpy(qw.dequantize().astype(np.float32).T.copy()))
        if emb4 := opts.pop("emb4", None):
            table = original_embedding.numpy().astype(np.float16)
            block, _ = int4_block(table.shape[1], emb4)
            qw = quantize_rows_int4(table, block)
            with torch.no_grad():
                embedding.copy_(torch.from_numpy(qw.dequantize().astype(np.float32)))
        awq_scales = _awq_scales(linears, original, cal, largest, opts.get("duo", False)) if method == "awq" else {}
        for name, module in linears.items() if method != "none" else ():
            w_KN = original[name].T.contiguous().numpy().astype(np.float16)
            block, _ = int4_block(w_KN.shape[0], largest)
            if method == "rtn":
                q, scale = quantize_blockwise(w_KN, block)
            elif method == "awq":
                dq = _awq_weight(w_KN, block, cal.activations[name], awq_scales.get(name), opts["clip"],
                                 opts.get("asym", False))
                with torch.no_grad():
                    module.weight.copy_(torch.from_numpy(dq.T.copy()))
                continue
            elif method == "asym":
                dq = _asym_screen(w_KN, block)
                with torch.no_grad():
                    module.weight.copy_(torch.from_numpy(dq.T.copy()))
                continue
            else:
                key = (name, rows)
                if key not in hessians:
                    x = torch.from_numpy(np.ascontiguousarray(cal.activations[name]))
                    hessians.clear()  # one at a time: q/k/v and gate/up are consecutive and share it
                    hessians[key] = hessian(x[:: 4096 // rows] if rows < len(x) else x)
                q, scale, _ = gptq(w_KN, hessians[key], block, **opts)
                import ml_dtypes
                q = q.astype(ml_dtypes.int4)
            dq = QuantizedWeight(q, scale, 0, block).dequantize().astype(np.float32)
            with torch.no_grad():
                module.weight.copy_(torch.from_numpy(dq.T.copy()))
        seconds = time.perf_counter() - start
        got = logprobs()
        nll = -sum(float(lp.gather(-1, t[:, None]).sum()) for lp, t in zip(got, targets)) / targets.numel()
        kl = sum(float((r.exp() * (r - g)).sum()) for r, g in zip(ref, got)) / targets.numel()
        agree = sum(int((r.argmax(-1) == g.argmax(-1)).sum()) for r, g in zip(ref, got)) / targets.numel()
        print(f"{label}: perplexity {math.exp(ref_nll):.3f} -> {math.exp(nll):.3f} ({math.exp(nll - ref_nll) - 1:+.2%}), "
              f"KL {kl:.4f}, next-token agreement {agree:.1%}, quantize {seconds:.0f} s", flush=True)
        with torch.no_grad():
            for name, module in linears.items():
                module.weight.copy_(original[name])
            embedding.copy_(original_embedding)


if __name__ == "__main__":
    main()
