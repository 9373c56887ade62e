"""Budget builds at several budgets in one process: what `--max-ppl-delta B` would choose for each B.

Why: on a real model each `llmc build --max-ppl-delta B` recalibrates and rebuilds the PyTorch
reference (~10-25 minutes on the 2-core machine) before its search. The searches for different
budgets share everything but the bisection: the export (from the build's stage cache), the
calibration, the held-out reference, the one-pass Fisher/Taylor estimate and its exact path, and
any assignment two bisections both measure. Each budget's answer is a measured point, as in the build.

    python benchmarks/budget_sweep.py /work/models/gemma3-270m --recipe int4-gptq \
        --budgets 10%,5%,2%,1% --cache-dir /work/cache-w26 [--json OUT.json]

Prints one line per measured assignment and a markdown table (budget, promotions, measured delta,
KL, weight bytes); the build's quality stage measures the same windows (16 x 128 tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compiler.commands.cli import parse_fraction  # noqa: E402
from compiler.driver.build import plan, prepare, run_stages  # noqa: E402
from compiler.frontend.calibrate import tokenize_windows  # noqa: E402
from compiler.frontend.corpus import default_calibration_text  # noqa: E402
from compiler.measure.precision_search import Evaluator, estimate_order, search_budget  # noqa: E402
from compiler.measure.quality import QUALITY_WINDOW, held_out  # noqa: E402
from compiler.stages.base import Stage  # noqa: E402
from compiler.stages.calibrate import Calibrate  # noqa: E402
from compiler.stages.export import Export  # noqa: E402
from compiler.stages.load import Load  # noqa: E402
from compiler.stages.precision import ESTIMATE_WINDOW, ESTIMATE_WINDOWS, pass_context  # noqa: E402
from compiler.engine.engine_build import BuildOptions  # noqa: E402
from compiler.stages.request import BuildRequest, Progress  # noqa: E402


class _Print(Progress):
    def note(self, text):
        print(text, flush=True)

    def stage_end(self, index, name, seconds, detail=""):
        print(f"{name}: {detail or 'done'} in {seconds:.1f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--recipe", default="int4-gptq")
    ap.add_argument("--budgets", default="10%,5%,2%,1%")
    ap.add_argument("--max-seq", type=int, default=256)
    ap.add_argument("--cache-dir", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    budgets = [parse_fraction(b, "--budgets") for b in args.budgets.split(",")]
    start = time.perf_counter()
    request = BuildRequest(model=args.model, recipe=args.recipe, output=Path("/tmp/llmc-budget-sweep-unused"),
                           options=BuildOptions(max_seq=args.max_seq), measure_quality=True, cache_dir=args.cache_dir)
    state = prepare(request, _Print(), check_output=False)
    rows, measured, estimate = [], {}, []

    class Sweep(Stage):  # a stage, so the driver keeps the model and the export until it has run
        name = "sweep"
        reads = ("loaded", "exported", "activations")
        writes = ()

        def run(self, state):
            sweep(state, args, budgets, rows, measured, estimate, start)

    stages = [Load(validates=False), Calibrate(), Export(), Sweep()]
    import tempfile

    with tempfile.TemporaryDirectory(prefix="llmc-sweep-") as tmp:
        state.staging = Path(tmp)
        run_stages(stages, state, plan(stages, state))
    print("\n| budget | fits | promotions | perplexity delta | KL | weight bytes | formats |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']:.1%} | {r['fits']} | {r['promotions']} | {r['ppl_delta']:+.2%} | {r['kl_mean']:.4f} | "
              f"{r['weight_bytes']} | {r['formats']} |")
    print(f"{len(measured)} assignments measured, {time.perf_counter() - start:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "estimate": estimate[0].damage if estimate else None}, indent=1))


def sweep(state, args, budgets, rows, measured, estimate, start) -> None:
    """The searches, in the stage that still holds the model and the export."""
    held = held_out(state.loaded, state.texts.evaluation, min(QUALITY_WINDOW, args.max_seq))
    ev = Evaluator(state.exported, state.recipe, pass_context(state), held, state.loaded.tokenizer.pad_token_id)
    fresh = ev.measure

    def measure(assignment, exact=True):  # an assignment two bisections share is measured once
        key = tuple(sorted(assignment.items()))
        if key not in measured:
            measured[key] = fresh(assignment, exact)
        return measured[key]

    ev.measure = measure
    windows = tokenize_windows(state.loaded.tokenizer, state.texts.calibration or default_calibration_text(),
                               ESTIMATE_WINDOW, ESTIMATE_WINDOWS)
    def once():
        if not estimate:
            estimate.append(estimate_order(ev, state.loaded.model, windows))
            print(f"estimate: {len(ev.units)} matmuls, {len(ev.groups)} groups in {estimate[0].seconds:.1f} s", flush=True)
        return estimate[0]

    for budget in budgets:
        found = search_budget(ev, budget, estimate=once, on_probe=lambda what, p: print(
            f"  {what}: {p.ppl_delta:+.3%}, KL {p.kl_mean:.4f}, {p.weight_bytes} bytes ({p.seconds:.0f} s)", flush=True))
        final = found.final
        rows.append({"budget": budget, "fits": found.fits, "promotions": found.promotions,
                     "ppl_delta": final.ppl_delta, "kl_mean": final.kl_mean, "weight_bytes": final.weight_bytes,
                     "formats": final.summary()["formats"], "probes": len(measured)})
        print(f"budget {budget:.1%}: {found.promotions} promotions, {final.ppl_delta:+.3%}, KL {final.kl_mean:.4f}, "
              f"{final.weight_bytes} bytes, {final.summary()['formats']} ({time.perf_counter() - start:.0f} s so far)",
              flush=True)


if __name__ == "__main__":
    main()
