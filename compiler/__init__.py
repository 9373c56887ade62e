"""llmc: compile a Hugging Face causal LM into a TensorRT engine and a Triton model repository.

Subpackages by role; imports run one way, top to bottom (a module imports only from rows below it):

    commands/   the `llmc` command line: build, analyze, generate, inspect, report, serve
    driver/     the build loop over a list of stages, its state, cache, lock, staged output
    stages/     one object per build stage: what it reads and writes, its cache key, its report section
    measure/    validate, quality, verdict, per-pass check, precision search, weight sizes
    serving/    the Triton repository, the bundled server, the Python models Triton runs
    report/     report.json, the accuracy card, plots, manifest, `llmc inspect`
    runtime/    executors (onnxruntime, TensorRT), the generation loop, speculative decoding
    frontend/   HF directory -> PyTorch reference -> ONNX, calibration, running a recipe's passes
    engine/     TensorRT(-RTX) backends and the engine build
    passes/, plugins/ (top level)   graph rewrites and the attention plugin
    graph_io, recipe, input_schema, errors   leaf contracts every layer shares
"""

__version__ = "0.1.0"
