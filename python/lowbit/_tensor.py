"""The affine ops on torch tensors: zero-copy views into the core, autograd by the
straight-through estimator (``_FakeQuant``, exactly ATen's cachemask backward).

``lowbit.fake_quantize_per_tensor_affine`` and the other functions of :mod:`lowbit._quant`
come here for a tensor; :mod:`lowbit.torch` re-exports these as its drop-ins for torch's ops.
Imports torch; above it only the bottom layer (:mod:`lowbit._array`, :mod:`lowbit._validate`).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from lowbit import _lowbit
from lowbit._array import from_view, out_arg, tensor_view
from lowbit._lowbit import LowbitTypeError, LowbitValueError
from lowbit._validate import float_arg, int_arg, vector_arg

__all__ = [
    "dequantize_per_channel",
    "dequantize_per_tensor",
    "fake_quantize_per_channel_affine",
    "fake_quantize_per_tensor_affine",
    "quantize_per_channel",
    "quantize_per_tensor",
]


class _FakeQuant(torch.autograd.Function):
    """Fake-quant forward in Rust; backward passes the gradient where the code was in range,
    exactly like ATen's ``fake_quantize_*_affine_cachemask_backward``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, qargs: tuple) -> torch.Tensor:  # type: ignore[override]
        a, bf16 = tensor_view(x, "x")
        if qargs[0] == "tensor":
            _, scale, zp, qmin, qmax = qargs
            out, mask = _lowbit.fake_quantize_per_tensor_affine(a, scale, zp, qmin, qmax, True, bf16)
        else:
            _, scale, zp, axis, qmin, qmax = qargs
            out, mask = _lowbit.fake_quantize_per_channel_affine(a, scale, zp, axis, qmin, qmax, True, bf16)
        mask_t = torch.from_numpy(mask)
        ctx.save_for_backward(mask_t)
        return from_view(out, bf16)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad * mask.to(grad.device), None


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
    if return_mask or not (torch.is_grad_enabled() and x.requires_grad):
        a, bf16 = tensor_view(x, "x")
        fq: Callable[..., Any] = _lowbit.fake_quantize_per_tensor_affine if qargs[0] == "tensor" else _lowbit.fake_quantize_per_channel_affine
        r = fq(a, *qargs[1:], return_mask, bf16)
        if return_mask:
            return from_view(r[0], bf16), torch.from_numpy(r[1])
        return from_view(r, bf16)
    return _FakeQuant.apply(x, qargs)


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


def _float32_numpy(x: torch.Tensor) -> np.ndarray:
    a, bf16 = tensor_view(x, "x")
    return a.view(np.uint16).astype(np.uint32).__lshift__(16).view(np.float32) if bf16 else a


def quantize_per_tensor(x: torch.Tensor, scale: Any, zero_point: Any, quant_min: int, quant_max: int) -> torch.Tensor:
    """Integer codes as an int8/uint8 tensor; see :func:`lowbit.quantize_per_tensor`."""
    q = _lowbit.quantize_per_tensor(_float32_numpy(x), float_arg(scale, "scale"), int_arg(zero_point, "zero_point"), int_arg(quant_min, "quant_min"), int_arg(quant_max, "quant_max"))
    return torch.from_numpy(q)


def quantize_per_channel(x: torch.Tensor, scales: Any, zero_points: Any, axis: int, quant_min: int, quant_max: int) -> torch.Tensor:
    """Per-channel integer codes as a tensor; see :func:`lowbit.quantize_per_channel`."""
    q = _lowbit.quantize_per_channel(
        _float32_numpy(x),
        vector_arg(scales, "scales", integer=False),
        vector_arg(zero_points, "zero_points", integer=True),
        int_arg(axis, "axis"),
        int_arg(quant_min, "quant_min"),
        int_arg(quant_max, "quant_max"),
    )
    return torch.from_numpy(q)


def _codes_numpy(q: torch.Tensor) -> np.ndarray:
    if not isinstance(q, torch.Tensor) or q.device.type != "cpu" or q.dtype not in (torch.int8, torch.uint8):
        raise LowbitTypeError(f"q must be a CPU int8 or uint8 tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    return q.detach().numpy()


def dequantize_per_tensor(q: torch.Tensor, scale: Any, zero_point: Any) -> torch.Tensor:
    """Float32 tensor ``(q - zero_point) * scale``."""
    return torch.from_numpy(_lowbit.dequantize_per_tensor(_codes_numpy(q), float_arg(scale, "scale"), int_arg(zero_point, "zero_point")))


def dequantize_per_channel(q: torch.Tensor, scales: Any, zero_points: Any, axis: int) -> torch.Tensor:
    """Float32 tensor ``(q - zero_points[c]) * scales[c]`` along ``axis``."""
    return torch.from_numpy(
        _lowbit.dequantize_per_channel(
            _codes_numpy(q), vector_arg(scales, "scales", integer=False), vector_arg(zero_points, "zero_points", integer=True), int_arg(axis, "axis")
        )
    )
