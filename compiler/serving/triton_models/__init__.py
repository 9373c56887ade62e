"""The Python-backend models of llmc's Triton repository (preprocessing, llm_onnx, postprocessing, generate).

Each repository `model.py` is a three-line shim that puts `LLMC_PYTHONPATH` on `sys.path` and
imports its `TritonPythonModel` from here, so the code Triton runs is this tested package (see
`compiler/serving/serve.py` for why the stub needs that path). These modules import
`triton_python_backend_utils`, which exists only inside Triton's Python-backend stub.
"""
