"""Re-exports for Triton repositories written before the models moved to compiler/serving/triton_models/.

Each repository's model.py imports `compiler.triton_models.<module>`; these one-line modules keep
those repositories loading (rebuilding writes the new path).
"""
