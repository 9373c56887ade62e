"""What a build is asked to do (`BuildRequest`) and how it reports progress (`Progress`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from compiler.engine.engine_build import BuildOptions
from compiler.frontend.run_passes import PassRecord
from compiler.measure.validate import DEFAULT_PROMPT


@dataclasses.dataclass
class BuildRequest:
    model: Path | None = None
    recipe: str = "fp16"
    output: Path | None = None
    options: BuildOptions = dataclasses.field(default_factory=BuildOptions)
    prompt: str = DEFAULT_PROMPT
    decode_steps: int = 16
    timing_cache: Path | None = None
    cache_dir: Path | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    calib_data: Path | None = None  # plain text / JSONL; default: the shipped calibration sample
    eval_data: Path | None = None  # held-out text for perplexity / KL; default: the shipped held-out sample
    measure_quality: bool | None = None  # None: only for recipes that quantize or set max_ppl_delta
    triton_cpu_fallback: bool = False  # add llm_onnx to the Triton repository
    check_passes: bool = False  # run the graph before/after every pass (compiler/measure/pass_check.py)
    max_ppl_delta: float | None = None  # search the per-matmul precision for this budget (precision_search.py)
    promote_to: str = "int8"  # the format the search promotes sensitive matmuls to before FP16
    budget_from_recipe: bool = False  # max_ppl_delta / promote_to are the recipe's own (its `promote` key)
    draft: Path | None = None  # a second model built into draft/ for speculative decoding (compiler/stages/draft.py)
    num_draft_tokens: int = 4  # tokens the draft proposes per target step in the build's speculation check


class Progress:
    """Callbacks the CLI implements (rich spinners); the default prints nothing."""

    def stage_start(self, index: int, name: str) -> None: ...
    def stage_end(self, index: int, name: str, seconds: float, detail: str = "") -> None: ...
    def pass_done(self, record: PassRecord) -> None: ...
    def step(self, what: str, done: int, total: int) -> None: ...
    def note(self, text: str) -> None: ...
