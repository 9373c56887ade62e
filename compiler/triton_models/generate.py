from compiler.serving.triton_models.generate import TritonPythonModel  # noqa: F401
