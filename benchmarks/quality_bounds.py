"""The figures tests/test_quality.py bounds, measured the way its fixtures make them.

The trained model's fp16-recipe graph (capacity 256) quantized by one pass at a time, scored by
measure_quality on 16 held-out windows and the default prompts x 32 greedy tokens (onnxruntime,
CPU). The test's bounds are stated multiples of these figures; rerun after a change to a pass or to
the quality stage and commit the output:

    python benchmarks/quality_bounds.py --json benchmarks/quality_bounds.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnx_ir as ir  # noqa: E402

from compiler.frontend.calibrate import calibrate  # noqa: E402
from compiler.frontend.corpus import default_calibration_text, default_eval_text  # noqa: E402
from compiler.frontend.default_model import default_model_dir  # noqa: E402
from compiler.frontend.export import export_onnx  # noqa: E402
from compiler.frontend.load import load_model  # noqa: E402
from compiler.frontend.run_passes import run_passes  # noqa: E402
from compiler.measure.quality import measure_quality  # noqa: E402
from compiler.recipe import load_recipe  # noqa: E402
from passes import PassContext, make_pass  # noqa: E402

CASES = [("quantize-int8-wo", {}), ("quantize-fp8-wo", {}), ("quantize-int4-awq", {"block_size": 128}),
         ("quantize-int4-rtn", {"block_size": 128})]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    trained = load_model(default_model_dir())
    fp16, _ = run_passes(export_onnx(trained), load_recipe("fp16"), PassContext(max_positions=256))
    activations = calibrate(trained, default_calibration_text(), max_windows=16).activations
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "fp16.onnx"
        ir.save(fp16.model, base)
        for name, options in [("fp16", {})] + CASES:
            path = base
            if name != "fp16":
                model = ir.load(base)
                make_pass(name, PassContext(max_positions=256, activations=activations), options)(model)
                path = Path(tmp) / f"{name}.onnx"
                ir.save(model, path)
            start = time.perf_counter()
            q = measure_quality(trained, path, default_eval_text(), max_windows=16, new_tokens=32, prompts=None)
            rows.append({"pass": name, **options, "ppl_delta": q.ppl_delta, "kl_mean": q.kl_mean,
                         "greedy_agreement": q.greedy_agreement, "reference_perplexity": q.reference_perplexity,
                         "seconds": round(time.perf_counter() - start, 1)})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
