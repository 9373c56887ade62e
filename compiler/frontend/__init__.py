"""From a Hugging Face directory to an ONNX graph: load, export (+ stamping), calibration, the
recipe's passes over the graph.
"""
