"""The int8 forward's kernels on this CPU (issue #31): what ONNX Runtime's alternatives to the export's ops give.

One 512² tile of a ViT/16 is 1029 tokens (1024 patches, the class token, 4 registers). Timed in ONNX Runtime with
the product's thread count (core/onnx_int8.py), each op alone in a graph of its own, random inputs, the median of
`--repeat` runs after one warm-up:
- attention, for ViT-S (6 heads) and ViT-B (12 heads) of 64 channels: the export's FusedMatMul, Softmax and
  MatMul against the fused com.microsoft.MultiHeadAttention and opset 23's Attention (largest difference to the
  export's ops too);
- a weight product, ViT-S's qkv (384 → 1152) and ViT-B's MLP (768 → 3072): float32 MatMul, the export's
  DynamicQuantizeMatMul (int8 weights, one scale a tensor) and 8-bit MatMulNBits (blockwise int8 weights, blocks of
  32 and 128, float or int8 arithmetic: accuracy_level 0 and 4), with their error against float32.
Prints JSON lines; docs/BENCHMARKS.md holds the figures that were recorded.

    .venv/bin/python scripts/bench_kernels.py [--repeat 15]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from treeseg_qgis.engine.core.onnx_int8 import cpu_threads  # noqa: E402

TOKENS = 1029
HEAD_CHANNELS = 64
OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]


def session(graph, opsets=OPSETS) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = cpu_threads()
    options.inter_op_num_threads = 1
    model = helper.make_model(graph, opset_imports=opsets)
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def timed(runner: onnxruntime.InferenceSession, feeds: dict, repeat: int) -> tuple[np.ndarray, float]:
    """The output and the median milliseconds of `repeat` runs after a warm-up."""
    output = runner.run(None, feeds)[0]
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        runner.run(None, feeds)
        seconds.append(time.perf_counter() - started)
    return output, 1000 * float(np.median(seconds))


def attention(heads: int, repeat: int) -> None:
    shape = [1, heads, TOKENS, HEAD_CHANNELS]
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name in "qkv"]
    output = [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)]
    scale = HEAD_CHANNELS ** -0.5
    export_ops = helper.make_graph([
        helper.make_node("FusedMatMul", ["q", "k"], ["scores"], domain="com.microsoft", transB=1, alpha=scale),
        helper.make_node("Softmax", ["scores"], ["weights"], axis=-1),
        helper.make_node("MatMul", ["weights", "v"], ["out"])], "export", inputs, output)
    fused = helper.make_graph([  # MultiHeadAttention takes the query as (batch, tokens, channels)
        helper.make_node("Transpose", ["q"], ["q_tokens"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["q_tokens", "flat"], ["query"]),
        helper.make_node("MultiHeadAttention", ["query", "k", "v"], ["merged"], domain="com.microsoft",
                         num_heads=heads, scale=scale),
        helper.make_node("Reshape", ["merged", "split"], ["out_tokens"]),
        helper.make_node("Transpose", ["out_tokens"], ["out"], perm=[0, 2, 1, 3])], "fused", inputs, output,
        initializer=[numpy_helper.from_array(np.array([1, TOKENS, heads * HEAD_CHANNELS]), "flat"),
                     numpy_helper.from_array(np.array([1, TOKENS, heads, HEAD_CHANNELS]), "split")])
    standard = helper.make_graph([helper.make_node("Attention", ["q", "k", "v"], ["out"], scale=scale)],
                                 "standard", inputs, output)
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal(shape, dtype=np.float32) for name in "qkv"}
    flops = 4 * heads * TOKENS ** 2 * HEAD_CHANNELS
    reference = None
    for name, graph, opsets in (("export's FusedMatMul + Softmax + MatMul", export_ops, OPSETS),
                                ("com.microsoft.MultiHeadAttention", fused, OPSETS),
                                ("Attention (opset 23)", standard, [helper.make_opsetid("", 23)])):
        result, ms = timed(session(graph, opsets), feeds, repeat)
        reference = result if reference is None else reference
        print(json.dumps({"part": "attention", "heads": heads, "tokens": TOKENS, "op": name, "ms": round(ms, 2),
                          "gflops": round(flops / ms / 1e6, 1),
                          "max_difference": float(np.abs(result - reference).max())}), flush=True)


def weight_product(inputs: int, outputs: int, repeat: int) -> None:
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((inputs, outputs)) * 0.02).astype(np.float32)
    feeds = {"x": rng.standard_normal((1, TOKENS, inputs), dtype=np.float32)}
    source = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, TOKENS, inputs])]
    target = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    scale = np.abs(weights).max() / 127
    graphs = {
        "float32 MatMul": helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "f", source, target,
                                            [numpy_helper.from_array(weights, "w")]),
        "export's DynamicQuantizeMatMul": helper.make_graph(
            [helper.make_node("DynamicQuantizeMatMul", ["x", "w", "scale", "zero"], ["y"], domain="com.microsoft")],
            "q", source, target, [numpy_helper.from_array(np.round(weights / scale).astype(np.int8), "w"),
                                  numpy_helper.from_array(np.array(scale, np.float32), "scale"),
                                  numpy_helper.from_array(np.array(0, np.int8), "zero")])}
    for block in (32, 128):
        blocks = weights.T.reshape(outputs, inputs // block, block)
        block_scales = np.maximum(np.abs(blocks).max(-1), 1e-12) / 127
        quantised = (np.round(blocks / block_scales[..., None]) + 128).astype(np.uint8)
        for level in (0, 4):
            graphs[f"MatMulNBits 8-bit, blocks of {block}, accuracy_level {level}"] = helper.make_graph(
                [helper.make_node("MatMulNBits", ["x", "w", "scales"], ["y"], domain="com.microsoft", K=inputs,
                                  N=outputs, bits=8, block_size=block, accuracy_level=level)],
                "n", source, target, [numpy_helper.from_array(quantised, "w"),
                                      numpy_helper.from_array(block_scales.reshape(-1).astype(np.float32), "scales")])
    reference = None
    for name, graph in graphs.items():
        result, ms = timed(session(graph), feeds, repeat)
        reference = result if reference is None else reference
        error = float(np.linalg.norm(result - reference) / np.linalg.norm(reference))
        print(json.dumps({"part": "weight product", "shape": f"{TOKENS} × {inputs} → {outputs}", "op": name,
                          "ms": round(ms, 2), "gops": round(2 * TOKENS * inputs * outputs / ms / 1e6, 1),
                          "relative_error": round(error, 4)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    print(json.dumps({"onnxruntime": onnxruntime.__version__, "threads": cpu_threads()}), flush=True)
    for heads in (6, 12):
        attention(heads, args.repeat)
    for inputs, outputs in ((384, 1152), (768, 3072)):
        weight_product(inputs, outputs, args.repeat)


if __name__ == "__main__":
    main()
