"""Weight formats side by side: llmc's recipes vs the onnxruntime-genai model builder, same model, same text.

For a model directory (default: the shipped trained model), in one run:
  - llmc: export once, the fp16 recipe's passes, then each quantizer (timed), saved as ONNX;
  - the onnxruntime-genai builder (`python -m onnxruntime_genai.models.builder`, int4, cpu,
    accuracy_level=1) with algo rtn / k_quant_mixed at block 32 and 128 (timed, if importable);
  - every graph scored on the same held-out windows against the PyTorch FP32 reference:
    perplexity delta, mean KL, teacher-forced greedy agreement on 4 x 64 continuation tokens, bytes.

    python benchmarks/quant_compare.py [MODEL_DIR] [--out /tmp/quant-compare] [--genai-path DIR]

Prints a markdown table (paste into benchmarks/NOTES.md) and writes results.json in --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compiler.frontend.calibrate import calibrate, tokenize_windows  # noqa: E402
from compiler.frontend.corpus import default_calibration_text, default_eval_text  # noqa: E402
from compiler.frontend.default_model import default_model_dir  # noqa: E402
from compiler.frontend.export import export_onnx  # noqa: E402
from compiler.frontend.load import load_model  # noqa: E402
from compiler.frontend.run_passes import run_passes  # noqa: E402
from compiler.measure.quality import default_prompts  # noqa: E402
from compiler.recipe import load_recipe  # noqa: E402
from compiler.graph_io import io_from_model  # noqa: E402
from compiler.runtime.onnx_executor import OnnxRuntimeExecutor  # noqa: E402
from compiler.graph_io import ExportedGraph
from compiler.recipe import Recipe, Tolerance  # noqa: E402
from passes import PassContext, needs_calibration  # noqa: E402

LLMC_VARIANTS = {
    "llmc fp16": [],
    "llmc int4-rtn b128": [("quantize-int4-rtn", {"block_size": 128})],
    "llmc int4-rtn b32": [("quantize-int4-rtn", {"block_size": 32})],
    "llmc int4-awq b128": [("quantize-int4-awq", {"block_size": 128})],
    "llmc int4-awq b32": [("quantize-int4-awq", {"block_size": 32})],
    "llmc int4-awq b32 + int8 lm_head": [("quantize-int8-wo", {"targets": [], "include_lm_head": True}),
                                         ("quantize-int4-awq", {"block_size": 32})],
    "llmc int4-gptq b128": [("quantize-int4-gptq", {"block_size": 128})],
    "llmc int4-gptq b32": [("quantize-int4-gptq", {"block_size": 32})],
    "llmc int4-gptq b128 act_order": [("quantize-int4-gptq", {"block_size": 128, "act_order": True})],
    "llmc int4-gptq b32 act_order": [("quantize-int4-gptq", {"block_size": 32, "act_order": True})],
    "llmc int4-awq+gptq b128": [("quantize-int4-gptq", {"block_size": 128, "awq": True})],
    "llmc int4-awq+gptq b32": [("quantize-int4-gptq", {"block_size": 32, "awq": True})],
    "llmc int8-wo": [("quantize-int8-wo", {})],
    "llmc fp8-wo": [("quantize-fp8-wo", {})],
}
GENAI_VARIANTS = {f"genai int4 {algo} b{b}": (algo, b) for algo in ("rtn", "k_quant_mixed") for b in (128, 32)}

# The builder (0.18.0) reads Gemma 3's rope as a flat `rope_parameters["rope_type"]` plus
# `rope_local_base_freq`, the pre-transformers-5 config layout; transformers 5 nests it per layer type
# and the builder fails with KeyError 'rope_type'. This runs the builder with the loaded config put back
# in the old layout (the same thetas: global 1e6, local 1e4 on Gemma 3 270M); flat configs pass unchanged.
GENAI_BUILDER = """
import runpy, transformers
_load = transformers.AutoConfig.from_pretrained
def _flat(*args, **kwargs):
    config = _load(*args, **kwargs)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and {"full_attention", "sliding_attention"} <= rope.keys():
        config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
        config.rope_theta = rope["full_attention"]["rope_theta"]
        config.rope_parameters = dict(rope["full_attention"])
    return config
transformers.AutoConfig.from_pretrained = _flat
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
"""


def files_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def llmc_logits(path: Path, windows: np.ndarray) -> np.ndarray:
    ex = OnnxRuntimeExecutor(path)
    out = []
    for i in range(0, len(windows), 4):
        chunk = windows[i:i + 4]
        ex.start(len(chunk))
        out.append(ex.step(chunk, np.tile(np.arange(chunk.shape[1]), (len(chunk), 1))).astype(np.float32))
    return np.concatenate(out)


def genai_logits(path: Path, windows: np.ndarray, head_dim: int) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    # A model with sliding-window layers (Gemma 3) runs GroupQueryAttention on a cache buffer of at
    # least the window ("sliding_window_cache: KV cache capacity (0) must be at least local_window_size"):
    # an empty past of that capacity; attention_mask still says only the window's tokens are valid.
    config = path.parent / "genai_config.json"
    sliding = json.loads(config.read_text())["model"]["decoder"].get("sliding_window") if config.exists() else None
    capacity = int(sliding["window_size"]) if sliding else 0
    out = []
    for i in range(0, len(windows), 4):
        chunk = windows[i:i + 4]
        feeds = {"input_ids": chunk, "attention_mask": np.ones_like(chunk)}
        if "position_ids" in inputs:
            feeds["position_ids"] = np.tile(np.arange(chunk.shape[1]), (len(chunk), 1))
        for name, meta in inputs.items():
            if name.startswith("past_key_values"):
                dtype = np.float16 if "float16" in meta.type else np.float32
                feeds[name] = np.zeros((len(chunk), meta.shape[1], capacity, head_dim), dtype)
        out.append(sess.run(["logits"], feeds)[0].astype(np.float32))
    return np.concatenate(out)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("/tmp/quant-compare"))
    ap.add_argument("--genai-path", default=os.environ.get("GENAI_PATH", ""),
                    help="extra PYTHONPATH where onnxruntime_genai is installed (pip install --target DIR onnxruntime-genai)")
    ap.add_argument("--only", default="", help="run only variants whose name starts with one of these comma-separated prefixes "
                         "(e.g. 'genai' or 'llmc int4-rtn b128,llmc int4-gptq')")
    ap.add_argument("--calib-rows", type=int, default=1024,
                    help="calibration rows kept per linear layer (the build keeps 1024 of its 4096 tokens)")
    args = ap.parse_args()
    prefixes = args.only.split(",")
    wanted = lambda name: any(name.startswith(p) for p in prefixes)  # noqa: E731
    import torch

    model_dir = (args.model or default_model_dir()).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(model_dir)
    eval_text = default_eval_text()
    windows = np.array(tokenize_windows(loaded.tokenizer, eval_text, 128, 16), np.int64)
    # Teacher-forced agreement without a cache: prompt + the reference's greedy continuation in one window.
    from compiler.measure.validate import reference_decode

    prompts = [loaded.tokenizer(p).input_ids for p in default_prompts(eval_text)]
    forced = [reference_decode(loaded, p, 63)[1] for p in prompts]
    agree_rows = [p + f[:-1] for p, f in zip(prompts, forced)]
    width = max(map(len, agree_rows))
    agree_ids = np.array([r + [0] * (width - len(r)) for r in agree_rows], np.int64)

    with torch.no_grad():
        ref = loaded.model(input_ids=torch.tensor(windows), use_cache=False).logits.numpy()
    targets = windows[:, 1:]

    def window_stats(got: np.ndarray) -> tuple[float, float, float]:
        """(reference nll, nll, KL) means, one window's float64 log-softmax at a time: a 262144-wide
        vocabulary makes all 16 windows' float64 log-probabilities 4.3 GB per side."""
        nll_ref = nll = kl = 0.0
        for i in range(len(windows)):
            lr, lg = log_softmax(ref[i]), log_softmax(got[i])
            nll_ref -= float(np.take_along_axis(lr[:-1], targets[i][:, None], -1).sum())
            nll -= float(np.take_along_axis(lg[:-1], targets[i][:, None], -1).sum())
            kl += float((np.exp(lr) * (lr - lg)).sum())
        return nll_ref / targets.size, nll / targets.size, kl / windows.size

    def score(name: str, logits_fn, path: Path, seconds: float) -> dict:
        nll_ref, nll, kl = window_stats(logits_fn(path, windows))
        agree_logits = logits_fn(path, agree_ids)
        hits = total = 0
        for row, (p, f) in enumerate(zip(prompts, forced)):
            picks = agree_logits[row, len(p) - 1: len(p) - 1 + len(f)].argmax(-1)
            hits += int((picks == np.array(f)).sum())
            total += len(f)
        r = {"variant": name, "ppl_ref": math.exp(nll_ref), "ppl": math.exp(nll), "kl": kl, "agreement": hits / total,
             "bytes": files_bytes(path), "quantize_s": seconds}
        r["ppl_delta"] = r["ppl"] / r["ppl_ref"] - 1
        print(json.dumps(r), flush=True)
        return r

    results = []
    base = ExportedGraph(export_onnx(loaded).model, None)
    fp16, _ = run_passes(ExportedGraph(base.model, io_from_model(base.model)), load_recipe("fp16"),
                         PassContext(max_positions=256))
    import onnx_ir as ir

    ir.save(fp16.model, args.out / "fp16.onnx")
    start = time.perf_counter()
    cal = calibrate(loaded, default_calibration_text(), sample_rows=args.calib_rows) if any(wanted(n) for n in LLMC_VARIANTS if n != "llmc fp16") else None
    calib_s = time.perf_counter() - start
    for name, steps in LLMC_VARIANTS.items():
        if not wanted(name) and name != "llmc fp16":
            continue
        model = ir.load(args.out / "fp16.onnx")
        start = time.perf_counter()
        if steps:
            recipe = Recipe(name, "", tuple(s[0] for s in steps), Tolerance(1, 1, 0), pass_options=tuple(s[1] for s in steps))
            model = run_passes(ExportedGraph(model, io_from_model(model)), recipe,
                               PassContext(max_positions=256, activations=cal.activations))[0].model
        seconds = time.perf_counter() - start + (calib_s if needs_calibration(s[0] for s in steps) else 0.0)
        path = args.out / (name.replace(" ", "_").replace("+", "") + ".onnx")
        ir.save(model, path)
        results.append(score(name, llmc_logits, path, seconds))

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [args.genai_path, os.environ.get("PYTHONPATH")])))
    for name, (algo, block) in GENAI_VARIANTS.items():
        if not wanted(name):
            continue
        out = args.out / name.replace(" ", "_")
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", GENAI_BUILDER, "-i", str(model_dir), "-o", str(out),
                               "-p", "int4", "-e", "cpu", "-c", str(args.out / "genai-cache"), "--extra_options",
                               "accuracy_level=1", f"block_size={block}", f"algo_config={algo}"],
                              capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
        if proc.returncode:
            print(f"{name}: builder failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        results.append(score(name, lambda p, w: genai_logits(p, w, loaded.spec.head_dim), out / "model.onnx", seconds))

    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| variant | ppl (ref {:.3f}) | delta | KL | agreement | bytes | quantize s |".format(results[0]["ppl_ref"]))
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['ppl']:.3f} | {r['ppl_delta']:+.2%} | {r['kl']:.4f} | {r['agreement']:.1%} | "
              f"{r['bytes']:,} | {r['quantize_s']:.1f} |")


if __name__ == "__main__":
    main()
