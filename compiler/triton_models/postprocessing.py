from compiler.serving.triton_models.postprocessing import TritonPythonModel  # noqa: F401
