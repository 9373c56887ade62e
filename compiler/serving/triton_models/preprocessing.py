"""`preprocessing`: prompt text -> token ids with the model's own tokenizer (copied into the repository).

It also refuses prompts that can't fit the engine's KV cache (`--max-seq`) here, before any
generation starts, so the client gets one clear error instead of a failure mid-stream.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from compiler.serving.triton_models.common import RequestError, error_response, ids_tensor, model_config, parameter, scalar, text, version_dir
from compiler.serving.triton_models.tokenizer import ServingTokenizer


class TritonPythonModel:
    def initialize(self, args):
        config = model_config(args)
        self.tokenizer = ServingTokenizer(version_dir(args) / "tokenizer")
        self.max_seq = int(parameter(config, "llmc_max_seq"))
        self.default_max_tokens = int(parameter(config, "llmc_default_max_tokens", "64"))

    def _one(self, request):
        prompt = text(request, "text_input")
        max_tokens = int(scalar(request, "max_tokens", self.default_max_tokens))
        if max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1 (got {max_tokens})")
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise RequestError("empty prompt: text_input tokenizes to no tokens")
        needed = len(ids) + max_tokens - 1  # the last new token is never fed back
        if needed > self.max_seq:
            raise RequestError(
                f"prompt is {len(ids)} tokens; with max_tokens {max_tokens} it needs {needed} positions but the "
                f"engine's KV cache holds {self.max_seq} (llmc build --max-seq): shorten the prompt or max_tokens")
        return pb_utils.InferenceResponse([ids_tensor("input_ids", ids),
                                           pb_utils.Tensor("max_tokens", np.array([max_tokens], np.int32))])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except RequestError as exc:
                responses.append(error_response(str(exc)))
        return responses
