"""Capture of PyTorch models: ATen ops recorded under ``TorchDispatchMode`` into a :class:`Graph`
with the exact FLOPs of ``torch.utils.flop_counter``."""

from __future__ import annotations

import json
from typing import Any, Sequence

from lowbit._lowbit import Graph, LowbitTypeError


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
