from compiler.serving.triton_models.llm_onnx import TritonPythonModel  # noqa: F401
