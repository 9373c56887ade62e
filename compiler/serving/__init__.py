"""Serving an artifact: the Triton model repository, the bundled server, the Python models.
"""
