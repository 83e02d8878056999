"""The affine ops on torch tensors: argument checks, then lowbit's custom ops
(:mod:`lowbit._ops`: zero-copy views into the core on CPU, autograd by the straight-through
estimator exactly as ATen's cachemask backward, and LSQ's learnable scale and zero point).

``lowbit.fake_quantize_per_tensor_affine`` and the other functions of :mod:`lowbit._quant`
come here for a tensor; :mod:`lowbit.torch` re-exports these as its drop-ins for torch's ops.
Imports torch; besides :mod:`lowbit._ops` only the bottom layer (:mod:`lowbit._array`,
:mod:`lowbit._validate`).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from lowbit import _lowbit, _ops
from lowbit._array import float_tensor, out_arg, tensor_view
from lowbit._lowbit import LowbitTypeError, LowbitValueError
from lowbit._validate import float_arg, int_arg, vector_arg

__all__ = [
    "dequantize_per_channel",
    "dequantize_per_tensor",
    "fake_quantize_learnable_per_channel_affine",
    "fake_quantize_learnable_per_tensor_affine",
    "fake_quantize_per_channel_affine",
    "fake_quantize_per_tensor_affine",
    "quantize_per_channel",
    "quantize_per_tensor",
]


def _no_qparam_grad(op: str, **qparams: Any) -> None:
    """torch's fake-quant ops are not differentiable in their qparams and say so; neither are
    lowbit's (a scale with ``requires_grad`` would otherwise silently get no gradient)."""
    if torch.is_grad_enabled():
        for name, v in qparams.items():
            if isinstance(v, torch.Tensor) and v.requires_grad:
                raise LowbitValueError(
                    f"{op} is not differentiable with respect to argument '{name}': it cannot have "
                    "requires_grad=True (as in torch; detach it, or learn scales with "
                    "torch._fake_quantize_learnable_per_tensor_affine / _per_channel_affine)")


def _fake_quant(x: torch.Tensor, qargs: tuple, return_mask: bool, out: torch.Tensor | None = None) -> Any:
    if not isinstance(x, torch.Tensor):
        raise LowbitTypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if out is not None and not isinstance(out, torch.Tensor):
        raise LowbitTypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out is not None:
        if torch.is_grad_enabled() and (x.requires_grad or out.requires_grad):
            raise LowbitValueError("out= does not support autograd; call it under torch.no_grad()")
        a, bf16 = tensor_view(x, "x")
        o, obf16 = tensor_view(out, "out")
        if bf16 or obf16:
            raise LowbitTypeError("out= is not supported for bfloat16 tensors")
        o, inplace = out_arg(a, o)
        fn: Callable[..., Any] = _lowbit.fake_quantize_per_tensor_affine if qargs[0] == "tensor" else _lowbit.fake_quantize_per_channel_affine
        r = fn(a, *qargs[1:], return_mask, False, out=o, inplace=inplace)
        return (out, torch.from_numpy(r[1])) if return_mask else out
    if not isinstance(return_mask, (bool, np.bool_)):
        raise LowbitTypeError(f"return_mask must be a bool, got {type(return_mask).__name__}")
    return_mask = bool(return_mask)
    if qargs[0] == "tensor":
        _, scale, zp, qmin, qmax = qargs
        axis = None
    else:
        _, scale, zp, axis, qmin, qmax = qargs
    scale_t, zp_t = torch.tensor(scale, dtype=torch.float64), torch.tensor(zp, dtype=torch.int64)
    return _fq(x, scale_t, zp_t, axis, qmin, qmax, return_mask)


def _fq(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None, qmin: int, qmax: int,
        return_mask: bool = False) -> Any:
    """Fake-quant through the custom op (per tensor when ``axis`` is None), with tensor qparams
    (traceable: nothing here reads a tensor's value); the mask is computed only when autograd
    or the caller needs it."""
    with_mask = return_mask or (torch.is_grad_enabled() and float_tensor(x, "x").requires_grad)
    if axis is None:
        out, mask = _ops.fake_quant_per_tensor(x, scale, zero_point, qmin, qmax, with_mask)
    else:
        out, mask = _ops.fake_quant_per_channel(x, scale, zero_point, axis, qmin, qmax, with_mask)
    return (out, mask) if return_mask else out


def fake_quantize_per_tensor_affine(
    x: torch.Tensor,
    scale: Any,
    zero_point: Any,
    quant_min: int,
    quant_max: int,
    return_mask: bool = False,
    out: torch.Tensor | None = None,
) -> Any:
    """Drop-in for ``torch.fake_quantize_per_tensor_affine`` on CPU tensors: same bits, same
    straight-through gradient. ``out=`` (no autograd) writes into a contiguous tensor, ``out=x``
    in place. See :func:`lowbit.fake_quantize_per_tensor_affine`."""
    _no_qparam_grad("fake_quantize_per_tensor_affine", scale=scale, zero_point=zero_point)
    qargs = ("tensor", float_arg(scale, "scale"), int_arg(zero_point, "zero_point"), int_arg(quant_min, "quant_min"), int_arg(quant_max, "quant_max"))
    return _fake_quant(x, qargs, return_mask, out)


def fake_quantize_per_channel_affine(
    x: torch.Tensor,
    scale: Any,
    zero_point: Any,
    axis: int,
    quant_min: int,
    quant_max: int,
    return_mask: bool = False,
    out: torch.Tensor | None = None,
) -> Any:
    """Drop-in for ``torch.fake_quantize_per_channel_affine`` on CPU tensors (``out=`` as per tensor)."""
    _no_qparam_grad("fake_quantize_per_channel_affine", scale=scale, zero_point=zero_point)
    qargs = (
        "channel",
        vector_arg(scale, "scale", integer=False),
        vector_arg(zero_point, "zero_point", integer=True),
        int_arg(axis, "axis"),
        int_arg(quant_min, "quant_min"),
        int_arg(quant_max, "quant_max"),
    )
    return _fake_quant(x, qargs, return_mask, out)


def _learnable_args(x: Any, scale: Any, zero_point: Any, n: int, quant_min: Any, quant_max: Any,
                    grad_factor: Any) -> tuple[int, int, float]:
    float_tensor(x, "x")
    for name, v in (("scale", scale), ("zero_point", zero_point)):
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise LowbitTypeError(f"{name} must be a float tensor (a learnable parameter), got "
                                  f"{getattr(v, 'dtype', type(v).__name__)}")
        if v.ndim != 1 or v.numel() != n:
            raise LowbitValueError(f"{name} must be a 1-D tensor of {n} element{'s' * (n != 1)} (one per channel of x "
                                   f"along axis), got shape {tuple(v.shape)}")
        if v.device != x.device:
            raise LowbitValueError(f"{name} is on {v.device}, x on {x.device}")
    qmin, qmax = int_arg(quant_min, "quant_min"), int_arg(quant_max, "quant_max")
    if qmin > qmax:
        raise LowbitValueError(f"quant_min ({qmin}) must be less than or equal to quant_max ({qmax})")
    return qmin, qmax, float_arg(grad_factor, "grad_factor")


def fake_quantize_learnable_per_tensor_affine(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                                              quant_min: int, quant_max: int, grad_factor: float = 1.0) -> torch.Tensor:
    """Drop-in for ``torch._fake_quantize_learnable_per_tensor_affine`` (LSQ / LSQ+): the same
    value and the same gradients of ``x``, ``scale`` and ``zero_point`` (each scaled by
    ``grad_factor``), bit for bit; ``scale`` and ``zero_point`` are float tensors of shape ``(1,)``.

    >>> import torch, lowbit.torch as lt
    >>> s = torch.tensor([0.1], requires_grad=True); z = torch.tensor([0.0], requires_grad=True)
    >>> y = lt.fake_quantize_learnable_per_tensor_affine(torch.tensor([0.26, 5.0]), s, z, -8, 7)
    >>> y.sum().backward(); y.detach(), s.grad
    (tensor([0.3000, 0.7000]), tensor([7.4000]))
    """
    qmin, qmax, g = _learnable_args(x, scale, zero_point, 1, quant_min, quant_max, grad_factor)
    return _ops.learnable_fake_quant(x, scale, zero_point, None, qmin, qmax, g)


def fake_quantize_learnable_per_channel_affine(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int,
                                               quant_min: int, quant_max: int, grad_factor: float = 1.0) -> torch.Tensor:
    """Drop-in for ``torch._fake_quantize_learnable_per_channel_affine``: one learnable scale
    and zero point per slice of ``axis``, value and gradients bit for bit."""
    if not isinstance(x, torch.Tensor):
        raise LowbitTypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    axis = int_arg(axis, "axis")
    if not -x.ndim <= axis < x.ndim:
        raise LowbitValueError(f"axis {axis} is out of range for a {x.ndim}-D tensor")
    axis %= x.ndim
    qmin, qmax, g = _learnable_args(x, scale, zero_point, x.shape[axis], quant_min, quant_max, grad_factor)
    return _ops.learnable_fake_quant(x, scale, zero_point, axis, qmin, qmax, g)


def _vectors(scales: Any, zero_points: Any) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.tensor(vector_arg(scales, "scales", integer=False), dtype=torch.float64)
    z = torch.tensor(vector_arg(zero_points, "zero_points", integer=True), dtype=torch.int64)
    return s, z


def quantize_per_tensor(x: torch.Tensor, scale: Any, zero_point: Any, quant_min: int, quant_max: int) -> torch.Tensor:
    """Integer codes as an int8/uint8 tensor; see :func:`lowbit.quantize_per_tensor`."""
    return _ops.quantize_per_tensor(float_tensor(x, "x"), float_arg(scale, "scale"), int_arg(zero_point, "zero_point"),
                                    int_arg(quant_min, "quant_min"), int_arg(quant_max, "quant_max"))


def quantize_per_channel(x: torch.Tensor, scales: Any, zero_points: Any, axis: int, quant_min: int, quant_max: int) -> torch.Tensor:
    """Per-channel integer codes as a tensor; see :func:`lowbit.quantize_per_channel`."""
    s, z = _vectors(scales, zero_points)
    return _ops.quantize_per_channel(float_tensor(x, "x"), s, z, int_arg(axis, "axis"), int_arg(quant_min, "quant_min"),
                                     int_arg(quant_max, "quant_max"))


def _codes(q: Any) -> torch.Tensor:
    if not isinstance(q, torch.Tensor) or q.dtype not in (torch.int8, torch.uint8):
        raise LowbitTypeError(f"q must be an int8 or uint8 tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    return q.detach()


def dequantize_per_tensor(q: torch.Tensor, scale: Any, zero_point: Any) -> torch.Tensor:
    """Float32 tensor ``(q - zero_point) * scale``."""
    return _ops.dequantize_per_tensor(_codes(q), float_arg(scale, "scale"), int_arg(zero_point, "zero_point"))


def dequantize_per_channel(q: torch.Tensor, scales: Any, zero_points: Any, axis: int) -> torch.Tensor:
    """Float32 tensor ``(q - zero_points[c]) * scales[c]`` along ``axis``."""
    s, z = _vectors(scales, zero_points)
    return _ops.dequantize_per_channel(_codes(q), s, z, int_arg(axis, "axis"))
