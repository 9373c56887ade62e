"""Running a compiled graph: executors (onnxruntime, TensorRT) behind one protocol, the
generation loop over any of them, and speculative decoding.
"""
