"""Hardware cost models for neural architecture search.

Exact FLOP and parameter counts of real PyTorch models (equal to
``torch.utils.flop_counter.FlopCounterMode`` and ``sum(p.numel())``), a roofline latency,
energy and peak-memory estimate on phone CPU / GPU / NPU profiles at any bit width, a cost
model fitted to latencies measured on this machine, and search spaces that score millions of
candidates per second, with gradients for differentiable NAS.

>>> import lowbit.nas as nas
>>> g = nas.Graph.sequential((1, 3, 32, 32), [
...     {"op": "conv2d", "out_channels": 16, "kernel": 3, "stride": 2},
...     {"op": "relu"},
...     {"op": "global_avgpool"},
...     {"op": "linear", "out_features": 10},
... ])
>>> g.flops, g.params
(221504, 618)
>>> cost = nas.estimate(g, "cortex-a76", weight_bits=4, act_bits=8)
>>> cost.weight_bytes < 618 * 4
True
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from lowbit import _lowbit
from lowbit._lowbit import DeviceProfile, Graph, LowbitTypeError, LowbitValueError
from lowbit._validate import float_arg, int_arg

__all__ = [
    "Cost",
    "CostModel",
    "DeviceProfile",
    "Graph",
    "Measurement",
    "METRICS",
    "ParetoFront",
    "SearchSpace",
    "devices",
    "estimate",
    "evolve",
    "from_torch",
    "measure",
]

METRICS = ("latency_ms", "energy_mj", "flops", "params", "weight_bytes", "peak_activation_bytes")

# ------------------------------------------------------------------------------------------
# Devices

_HOST: DeviceProfile | None = None


def _best_of(n: int, fn: Callable[[], Any], budget_s: float = 0.0) -> float:
    """Shortest wall time of ``n`` calls, or of as many as fit in ``budget_s`` seconds when that
    is more, seconds."""
    best, calls, start = math.inf, 0, time.perf_counter()
    while calls < n or time.perf_counter() - start < budget_s:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        calls += 1
    return best


def _measure_host() -> DeviceProfile:
    """This machine: float32 GEMM rate (PyTorch's when it is installed, since that is what
    ``measure`` times, else NumPy's BLAS) and copy bandwidth, best of 10, measured once."""
    n = 1024
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    matmul: Callable[[], Any] = lambda: a @ a  # noqa: E731
    engine = "NumPy"
    try:
        import torch

        at = torch.from_numpy(a)
        matmul, engine = (lambda: at @ at), f"PyTorch ({torch.get_num_threads()} threads)"
    except ImportError:
        pass
    gemm = 2 * n**3 / _best_of(10, matmul) / 1e9
    src = np.ones(64 * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    bw = 2 * src.nbytes / _best_of(10, lambda: np.copyto(dst, src)) / 1e9
    return DeviceProfile(
        "host",
        {"f32": round(gemm, 1)},
        round(bw, 1),
        description="this machine, measured at first use (float32 only: int8/int4 fall back to it)",
        sources={
            "peak_gops": f"{engine} float32 matmul {n}x{n}, best of 10",
            "bandwidth_gbs": "np.copyto of 64 MiB, bytes read + written, best of 10",
            "efficiency": "1 until fitted: use CostModel.fit with lowbit.nas.measure",
        },
    )


def devices() -> dict[str, DeviceProfile]:
    """The built-in device profiles by name, plus ``"host"`` (this machine, measured once).

    Every figure carries its source in ``profile.sources``.

    >>> sorted(devices())
    ['adreno-640', 'cortex-a76', 'hexagon-npu', 'host']
    >>> devices()["cortex-a76"].peak(8, 8)  # int8 G ops/s (SDOT)
    646.7
    """
    global _HOST
    if _HOST is None:
        _HOST = _measure_host()
    out = {d.name: d for d in _lowbit.builtin_devices()}
    out["host"] = _HOST
    return out


def _device(device: str | DeviceProfile) -> DeviceProfile:
    if isinstance(device, DeviceProfile):
        return device
    if not isinstance(device, str):
        raise LowbitValueError(f"device must be a name or a DeviceProfile, got {type(device).__name__}")
    table = {d.name: d for d in _lowbit.builtin_devices()}
    if device == "host":
        return devices()["host"]
    if device not in table:
        raise LowbitValueError(f"unknown device {device!r}; known: {sorted(table) + ['host']}")
    return table[device]


# ------------------------------------------------------------------------------------------
# Cost


@dataclass(frozen=True)
class Cost:
    """What :func:`estimate` returns: totals and one row per op in ``layers``."""

    device: str
    weight_bits: int
    act_bits: int
    flops: int
    macs: int
    params: int
    weight_bytes: int
    peak_activation_bytes: int
    latency_ms: float
    energy_mj: float
    layers: list[dict[str, Any]] = field(repr=False)

    def to_pandas(self) -> Any:
        """The per-op table as a ``pandas.DataFrame`` (pandas must be installed)."""
        import pandas as pd

        return pd.DataFrame(self.layers)

    def metric(self, name: str) -> float:
        return float(getattr(self, _metric(name, "name")))


def estimate(
    graph: Graph, device: str | DeviceProfile = "cortex-a76", weight_bits: int = 32, act_bits: int = 32
) -> Cost:
    """Roofline latency, energy and memory of ``graph`` on ``device``.

    Per op: ``latency = max(flops / peak[precision], bytes / bandwidth) / efficiency[kind] +
    overhead``, where the precision follows the bits (float activations compute in float, int
    activations in int8, both <= 4 bits in int4; INT2 / ternary as packed int4) and bytes count
    weights at ``weight_bits`` (biases and norm scales stay float32) and activations at
    ``act_bits``. Energy is MACs x pJ/MAC + elementwise ops x pJ/op + bytes x DRAM pJ/byte
    (Horowitz, ISSCC 2014, scaled by the profile's ``energy_scale``). ``peak_activation_bytes``
    is the largest total of activations alive at once over the op order.

    >>> g = Graph.sequential((1, 256), [{"op": "linear", "out_features": 256}])
    >>> c32, c4 = estimate(g, "cortex-a76"), estimate(g, "cortex-a76", weight_bits=4, act_bits=8)
    >>> c32.flops == 2 * 256 * 256, c32.weight_bytes, c4.weight_bytes
    (True, 263168, 33792)
    """
    if not isinstance(graph, Graph):
        raise LowbitValueError(f"graph must be a lowbit.nas.Graph, got {type(graph).__name__}")
    d = json.loads(_lowbit.estimate_json(graph, _device(device), _bits(weight_bits, "weight_bits"), _bits(act_bits, "act_bits")))
    return Cost(**d)


def _bits(b: Any, name: str) -> int:
    try:
        return int_arg(b, name, 1, 32)
    except LowbitTypeError as e:  # lowbit.nas has always raised ValueError for any bad bit width
        raise LowbitValueError(str(e)) from None


# ------------------------------------------------------------------------------------------
# Capture of PyTorch models

# aten op name (overload packet) -> kind, for everything that is not a conv / matmul / attention.
_KINDS: dict[str, tuple[str, ...]] = {
    "norm": ("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
             "native_layer_norm", "native_group_norm", "_fused_rms_norm", "batch_norm", "layer_norm"),
    "activation": ("relu", "relu_", "gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_",
                   "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "hardtanh", "hardtanh_",
                   "leaky_relu", "leaky_relu_", "elu", "elu_", "mish", "mish_", "softplus", "clamp", "clamp_",
                   "clamp_min", "clamp_min_", "clamp_max", "threshold", "erf", "exp", "log", "sqrt", "rsqrt"),
    "pool": ("max_pool2d_with_indices", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d",
             "adaptive_max_pool2d", "max_pool1d", "avg_pool1d", "max_pool3d_with_indices", "avg_pool3d",
             "_adaptive_avg_pool3d"),
    "softmax": ("_softmax", "softmax", "_log_softmax", "log_softmax"),
    "elementwise": ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "pow", "where",
                    "masked_fill", "masked_fill_", "rsub", "addcmul", "lerp", "maximum", "minimum",
                    "bitwise_not", "bitwise_and", "eq", "ne", "lt", "gt", "le", "ge", "logical_not"),
    "reduce": ("mean", "sum", "amax", "amin", "max", "min", "argmax", "argmin", "var", "var_mean", "std", "norm",
               "linalg_vector_norm", "prod", "cumsum", "logsumexp"),
    "embedding": ("embedding", "index_select", "gather"),
    "copy": ("cat", "stack", "clone", "_to_copy", "copy_", "contiguous", "repeat", "constant_pad_nd",
             "index", "slice_scatter", "select_scatter", "fill_", "zero_", "zeros", "ones", "full",
             "arange", "zeros_like", "ones_like", "full_like", "new_zeros", "new_ones",
             "scalar_tensor", "native_dropout", "dropout", "bernoulli_", "roll", "flip", "tril", "triu",
             "upsample_nearest2d", "upsample_bilinear2d", "lift_fresh", "_unsafe_view", "pixel_shuffle"),
    "view": ("view", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze",
             "select", "slice", "split", "split_with_sizes", "chunk", "unbind", "flatten", "alias", "as_strided",
             "detach", "unflatten", "narrow", "diagonal", "view_as", "expand_as", "movedim", "_unsafe_view_",
             "unfold", "numpy_T", "mT", "lift_fresh_copy",
             # Allocations without writes move no data either.
             "empty", "empty_like", "new_empty", "empty_strided", "resize_"),
}
_KIND_OF = {name: kind for kind, names in _KINDS.items() for name in names}
_CONV = ("convolution", "_convolution", "convolution_overrideable", "cudnn_convolution", "mkldnn_convolution")
_MM = ("mm", "addmm", "bmm", "baddbmm", "mv", "addmv", "dot", "_int_mm")
_SDPA = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
         "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
         "_efficient_attention_forward", "_flash_attention_forward", "_scaled_dot_product_fused_attention_overrideable")


class _Recorder:
    """Buffers keyed by storage (views share their base's buffer) and the ops in call order."""

    def __init__(self, model: Any, inputs: Sequence[Any]) -> None:
        import torch

        self.torch = torch
        self.buffers: list[dict[str, Any]] = []
        self.key_to_buffer: dict[int, int] = {}
        self.ops: list[dict[str, Any]] = []
        self.keep: list[Any] = []  # holds every tensor seen, so no storage address is reused
        self.params: dict[int, tuple[str, Any]] = {}
        for name, p in model.named_parameters():
            self.params.setdefault(self._key(p), (name, p))
        self.consts: dict[int, str] = {}
        for name, b in model.named_buffers():
            self.consts.setdefault(self._key(b), name)
        self.stack: list[str] = [""]
        for i, t in enumerate(_tensors(inputs)):
            self._buffer(t, f"input{i}", "input")
        self.synthetic = 0

    @staticmethod
    def _key(t: Any) -> int:
        return t.untyped_storage()._cdata

    def _buffer(self, t: Any, name: str, role: str) -> int:
        key = self._key(t)
        if key in self.key_to_buffer:
            return self.key_to_buffer[key]
        storage_numel = t.untyped_storage().nbytes() // max(t.element_size(), 1)
        shape = list(t.shape) if t.numel() == storage_numel else [storage_numel]
        self.buffers.append({"name": name, "shape": shape, "role": role})
        self.key_to_buffer[key] = len(self.buffers) - 1
        self.keep.append(t)
        return len(self.buffers) - 1

    def ref(self, t: Any, producing: bool = False) -> dict[str, Any]:
        key = self._key(t)
        if key not in self.key_to_buffer:
            if key in self.params:
                name, p = self.params[key]
                self._buffer(p, name, "weight")
            elif producing:
                self._buffer(t, f"{self.stack[-1] or 'model'}.out{len(self.ops)}", "activation")
            else:
                self._buffer(t, self.consts.get(key, f"constant{len(self.buffers)}"), "constant")
        self.keep.append(t)
        return {"buffer": self.key_to_buffer[key], "shape": list(t.shape)}

    def synth(self, shape: Sequence[int], what: str) -> dict[str, Any]:
        """A buffer for an intermediate that a fused kernel never materialises as a tensor."""
        self.synthetic += 1
        self.buffers.append({"name": f"{self.stack[-1]}.{what}{self.synthetic}", "shape": list(shape), "role": "activation"})
        return {"buffer": len(self.buffers) - 1, "shape": list(shape)}

    def op(self, kind: str, target: str, inputs: list, outputs: list, **attrs: Any) -> None:
        self.ops.append({"name": self.stack[-1], "kind": kind, "target": target, "inputs": inputs,
                         "outputs": outputs, **attrs})

    def record(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        name = func.overloadpacket.__name__
        target = f"aten.{name}"
        T = self.torch.Tensor
        ins = [t for t in _tensors((args, kwargs)) if isinstance(t, T)]
        outs = [t for t in _tensors(out) if isinstance(t, T)]
        # Inputs first, so an in-place op's buffer is known before its output refers to it.
        if name in _CONV:
            x, w, b = args[0], args[1], args[2]
            refs = [self.ref(x), self.ref(w)] + ([self.ref(b)] if isinstance(b, T) else [])
            self.op("conv", target, refs, [self.ref(o, True) for o in outs], transposed=bool(args[6]),
                    groups=int(args[8]))
        elif name in _MM:
            if name in ("mm", "bmm", "_int_mm"):
                refs = [self.ref(args[0]), self.ref(args[1])]
            elif name in ("addmm", "baddbmm"):
                refs = [self.ref(args[1]), self.ref(args[2]), self.ref(args[0])]
            elif name == "mv":
                refs = [self.ref(args[0]), _col(self.ref(args[1]))]
            elif name == "addmv":
                refs = [self.ref(args[1]), _col(self.ref(args[2])), self.ref(args[0])]
            else:  # dot
                refs = [_row(self.ref(args[0])), _col(self.ref(args[1]))]
            self.op("matmul", target, refs, [self.ref(o, True) for o in outs])
        elif name in _SDPA:
            refs = [self.ref(t) for t in args[:3]] + [self.ref(t) for t in ins[3:]]
            self.op("attention", target, refs, [self.ref(o, True) for o in outs])
        elif name == "_native_multi_head_attention":
            self._mha(args, kwargs, outs, target)
        elif name == "_transformer_encoder_layer_fwd":
            self._encoder_layer(args, kwargs, outs, target)
        else:
            refs = [self.ref(t) for t in ins]
            self.op(_KIND_OF.get(name, "other"), target, refs, [self.ref(o, True) for o in outs])

    def _linear(self, x: dict, w: Any, b: Any, target: str, out: dict | None = None) -> dict:
        n, k = w.shape
        wref = self.ref(w)
        wref = {"buffer": wref["buffer"], "shape": [k, n]}
        refs = [x, wref] + ([self.ref(b)] if b is not None else [])
        out = out or self.synth(x["shape"][:-1] + [n], "linear")
        self.op("matmul", target, refs, [out])
        return out

    def _attention(self, q: dict, k: dict, v: dict, heads: int, target: str) -> dict:
        def split(t: dict) -> dict:
            b, s, e = t["shape"]
            return {"buffer": t["buffer"], "shape": [b, heads, s, e // heads]}

        qh, kh, vh = split(q), split(k), split(v)
        out = self.synth(q["shape"], "attention")
        self.op("attention", target, [qh, kh, vh], [{"buffer": out["buffer"], "shape": qh["shape"][:3] + [vh["shape"][3]]}])
        return out

    def _mha(self, args: tuple, kwargs: dict, outs: list, target: str) -> None:
        q, k, v, embed, heads, qkv_w, qkv_b, proj_w, proj_b = args[:9]
        e = int(embed)
        qr, kr, vr = self.ref(q), self.ref(k), self.ref(v)
        parts = []
        for i, x in enumerate((qr, kr, vr)):
            wi = qkv_w[i * e:(i + 1) * e]
            bi = qkv_b[i * e:(i + 1) * e] if qkv_b is not None else None
            parts.append(self._linear(x, wi, bi, target))
        a = self._attention(parts[0], parts[1], parts[2], int(heads), target)
        self._linear(a, proj_w, proj_b, target, self.ref(outs[0], True))
        for o in outs[1:]:
            self.ref(o, True)

    def _encoder_layer(self, args: tuple, kwargs: dict, outs: list, target: str) -> None:
        (src, embed, heads, qkv_w, qkv_b, proj_w, proj_b, use_gelu, norm_first, _eps, n1w, n1b, n2w, n2b,
         f1w, f1b, f2w, f2b) = args[:18]
        e = int(embed)
        x = self.ref(src)

        def norm(t: dict, w: Any, b: Any) -> dict:
            o = self.synth(t["shape"], "norm")
            self.op("norm", target, [t, self.ref(w), self.ref(b)], [o])
            return o

        def add(a: dict, b: dict) -> dict:
            o = self.synth(a["shape"], "add")
            self.op("elementwise", target, [a, b], [o])
            return o

        h = norm(x, n1w, n1b) if norm_first else x
        parts = [self._linear(h, qkv_w[i * e:(i + 1) * e], qkv_b[i * e:(i + 1) * e], target) for i in range(3)]
        a = self._linear(self._attention(parts[0], parts[1], parts[2], int(heads), target), proj_w, proj_b, target)
        x = add(x, a)
        if not norm_first:
            x = norm(x, n1w, n1b)
        h = norm(x, n2w, n2b) if norm_first else x
        f = self._linear(h, f1w, f1b, target)
        act = self.synth(f["shape"], "act")
        self.op("activation", target, [f], [act])
        f = self._linear(act, f2w, f2b, target)
        last = self.ref(outs[0], True)
        if norm_first:
            self.op("elementwise", target, [x, f], [last])
        else:
            y = add(x, f)
            self.op("norm", target, [y, self.ref(n2w), self.ref(n2b)], [last])

    def graph(self) -> Graph:
        seen = {b for op in self.ops for r in op["inputs"] for b in [r["buffer"]]}
        extra = sum(p.numel() for key, (_, p) in self.params.items()
                    if key not in self.key_to_buffer or self.key_to_buffer[key] not in seen)
        # Parameters no op read are counted in extra_params, not as buffers.
        used = [i for i, b in enumerate(self.buffers) if b["role"] != "weight" or i in seen]
        remap = {old: new for new, old in enumerate(used)}
        buffers = [self.buffers[i] for i in used]
        ops = []
        for op in self.ops:
            op = dict(op)
            op["inputs"] = [dict(r, buffer=remap[r["buffer"]]) for r in op["inputs"]]
            op["outputs"] = [dict(r, buffer=remap[r["buffer"]]) for r in op["outputs"] if r["buffer"] in remap]
            ops.append(op)
        return Graph.from_json(json.dumps({"buffers": buffers, "ops": ops, "extra_params": int(extra)}))


def _col(r: dict) -> dict:
    return {"buffer": r["buffer"], "shape": list(r["shape"]) + [1]}


def _row(r: dict) -> dict:
    return {"buffer": r["buffer"], "shape": [1] + list(r["shape"])}


def _tensors(x: Any) -> list[Any]:
    import torch
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(x) if isinstance(t, torch.Tensor)]


class _Hooks:
    """Tracks the module whose forward is running, by its name in the model."""

    def __init__(self, model: Any, stack: list[str]) -> None:
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack = stack

    def __enter__(self) -> _Hooks:
        from torch.nn.modules import module as M

        def pre(mod: Any, _inp: Any) -> None:
            self.stack.append(self.names.get(id(mod), type(mod).__name__))

        def post(mod: Any, _inp: Any, _out: Any) -> None:
            if len(self.stack) > 1:
                self.stack.pop()

        self.handles = [M.register_module_forward_pre_hook(pre), M.register_module_forward_hook(post)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()


def _as_args(example_inputs: Any) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def from_torch(model: Any, example_inputs: Any) -> Graph:
    """Capture the ops ``model(*example_inputs)`` runs, with their shapes, as a :class:`Graph`.

    The capture sees every ATen op (a ``TorchDispatchMode``) under ``torch.no_grad()``, names
    each op by the module that ran it, and keys buffers by storage so views and in-place ops
    share memory as they do in PyTorch. ``graph.flops`` equals the total of
    ``torch.utils.flop_counter.FlopCounterMode`` (run with autograd enabled): the same formulas
    for convolutions, matmuls and attention. PyTorch's fused inference kernels
    (``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` in eval under ``no_grad``)
    hide their work from that counter; lowbit expands them into their projections and attention
    and counts them anyway. Matrix-vector products (``mv``, ``addmv``, ``dot``), which the
    counter leaves out, are counted too. ``graph.params`` equals
    ``sum(p.numel() for p in model.parameters())``.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                         torch.nn.Linear(8 * 6 * 6, 10))
    >>> g = from_torch(m, torch.randn(1, 3, 8, 8))
    >>> g.flops == 2 * (8 * 3 * 9 * 36 + 288 * 10), g.params == sum(p.numel() for p in m.parameters())
    (True, True)
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    if not isinstance(model, torch.nn.Module):
        raise LowbitTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args = _as_args(example_inputs)
    rec = _Recorder(model, args)

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):  # noqa: ANN001, ANN204
            kw = kw or {}
            out = func(*a, **kw)
            rec.record(func, a, kw, out)
            return out

    with torch.no_grad(), _Hooks(model, rec.stack), Mode():
        model(*args)
    return rec.graph()


# ------------------------------------------------------------------------------------------
# Measurement and fitting


@dataclass(frozen=True)
class Measurement:
    """What :func:`measure` returns. ``total_ms`` is the median wall time of the whole forward
    pass; ``layers`` has one row per ATen op (its module, op and median time)."""

    total_ms: float
    samples_ms: list[float] = field(repr=False)
    layers: list[dict[str, Any]] = field(repr=False)

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.layers)


def measure(model: Any, example_inputs: Any, repeats: int = 20, warmup: int = 3, per_op: bool = True) -> Measurement:
    """Time ``model(*example_inputs)`` on this machine, whole and op by op.

    The whole pass is timed ``repeats`` times under ``torch.no_grad()`` after ``warmup`` runs
    (median reported); then, with ``per_op``, each ATen op is timed in a separate pass (the
    per-op times include the dispatch hook's overhead, so they are for finding the slow ops,
    not for adding up).

    >>> import torch
    >>> m = torch.nn.Linear(64, 64)
    >>> r = measure(m, torch.randn(8, 64), repeats=5)
    >>> r.total_ms > 0, [l["op"] for l in r.layers]
    (True, ['aten.t', 'aten.addmm'])
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    if not callable(model):
        raise LowbitTypeError(f"model must be callable (a torch.nn.Module), got {type(model).__name__}")
    repeats, warmup = int_arg(repeats, "repeats", 1, None), int_arg(warmup, "warmup", 0, None)
    args = _as_args(example_inputs)
    samples = []
    with torch.no_grad():
        for _ in range(warmup):
            model(*args)
        for _ in range(repeats):
            t = time.perf_counter()
            model(*args)
            samples.append((time.perf_counter() - t) * 1e3)
    layers: list[dict[str, Any]] = []
    if per_op:
        stack = [""]
        times: list[list[float]] = []
        names: list[tuple[str, str]] = []

        class Mode(TorchDispatchMode):
            i = 0

            def __torch_dispatch__(self, func, types, a=(), kw=None):  # noqa: ANN001, ANN204
                t = time.perf_counter()
                out = func(*a, **(kw or {}))
                dt = (time.perf_counter() - t) * 1e3
                i = self.i
                if i == len(times):
                    times.append([])
                    names.append((stack[-1], f"aten.{func.overloadpacket.__name__}"))
                times[i].append(dt)
                self.i += 1
                return out

        mode = Mode()
        with torch.no_grad(), _Hooks(model, stack):
            for _ in range(max(3, min(repeats, 10))):
                mode.i = 0
                with mode:
                    model(*args)
        layers = [{"name": n, "op": o, "ms": float(np.median(t))} for (n, o), t in zip(names, times)]
    return Measurement(float(np.median(samples)), samples, layers)


class CostModel:
    """A device profile whose per-op-kind efficiencies and per-op overheads are fitted to
    measured latencies.

    The roofline estimate is linear in ``1 / efficiency`` per op kind and in the overheads, so
    :meth:`fit` solves a non-negative least-squares problem in relative error over measured
    graphs and returns a model whose :meth:`predict` is :func:`estimate` with the fitted profile.

    >>> import torch
    >>> nets = [torch.nn.Sequential(torch.nn.Linear(64, w), torch.nn.ReLU(), torch.nn.Linear(w, 8))
    ...         for w in (64, 256, 1024)]
    >>> graphs = [from_torch(n, torch.randn(4, 64)) for n in nets]
    >>> model = CostModel.fit(graphs, [measure(n, torch.randn(4, 64), per_op=False).total_ms for n in nets])
    >>> model.predict(graphs[0]) > 0
    True
    """

    def __init__(self, device: str | DeviceProfile = "host", weight_bits: int = 32, act_bits: int = 32) -> None:
        self.device = _device(device)
        self.weight_bits = _bits(weight_bits, "weight_bits")
        self.act_bits = _bits(act_bits, "act_bits")

    @classmethod
    def fit(
        cls,
        graphs: Sequence[Graph],
        measured_ms: Sequence[float],
        device: str | DeviceProfile = "host",
        weight_bits: int = 32,
        act_bits: int = 32,
    ) -> CostModel:
        if isinstance(graphs, (str, bytes, dict)) or not hasattr(graphs, "__iter__"):
            raise LowbitTypeError(f"graphs must be a list of lowbit.nas.Graph, got {type(graphs).__name__}")
        graphs = list(graphs)
        if not all(isinstance(g, Graph) for g in graphs):
            raise LowbitTypeError("graphs must be lowbit.nas.Graph objects")
        if isinstance(measured_ms, (str, bytes, dict)) or not hasattr(measured_ms, "__iter__"):
            raise LowbitTypeError(f"measured_ms must be a list of floats, got {type(measured_ms).__name__}")
        measured = [float_arg(m, "measured_ms") for m in measured_ms]
        if len(measured) != len(graphs):
            raise LowbitValueError(f"measured_ms has {len(measured)} measurements for {len(graphs)} graphs")
        fitted = _lowbit.fit_device(graphs, measured, _device(device),
                                    _bits(weight_bits, "weight_bits"), _bits(act_bits, "act_bits"))
        return cls(fitted, weight_bits, act_bits)

    def estimate(self, graph: Graph) -> Cost:
        return estimate(graph, self.device, self.weight_bits, self.act_bits)

    def predict(self, graph: Graph) -> float:
        """Predicted latency of ``graph`` in milliseconds."""
        return self.estimate(graph).latency_ms

    def __repr__(self) -> str:
        eff = {k: round(v, 3) if v < 1e6 else "free" for k, v in self.device.efficiency.items()}
        d = self.device
        return f"CostModel(device={d.name!r}, efficiency={eff}, overhead_us={d.overhead_us:.2f}, view_overhead_us={d.view_overhead_us:.2f})"


# ------------------------------------------------------------------------------------------
# Search spaces


def _metrics_of(choice: Any, device: DeviceProfile, wb: int, ab: int) -> list[float]:
    if isinstance(choice, Graph):
        choice = estimate(choice, device, wb, ab)
    if isinstance(choice, Cost):
        return [choice.metric(m) for m in METRICS]
    if isinstance(choice, Mapping):
        unknown = set(choice) - set(METRICS)
        if unknown:
            raise LowbitValueError(f"unknown metrics {sorted(map(str, unknown))} in a choice; known: {list(METRICS)}")
        return [float_arg(choice.get(m, 0.0), f"a choice's {m}") for m in METRICS]
    raise LowbitTypeError(f"a choice must be a Graph, a Cost or a dict of metrics, got {type(choice).__name__}")


class SearchSpace:
    """A chain of blocks, each with a few candidate choices whose costs are precomputed.

    ``blocks`` is a list (one per block) of lists of choices; a choice is a :class:`Graph`
    (estimated on ``device`` at ``bits``), a :class:`Cost`, or a dict of metrics. ``bits`` is the
    weight bit width (activations int8 when it is <= 8, else float32) or a ``(weight_bits,
    act_bits)`` pair. ``base`` is the fixed part of the network (stem and head), same forms.
    Latency, energy, FLOPs, parameters and weight bytes add over blocks; peak activation memory
    is the maximum.

    >>> space = SearchSpace([[{"latency_ms": 1.0}, {"latency_ms": 2.0}]] * 3)
    >>> space.evaluate([[0, 1, 1], [0, 0, 0]])["latency_ms"]
    array([5., 3.])
    >>> value, grad = space.expected([[0.5, 0.5]] * 3)
    >>> float(value), grad[0].tolist()
    (4.5, [1.0, 2.0])
    """

    def __init__(
        self,
        blocks: Sequence[Sequence[Any]],
        device: str | DeviceProfile = "cortex-a76",
        bits: int | tuple[int, int] = 32,
        base: Any = None,
    ) -> None:
        if isinstance(bits, tuple):
            if len(bits) != 2:
                raise LowbitValueError(f"bits must be an int or a (weight_bits, act_bits) pair, got {bits!r}")
            wb, ab = (_bits(b, "bits") for b in bits)
        else:
            wb = _bits(bits, "bits")
            ab = 8 if wb <= 8 else 32
        self.device, self.weight_bits, self.act_bits = _device(device), wb, ab
        def listable(v: Any) -> bool:
            return hasattr(v, "__iter__") and not isinstance(v, (str, bytes, Mapping))

        if not listable(blocks):
            raise LowbitTypeError(f"blocks must be a list of blocks, got {type(blocks).__name__}")
        blocks = list(blocks)
        if not all(listable(b) for b in blocks):
            raise LowbitTypeError("blocks must be a list of blocks, each a list of choices")
        blocks = [list(b) for b in blocks]
        if not blocks or not all(blocks):
            raise LowbitValueError("a search space needs at least one block, each with at least one choice")
        self.n_choices = [len(b) for b in blocks]
        costs = np.zeros((len(blocks), max(self.n_choices), len(METRICS)))
        for i, block in enumerate(blocks):
            for j, choice in enumerate(block):
                costs[i, j] = _metrics_of(choice, self.device, wb, ab)
        base_costs = [0.0] * len(METRICS) if base is None else _metrics_of(base, self.device, wb, ab)
        self._costs = costs
        self._core = _lowbit.SpaceCore(costs, self.n_choices, base_costs)

    @property
    def n_blocks(self) -> int:
        return len(self.n_choices)

    def costs(self, metric: str = "latency_ms") -> np.ndarray:
        """(blocks, max_choices) costs of each choice; NaN where a block has fewer choices."""
        out = self._costs[:, :, METRICS.index(_metric(metric))].copy()
        for b, n in enumerate(self.n_choices):
            out[b, n:] = np.nan
        return out

    def evaluate(self, choices: Any) -> dict[str, np.ndarray]:
        """Metrics of candidates: ``choices`` is an int array (n, blocks) of choice indices;
        returns a dict of (n,) float64 arrays, one per metric."""
        if choices is None or isinstance(choices, (str, bytes, dict)):
            raise LowbitTypeError(f"choices must be an integer array (n, {self.n_blocks}), got {type(choices).__name__}")
        c = np.asarray(choices)
        if c.ndim == 1:
            c = c[None]
        if c.ndim != 2 or (c.size and not np.issubdtype(c.dtype, np.integer)):
            raise LowbitValueError(f"choices must be an integer array (n, {self.n_blocks}), got {c.dtype} {c.shape}")
        out = self._core.evaluate(np.ascontiguousarray(c, dtype=np.int64))
        return {m: out[:, i] for i, m in enumerate(METRICS)}

    def expected(self, probs: Any, metric: str = "latency_ms") -> tuple[Any, np.ndarray]:
        """Expected cost under choice probabilities and its gradient with respect to them.

        ``probs`` is (blocks, max_choices) or a batch (batch, blocks, max_choices); entries past a
        block's number of choices must be 0. Returns ``(value, grad)`` with ``value`` a float
        (or (batch,) array) and ``grad`` shaped like ``probs``.
        """
        if probs is None or isinstance(probs, (str, bytes, dict)):
            raise LowbitTypeError(f"probs must be a float array, got {type(probs).__name__}")
        p = np.asarray(probs)
        if p.dtype.kind not in "fiub":
            raise LowbitTypeError(f"probs must hold real numbers, got {p.dtype}")
        p = p.astype(np.float64)
        single = p.ndim == 2
        if single:
            p = p[None]
        if p.ndim != 3:
            raise LowbitValueError(f"probs must be (blocks, choices) or (batch, blocks, choices), got shape {p.shape}")
        value, grad = self._core.expected(np.ascontiguousarray(p), _metric(metric))
        return (float(value[0]), grad[0]) if single else (value, grad)

    def random(self, n: int, seed: int | None = None) -> np.ndarray:
        """``n`` uniformly random candidates, (n, blocks) int64."""
        rng = np.random.default_rng(_seed(seed))
        n = int_arg(n, "n", 0, None)
        if n * self.n_blocks * 8 > _MAX_BYTES:
            raise LowbitValueError(f"n={n} candidates of {self.n_blocks} blocks would take {n * self.n_blocks * 8} bytes")
        return np.stack([rng.integers(0, k, size=n) for k in self.n_choices], axis=1).astype(np.int64)

    def __repr__(self) -> str:
        return f"SearchSpace({self.n_blocks} blocks, choices={self.n_choices}, device={self.device.name!r}, bits=({self.weight_bits}, {self.act_bits}))"


def _metric(m: str, what: str = "metric") -> str:
    if not isinstance(m, str) or m not in METRICS:
        raise LowbitValueError(f"{what}: unknown metric {m!r}; known: {list(METRICS)}")
    return m


# Arrays lowbit.nas allocates for a request (candidates, populations) stop here: an absurd count
# is refused up front instead of failing (or swapping) halfway.
_MAX_BYTES = 1 << 40


def _seed(seed: Any) -> Any:
    return None if seed is None else int_arg(seed, "seed", 0, None)


@dataclass(frozen=True)
class ParetoFront:
    """Non-dominated feasible candidates found by :func:`evolve`: higher ``fitness``, lower
    ``metrics[objective]``. Sorted by the objective."""

    choices: np.ndarray
    fitness: np.ndarray
    metrics: dict[str, np.ndarray] = field(repr=False)
    objective: str = "latency_ms"
    evaluated: int = 0

    def __len__(self) -> int:
        return len(self.fitness)


def _pareto(fit: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Indices of points no other point beats (fitness >=, cost <=, one strictly)."""
    order = np.lexsort((-fit, cost))
    keep, best = [], -np.inf
    for i in order:
        if fit[i] > best:
            keep.append(i)
            best = fit[i]
    return np.array(keep, dtype=np.int64)


def _ranks(fit: np.ndarray, cost: np.ndarray, violation: np.ndarray) -> np.ndarray:
    """Non-dominated sorting rank (0 = front); infeasible points rank after all feasible ones,
    ordered by violation."""
    n = len(fit)
    rank = np.full(n, -1)
    feasible = violation <= 0
    remaining = np.flatnonzero(feasible)
    r = 0
    while remaining.size:
        front = remaining[_pareto(fit[remaining], cost[remaining])]
        rank[front] = r
        remaining = np.setdiff1d(remaining, front)
        r += 1
    infeasible = np.flatnonzero(~feasible)
    rank[infeasible] = r + np.argsort(np.argsort(violation[infeasible]))
    return rank


def evolve(
    space: SearchSpace,
    fitness: Callable[[np.ndarray], Any],
    constraints: Mapping[str, float] | None = None,
    objective: str = "latency_ms",
    population: int = 64,
    generations: int = 50,
    mutation: float | None = None,
    seed: int | None = 0,
    progress: bool = True,
) -> ParetoFront:
    """Multi-objective evolutionary search: maximise ``fitness`` and minimise ``objective``
    subject to ``constraints`` (upper bounds on metrics, e.g. ``{"latency_ms": 5.0}``).

    ``fitness`` maps an (n, blocks) int array of candidates to n scores (higher is better), so a
    whole generation is scored in one call. Each generation makes ``population`` children by
    tournament selection, uniform crossover and per-block mutation (probability ``mutation``,
    default 1/blocks), scores them with :meth:`SearchSpace.evaluate`, and keeps the best
    ``population`` by non-dominated rank (constraint violations rank last). Returns the Pareto
    front of every feasible candidate seen.

    >>> space = SearchSpace([[{"latency_ms": c, "params": c} for c in (1.0, 2.0, 3.0)]] * 4)
    >>> front = evolve(space, lambda c: c.sum(axis=1), {"latency_ms": 9.0}, generations=10,
    ...                progress=False)
    >>> front.metrics["latency_ms"].max() <= 9.0, front.fitness.max()
    (np.True_, np.float64(5.0))
    """
    if not isinstance(space, SearchSpace):
        raise LowbitTypeError(f"space must be a SearchSpace, got {type(space).__name__}")
    if not callable(fitness):
        raise LowbitTypeError(f"fitness must be callable, got {type(fitness).__name__}")
    if constraints is not None and not isinstance(constraints, Mapping):
        raise LowbitTypeError(f"constraints must be a dict of metric bounds, got {type(constraints).__name__}")
    constraints = {_metric(m, "constraints key"): float_arg(b, f"constraints[{m!r}]", finite=True)
                   for m, b in (constraints or {}).items()}
    _metric(objective, "objective")
    population = int_arg(population, "population", 2, None)
    generations = int_arg(generations, "generations", 0, None)
    if population * space.n_blocks * 8 * 4 > _MAX_BYTES:
        raise LowbitValueError(f"population={population} is too large")
    rng = np.random.default_rng(_seed(seed))
    nb = space.n_blocks
    sizes = np.array(space.n_choices)
    p_mut = 1.0 / nb if mutation is None else float_arg(mutation, "mutation", 0.0, 1.0)

    def score(c: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        f = np.asarray(fitness(c))
        if f.dtype.kind not in "fiub":
            raise LowbitValueError(f"fitness must return {len(c)} finite scores, got {f.dtype}")
        f = f.astype(np.float64).reshape(-1)
        if f.shape != (len(c),) or not np.isfinite(f).all():
            raise LowbitValueError(f"fitness must return {len(c)} finite scores, got shape {f.shape}")
        m = space.evaluate(c)
        v = np.zeros(len(c))
        for k, bound in constraints.items():
            v += np.maximum(m[k] - bound, 0) / max(abs(bound), 1e-12)
        return f, m, v

    pop = space.random(population, seed=int(rng.integers(2**32)))
    f, m, v = score(pop)
    seen_c, seen_f, seen_m, seen_v = [pop], [f], [m], [v]
    steps: Iterable[int] = range(generations)
    if progress:
        try:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="evolving", unit="gen")
        except ImportError:
            pass
    for _ in steps:
        rank = _ranks(f, m[objective], v)
        pick = lambda: np.minimum(*rng.integers(0, len(pop), size=(2, population)))  # noqa: E731
        order = np.argsort(rank, kind="stable")
        a, b = pop[order[pick()]], pop[order[pick()]]
        child = np.where(rng.random((population, nb)) < 0.5, a, b)
        mutate = rng.random((population, nb)) < p_mut
        child = np.where(mutate, (rng.random((population, nb)) * sizes).astype(np.int64), child)
        cf, cm, cv = score(child)
        seen_c.append(child)
        seen_f.append(cf)
        seen_m.append(cm)
        seen_v.append(cv)
        allc = np.concatenate([pop, child])
        allf, allv = np.concatenate([f, cf]), np.concatenate([v, cv])
        allm = {k: np.concatenate([m[k], cm[k]]) for k in m}
        _, uniq = np.unique(allc, axis=0, return_index=True)
        r = _ranks(allf[uniq], allm[objective][uniq], allv[uniq])
        keep = uniq[np.argsort(r, kind="stable")[:population]]
        pop, f, v = allc[keep], allf[keep], allv[keep]
        m = {k: allm[k][keep] for k in allm}
    C = np.concatenate(seen_c)
    F, V = np.concatenate(seen_f), np.concatenate(seen_v)
    M = {k: np.concatenate([s[k] for s in seen_m]) for k in METRICS}
    _, uniq = np.unique(C, axis=0, return_index=True)
    ok = uniq[V[uniq] <= 0]
    front = ok[_pareto(F[ok], M[objective][ok])] if ok.size else ok
    front = front[np.argsort(M[objective][front], kind="stable")]
    return ParetoFront(C[front], F[front], {k: M[k][front] for k in METRICS}, objective, len(C))
