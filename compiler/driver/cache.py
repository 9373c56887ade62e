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


def stage_key(stage: str, inputs: dict, chained: str | None = None) -> str:
    """The one key formula: the stage's own inputs, llmc's version and code, and the chained stage's key."""
    from compiler import __version__

    return make_key(stage, {"llmc": __version__, "llmc_source": source_digest(), **inputs,
                            **({"after": chained} if chained else {})})


DEFAULT_MAX_BYTES = 20 << 30  # LLMC_CACHE_MAX_GB overrides; a 1B model's entries are ~8 GB per recipe


def default_max_bytes() -> int:
    raw = os.environ.get("LLMC_CACHE_MAX_GB")
    return int(float(raw) * (1 << 30)) if raw else DEFAULT_MAX_BYTES


class StageCache:
    """A store of stage outputs; `StageCache(None)` is the disabled cache (every lookup misses).

    Bounded: after each store, the least recently used entries go until the total is under
    `max_bytes` (a hit refreshes an entry). `llmc cache prune` applies a bound by hand."""

    def __init__(self, root: Path | None, max_bytes: int | None = None):
        self.root = Path(root).expanduser().resolve() if root else None
        self.max_bytes = default_max_bytes() if max_bytes is None else max_bytes
        self.pinned: set[Path] = set()  # entries a running build will restore: its own stores never prune them

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def get(self, stage: str, key: str) -> Path | None:
        if not self.enabled:
            return None
        entry = self.root / stage / key
        if not (entry / "meta.json").is_file():
            return None
        try:
            os.utime(entry / "meta.json")  # recently used: pruned last
        except OSError:  # a read-only or shared cache: still a hit, only its LRU order stays
            pass
        return entry

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
        self.prune(self.max_bytes, keep=final)

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, entry dir) of every complete entry, oldest first."""
        out = []
        for meta in self.root.glob("*/*/meta.json") if self.enabled else ():
            entry = meta.parent
            if entry.name.startswith("."):  # another build's entry being written, or one being removed
                continue
            try:
                size = sum(p.stat().st_size for p in entry.iterdir() if p.is_file())
                out.append((meta.stat().st_mtime, size, entry))
            except FileNotFoundError:  # pruned by another process meanwhile
                continue
        return sorted(out)

    def prune(self, max_bytes: int | None = None, max_entries: int | None = None, keep: Path | None = None) -> list[Path]:
        """Remove least recently used entries until both bounds hold; returns what was removed. Never
        `keep` nor the entries this build planned to restore (`pinned`): they count, but stay."""
        everything = self.entries()
        kept = {keep, *self.pinned}
        entries = [e for e in everything if e[2] not in kept]
        total = sum(size for _, size, _ in everything)
        count = len(everything)
        removed = []
        for _, size, entry in entries:
            if (max_bytes is None or total <= max_bytes) and (max_entries is None or count <= max_entries):
                break
            doomed = entry.with_name(f".{entry.name}.prune-{os.getpid()}")
            try:
                os.replace(entry, doomed)  # gone from lookups at once; a reader mid-copy keeps its open files
            except OSError:
                continue
            shutil.rmtree(doomed, ignore_errors=True)
            total, count = total - size, count - 1
            removed.append(entry)
        return removed

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


