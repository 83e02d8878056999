"""Learnable fake-quant (LSQ / LSQ+): value and the gradients of x, scale and zero point equal
``torch._fake_quantize_learnable_per_{tensor,channel}_affine`` bit for bit, on random and
degenerate inputs, and the module trains."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lowbit
import lowbit.torch as lt
from conftest import adversarial
from upstream._reference import assert_bits_equal

RANGES = [(-2, 1), (0, 3), (-4, 3), (0, 7), (-8, 7), (0, 15), (-32, 31), (0, 63), (-128, 127), (0, 255)]


def _run(fn, x, scale, zp, *args, dy=None):
    """Value and the three gradients of ``fn`` (lowbit's or torch's) on fresh leaves."""
    x, s, z = (t.detach().clone().requires_grad_() for t in (x, scale, zp))
    y = fn(x, s, z, *args)
    y.backward(torch.ones_like(y) if dy is None else dy)
    return y.detach(), x.grad, s.grad, z.grad


def _same(a, b):
    for u, v in zip(a, b):
        assert_bits_equal(u, v)


@pytest.mark.parametrize("qmin,qmax", RANGES)
@pytest.mark.parametrize("grad_factor", [0.1, 1.0, 10.0, 1 / math.sqrt(4000 * 7)])
def test_per_tensor_equals_torch_bit_for_bit(qmin, qmax, grad_factor):
    g = torch.Generator().manual_seed(qmax * 7 + int(grad_factor * 10))
    for zp in (0.0, 0.5, 1.5, -0.5, 2.49, float(qmin), float(qmax), qmax + 3.0, qmin - 2.7):
        scale = torch.tensor([0.05])
        x = torch.from_numpy(adversarial(0.05, 2000, seed=qmax))
        dy = torch.randn(x.shape, generator=g) * 3
        dy[:7] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, -2.0])
        z = torch.tensor([zp])
        args = (qmin, qmax, grad_factor)
        _same(_run(lt.fake_quantize_learnable_per_tensor_affine, x, scale, z, *args, dy=dy),
              _run(torch._fake_quantize_learnable_per_tensor_affine, x, scale, z, *args, dy=dy))


@pytest.mark.parametrize("qmin,qmax", RANGES[::2])
@pytest.mark.parametrize("shape,axis", [((6, 33), 0), ((6, 33), 1), ((3, 5, 7), 1), ((2, 3, 4, 5), 3), ((40,), 0)])
def test_per_channel_equals_torch_bit_for_bit(qmin, qmax, shape, axis):
    g = torch.Generator().manual_seed(len(shape) * 100 + axis + qmax)
    c = shape[axis]
    x = torch.randn(shape, generator=g) * 2
    x.view(-1)[:5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -0.0])
    scale = torch.rand(c, generator=g) * 0.2 + 1e-3
    zp = (torch.rand(c, generator=g) * (qmax - qmin) + qmin).round() + torch.tensor([0.0, 0.5, -0.5, 0.3] * c)[:c]
    zp = zp.clamp(qmin, qmax)
    dy = torch.randn(shape, generator=g)
    for grad_factor in (1.0, 0.37):
        args = (axis, qmin, qmax, grad_factor)
        ours = _run(lt.fake_quantize_learnable_per_channel_affine, x, scale, zp, *args, dy=dy)
        if x.ndim == 1:
            # torch's backward fails on 1-D input (it sums over no dimension as over all, and its
            # autograd refuses the scalar); lowbit gives each channel its element's gradient,
            # which is torch's on the (n, 1) tensor.
            theirs = _run(torch._fake_quantize_learnable_per_channel_affine, x[:, None], scale, zp, *args, dy=dy[:, None])
            theirs = (theirs[0][:, 0], theirs[1][:, 0], theirs[2], theirs[3])
        else:
            theirs = _run(torch._fake_quantize_learnable_per_channel_affine, x, scale, zp, *args, dy=dy)
        _same(ours, theirs)


@pytest.mark.parametrize("per_channel", [False, True])
def test_large_tensors_match_torch_through_the_parallel_kernel(per_channel):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(257, 1031, generator=g)
    dy = torch.randn(257, 1031, generator=g)
    if per_channel:
        s, z = torch.rand(257, generator=g) * 0.05 + 0.01, torch.full((257,), 3.0)
        args: tuple = (0, -8, 7, 0.01)
        ours, theirs = lt.fake_quantize_learnable_per_channel_affine, torch._fake_quantize_learnable_per_channel_affine
    else:
        s, z = torch.tensor([0.02]), torch.tensor([-1.0])
        args = (-8, 7, 0.01)
        ours, theirs = lt.fake_quantize_learnable_per_tensor_affine, torch._fake_quantize_learnable_per_tensor_affine
    _same(_run(ours, x, s, z, *args, dy=dy), _run(theirs, x, s, z, *args, dy=dy))


@pytest.mark.parametrize("layout", ["transposed", "strided", "empty", "zero_dim_channel"])
def test_degenerate_layouts_match_torch(layout):
    g = torch.Generator().manual_seed(9)
    base = torch.randn(12, 10, generator=g)
    x = {"transposed": base.T, "strided": base[::2, ::3], "empty": base[:0], "zero_dim_channel": base[:, :0]}[layout]
    s, z = torch.tensor([0.1]), torch.tensor([2.0])
    _same(_run(lt.fake_quantize_learnable_per_tensor_affine, x, s, z, -8, 7, 1.0),
          _run(torch._fake_quantize_learnable_per_tensor_affine, x, s, z, -8, 7, 1.0))
    if x.shape[0]:
        c = x.shape[0]
        sc, zc = torch.rand(c, generator=g) * 0.1 + 0.01, torch.zeros(c)
        _same(_run(lt.fake_quantize_learnable_per_channel_affine, x, sc, zc, 0, -8, 7, 1.0),
              _run(torch._fake_quantize_learnable_per_channel_affine, x, sc, zc, 0, -8, 7, 1.0))


def test_constant_and_one_sided_inputs_match_torch():
    s, z = torch.tensor([0.1]), torch.tensor([0.0])
    for x in (torch.full((100,), 7.0), torch.full((100,), -7.0), torch.zeros(100), torch.rand(100) + 1.0,
              torch.full((100,), 1e-30), torch.linspace(0.0, 1e-6, 100)):
        _same(_run(lt.fake_quantize_learnable_per_tensor_affine, x, s, z, 0, 15, 1.0),
              _run(torch._fake_quantize_learnable_per_tensor_affine, x, s, z, 0, 15, 1.0))


def test_bad_arguments_are_lowbit_errors():
    x = torch.randn(4, 3)
    f = lt.fake_quantize_learnable_per_tensor_affine
    with pytest.raises(lowbit.LowbitTypeError):
        f(x, 0.1, torch.tensor([0.0]), -8, 7)
    with pytest.raises(lowbit.LowbitValueError):
        f(x, torch.tensor([0.1, 0.2]), torch.tensor([0.0]), -8, 7)
    with pytest.raises(lowbit.LowbitValueError):
        f(x, torch.tensor([0.1]), torch.tensor([float("nan")]), -8, 7)
    with pytest.raises(lowbit.LowbitValueError):
        f(x, torch.tensor([0.0]), torch.tensor([0.0]), -8, 7)
    with pytest.raises(lowbit.LowbitValueError):
        lt.fake_quantize_learnable_per_channel_affine(x, torch.ones(3), torch.zeros(3), 0, -8, 7)
    with pytest.raises(lowbit.LowbitValueError):
        lt.fake_quantize_learnable_per_channel_affine(x, torch.ones(3), torch.zeros(3), 2, -8, 7)
    s = torch.tensor([0.1], requires_grad=True)
    y = f(x, s, torch.tensor([1.0]), 1, 7)   # the forward runs, as torch's does
    with pytest.raises(lowbit.LowbitValueError, match="include 0"):
        y.sum().backward()                   # the backward needs quant_min <= 0 <= quant_max
    with pytest.raises(lowbit.LowbitValueError):
        lt.LearnableFakeQuantize(1, 7)


@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("learn_zero_point", [False, True])
def test_module_equals_the_op_and_learns(axis, learn_zero_point):
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    fq = lt.LearnableFakeQuantize.from_tensor(w, bits=4, symmetric=False, axis=axis, learn_zero_point=learn_zero_point)
    assert fq.zero_point.requires_grad == learn_zero_point
    x = w.clone().requires_grad_()
    y = fq(x)
    g = 1.0 / math.sqrt(x.numel() * fq.quant_max)
    s, z = fq.scale.detach().clone().requires_grad_(), fq.zero_point.detach().clone().requires_grad_()
    xr = w.clone().requires_grad_()
    if axis is None:
        yr = torch._fake_quantize_learnable_per_tensor_affine(xr, s, z, fq.quant_min, fq.quant_max, g)
    else:
        yr = torch._fake_quantize_learnable_per_channel_affine(xr, s, z, axis, fq.quant_min, fq.quant_max, g)
    assert_bits_equal(y.detach(), yr.detach())
    y.sum().backward()
    yr.sum().backward()
    assert_bits_equal(x.grad, xr.grad)
    assert_bits_equal(fq.scale.grad, s.grad)
    if learn_zero_point:
        assert_bits_equal(fq.zero_point.grad, z.grad)
    else:
        assert fq.zero_point.grad is None
    # A few steps of SGD on the reconstruction error lower it.
    opt = torch.optim.SGD(fq.parameters(), lr=0.01)
    target = torch.randn(8, 64)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (fq(target) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_module_quantizes_half_inputs_in_float32(dtype):
    torch.manual_seed(1)
    x = torch.randn(16, 32).to(dtype).requires_grad_()
    fq = lt.LearnableFakeQuantize.from_tensor(x.float(), bits=8)
    y = fq(x)
    assert y.dtype == dtype
    ref = torch._fake_quantize_learnable_per_tensor_affine(x.detach().float(), fq.scale.detach(), fq.zero_point.detach(), -128, 127, 1.0)
    assert_bits_equal(y.detach(), ref.to(dtype))
    y.float().sum().backward()
    assert x.grad.dtype == dtype and fq.scale.grad is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fq(torch.randn(4, 32)).dtype == torch.float32


def test_module_state_dict_and_disable():
    fq = lt.LearnableFakeQuantize(-8, 7, scale=[0.1, 0.2], zero_point=[0.0, 1.0], axis=1)
    fq2 = lt.LearnableFakeQuantize(-8, 7, scale=[1.0, 1.0], zero_point=[0.0, 0.0], axis=1)
    fq2.load_state_dict(fq.state_dict())
    x = torch.randn(3, 2)
    assert_bits_equal(fq(x), fq2(x))
    fq.enabled = False
    assert fq(x) is x
    assert "per_channel(axis=1)" in repr(fq)
    np.testing.assert_array_equal(fq2.scale.detach().numpy(), np.float32([0.1, 0.2]))
