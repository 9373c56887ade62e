"""Checks that run before any output exists: options against the model, and the output path.

A build that is going to fail on its options should fail in a second, not after minutes of export,
and must not touch the output path; these checks need no weights and no staging directory.
"""

from __future__ import annotations

from pathlib import Path

from compiler.errors import BadInputError, UnsupportedModelError
from compiler.input_schema import check_build_options
from compiler.engine.engine_build import BuildOptions
from compiler.frontend.model import ModelSpec


def check_max_seq(spec: ModelSpec, options: BuildOptions, plugins: bool = False) -> None:
    """`plugins`: the recipe's attention plugin applies one window to every layer, so a model whose
    layers differ (Gemma 3's local and global layers) needs a native recipe, whose kv-cache pass masks
    each layer by its own window (passes/kv_cache_scatter.py). Either applies the window, so --max-seq
    may exceed it."""
    check_build_options({"--max-batch": options.max_batch, "--max-seq": options.max_seq})
    if plugins and len(set(spec.layer_windows)) > 1 and options.max_seq > min(w for w in spec.layer_windows if w):
        raise UnsupportedModelError(
            f"--max-seq {options.max_seq} exceeds the window ({spec.sliding_window}) of the model's sliding layers, "
            "and the attention plugin applies one window to every layer while this model mixes sliding and full "
            "layers: use a native recipe (fp16, int4-awq, ...) or --max-seq <= the window"
        )
    if options.max_seq > spec.max_position_embeddings:
        raise BadInputError(
            f"--max-seq {options.max_seq} exceeds the model's max_position_embeddings "
            f"({spec.max_position_embeddings}); lower --max-seq"
        )


def check_output_path(output: Path, model_path: Path) -> None:
    """Refuse output paths whose replacement would destroy something that is not an llmc artifact."""
    if output == Path.cwd() or output in Path.cwd().parents or output == Path(output.anchor):
        raise BadInputError(f"output path {output} is the current directory or above it; pass -o <new-subdirectory>")
    if output == model_path or output in model_path.parents or model_path in output.parents:
        raise BadInputError(f"output path {output} overlaps the model directory {model_path}; choose another -o")
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not (output / "report.json").is_file())):
        raise BadInputError(
            f"output path {output} exists and is not an llmc artifact (no report.json); "
            "llmc replaces only its own previous builds: remove it or choose another -o"
        )


def check_output_writable(output: Path) -> None:
    """Create a probe file beside the output: permissions, read-only mounts and file-in-the-way all show here."""
    blocker = next((p for p in output.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise BadInputError(f"output path {output} is not writable: {blocker} is a file, not a directory; choose another -o")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        probe = output.parent / f".{output.name}.probe-{id(output)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise BadInputError(
            f"output path {output} is not writable ({exc.strerror}: {exc.filename}); "
            "choose another -o or fix the directory's permissions"
        ) from None
