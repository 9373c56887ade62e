"""INT4 quantization time and peak memory on a Qwen2.5-0.5B-shaped model (random weights) on this machine.

Steps, each in its own process so that its peak RSS is its own:
  make     write the random model (Qwen2.5-0.5B's config: hidden 896, 24 layers, 14/2 heads, vocab 151936)
  export   llmc export + the fp16 recipe's passes -> fp16.onnx
  rtn      quantize-int4-rtn (block 128) on fp16.onnx
  awq      calibrate (built-in sample) + quantize-int4-awq (block 128) on fp16.onnx

    python benchmarks/quant_scale.py [--out /tmp/quant-scale]    # runs every step, prints a table
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                  tie_word_embeddings=True, use_sliding_window=False, rms_norm_eps=1e-6)


def step(name: str, out: Path) -> dict:
    import onnx_ir as ir

    start = time.perf_counter()
    info: dict = {}
    if name == "make":
        import torch
        import transformers

        from compiler.frontend.default_model import _make_tokenizer

        tok = _make_tokenizer(512)
        cfg = transformers.Qwen2Config(**QWEN25_05B, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id, architectures=["Qwen2ForCausalLM"])
        torch.manual_seed(0)
        model = transformers.Qwen2ForCausalLM(cfg).to(torch.float16)
        info["parameters"] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(out / "model", safe_serialization=True)
        tok.save_pretrained(out / "model")
    elif name == "export":
        from compiler.frontend.export import export_onnx
        from compiler.frontend.load import load_model
        from compiler.frontend.run_passes import run_passes
        from compiler.recipe import load_recipe
        from passes import PassContext

        loaded = load_model(out / "model")
        t = time.perf_counter()
        graph = export_onnx(loaded)
        info["export_s"] = time.perf_counter() - t
        t = time.perf_counter()
        final, _ = run_passes(graph, load_recipe("fp16"), PassContext(max_positions=256))
        info["passes_s"] = time.perf_counter() - t
        ir.save(final.model, out / "fp16.onnx", external_data="fp16.onnx.data")
    else:
        from compiler.frontend.calibrate import calibrate
        from compiler.frontend.corpus import default_calibration_text
        from compiler.frontend.load import load_model
        from passes import PassContext, make_pass

        activations = None
        if name == "awq":
            t = time.perf_counter()
            activations = calibrate(load_model(out / "model"), default_calibration_text(), max_windows=16).activations
            info["calibrate_s"] = time.perf_counter() - t
        model = ir.load(out / "fp16.onnx")
        t = time.perf_counter()
        pass_name = "quantize-int4-rtn" if name == "rtn" else "quantize-int4-awq"
        make_pass(pass_name, PassContext(max_positions=256, activations=activations), {"block_size": 128})(model)
        info["quantize_s"] = time.perf_counter() - t
        ir.save(model, out / f"{name}.onnx", external_data=f"{name}.onnx.data")
        info["bytes"] = sum(p.stat().st_size for p in out.glob(f"{name}.onnx*"))
    info["wall_s"] = time.perf_counter() - start
    info["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/quant-scale"))
    ap.add_argument("--step")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step:
        print("RESULT " + json.dumps(step(args.step, args.out)), flush=True)
        return
    results = {}
    for name in ("make", "export", "rtn", "awq"):
        proc = subprocess.run([sys.executable, __file__, "--step", name, "--out", str(args.out)], capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(f"{name} failed: {proc.stderr[-2000:]}")
            break
        results[name] = json.loads(line[7:])
        print(name, results[name], flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
