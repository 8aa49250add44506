"""The int8 ONNX model written in bounded memory (issue #31): the network's graph traced from a weightless copy
of it, then its weights quantised and written one tensor at a time.

Tracing the real network and quantising the float file with ONNX Runtime's `quantize_dynamic` held several
copies of the weights at once (the exporter's parameters, the ONNX proto, its bytes; then the quantiser's own),
so a first run peaked at 1.5× a run with the export cached (docs/BENCHMARKS.md). Here the tracer sees a copy of
the network whose parameters are one number each, broadcast to their shape (no memory, each parameter a distinct
value so none is merged with another), and exports the graph without them; then every MatMul and Conv with a
constant weight becomes the pattern `quantize_dynamic` writes (DynamicQuantizeLinear on the activation,
MatMulInteger / ConvInteger, Cast, Mul by the two scales; Conv adds its bias), its weight quantised by ONNX
Runtime's own `quantize_data` (int8, symmetric, per tensor, as `quantize_dynamic` does); each weight is read from
the real network, quantised and appended to the model's data file before the next.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import mmap
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

DATA_SUFFIX = ".data"
MADV_PAGEOUT = 21
"""Linux ≥ 5.4: reclaim a range of pages now (clean file pages dropped, read again when next used)."""


class LastHiddenState(torch.nn.Module):
    """The transformers model answering with its last hidden state alone: the one output the export keeps."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.network(pixel_values=pixel_values).last_hidden_state


def weightless_copy(network: torch.nn.Module, attention: str | None = None) -> torch.nn.Module:
    """The same network with each parameter one distinct number broadcast to its shape (no memory of its own)
    and the buffers copied: it traces into the real network's graph, its values never used. `attention`: the
    copy's attention implementation (transformers' "eager", "sdpa"), else the network's."""
    config = network.config
    if attention is not None:
        config = copy.deepcopy(config)
        config._attn_implementation = attention
    with torch.device("meta"):
        shadow = type(network)(config)
    shadow = shadow.to_empty(device="cpu")
    for index, (_, parameter) in enumerate(shadow.named_parameters()):
        parameter.data = torch.full((), float(index + 1), dtype=parameter.dtype).expand(parameter.shape)
    for name, buffer in network.named_buffers():
        shadow.get_buffer(name).copy_(buffer)
    return shadow.eval()


class _DataFile:
    """The model's external data: tensors appended one at a time, each a TensorProto pointing into the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stream = open(path, "wb")  # noqa: SIM115 (closed by close())

    def tensor(self, name: str, array: np.ndarray):
        from onnx import TensorProto, helper

        array = np.ascontiguousarray(array)
        proto = TensorProto()
        proto.name = name
        proto.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        proto.dims.extend(array.shape)
        offset = self._stream.tell()
        self._stream.write(array.tobytes())
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", offset), ("length", array.nbytes)):
            entry = proto.external_data.add()
            entry.key, entry.value = key, str(value)
        return proto

    def close(self) -> None:
        self._stream.close()


def write_int8_model(graph_path: Path, weights: dict[str, torch.Tensor], model_path: Path) -> None:
    """The graph `torch.onnx.export` wrote without parameters (`export_params=False`, their names its inputs),
    completed with `weights` (name → tensor): MatMul and Conv weights quantised to int8, transposed parameters
    folded, the rest as float; every tensor in `model_path`'s data file, written one at a time."""
    import onnx
    from onnx import TensorProto, numpy_helper
    from onnxruntime.quantization.quant_utils import quantize_data

    model = onnx.load(str(graph_path))
    graph = model.graph
    unknown = [item.name for item in graph.input[1:] if item.name not in weights]
    if unknown:
        raise RuntimeError(f"the exported graph needs inputs the network does not have: {unknown[:3]}")
    transposed = {node.output[0]: (node.input[0], list(node.attribute[0].ints)) for node in graph.node
                  if node.op_type == "Transpose" and node.input[0] in weights}

    def array(name: str) -> np.ndarray:
        if name in transposed:
            source, permutation = transposed[name]
            return weights[source].detach().numpy().transpose(permutation)
        return weights[name].detach().numpy()

    def source(name: str) -> torch.Tensor:
        return weights[transposed[name][0] if name in transposed else name]

    constant = set(weights) | set(transposed)
    quantised = {node.input[1] for node in graph.node
                 if node.op_type in ("MatMul", "Conv") and len(node.input) > 1 and node.input[1] in constant
                 and node.input[0] not in constant and array(node.input[1]).ndim >= 2}
    nodes = list(_quantised_nodes(graph.node, quantised, transposed, array))
    floats = sorted({name for node in nodes for name in node.input} & constant - quantised)
    data = _DataFile(model_path.with_name(model_path.name + DATA_SUFFIX))
    initializers: list[TensorProto] = []
    try:
        for name in sorted(quantised):
            zero_point, scale, values = quantize_data(array(name).flatten(), TensorProto.INT8, True)
            initializers += [data.tensor(f"{name}_quantized", values.reshape(array(name).shape)),
                             numpy_helper.from_array(np.asarray(scale, np.float32), f"{name}_scale"),
                             numpy_helper.from_array(np.asarray(zero_point, np.int8), f"{name}_zero_point")]
            hand_back(source(name))
        for name in floats:
            initializers.append(data.tensor(name, array(name)))
            hand_back(source(name))
    finally:
        data.close()
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [item for item in graph.input if item.name not in weights]
    del graph.input[:]
    graph.input.extend(kept)
    graph.initializer.extend(initializers)
    onnx.save(model, str(model_path))


def _quantised_nodes(nodes, quantised: set[str], transposed: dict, array: Callable[[str], np.ndarray]) -> Iterator:
    """The graph's nodes with each MatMul / Conv of a quantised weight replaced by quantize_dynamic's pattern,
    the folded Transposes dropped, one DynamicQuantizeLinear per quantised activation."""
    from onnx import TensorProto, helper, numpy_helper

    activations: dict[str, tuple[str, str, str]] = {}
    for node in nodes:
        if node.op_type == "Transpose" and node.output[0] in transposed:
            continue
        if node.op_type not in ("MatMul", "Conv") or len(node.input) < 2 or node.input[1] not in quantised:
            yield node
            continue
        source, weight, output = node.input[0], node.input[1], node.output[0]
        if source not in activations:
            activations[source] = (f"{source}_quantized", f"{source}_scale", f"{source}_zero_point")
            yield helper.make_node("DynamicQuantizeLinear", [source], list(activations[source]),
                                   name=f"{source}_QuantizeLinear")
        quantised_input, input_scale, input_zero = activations[source]
        base = node.name or output
        scales = f"{base}_quant_scales_mul:0"
        yield helper.make_node("Mul", [input_scale, f"{weight}_scale"], [scales], name=f"{base}_quant_scales_mul")
        integer = "MatMulInteger" if node.op_type == "MatMul" else "ConvInteger"
        attributes = {} if node.op_type == "MatMul" else {a.name: helper.get_attribute_value(a)
                                                          for a in node.attribute}
        yield helper.make_node(integer, [quantised_input, f"{weight}_quantized", input_zero, f"{weight}_zero_point"],
                               [f"{output}_output_quantized"], name=f"{base}_quant", **attributes)
        yield helper.make_node("Cast", [f"{output}_output_quantized"], [f"{output}_output_quantized_cast_output"],
                               to=TensorProto.FLOAT, name=f"{base}_output_quantized_cast")
        scaled = output if len(node.input) < 3 else f"{output}_quant_scaled_output"
        yield helper.make_node("Mul", [f"{output}_output_quantized_cast_output", scales], [scaled],
                               name=f"{base}_quant_output_scale_mul")
        if len(node.input) >= 3:  # Conv's bias, shaped to add over the channels
            bias = array(node.input[2]).reshape(1, -1, 1, 1).astype(np.float32)
            yield helper.make_node("Constant", [], [f"{output}_bias"],
                                   value=numpy_helper.from_array(bias, f"{output}_bias"))
            yield helper.make_node("Add", [scaled, f"{output}_bias"], [output], name=f"{base}_bias_add")


def hand_back(tensor: torch.Tensor) -> None:
    """The pages of a weight read from a mapped weights file given back to the kernel (Linux): the loader maps
    safetensors files, so reading every weight once for the quantisation would otherwise keep the whole file
    resident, which a run with the export cached never does. Only pages of a file mapping are advised: they are
    clean, read again from the file if the float network ever runs; anonymous memory is left alone."""
    libc = _libc()
    if libc is None or tensor.device.type != "cpu" or not tensor.numel():
        return
    page = mmap.PAGESIZE
    address = tensor.data_ptr()
    start, end = -(-address // page) * page, (address + tensor.numel() * tensor.element_size()) // page * page
    if end > start and _in_a_file_mapping(start, end):
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_PAGEOUT)


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _in_a_file_mapping(start: int, end: int) -> bool:
    """Whether [start, end) lies inside one mapping of a regular file (/proc/self/maps)."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return False
    for line in maps:
        fields = line.split(maxsplit=5)
        low, high = (int(value, 16) for value in fields[0].split("-"))
        if low <= start and end <= high:
            return len(fields) == 6 and fields[5].startswith("/")
    return False
