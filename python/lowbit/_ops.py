"""lowbit's tensor kernels as torch custom ops (``torch.ops.lowbit.*``), so that ``torch.compile``
traces them without a graph break and ``torch.export`` captures them.

Each op has a fake (meta) implementation for tracing and an autograd formula. On CPU tensors it
runs lowbit's Rust kernels through zero-copy NumPy views; on any other device it runs PyTorch's
own kernel for that device (``torch.fake_quantize_*`` and the learnable fake-quant, which CUDA
has), so one model trains on CPU and GPU with the same numbers torch gives there. The ops do
not validate their arguments beyond what the kernels check: the public functions in
:mod:`lowbit._tensor` and the modules of :mod:`lowbit.torch` do that before calling them.

>>> import torch, lowbit._ops
>>> x = torch.tensor([0.1, 0.26, 9.0])
>>> out, mask = torch.ops.lowbit.fake_quant_per_tensor(x, torch.tensor(0.1), torch.tensor(0), -8, 7, True)
>>> out, mask
(tensor([0.1000, 0.3000, 0.7000]), tensor([ True,  True, False]))
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from lowbit import _lowbit
from lowbit._array import from_view, tensor_view

__all__ = [
    "dequantize_per_channel",
    "dequantize_per_tensor",
    "fake_quant_per_channel",
    "fake_quant_per_tensor",
    "learnable_fake_quant",
    "learnable_fake_quant_backward",
    "quantize_per_channel",
    "quantize_per_tensor",
]

_Tensor = torch.Tensor


def _empty_mask(x: _Tensor) -> _Tensor:
    return torch.empty((0,), dtype=torch.bool, device=x.device)


# ---------------------------------------------------------------------------------------------
# Fake-quant with the straight-through mask


@torch.library.custom_op("lowbit::fake_quant_per_tensor", mutates_args=())
def fake_quant_per_tensor(x: _Tensor, scale: _Tensor, zero_point: _Tensor, quant_min: int, quant_max: int,
                          with_mask: bool) -> tuple[_Tensor, _Tensor]:
    """``torch.fake_quantize_per_tensor_affine`` and, when ``with_mask``, its straight-through
    mask (else an empty mask)."""
    if x.device.type == "cpu":
        a, bf16 = tensor_view(x, "x")
        r = _lowbit.fake_quantize_per_tensor_affine(a, float(scale), int(zero_point), quant_min, quant_max, with_mask, bf16)
        if with_mask:
            return from_view(r[0], bf16), torch.from_numpy(r[1])
        return from_view(r, bf16), _empty_mask(x)
    return _torch_fake_quant_per_tensor(x, scale, zero_point, quant_min, quant_max, with_mask)


def _torch_fake_quant_per_tensor(x: _Tensor, scale: _Tensor, zero_point: _Tensor, quant_min: int, quant_max: int,
                                 with_mask: bool) -> tuple[_Tensor, _Tensor]:
    """The op on any device: ATen's own kernel for it."""
    out, mask = torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(
        x, float(scale), int(zero_point), quant_min, quant_max)
    return out, (mask if with_mask else _empty_mask(x))


@torch.library.custom_op("lowbit::fake_quant_per_channel", mutates_args=())
def fake_quant_per_channel(x: _Tensor, scale: _Tensor, zero_point: _Tensor, axis: int, quant_min: int, quant_max: int,
                           with_mask: bool) -> tuple[_Tensor, _Tensor]:
    """``torch.fake_quantize_per_channel_affine`` and, when ``with_mask``, its straight-through mask."""
    if x.device.type == "cpu":
        a, bf16 = tensor_view(x, "x")
        s = scale.detach().double().cpu().reshape(-1).tolist()
        z = zero_point.detach().cpu().long().reshape(-1).tolist()
        r = _lowbit.fake_quantize_per_channel_affine(a, s, z, axis, quant_min, quant_max, with_mask, bf16)
        if with_mask:
            return from_view(r[0], bf16), torch.from_numpy(r[1])
        return from_view(r, bf16), _empty_mask(x)
    return _torch_fake_quant_per_channel(x, scale, zero_point, axis, quant_min, quant_max, with_mask)


def _torch_fake_quant_per_channel(x: _Tensor, scale: _Tensor, zero_point: _Tensor, axis: int, quant_min: int,
                                  quant_max: int, with_mask: bool) -> tuple[_Tensor, _Tensor]:
    """The op on any device: ATen's own kernel (float32 scales, int32 zero points, as torch's)."""
    out, mask = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(
        x, scale.to(x.device, torch.float32), zero_point.to(x.device, torch.int32), axis % x.ndim, quant_min, quant_max)
    return out, (mask if with_mask else _empty_mask(x))


@fake_quant_per_tensor.register_fake
def _(x: _Tensor, scale: _Tensor, zero_point: _Tensor, quant_min: int, quant_max: int, with_mask: bool) -> tuple[_Tensor, _Tensor]:
    mask = torch.empty_like(x, dtype=torch.bool) if with_mask else _empty_mask(x)
    return torch.empty_like(x), mask


@fake_quant_per_channel.register_fake
def _(x: _Tensor, scale: _Tensor, zero_point: _Tensor, axis: int, quant_min: int, quant_max: int,
      with_mask: bool) -> tuple[_Tensor, _Tensor]:
    mask = torch.empty_like(x, dtype=torch.bool) if with_mask else _empty_mask(x)
    return torch.empty_like(x), mask


def _save_mask(ctx: Any, inputs: tuple, output: tuple) -> None:
    ctx.save_for_backward(output[1])


# ATen's fake_quantize_*_cachemask_backward: dY * mask.
def _tensor_backward(ctx: Any, grad: _Tensor, _grad_mask: Any) -> tuple:
    return (grad * ctx.saved_tensors[0],) + (None,) * 5


def _channel_backward(ctx: Any, grad: _Tensor, _grad_mask: Any) -> tuple:
    return (grad * ctx.saved_tensors[0],) + (None,) * 6


torch.library.register_autograd("lowbit::fake_quant_per_tensor", _tensor_backward, setup_context=_save_mask)
torch.library.register_autograd("lowbit::fake_quant_per_channel", _channel_backward, setup_context=_save_mask)


# ---------------------------------------------------------------------------------------------
# Learnable fake-quant (LSQ / LSQ+)


def _rounded_zero_points(zero_point: _Tensor, quant_min: int, quant_max: int) -> _Tensor:
    """The integer zero points ATen's learnable forward uses (and its per-channel backward):
    ``round()`` (half to even, as ``nearbyint``) then a clamp."""
    z = zero_point.detach().float()
    if bool(torch.isnan(z).any()):
        raise _lowbit.LowbitValueError("zero_point is NaN: it must be between quant_min and quant_max")
    return z.round().clamp(quant_min, quant_max)


@functools.cache
def _aten_fuses() -> bool:
    """Whether ATen's learnable fake-quant backward kernel was compiled with fused
    multiply-adds: its per-capability x86 builds (AVX2, AVX-512) and every aarch64 build are;
    x86's DEFAULT build (``ATEN_CPU_CAPABILITY=default``) is not."""
    import platform

    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    return not (x86 and torch.backends.cpu.get_cpu_capability() == "DEFAULT")


def _backward_zero_points(zero_point: _Tensor, axis: int | None, quant_min: int, quant_max: int) -> _Tensor:
    """The zero points ATen's learnable backward uses: per tensor ``trunc(clamp(zp + 0.5))``
    (not the forward's rounding), per channel ``round().clamp()``."""
    if axis is None:
        return (zero_point.detach().float() + 0.5).clamp(quant_min, quant_max).trunc()
    return _rounded_zero_points(zero_point, quant_min, quant_max)


@torch.library.custom_op("lowbit::learnable_fake_quant", mutates_args=())
def learnable_fake_quant(x: _Tensor, scale: _Tensor, zero_point: _Tensor, axis: int | None, quant_min: int, quant_max: int,
                         grad_factor: float) -> _Tensor:
    """``torch._fake_quantize_learnable_per_tensor_affine`` (``axis=None``) or
    ``_per_channel_affine``: the forward value, differentiable in ``x``, ``scale`` and ``zero_point``."""
    if x.device.type != "cpu":
        if axis is None:
            return torch._fake_quantize_learnable_per_tensor_affine(x, scale, zero_point, quant_min, quant_max, grad_factor)
        return torch._fake_quantize_learnable_per_channel_affine(x, scale, zero_point, axis, quant_min, quant_max, grad_factor)
    a, bf16 = tensor_view(x, "x")
    z = _rounded_zero_points(zero_point, quant_min, quant_max)
    if axis is None:
        r = _lowbit.fake_quantize_per_tensor_affine(a, float(scale.reshape(-1)[0]), int(z.reshape(-1)[0]), quant_min, quant_max, False, bf16)
    else:
        r = _lowbit.fake_quantize_per_channel_affine(a, scale.detach().double().reshape(-1).tolist(), z.long().tolist(), axis,
                                                     quant_min, quant_max, False, bf16)
    return from_view(r, bf16)


@learnable_fake_quant.register_fake
def _(x: _Tensor, scale: _Tensor, zero_point: _Tensor, axis: int | None, quant_min: int, quant_max: int,
      grad_factor: float) -> _Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("lowbit::learnable_fake_quant_backward", mutates_args=())
def learnable_fake_quant_backward(dy: _Tensor, x: _Tensor, scale: _Tensor, zero_point: _Tensor, axis: int | None,
                                  quant_min: int, quant_max: int, grad_factor: float) -> tuple[_Tensor, _Tensor, _Tensor]:
    """``(dx, dscale, dzero_point)`` exactly as ATen's learnable fake-quant backward returns them:
    the elementwise gradients from lowbit's kernel on contiguous float32 CPU tensors (ATen's
    own elsewhere), summed by torch per channel in ATen's order."""
    if axis is not None and x.ndim == 1:
        # ATen sums over no dimension as over all (and its autograd then refuses the scalar):
        # one element per channel has its own gradient, as a (n, 1) tensor gives.
        dx, ds, dz = learnable_fake_quant_backward(dy.unsqueeze(1), x.unsqueeze(1), scale, zero_point, 0, quant_min,
                                                   quant_max, grad_factor)
        return dx.squeeze(1), ds, dz
    if not quant_min <= 0 <= quant_max:
        raise _lowbit.LowbitValueError(f"the quantization range [{quant_min}, {quant_max}] must include 0 for the "
                                       "learnable fake-quant backward (as torch requires)")
    # ATen's elementwise gradients take x's memory layout (so do its sums); dy's does not matter.
    fast = (x.device.type == "cpu" and x.dtype == torch.float32 and dy.dtype == torch.float32
            and x.is_contiguous() and x.numel() > 0)
    dy = dy.contiguous() if fast else dy
    if not fast:
        if axis is None:
            r = torch.ops.aten._fake_quantize_learnable_per_tensor_affine_backward(
                dy, x, scale, zero_point, quant_min, quant_max, grad_factor)
        else:
            r = torch.ops.aten._fake_quantize_learnable_per_channel_affine_backward(
                dy, x, scale, zero_point, axis, quant_min, quant_max, grad_factor)
        dx, ds, dz = r
        # ATen hands back its inputs themselves for an empty x: an op's outputs may not alias them.
        return dx.clone(), ds.clone(), dz.clone()
    z = _backward_zero_points(zero_point, axis, quant_min, quant_max)
    dx, ds, dz = _lowbit.fake_quantize_learnable_grad(
        x.detach().numpy(), dy.detach().numpy(), scale.detach().float().reshape(-1).tolist(), z.reshape(-1).tolist(),
        axis, quant_min, quant_max, float(grad_factor), _aten_fuses())
    ds_t, dz_t = torch.from_numpy(ds), torch.from_numpy(dz)
    if axis is None:
        return torch.from_numpy(dx), ds_t.sum().unsqueeze(0), dz_t.sum().unsqueeze(0)
    dims = [d for d in range(x.ndim) if d != axis]
    return torch.from_numpy(dx), ds_t.sum(dims), dz_t.sum(dims)


@learnable_fake_quant_backward.register_fake
def _(dy: _Tensor, x: _Tensor, scale: _Tensor, zero_point: _Tensor, axis: int | None, quant_min: int, quant_max: int,
      grad_factor: float) -> tuple[_Tensor, _Tensor, _Tensor]:
    n = 1 if axis is None else x.shape[axis]
    return torch.empty_like(x, dtype=torch.float32), x.new_empty((n,), dtype=torch.float32), x.new_empty((n,), dtype=torch.float32)


def _setup_learnable(ctx: Any, inputs: tuple, output: _Tensor) -> None:
    x, scale, zero_point, ctx.axis, ctx.quant_min, ctx.quant_max, ctx.grad_factor = inputs
    ctx.save_for_backward(x, scale, zero_point)


def _learnable_backward(ctx: Any, grad: _Tensor) -> tuple:
    x, scale, zero_point = ctx.saved_tensors
    dx, ds, dz = learnable_fake_quant_backward(grad, x, scale, zero_point, ctx.axis, ctx.quant_min, ctx.quant_max,
                                               ctx.grad_factor)
    return dx.to(x.dtype), ds.to(scale.dtype), dz.to(zero_point.dtype), None, None, None, None


torch.library.register_autograd("lowbit::learnable_fake_quant", _learnable_backward, setup_context=_setup_learnable)


# ---------------------------------------------------------------------------------------------
# Integer codes and back (not differentiable, as torch's quantize / dequantize)


def _float32_numpy(x: _Tensor) -> Any:
    import numpy as np

    a, bf16 = tensor_view(x, "x")
    return a.view(np.uint16).astype(np.uint32).__lshift__(16).view(np.float32) if bf16 else a


def _probe(shape: tuple, axis: int | None) -> Any:
    """An empty float32 array with ``shape``'s channel count along ``axis``: the core's checks of
    the arguments run on it (the same errors as on the CPU) before another device computes."""
    import numpy as np

    dims = [0] * max(len(shape), 1)
    if axis is not None and -len(shape) <= axis < len(shape):
        dims[axis] = shape[axis]
    return np.empty(dims, np.float32)


def _qdtype(quant_min: int) -> torch.dtype:
    return torch.qint8 if quant_min < 0 else torch.quint8


@torch.library.custom_op("lowbit::quantize_per_tensor", mutates_args=())
def quantize_per_tensor(x: _Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int) -> _Tensor:
    """int8 / uint8 codes, ``torch.quantize_per_tensor(x, ...).int_repr()`` clamped to the range."""
    if x.device.type == "cpu":
        return torch.from_numpy(_lowbit.quantize_per_tensor(_float32_numpy(x), scale, zero_point, quant_min, quant_max))
    _lowbit.quantize_per_tensor(_probe(tuple(x.shape), None), scale, zero_point, quant_min, quant_max)
    if x.device.type == "meta":
        return _codes_like(x, quant_min)
    return _torch_quantize_per_tensor(x, scale, zero_point, quant_min, quant_max)


def _torch_quantize_per_tensor(x: _Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int) -> _Tensor:
    q = torch.quantize_per_tensor(x.float(), scale, zero_point, _qdtype(quant_min)).int_repr()
    return q.clamp(quant_min, quant_max)


@torch.library.custom_op("lowbit::quantize_per_channel", mutates_args=())
def quantize_per_channel(x: _Tensor, scales: _Tensor, zero_points: _Tensor, axis: int, quant_min: int, quant_max: int) -> _Tensor:
    """Per-channel int8 / uint8 codes along ``axis`` (``scales`` float64, ``zero_points`` int64)."""
    s, z = scales.detach().cpu().double().tolist(), zero_points.detach().cpu().long().tolist()
    if x.device.type == "cpu":
        return torch.from_numpy(_lowbit.quantize_per_channel(_float32_numpy(x), s, z, axis, quant_min, quant_max))
    _lowbit.quantize_per_channel(_probe(tuple(x.shape), axis), s, z, axis, quant_min, quant_max)
    if x.device.type == "meta":
        return _codes_like(x, quant_min)
    return _torch_quantize_per_channel(x, scales, zero_points, axis, quant_min, quant_max)


def _torch_quantize_per_channel(x: _Tensor, scales: _Tensor, zero_points: _Tensor, axis: int, quant_min: int,
                                quant_max: int) -> _Tensor:
    q = torch.quantize_per_channel(x.float(), scales.to(x.device, torch.float64), zero_points.to(x.device, torch.int64),
                                   axis % x.ndim, _qdtype(quant_min)).int_repr()
    return q.clamp(quant_min, quant_max)


@torch.library.custom_op("lowbit::dequantize_per_tensor", mutates_args=())
def dequantize_per_tensor(q: _Tensor, scale: float, zero_point: int) -> _Tensor:
    """float32 ``(q - zero_point) * scale`` of int8 / uint8 codes, as torch's dequantize."""
    if q.device.type == "cpu":
        return torch.from_numpy(_lowbit.dequantize_per_tensor(q.detach().numpy(), scale, zero_point))
    import numpy as np

    _lowbit.dequantize_per_tensor(np.empty((0,), np.int8 if q.dtype == torch.int8 else np.uint8), scale, zero_point)
    if q.device.type == "meta":
        return torch.empty_like(q, dtype=torch.float32)
    return _torch_dequantize_per_tensor(q, scale, zero_point)


def _torch_dequantize_per_tensor(q: _Tensor, scale: float, zero_point: int) -> _Tensor:
    return torch._make_per_tensor_quantized_tensor(q, scale, zero_point).dequantize()


@torch.library.custom_op("lowbit::dequantize_per_channel", mutates_args=())
def dequantize_per_channel(q: _Tensor, scales: _Tensor, zero_points: _Tensor, axis: int) -> _Tensor:
    """float32 ``(q - zero_points[c]) * scales[c]`` along ``axis``."""
    s, z = scales.detach().cpu().double().tolist(), zero_points.detach().cpu().long().tolist()
    if q.device.type == "cpu":
        return torch.from_numpy(_lowbit.dequantize_per_channel(q.detach().numpy(), s, z, axis))
    import numpy as np

    probe = _probe(tuple(q.shape), axis).astype(np.int8 if q.dtype == torch.int8 else np.uint8)
    _lowbit.dequantize_per_channel(probe, s, z, axis)
    if q.device.type == "meta":
        return torch.empty_like(q, dtype=torch.float32)
    return _torch_dequantize_per_channel(q, scales, zero_points, axis)


def _torch_dequantize_per_channel(q: _Tensor, scales: _Tensor, zero_points: _Tensor, axis: int) -> _Tensor:
    return torch._make_per_channel_quantized_tensor(q, scales.to(q.device, torch.float64),
                                                    zero_points.to(q.device, torch.int64), axis % q.ndim).dequantize()


def _codes_like(x: _Tensor, quant_min: int) -> _Tensor:
    return torch.empty_like(x, dtype=torch.int8 if quant_min < 0 else torch.uint8)


@quantize_per_tensor.register_fake
def _(x: _Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int) -> _Tensor:
    return _codes_like(x, quant_min)


@quantize_per_channel.register_fake
def _(x: _Tensor, scales: _Tensor, zero_points: _Tensor, axis: int, quant_min: int, quant_max: int) -> _Tensor:
    return _codes_like(x, quant_min)


@dequantize_per_tensor.register_fake
def _(q: _Tensor, scale: float, zero_point: int) -> _Tensor:
    return torch.empty_like(q, dtype=torch.float32)


@dequantize_per_channel.register_fake
def _(q: _Tensor, scales: _Tensor, zero_points: _Tensor, axis: int) -> _Tensor:
    return torch.empty_like(q, dtype=torch.float32)
