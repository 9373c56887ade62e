"""Helpers shared by llmc's Triton Python models: config parameters, optional inputs, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class RequestError(ValueError):
    """A request the model refuses; its message goes back to the client as the response's error."""


def model_config(args: dict) -> dict:
    return json.loads(args["model_config"])


def parameter(config: dict, name: str, default: str | None = None) -> str:
    value = config.get("parameters", {}).get(name, {}).get("string_value")
    if value is None:
        if default is None:
            raise ValueError(f"model config of {config.get('name')!r} has no parameter {name!r}: rewrite the "
                             "repository with `llmc build`")
        return default
    return value


def version_dir(args: dict) -> Path:
    return Path(args["model_repository"]) / args["model_version"]


def scalar(request, name: str, default):
    """An optional [1]-shaped input as a Python scalar (the default when the client did not send it)."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    value = tensor.as_numpy().reshape(-1)
    if value.size != 1:
        raise RequestError(f"input '{name}' must hold exactly one value (got shape {list(value.shape)})")
    value = value[0]
    return value.decode("utf-8") if isinstance(value, bytes) else value.item()


def speculate(request) -> int:
    """The optional `speculate` input: n-gram proposals per decode step for this request (0: off)."""
    k = int(scalar(request, "speculate", 0))
    if k < 0:
        raise RequestError(f"speculate must be >= 0 proposal tokens per step (got {k})")
    return k


def no_scheduler_for(k: int, model: str) -> None:
    """Speculation is a scheduler feature: a route without one refuses it rather than ignoring it."""
    if k:
        raise RequestError(f"speculate {k}: {model} serves one request at a time here (no in-flight scheduler: "
                           "llmc_scheduler_max_batch 0 or a graph without a fixed-capacity cache); send speculate 0")


def text(request, name: str) -> str:
    value = scalar(request, name, None)
    if value is None:
        raise RequestError(f"missing input '{name}'")
    return value if isinstance(value, str) else str(value)


def error_response(message: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))


def answer_errors(sender, model: str, work) -> None:
    """Run `work()`; a RequestError, or a bug, becomes the request's final error response (a bug must
    still end the stream, or the client waits forever)."""
    final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    try:
        work()
    except RequestError as exc:
        sender.send(error_response(str(exc)), flags=final)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        pb_utils.Logger.log_error(f"{type(exc).__name__}: {exc}")
        sender.send(error_response(f"internal error in {model}: {type(exc).__name__}: {exc}"), flags=final)


def ids_tensor(name: str, ids) -> "pb_utils.Tensor":
    return pb_utils.Tensor(name, np.asarray(ids, dtype=np.int64).reshape(-1))


def call(model: str, inputs: list, outputs: list[str]):
    """A synchronous BLS call; raises RequestError with the callee's message when it fails."""
    response = pb_utils.InferenceRequest(model_name=model, requested_output_names=outputs, inputs=inputs).exec()
    if response.has_error():
        raise RequestError(response.error().message())
    return [pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs]
