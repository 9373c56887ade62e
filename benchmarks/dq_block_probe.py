"""Which INT4 DequantizeLinear block sizes onnxruntime and TensorRT-RTX accept for a weight [K, N].

Why: INT4's block must be chosen per matmul when K is not a multiple of the recipe's block_size
(576 % 128 = 64). ONNX allows a short last block (scale rows = ceil(K / block)); this asks each
backend what it does with one: onnxruntime runs DQ + MatMul (max |error| against numpy's
dequantized product), TensorRT-RTX parses and builds the same graph on this machine (no engine runs).

    python benchmarks/dq_block_probe.py
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from compiler.engine.trt_logger import process_logger

CASES = ((576, 64), (576, 128), (576, 32), (80, 16), (48, 16), (100, 32), (576, 192))  # (K, block)
N = 64


def graph(k: int, block: int) -> tuple[onnx.ModelProto, np.ndarray]:
    rows = -(-k // block)
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, (k, N)).astype(np.int8)
    scale = rng.uniform(0.01, 0.02, (rows, N)).astype(np.float16)
    dq = helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=0, block_size=block)
    mm = helper.make_node("MatMul", ["x", "w"], ["y"])
    g = helper.make_graph([dq, mm], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["b", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["b", N])],
                          [helper.make_tensor("q", TensorProto.INT4, [k, N], q.flatten().tolist()),
                           numpy_helper.from_array(scale, "s")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    weight = q.astype(np.float32) * np.repeat(scale.astype(np.float32), block, axis=0)[:k]
    return model, weight


def onnxruntime_result(model: onnx.ModelProto, k: int, weight: np.ndarray) -> str:
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - the probe reports whatever the backend says
        return f"rejected: {str(exc).splitlines()[0][:120]}"
    x = np.ones((2, k), np.float16)
    y = session.run(None, {"x": x})[0].astype(np.float32)
    return f"runs, max |y - x W| {np.abs(y - x.astype(np.float32) @ weight).max():.2g}"


def tensorrt_result(model: onnx.ModelProto, k: int) -> str:
    import tensorrt_rtx as trt

    logger = process_logger(trt)  # one per process: TensorRT keeps the first (compiler/engine/trt_logger.py)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        return "parse fails: " + str(parser.get_error(0)).split("Assertion failed: ")[-1][:90]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, k), (2, k), (4, k))
    config.add_optimization_profile(profile)
    return "builds" if builder.build_serialized_network(network, config) is not None else "build fails"


def main() -> None:
    print(f"{'K':>5} {'block':>5} {'rows':>4}  onnxruntime {ort.__version__:<30} TensorRT-RTX")
    for k, block in CASES:
        model, weight = graph(k, block)
        print(f"{k:>5} {block:>5} {-(-k // block):>4}  {onnxruntime_result(model, k, weight):<42} "
              f"{tensorrt_result(model, k)}", flush=True)


if __name__ == "__main__":
    main()
