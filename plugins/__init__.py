"""Custom TensorRT plugins for what native layers lack (paged / FP8 KV cache, sliding window).

Empty in the vertical slice: the FP16 recipe maps entirely to native layers. Plugin recipes must
check `compiler.backend.Backend.supports_plugins` before parsing (TensorRT-RTX has no plugins
and its parser aborts on a custom-domain node); `compiler.build` already refuses such graphs.
"""
