"""Size / perplexity frontier of the trained model: uniform recipes vs budget-chosen mixes.

Runs on the CPU (onnxruntime), on the quality stage's held-out windows. For each uniform recipe and
each budget (`--budgets`), prints held-out perplexity delta, KL and weight bytes; the budget mixes
come from compiler/measure/precision_search.py with the per-matmul sensitivity measured once.

    python benchmarks/frontier.py --budgets 5,2,1,0.5,0.3,0.1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compiler.frontend.calibrate import calibrate  # noqa: E402
from compiler.frontend.corpus import default_calibration_text, default_eval_text  # noqa: E402
from compiler.frontend.default_model import default_model_dir  # noqa: E402
from compiler.frontend.export import export_onnx  # noqa: E402
from compiler.frontend.load import load_model  # noqa: E402
from compiler.measure.precision_search import Evaluator, measure_sensitivity, search_budget  # noqa: E402
from compiler.measure.quality import held_out  # noqa: E402
from compiler.recipe import load_recipe  # noqa: E402
from passes import PassContext  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=default_model_dir())
    ap.add_argument("--recipe", default="int4-awq")
    ap.add_argument("--budgets", default="5,2,1,0.5,0.3,0.1", help="percent")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path, help="write the frontier as a PNG (from --json if it exists, else measured)")
    args = ap.parse_args()
    if args.plot and args.json and args.json.is_file():
        plot(json.loads(args.json.read_text()), args.plot)
        return
    start = time.perf_counter()
    loaded = load_model(args.model)
    activations = calibrate(loaded, default_calibration_text()).activations
    exported = export_onnx(loaded)
    held = held_out(loaded, default_eval_text(), 128)
    ctx = PassContext(max_positions=256, activations=activations)
    rows = []

    def row(name: str, probe) -> None:
        rows.append({"name": name, **probe.summary()})
        print(f"{name:<28} {probe.ppl_delta:+8.3%}  KL {probe.kl_mean:.5f}  {probe.weight_bytes:>9} B  "
              f"{probe.summary()['formats']}", flush=True)

    for uniform in ("int4-rtn", "int4-awq", "int8-wo", "fp8-wo"):
        ev = Evaluator(exported, load_recipe(uniform), ctx, held, loaded.tokenizer.pad_token_id)
        body = {u.name: ev.aggressive.label for u in ev.units if u.name != "lm_head"}
        row(f"uniform {uniform}", ev.measure({**body, "lm_head": "fp16"}))
        row(f"uniform {uniform} + lm_head", ev.measure({**body, "lm_head": ev.aggressive.label}))
    ev = Evaluator(exported, load_recipe(args.recipe), ctx, held, loaded.tokenizer.pad_token_id)
    row("all fp16", ev.measure({u.name: "fp16" for u in ev.units}))
    sensitivity = measure_sensitivity(ev, "matmul")
    for budget in [float(b) / 100 for b in args.budgets.split(",")]:
        found = search_budget(ev, budget, sensitivity=sensitivity)
        row(f"budget {budget:.1%} ({found.promotions} promotions)", found.final)
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot)


def plot(rows: list[dict], path: Path) -> None:
    """Perplexity delta vs weight bytes: uniform recipes as squares, budget mixes as a connected line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    uniform = [r for r in rows if not r["name"].startswith("budget")]
    budget = sorted((r for r in rows if r["name"].startswith("budget")), key=lambda r: r["weight_bytes"])
    ax.scatter([r["weight_bytes"] / 1e6 for r in uniform], [r["ppl_delta"] * 100 for r in uniform], marker="s",
               color="tab:gray", label="uniform")
    for r in uniform:
        ax.annotate(r["name"].replace("uniform ", ""), (r["weight_bytes"] / 1e6, r["ppl_delta"] * 100), fontsize=7,
                    xytext=(4, 2), textcoords="offset points")
    ax.plot([r["weight_bytes"] / 1e6 for r in budget], [r["ppl_delta"] * 100 for r in budget], "o-",
            color="tab:blue", label="--max-ppl-delta mixes")
    for r in budget:
        ax.annotate(r["name"].split(" (")[0].replace("budget ", ""), (r["weight_bytes"] / 1e6, r["ppl_delta"] * 100),
                    fontsize=7, color="tab:blue", xytext=(4, -9), textcoords="offset points")
    ax.set_xlabel("weight bytes (MB)")
    ax.set_ylabel("held-out perplexity delta vs PyTorch FP32 (%)")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=8)
    ax.set_title("llmc-tiny-shakespeare: size / perplexity frontier", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
