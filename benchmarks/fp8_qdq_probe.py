"""Which activation Q/DQ forms around a MatMul TensorRT-RTX parses and builds, and onnxruntime runs.

Why: TensorRT builds strongly typed networks with explicit quantization only, so the W8A8 passes
(passes/activation_quant.py) must emit a Q/DQ form its parser types as FP8 (or INT8) and its
builder accepts. Each case is x[b, 64] (FP16) -> QuantizeLinear -> DequantizeLinear -> MatMul with
a per-output-channel weight DQ; the cases vary the activation scale's type, whether the zero point
is given (it sets QuantizeLinear's output type) and the weight's type. TensorRT-RTX builds on this machine without a GPU (nothing executes).

    python benchmarks/fp8_qdq_probe.py
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from compiler.engine.trt_logger import process_logger

K, N = 64, 32
FP8, INT8 = TensorProto.FLOAT8E4M3FN, TensorProto.INT8
CASES = (("FP16 scale, FP8 zero, FP8 W", TensorProto.FLOAT16, FP8, FP8),  # (case, scale, zero point, weight)
         ("FP16 scale, no zero, FP8 W", TensorProto.FLOAT16, None, FP8),
         ("FP32 scale, FP8 zero, FP8 W", TensorProto.FLOAT, FP8, FP8),
         ("FP16 scale, INT8 zero, FP8 W", TensorProto.FLOAT16, INT8, FP8),
         ("FP16 scale, INT8 zero, INT8 W", TensorProto.FLOAT16, INT8, INT8))


def graph(scale_type: int, zero_type: int | None, weight_type: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    scale = numpy_helper.from_array(np.array(0.01, helper.tensor_dtype_to_np_dtype(scale_type)), "sx")
    zero = [helper.make_tensor("zx", zero_type, [], [0])] if zero_type is not None else []
    qdq_inputs = ["x", "sx"] + (["zx"] if zero else [])
    nodes = [helper.make_node("QuantizeLinear", qdq_inputs, ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", *qdq_inputs[1:]], ["xd"]),
             helper.make_node("DequantizeLinear", ["w8", "sw"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    inits = [scale, *zero, helper.make_tensor("w8", weight_type, [K, N], rng.integers(-100, 100, K * N).tolist()),
             numpy_helper.from_array(rng.uniform(0.01, 0.02, N).astype(np.float16), "sw")]
    g = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["b", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["b", N])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 11
    return model


def onnxruntime_result(model: onnx.ModelProto) -> str:
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        session.run(None, {"x": np.ones((2, K), np.float16)})
    except Exception as exc:  # noqa: BLE001 - the probe reports whatever the backend says
        return "rejected: " + str(exc).split(":")[-1].strip()[:60]
    return "runs"


def tensorrt_result(model: onnx.ModelProto) -> str:
    import tensorrt_rtx as trt

    logger = process_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        return "parse fails: " + str(parser.get_error(0)).split("API Usage Error (")[-1][:80]
    quantized = [str(network.get_layer(i).get_output(0).dtype).split(".")[-1] for i in range(network.num_layers)
                 if network.get_layer(i).type == trt.LayerType.QUANTIZE]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, K), (2, K), (4, K))
    config.add_optimization_profile(profile)
    built = builder.build_serialized_network(network, config) is not None
    return f"QUANTIZE -> {'/'.join(quantized)}, " + ("builds" if built else "build fails")


def main() -> None:
    print(f"{'case':<32} {'onnxruntime ' + ort.__version__:<40} TensorRT-RTX")
    for name, scale_type, zero_type, weight_type in CASES:
        model = graph(scale_type, zero_type, weight_type)
        print(f"{name:<32} {onnxruntime_result(model):<40} {tensorrt_result(model)}", flush=True)


if __name__ == "__main__":
    main()
