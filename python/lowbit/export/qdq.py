"""ONNX QDQ export: a torch model quantized by lowbit, as an ONNX file whose weights are stored as
integers behind ``DequantizeLinear`` and whose quantized activations are ``QuantizeLinear`` →
``DequantizeLinear`` pairs, the form ONNX Runtime (and its QNN execution provider) runs.

How it works. torch's exporter traces the model with every lowbit-quantized piece replaced by a
placeholder node of the ``lowbit`` domain (a weight, or an activation's fake-quant), then each
placeholder is rewritten into standard ONNX: the integer codes, scales and zero points become
initializers of the narrowest ONNX type that holds the codes (int8 / uint8, int4 / uint4,
int2 / uint2; 3-bit codes take 4-bit storage), feeding ``DequantizeLinear`` straight into the
``MatMul`` that uses them. What is quantized, and how:

* ``quantized=``: a :class:`lowbit.ptq.PTQResult` or ``{"<module>.weight": QuantizedTensor}``
  (any bits, per tensor, per channel or per group: groups become ``DequantizeLinear``'s
  blocked form, ``block_size`` along the input axis).

Linear layers and Conv1d / Conv2d / Conv3d layers (any stride, padding, dilation, groups)
carry quantized weights: a Linear's codes are stored ``(in, out)`` for the ``MatMul`` that
reads them, a convolution's in its own layout ``(out, in / groups, *kernel)`` with per-channel
scales along axis 0; group quantization is for Linear weights.
* ``calibration=``: a :func:`lowbit.torch.calibrate` result: each layer's weight as its weight
  fake-quant codes it, its input as a ``QuantizeLinear`` → ``DequantizeLinear`` pair with the
  calibrated scale and zero point.
* modules found in the model: :class:`lowbit.torch.FakeQuantize` (a Q/DQ pair),
  :class:`lowbit.torch.BitLinear` (ternary weights as int2 codes -1/0/1 with their absmean scale;
  its per-token int8 activation quantization in float operations, as the recipe computes it),
  :class:`lowbit.models.QATLinear` (its weights as it deploys them).

Where ONNX and torch differ: torch's per-channel fake-quant sends +inf to ``quant_min`` (its
float-to-integer conversion overflows; lowbit equals torch there), ONNX's ``QuantizeLinear``
saturates it to ``quant_max``. torch's fake-quant multiplies by the float32 reciprocal of the
scale where ``QuantizeLinear`` divides by the scale, so a value within an ulp of a rounding
boundary can get codes one step apart (in all-MiniLM-L6-v2 with int8 activations, one of the
393,216 inputs of a layer at 8 x 128 tokens: an output difference of one step times a weight). ONNX Runtime's default optimizations turn 4- and 8-bit
``DequantizeLinear`` → ``MatMul`` pairs into its ``MatMulNBits`` kernel with activations
quantized to int8 on the fly (accuracy level 4): fast, and about 1% off; and they round a
convolution's float bias to int32 codes at ``input_scale * weight_scale``, which at 4-bit
activations is about 1e-3 off. :func:`lowbit.export.session` opens the file without either,
which gives the file's numbers.

The opset is the smallest that holds the types used (13; 21 for 4-bit types and blocked
quantization; 25 for 2-bit types) unless ``opset`` asks for more.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lowbit._io import write_atomic
from lowbit._lowbit import LowbitTypeError, LowbitValueError, QuantizedTensor
from lowbit._validate import int_arg, path_arg

__all__ = ["ExportReport", "onnx"]

_DOMAIN = "lowbit"
# The TorchScript exporter's newest opset; the file's is raised to what its types need.
_TRACE_OPSET = 20


@dataclass
class _Weight:
    """A weight as integer codes ``(out, in)`` with scales and zero points: per tensor (0-d),
    per output channel ``(out,)`` or per group ``(out, ceil(in / group))``."""

    codes: np.ndarray
    scales: Any  # an array, or a NumPy scalar per tensor
    zero_points: Any
    group: int | None
    quant_min: int
    quant_max: int

    @property
    def onnx_type(self) -> str:
        """The narrowest ONNX integer type that holds the codes' range (``"uint4"``, ...)."""
        return _onnx_type(self.quant_min, self.quant_max)[0]


@dataclass
class _Activation:
    """A fake-quant of an activation: per tensor (0-d qparams) or along ``axis``."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    quant_min: int
    quant_max: int


@dataclass
class ExportReport:
    """What :func:`onnx` wrote: the path, the opset, ``weights`` (``{module name: ONNX type of
    its codes}``), ``activations`` (the number of Q/DQ pairs) and the file's size in bytes."""

    path: str
    opset: int
    weights: dict[str, str] = field(default_factory=dict)
    activations: int = 0
    nbytes: int = 0


def _onnx_type(qmin: int, qmax: int) -> tuple[str, int, int, int]:
    """The narrowest ONNX integer type that holds ``[qmin, qmax]``, unsigned for a range that
    starts at 0 or above: (name, lo, hi, opset)."""
    signed = (("int2", -2, 1, 25), ("int4", -8, 7, 21), ("int8", -128, 127, 13))
    unsigned = (("uint2", 0, 3, 25), ("uint4", 0, 15, 21), ("uint8", 0, 255, 13))
    for name, lo, hi, opset in unsigned + signed if qmin >= 0 else signed:
        if lo <= qmin and qmax <= hi:
            return name, lo, hi, opset
    raise LowbitValueError(f"codes in [{qmin}, {qmax}] fit no ONNX integer type (int2 .. uint8)")


def _tensor(name: str, values: Any, kind: str) -> Any:
    """An ONNX initializer of integer ``kind`` (packed for 2- and 4-bit types) or float32."""
    import ml_dtypes
    from onnx import numpy_helper

    dtypes = {"int2": ml_dtypes.int2, "uint2": ml_dtypes.uint2, "int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4,
              "int8": np.int8, "uint8": np.uint8, "float32": np.float32}
    return numpy_helper.from_array(np.ascontiguousarray(values).astype(dtypes[kind]), name)


# ---------------------------------------------------------------------------------------------
# What the model holds


def _from_quantized(qt: QuantizedTensor, name: str) -> _Weight:
    spec = qt.spec
    if len(qt.shape) < 2:
        raise LowbitValueError(f"{name}: a weight has at least 2 dimensions, got shape {qt.shape}")
    if spec.granularity == "group" and len(qt.shape) != 2:
        raise LowbitValueError(f"{name}: group-quantized weights are exported for Linear layers (2-D), got shape "
                               f"{qt.shape}")
    if spec.granularity == "channel" and spec.axis != 0:
        raise LowbitValueError(f"{name}: per-channel weights must be quantized along the output axis 0, got axis {spec.axis}")
    return _Weight(qt.int_repr(), qt.scales, qt.zero_points, spec.group_size if spec.granularity == "group" else None,
                   spec.quant_min, spec.quant_max)


def _from_fake_quant(w: torch.Tensor, fq: Any, name: str) -> _Weight:
    from lowbit._quant import quantize_per_channel, quantize_per_tensor

    x = w.detach().float().cpu().contiguous().numpy()
    if fq.axis is None:
        s, z = float(fq.scale), int(fq.zero_point)
        codes = quantize_per_tensor(x, s, z, fq.quant_min, fq.quant_max)
        return _Weight(codes, np.float32(s), np.int32(z), None, fq.quant_min, fq.quant_max)
    if fq.axis != 0:
        raise LowbitValueError(f"{name}: the weight fake-quant must be per output channel (axis 0), got axis {fq.axis}")
    s, z = fq.scale.detach().cpu().numpy(), fq.zero_point.detach().cpu().numpy()
    codes = quantize_per_channel(x, s, z, 0, fq.quant_min, fq.quant_max)
    return _Weight(codes, s.astype(np.float32), z.astype(np.int32), None, fq.quant_min, fq.quant_max)


def _activation(fq: Any) -> _Activation:
    return _Activation(fq.scale.detach().cpu().numpy().astype(np.float32),
                       fq.zero_point.detach().cpu().numpy().astype(np.int32), fq.axis, fq.quant_min, fq.quant_max)


def _bitnet_weight(w: torch.Tensor) -> _Weight:
    from lowbit.torch import _bitnet_weight_codes

    codes, s = _bitnet_weight_codes(w.detach())
    return _Weight(codes.to(torch.int8).cpu().numpy(), (1.0 / s).float().cpu().numpy(), np.int32(0), None, -1, 1)


# ---------------------------------------------------------------------------------------------
# Tracing with placeholders


class _PlaceWeight(torch.autograd.Function):
    """The transposed dequantized weight ``(in, out)``; exported as a ``lowbit::Weight`` node."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, key: str, value: torch.Tensor) -> torch.Tensor:  # noqa: ANN401
        return value

    @staticmethod
    def symbolic(g: Any, w: Any, key: str, value: Any) -> Any:  # noqa: ANN401
        out = g.op(f"{_DOMAIN}::Weight", w, key_s=key)
        out.setType(value.type())
        return out


class _PlaceActivation(torch.autograd.Function):
    """An activation's fake-quant; exported as a ``lowbit::QDQ`` node."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, key: str, a: _Activation) -> torch.Tensor:  # noqa: ANN401
        return _fake_quant_value(x, a)

    @staticmethod
    def symbolic(g: Any, x: Any, key: str, a: _Activation) -> Any:  # noqa: ANN401
        out = g.op(f"{_DOMAIN}::QDQ", x, key_s=key)
        out.setType(x.type())
        return out


def _dequantized(wq: _Weight, dtype: torch.dtype) -> torch.Tensor:
    c = wq.codes.astype(np.float32)
    s, z = wq.scales.astype(np.float32), wq.zero_points.astype(np.float32)
    if wq.group is not None:
        s, z = (np.repeat(a, wq.group, axis=1)[:, : c.shape[1]] for a in (s, z))
    elif s.ndim == 1:
        s, z = (a.reshape((-1,) + (1,) * (c.ndim - 1)) for a in (s, z))
    return torch.from_numpy(((c - z) * s).astype(np.float32)).to(dtype)


def _fake_quant_value(x: torch.Tensor, a: _Activation) -> torch.Tensor:
    xf = x.float()
    if a.axis is None:
        y = torch.fake_quantize_per_tensor_affine(xf, float(a.scale), int(a.zero_point), a.quant_min, a.quant_max)
    else:
        y = torch.fake_quantize_per_channel_affine(xf, torch.from_numpy(a.scale), torch.from_numpy(a.zero_point),
                                                   a.axis, a.quant_min, a.quant_max)
    return y.to(x.dtype)


def _bitnet_activation(x: torch.Tensor) -> torch.Tensor:
    """BitNet's per-token absmax int8 fake-quant in the float operations of the recipe."""
    xf = x.float()
    s = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return ((xf * s).round().clamp(-128, 127) / s).to(x.dtype)


class _Plan:
    """The placeholders of one export: weights and activations by key."""

    def __init__(self) -> None:
        self.weights: dict[str, tuple[str, _Weight, bool, torch.Tensor]] = {}
        self.activations: dict[str, _Activation] = {}

    def weight(self, module_name: str, wq: _Weight, like: torch.Tensor, matmul: bool) -> Any:
        """A placeholder for the weight: transposed to ``(in, out)`` for a ``MatMul`` (a Linear),
        in the module's own layout otherwise (a convolution's ``(out, in / groups, *kernel)``)."""
        key = f"w{len(self.weights)}"
        value = _dequantized(wq, like.dtype)
        value = value.t() if matmul else value
        self.weights[key] = (module_name, wq, matmul, value)

        def place(w: torch.Tensor) -> torch.Tensor:
            return _PlaceWeight.apply(w, key, value.to(w.device))

        return place

    def activation(self, a: _Activation) -> Any:
        key = f"a{len(self.activations)}"
        self.activations[key] = a

        def place(x: torch.Tensor) -> torch.Tensor:
            return _PlaceActivation.apply(x, key, a)

        return place


def _linear_forward(weight: Any, act: Any, gemm: bool) -> Any:
    def forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        x = act(x)
        if gemm and x.dim() == 2 and self.bias is not None:
            return torch.addmm(self.bias, x, weight(self.weight))  # one Gemm: its bias becomes int32 codes
        y = torch.matmul(x, weight(self.weight))
        return y if self.bias is None else y + self.bias

    return forward


def _conv_forward(weight: Any, act: Any) -> Any:
    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(act(x), weight(self.weight), self.bias)

    return forward


def _layer_kind(name: str, m: torch.nn.Module) -> str:
    """``"linear"`` or ``"conv"``: the layers whose weights a QDQ export can carry."""
    conv = torch.nn.modules.conv
    if isinstance(m, torch.nn.Linear):
        return "linear"
    if isinstance(m, (conv.Conv1d, conv.Conv2d, conv.Conv3d)):
        return "conv"
    raise LowbitTypeError(f"{name or 'the model'} ({type(m).__name__}): only Linear and Conv1d/2d/3d layers can carry "
                          "quantized weights in an ONNX QDQ export")


def _quantized_map(quantized: Any) -> dict[str, QuantizedTensor]:
    if quantized is None:
        return {}
    from lowbit.ptq import PTQResult

    if isinstance(quantized, PTQResult):
        moved = [n for n, r in quantized.layers.items() if r.transforms_input]
        if moved:
            raise LowbitValueError(f"layer {moved[0]!r} was quantized with rotate='hadamard' or AWQ's scales: its "
                                   "stored weight multiplies a rotated or scaled input, and the export does not "
                                   "insert that transform yet; quantize without them to export")
        quantized = quantized.tensors()
    if not isinstance(quantized, Mapping) or not all(isinstance(v, QuantizedTensor) for v in quantized.values()):
        raise LowbitTypeError("quantized must be a lowbit.ptq.PTQResult or a dict of '<module>.weight' -> QuantizedTensor")
    out = {}
    for k, v in quantized.items():
        if not str(k).endswith(".weight"):
            raise LowbitValueError(f"quantized keys name weights ('<module>.weight'), got {k!r}")
        out[str(k)[: -len(".weight")]] = v
    return out


def module_weight(name: str, m: torch.nn.Module, quantized: dict[str, QuantizedTensor], cal: dict) -> _Weight | None:
    """The integer weight lowbit deploys for module ``m`` (named ``name``), or None when its weight
    stays float: from ``quantized[name]``, the calibration's weight fake-quant ``cal["weight"]``, a
    BitLinear's ternary codes, or a QATLinear's spec (the way out of every exporter)."""
    from lowbit.models.qat import QATLinear
    from lowbit.torch import BitLinear

    weight = m.weight
    assert isinstance(weight, torch.Tensor)
    if name in quantized:
        wq = _from_quantized(quantized[name], name)
    elif "weight" in cal:
        wq = _from_fake_quant(weight, cal["weight"], name)
    elif isinstance(m, BitLinear):
        wq = _bitnet_weight(weight)
    elif isinstance(m, QATLinear):
        from lowbit._quant import quantize

        wq = _from_quantized(quantize(weight.detach().float().cpu().numpy(), m.spec), name)
    else:
        return None
    shape = tuple(weight.shape)
    if tuple(wq.codes.shape) != shape:
        raise LowbitValueError(f"{name}: quantized weight has shape {tuple(wq.codes.shape)}, the module's is {shape}")
    return wq


def dequantized(wq: _Weight) -> np.ndarray:
    """``(codes - zero_points) * scales`` of a deployed weight, float32, shaped like its codes."""
    return _dequantized(wq, torch.float32).numpy()


@contextlib.contextmanager
def _placeholders(model: torch.nn.Module, quantized: dict[str, QuantizedTensor], calibration: Any,
                  gemm: bool = False) -> Iterator[_Plan]:
    """Swaps the forward of every lowbit-quantized module for one with placeholders (restored
    on exit, whatever happens); ``gemm`` traces a Linear on 2-D inputs as one ``Gemm``."""
    from lowbit.models.qat import QATLinear
    from lowbit.torch import BitLinear, FakeQuantize

    plan = _Plan()
    modules = dict(model.named_modules())
    calibration = {} if calibration is None else calibration
    if not isinstance(calibration, Mapping) or not all(
            isinstance(v, Mapping) and all(isinstance(fq, FakeQuantize) for fq in v.values()) for v in calibration.values()):
        raise LowbitTypeError("calibration must be a lowbit.torch.calibrate result: {module name: {'input' / 'weight': "
                              "FakeQuantize}}")
    for name in list(quantized) + list(calibration):
        if name not in modules:
            raise LowbitValueError(f"the model has no module {name!r} (named by quantized= or calibration=)")
    swapped: list[torch.nn.Module] = []

    def identity(x: torch.Tensor) -> torch.Tensor:
        return x

    try:
        for name, m in modules.items():
            cal = calibration.get(name) or {}
            if name in quantized or cal or isinstance(m, (BitLinear, QATLinear)):
                matmul = _layer_kind(name, m) == "linear"
                wq = module_weight(name, m, quantized, cal)
                if wq is not None:
                    weight = plan.weight(name, wq, m.weight, matmul)
                else:
                    weight = (lambda w: w.t()) if matmul else (lambda w: w)
                if "input" in cal:
                    act = plan.activation(_activation(cal["input"]))
                elif isinstance(m, BitLinear):
                    act = _bitnet_activation
                else:
                    act = identity
                forward = _linear_forward(weight, act, gemm) if matmul else _conv_forward(weight, act)
                m.forward = types.MethodType(forward, m)  # type: ignore[method-assign]
                swapped.append(m)
            elif isinstance(m, FakeQuantize):
                place = plan.activation(_activation(m)) if m.enabled else identity
                m.forward = types.MethodType(lambda self, x, place=place: place(x), m)  # type: ignore[method-assign]
                swapped.append(m)
        yield plan
    finally:
        for m in swapped:
            del m.forward


# ---------------------------------------------------------------------------------------------
# Rewriting the placeholders


def _rewrite(model_proto: Any, plan: _Plan, opset: int | None) -> tuple[int, dict[str, str]]:
    """Replaces the placeholders by standard nodes and initializers; returns (opset, weights)."""
    from onnx import helper

    graph = model_proto.graph
    need = 13
    kinds: dict[str, str] = {}
    nodes = []
    for node in graph.node:
        if node.domain != _DOMAIN:
            nodes.append(node)
            continue
        key = next(a.s.decode() for a in node.attribute if a.name == "key")
        out = node.output[0]
        if node.op_type == "Weight":
            mod, w, matmul, _ = plan.weights[key]
            kind, _, _, op = _onnx_type(w.quant_min, w.quant_max)
            need = max(need, op)
            base = mod or "weight"
            codes = w.codes.T if matmul else w.codes  # (in, out), as MatMul reads it
            attrs: dict[str, Any] = {}
            if w.group is not None:
                need = max(need, 21)
                scales, zps = w.scales.T, w.zero_points.T
                attrs = {"axis": 0, "block_size": w.group}
            elif w.scales.ndim == 1:
                scales, zps = w.scales, w.zero_points
                attrs = {"axis": 1 if matmul else 0}
            else:
                scales, zps = w.scales.reshape(()), w.zero_points.reshape(())
            names = (f"{base}.weight_quantized", f"{base}.weight_scale", f"{base}.weight_zero_point")
            graph.initializer.extend([_tensor(names[0], codes, kind), _tensor(names[1], scales, "float32"),
                                      _tensor(names[2], zps, kind)])
            nodes.append(helper.make_node("DequantizeLinear", list(names), [out], name=f"{base}.weight_dequantize",
                                          **attrs))
            kinds[mod] = kind
        elif node.op_type == "QDQ":
            a = plan.activations[key]
            kind, lo, hi, op = _onnx_type(a.quant_min, a.quant_max)
            need = max(need, op)
            x = node.input[0]
            base = f"{out}.{key}"
            attrs = {} if a.axis is None else {"axis": a.axis}
            qnames = (f"{base}.scale", f"{base}.zero_point")
            graph.initializer.extend([_tensor(qnames[0], a.scale, "float32"), _tensor(qnames[1], a.zero_point, kind)])
            if (lo, hi) != (a.quant_min, a.quant_max):
                # A range narrower than the type's: clamp before quantizing (QuantizeLinear
                # saturates to the type), exact since rounding is monotonic.
                if a.axis is not None:
                    raise LowbitValueError(f"per-channel activation fake-quant with the range [{a.quant_min}, "
                                           f"{a.quant_max}] has no QDQ form (use a full {kind} range)")
                bounds = ((np.float32(a.quant_min) - np.float32(a.zero_point)) * a.scale,
                          (np.float32(a.quant_max) - np.float32(a.zero_point)) * a.scale)
                graph.initializer.extend([_tensor(f"{base}.min", np.float32(bounds[0]), "float32"),
                                          _tensor(f"{base}.max", np.float32(bounds[1]), "float32")])
                nodes.append(helper.make_node("Clip", [x, f"{base}.min", f"{base}.max"], [f"{base}.clipped"]))
                x = f"{base}.clipped"
            # Named in the placeholder's scope (/encoder/.../dense/QDQ...): the module it quantizes the input of.
            nodes.append(helper.make_node("QuantizeLinear", [x, *qnames], [f"{base}.quantized"],
                                          name=f"{node.name}_quantize", **attrs))
            nodes.append(helper.make_node("DequantizeLinear", [f"{base}.quantized", *qnames], [out],
                                          name=f"{node.name}_dequantize", **attrs))
        else:
            raise LowbitValueError(f"unknown placeholder {node.op_type}")
    del graph.node[:]
    graph.node.extend(nodes)
    # The float weights the placeholders read are no longer used: drop every unused initializer.
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    final = max(need, int_arg(opset, "opset", 13, 28) if opset is not None else need)
    for imp in list(model_proto.opset_import):
        if imp.domain == _DOMAIN:
            model_proto.opset_import.remove(imp)
        elif imp.domain in ("", "ai.onnx"):
            imp.version = max(imp.version, final)
    return final, kinds


def _strip_prefix(graph: Any, prefix: str) -> None:
    """Renames the initializers ``prefix<name>`` (a wrapper's parameters) to ``<name>``, and the
    nodes of its scope (``/m/encoder/...``) after the wrapped model's modules."""
    renames = {t.name: t.name[len(prefix):] for t in graph.initializer if t.name.startswith(prefix)}
    for t in graph.initializer:
        t.name = renames.get(t.name, t.name)
    scope = "/" + prefix.rstrip(".") + "/"
    for n in graph.node:
        for i, v in enumerate(n.input):
            if v in renames:
                n.input[i] = renames[v]
        if n.name.startswith(scope):
            n.name = n.name[len(scope) - 1:]


class _Bound(torch.nn.Module):
    """``model`` called with the tensors as the named parameters and the rest fixed, so that
    torch traces only tensors (a keyword input, a ``task="ocr"`` string)."""

    def __init__(self, model: torch.nn.Module, names: list[str], fixed: dict[str, Any]) -> None:
        super().__init__()
        self.m = model
        self.names, self.fixed = names, fixed

    def forward(self, *tensors: torch.Tensor) -> Any:  # noqa: ANN401
        return self.m(**dict(zip(self.names, tensors)), **self.fixed)


def _bind(model: torch.nn.Module, example_inputs: Any) -> tuple[torch.nn.Module, tuple, list[str] | None]:
    """What torch traces: the module, its tensor inputs and their names (the forward's
    parameters). Non-tensor inputs and keyword inputs go through a :class:`_Bound` wrapper."""
    import inspect

    args: tuple = ()
    kwargs: dict[str, Any] = {}
    if isinstance(example_inputs, torch.Tensor):
        args = (example_inputs,)
    elif isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
    elif isinstance(example_inputs, Mapping):
        kwargs = {str(k): v for k, v in example_inputs.items()}
    else:
        raise LowbitTypeError(f"example_inputs must be a tensor, a tuple of inputs or a dict of keyword inputs, "
                              f"got {type(example_inputs).__name__}")
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return model, args, None
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise LowbitValueError(f"example_inputs do not fit {type(model).__name__}.forward: {e}") from e
    named = dict(bound.arguments)
    if any(sig.parameters[k].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for k in named):
        return model, args, None
    tensors = [k for k, v in named.items() if isinstance(v, torch.Tensor)]
    if not kwargs and len(tensors) == len(args):
        return model, args, tensors
    fixed = {k: v for k, v in named.items() if k not in tensors}
    return _Bound(model, tensors, fixed), tuple(named[k] for k in tensors), tensors


def onnx(
    model: torch.nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    quantized: Any = None,
    calibration: Any = None,
    opset: int | None = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    external_data: bool | None = None,
    target: str = "cpu",
    calibration_data: Any = None,
) -> ExportReport:
    """Write ``model`` as an ONNX QDQ file at ``path`` (atomically) and return an
    :class:`ExportReport`. ``example_inputs`` is a tensor, a tuple of positional inputs or a
    dict of keyword inputs; ``quantized`` and ``calibration`` say what lowbit quantized (see
    the module docs). Inputs are named after the forward's parameters unless ``input_names``
    says otherwise, and their first axis is dynamic (``"batch"``) unless ``dynamic_axes``
    (torch's form) says otherwise. ``onnx.checker`` passes on the file before it is written.

    ``target="qnn"`` writes the form ONNX Runtime's QNN execution provider runs on Qualcomm's
    HTP (Hexagon) backend (see :mod:`lowbit.export.qnn`): every activation quantized, the ones
    lowbit quantized with lowbit's scales and zero points, the rest calibrated on
    ``calibration_data`` (example inputs like ``example_inputs``).

    A model whose file would pass 2 GB (protobuf's limit), or any model with
    ``external_data=True``, keeps its initializers in one data file beside it,
    ``<path>.<digest>.data`` (named by its content), written completely before the ``.onnx``
    file that names it; an earlier export's data file is removed once the new ``.onnx`` is in
    place, so a reader never sees a model without its data.

    >>> import torch, tempfile, os, lowbit, lowbit.ptq
    >>> from lowbit.export import onnx, session
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    >>> data = [torch.randn(16, 64) for _ in range(4)]
    >>> spec = lowbit.QuantSpec(4, symmetric=False, granularity="group", group_size=32)
    >>> result = lowbit.ptq.quantize_model(net, data, spec, method="rtn")
    >>> path = os.path.join(tempfile.mkdtemp(), "net.onnx")
    >>> report = onnx(net, data[0], path, quantized=result)
    >>> report.opset, report.weights
    (21, {'0': 'uint4', '2': 'uint4'})
    >>> ort = session(path)   # an ONNX Runtime session that keeps the file's numbers
    >>> y = ort.run(None, {ort.get_inputs()[0].name: data[0].numpy()})[0]
    >>> bool(abs(y - net(data[0]).detach().numpy()).max() < 1e-5)
    True
    """
    import onnx as onnx_pkg

    if not isinstance(model, torch.nn.Module):
        raise LowbitTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    dest = path_arg(path, "path")
    traced, args, names = _bind(model, example_inputs)
    if input_names is None:
        input_names = names
    if dynamic_axes is None and input_names and target != "qnn":  # QNN's HTP compiles for fixed shapes
        dynamic_axes = {n: {0: "batch"} for n in input_names}
    qmap = _quantized_map(quantized)
    if external_data is not None:
        if not isinstance(external_data, (bool, np.bool_)):
            raise LowbitTypeError(f"external_data must be True, False or None, got {external_data!r}")
        external_data = bool(external_data)
    if target not in ("cpu", "qnn"):
        raise LowbitValueError(f"target must be 'cpu' or 'qnn', got {target!r}")
    if target == "qnn" and calibration_data is None:
        raise LowbitValueError("target='qnn' quantizes every activation (QNN's HTP backend runs integer graphs): "
                               "pass calibration_data=, a few example inputs like example_inputs")
    was_training = model.training
    model.eval()
    try:
        with _placeholders(model, qmap, calibration, gemm=target == "qnn") as plan, torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
            import warnings

            # Traced into a file: torch keeps a model over 2 GB in external data files there.
            traced_path = os.path.join(tmp, "traced.onnx")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(traced, args, traced_path,
                                  dynamo=False, opset_version=_TRACE_OPSET,
                                  custom_opsets={_DOMAIN: 1} if plan.weights or plan.activations else None,
                                  input_names=input_names, output_names=output_names,
                                  dynamic_axes=dynamic_axes, do_constant_folding=True)
            proto = onnx_pkg.load(traced_path)
    except (LowbitTypeError, LowbitValueError):
        raise
    except Exception as e:  # torch's exporter: an op with no ONNX form, an untraceable forward
        raise LowbitValueError(f"torch.onnx.export could not trace the model: {e}") from e
    finally:
        model.train(was_training)
    if traced is not model:
        _strip_prefix(proto.graph, "m.")
    placed = sum(n.domain == _DOMAIN and n.op_type == "QDQ" for n in proto.graph.node)
    if target == "qnn":
        from lowbit.export.qnn import complete

        proto, final, kinds = complete(proto, plan, [_bind(model, b)[1] for b in calibration_data], opset)
    else:
        final, kinds = _rewrite(proto, plan, opset)
    proto.producer_name = "lowbit"
    big = proto.ByteSize() > _PROTOBUF_LIMIT
    if big and external_data is False:
        raise LowbitValueError(f"the model takes {proto.ByteSize() / 2**30:.1f} GiB, more than one ONNX file holds "
                               "(2 GiB): export it with external_data=True or None")
    if not big:
        _check(proto)
    data = _External(proto, dest) if big or external_data else None
    old = _data_files(dest)
    graph = proto.SerializeToString()
    if data is not None:
        data.write()
    try:
        if big:  # the checker reads a model this size from its file, beside its data
            with tempfile.NamedTemporaryFile(dir=os.path.dirname(dest) or ".", suffix=".onnx") as f:
                f.write(graph)
                f.flush()
                _check(f.name)
        write_atomic(dest, graph)
    except BaseException:
        if data is not None and data.path not in old:
            with contextlib.suppress(OSError):
                os.unlink(data.path)
        raise
    for stale in old - ({data.path} if data is not None else set()):  # what the new file names
        with contextlib.suppress(OSError):
            os.unlink(stale)
    return ExportReport(dest, final, kinds, placed, len(graph) + (data.size if data else 0))


def _check(model: Any) -> None:
    import onnx as onnx_pkg

    try:
        onnx_pkg.checker.check_model(model, full_check=True)
    except Exception as e:
        raise LowbitValueError(f"the exported graph fails onnx.checker: {e}") from e


# protobuf refuses to serialize a message over 2 GiB; below it with room for the graph itself.
_PROTOBUF_LIMIT = 2**31 - 2**26
_DATA_SUFFIX = ".data"


def _data_files(dest: str) -> set[str]:
    """The external data files that the ONNX file at ``dest`` names (none when it does not exist
    or is not one of ours)."""
    import onnx as onnx_pkg
    from onnx.external_data_helper import uses_external_data

    try:
        model = onnx_pkg.load(dest, load_external_data=False)
    except Exception:  # no file yet, or not a model: nothing of ours to clean up
        return set()
    folder = os.path.dirname(dest) or "."
    prefix = os.path.basename(dest) + "."
    names = {e.value for t in model.graph.initializer if uses_external_data(t) for e in t.external_data
             if e.key == "location"}
    return {os.path.join(folder, n) for n in names if n.startswith(prefix) and n.endswith(_DATA_SUFFIX) and "/" not in n}


class _External:
    """Every initializer's bytes (1 KiB and more) moved out of ``proto`` into one data file
    beside ``dest``, named by a digest of its content: the proto names it at once, and
    :meth:`write` writes it (atomically)."""

    def __init__(self, proto: Any, dest: str) -> None:
        import hashlib

        from onnx.external_data_helper import set_external_data

        tensors = [t for t in proto.graph.initializer if t.HasField("raw_data") and len(t.raw_data) >= 1024]
        digest = hashlib.sha256()
        self.chunks: list[tuple[int, bytes]] = []
        offset = 0
        for t in tensors:
            offset += -offset % 64  # aligned for a memory map
            raw = t.raw_data
            self.chunks.append((offset, raw))
            digest.update(t.name.encode() + b"\0" + len(raw).to_bytes(8, "little"))
            digest.update(raw)
            offset += len(raw)
        self.size = offset
        location = f"{os.path.basename(dest)}.{digest.hexdigest()[:16]}{_DATA_SUFFIX}"
        self.path = os.path.join(os.path.dirname(dest) or ".", location)
        for t, (at, raw) in zip(tensors, self.chunks):
            set_external_data(t, location, offset=at, length=len(raw))
            t.ClearField("raw_data")

    def write(self) -> None:
        def write(f: Any) -> None:
            pos = 0
            for at, raw in self.chunks:
                f.write(b"\0" * (at - pos))
                f.write(raw)
                pos = at + len(raw)

        write_atomic(self.path, write)
