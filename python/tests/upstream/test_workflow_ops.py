"""PyTorch's ``test/quantization/core/test_workflow_ops.py`` (``TestFakeQuantizeOps`` and
``TestFusedObsFakeQuant``), adapted: every test runs the ``torch`` op and lowbit's on the same
input and asserts what the upstream test asserts, bit for bit where lowbit claims bit-exactness
(fake-quant, quantize / dequantize, torch.ao's observer qparams).

The learnable (LSQ) tests run lowbit's learnable fake-quant against torch's, bit for bit, and
against the upstream float reference. lowbit has no fused observer + fake-quant op; the
fused-op tests compare the fused op with a lowbit observer followed by lowbit's fake-quant.
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lowbit
import lowbit.calib as lc
import lowbit.torch as lt

from ._reference import (
    dtype_id,
    QRANGES,
    TOLERANCE,
    array_shapes,
    assert_bits_equal,
    fq_per_channel_grad_reference,
    fq_per_channel_reference,
    fq_per_tensor_grad_reference,
    fq_per_tensor_reference,
    per_channel_tensor,
    qparams,
    tensor,
)

pytestmark = pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max:UserWarning")

NP_RANDOM_SEED = 19
FAST = settings(max_examples=30, deadline=None)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class TestFakeQuantizeOps:
    @given(X=tensor(shapes=array_shapes(1, 5), qparams=qparams(dtypes=torch.quint8)))
    @FAST
    def test_forward_per_tensor(self, X):
        """test_workflow_ops.py::TestFakeQuantizeOps::test_forward_per_tensor: torch and lowbit
        (tensor and NumPy in) bit-identical, and within the upstream tolerance of the float reference."""
        x, (scale, zp, qdtype) = X
        qmin, qmax = QRANGES[qdtype]
        x = torch.from_numpy(x)
        want = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
        got = lowbit.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
        assert_bits_equal(got, want)
        assert_bits_equal(lowbit.fake_quantize_per_tensor_affine(x.numpy(), scale, zp, qmin, qmax), want.numpy())
        ref = fq_per_tensor_reference(x, scale, zp, qmin, qmax)
        np.testing.assert_allclose(ref, got, rtol=TOLERANCE, atol=TOLERANCE)

    @given(
        data=st.data(),
        bits=st.integers(2, 8),
        signed=st.booleans(),
        shape=array_shapes(1, 3, max_side=10),
    )
    @FAST
    def test_forward_per_tensor_quant_ranges(self, data, bits, signed, shape):
        """test_workflow_ops.py::TestFakeQuantizeOps::test_forward_per_tensor over every bit
        width 2..8, signed and unsigned, any zero point in range, scales from 1e-6 to 1e3, and
        values that include ±Inf, NaN and exact .5 ties (lowbit claims torch's bits on all of them)."""
        qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        zp = data.draw(st.integers(qmin, qmax))
        scale = data.draw(st.floats(float(np.float32(1e-6)), 1e3, width=32))
        ties = (np.arange(-40, 40, dtype=np.float32) + 0.5) * np.float32(scale)
        rnd = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(width=32, allow_nan=True, allow_infinity=True)))
        x = torch.from_numpy(np.concatenate([ties, rnd.ravel()]))
        want, want_mask = torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(x, scale, zp, qmin, qmax)
        got, got_mask = lowbit.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax, return_mask=True)
        assert_bits_equal(got, want)
        assert_bits_equal(got_mask, want_mask)

    @given(X=tensor(shapes=array_shapes(1, 5), qparams=qparams(dtypes=torch.quint8)))
    @FAST
    def test_backward_per_tensor(self, X):
        """test_workflow_ops.py::TestFakeQuantizeOps::test_backward_per_tensor (skipped upstream,
        run here): lowbit's straight-through gradient equals torch's and the reference's."""
        x, (scale, zp, qdtype) = X
        qmin, qmax = QRANGES[qdtype]
        xt = torch.from_numpy(x).requires_grad_()
        xl = torch.from_numpy(x.copy()).requires_grad_()
        dout = torch.rand(xt.shape, generator=_gen(NP_RANDOM_SEED))
        torch.fake_quantize_per_tensor_affine(xt, scale, zp, qmin, qmax).backward(dout)
        lowbit.fake_quantize_per_tensor_affine(xl, scale, zp, qmin, qmax).backward(dout)
        assert_bits_equal(xl.grad, xt.grad)
        ref = fq_per_tensor_grad_reference(dout, xl.detach(), scale, zp, qmin, qmax)
        np.testing.assert_allclose(ref, xl.grad, rtol=TOLERANCE, atol=TOLERANCE)

    def test_forward_per_tensor_half_precision_numerics(self):
        """test_workflow_ops.py::TestFakeQuantizeOps::test_forward_per_tensor_half_precision_numerics:
        float16 inputs, one that overflows the code range (2**15 + .01) and one that underflows
        (2**-24 at scale 10); lowbit equals torch bit for bit and the reference within tolerance."""
        scale, zero, mini, maxi = 0.1, 0, 0, 255
        g = _gen(NP_RANDOM_SEED)
        cases = [torch.randn(5, 5, generator=g).to(torch.float16) for _ in range(20)]
        cases.append(torch.tensor(2**15 + 0.01).to(torch.float16))
        for x in cases:
            got = lowbit.fake_quantize_per_tensor_affine(x, scale, zero, mini, maxi)
            assert_bits_equal(got, torch.fake_quantize_per_tensor_affine(x, scale, zero, mini, maxi))
            torch.testing.assert_close(got, fq_per_tensor_reference(x, scale, zero, mini, maxi), rtol=TOLERANCE, atol=TOLERANCE)
        x3 = torch.tensor(2**-24).to(torch.float16)
        got = lowbit.fake_quantize_per_tensor_affine(x3, 10, zero, mini, maxi)
        assert_bits_equal(got, torch.fake_quantize_per_tensor_affine(x3, 10, zero, mini, maxi))
        torch.testing.assert_close(got, fq_per_tensor_reference(x3, 10, zero, mini, maxi), rtol=TOLERANCE, atol=TOLERANCE)

    @pytest.mark.parametrize("float_type", [torch.float32, torch.float16, torch.float64, torch.bfloat16], ids=dtype_id)
    def test_forward_per_tensor_cachemask_cpu(self, float_type):
        """test_workflow_ops.py::TestFakeQuantizeOps::test_forward_per_tensor_cachemask_cpu: qparams
        from a MinMaxObserver on 0.75 * X (so some values clip), qint8 and quint8, a contiguous and a
        non-contiguous X, tensor and Python qparams; output, dtype and straight-through mask
        bit-identical to torch's cachemask op."""
        g = _gen(NP_RANDOM_SEED)
        xs = (torch.randn(4, 8, generator=g), torch.randn(4, 16, generator=g)[:, ::2])
        for qdtype, x, tensor_qparam in itertools.product((torch.qint8, torch.quint8), xs, (True, False)):
            x = x.to(float_type)
            obs = torch.ao.quantization.MinMaxObserver(qdtype)
            obs(x * 0.75)
            scale, zp = obs.calculate_qparams()
            qmin, qmax = obs.quant_min, obs.quant_max
            if not tensor_qparam:
                scale, zp = float(scale), int(zp)
            want = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
            got, mask = lowbit.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax, return_mask=True)
            assert got.dtype == float_type
            assert_bits_equal(got, want)
            _, want_mask = torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(x, float(scale), int(zp), qmin, qmax)
            assert_bits_equal(mask, want_mask)
            torch.testing.assert_close(got, fq_per_tensor_reference(x, scale, zp, qmin, qmax), rtol=TOLERANCE, atol=TOLERANCE)

    @pytest.mark.parametrize("float_type", [torch.float32, torch.float16, torch.float64], ids=dtype_id)
    def test_backward_per_tensor_cachemask_cpu(self, float_type):
        """test_workflow_ops.py::TestFakeQuantizeOps::test_backward_per_tensor_cachemask_cpu: forward
        and gradient bit-identical to torch's, the gradient in the input's dtype."""
        g = _gen(NP_RANDOM_SEED)
        for qdtype, tensor_qparam in itertools.product((torch.qint8, torch.quint8), (True, False)):
            x = torch.randn(4, 8, generator=g).to(float_type)
            obs = torch.ao.quantization.MinMaxObserver(qdtype)
            obs(x * 0.75)
            scale, zp = obs.calculate_qparams()
            if not tensor_qparam:
                scale, zp = float(scale), int(zp)
            qmin, qmax = obs.quant_min, obs.quant_max
            xt, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
            yt = torch.fake_quantize_per_tensor_affine(xt, scale, zp, qmin, qmax)
            yl = lowbit.fake_quantize_per_tensor_affine(xl, scale, zp, qmin, qmax)
            assert_bits_equal(yl.detach(), yt.detach())
            dout = torch.rand(x.shape, generator=g)
            yt.backward(dout)
            yl.backward(dout)
            assert xl.grad.dtype == float_type
            assert_bits_equal(xl.grad, xt.grad)
            torch.testing.assert_close(xl.grad, fq_per_tensor_grad_reference(dout, x, scale, zp, qmin, qmax))

    @staticmethod
    def _learnable_grad_reference(dy, x, scale, zp, qmin, qmax, axis=None):
        """PyTorch's _fake_quantize_learnable_per_{tensor,channel}_affine_grad_reference: the
        LSQ gradients in float arithmetic, before grad_factor (with the roundings of the ATen
        build torch runs, see below)."""
        if axis is not None:
            shape = [1] * x.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), zp.round().clamp(qmin, qmax).reshape(shape)
        else:
            zp = (zp + 0.5).clamp(qmin, qmax).trunc()
        from lowbit._ops import _aten_fuses

        inv = 1.0 / scale
        if _aten_fuses():
            # ATen's FMA builds round zp + x * inv, and x̂ - x, once: exact in float64, then
            # rounded to float32 (the upstream reference rounds twice; summed over many
            # elements the two differ beyond its tolerance when x̂ - x is tiny).
            xq = torch.round((x.double() * inv.double() + zp.double()).float())
            err = ((xq.clamp(qmin, qmax) - zp).double() * scale.double() - x.double()).float()
        else:
            xq = torch.round(x * inv + zp)
            err = (xq.clamp(qmin, qmax) - zp) * scale - x
        inside = (xq >= qmin) & (xq <= qmax)
        dx = torch.where(inside, dy, torch.zeros_like(dy))
        ds = torch.where(inside, err * inv, torch.where(xq < qmin, qmin - zp, qmax - zp)) * dy
        dz = torch.where(inside, torch.zeros_like(x), -scale.expand_as(x)) * dy
        dims = None if axis is None else [d for d in range(x.ndim) if d != axis]
        return dx, (ds.sum() if dims is None else ds.sum(dims)), (dz.sum() if dims is None else dz.sum(dims))

    @given(X=tensor(shapes=array_shapes(1, 5), elements=st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32),
                    qparams=qparams(dtypes=torch.quint8)))
    @FAST
    def test_learnable_forward_per_tensor_cpu(self, X):
        """test_workflow_ops.py::TestFakeQuantizeOps::test_learnable_forward_per_tensor_cpu: at 4
        and 8 bits and grad_factor 0.1 / 1 / 10, lowbit's learnable forward equals torch's bit for
        bit and the float reference within the upstream tolerance."""
        x, _ = X
        g = _gen(NP_RANDOM_SEED)
        scale = torch.normal(0.0, 1.0, (1,), generator=g).clamp(1e-4, 100)
        zp0 = torch.normal(0.0, 128.0, (1,), generator=g).to(torch.int64)
        x = torch.from_numpy(x).float()
        for bits in (4, 8):
            qmin, qmax = 0, 2**bits - 1
            zp = zp0.clamp(qmin, qmax).float()
            ref = fq_per_tensor_reference(x, float(scale), float(zp), qmin, qmax)
            for grad_factor in (0.1, 1.0, 10.0):
                ours = lt.fake_quantize_learnable_per_tensor_affine(x, scale, zp, qmin, qmax, grad_factor)
                assert_bits_equal(ours, torch._fake_quantize_learnable_per_tensor_affine(x, scale, zp, qmin, qmax, grad_factor))
                torch.testing.assert_close(ours, ref, rtol=TOLERANCE, atol=TOLERANCE)

    @given(X=tensor(shapes=array_shapes(1, 5), elements=st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32),
                    qparams=qparams(dtypes=torch.quint8)))
    @FAST
    def test_learnable_backward_per_tensor_cpu(self, X):
        """test_workflow_ops.py::TestFakeQuantizeOps::test_learnable_backward_per_tensor_cpu: the
        gradients of x, scale and zero point equal torch's bit for bit and the upstream float
        reference (times grad_factor) within its tolerance."""
        x0, _ = X
        g = _gen(NP_RANDOM_SEED)
        scale0 = torch.normal(0.0, 1.0, (1,), generator=g).clamp(1e-4, 100)
        zp0 = torch.normal(0.0, 128.0, (1,), generator=g)
        for bits in (4, 8):
            qmin, qmax = 0, 2**bits - 1
            for grad_factor in (0.1, 1.0, 10.0):
                dout = torch.rand(x0.shape, generator=g)
                grads = []
                for fn in (lt.fake_quantize_learnable_per_tensor_affine, torch._fake_quantize_learnable_per_tensor_affine):
                    x = torch.from_numpy(x0).float().requires_grad_()
                    s, z = scale0.clone().requires_grad_(), zp0.clone().clamp(qmin, qmax).requires_grad_()
                    fn(x, s, z, qmin, qmax, grad_factor).backward(dout)
                    grads.append((x.grad, s.grad, z.grad))
                for a, b in zip(*grads):
                    assert_bits_equal(a, b)
                x = torch.from_numpy(x0).float()
                dx, ds, dz = self._learnable_grad_reference(dout, x, scale0, zp0.clamp(qmin, qmax), qmin, qmax)
                torch.testing.assert_close(grads[0][0], dx, rtol=TOLERANCE, atol=TOLERANCE)
                torch.testing.assert_close(grads[0][1], (ds * grad_factor).reshape(1), rtol=1e-4, atol=1e-3)
                torch.testing.assert_close(grads[0][2], (dz * grad_factor).reshape(1), rtol=1e-4, atol=1e-3)

    @given(X=per_channel_tensor(shapes=array_shapes(1, 5), elements=st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32),
                                qparams=qparams(dtypes=torch.quint8)))
    @FAST
    def test_learnable_per_channel_cpu(self, X):
        """test_workflow_ops.py::TestFakeQuantizeOps::test_learnable_forward_per_channel_cpu and
        test_learnable_backward_per_channel_cpu: value and the three gradients equal torch's bit for
        bit, and the float reference within the upstream tolerance."""
        x0, (_, _, axis, _) = X
        if x0.ndim == 1:
            return  # torch's per-channel backward fails on 1-D input (see test_lsq.py)
        g = _gen(NP_RANDOM_SEED)
        c = x0.shape[axis]
        scale0 = torch.normal(0.0, 1.0, (c,), generator=g).clamp(1e-4, 100)
        zp0 = torch.normal(0.0, 128.0, (c,), generator=g)
        for bits in (4, 8):
            qmin, qmax = 0, 2**bits - 1
            for grad_factor in (0.1, 1.0, 10.0):
                dout = torch.rand(x0.shape, generator=g)
                runs = []
                for fn in (lt.fake_quantize_learnable_per_channel_affine, torch._fake_quantize_learnable_per_channel_affine):
                    x = torch.from_numpy(x0).float().requires_grad_()
                    s, z = scale0.clone().requires_grad_(), zp0.clone().clamp(qmin, qmax).requires_grad_()
                    y = fn(x, s, z, axis, qmin, qmax, grad_factor)
                    y.backward(dout)
                    runs.append((y.detach(), x.grad, s.grad, z.grad))
                for a, b in zip(*runs):
                    assert_bits_equal(a, b)
                x = torch.from_numpy(x0).float()
                zr = zp0.clamp(qmin, qmax).round()
                ref = fq_per_channel_reference(x, scale0, zr.to(torch.int64), axis, qmin, qmax)
                torch.testing.assert_close(runs[0][0], ref, rtol=TOLERANCE, atol=TOLERANCE)
                dx, ds, dz = self._learnable_grad_reference(dout, x, scale0, zp0.clamp(qmin, qmax), qmin, qmax, axis)
                torch.testing.assert_close(runs[0][1], dx, rtol=TOLERANCE, atol=TOLERANCE)
                torch.testing.assert_close(runs[0][2], ds * grad_factor, rtol=1e-4, atol=1e-3)
                torch.testing.assert_close(runs[0][3], dz * grad_factor, rtol=1e-4, atol=1e-3)

    @given(X=tensor(shapes=array_shapes(1, 5), qparams=qparams(dtypes=torch.quint8)))
    @FAST
    def test_fq_module_per_tensor(self, X):
        """test_workflow_ops.py::TestFakeQuantizeOps::test_fq_module_per_tensor: torch's
        default_fake_quant (MovingAverageMinMaxObserver, quint8 with reduce_range, so codes 0..127)
        against lowbit's MovingAverageMinMaxObserver(bits=7) + lowbit.torch.FakeQuantize: the same
        qparams, forward and gradient bit for bit, and the references within tolerance."""
        x, _ = X
        xt = torch.from_numpy(x).requires_grad_()
        xl = torch.from_numpy(x.copy()).requires_grad_()
        fq_module = torch.ao.quantization.default_fake_quant()
        qmin, qmax = fq_module.quant_min, fq_module.quant_max
        yt = fq_module(xt)
        obs = lc.MovingAverageMinMaxObserver(averaging_constant=0.01, bits=7)
        assert (obs.quant_min, obs.quant_max) == (qmin, qmax)
        obs.update(xl)
        scale, zp = obs.qparams()
        assert (scale, zp) == (fq_module.scale.item(), fq_module.zero_point.item())
        yl = lt.FakeQuantize(qmin, qmax, scale, zp)(xl)
        assert_bits_equal(yl.detach(), yt.detach())
        np.testing.assert_allclose(fq_per_tensor_reference(xl.detach(), scale, zp, qmin, qmax), yl.detach(), rtol=TOLERANCE, atol=TOLERANCE)
        dout = torch.rand(xt.shape, generator=_gen(NP_RANDOM_SEED))
        yt.backward(dout)
        yl.backward(dout)
        assert_bits_equal(xl.grad, xt.grad)
        np.testing.assert_allclose(fq_per_tensor_grad_reference(dout, xl.detach(), scale, zp, qmin, qmax), xl.grad, rtol=TOLERANCE, atol=TOLERANCE)

    @given(X=tensor(shapes=array_shapes(1, 5), qparams=qparams(dtypes=torch.quint8)))
    @FAST
    def test_fixed_qparams_fq_module(self, X):
        """test_workflow_ops.py::TestFakeQuantizeOps::test_fixed_qparams_fq_module: a
        lowbit.torch.FakeQuantize with torch's fixed 0-to-1 qparams (scale 1/256, zero point 0,
        0..255) keeps its qparams through a forward and gives torch's output bit for bit."""
        x = torch.from_numpy(X[0])
        fq_module = torch.ao.quantization.default_fixed_qparams_range_0to1_fake_quant()
        ours = lt.FakeQuantize(fq_module.quant_min, fq_module.quant_max, fq_module.scale, fq_module.zero_point)
        fixed_scale, fixed_zp = ours.scale.clone(), ours.zero_point.clone()
        torch.ao.quantization.enable_observer(fq_module)
        want = fq_module(x)
        got = ours(x)
        assert torch.equal(ours.scale, fixed_scale) and torch.equal(ours.zero_point, fixed_zp)
        assert_bits_equal(got, want)

    @pytest.mark.parametrize("weights_only", [True, False])
    def test_fq_serializable_per_tensor(self, weights_only):
        """test_workflow_ops.py::TestFakeQuantizeOps::test_fq_serializable_per_tensor: torch's
        FakeQuantize(default_observer, 0, 127) against lowbit's MinMaxObserver(bits=7) +
        FakeQuantize: scale 0.094488 and zero point 53 as upstream asserts (and torch's bits), and
        the state_dict survives torch.save / torch.load into a fresh layer."""
        x = torch.tensor([-5, -3.5, -2, 0, 3, 5, 7], dtype=torch.float32)
        fq_module = torch.ao.quantization.FakeQuantize(torch.ao.quantization.default_observer, 0, 127)
        y_ref = fq_module(x)
        obs = lc.MinMaxObserver(bits=7)
        obs.update(x)
        scale, zp = obs.qparams()
        ours = lt.FakeQuantize(0, 127, scale, zp)
        assert_bits_equal(ours(x), y_ref)
        state_dict = ours.state_dict()
        torch.testing.assert_close(state_dict["scale"].item(), 0.094488, rtol=1e-5, atol=1e-6)
        assert state_dict["zero_point"].item() == 53
        assert state_dict["scale"].item() == fq_module.state_dict()["scale"].item()
        b = io.BytesIO()
        torch.save(state_dict, b)
        b.seek(0)
        loaded = lt.FakeQuantize(0, 127)
        loaded.load_state_dict(torch.load(b, weights_only=weights_only))
        for key in state_dict:
            assert_bits_equal(loaded.state_dict()[key], state_dict[key])
        assert_bits_equal(loaded(x), y_ref)

    def test_fake_quant_control(self):
        """test_workflow_ops.py::TestFakeQuantizeOps::test_fake_quant_control: torch's
        default_fake_quant against lowbit's MovingAverageMinMaxObserver(bits=7) feeding a
        lowbit.torch.FakeQuantize. With fake-quant on the output differs from the input; off
        (torch's disable_fake_quant, ``enabled=False``) it is the input while the observer still
        moves the qparams; with the observer off they stay. Both agree bit for bit at every step."""
        g = _gen(42)
        fq_module = torch.ao.quantization.default_fake_quant()
        obs = lc.MovingAverageMinMaxObserver(averaging_constant=0.01, bits=7)
        ours = lt.FakeQuantize(fq_module.quant_min, fq_module.quant_max)

        def observe(x: torch.Tensor) -> None:
            obs.update(x)
            s, z = obs.qparams()
            ours.scale.fill_(s)
            ours.zero_point.fill_(z)

        x = torch.rand(20, 10, generator=g)
        y = fq_module(x)
        observe(x)
        assert_bits_equal(ours(x), y)
        assert not torch.equal(y, x)
        torch.ao.quantization.disable_fake_quant(fq_module)
        ours.enabled = False
        x = torch.rand(20, 10, generator=g)
        y = fq_module(x)
        observe(x)
        assert torch.equal(ours(x), x) and torch.equal(y, x)
        assert (ours.scale.item(), ours.zero_point.item()) == (fq_module.scale.item(), fq_module.zero_point.item())
        scale, zp = ours.scale.clone(), ours.zero_point.clone()
        torch.ao.quantization.disable_observer(fq_module)
        torch.ao.quantization.enable_fake_quant(fq_module)
        ours.enabled = True
        x = 10.0 * torch.rand(20, 10, generator=g) - 5.0
        y = fq_module(x)
        assert_bits_equal(ours(x), y)
        assert not torch.equal(y, x)
        assert torch.equal(ours.scale, scale) and torch.equal(ours.zero_point, zp)
        torch.ao.quantization.enable_observer(fq_module)
        y = fq_module(x)
        observe(x)
        assert_bits_equal(ours(x), y)
        assert not torch.equal(ours.scale, scale) and not torch.equal(ours.zero_point, zp)

    @given(X=per_channel_tensor(shapes=array_shapes(1, 5), qparams=qparams(dtypes=torch.quint8)))
    @FAST
    def test_forward_per_channel(self, X):
        """test_workflow_ops.py::TestFakeQuantizeOps::test_forward_per_channel: torch and lowbit
        bit-identical along the drawn axis (tensor and NumPy in, and on a transposed,
        non-contiguous view), and within tolerance of the float reference."""
        x, (scale, zp, axis, qdtype) = X
        qmin, qmax = QRANGES[qdtype]
        x, s, z = torch.from_numpy(x), torch.from_numpy(scale), torch.from_numpy(zp)
        want = torch.fake_quantize_per_channel_affine(x, s, z, axis, qmin, qmax)
        got = lowbit.fake_quantize_per_channel_affine(x, s, z, axis, qmin, qmax)
        assert_bits_equal(got, want)
        assert_bits_equal(lowbit.fake_quantize_per_channel_affine(x.numpy(), scale, zp, axis, qmin, qmax), want.numpy())
        np.testing.assert_allclose(fq_per_channel_reference(x, s, z, axis, qmin, qmax), got, rtol=TOLERANCE, atol=TOLERANCE)
        if x.ndim >= 2:
            v = x.transpose(0, -1)
            vaxis = {0: x.ndim - 1, x.ndim - 1: 0}.get(axis, axis)
            assert_bits_equal(
                lowbit.fake_quantize_per_channel_affine(v, s, z, vaxis, qmin, qmax),
                torch.fake_quantize_per_channel_affine(v, s, z, vaxis, qmin, qmax),
            )

    @pytest.mark.parametrize("float_type", [torch.float32, torch.float16, torch.float64, torch.bfloat16], ids=dtype_id)
    @pytest.mark.parametrize("qdtype", [torch.qint8, torch.quint8], ids=dtype_id)
    def test_forward_per_channel_cachemask_cpu(self, float_type, qdtype):
        """test_workflow_ops.py::TestFakeQuantizeOps::test_forward_per_channel_cachemask_cpu:
        PerChannelMinMaxObserver(axis 1) qparams on 0.75 * X; lowbit equals torch bit for bit with
        int32 zero points (output, dtype and mask). torch also takes float32 / float16 zero points;
        lowbit deliberately refuses them (LowbitTypeError), and its result with the zero points as
        integers equals torch's with the integral float zero points."""
        x = torch.randn(1, 2, 4, 4, generator=_gen(NP_RANDOM_SEED)).to(float_type)
        axis = 1
        obs = torch.ao.quantization.PerChannelMinMaxObserver(axis, qdtype)
        obs(x * 0.75)
        scale, zp = obs.calculate_qparams()
        zp = zp.to(torch.int32)
        qmin, qmax = obs.quant_min, obs.quant_max
        want = torch.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin, qmax)
        got, mask = lowbit.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin, qmax, return_mask=True)
        assert got.dtype == float_type
        assert_bits_equal(got, want)
        _, want_mask = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(x, scale, zp, axis, qmin, qmax)
        assert_bits_equal(mask, want_mask)
        torch.testing.assert_close(got, fq_per_channel_reference(x, scale, zp, axis, qmin, qmax), rtol=TOLERANCE, atol=TOLERANCE)
        for zero_point_type in (torch.float32, torch.float16):
            zf = zp.to(zero_point_type)
            with pytest.raises(lowbit.LowbitTypeError):
                lowbit.fake_quantize_per_channel_affine(x, scale, zf, axis, qmin, qmax)
            assert_bits_equal(got, torch.fake_quantize_per_channel_affine(x, scale, zf, axis, qmin, qmax))

    def test_forward_per_channel_half_precision_numerics(self):
        """test_workflow_ops.py::TestFakeQuantizeOps::test_forward_per_channel_half_precision_numerics:
        float16 per channel, with an overflowing element (2**15 + .01) and an underflowing one
        (2**-24 at scale 10). Upstream draws zero points from randn().to(int) under its fixed seed;
        here they are |randn|.to(int), inside 0..255 as torch requires."""
        g = _gen(NP_RANDOM_SEED)
        scale = torch.randn(5, generator=g).abs()
        zero = torch.randn(5, generator=g).abs().to(dtype=torch.int)
        axis, mini, maxi = 1, 0, 255

        def check(x: torch.Tensor, s: torch.Tensor) -> None:
            got = lowbit.fake_quantize_per_channel_affine(x, s, zero, axis, mini, maxi)
            assert_bits_equal(got, torch.fake_quantize_per_channel_affine(x, s, zero, axis, mini, maxi))
            torch.testing.assert_close(got, fq_per_channel_reference(x, s, zero, axis, mini, maxi), rtol=TOLERANCE, atol=TOLERANCE)

        for _ in range(20):
            check(torch.randn(4, 5, generator=g).to(torch.float16), scale)
        x2 = torch.randn(4, 5, generator=g).to(torch.float16)
        x2[0, 0] = 2**15 + 0.01
        check(x2, scale)
        x3 = torch.randn(4, 5, generator=g).to(torch.float16)
        x3[0, 0] = 2**-24
        check(x3, torch.zeros(5) + 10)

    @given(X=per_channel_tensor(shapes=array_shapes(1, 5), qparams=qparams(dtypes=torch.quint8)))
    @FAST
    def test_fake_quant_per_channel_qparam_range(self, X):
        """test_workflow_ops.py::TestFakeQuantizeOps::test_fake_quant_per_channel_qparam_range: an
        integer zero point below quant_min is refused (torch: RuntimeError, lowbit:
        LowbitValueError). torch accepts float zero points outside the range; lowbit deliberately
        refuses float zero points (LowbitTypeError)."""
        x, (scale, zp, axis, qdtype) = X
        qmin, qmax = QRANGES[qdtype]
        x, s = torch.from_numpy(x), torch.from_numpy(scale)
        bad = torch.full(zp.shape, -1 - qmin, dtype=torch.int32)
        with pytest.raises(RuntimeError, match="`zero_point` must be between `quant_min` and `quant_max`."):
            torch.fake_quantize_per_channel_affine(x, s, bad, axis, qmin, qmax)
        with pytest.raises(lowbit.LowbitValueError):
            lowbit.fake_quantize_per_channel_affine(x, s, bad, axis, qmin, qmax)
        for zero_point_dtype in (torch.float32, torch.float16):
            zf = bad.to(zero_point_dtype)
            torch.testing.assert_close(
                torch.fake_quantize_per_channel_affine(x, s, zf, axis, qmin, qmax),
                fq_per_channel_reference(x, s, zf, axis, qmin, qmax),
                rtol=TOLERANCE,
                atol=TOLERANCE,
            )
            with pytest.raises(lowbit.LowbitTypeError):
                lowbit.fake_quantize_per_channel_affine(x, s, zf, axis, qmin, qmax)

    def test_fake_quant_per_channel_qparam_range_empty_input(self):
        """test_workflow_ops.py::TestFakeQuantizeOps::test_fake_quant_per_channel_qparam_range_empty_input:
        an empty input still refuses an out-of-range zero point, and with an in-range one returns an
        empty result of the input's shape (tensor and NumPy)."""
        qmin, qmax = 0, 255
        x = torch.empty(0, 3)
        scale = torch.ones(3)
        zp = torch.full((3,), -1, dtype=torch.int32)
        with pytest.raises(RuntimeError, match="`zero_point` must be between `quant_min` and `quant_max`."):
            torch.fake_quantize_per_channel_affine(x, scale, zp, 1, qmin, qmax)
        for arg in (x, x.numpy()):
            with pytest.raises(lowbit.LowbitValueError):
                lowbit.fake_quantize_per_channel_affine(arg, scale, zp, 1, qmin, qmax)
        zp.fill_(0)
        want = torch.fake_quantize_per_channel_affine(x, scale, zp, 1, qmin, qmax)
        assert_bits_equal(lowbit.fake_quantize_per_channel_affine(x, scale, zp, 1, qmin, qmax), want)
        assert_bits_equal(lowbit.fake_quantize_per_channel_affine(x.numpy(), scale, zp, 1, qmin, qmax), want.numpy())

    @given(X=per_channel_tensor(shapes=array_shapes(1, 5), qparams=qparams(dtypes=torch.quint8)))
    @FAST
    def test_backward_per_channel(self, X):
        """test_workflow_ops.py::TestFakeQuantizeOps::test_backward_per_channel (skipped upstream,
        run here with int32 zero points): the gradient equals torch's bit for bit and the reference."""
        x, (scale, zp, axis, qdtype) = X
        qmin, qmax = QRANGES[qdtype]
        s, z = torch.from_numpy(scale), torch.from_numpy(zp)
        xt, xl = torch.from_numpy(x).requires_grad_(), torch.from_numpy(x.copy()).requires_grad_()
        dout = torch.rand(xt.shape, generator=_gen(NP_RANDOM_SEED))
        torch.fake_quantize_per_channel_affine(xt, s, z, axis, qmin, qmax).backward(dout)
        lowbit.fake_quantize_per_channel_affine(xl, s, z, axis, qmin, qmax).backward(dout)
        assert_bits_equal(xl.grad, xt.grad)
        np.testing.assert_allclose(fq_per_channel_grad_reference(dout, xl.detach(), s, z, axis, qmin, qmax), xl.grad, rtol=TOLERANCE, atol=TOLERANCE)

    @pytest.mark.parametrize("float_type", [torch.float32, torch.float16, torch.float64], ids=dtype_id)
    def test_backward_per_channel_cachemask_cpu(self, float_type):
        """test_workflow_ops.py::TestFakeQuantizeOps::test_backward_per_channel_cachemask_cpu: qint8
        and quint8 observer qparams along axis 1; gradient bit-identical to torch's, in the input's
        dtype (int32 zero points; lowbit refuses float ones, see the cachemask forward test)."""
        g = _gen(NP_RANDOM_SEED)
        for qdtype in (torch.qint8, torch.quint8):
            x = torch.randn(1, 2, 4, 4, generator=g, dtype=float_type)
            axis = 1
            obs = torch.ao.quantization.PerChannelMinMaxObserver(axis, qdtype)
            obs(x * 0.75)
            scale, zp = obs.calculate_qparams()
            zp = zp.to(torch.int32)
            qmin, qmax = obs.quant_min, obs.quant_max
            xt, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
            dout = torch.rand(x.shape, generator=g, dtype=float_type)
            torch.fake_quantize_per_channel_affine(xt, scale, zp, axis, qmin, qmax).backward(dout)
            lowbit.fake_quantize_per_channel_affine(xl, scale, zp, axis, qmin, qmax).backward(dout)
            assert xl.grad.dtype == float_type
            assert_bits_equal(xl.grad, xt.grad)
            np.testing.assert_allclose(fq_per_channel_grad_reference(dout, x, scale, zp, axis, qmin, qmax), xl.grad, rtol=TOLERANCE, atol=TOLERANCE)

    @pytest.mark.parametrize("test_type", ["per_tensor", "per_channel"])
    def test_numerical_consistency(self, test_type):
        """test_workflow_ops.py::TestFakeQuantizeOps::test_numerical_consistency_per_tensor /
        test_numerical_consistency_per_channel: lowbit's fake-quant equals torch's
        dequantize(quantize(X)) (cast to X's dtype), and lowbit's own quantize + dequantize equals
        torch's (codes and floats), for qint8 / quint8 and float32 / float16 / float64 inputs, 10
        draws each (upstream 20; torch.quantize_per_tensor's deprecation warning makes each call
        slow). Per channel only int zero points: lowbit refuses float ones."""
        g = _gen(NP_RANDOM_SEED)
        axis = 1
        for _ in range(10):
            for qdtype, float_type in itertools.product((torch.qint8, torch.quint8), (torch.float, torch.float16, torch.float64)):
                x = torch.randn(3, 3, generator=g).to(float_type)
                scales = (10 * torch.randn(3, generator=g)).abs()
                scale = scales.mean().to(float).item()
                zeros = (10 * torch.randn(3, generator=g)).abs().to(dtype=torch.int)
                zero = zeros.max().view(1).item()
                qmin, qmax = QRANGES[qdtype]
                if test_type == "per_tensor":
                    tq = torch.quantize_per_tensor(x.to(torch.float), scale, zero, qdtype)
                    y_prime = lowbit.fake_quantize_per_tensor_affine(x, scale, zero, qmin, qmax)
                    q = lowbit.quantize_per_tensor(x, scale, zero, qmin, qmax)
                    dq = lowbit.dequantize_per_tensor(q, scale, zero)
                else:
                    tq = torch.quantize_per_channel(x.to(torch.float), scales, zeros, axis, qdtype)
                    y_prime = lowbit.fake_quantize_per_channel_affine(x, scales, zeros, axis, qmin, qmax)
                    q = lowbit.quantize_per_channel(x, scales, zeros, axis, qmin, qmax)
                    dq = lowbit.dequantize_per_channel(q, scales, zeros, axis)
                y = torch.dequantize(tq).to(float_type)
                assert_bits_equal(y_prime, y)
                assert_bits_equal(q, tq.int_repr())
                assert_bits_equal(dq, torch.dequantize(tq))

    def test_numerical_consistency_per_channel_float64_scale_codes(self):
        """test_workflow_ops.py::TestFakeQuantizeOps::test_numerical_consistency_per_channel with
        float64 scales that float32 cannot hold: lowbit's codes equal torch.quantize_per_channel's."""
        g = _gen(NP_RANDOM_SEED)
        x = torch.randn(64, 50, generator=g)
        s64 = torch.rand(64, generator=g, dtype=torch.float64) * 0.1 + 1e-3
        zp = torch.randint(-5, 5, (64,), generator=g)
        tq = torch.quantize_per_channel(x, s64, zp, 0, torch.qint8)
        assert tq.q_per_channel_scales().dtype == torch.float64
        assert_bits_equal(lowbit.quantize_per_channel(x, s64, zp, 0, -128, 127), tq.int_repr())

    def test_numerical_consistency_per_channel_float64_scale_dequantize(self):
        """test_workflow_ops.py::TestFakeQuantizeOps::test_numerical_consistency_per_channel with
        float64 scales: lowbit.dequantize_per_channel of torch's codes equals torch.dequantize,
        which multiplies (q - zp) by the float64 scale and rounds the product once to float32."""
        g = _gen(NP_RANDOM_SEED)
        x = torch.randn(64, 50, generator=g)
        s64 = torch.rand(64, generator=g, dtype=torch.float64) * 0.1 + 1e-3
        zp = torch.randint(-5, 5, (64,), generator=g)
        tq = torch.quantize_per_channel(x, s64, zp, 0, torch.qint8)
        assert_bits_equal(lowbit.dequantize_per_channel(tq.int_repr(), s64, zp, 0), tq.dequantize())

    @pytest.mark.parametrize(
        "scale_dtype",
        [
            torch.float,
            torch.float64,
            torch.bfloat16,
            torch.half,
        ],
        ids=dtype_id,
    )
    def test_fake_quantize_per_channel_affine_scale_dtypes(self, scale_dtype):
        """test_workflow_ops.py::TestFakeQuantizeOps::test_fake_quantize_per_channel_affine_scale_dtypes:
        torch refuses scales that are not float32 (RuntimeError). lowbit takes float64 / float16 /
        bfloat16 scales as the float32 they convert to (torch's result for scale.float(), bit for
        bit); for any scale dtype lowbit must either give that result or raise a LowbitTypeError
        (never a plain TypeError)."""
        x = torch.randn(3, 4, 5, 6, generator=_gen(NP_RANDOM_SEED))
        scale = torch.Tensor([0.1, 0.2, 0.3, 0.4]).to(scale_dtype)
        zero_point = torch.tensor([1, 2, 3, 4], dtype=torch.int32)
        axis, qmin, qmax = 1, 0, 255
        want = torch.fake_quantize_per_channel_affine(x, scale.float(), zero_point, axis, qmin, qmax)
        if scale_dtype != torch.float:
            with pytest.raises(RuntimeError):
                torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qmin, qmax)
        try:
            got = lowbit.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qmin, qmax)
        except lowbit.LowbitTypeError:
            assert scale_dtype != torch.float
            return
        assert_bits_equal(got, want)

    @pytest.mark.parametrize("dtype", [torch.float, torch.float64, torch.half, torch.bfloat16], ids=dtype_id)
    def test_fake_quantize_per_tensor_affine_inf(self, dtype):
        """test_workflow_ops.py::TestFakeQuantizeOps::test_fake_quantize_per_tensor_affine_inf
        (pytorch/pytorch#154328): +Inf clamps to quant_max, as torch and the upstream reference say
        (here also -Inf and NaN, bit for bit with torch)."""
        x = torch.tensor([torch.inf], dtype=dtype)
        scale, zp, qmin, qmax = 0.01, 0, 0, 255
        got = lowbit.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
        ref = (min(qmax, max(qmin, torch.round(x / scale) + zp)) - zp) * scale
        assert_bits_equal(got, torch.Tensor([ref]).to(dtype))
        specials = torch.tensor([torch.inf, -torch.inf, torch.nan, -0.0], dtype=dtype)
        assert_bits_equal(
            lowbit.fake_quantize_per_tensor_affine(specials, scale, zp, qmin, qmax),
            torch.fake_quantize_per_tensor_affine(specials, scale, zp, qmin, qmax),
        )


# ---- TestFusedObsFakeQuant --------------------------------------------------------------------------


def _fused(x, observer_on, fake_quant_on, running_min, running_max, scale, zero_point, per_channel=False, symmetric=False):
    return torch.fused_moving_avg_obs_fake_quant(
        x, torch.tensor(observer_on), torch.tensor(fake_quant_on), running_min, running_max, scale, zero_point,
        0.01, 0, 255, 0, per_channel, symmetric,
    )


class TestFusedObsFakeQuant:
    @pytest.mark.parametrize("use_bool", [False, True])
    def test_fused_obs_fake_quant_moving_avg(self, use_bool):
        """test_workflow_ops.py::TestFusedObsFakeQuant::test_fused_obs_fake_quant_moving_avg: ten
        calls, the observer on from call 3 and fake-quant from call 5; lowbit's
        MovingAverageMinMaxObserver(0.01) fed the same batches, then lowbit's fake-quant with its
        qparams, equals the fused op (zero point exactly; scale and output with upstream's
        assert_close: the fused op computes the scale in float64, torch.ao and lowbit in float32).
        Only the affine case: the fused op's symmetric_quant (caffe2's preserve_sparsity over
        0..255) is a different formula from torch.ao's symmetric observers, which lowbit follows.
        An empty input gives an empty output."""
        g = _gen(NP_RANDOM_SEED)
        running_min, running_max = torch.tensor(float("inf")), torch.tensor(float("-inf"))
        scale, zero_point = torch.tensor([1.0]), torch.tensor([0], dtype=torch.int)
        obs = lc.MovingAverageMinMaxObserver(averaging_constant=0.01)
        observer_on = fake_quant_on = False if use_bool else 0
        for i in range(10):
            if i > 2:
                observer_on = True if use_bool else 1
            if i > 4:
                fake_quant_on = True if use_bool else 1
            x = torch.randn(5, 5, generator=g)
            out = _fused(x, observer_on, fake_quant_on, running_min, running_max, scale, zero_point)
            if observer_on:
                obs.update(x)
            if fake_quant_on:
                s, z = obs.qparams()
                assert z == zero_point.item()
                torch.testing.assert_close(scale.item(), s)
                ours = lowbit.fake_quantize_per_tensor_affine(x, s, z, 0, 255)
            else:
                ours = x
            torch.testing.assert_close(ours, out)
        x = torch.empty(0, 5)
        out = _fused(x, 1, 1, running_min, running_max, scale, zero_point)
        s, z = obs.qparams()
        assert lowbit.fake_quantize_per_tensor_affine(x, s, z, 0, 255).shape == out.shape == (0, 5)

    @pytest.mark.parametrize("size", [(5, 5), (5, 4, 3)])
    def test_fused_obs_fake_quant_moving_avg_per_channel(self, size):
        """test_workflow_ops.py::TestFusedObsFakeQuant::test_fused_obs_fake_quant_moving_avg_per_channel,
        first call only (observer and fake-quant on): the running range is then each channel's
        min-max, which lowbit's PerChannelMinMaxObserver(axis 0) sees too; lowbit has no per-channel
        moving average for the later calls. Zero points exact, scales and output with assert_close."""
        m = size[0]
        x = torch.randn(size, generator=_gen(NP_RANDOM_SEED))
        running_min, running_max = torch.full((m,), float("inf")), torch.full((m,), float("-inf"))
        scale, zero_point = torch.full((m,), 0.1), torch.zeros(m, dtype=torch.int)
        out = _fused(x, 1, 1, running_min, running_max, scale, zero_point, per_channel=True)
        obs = lc.PerChannelMinMaxObserver(axis=0)
        obs.update(x)
        s, z = obs.qparams()
        assert_bits_equal(torch.from_numpy(z), zero_point)
        torch.testing.assert_close(torch.from_numpy(s), scale)
        torch.testing.assert_close(lowbit.fake_quantize_per_channel_affine(x, s, z, 0, 0, 255), out)

    def test_fused_obs_fake_quant_backward_op(self):
        """test_workflow_ops.py::TestFusedObsFakeQuant::test_fused_obs_fake_quant_backward_op: the
        fused op's output and gradient equal lowbit's MinMaxObserver + fake-quant's (upstream
        tolerances), and lowbit's gradient equals torch's fake-quant gradient bit for bit."""
        x = torch.randn(10, 10, generator=_gen(NP_RANDOM_SEED), requires_grad=True)
        xl = x.detach().clone().requires_grad_()
        x_min, x_max = x.min().item(), x.max().item()
        out = _fused(x, 1, 1, torch.tensor(x_min), torch.tensor(x_max), torch.tensor([1.0]), torch.tensor([0], dtype=torch.int))
        obs = lc.MinMaxObserver()
        obs.update(xl)
        s, z = obs.qparams()
        ours = lowbit.fake_quantize_per_tensor_affine(xl, s, z, 0, 255)
        torch.testing.assert_close(ours, out)
        dout = torch.rand(x.shape, generator=_gen(1))
        out.backward(dout)
        ours.backward(dout)
        torch.testing.assert_close(xl.grad, x.grad)
        assert xl.grad.dtype == torch.float32
        xt = xl.detach().clone().requires_grad_()
        torch.fake_quantize_per_tensor_affine(xt, s, z, 0, 255).backward(dout)
        assert_bits_equal(xl.grad, xt.grad)

    def test_fused_backward_op_fake_quant_off(self):
        """test_workflow_ops.py::TestFusedObsFakeQuant::test_fused_backward_op_fake_quant_off: with
        fake-quant off the fused op is the identity and so is a disabled lowbit.torch.FakeQuantize,
        gradient included."""
        x = torch.randn(4, 4, generator=_gen(NP_RANDOM_SEED), requires_grad=True)
        xl = x.detach().clone().requires_grad_()
        out = _fused(x, 0, 0, torch.tensor(x.min().item()), torch.tensor(x.max().item()), torch.tensor([1.0]), torch.tensor([0], dtype=torch.int))
        ours = lt.FakeQuantize(0, 255, 1.0, 0, enabled=False)(xl)
        torch.testing.assert_close(ours, out)
        dout = torch.rand(x.shape, generator=_gen(1))
        out.backward(dout)
        ours.backward(dout)
        torch.testing.assert_close(xl.grad, x.grad)
