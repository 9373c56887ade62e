"""`--cache-dir`: each stage's output stored under a hash of everything that stage depends on.

CI rebuilds the same model on every push; most pushes change nothing that export or the engine
depend on. Keys chain (passes' key includes export's, build's includes passes'), so a change
invalidates exactly the stages after the first one it touches: a new max-batch rebuilds only the
engine, new passes re-run passes, build and validate but reuse the export. The validation
*measurement* is cached, and is judged against the recipe's tolerance on every build, so editing
a tolerance re-checks without recomputing anything.

Entries are directories `DIR/<stage>/<key>/`, written to a temporary name and renamed into place,
so a killed build or a concurrent one never leaves a half entry that a later build would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from compiler.report.manifest import file_sha256

SOURCE_DIRS = ("compiler", "passes", "plugins")
_ROOT = Path(__file__).resolve().parents[2]


def source_digest() -> str:
    """A hash of llmc's own code: the package version does not change with every edit of a checkout."""
    digest = hashlib.sha256()
    for folder in SOURCE_DIRS:
        for path in sorted((_ROOT / folder).rglob("*.py")):
            digest.update(path.relative_to(_ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def make_key(stage: str, inputs: dict) -> str:
    text = json.dumps({"stage": stage, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class StageCache:
    """A store of stage outputs; `StageCache(None)` is the disabled cache (every lookup misses)."""

    def __init__(self, root: Path | None):
        self.root = Path(root).expanduser().resolve() if root else None

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def get(self, stage: str, key: str) -> Path | None:
        if not self.enabled:
            return None
        entry = self.root / stage / key
        return entry if (entry / "meta.json").is_file() else None

    def put(self, stage: str, key: str, files: dict[str, Path], meta: dict) -> None:
        """Copy `files` (name -> source) into a new entry; meta.json is written last and marks it complete."""
        if not self.enabled:
            return
        final = self.root / stage / key
        tmp = self.root / stage / f".{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            for name, source in files.items():
                shutil.copyfile(source, tmp / name)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            if final.exists():  # a concurrent build stored the same key first: its entry is as good
                return
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def file_digest(self, path: Path) -> str:
        """sha256 of a file, remembered by (path, size, mtime) so big weights are hashed once per change."""
        stat = path.stat()
        memo_key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        memo_file = self.root / "file-hashes.json" if self.enabled else None
        memo = {}
        if memo_file and memo_file.is_file():
            try:
                memo = json.loads(memo_file.read_text())
            except ValueError:
                memo = {}
        if memo_key in memo:
            return memo[memo_key]
        digest = file_sha256(path)
        if memo_file:
            memo[memo_key] = digest
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_file.with_name(f".file-hashes.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, memo_file)
        return digest

    def dir_digest(self, folder: Path) -> str:
        """A hash over every visible file of a model directory (config, weights, tokenizer)."""
        digest = hashlib.sha256()
        for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
            digest.update(f"{path.name}:{self.file_digest(path)}\n".encode())
        return digest.hexdigest()


def export_key(cache: StageCache, model_path: Path, trust_remote_code: bool = False) -> str:
    """The export stage's key: the model's files, llmc's code and the exporting tools' versions."""
    from compiler import __version__
    from compiler.report.report_json import tool_versions

    versions = tool_versions()
    return make_key("export", {"llmc": __version__, "llmc_source": source_digest(), "model": cache.dir_digest(model_path),
                               "trust_remote_code": trust_remote_code,
                               **{t: versions.get(t) for t in ("torch", "transformers", "onnx", "onnxscript", "onnx-ir")}})


def stage_keys(cache: StageCache, model_path: Path, recipe, request, backend,
               calibration_text: str | None = None, eval_text: str | None = None) -> dict[str, str]:
    """One key per cached stage, each covering its own inputs plus the key of the stage before it."""
    if not cache.enabled:
        return {}
    import dataclasses

    from passes import PassContext

    from compiler import __version__
    from compiler.report.report_json import tool_versions

    versions = tool_versions()
    common = {"llmc": __version__, "llmc_source": source_digest()}
    model = cache.dir_digest(model_path)
    opts = request.options
    export = export_key(cache, model_path, request.trust_remote_code)
    ctx = dataclasses.asdict(PassContext(max_positions=opts.max_seq))
    calib = hashlib.sha256(calibration_text.encode()).hexdigest() if calibration_text is not None else None
    passes = make_key("passes", {**common, "export": export, "passes": recipe.passes, "context": ctx,
                                 "options": [dict(o) for o in recipe.pass_options], "calibration": calib,
                                 **_budget_inputs(request, eval_text)})
    build = make_key("build", {**common, "passes": passes, "max_batch": opts.max_batch, "max_seq": opts.max_seq,
                               "backend": backend.name, "backend_version": backend.version})
    validate_key = make_key("validate", {**common, "passes": passes, "model": model, "prompt": request.prompt,
                                         "decode_steps": request.decode_steps, "max_seq": opts.max_seq,
                                         "onnxruntime": versions.get("onnxruntime"), "torch": versions.get("torch")})
    return {"export": export, "passes": passes, "build": build, "validate": validate_key, "model_sha256": model}


def _budget_inputs(request, eval_text: str | None) -> dict:
    """With --max-ppl-delta the passes' output is the precision search's answer, which also depends on
    the budget, the promotion format and the held-out text it was measured on."""
    budget = getattr(request, "max_ppl_delta", None)
    if budget is None:
        return {}
    return {"max_ppl_delta": budget, "promote_to": request.promote_to,
            "eval": hashlib.sha256((eval_text or "").encode()).hexdigest()}
