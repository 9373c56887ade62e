"""`llmc inspect ARTIFACT_DIR`: what an artifact is, whether it is intact, and whether it loads here.

An engine copied from CI to a serving box fails at load time if that box has another TensorRT;
`inspect` says so before anyone tries, and re-hashes every file against manifest.json so a
truncated upload or a hand-edited config shows up as a named file, not as a runtime crash.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from compiler.report.manifest import backend_mismatch, read_manifest, verify


def _local_backend() -> tuple[str | None, str | None]:
    from compiler.engine.backend import get_backend
    from compiler.errors import BackendBuildError

    try:
        backend = get_backend()
    except BackendBuildError:
        return None, None
    return backend.name, backend.version


def inspect_artifact(root: Path, out: Console, err: Console) -> bool:
    """Print the manifest summary and file table; returns False if any file is modified or missing."""
    root = Path(root)
    manifest = read_manifest(root)
    build, backend = manifest.get("build", {}), manifest.get("backend", {})
    summary = Table(title=f"llmc artifact: {root}", show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("model", f"{build.get('model')} ({build.get('architecture')})")
    summary.add_row("recipe", f"{build.get('recipe')}: {', '.join(build.get('passes', []))}")
    summary.add_row("flags", f"max_batch {build.get('max_batch')}, max_seq {build.get('max_seq')}, "
                             f"dtype {build.get('dtype')}")
    summary.add_row("backend", f"{backend.get('name')} {backend.get('version')}")
    versions = manifest.get("versions", {})
    summary.add_row("versions", ", ".join(f"{k} {v}" for k, v in versions.items()))
    out.print(summary)

    status = verify(root, manifest)
    sizes = {f["path"]: f for f in manifest.get("files", [])}
    files = Table(title="files")
    for column in ("path", "size", "sha256", "status"):
        files.add_column(column)
    for path, state in status.items():
        entry = sizes.get(path, {})
        shown = state if state == "ok" else f"[red]{state.upper()}[/red]"
        files.add_row(path, str(entry.get("size", "")), entry.get("sha256", "")[:16], shown)
    out.print(files)

    warning = backend_mismatch(manifest, *_local_backend())
    if warning:
        err.print(f"warning: {warning}", markup=False, soft_wrap=True)
    bad = [p for p, s in status.items() if s in ("modified", "missing")]
    extra = [p for p, s in status.items() if s == "extra"]
    if extra:
        err.print(f"warning: files not in manifest.json: {', '.join(extra)}", markup=False, soft_wrap=True)
    if bad:
        err.print(f"llmc: error: {len(bad)} file(s) differ from manifest.json ({', '.join(bad)}): the artifact was "
                  "modified or damaged after the build; rebuild or re-download it", markup=False, soft_wrap=True)
        return False
    out.print(f"manifest: {len(status)} files verified")
    return True
