"""Export wall time and peak RSS, full vs stamped, by depth, on a SmolLM-135M-shaped random Llama.

Each (method, depth) runs in its own process: the random model is built in memory, its RSS is
`model_mib`, the kernel's peak-RSS mark is reset (/proc/self/clear_refs), and `peak_mib` is the peak
during the export alone. `cpu_s` (user + system) is reported beside wall time because the machine's
cores are shared. When both methods ran at the smallest depth, their graphs are compared with
onnxruntime (logits and every present; a prefill and a decode step).

    python benchmarks/export_depth.py [--runs full:6 stamp:6 stamp:15 stamp:30 full:15]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SMOLLM_135M = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                   vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5)


def loaded_model(layers: int):
    """A random SmolLM-135M-shaped Llama as a LoadedModel (no tokenizer: export does not need one)."""
    import torch
    import transformers

    from compiler.frontend.model import LoadedModel, ModelSpec

    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=layers, **SMOLLM_135M)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    spec = ModelSpec("LlamaForCausalLM", "llama", layers, 576, 9, 3, 64, 49152, 2048)
    return LoadedModel(Path("."), f"smollm135m-shape-{layers}", spec, model, None,
                       sum(p.numel() for p in model.parameters()))


def child(method: str, layers: int, save: str | None) -> dict:
    from compiler.frontend.export import export_onnx

    loaded = loaded_model(layers)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    model_rss = _status_mib("VmRSS")
    cpu = _cpu()
    start = time.perf_counter()
    graph = export_onnx(loaded, method=method)
    seconds = time.perf_counter() - start
    cpu = _cpu() - cpu
    peak = _status_mib("VmHWM")
    if save:
        import onnx_ir as ir

        ir.save(graph.model, save)
    return {"method": method, "layers": layers, "export_s": round(seconds, 1), "cpu_s": round(cpu, 1),
            "model_mib": round(model_rss),
            "peak_mib": round(peak), "nodes": sum(1 for _ in graph.model.graph)}


def _status_mib(key: str) -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def compare(full: str, stamp: str) -> float:
    import numpy as np
    import onnxruntime as ort

    a, b = ort.InferenceSession(full), ort.InferenceSession(stamp)
    rng = np.random.default_rng(0)
    worst = 0.0
    for past, seq in ((0, 7), (5, 1)):
        feeds = {"input_ids": rng.integers(0, 49152, (2, seq)), "attention_mask": np.ones((2, past + seq), np.int64),
                 "position_ids": np.tile(np.arange(past, past + seq), (2, 1))}
        for i in a.get_inputs()[3:]:
            feeds[i.name] = rng.standard_normal((2, 3, past, 64)).astype(np.float32)
        worst = max(worst, max(float(np.abs(x - y).max()) for x, y in zip(a.run(None, feeds), b.run(None, feeds))))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", nargs="+", default=["full:6", "stamp:6", "stamp:15", "stamp:30", "full:15"])
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "LAYERS", "SAVE"))
    args = parser.parse_args()
    if args.child:
        method, layers, save = args.child
        print(json.dumps(child(method, int(layers), None if save == "-" else save)))
        return
    runs = [(m, int(n)) for m, n in (r.split(":") for r in args.runs)]
    smallest, tmp = min(n for _, n in runs), Path(tempfile.mkdtemp(prefix="export-depth-"))
    for method, layers in runs:
        save = str(tmp / f"{method}.onnx") if layers == smallest else "-"
        out = subprocess.run([sys.executable, __file__, "--child", method, str(layers), save],
                             capture_output=True, text=True, check=True).stdout
        print(out.strip().splitlines()[-1], flush=True)
    if (tmp / "full.onnx").is_file() and (tmp / "stamp.onnx").is_file():
        print(json.dumps({"layers": smallest, "max_abs_diff_full_vs_stamp":
                          compare(str(tmp / "full.onnx"), str(tmp / "stamp.onnx"))}), flush=True)


if __name__ == "__main__":
    main()
