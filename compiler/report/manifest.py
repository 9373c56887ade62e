"""manifest.json: what an artifact holds and what made it.

Engines load only in the TensorRT version (and GPU family) that built them, and CI artifacts get
copied around, so every artifact lists each file with its sha256 and size next to the versions and
build flags that produced it. `llmc inspect` re-hashes the files against it and compares the
backend recorded here with the one installed locally.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = 1


def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def artifact_files(root: Path) -> list[Path]:
    """Every regular file under root except the manifest itself, in a stable order."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != MANIFEST)


def write_manifest(root: Path, versions: dict, backend: dict, build: dict) -> dict:
    """Hash every file under root (written last, after everything else is in place)."""
    manifest = {
        "format": FORMAT,
        "versions": versions,
        "backend": backend,
        "build": build,
        "files": [
            {"path": p.relative_to(root).as_posix(), "size": p.stat().st_size, "sha256": file_sha256(p)}
            for p in artifact_files(root)
        ],
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(root: Path) -> dict:
    from compiler.errors import BadInputError

    path = Path(root) / MANIFEST
    if not path.is_file():
        raise BadInputError(f"no {MANIFEST} in {root}: not an llmc artifact, or built before manifests (rebuild it)")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise BadInputError(f"{path} is not valid JSON ({exc}); the artifact is damaged: rebuild it") from None


def verify(root: Path, manifest: dict) -> dict[str, str]:
    """path -> 'ok' | 'modified' | 'missing' | 'extra' (a file the manifest does not list)."""
    root = Path(root)
    status = {}
    for entry in manifest.get("files", []):
        path = root / entry["path"]
        if not path.is_file():
            status[entry["path"]] = "missing"
        elif path.stat().st_size != entry["size"] or file_sha256(path) != entry["sha256"]:
            status[entry["path"]] = "modified"
        else:
            status[entry["path"]] = "ok"
    for path in artifact_files(root):
        status.setdefault(path.relative_to(root).as_posix(), "extra")
    return status


def backend_mismatch(manifest: dict, local_name: str | None, local_version: str | None) -> str | None:
    """A warning when the engine was built by another TensorRT than the one installed here, else None."""
    built = manifest.get("backend", {})
    name, version = built.get("name"), built.get("version")
    if local_name is None:
        return f"model.plan was built by {name} {version}, and no TensorRT is installed here to load it"
    if (name, version) != (local_name, local_version):
        return (f"model.plan was built by {name} {version} but this machine has {local_name} {local_version}: "
                f"engines load only in the TensorRT version that built them; rebuild here or install {name}=={version}")
    return None
