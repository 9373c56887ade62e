"""TensorRT: which one is installed (full or RTX), and building an engine from the final ONNX.
"""
