from compiler.serving.triton_models.preprocessing import TritonPythonModel  # noqa: F401
