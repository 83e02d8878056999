"""ONNX Runtime as the other side: a session that keeps an exported file's numbers, and a model
whose ``forward(record=True)`` returns every torch module's output the graph exposes, so that
:func:`lowbit.crossval.compare` checks an ONNX file layer by layer like lowbit's runtime."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from lowbit._lowbit import LowbitFormatError, LowbitIOError, LowbitTypeError, LowbitValueError
from lowbit._validate import int_arg, path_arg

__all__ = ["OrtModel", "session"]


def session(path: str | os.PathLike[str] | bytes, threads: int | None = None, exact: bool = True) -> Any:
    """An ONNX Runtime CPU session for the file at ``path`` (or a serialized model).
    ``exact=True`` keeps two of ONNX Runtime's QDQ rewrites from changing the file's numbers:
    running 4- and 8-bit ``DequantizeLinear`` → ``MatMul`` pairs with activations it quantizes
    to int8 on the fly (its default for the ``MatMulNBits`` kernel it makes of them: accuracy
    level 4; about 1% off on a random MLP), and rounding a convolution's float bias to int32
    codes at the scale ``input_scale * weight_scale`` (its ``WeightBiasQuantization``
    transformer; about 1e-3 of the output at 4-bit activations); and, for a model with 2-bit
    weights, ONNX Runtime 1.32's 2-bit ``MatMulNBits``, which computes wrong results on some
    shapes (its QDQ fusions are off for such a model). ``exact=False`` is ONNX Runtime's
    default, faster and approximate.

    >>> import torch, tempfile, os
    >>> from lowbit.export import onnx, session
    >>> path = os.path.join(tempfile.mkdtemp(), "lin.onnx")
    >>> _ = onnx(torch.nn.Linear(4, 2), torch.randn(3, 4), path)
    >>> [i.name for i in session(path).get_inputs()]
    ['input']
    """
    import onnxruntime  # type: ignore[import-untyped]

    so = onnxruntime.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = int_arg(threads, "threads", 1, 1024)
    if exact:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    model = path if isinstance(path, bytes) else _read(path, "path")
    disabled = None
    if exact:
        disabled = ["WeightBiasQuantization"]
        if _has_2bit_weights(model):
            disabled.append("QDQSelectorActionTransformer")
    try:
        return onnxruntime.InferenceSession(model, so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    except Exception as e:  # ORT raises its own exception types for a file it cannot load
        if not type(e).__module__.startswith("onnxruntime"):
            raise
        what = "the serialized model (bytes)" if isinstance(path, bytes) else repr(os.fspath(path))
        raise LowbitFormatError(f"ONNX Runtime cannot load {what}: {e}") from None


def _has_2bit_weights(model: str | bytes) -> bool:
    """Whether the model holds int2 / uint2 initializers. ONNX Runtime 1.32 turns their
    ``DequantizeLinear`` → ``MatMul`` into a 2-bit ``MatMulNBits`` whose results are wrong and
    vary from run to run on some shapes (the demo VLM's 96 x 96 layers, blocks of 32: errors
    of 10 on outputs of 10), so an exact session keeps its QDQ fusions off for them."""
    import onnx

    try:
        proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model, load_external_data=False)
    except Exception:  # ORT itself reports a file it cannot read
        return False
    two = {onnx.TensorProto.INT2, onnx.TensorProto.UINT2} if hasattr(onnx.TensorProto, "INT2") else set()
    return any(t.data_type in two for t in proto.graph.initializer)


def _read(path: object, what: str) -> str:
    """``path`` as a string, after checking it names a readable file (``LowbitIOError``)."""
    p = path_arg(path, what)
    try:
        with open(p, "rb"):
            pass
    except OSError as e:
        raise LowbitIOError(f"{what}: cannot read {p!r}: {e.strerror or e}") from None
    return p


def _load(path: object, what: str) -> Any:
    """The ``onnx.ModelProto`` in the file at ``path``: ``LowbitIOError`` when it cannot be read,
    ``LowbitFormatError`` when it is not an ONNX model."""
    import onnx

    p = _read(path, what)
    try:
        return onnx.load(p)
    except Exception as e:  # protobuf's DecodeError, onnx's own errors for external data
        raise LowbitFormatError(f"{what}: {p!r} is not an ONNX model: {e}") from None


def _module_of(node_name: str) -> str:
    """The torch module a node of torch's exporter belongs to: ``/encoder/layer.0/output/Add``
    -> ``encoder.layer.0.output``. A scope inside a container repeats the container's name
    (``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1``)."""
    path: list[str] = []
    for part in node_name.rpartition("/")[0].strip("/").split("/"):
        if not part:
            continue
        if path and part.startswith(path[-1] + "."):
            path[-1] = part
        else:
            path.append(part)
    return ".".join(path)


class OrtModel:
    """An exported ONNX file (or a path to one) run by ONNX Runtime, with the interface
    :func:`lowbit.crossval.compare` expects of a runtime model: ``forward(**inputs,
    record=True)`` returns the first output and ``{module name: output}`` for every module
    whose output the graph holds as a float tensor (the last float tensor computed in the
    module's scope, which torch's exporter writes into every node's name).

    >>> import torch, tempfile, os, lowbit.crossval
    >>> from lowbit.export import OrtModel, onnx
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> path = os.path.join(tempfile.mkdtemp(), "net.onnx")
    >>> _ = onnx(net, torch.randn(3, 8), path)
    >>> report = lowbit.crossval.compare(net, OrtModel(path), {"input": torch.randn(4, 8)})
    >>> [layer.name for layer in report.layers], report.passed
    (['0', '1', '2', 'output'], True)
    """

    def __init__(self, model: Any, threads: int | None = None) -> None:
        import onnx

        if isinstance(model, (str, os.PathLike)):
            proto = _load(model, "model")
        elif hasattr(model, "graph"):
            proto = model
        else:
            raise LowbitTypeError(f"model must be a path to an .onnx file or an onnx.ModelProto, got {type(model).__name__}")
        if not proto.graph.output:
            raise LowbitFormatError("model: the ONNX graph has no outputs (an empty or truncated file?)")
        proto = onnx.shape_inference.infer_shapes(proto)
        floats = {v.name for v in list(proto.graph.value_info) + list(proto.graph.output)
                  if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
        outputs = {o.name for o in proto.graph.output}
        last: dict[str, str] = {}
        for node in proto.graph.node:
            module = _module_of(node.name)
            if node.op_type == "QuantizeLinear" and module and node.input[0] in floats:
                # What a quantized module's input quantizer reads ("<module>:input"): with it
                # crossval(isolate=True) feeds torch's quantizer ONNX Runtime's own float input.
                last.setdefault(f"{module}:input", node.input[0])
            for out in (o for o in node.output if o in floats):
                # The node's module and every module around it: a module's output is the last
                # float its subtree computes.
                parts = module.split(".") if module else []
                for k in range(1, len(parts) + 1):
                    last[".".join(parts[:k])] = out
        self.inputs = [i.name for i in proto.graph.input]
        self.recorded = dict(last)
        for tensor in set(last.values()) - outputs:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
        self._first = proto.graph.output[0].name
        self._session = session(proto.SerializeToString(), threads)

    def forward(self, record: bool = False, **inputs: Any) -> Any:  # noqa: ANN401
        """The graph's first output for ``inputs`` (torch tensors or arrays, by input name);
        with ``record=True`` also ``{module name: output}``."""
        missing = [n for n in self.inputs if n not in inputs]
        if missing:
            raise LowbitValueError(f"the ONNX graph needs the inputs {missing}, got {sorted(inputs)}")
        feeds = {n: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v) for n, v in inputs.items()
                 if n in self.inputs}
        names = [o.name for o in self._session.get_outputs()]
        values = dict(zip(names, self._session.run(names, feeds)))
        out = values[self._first]
        if not record:
            return out
        return out, {m: values[t] for m, t in self.recorded.items()}
