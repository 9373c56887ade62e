"""A cold `llmc build` and the same build again with every stage cached: the wall times the README states.

Two `llmc build` processes on the bundled model with one fresh `--cache-dir`; each one's wall time, and
each stage's cache hit as its report.json records it. Prints and writes JSON:

    python benchmarks/cached_rebuild.py --json benchmarks/cached_rebuild.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(cache: Path, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "compiler", "build", "--cache-dir", str(cache), "-o", str(out), *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"llmc build failed ({proc.returncode}): {proc.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    hits = {name: stage.get("hit") for name, stage in report.get("cache", {}).get("stages", {}).items()}
    return {"seconds": round(seconds, 1), "stage_hits": hits}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    ap.add_argument("extra", nargs="*", help="more `llmc build` options, e.g. --max-seq 128")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        cold = build(cache, Path(tmp) / "cold", args.extra)
        cached = build(cache, Path(tmp) / "cached", args.extra)
    result = {"command": "llmc build --cache-dir CACHE -o OUT " + " ".join(args.extra),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average before "
                         f"{load:.1f}", "cold": cold, "cached": cached}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
