"""The one typed state a build's stages read and write; nothing else passes between them.

Fields above the line are the checked inputs, set before the first stage. Fields below are each
written by one stage (compiler/stages/). Those marked heavy (the PyTorch model, the calibration
sample, the in-memory graph, the onnxruntime session: gigabytes at 1B) are dropped by the driver
right after the last stage that reads them, so the memory plan is data, not scattered `del`s.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

HEAVY = {"heavy": True}


def heavy():
    return dataclasses.field(default=None, metadata=HEAVY)


@dataclasses.dataclass
class Texts:
    """--calib-data / --eval-data read up front (bad files fail before any work), or the built-in samples."""

    calibration: str | None  # None: no pass of the recipe calibrates
    evaluation: str | None  # None: no quality stage


@dataclasses.dataclass
class BuildState:
    request: Any  # BuildRequest
    recipe: Any  # Recipe; the precision stage replaces it with the recipe it chose
    model_path: Path
    output: Path
    spec: Any  # ModelSpec, read from config.json before any work
    backend: Any  # compiler.engine.backend.Backend
    timing_cache: Path
    texts: Texts
    cache: Any  # StageCache
    staging: Path  # the staged output directory everything is written into
    progress: Any  # Progress
    build_part: Any = None  # the driver's build of another model into a subdirectory (the draft stage's)
    # --- written by the stages -------------------------------------------------------------------
    loaded: Any = heavy()  # load: LoadedModel (the PyTorch model and its tokenizer)
    parameters: int | None = None  # load, or validate's cache entry when load is skipped
    pad_token_id: int = 0  # load
    calibration: Any = None  # calibrate: Calibration, its sample moved to `activations`
    activations: Any = heavy()  # calibrate: HF module name -> inputs of each linear layer
    decode_reference: Any = heavy()  # reference: DecodeReference (None when validation is cached)
    quality_reference: Any = heavy()  # reference: QualityReference (None without a quality stage)
    exported: Any = heavy()  # export: ExportedGraph
    search: dict | None = None  # precision: the search's report (also restored with cached passes)
    records: list | None = None  # passes: PassRecord per pass
    engine: Any = None  # engine: EngineArtifact
    session: Any = heavy()  # validate / quality: one onnxruntime session over model.onnx
    validation: Any = None  # validate: ValidationResult
    quality: Any = None  # quality: QualityResult
    draft: dict | None = None  # draft: the draft build's summary (its own report.json is in draft/)
    speculation: Any = None  # draft: compiler.measure.speculation.SpeculationCheck
    draft_failures: list = dataclasses.field(default_factory=list)  # draft: what the verdict adds
    verdict: Any = None  # package: compiler.measure.verdict.Verdict
    weights: dict | None = None  # package: weight bytes against the formats' floor
    triton_models: list | None = None  # package
    sizes_bytes: dict = dataclasses.field(default_factory=dict)  # package
    package_warnings: list = dataclasses.field(default_factory=list)  # package
    analysis: dict | None = None  # sensitivity (`llmc analyze`)
    # --- driver bookkeeping ------------------------------------------------------------------------
    keys: dict = dataclasses.field(default_factory=dict)  # stage name -> cache key (cached stages)
    hits: dict = dataclasses.field(default_factory=dict)  # stage name -> cache entry, or None
    timings: dict = dataclasses.field(default_factory=dict)

    def onnx_path(self) -> Path:
        return self.staging / "model.onnx"


def heavy_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(BuildState) if f.metadata.get("heavy"))
