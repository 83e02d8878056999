"""quantize / dequantize / QuantSpec against PyTorch's quantized tensors and observers."""

import warnings

import numpy as np
import pytest
import torch
from conftest import adversarial

import lowbit

warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated.*")
warnings.filterwarnings("ignore", category=UserWarning)


def torch_codes(x: np.ndarray, scale, zp, qmin, qmax) -> np.ndarray:
    dtype = torch.qint8 if qmin < 0 else torch.quint8
    q = torch.quantize_per_tensor(torch.from_numpy(x), scale, zp, dtype).int_repr().numpy()
    return np.clip(q, qmin, qmax)


@pytest.mark.parametrize("qmin,qmax", [(-128, 127), (0, 255), (-8, 7), (0, 15), (-2, 1), (0, 3)])
@pytest.mark.parametrize("scale", [0.25, 0.0371, 1e-4, 50.0])
def test_quantize_per_tensor_matches_int_repr(qmin, qmax, scale):
    x = adversarial(scale)
    for zp in {qmin, (qmin + qmax) // 2, qmax}:
        got = lowbit.quantize_per_tensor(x, scale, zp, qmin, qmax)
        assert got.dtype == (np.int8 if qmin < 0 else np.uint8)
        np.testing.assert_array_equal(got, torch_codes(x, scale, zp, qmin, qmax))


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("qmin,qmax", [(-128, 127), (0, 255), (-8, 7)])
def test_quantize_per_channel_matches_int_repr(axis, qmin, qmax, rng):
    x = rng.permutation(adversarial(0.1))[: 40 * 57].reshape(40, 57)
    c = x.shape[axis]
    s = (rng.random(c) * 0.2 + 0.01).astype(np.float32)
    z = rng.integers(qmin, qmax + 1, c)
    got = lowbit.quantize_per_channel(x, s, z, axis, qmin, qmax)
    dtype = torch.qint8 if qmin < 0 else torch.quint8
    t = torch.quantize_per_channel(torch.from_numpy(x), torch.from_numpy(s).double(), torch.from_numpy(z), axis % 2, dtype)
    np.testing.assert_array_equal(got, np.clip(t.int_repr().numpy(), qmin, qmax))
    deq = lowbit.dequantize_per_channel(got, s, z, axis)
    if (qmin, qmax) in [(-128, 127), (0, 255)]:
        np.testing.assert_array_equal(deq, t.dequantize().numpy())


def test_dequantize_per_tensor_matches_torch(rng):
    x = (rng.standard_normal((300, 70)) * 3).astype(np.float32)
    for dtype, zp in [(torch.qint8, -3), (torch.quint8, 130)]:
        t = torch.quantize_per_tensor(torch.from_numpy(x), 0.037, zp, dtype)
        codes = t.int_repr().numpy()
        np.testing.assert_array_equal(lowbit.dequantize_per_tensor(codes, 0.037, zp), t.dequantize().numpy())
        np.testing.assert_array_equal(lowbit.dequantize_per_tensor(codes[:, ::3], 0.037, zp), t.dequantize().numpy()[:, ::3])


def test_torch_tensors_in_tensors_out():
    x = torch.randn(64, 33)
    q = lowbit.quantize_per_tensor(x, 0.05, 0, -128, 127)
    assert isinstance(q, torch.Tensor) and q.dtype == torch.int8
    assert torch.equal(q, torch.quantize_per_tensor(x, 0.05, 0, torch.qint8).int_repr())
    d = lowbit.dequantize_per_tensor(q, 0.05, 0)
    assert isinstance(d, torch.Tensor) and d.dtype == torch.float32
    qb = lowbit.quantize_per_tensor(x.bfloat16(), 0.05, 0, -128, 127)
    assert torch.equal(qb, torch.quantize_per_tensor(x.bfloat16().float(), 0.05, 0, torch.qint8).int_repr())


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_minmax_qparams_match_torch_observers(bits, symmetric, rng):
    w = (rng.standard_normal((24, 100)) * 0.3 + 0.05).astype(np.float32)
    spec = lowbit.QuantSpec(bits, symmetric=symmetric)
    q = lowbit.quantize(w, spec)
    dtype, scheme = (torch.qint8, torch.per_tensor_symmetric) if symmetric else (torch.quint8, torch.per_tensor_affine)
    obs = torch.ao.quantization.MinMaxObserver(dtype=dtype, qscheme=scheme, quant_min=spec.quant_min, quant_max=spec.quant_max)
    obs(torch.from_numpy(w))
    s, z = obs.calculate_qparams()
    assert q.scales.item() == s.item() and q.zero_points.item() == z.item()
    want = torch.fake_quantize_per_tensor_affine(torch.from_numpy(w), s.item(), int(z), spec.quant_min, spec.quant_max)
    np.testing.assert_array_equal(q.dequantize(), want.numpy())
    np.testing.assert_array_equal(q.int_repr(), lowbit.quantize_per_tensor(w, s.item(), int(z), spec.quant_min, spec.quant_max))
    # per channel
    spec = lowbit.QuantSpec(bits, symmetric=symmetric, granularity="channel", axis=0)
    q = lowbit.quantize(w, spec)
    scheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
    obs = torch.ao.quantization.PerChannelMinMaxObserver(ch_axis=0, dtype=dtype, qscheme=scheme, quant_min=spec.quant_min, quant_max=spec.quant_max)
    obs(torch.from_numpy(w))
    s, z = obs.calculate_qparams()
    np.testing.assert_array_equal(q.scales, s.numpy().astype(np.float32))
    np.testing.assert_array_equal(q.zero_points, z.numpy())
    want = torch.fake_quantize_per_channel_affine(torch.from_numpy(w), s.float(), z.int(), 0, spec.quant_min, spec.quant_max)
    np.testing.assert_array_equal(q.dequantize(), want.numpy())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,k", [(32, 128), (64, 128), (128, 128), (128, 300), (7, 50)])
def test_group_quantization_matches_reference(bits, group_size, k, rng):
    w = (rng.standard_normal((5, k)) * 0.5).astype(np.float32)
    spec = lowbit.QuantSpec(bits, granularity="group", group_size=group_size)
    q = lowbit.quantize(w, spec)
    ng = -(-k // group_size)
    assert q.scales.shape == (5, ng) and q.zero_points.shape == (5, ng)
    assert q.nbytes == -(-w.size * bits // 8) + 5 * ng * 5
    assert len(q.codes) == -(-w.size * bits // 8)
    # Reference: every group is a per-tensor min-max quantization of its own elements.
    for r in range(5):
        for j in range(ng):
            g = w[r, j * group_size : (j + 1) * group_size]
            ref = lowbit.quantize(g, lowbit.QuantSpec(bits))
            assert q.scales[r, j] == ref.scales.item()
            want = torch.fake_quantize_per_tensor_affine(torch.from_numpy(g), float(ref.scales), 0, spec.quant_min, spec.quant_max)
            np.testing.assert_array_equal(q.dequantize()[r, j * group_size : (j + 1) * group_size], want.numpy())


def test_quantized_tensor_save_and_load_round_trip(tmp_path, rng):
    w = (rng.standard_normal((16, 96)) * 0.5).astype(np.float32)
    for spec in [lowbit.QuantSpec(3, symmetric=False, granularity="group", group_size=32), lowbit.QuantSpec(4, granularity="channel", axis=1), lowbit.QuantSpec(8)]:
        q = lowbit.quantize(w, spec)
        path = tmp_path / "q.safetensors"
        q.save(path, name="w")
        loaded = lowbit.load_quantized(path)["w"]
        assert loaded.spec == spec
        np.testing.assert_array_equal(loaded.dequantize(), q.dequantize())
        np.testing.assert_array_equal(loaded.codes, q.codes)


def test_given_qparams_and_nan_rules(rng):
    w = (rng.standard_normal((4, 64))).astype(np.float32)
    spec = lowbit.QuantSpec(4, granularity="channel", axis=0)
    q = lowbit.quantize(w, spec, scales=np.full(4, 0.1, np.float32), zero_points=np.zeros(4, np.int32))
    np.testing.assert_array_equal(q.int_repr(), lowbit.quantize_per_channel(w, [0.1] * 4, [0] * 4, 0, -8, 7))
    bad = w.copy()
    bad[1, 3] = np.nan
    with pytest.raises(lowbit.LowbitValueError, match="NaN or Inf"):
        lowbit.quantize(bad, spec)


def test_quant_spec_is_a_value():
    import pickle

    s = lowbit.QuantSpec(4, granularity="group", group_size=128)
    assert s == pickle.loads(pickle.dumps(s)) and hash(s) == hash(lowbit.QuantSpec(4, granularity="group", group_size=128))
    assert (s.quant_min, s.quant_max) == (-8, 7)
    assert lowbit.QuantSpec(4, symmetric=False).quant_min == 0
    assert "group_size=128" in repr(s)
    for bad in [dict(bits=1), dict(bits=9), dict(bits=4, granularity="row"), dict(bits=4, granularity="group"), dict(bits=4, group_size=32), dict(bits=4, granularity="group", group_size=0)]:
        with pytest.raises(lowbit.LowbitValueError):
            lowbit.QuantSpec(**bad)


def test_per_tensor_spec_accepts_scalar_qparams(rng):
    w = rng.standard_normal((8, 32)).astype(np.float32)
    spec = lowbit.QuantSpec(4)
    q = lowbit.quantize(w, spec)
    for s, z in [(q.scales, q.zero_points), (float(q.scales), 0), (np.float32(q.scales), np.int32(0))]:
        q2 = lowbit.quantize(w, spec, scales=s, zero_points=z)
        np.testing.assert_array_equal(q2.codes, q.codes)


@pytest.mark.parametrize("sdtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_per_channel_multiplies_by_torchs_float64_scale(sdtype):
    """ATen's per-channel dequantize multiplies by the float64 scale (code 255, scale 1e-3:
    0.2549999952), where per-tensor dequantize rounds the scale to float32 first."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 256, (6, 33), generator=g, dtype=torch.uint8)
    q[0, 0] = 255
    s = (torch.rand(6, generator=g, dtype=torch.float64) * 0.05 + 1e-4).to(sdtype)
    s[0] = torch.tensor(1e-3, dtype=torch.float64).to(sdtype)
    z = torch.randint(0, 20, (6,), generator=g)
    z[0] = 0
    ref = torch._make_per_channel_quantized_tensor(q, s.double(), z, 0).dequantize()
    got = lowbit.dequantize_per_channel(q.numpy(), s, z.numpy(), 0)
    np.testing.assert_array_equal(got, ref.numpy())
    if sdtype == torch.float64:
        assert got[0, 0] == np.float32(0.255)


def test_bfloat16_scales_are_taken_and_refusals_say_why():
    x = torch.randn(4, 8)
    s = torch.full((4,), 0.1).bfloat16()
    z = torch.zeros(4, dtype=torch.int32)
    got = lowbit.fake_quantize_per_channel_affine(x, s, z, 0, -8, 7)
    assert torch.equal(got, torch.fake_quantize_per_channel_affine(x, s.float(), z, 0, -8, 7))
    with pytest.raises(lowbit.LowbitTypeError, match="float zero points"):
        lowbit.fake_quantize_per_channel_affine(x, s, z.float(), 0, -8, 7)
    with pytest.raises(lowbit.LowbitValueError, match="2\\^24.*qint32"):
        lowbit.fake_quantize_per_tensor_affine(x, 0.1, 0, -(2**31), 2**31 - 1)
    with pytest.raises(lowbit.LowbitValueError, match="0 or Inf in float32"):
        lowbit.fake_quantize_per_tensor_affine(x, 1e-50, 0, -8, 7)


@pytest.mark.parametrize("per_channel", [False, True])
def test_qparams_with_requires_grad_raise_as_torch_does(per_channel):
    x = torch.randn(4, 8, requires_grad=True)
    if per_channel:
        s, z = torch.full((4,), 0.1, requires_grad=True), torch.zeros(4, dtype=torch.int32)
        with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'scale'"):
            torch.fake_quantize_per_channel_affine(x, s, z, 0, -8, 7)
        with pytest.raises(lowbit.LowbitValueError, match="not differentiable with respect to argument 'scale'"):
            lowbit.fake_quantize_per_channel_affine(x, s, z, 0, -8, 7)
    else:
        s = torch.tensor(0.1, requires_grad=True)
        with pytest.raises(lowbit.LowbitValueError, match="not differentiable with respect to argument 'scale'"):
            lowbit.fake_quantize_per_tensor_affine(x, s, 0, -8, 7)
    with torch.no_grad():
        lowbit.fake_quantize_per_tensor_affine(x, torch.tensor(0.1, requires_grad=True), 0, -8, 7)
