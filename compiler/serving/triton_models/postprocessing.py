"""`postprocessing`: generated token ids -> text with the model's own tokenizer (special tokens dropped)."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from compiler.serving.triton_models.common import version_dir
from compiler.serving.triton_models.tokenizer import ServingTokenizer


class TritonPythonModel:
    def initialize(self, args):
        self.tokenizer = ServingTokenizer(version_dir(args) / "tokenizer")

    def execute(self, requests):
        responses = []
        for request in requests:
            ids = pb_utils.get_input_tensor_by_name(request, "output_ids").as_numpy().reshape(-1).tolist()
            decoded = self.tokenizer.decode(ids)
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor("text_output", np.array([decoded.encode("utf-8")], dtype=object))]))
        return responses
