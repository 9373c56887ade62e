"""Load: the reference PyTorch model (FP32) and its tokenizer, only when a stage that runs needs them."""

from __future__ import annotations

from compiler.stages.state import BuildState
from compiler.errors import BadInputError
from compiler.frontend.load import load_model
from compiler.stages.base import Stage


def check_validation_fits(loaded, request) -> None:
    """Fail before the expensive stages if the validation prompt can't fit the engine's positions."""
    needed = len(loaded.tokenizer(request.prompt).input_ids) + request.decode_steps
    if needed > request.options.max_seq:
        raise BadInputError(
            f"validation needs {needed} positions (prompt + {request.decode_steps} decode steps) but "
            f"--max-seq is {request.options.max_seq}; shorten --prompt or raise --max-seq"
        )


class Load(Stage):
    name = "load"
    writes = ("loaded", "parameters", "pad_token_id")
    unread_reason = "no stage that runs reads the model (their outputs are cached)"  # the model is needed only
    # to export, calibrate, compute the references: the driver skips this stage when no stage that runs reads it

    def __init__(self, validates: bool = True):
        self.validates = validates  # the list validates the build's prompt (`llmc analyze`'s does not)

    def run(self, state: BuildState) -> None:
        r = state.request
        state.loaded = load_model(state.model_path, r.allow_pickle, r.trust_remote_code)
        if self.validates:
            check_validation_fits(state.loaded, r)
        state.parameters = state.loaded.num_parameters
        state.pad_token_id = state.loaded.tokenizer.pad_token_id

    def detail(self, state: BuildState) -> str:
        return f"{state.loaded.spec.architecture}, {state.loaded.num_parameters / 1e6:.2f}M params"

    def report(self, state: BuildState) -> dict:
        return {"model": {"name": state.model_path.name, "path": state.model_path,
                          "architecture": state.spec.architecture, "spec": state.spec,
                          "parameters": state.parameters}}
