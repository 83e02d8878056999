"""``lowbit.export.onnx(..., target="qnn")``: the QDQ form that ONNX Runtime's QNN execution
provider runs on Qualcomm's HTP (Hexagon NPU) backend.

What the HTP backend needs of a QDQ graph (ONNX Runtime's QNN documentation and the rules of
its own QNN quantization config, ``onnxruntime.quantization.execution_providers.qnn``; checked
here with the ``onnxruntime-qnn`` wheel, whose HTP backend runs in simulation on x86 Linux):

* It runs integer graphs. Every operator's inputs come from ``DequantizeLinear`` and its
  output goes into ``QuantizeLinear`` (a "node unit"); a node outside such a unit is not taken
  by the HTP and runs on ONNX Runtime's CPU provider, with a transfer on each side. A graph
  with only the layers' inputs and weights quantized (the CPU form) runs entirely on the CPU,
  and one whose weights alone are quantized per tensor fails to load ("zero graph inputs").
* Fixed shapes: a dynamic axis fails validation ("Cannot get shape") and sends every node to
  the CPU; the export traces ``example_inputs``' shapes unless ``dynamic_axes`` says otherwise.
* Activations 8- or 16-bit, unsigned with a zero point (``uint8`` / ``uint16``); weights
  8-bit (``uint8``, or ``int8`` symmetric), 4-bit with opset 21; no 2-bit types, no blocked
  (group) quantization.
* ``MatMul`` weights per tensor only ("QNN does not support per-channel MatMul"); per-channel
  weights on ``Conv`` (axis 0) and ``ConvTranspose`` (axis 1).
* A bias as ``int32`` codes at ``input_scale * weight_scale`` behind its own
  ``DequantizeLinear``.

How lowbit meets it: the model is traced with lowbit's quantized weights dequantized into
float initializers and its activation fake-quants marked, then ONNX Runtime's own QNN
quantizer (``get_qnn_qdq_config`` + ``quantize``, the tool Qualcomm's and Microsoft's recipes
use) writes the QDQ graph with *lowbit's* scales and zero points imposed on every tensor lowbit
quantized (``TensorQuantOverrides``; the weights' integer codes come out equal to lowbit's,
since each dequantized weight divided by its scale rounds back to its code), and min-max
calibrates the rest on ``calibration_data``. The file therefore computes what lowbit's
simulation computes plus 8-bit rounding of the activations lowbit left in float.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from lowbit._lowbit import LowbitValueError

__all__: list[str] = []

_MOVES_DATA = {"Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity"}
#: The weight types QNN's HTP backend runs: ONNX type name to ONNX Runtime's ``QuantType`` member.
_QUANT_TYPES = {"int8": "QInt8", "uint8": "QUInt8", "int4": "QInt4", "uint4": "QUInt4"}


def _weight_override(mod: str, w: Any, value: Any, matmul: bool, op: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The dequantized weight ``value`` (a tensor laid out as the node ``op`` reads it:
    ``(in, out)`` for a Linear's ``matmul``) as an array, and its override for ONNX Runtime's
    quantizer."""
    from onnxruntime.quantization import QuantType  # type: ignore[import-untyped]

    name = mod or "weight"
    if w.group is not None:
        raise LowbitValueError(f"{name}: QNN's HTP backend has no blocked (group) quantization; quantize it per "
                               "tensor (Linear) or per channel (Conv)")
    # The narrowest type holding the codes, as the CPU export picks it; its wider range clips
    # nothing, since every code of the dequantized weight lies in lowbit's range.
    if w.onnx_type not in _QUANT_TYPES:
        raise LowbitValueError(f"{name}: QNN's HTP backend runs 4- and 8-bit weights, got codes in "
                               f"[{w.quant_min}, {w.quant_max}]")
    kind = getattr(QuantType, _QUANT_TYPES[w.onnx_type])
    per_channel = np.ndim(w.scales) == 1
    if per_channel and op == "MatMul":
        raise LowbitValueError(f"{name}: QNN's HTP backend runs MatMul weights per tensor only (a Linear on 2-D "
                               "inputs is a Gemm, which takes them per channel); calibrate with "
                               "weight_spec=QuantSpec(8, granularity='tensor') or quantize it per tensor")
    np_type = np.int8 if w.onnx_type.startswith("int") else np.uint8
    array = np.ascontiguousarray(value.detach().float().cpu().numpy())
    scales = np.atleast_1d(np.asarray(w.scales, np.float32))
    zps = np.atleast_1d(np.asarray(w.zero_points)).astype(np_type)
    if per_channel:
        rows = [{"quant_type": kind, "scale": np.array(scales[i]), "zero_point": np.array(zps[i])}
                for i in range(len(scales))]
        rows[0]["axis"] = 1 if matmul else 0  # a MatMul reads (in, out)
        return array, rows
    return array, [{"quant_type": kind, "scale": np.array(scales[0]), "zero_point": np.array(zps[0])}]


def _activation_override(a: Any, where: str) -> list[dict[str, Any]]:
    from onnxruntime.quantization import QuantType

    if a.axis is not None:
        raise LowbitValueError(f"{where}: QNN's HTP backend has no per-channel activations")
    if (a.quant_min, a.quant_max) == (0, 255):
        return [{"quant_type": QuantType.QUInt8, "scale": np.array(a.scale, np.float32),
                 "zero_point": np.array(a.zero_point, np.uint8)}]
    if (a.quant_min, a.quant_max) == (-128, 127):
        # The same values as uint8 with the zero point moved by 128: exact, and the type QNN takes.
        return [{"quant_type": QuantType.QUInt8, "scale": np.array(a.scale, np.float32),
                 "zero_point": np.array(int(a.zero_point) + 128, np.uint8)}]
    raise LowbitValueError(f"{where}: QNN's HTP backend runs 8- and 16-bit activations; this fake-quant has the range "
                           f"[{a.quant_min}, {a.quant_max}] (calibrate with 8 bits)")


def _float_graph(proto: Any, plan: Any) -> dict[str, list[dict[str, Any]]]:
    """Rewrites the placeholders in float (weights as dequantized initializers, activation
    fake-quants removed) and returns lowbit's quantization of each tensor as overrides."""
    from onnx import numpy_helper

    graph = proto.graph
    overrides: dict[str, list[dict[str, Any]]] = {}
    renames: dict[str, str] = {}
    readers = {i: n.op_type for n in graph.node for i in n.input}
    producer = {o: n for n in graph.node for o in n.output}
    nodes = []
    for node in graph.node:
        if node.domain != "lowbit":
            nodes.append(node)
            continue
        key = next(a.s.decode() for a in node.attribute if a.name == "key")
        if node.op_type == "Weight":
            mod, w, matmul, placed = plan.weights[key]
            value, rows = _weight_override(mod, w, placed, matmul, readers.get(node.output[0], ""))
            name = f"{mod or 'model'}.weight_dequantized"
            graph.initializer.append(numpy_helper.from_array(value, name))
            overrides[name] = rows
            renames[node.output[0]] = name
        else:
            a = plan.activations[key]
            renames[node.output[0]] = node.input[0]
            rows = _activation_override(a, node.output[0])
            x = node.input[0]
            overrides.setdefault(x, rows)
            # ONNX Runtime gives the output of an op that only moves data its input's
            # quantization: lowbit's must be on the input too.
            while x in producer and producer[x].op_type in _MOVES_DATA:
                x = producer[x].input[0]
                overrides.setdefault(x, rows)
    del graph.node[:]
    graph.node.extend(nodes)
    for n in graph.node:
        for i, v in enumerate(n.input):
            while v in renames:
                v = renames[v]
            n.input[i] = v
    for o in graph.output:
        while o.name in renames:
            o.name = renames[o.name]
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for imp in list(proto.opset_import):
        if imp.domain == "lowbit":
            proto.opset_import.remove(imp)
    return overrides


def complete(proto: Any, plan: Any, batches: list[tuple], opset: int | None) -> tuple[Any, int, dict[str, str]]:
    """The QNN form of a traced model: (ModelProto, opset, {module: weight type})."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config  # type: ignore[import-untyped]

    overrides = _float_graph(proto, plan)
    need = 21 if any(r[0]["quant_type"] in (QuantType.QInt4, QuantType.QUInt4) for r in overrides.values()) else 13
    final = max(need, opset or need)
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = max(imp.version, final)
    names = [i.name for i in proto.graph.input]
    feeds = []
    for args in batches:
        if len(args) != len(names):
            raise LowbitValueError(f"calibration_data: a batch has {len(args)} tensor inputs, the graph takes {len(names)}")
        feeds.append({n: a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a) for n, a in zip(names, args)})
    if not feeds:
        raise LowbitValueError("calibration_data is empty")

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> Any:  # noqa: ANN401
            return next(self.it, None)

    import warnings

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = os.path.join(tmp, "qnn.onnx")
        config = get_qnn_qdq_config(proto, Reader(), activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8,
                                    init_overrides=overrides, keep_removable_activations=True)
        quantize(proto, out, config)
        result = onnx.load(out)
    result.producer_name = "lowbit"
    kinds = {}
    for mod, *_ in plan.weights.values():
        rows = overrides.get(f"{mod or 'model'}.weight_dequantized")
        if rows is None:  # a module the traced call does not run
            continue
        kinds[mod] = next(k for k, v in _QUANT_TYPES.items() if getattr(QuantType, v) == rows[0]["quant_type"])
    return result, final, kinds
