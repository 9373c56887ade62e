"""Custom attention for what TensorRT's native layers lack: paged and FP8 KV cache, sliding window.

- attention_reference.py: the semantics in plain PyTorch (block tables, FP8 per-head scales, masks);
- attention_kernel.py: Triton kernels (split-K flash-decoding, causal prefill, and the plugin's
  one-launch cache-write + attention), checked against the reference;
- trt_plugin.py: `llmc::PagedAttention` as a TensorRT AOT Python plugin embedding the kernel.

passes/attention_plugin.py puts the node in the graph (recipes fp8kv, fp16-plugin). Plugin recipes
are refused before export on backends without plugin layers (TensorRT-RTX, whose parser aborts on
a custom-domain node); compiler.engine.engine_build registers the plugin before parsing on full TensorRT.
"""
