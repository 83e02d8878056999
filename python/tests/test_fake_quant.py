"""fake_quantize_per_{tensor,channel}_affine against PyTorch, bit for bit."""

import numpy as np
import pytest
import torch
from conftest import RANGES, adversarial
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lowbit
import lowbit.torch as lt


def bits(a) -> np.ndarray:
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    return a.view(np.uint8)


def torch_fq(x: np.ndarray, scale, zp, qmin, qmax):
    out, mask = torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(torch.from_numpy(x), scale, zp, qmin, qmax)
    return out.numpy(), mask.numpy()


def torch_fq_channel(x: np.ndarray, scale, zp, axis, qmin, qmax):
    s = torch.tensor(scale, dtype=torch.float32)
    z = torch.tensor(zp, dtype=torch.int32)
    out, mask = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(torch.from_numpy(x), s, z, axis, qmin, qmax)
    return out.numpy(), mask.numpy()


@pytest.mark.parametrize("qmin,qmax", RANGES)
@pytest.mark.parametrize("scale", [0.25, 0.0371, 1e-3, 3.7, 1e-30, 1e20])
def test_per_tensor_adversarial_matches_torch(qmin, qmax, scale):
    x = adversarial(scale)
    zp = (qmin + qmax + 1) // 2
    out, mask = lowbit.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax, return_mask=True)
    t_out, t_mask = torch_fq(x, scale, zp, qmin, qmax)
    np.testing.assert_array_equal(bits(out), bits(t_out))
    np.testing.assert_array_equal(mask, t_mask)


@pytest.mark.parametrize("qmin,qmax", RANGES)
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_per_channel_every_axis_matches_torch(qmin, qmax, axis, rng):
    x = rng.permutation(adversarial(0.05))[: 6 * 7 * 50].reshape(6, 7, 50)
    c = x.shape[axis]
    scale = (rng.random(c) * 0.1 + 0.01).astype(np.float32)
    zp = rng.integers(qmin, qmax + 1, c).astype(np.int32)
    out, mask = lowbit.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin, qmax, return_mask=True)
    t_out, t_mask = torch_fq_channel(x, scale, zp, axis % 3, qmin, qmax)
    np.testing.assert_array_equal(bits(out), bits(t_out))
    np.testing.assert_array_equal(mask, t_mask)


def test_large_and_ragged_shapes_cross_parallel_chunks(rng):
    for shape in [(1, 100_003), (3, 33_333), (100_003,), (257, 129), (4, 1, 65_537)]:
        x = (rng.standard_normal(shape) * 3).astype(np.float32)
        out = lowbit.fake_quantize_per_tensor_affine(x, 0.02, 3, -8, 7)
        np.testing.assert_array_equal(bits(out), bits(torch_fq(x, 0.02, 3, -8, 7)[0]))
        for axis in range(x.ndim):
            c = shape[axis]
            s = (rng.random(c) * 0.05 + 0.005).astype(np.float32)
            z = rng.integers(0, 16, c).astype(np.int32)
            out = lowbit.fake_quantize_per_channel_affine(x, s, z, axis, 0, 15)
            np.testing.assert_array_equal(bits(out), bits(torch_fq_channel(x, s, z, axis, 0, 15)[0]))


def test_non_contiguous_views_are_read_in_place(rng):
    base = (rng.standard_normal((64, 80)) * 2).astype(np.float32)
    views = [base.T, base[::2, 1::3], base[::-1], np.asfortranarray(base), base[:, ::-2].T]
    for v in views:
        assert not v.flags.c_contiguous or v.base is not None
        want = torch_fq(np.ascontiguousarray(v), 0.05, 0, -8, 7)
        out, mask = lowbit.fake_quantize_per_tensor_affine(v, 0.05, 0, -8, 7, return_mask=True)
        assert out.flags.c_contiguous and out.shape == v.shape
        np.testing.assert_array_equal(bits(out), bits(want[0]))
        np.testing.assert_array_equal(mask, want[1])
        s = np.linspace(0.01, 0.1, v.shape[1], dtype=np.float32)
        z = np.zeros(v.shape[1], dtype=np.int32)
        out = lowbit.fake_quantize_per_channel_affine(v, s, z, 1, -8, 7)
        np.testing.assert_array_equal(bits(out), bits(torch_fq_channel(np.ascontiguousarray(v), s, z, 1, -8, 7)[0]))


def test_empty_and_scalar_inputs():
    for shape in [(0,), (0, 5), (5, 0), (3, 0, 2)]:
        x = np.zeros(shape, dtype=np.float32)
        out, mask = lowbit.fake_quantize_per_tensor_affine(x, 0.1, 0, -8, 7, return_mask=True)
        assert out.shape == shape and mask.shape == shape
    x0 = np.array(2.26, dtype=np.float32)
    assert lowbit.fake_quantize_per_tensor_affine(x0, 0.5, 0, -8, 7).shape == ()
    empty_ch = np.zeros((0, 4), dtype=np.float32)
    out = lowbit.fake_quantize_per_channel_affine(empty_ch, [1.0] * 4, [0] * 4, 1, -8, 7)
    assert out.shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_match_torch(dtype):
    x = torch.from_numpy(adversarial(0.125)).to(dtype)
    for qmin, qmax in [(-8, 7), (0, 255)]:
        zp = (qmin + qmax + 1) // 2
        want = torch.fake_quantize_per_tensor_affine(x, 0.125, zp, qmin, qmax)
        got = lowbit.fake_quantize_per_tensor_affine(x, 0.125, zp, qmin, qmax)
        assert got.dtype == dtype
        assert torch.equal(got.view(torch.int16 if dtype != torch.float64 else torch.int64), want.view(got.view(torch.int16 if dtype != torch.float64 else torch.int64).dtype))
        x2 = x[: (x.numel() // 8) * 8].reshape(8, -1)
        s = torch.linspace(0.05, 0.4, 8)
        z = torch.full((8,), zp, dtype=torch.int32)
        want = torch.fake_quantize_per_channel_affine(x2, s, z, 0, qmin, qmax)
        got = lowbit.fake_quantize_per_channel_affine(x2, s, z, 0, qmin, qmax)
        assert torch.equal(torch.nan_to_num(got, 123.0), torch.nan_to_num(want, 123.0))
        assert torch.equal(got.isnan(), want.isnan())


def test_numpy_float16_and_float64(rng):
    x = (rng.standard_normal(5000) * 4).astype(np.float16)
    want = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), 0.1, 0, -8, 7).numpy()
    np.testing.assert_array_equal(bits(lowbit.fake_quantize_per_tensor_affine(x, 0.1, 0, -8, 7)), bits(want))
    x = rng.standard_normal(5000) * 4
    want = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), 0.1, 0, -8, 7).numpy()
    np.testing.assert_array_equal(lowbit.fake_quantize_per_tensor_affine(x, 0.1, 0, -8, 7), want)


def test_torch_tensor_path_shares_memory_and_matches_autograd():
    x = torch.randn(300, 40) * 2
    x.requires_grad_(True)
    y = lowbit.fake_quantize_per_tensor_affine(x, 0.05, 2, -8, 7)
    xt = x.detach().clone().requires_grad_(True)
    yt = torch.fake_quantize_per_tensor_affine(xt, 0.05, 2, -8, 7)
    assert torch.equal(y, yt)
    g = torch.randn_like(y)
    y.backward(g)
    yt.backward(g)
    assert torch.equal(x.grad, xt.grad)
    s = torch.rand(40) * 0.1 + 0.01
    z = torch.randint(-8, 8, (40,), dtype=torch.int32)
    x.grad = None
    xt.grad = None
    y = lt.fake_quantize_per_channel_affine(x, s, z, 1, -8, 7)
    yt = torch.fake_quantize_per_channel_affine(xt, s, z, 1, -8, 7)
    assert torch.equal(y, yt)
    y.backward(g)
    yt.backward(g)
    assert torch.equal(x.grad, xt.grad)


def test_fake_quantize_module_trains_like_torch():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    fq = lt.FakeQuantize.from_tensor(w, bits=4, axis=0)
    ref = torch.ao.quantization.PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-8, quant_max=7)
    ref(w)
    s, z = ref.calculate_qparams()
    assert torch.equal(fq.scale, s.float())
    assert torch.equal(fq.zero_point.long(), z.long())
    x = w.clone().requires_grad_(True)
    out = fq(x)
    assert torch.equal(out, torch.fake_quantize_per_channel_affine(w, s.float(), z.int(), 0, -8, 7))
    out.sum().backward()
    assert x.grad is not None and set(x.grad.unique().tolist()) <= {0.0, 1.0}
    fq_t = lt.FakeQuantize(-128, 127, scale=0.02, zero_point=0)
    assert torch.equal(fq_t(w), torch.fake_quantize_per_tensor_affine(w, 0.02, 0, -128, 127))
    assert "per_tensor" in repr(fq_t) and fq_t.state_dict()["scale"].dtype == torch.float32


@settings(max_examples=200, deadline=None)
@given(
    x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=9), elements=st.floats(width=32, allow_nan=True, allow_infinity=True)),
    scale=st.floats(min_value=1e-6, max_value=1e6),
    rng_range=st.sampled_from(RANGES),
    zp_frac=st.floats(0, 1),
)
def test_property_any_input_matches_torch(x, scale, rng_range, zp_frac):
    qmin, qmax = rng_range
    zp = int(qmin + round(zp_frac * (qmax - qmin)))
    out, mask = lowbit.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax, return_mask=True)
    t_out, t_mask = torch_fq(x, scale, zp, qmin, qmax)
    np.testing.assert_array_equal(bits(out), bits(t_out))
    np.testing.assert_array_equal(mask, t_mask)
    axis = x.ndim - 1
    c = x.shape[axis]
    s = np.full(c, scale, dtype=np.float32)
    z = np.full(c, zp, dtype=np.int32)
    out = lowbit.fake_quantize_per_channel_affine(x, s, z, axis, qmin, qmax)
    np.testing.assert_array_equal(bits(out), bits(torch_fq_channel(x, s, z, axis, qmin, qmax)[0]))


@pytest.mark.parametrize("level", ["scalar", "sse4.1", "avx2", "avx512vnni"])
def test_every_simd_path_matches_torch(level, tmp_path):
    """The kernels compiled for each instruction set give PyTorch's bits (run in a fresh process;
    a level above the CPU's runs the CPU's best)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import numpy as np, torch, lowbit, sys
        sys.path.insert(0, sys.argv[1])
        from conftest import adversarial
        x = adversarial(0.0371, n_random=100_000)
        for qmin, qmax, zp in [(-8, 7, 0), (0, 255, 77), (-2, 1, -1)]:
            a, m = lowbit.fake_quantize_per_tensor_affine(x, 0.0371, zp, qmin, qmax, return_mask=True)
            b, n = torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(torch.from_numpy(x), 0.0371, zp, qmin, qmax)
            assert np.array_equal(a.view(np.uint32), b.numpy().view(np.uint32)) and np.array_equal(m, n.numpy())
            y = x[: len(x) // 10 * 10].reshape(-1, 10)
            s = np.linspace(0.01, 0.1, 10, dtype=np.float32); z = np.full(10, zp, np.int32)
            a = lowbit.fake_quantize_per_channel_affine(y, s, z, 1, qmin, qmax)
            b = torch.fake_quantize_per_channel_affine(torch.from_numpy(y), torch.from_numpy(s), torch.from_numpy(z), 1, qmin, qmax)
            assert np.array_equal(a.view(np.uint32), b.numpy().view(np.uint32))
        q = lowbit.quantize_per_tensor(x, 0.0371, 3, 0, 255)
        t = torch.quantize_per_tensor(torch.from_numpy(x), 0.0371, 3, torch.quint8).int_repr().numpy()
        assert np.array_equal(q, t)
        print("ok")
        """
    )
    import os
    import pathlib

    env = dict(os.environ, LOWBIT_ISA=level)
    r = subprocess.run([sys.executable, "-c", script, str(pathlib.Path(__file__).parent)], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.parametrize("per_channel", [False, True])
def test_out_and_in_place(per_channel, rng):
    x = (rng.standard_normal((300, 70)) * 3).astype(np.float32)
    s = (rng.random(70) * 0.1 + 0.01).astype(np.float32)
    z = rng.integers(-8, 8, 70).astype(np.int32)

    def fq(a, **kw):
        if per_channel:
            return lowbit.fake_quantize_per_channel_affine(a, s, z, 1, -8, 7, **kw)
        return lowbit.fake_quantize_per_tensor_affine(a, 0.05, 2, -8, 7, **kw)

    want, want_mask = fq(x, return_mask=True)
    out = np.empty_like(x)
    r = fq(x, out=out)
    assert r is out and np.array_equal(out, want)
    r, m = fq(x.T.copy().T, out=np.empty_like(x), return_mask=True)  # strided x into a fresh out
    np.testing.assert_array_equal(r, want)
    np.testing.assert_array_equal(m, want_mask)
    y = x.copy()
    r, m = fq(y, out=y, return_mask=True)
    assert r is y and np.array_equal(y, want) and np.array_equal(m, want_mask)
    t = torch.from_numpy(x.copy())
    assert fq(t, out=t) is t and torch.equal(t, torch.from_numpy(want))
    with pytest.raises(lowbit.LowbitValueError, match="overlaps"):
        fq(x[:, :-1], out=x[:, 1:])
    with pytest.raises(lowbit.LowbitTypeError, match="dtype"):
        fq(x, out=np.empty(x.shape, np.float64))
    with pytest.raises(lowbit.LowbitValueError, match="shape"):
        fq(x, out=np.empty((70, 300), np.float32))
    with pytest.raises(lowbit.LowbitValueError, match="C-contiguous"):
        fq(x, out=np.empty((70, 300), np.float32).T)
    ro = np.empty_like(x)
    ro.flags.writeable = False
    with pytest.raises(lowbit.LowbitValueError, match="written"):
        fq(x, out=ro)
    with pytest.raises(lowbit.LowbitValueError, match="autograd"):
        fq(torch.from_numpy(x).requires_grad_(True), out=torch.empty(x.shape))
