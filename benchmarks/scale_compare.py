"""llmc build vs the onnxruntime-genai model builder vs Optimum's ONNX export, at several model sizes.

For each model directory (random weights of a published shape, written by benchmarks/random_model.py
when missing), runs in one go, each tool in its own process so that its peak RSS is its own:

  llmc fp16       llmc build DIR --recipe fp16        (export, passes, TensorRT-RTX engine, validate, package)
  llmc int4-rtn   llmc build DIR --recipe int4-rtn    (INT4 round-to-nearest: the same kind of INT4 as genai's)
  llmc int4-awq   llmc build DIR --recipe int4-awq    (+ calibrate, AWQ, held-out quality)
  genai int4      python -m onnxruntime_genai.models.builder -p int4 -e cpu   (ONNX only, no engine)
  optimum fp32    optimum-cli export onnx --task text-generation-with-past     (ONNX only, no engine)

and records wall time, peak RSS (wait4's ru_maxrss) and llmc's per-stage seconds from report.json,
with llmc's own and its engine builder's peaks (report.json `memory`) to say which process it is.

    python benchmarks/scale_compare.py --work /tmp/scale --shapes smollm2-135m smollm2-360m llama-3.2-1b \
        --genai-path /work/ogenai --optimum-python /work/optimum-venv/bin/python

The genai builder and Optimum need their own installs (onnxruntime-genai with `pip install --no-deps
--target DIR`; optimum-onnx pins transformers<4.58, so it gets its own venv). A tool that isn't
given is reported as skipped, not guessed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def tree_rss(pid: int) -> int:
    """Summed RSS in bytes of pid and all its descendants (llmc builds >1 GiB engines in a child)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total


def run_measured(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run cmd; return rc, wall seconds, the peak summed RSS of its process tree (sampled every
    0.5 s) and wait4's ru_maxrss (the largest single process, which misses a parent + child sum). The
    samples go to LOG.rss.tsv (seconds, bytes)."""
    start = time.perf_counter()
    peak = 0
    with open(log, "w") as fh, open(log.with_suffix(".rss.tsv"), "w") as timeline:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                rss = tree_rss(proc.pid)
                peak = max(peak, rss)
                timeline.write(f"{time.perf_counter() - start:.1f}\t{rss}\n")  # which stage peaks: line up with the log
                time.sleep(0.5)
        except KeyboardInterrupt:
            proc.kill()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "wall_s": round(time.perf_counter() - start, 1),
            "peak_rss_bytes": max(peak, usage.ru_maxrss * 1024), "max_process_rss_bytes": usage.ru_maxrss * 1024,
            "log": str(log)}


def llmc_build(model: Path, recipe: str, out: Path, logs: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".failed"), ignore_errors=True)
    res = run_measured([sys.executable, "-m", "compiler.commands.cli", "build", str(model), "--recipe", recipe, "-o", str(out)],
                       logs / f"llmc-{recipe}.log")
    report = out / "report.json"
    if not report.exists():  # a build outside its tolerance (exit 5) is moved aside with its report
        report = out.with_name(out.name + ".failed") / "report.json"
    if report.exists():
        data = json.loads(report.read_text())
        res["stages_s"] = {k: round(v, 1) for k, v in data.get("timings_s", {}).items()}
        res["status"] = data.get("status")
        res["sizes_bytes"] = data.get("sizes_bytes")
        res["max_abs_err"] = (data.get("numerics") or {}).get("max_abs_error")
        memory = data.get("memory") or {}  # which process the peak is: llmc's own, or the engine builder
        res["llmc_process_peak_rss_bytes"] = memory.get("llmc_process_peak_rss_bytes")
        res["builder_peak_rss_bytes"] = memory.get("builder_peak_rss_bytes")
    return res


def genai_build(model: Path, out: Path, logs: Path, genai_path: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [genai_path, os.environ.get("PYTHONPATH")])))
    return run_measured([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o", str(out),
                         "-p", "int4", "-e", "cpu", "-c", str(out.parent / "genai-cache")],
                        logs / "genai-int4.log", env=env)


def optimum_export(model: Path, out: Path, logs: Path, python: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    return run_measured([python, "-m", "optimum.exporters.onnx", "--model", str(model),
                         "--task", "text-generation-with-past", str(out)], logs / "optimum.log")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def main() -> None:
    from benchmarks.random_model import SHAPES, write_random_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/scale"))
    ap.add_argument("--shapes", nargs="+", default=["smollm2-135m", "smollm2-360m", "llama-3.2-1b"], choices=sorted(SHAPES))
    ap.add_argument("--tools", nargs="+", default=["llmc-fp16", "llmc-int4-rtn", "llmc-int4-awq", "genai", "optimum"])
    ap.add_argument("--genai-path", default=os.environ.get("GENAI_PATH", ""))
    ap.add_argument("--optimum-python", default=os.environ.get("OPTIMUM_PYTHON", ""))
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "scale_compare.json")
    args = ap.parse_args()

    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    for shape in args.shapes:
        model = args.work / shape
        if not (model / "config.json").exists():
            print(f"[{shape}] writing random model", flush=True)
            made = write_random_model(shape, model)
        else:
            made = {}
        entry = results.setdefault(shape, {})
        cfg = json.loads((model / "config.json").read_text())
        entry["config"] = {k: cfg.get(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                    "num_key_value_heads", "intermediate_size", "vocab_size")}
        if made:
            entry["parameters"] = made["parameters"]
        if "parameters" not in entry:
            from safetensors import safe_open

            entry["parameters"] = 0
            for f in model.glob("*.safetensors"):
                with safe_open(str(f), "pt") as st:
                    entry["parameters"] += sum(st.get_slice(k).get_shape().numel() if hasattr(st.get_slice(k).get_shape(), "numel")
                                               else _numel(st.get_slice(k).get_shape()) for k in st.keys())
        entry["fp16_weight_bytes"] = entry["parameters"] * 2
        logs = args.work / f"{shape}-logs"
        logs.mkdir(parents=True, exist_ok=True)
        for tool in args.tools:
            print(f"[{shape}] {tool} ...", flush=True)
            if tool.startswith("llmc-"):
                recipe = tool.removeprefix("llmc-")
                res = llmc_build(model, recipe, args.work / f"{shape}-out-{recipe}", logs)
            elif tool in ("genai", "optimum"):
                where = args.genai_path if tool == "genai" else args.optimum_python
                if not where:
                    entry[tool] = {"skipped": f"no --{'genai-path' if tool == 'genai' else 'optimum-python'}"}
                    continue
                dest = args.work / f"{shape}-out-{tool}"
                res = (genai_build if tool == "genai" else optimum_export)(model, dest, logs, where)
                res["output_bytes"] = dir_bytes(dest)
            else:
                raise SystemExit(f"unknown tool {tool}")
            res["peak_rss_over_fp16_bytes"] = round(res["peak_rss_bytes"] / entry["fp16_weight_bytes"], 2)
            entry[tool] = res
            print(f"[{shape}] {tool}: rc {res['rc']}, {res['wall_s']} s, peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB",
                  flush=True)
            args.results.write_text(json.dumps(results, indent=1))
    print(table(results))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def table(results: dict) -> str:
    """The NOTES.md table: one row per size and tool, with ratios to genai's wall time and to FP16 bytes."""
    rows = ["| model | params | FP16 bytes | tool | rc | wall s | peak RSS GiB | RSS / FP16 bytes | llmc / builder GiB "
            "| wall / genai |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for shape, entry in results.items():
        genai = entry.get("genai", {}).get("wall_s")
        for tool in ("llmc-fp16", "llmc-int4-rtn", "llmc-int4-awq", "genai", "optimum"):
            r = entry.get(tool)
            if not r or "skipped" in r:
                continue
            ratio = f"{r['wall_s'] / genai:.2f}" if genai else "-"
            split = "-"
            if r.get("llmc_process_peak_rss_bytes"):
                builder = r.get("builder_peak_rss_bytes")
                split = f"{r['llmc_process_peak_rss_bytes'] / 2**30:.2f} / " + (f"{builder / 2**30:.2f}" if builder else "in-process")
            rows.append(f"| {shape} | {entry['parameters'] / 1e6:.0f}M | {entry['fp16_weight_bytes'] / 2**30:.2f} GiB | "
                        f"{tool} | {r['rc']} | {r['wall_s']} | {r['peak_rss_bytes'] / 2**30:.2f} | "
                        f"{r['peak_rss_over_fp16_bytes']} | {split} | {ratio} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
