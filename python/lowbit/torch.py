"""PyTorch integration: lowbit's kernels as torch custom ops, with autograd, in eager mode,
``torch.compile`` (no graph break) and ``torch.export``.

Imported only when PyTorch is installed. float32, float16 and bfloat16 (and float64) CPU
tensors are shared with the Rust core through NumPy views; results come back as tensors
sharing the memory the core allocated. Tensors on other devices run PyTorch's own kernels
for the same ops (the same numbers torch gives there); observers and :func:`calibrate` reduce
them on their device.

>>> import torch, lowbit.torch as lt
>>> x = torch.tensor([0.1, 0.25, 0.35, 9.0], requires_grad=True)
>>> y = lt.fake_quantize_per_tensor_affine(x, 0.1, 0, -8, 7)
>>> y.sum().backward()
>>> x.grad
tensor([1., 1., 1., 0.])
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lowbit._lowbit import LowbitTypeError, LowbitValueError
from lowbit._tensor import (
    _fq,
    dequantize_per_channel,
    dequantize_per_tensor,
    fake_quantize_learnable_per_channel_affine,
    fake_quantize_learnable_per_tensor_affine,
    fake_quantize_per_channel_affine,
    fake_quantize_per_tensor_affine,
    quantize_per_channel,
    quantize_per_tensor,
)
from lowbit._validate import float_arg, int_arg, vector_arg

__all__ = [
    "AttachedQuantization",
    "BitLinear",
    "Calibration",
    "FakeQuantize",
    "LearnableFakeQuantize",
    "calibrate",
    "dequantize_per_channel",
    "dequantize_per_tensor",
    "expected_latency",
    "fake_quantize_learnable_per_channel_affine",
    "fake_quantize_learnable_per_tensor_affine",
    "fake_quantize_per_channel_affine",
    "fake_quantize_per_tensor_affine",
    "quantize_per_channel",
    "quantize_per_tensor",
    "sync_observers",
]

class FakeQuantize(torch.nn.Module):
    """Fake-quantization layer for quantization-aware training, per tensor or per channel.

    Forward equals ``torch.fake_quantize_per_{tensor,channel}_affine`` bit for bit; backward
    is PyTorch's straight-through estimator (gradient 1 where the code is in range, else 0).
    ``scale`` and ``zero_point`` are buffers (saved in ``state_dict``); ``axis=None`` means
    per tensor. ``enabled=False`` makes the layer the identity.

    >>> import torch, lowbit.torch as lt
    >>> fq = lt.FakeQuantize(quant_min=-8, quant_max=7, scale=0.1)
    >>> fq(torch.tensor([0.26, 5.0]))
    tensor([0.3000, 0.7000])
    >>> w = torch.randn(4, 16)
    >>> fq = lt.FakeQuantize.from_tensor(w, bits=4, axis=0)
    >>> fq.scale.shape
    torch.Size([4])
    """

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(
        self,
        quant_min: int = -128,
        quant_max: int = 127,
        scale: Any = 1.0,
        zero_point: Any = 0,
        axis: int | None = None,
        enabled: bool = True,
    ) -> None:
        super().__init__()
        self.quant_min, self.quant_max = int_arg(quant_min, "quant_min"), int_arg(quant_max, "quant_max")
        self.axis = None if axis is None else int_arg(axis, "axis")
        self.enabled = enabled
        if axis is None:
            scale, zero_point = [float_arg(scale, "scale")], [int_arg(zero_point, "zero_point", -(2**31), 2**31 - 1)]
        else:
            scale, zero_point = vector_arg(scale, "scale", integer=False), vector_arg(zero_point, "zero_point", integer=True)
            if any(not -(2**31) <= z < 2**31 for z in zero_point):
                raise LowbitValueError(f"zero_point must fit in int32, got {zero_point}")
        shape = () if axis is None else (-1,)
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32).reshape(shape))
        self.register_buffer("zero_point", torch.tensor(zero_point, dtype=torch.int32).reshape(shape))

    @classmethod
    def from_tensor(cls, x: torch.Tensor, bits: int = 8, symmetric: bool = True, axis: int | None = None) -> FakeQuantize:
        """A layer whose qparams come from the min-max of ``x`` (torch.ao's MinMaxObserver formula)."""
        from lowbit._lowbit import QuantSpec
        from lowbit._quant import quantize

        spec = QuantSpec(bits, symmetric=symmetric, granularity="tensor" if axis is None else "channel", axis=axis or 0)
        q = quantize(x, spec)
        return cls(spec.quant_min, spec.quant_max, torch.from_numpy(q.scales), torch.from_numpy(q.zero_points), axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return _fq(x, self.scale, self.zero_point, self.axis, self.quant_min, self.quant_max)

    def extra_repr(self) -> str:
        where = "per_tensor" if self.axis is None else f"per_channel(axis={self.axis})"
        return f"{where}, quant_min={self.quant_min}, quant_max={self.quant_max}, enabled={self.enabled}"


class LearnableFakeQuantize(torch.nn.Module):
    """Fake-quant with a learnable scale (LSQ, Esser et al. 2020) and optionally a learnable
    zero point (LSQ+, ``learn_zero_point=True``), per tensor or per channel (``axis``).

    Forward and the gradients of ``x``, ``scale`` and ``zero_point`` equal
    ``torch._fake_quantize_learnable_per_{tensor,channel}_affine`` bit for bit (see
    :func:`fake_quantize_learnable_per_tensor_affine`); the elementwise backward is lowbit's Rust
    kernel on CPU. ``use_grad_scaling`` multiplies the scale and zero-point gradients by
    ``1 / sqrt(x.numel() * quant_max)``, the formula of ``torch.ao``'s ``_LearnableFakeQuantize``;
    before each forward the scale is clamped to at least ``eps`` (as there). Inputs in bfloat16 or
    float16 (autocast, half-precision models) are quantized in float32 and returned in their dtype.

    >>> import torch, lowbit.torch as lt
    >>> w = torch.randn(8, 32)
    >>> fq = lt.LearnableFakeQuantize.from_tensor(w, bits=4, axis=0)
    >>> fq(w).sum().backward()
    >>> fq.scale.grad.shape
    torch.Size([8])
    """

    scale: torch.nn.Parameter
    zero_point: torch.nn.Parameter

    def __init__(
        self,
        quant_min: int = -128,
        quant_max: int = 127,
        scale: Any = 1.0,
        zero_point: Any = 0.0,
        axis: int | None = None,
        learn_zero_point: bool = False,
        use_grad_scaling: bool = True,
        eps: float = float(torch.finfo(torch.float32).eps),
        enabled: bool = True,
    ) -> None:
        super().__init__()
        self.quant_min, self.quant_max = int_arg(quant_min, "quant_min"), int_arg(quant_max, "quant_max")
        if not self.quant_min <= 0 <= self.quant_max:
            raise LowbitValueError(f"quant_min..quant_max ({self.quant_min}..{self.quant_max}) must include 0, as torch's "
                                   "learnable fake-quant requires")
        self.axis = None if axis is None else int_arg(axis, "axis")
        self.use_grad_scaling, self.enabled = bool(use_grad_scaling), bool(enabled)
        self.eps = float_arg(eps, "eps")
        s = vector_arg(scale, "scale", integer=False) if axis is not None else [float_arg(scale, "scale")]
        z = vector_arg(zero_point, "zero_point", integer=False) if axis is not None else [float_arg(zero_point, "zero_point")]
        if len(s) != len(z):
            raise LowbitValueError(f"{len(s)} scales but {len(z)} zero points")
        if any(not v > 0 for v in s):
            raise LowbitValueError(f"scale must be positive, got {s}")
        if any(not self.quant_min <= v <= self.quant_max for v in z):
            raise LowbitValueError(f"zero_point must lie in [{self.quant_min}, {self.quant_max}], got {z}")
        scale_t = torch.tensor(s, dtype=torch.float32)
        if not bool((scale_t > 0).all() & torch.isfinite(scale_t).all()):
            raise LowbitValueError(f"scale must be positive and finite in float32, got {s}")
        self.scale = torch.nn.Parameter(scale_t)
        self.zero_point = torch.nn.Parameter(torch.tensor(z, dtype=torch.float32), requires_grad=bool(learn_zero_point))

    @classmethod
    def from_tensor(cls, x: torch.Tensor, bits: int = 8, symmetric: bool = True, axis: int | None = None,
                    **kwargs: Any) -> LearnableFakeQuantize:
        """A layer starting from the min-max qparams of ``x`` (as :meth:`FakeQuantize.from_tensor`);
        ``kwargs`` go to the constructor (``learn_zero_point``, ``use_grad_scaling``, ...)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise LowbitTypeError(f"x must be a float tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        fq = FakeQuantize.from_tensor(x.detach().float(), bits, symmetric, axis)
        return cls(fq.quant_min, fq.quant_max, fq.scale.reshape(-1).tolist() if axis is not None else float(fq.scale),
                   fq.zero_point.reshape(-1).float().tolist() if axis is not None else float(fq.zero_point), axis, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise LowbitTypeError(f"x must be a float tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        with torch.no_grad():
            self.scale.clamp_(min=self.eps)
        xf = x if x.dtype == torch.float32 else x.float()
        g = 1.0 / (xf.numel() * self.quant_max) ** 0.5 if self.use_grad_scaling and xf.numel() and self.quant_max else 1.0
        if self.axis is None:
            y = fake_quantize_learnable_per_tensor_affine(xf, self.scale, self.zero_point, self.quant_min, self.quant_max, g)
        else:
            y = fake_quantize_learnable_per_channel_affine(xf, self.scale, self.zero_point, self.axis, self.quant_min,
                                                           self.quant_max, g)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        where = "per_tensor" if self.axis is None else f"per_channel(axis={self.axis})"
        return (f"{where}, quant_min={self.quant_min}, quant_max={self.quant_max}, "
                f"learn_zero_point={self.zero_point.requires_grad}, use_grad_scaling={self.use_grad_scaling}")


# ---------------------------------------------------------------------------------------------
# Calibration


def _observers_in(obj: Any) -> list:
    """Every lowbit observer in a (nested) dict / list / tuple, in a stable order."""
    from lowbit.calib import Observer

    if isinstance(obj, Observer):
        return [obj]
    if isinstance(obj, dict):
        return [o for k in sorted(obj, key=str) for o in _observers_in(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [o for v in obj for o in _observers_in(v)]
    raise LowbitTypeError(f"expected lowbit observers (or dicts / lists of them), got {type(obj).__name__}")


def sync_observers(observers: Any, group: Any = None) -> None:
    """Make every rank's observers hold the state of all ranks together.

    Each observer's state is gathered from every rank of ``group`` (``torch.distributed``) and
    merged in rank order, identically on every rank. Histogram and min-max merges are exact, so
    data-parallel calibration gives the same qparams as one process over all the data. All ranks
    must pass the same observers in the same structure. A no-op outside ``torch.distributed``.
    """
    import torch.distributed as dist

    obs = _observers_in(observers)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    mine = [o.state_dict() for o in obs]
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    if any(len(g) != len(obs) for g in gathered):
        raise LowbitValueError("ranks passed different numbers of observers to sync_observers")
    for i, o in enumerate(obs):
        total = o.__class__.__new__(o.__class__)
        total.load_state_dict(gathered[0][i])
        for g in gathered[1:]:
            other = o.__class__.__new__(o.__class__)
            other.load_state_dict(g[i])
            total.merge(other)
        o.load_state_dict(total.state_dict())


class Calibration(dict):
    """``{layer name: {"input": FakeQuantize, "weight": FakeQuantize}}`` from :func:`calibrate`;
    ``.observers`` holds the observers behind them (same keys). :meth:`attach` puts them on the
    model in one call."""

    observers: dict

    def attach(self, model: torch.nn.Module, weights: bool = True) -> AttachedQuantization:
        """Run ``model`` as calibrated: each layer's input through its ``"input"`` FakeQuantize
        (a forward pre-hook) and, with ``weights``, its weight through the ``"weight"`` one (a
        ``torch.nn.utils.parametrize`` parametrization). The FakeQuantize modules become
        submodules (``<layer>.lowbit_input``, the weight's parametrization), so ``model.to()``
        moves them and ``torch.compile`` traces them with no graph break. Returns a handle whose
        ``remove()`` gives the model back as it was. On an error nothing stays attached.

        >>> import torch, lowbit.torch as lt
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> cal = lt.calibrate(net, [torch.randn(16, 8) for _ in range(4)], progress=False)
        >>> handle = cal.attach(net)
        >>> y = net(torch.randn(3, 8))       # fake-quantized inputs and weights
        >>> handle.remove()
        """
        import torch.nn.utils.parametrize as parametrize

        if not isinstance(model, torch.nn.Module):
            raise LowbitTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        done: list[tuple[torch.nn.Module, Any, bool]] = []
        handle = AttachedQuantization(done)
        try:
            for name, fqs in self.items():
                try:
                    mod = model.get_submodule(name)
                except AttributeError:
                    raise LowbitValueError(f"the model has no layer {name!r} (calibrated on another model?)") from None
                if hasattr(mod, "lowbit_input"):
                    raise LowbitValueError(f"layer {name!r} already has lowbit's quantization attached")
                mod.lowbit_input = fqs["input"]
                hook = mod.register_forward_pre_hook(_quantize_input)
                if weights:
                    parametrize.register_parametrization(mod, "weight", fqs["weight"])
                done.append((mod, hook, weights))
        except BaseException:
            handle.remove()
            raise
        return handle


def _quantize_input(mod: torch.nn.Module, args: tuple) -> tuple:
    fq: Any = mod.lowbit_input
    return (fq(args[0]),) + tuple(args[1:])


class AttachedQuantization:
    """What :meth:`Calibration.attach` attached; ``remove()`` takes it all off again."""

    def __init__(self, attached: list) -> None:
        self._attached = attached

    def remove(self) -> None:
        import torch.nn.utils.parametrize as parametrize

        while self._attached:
            mod, hook, weights = self._attached.pop()
            hook.remove()
            del mod.lowbit_input
            if weights:
                parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)

    def __repr__(self) -> str:
        return f"AttachedQuantization({len(self._attached)} layers)"


def _batches(data: Any, progress: bool) -> Any:
    if not progress:
        return data
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return data
    return tqdm(data, desc="calibrating", unit="batch")


def calibrate(
    model: torch.nn.Module,
    data: Any,
    spec: Any = None,
    method: str = "mse",
    weight_spec: Any = None,
    progress: bool = True,
    sync: bool = False,
    group: Any = None,
) -> Calibration:
    """Observe every Linear / Conv layer's input and weight while ``data`` runs through ``model``.

    ``spec`` (a :class:`lowbit.QuantSpec`, default 8-bit asymmetric) sets the activations' bits
    and symmetry; their range comes from a :class:`lowbit.calib.HistogramObserver` with
    ``method``. Weights use min-max per output channel (``weight_spec``, default symmetric,
    per channel along axis 0, with ``spec``'s bits). ``data`` yields batches: a tensor, a tuple
    of positional inputs, or a dict of keyword inputs. The model runs in eval mode under
    ``torch.no_grad()`` (its mode is restored). ``sync=True`` merges the observers across
    ``torch.distributed`` ranks first (see :func:`sync_observers`). A layer the data never runs
    (a head off the path the inputs take) is left out of the result (its observers stay in
    ``observers``); when no layer ran, ``LowbitValueError``.

    >>> import torch, lowbit.torch as lt
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> cal = lt.calibrate(net, [torch.randn(16, 8) for _ in range(4)], progress=False)
    >>> sorted(cal), sorted(cal["0"])
    (['0', '2'], ['input', 'weight'])
    >>> y = cal["0"]["input"](torch.randn(3, 8))  # a FakeQuantize, ready to use
    """
    from lowbit._lowbit import QuantSpec
    from lowbit.calib import HistogramObserver, MinMaxObserver, PerChannelMinMaxObserver

    if not isinstance(model, torch.nn.Module):
        raise LowbitTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, v in (("spec", spec), ("weight_spec", weight_spec)):
        if v is not None and not isinstance(v, QuantSpec):
            raise LowbitTypeError(f"{name} must be a lowbit.QuantSpec, got {type(v).__name__}")
    if not isinstance(method, str):
        raise LowbitTypeError(f"method must be a string, got {type(method).__name__}")
    if data is None or isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise LowbitTypeError(f"data must be an iterable of batches, got {type(data).__name__}")
    spec = spec if spec is not None else QuantSpec(8, symmetric=False)
    weight_spec = weight_spec if weight_spec is not None else QuantSpec(spec.bits, symmetric=True, granularity="channel", axis=0)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))}
    if not layers:
        raise LowbitValueError("the model has no Linear or Conv layers to calibrate")
    observers: dict = {}
    hooks = []
    for name, mod in layers.items():
        act = HistogramObserver(bits=spec.bits, symmetric=spec.symmetric, method=method)
        w: MinMaxObserver | PerChannelMinMaxObserver
        if weight_spec.granularity == "channel":
            w = PerChannelMinMaxObserver(axis=weight_spec.axis, bits=weight_spec.bits, symmetric=weight_spec.symmetric)
        else:
            w = MinMaxObserver(bits=weight_spec.bits, symmetric=weight_spec.symmetric)
        w.update(mod.weight.detach())
        observers[name] = {"input": act, "weight": w}
        hooks.append(mod.register_forward_pre_hook(lambda m, args, o=act: o.update(args[0].detach())))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for batch in _batches(data, progress):
                if isinstance(batch, dict):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if sync:
        sync_observers(observers, group)
    result = Calibration()
    result.observers = observers
    for name, obs in observers.items():
        act, w = obs["input"], obs["weight"]
        if not act._core.observed:
            continue  # a layer the data never ran (a head off the path taken): nothing to calibrate
        s, z = act.qparams()
        fq_in = FakeQuantize(act.quant_min, act.quant_max, s, z)
        ws, wz = w.qparams()
        axis = weight_spec.axis if weight_spec.granularity == "channel" else None
        fq_w = FakeQuantize(w.quant_min, w.quant_max, torch.as_tensor(ws), torch.as_tensor(wz), axis)
        result[name] = {"input": fq_in, "weight": fq_w}
    if not result:
        raise LowbitValueError("the data ran none of the model's Linear or Conv layers: nothing was calibrated")
    return result


# ---------------------------------------------------------------------------------------------
# BitNet


def _bitnet_weight_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternary codes and their multiplier ``s`` (weights ~ codes / s), in float32 as the
    transformers recipe computes them whatever the weights' dtype."""
    w = w.float()
    s = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * s).round().clamp(-1, 1), s


def _bitnet_activation_codes(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax ``bits``-bit codes and their multipliers ``s`` (x ~ codes / s), in
    float32 as the recipe computes them."""
    x = x.float()
    qb = float(2 ** (bits - 1) - 1)
    s = qb / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * s).round().clamp(-qb - 1, qb), s


class BitLinear(torch.nn.Linear):
    """A BitNet b1.58 linear layer (absmean ternary weights, per-token absmax int8 activations).

    In training (or whenever autograd needs it) the forward is the BitNet recipe with the
    straight-through estimator, ``F.linear(x + (q(x) - x).detach(), w + (q(w) - w).detach(), b)``,
    its value taken from the exact integer product as the kernel computes it.
    In ``eval()`` on CPU without grad, it runs lowbit's packed ternary kernel on the same
    integers (weights are packed once and repacked when they change).

    >>> import torch, lowbit.torch as lt
    >>> layer = lt.BitLinear(64, 16)
    >>> y = layer(torch.randn(4, 64)); y.sum().backward()          # training: STE
    >>> with torch.no_grad():
    ...     y_fast = layer.eval()(torch.randn(4, 64))                # packed ternary kernel
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = None, dtype: Any = None) -> None:
        in_features, out_features = int_arg(in_features, "in_features", 0), int_arg(out_features, "out_features", 0)
        if in_features * out_features > 2**40:
            raise LowbitValueError(f"in_features x out_features = {in_features * out_features} weights is too large")
        super().__init__(in_features, out_features, bias, device, dtype)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> BitLinear:
        """A BitLinear with ``linear``'s weights (copied) and bias."""
        if not isinstance(linear, torch.nn.Linear):
            raise LowbitTypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device, linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or (
                x.dtype != self.weight.dtype and not _autocast(x)):
            raise LowbitTypeError(f"x must be a {self.weight.dtype} tensor like the weights, got "
                                  f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.device != self.weight.device or x.ndim == 0 or x.shape[-1] != self.in_features:
            raise LowbitValueError(f"x must have shape (..., {self.in_features}) on {self.weight.device}, "
                                   f"got {tuple(x.shape)} on {x.device}")
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if self.training or needs_grad or x.device.type != "cpu" or x.dtype != torch.float32:
            return _bitlinear(x, self.weight, self.bias)[0]
        return _bitlinear_packed(x, self.weight, self.bias)


def _autocast(x: torch.Tensor) -> bool:
    """Whether autocast is on for ``x``'s device (then it, not the caller, picks the dtypes)."""
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # PyTorch < 2.4
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


@torch.library.custom_op("lowbit::bitlinear", mutates_args=())
def _bitlinear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BitNet's fake-quant linear whose forward value is what the integer kernel computes:
    ``(q_x @ codes.T) * (scale_w / s_x) + bias`` with the integer product taken in float32, which
    is exact while ``in_features * 128 < 2**24``; a plain ``F.linear(q_x / s_x, codes * scale_w)``
    rounds every product and drifts from the deployed layer as ``in_features`` grows. Also returns
    the fake-quantized activations and weights the straight-through backward multiplies by.
    Autocast does not reach inside: the codes and their product stay in float32 (the recipe
    quantizes in float32, and the product is the deployed kernel's integers)."""
    with torch.autocast(x.device.type, enabled=False):
        qx, sx = _bitnet_activation_codes(x)
        codes, sw = _bitnet_weight_codes(w)
        acc = torch.nn.functional.linear(qx, codes)
    # The kernel's epilogue, operation for operation: acc * ((1 / s_x) * scale_w) + b in f64.
    y = acc.double() * ((1.0 / sx.double()) * (1.0 / sw).double())
    if b is not None:
        y = y + b.double()
    # The recipe's straight-through backward runs F.linear's in the layer's dtype.
    return y.to(x.dtype), (qx / sx).to(x.dtype), (codes / sw).to(w.dtype)


@_bitlinear.register_fake
def _(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape[:-1] + (w.shape[0],)), torch.empty_like(x), torch.empty_like(w)


def _bitlinear_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    ctx.save_for_backward(output[1], output[2])
    ctx.has_bias = inputs[2] is not None


@torch.library.custom_op("lowbit::bitlinear_backward", mutates_args=())
def _bitlinear_grads(g: torch.Tensor, xq: torch.Tensor, wq: torch.Tensor, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The straight-through estimator of ``F.linear(xq, wq, b)``: the gradients of x, the
    weights and (when ``has_bias``, else an empty tensor) the bias, as eager PyTorch computes
    them (an op of its own, so that a compiler cannot reorder the sums; ``g`` made contiguous,
    as a compiled graph may hand it over in another layout, which would change the order)."""
    with torch.autocast(g.device.type, enabled=False):
        g = g.contiguous()
        g2 = g.reshape(-1, g.shape[-1])
        gb = g2.sum(0) if has_bias else g.new_empty((0,))
        return g @ wq, g2.T @ xq.reshape(-1, xq.shape[-1]), gb


@_bitlinear_grads.register_fake
def _(g: torch.Tensor, xq: torch.Tensor, wq: torch.Tensor, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(xq, dtype=g.dtype), torch.empty_like(wq, dtype=g.dtype), g.new_empty((wq.shape[0] if has_bias else 0,))


def _bitlinear_backward(ctx: Any, g: torch.Tensor, _gxq: Any, _gwq: Any) -> tuple:
    xq, wq = ctx.saved_tensors
    gx, gw, gb = _bitlinear_grads(g, xq, wq, ctx.has_bias)
    return gx, gw, gb if ctx.has_bias else None


torch.library.register_autograd("lowbit::bitlinear", _bitlinear_backward, setup_context=_bitlinear_setup)

# Packed ternary kernels of the weights seen by lowbit::bitlinear_packed, by id of the weight
# tensor: (a weak reference to it, the versions packed, the kernel). An entry leaves with its tensor.
_PACKED: dict[int, tuple[Any, tuple, Any]] = {}


def _packed_kernel(w: torch.Tensor, b: torch.Tensor | None) -> Any:
    import weakref

    from lowbit.bitnet import TernaryLinear

    key = (w.data_ptr(), w._version, tuple(w.shape), None if b is None else (b.data_ptr(), b._version))
    hit = _PACKED.get(id(w))
    if hit is not None and hit[0]() is w and hit[1] == key:
        return hit[2]
    bias = None if b is None else b.detach().float().cpu().numpy()
    kernel = TernaryLinear.from_float(w.detach().float().cpu().numpy(), bias)
    if hit is None or hit[0]() is not w:
        weakref.finalize(w, _PACKED.pop, id(w), None)
    _PACKED[id(w)] = (weakref.ref(w), key, kernel)
    return kernel


@torch.library.custom_op("lowbit::bitlinear_packed", mutates_args=())
def _bitlinear_packed(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The eval forward of BitLinear on lowbit's packed ternary kernel (float32 CPU tensors;
    the weights are packed once and repacked when they change)."""
    return torch.as_tensor(_packed_kernel(w, b)(x))


@_bitlinear_packed.register_fake
def _(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[:-1] + (w.shape[0],))


@torch.library.custom_op("lowbit::expected_cost", mutates_args=())
def _expected_cost(probs: torch.Tensor, space: int, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The expected cost of a search space under choice probabilities (blocks, choices) or
    (batch, blocks, choices), and its gradient with respect to them, from lowbit's costs."""
    from lowbit.nas.search import space_by_id

    p = probs.detach().to("cpu", torch.float64)
    value, grad = space_by_id(space).expected(p.numpy() if p.ndim == 3 else p[None].numpy(), metric)
    out = torch.from_numpy(np.asarray(value)).to(probs.device, probs.dtype)
    g = torch.from_numpy(grad).to(probs.device, probs.dtype).reshape(probs.shape)
    return (out if probs.ndim == 3 else out[0]), g


@_expected_cost.register_fake
def _(probs: torch.Tensor, space: int, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    return probs.new_empty(probs.shape[:-2]), torch.empty_like(probs)


def _expected_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    ctx.save_for_backward(output[1])


def _expected_backward(ctx: Any, g: torch.Tensor, _gg: Any) -> tuple:
    (grad,) = ctx.saved_tensors
    return g.reshape(g.shape + (1, 1)) * grad, None, None


torch.library.register_autograd("lowbit::expected_cost", _expected_backward, setup_context=_expected_setup)


def expected_latency(
    logits: torch.Tensor,
    space: Any,
    tau: float = 1.0,
    gumbel: bool = False,
    hard: bool = False,
    metric: str = "latency_ms",
) -> torch.Tensor:
    """Expected cost of a :class:`lowbit.nas.SearchSpace` under architecture logits, as a
    differentiable loss term for DNAS (ProxylessNAS / FBNet).

    ``logits`` is (blocks, max_choices) or (batch, blocks, max_choices); entries past a
    block's number of choices are ignored. Probabilities are ``softmax(logits / tau)`` or, with
    ``gumbel=True``, a Gumbel-softmax sample (``hard=True``: straight-through one-hot). The
    expectation and its gradient come from lowbit's precomputed costs; autograd carries the
    gradient through the softmax to the logits.

    >>> import torch, lowbit.nas as nas, lowbit.torch as lt
    >>> space = nas.SearchSpace([[{"latency_ms": 1.0}, {"latency_ms": 3.0}]] * 2)
    >>> logits = torch.zeros(2, 2, requires_grad=True)
    >>> loss = lt.expected_latency(logits, space)
    >>> loss.backward()
    >>> loss.item(), logits.grad[0].tolist()
    (4.0, [-0.5, 0.5])
    """
    from lowbit.nas import SearchSpace

    if not isinstance(space, SearchSpace):
        raise LowbitTypeError(f"space must be a lowbit.nas.SearchSpace, got {type(space).__name__}")
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.is_meta:
        raise LowbitTypeError(f"logits must be a floating-point tensor with data, got {type(logits).__name__}")
    if logits.ndim not in (2, 3) or tuple(logits.shape[-2:]) != (int(space.n_blocks), int(max(space.n_choices))):
        raise LowbitValueError(
            f"logits must be ({space.n_blocks}, {max(space.n_choices)}) or (batch, {space.n_blocks}, "
            f"{max(space.n_choices)}), got {tuple(logits.shape)}"
        )
    if float_arg(tau, "tau", finite=True) <= 0:
        raise LowbitValueError(f"tau must be a positive number, got {tau!r}")
    if not isinstance(metric, str):
        raise LowbitTypeError(f"metric must be a string, got {type(metric).__name__}")
    mask = torch.zeros(logits.shape[-2:], dtype=torch.bool, device=logits.device)
    for b, n in enumerate(space.n_choices):
        mask[b, n:] = True
    masked = logits.masked_fill(mask, float("-inf"))
    if gumbel:
        probs = torch.nn.functional.gumbel_softmax(masked, tau=tau, hard=hard, dim=-1)
    else:
        probs = torch.softmax(masked / tau, dim=-1)
    return _expected_cost(probs.masked_fill(mask, 0.0), space._op_id, metric)[0]
