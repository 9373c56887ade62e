"""llmc: compile a Hugging Face causal LM into a TensorRT engine and a Triton model repository.

Stages, one module each, data flowing one way:
load -> export -> pipeline (passes) -> build -> validate -> package.
"""

__version__ = "0.1.0"
