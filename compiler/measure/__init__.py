"""What a build is worth: numerics against PyTorch, held-out quality, the verdict, per-pass checks,
the precision search and weight sizes.
"""
