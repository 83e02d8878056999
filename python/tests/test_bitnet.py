"""BitNet quantizers and kernels: exact integers against NumPy, parity with the transformers recipe."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
import lowbit.bitnet as bn


def hf_weight_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' BitNet `WeightQuant` (absmean), returning codes and s."""
    s = 1 / w.abs().mean().clamp(min=1e-5)
    return (w * s).round().clamp(-1, 1), s


def hf_activation_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
    return (x * s).round().clamp(-128, 127), s


def test_ternary_quantize_matches_the_transformers_recipe(rng):
    for shape in [(64, 300), (1, 7), (128, 128)]:
        w = rng.standard_normal(shape).astype(np.float32) * 0.02
        codes, scale = lowbit.ternary_quantize(w)
        tc, ts = hf_weight_quant(torch.from_numpy(w))
        # torch sums |w| in float32 with its own blocking, lowbit in float64: s agrees to an ulp
        assert abs(scale - 1 / ts.item()) <= 2 * np.spacing(np.float32(scale))
        assert np.array_equal(codes, tc.numpy().astype(np.int8))
        pc, ps = lowbit.ternary_quantize(w, per_channel=True)
        for i in range(shape[0]):
            rc, rs = hf_weight_quant(torch.from_numpy(w[i : i + 1]))
            assert np.array_equal(pc[i], rc.numpy().astype(np.int8)[0])
    codes, scale = lowbit.ternary_quantize(np.zeros((2, 3), np.float32))
    assert not codes.any() and scale == pytest.approx(1e-5)


def test_activation_quant_matches_the_transformers_recipe(rng):
    x = rng.standard_normal((33, 257)).astype(np.float32) * 3
    x[3] = 0.0
    x[4, :5] = [0.5, -0.5, 1.5, 2.5, -2.5]
    q, s = lowbit.activation_quant(x)
    tq, ts = hf_activation_quant(torch.from_numpy(x))
    assert np.array_equal(q, tq.numpy().astype(np.int8))
    assert np.array_equal(s, ts.numpy()[:, 0])
    q4, s4 = lowbit.activation_quant(x, bits=4)
    assert q4.min() >= -8 and q4.max() <= 7
    with pytest.raises(lowbit.LowbitValueError, match="NaN or Inf"):
        lowbit.activation_quant(np.array([[1.0, np.inf]], np.float32))


def test_binary_quantize(rng):
    w = rng.standard_normal((16, 40)).astype(np.float32)
    w[0, 0] = w.mean()  # exactly on the mean -> +1
    signs, scales = lowbit.binary_quantize(w)
    want = np.where(w - np.float32(w.astype(np.float64).mean()) >= 0, 1, -1)
    assert np.array_equal(signs, want)
    np.testing.assert_allclose(scales, np.abs(w).mean(axis=1), rtol=1e-6)


@pytest.mark.parametrize("m,n,k", [(1, 4096 // 64, 4096 // 64), (1, 7, 1), (3, 5, 127), (4, 9, 129), (17, 33, 1000), (64, 16, 640), (2, 3, 8)])
def test_ternary_linear_is_exact(m, n, k, rng):
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    layer = bn.TernaryLinear.from_float(w, bias=b)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, 0] = 0.0
    if m > 2:
        x[1] = 0.0  # an all-zero row
    q, sx = lowbit.activation_quant(x)
    codes, sw = lowbit.ternary_quantize(w)
    acc = q.astype(np.int64) @ codes.astype(np.int64).T
    assert np.array_equal(layer._core.int_matmul(q), acc)
    want = (acc * (np.float64(sw) / sx.astype(np.float64)[:, None]) + b.astype(np.float64)).astype(np.float32)
    assert np.array_equal(layer(x), want)
    assert layer.nbytes == n * (-(-k // 128)) * 32


def test_ternary_linear_shapes_tensors_and_errors(rng):
    w = rng.standard_normal((6, 20)).astype(np.float32)
    layer = bn.TernaryLinear.from_float(torch.from_numpy(w), per_channel=True)
    x = torch.randn(2, 3, 20)
    y = layer(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3, 6)
    assert torch.equal(y[1, 2], layer(x[1, 2:3])[0])
    with pytest.raises(lowbit.LowbitValueError, match="shape"):
        layer(np.ones((2, 21), np.float32))
    with pytest.raises(lowbit.LowbitValueError, match="NaN"):
        layer(np.full((1, 20), np.nan, np.float32))
    with pytest.raises(lowbit.LowbitTypeError):
        layer(np.ones((1, 20), np.int32))
    with pytest.raises(lowbit.LowbitValueError):
        bn.TernaryLinear(np.full((2, 2), 2, np.int8), 1.0)
    with pytest.raises(lowbit.LowbitValueError):
        bn.TernaryLinear(np.zeros((2, 2), np.int8), [1.0, 2.0, 3.0])


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (3, 5, 63), (4, 7, 64), (2, 3, 65), (9, 17, 1000), (1, 33, 4096)])
def test_binary_matmul_is_exact(m, n, k, rng):
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((n, k)).astype(np.float32)
    a[0, 0] = 0.0
    a[0, -1] = -0.0
    sign = lambda v: np.where(v >= 0, 1, -1).astype(np.int64)  # noqa: E731
    want = sign(a) @ sign(b).T
    assert np.array_equal(bn.binary_matmul(a, b), want)
    pa, pb = bn.pack_signs(a), bn.pack_signs(b)
    assert np.array_equal(bn.binary_matmul(pa, pb), want)
    assert pb.nbytes == n * (-(-k // 64)) * 8
    with pytest.raises(lowbit.LowbitValueError, match="NaN"):
        bn.pack_signs(np.array([[np.nan]], np.float32))
    with pytest.raises(lowbit.LowbitValueError, match="inner"):
        bn.binary_matmul(a, b[:, :-1] if k > 1 else np.ones((1, 2), np.float32))


def test_binary_linear(rng):
    w = rng.standard_normal((8, 100)).astype(np.float32)
    layer = bn.BinaryLinear.from_float(w)
    x = rng.standard_normal((5, 100)).astype(np.float32)
    signs, scales = lowbit.binary_quantize(w)
    sx = np.where(x >= 0, 1, -1)
    want = (sx @ signs.astype(np.int64).T) * np.abs(x).mean(axis=1, dtype=np.float64)[:, None] * scales.astype(np.float64)
    assert np.array_equal(layer(x), want.astype(np.float32))
    assert layer.nbytes == 8 * 2 * 8


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 6), n=st.integers(1, 9), k=st.integers(1, 300), seed=st.integers(0, 2**31))
def test_property_ternary_and_binary_integers(m, n, k, seed):
    r = np.random.default_rng(seed)
    codes = r.integers(-1, 2, (n, k)).astype(np.int8)
    q = r.integers(-128, 128, (m, k)).astype(np.int8)
    layer = bn.TernaryLinear(codes, 1.0)
    assert np.array_equal(layer.codes, codes)
    assert np.array_equal(layer._core.int_matmul(q), q.astype(np.int64) @ codes.astype(np.int64).T)
    a, b = r.standard_normal((m, k)).astype(np.float32), r.standard_normal((n, k)).astype(np.float32)
    assert np.array_equal(bn.binary_matmul(a, b), np.where(a >= 0, 1, -1) @ np.where(b >= 0, 1, -1).T)


def test_scalar_kernels_give_the_same_integers(tmp_path):
    """Every kernel path this machine has, in fresh processes."""
    script = """
import numpy as np, lowbit.bitnet as bn
r = np.random.default_rng(3)
codes = r.integers(-1, 2, (37, 1000)).astype(np.int8)
q = r.integers(-128, 128, (9, 1000)).astype(np.int8)
a, b = r.standard_normal((9, 777)).astype(np.float32), r.standard_normal((37, 777)).astype(np.float32)
t = bn.TernaryLinear(codes, 1.0)._core.int_matmul(q)
qp = r.integers(-128, 128, (140, 1000)).astype(np.int8)  # the panel path (m >= 128)
tp = bn.TernaryLinear(codes, 1.0)._core.int_matmul(qp)
assert np.array_equal(tp, qp.astype(np.int64) @ codes.astype(np.int64).T)
x = bn.binary_matmul(a, b)
ones, signs = np.ones((3, 65543), np.float32), np.where(r.random((5, 65543)) < 0.5, -1.0, 1.0).astype(np.float32)
y = bn.binary_matmul(np.vstack([ones, -ones]), np.vstack([signs, ones]))
assert np.array_equal(y, np.sign(np.vstack([ones, -ones])) @ np.sign(np.vstack([signs, ones])).T)
print(bn.kernel(), int(t.astype(np.int64).sum()), int(np.abs(t).sum()), int(tp.astype(np.int64).sum()), int(x.sum()), int(np.abs(x).sum()), int(y.sum()))
"""
    outs = {}
    for path in ["scalar", "avx2", "avxvnni", "avx512vnni"]:
        r = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, LOWBIT_ISA=path), capture_output=True, text=True, check=True)
        kind, *sums = r.stdout.split()
        outs[kind] = sums
    print("kernel paths run:", sorted(outs))
    assert "scalar" in outs
    assert len(set(map(tuple, outs.values()))) == 1


def test_ternary_extremes_are_exact_on_every_kernel_path():
    """The AVX2 kernel sums products in 16-bit lanes for 2048 weights at a time: activations all
    -128 against weights all +1 reach the bound exactly; every row/column remainder of the register
    blocks (m = 1..9, odd n) and long rows (k = 65543) must still give NumPy's int64 integers."""
    script = """
import numpy as np, lowbit.bitnet as bn
r = np.random.default_rng(5)
bad = []
for k in (2048, 4096, 65536 + 7):
    for n in (1, 3, 5):
        for codes in (np.ones((n, k), np.int8), -np.ones((n, k), np.int8), r.integers(-1, 2, (n, k)).astype(np.int8)):
            t = bn.TernaryLinear(codes, 1.0)._core
            for m in range(1, 10):
                for q in (np.full((m, k), -128, np.int8), np.full((m, k), 127, np.int8), r.integers(-128, 128, (m, k)).astype(np.int8)):
                    if not np.array_equal(t.int_matmul(q), q.astype(np.int64) @ codes.astype(np.int64).T):
                        bad.append((k, n, m))
print(bn.kernel(), len(bad), bad[:3])
"""
    kinds = set()
    for path in ["scalar", "avx2", "avxvnni", "avx512vnni"]:
        r = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, LOWBIT_ISA=path), capture_output=True, text=True, check=True)
        kind, nbad, *rest = r.stdout.split(maxsplit=2)
        assert nbad == "0", r.stdout
        kinds.add(kind)
    assert "scalar" in kinds


def test_bitlinear_trains_with_the_ste_and_runs_the_kernel_in_eval():
    import lowbit.torch as lt

    torch.manual_seed(0)
    ref = torch.nn.Linear(96, 24)
    layer = lt.BitLinear.from_linear(ref)
    x = torch.randn(5, 96, requires_grad=True)
    y = layer(x)
    # an independent straight-through implementation of the BitNet b1.58 recipe
    w = ref.weight.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    sw = 1 / w.detach().abs().mean().clamp(min=1e-5)
    wq = (w.detach() * sw).round().clamp(-1, 1) / sw
    sx = 127 / x2.detach().abs().amax(-1, keepdim=True).clamp(min=1e-5)
    xq = (x2.detach() * sx).round().clamp(-128, 127) / sx
    y2 = torch.nn.functional.linear(x2 + (xq - x2.detach()), w + (wq - w.detach()), ref.bias)
    assert torch.allclose(y, y2, rtol=0, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    assert torch.equal(x.grad, x2.grad) and torch.equal(layer.weight.grad, w.grad)
    # eval: the packed kernel on the same integers
    layer.eval()
    with torch.no_grad():
        fast = layer(x.detach())
        slow = torch.nn.functional.linear(xq, wq, ref.bias)
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-5)
    kernel = bn.TernaryLinear.from_float(ref.weight.detach().numpy(), ref.bias.detach().numpy())
    assert torch.equal(fast, torch.from_numpy(kernel(x.detach().numpy())))
    # weights changed -> repacked
    with torch.no_grad():
        layer.weight.mul_(-1)
        assert torch.equal(layer(x.detach()), torch.from_numpy(bn.TernaryLinear.from_float(-ref.weight.detach().numpy(), ref.bias.detach().numpy())(x.detach().numpy())))


@pytest.mark.parametrize("k", [64, 384, 1536, 4099])
def test_bitlinear_training_forward_equals_the_kernel_bit_for_bit(k):
    """The STE forward's value is the integer product as the kernel computes it, so a QAT
    model predicts the deployed one exactly, whatever in_features is (a float fake-quant GEMM
    drifts with k); adversarial rows: all equal, one spike, exact halves, zeros."""
    import lowbit.torch as lt

    torch.manual_seed(k)
    layer = lt.BitLinear(k, 37).train()
    x = torch.randn(9, k) * torch.logspace(-3, 3, 9)[:, None]
    x[1] = 0.5
    x[2] = 0.0
    x[3, 0] = 1e4
    x[4] = torch.arange(k) % 3 - 1.0
    y = layer(x)
    kernel = bn.TernaryLinear.from_float(layer.weight.detach().numpy(), layer.bias.detach().numpy())
    assert torch.equal(y.detach(), torch.from_numpy(kernel(x.numpy())))


@settings(max_examples=80, deadline=None)
@given(shape=st.lists(st.integers(0, 7), min_size=1, max_size=3).map(tuple).filter(lambda s: s[-1] > 0 or len(s) == 1), bits=st.sampled_from([1, 2, 3, 4, 8]), seed=st.integers(0, 2**31), signed=st.booleans())
def test_pack_round_trips_and_sizes(shape, bits, seed, signed):
    r = np.random.default_rng(seed)
    if signed:
        codes = r.integers(-(1 << (bits - 1)), 1 << (bits - 1), shape).astype(np.int8)
    else:
        codes = r.integers(0, 1 << bits, shape).astype(np.uint8)
    p = lowbit.pack(codes, bits)
    assert p.dtype == np.uint8 and p.shape == shape[:-1] + (-(-shape[-1] * bits // 8),)
    assert np.array_equal(lowbit.unpack(p, bits, shape, signed=signed), codes)
    # the layout: LSB-first bit stream per row
    if not signed and codes.size:
        row = codes.reshape(-1, shape[-1])[0]
        bitstream = "".join(format(int(c), f"0{bits}b")[::-1] for c in row)
        packed_bits = "".join(format(int(b), "08b")[::-1] for b in p.reshape(-1, p.shape[-1])[0])
        assert packed_bits.startswith(bitstream)


@settings(max_examples=60, deadline=None)
@given(shape=st.tuples(st.integers(1, 5), st.integers(1, 40)), seed=st.integers(0, 2**31))
def test_ternary_formats_round_trip(shape, seed):
    codes = np.random.default_rng(seed).integers(-1, 2, shape).astype(np.int8)
    for fmt, per_byte in [("i2", 4), ("tq1", 5)]:
        p = lowbit.pack_ternary(codes, fmt)
        assert p.shape == (shape[0], -(-shape[1] // per_byte))
        assert np.array_equal(lowbit.unpack_ternary(p, shape, fmt), codes)
    t = lowbit.pack_ternary(codes, "tq1")
    digits = [(int(t[0, i // 5]) // 3 ** (i % 5)) % 3 - 1 for i in range(shape[1])]
    assert digits == codes[0].tolist()


def test_pack_errors():
    with pytest.raises(lowbit.LowbitValueError):
        lowbit.pack(np.array([4], np.uint8), 2)
    with pytest.raises(lowbit.LowbitValueError):
        lowbit.pack(np.array([2], np.int8), 2)
    with pytest.raises(lowbit.LowbitTypeError):
        lowbit.pack(np.array([1.0]), 2)
    with pytest.raises(lowbit.LowbitValueError):
        lowbit.unpack(np.zeros((2, 1), np.uint8), 4, (2, 3))
    with pytest.raises(lowbit.LowbitValueError):
        lowbit.pack_ternary(np.array([[2]], np.int8))
    with pytest.raises(lowbit.LowbitValueError):
        lowbit.pack_ternary(np.array([[1]], np.int8), "q4")


def _recipe_weight(w):
    """transformers' WeightQuant, evaluated eagerly: codes and s (w ~ codes / s)."""
    x = w.float()
    s = 1.0 / x.abs().mean().clamp_(min=1e-5)
    return (x * s).round().clamp(-1, 1), s


def _recipe_act(x):
    """transformers' ActQuant / BitLinear.activation_quant: codes and s (x ~ codes / s)."""
    x = x.float()
    s = 127 / x.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
    return (x * s).round().clamp(-128, 127), s


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_ternary_scale_is_torchs_float32_mean_to_the_bit(threads):
    """The mean is added in torch's float32 order (a float64 mean was 1 ulp off in 20-70% of
    seeds and flipped codes at rounding boundaries); torch splits large sums over threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cases = [torch.tensor([[0.757, 0.795, 0.573]])]
        g = torch.Generator().manual_seed(231)
        cases.append(torch.randn(10, 10, generator=g))
        for n in (1, 7, 8, 9, 16, 17, 100, 1000, 4099, 32767, 32768, 40000, 65537, 300_000):
            for seed in range(12 if n < 40000 else 2):
                g = torch.Generator().manual_seed(seed)
                cases.append(torch.randn(n, generator=g) * (0.02 if seed % 2 else 1.0))
        for w in cases:
            tc, ts = _recipe_weight(w)
            codes, scale = lowbit.ternary_quantize(w.numpy())
            assert np.float32(scale) == (1 / ts).item(), (w.shape, scale, (1 / ts).item())
            np.testing.assert_array_equal(codes, tc.numpy().astype(np.int8))
    finally:
        torch.set_num_threads(old)


def test_ternary_quantize_any_shape_dtype_and_layout():
    g = torch.Generator().manual_seed(0)
    for shape in [(5,), (3, 4, 5), (2, 3, 4, 6), (0, 4), (64, 48)]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            w = torch.randn(*shape, generator=g).to(dtype)
            codes, scale = lowbit.ternary_quantize(w)
            tc, ts = _recipe_weight(w)
            assert codes.shape == tuple(shape)
            np.testing.assert_array_equal(codes, tc.numpy().astype(np.int8))
            if w.numel():
                assert np.float32(scale) == (1 / ts).item()
    w = torch.randn(48, 64, generator=g)
    codes, scale = lowbit.ternary_quantize(w.numpy().T)  # a transposed view: torch's memory order
    tc, ts = _recipe_weight(w.T)
    np.testing.assert_array_equal(codes, tc.numpy())
    assert np.float32(scale) == (1 / ts).item()


def test_ternary_per_channel_is_torchs_row_mean():
    g = torch.Generator().manual_seed(1)
    for shape in [(7, 3), (16, 129), (5, 4, 9)]:
        w = torch.randn(*shape, generator=g)
        codes, scale = lowbit.ternary_quantize(w, per_channel=True)
        s = 1.0 / w.reshape(shape[0], -1).abs().mean(dim=1, keepdim=True).clamp(min=1e-5)
        np.testing.assert_array_equal(scale, (1 / s).flatten().numpy())
        np.testing.assert_array_equal(codes, (w.reshape(shape[0], -1) * s).round().clamp(-1, 1).reshape(shape).numpy())
    with pytest.raises(lowbit.LowbitValueError, match="per_channel"):
        lowbit.ternary_quantize(np.ones(4, np.float32), per_channel=True)


def test_activation_quant_any_leading_dims_is_the_recipe():
    g = torch.Generator().manual_seed(2)
    for shape in [(4,), (2, 3, 8), (2, 2, 2, 5), (3, 0, 4)]:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = (torch.randn(*shape, generator=g) * 3).to(dtype)
            q, s = lowbit.activation_quant(x)
            tq, ts = _recipe_act(x)
            assert q.shape == tuple(shape) and s.shape == tuple(shape[:-1])
            np.testing.assert_array_equal(q, tq.numpy().astype(np.int8))
            np.testing.assert_array_equal(s, ts[..., 0].numpy())
    q, s = lowbit.activation_quant(torch.tensor([[1.0, -1.0, -1.0, 1.0], [1.0, -1.0, 1.0, 1.0]]))
    np.testing.assert_array_equal(q / 127, [[1, -1, -1, 1], [1, -1, 1, 1]])
    np.testing.assert_array_equal(s, [127, 127])


def test_bitlinear_training_equals_eval_over_many_seeds_and_shapes():
    """The training (STE) forward and the packed kernel give the same bits."""
    lt = pytest.importorskip("lowbit.torch")
    for seed in range(40):
        torch.manual_seed(seed)
        k, n, m = (int(v) for v in torch.randint(1, 300, (3,)))
        layer = lt.BitLinear(k, n % 70 + 1, bias=bool(seed % 2))
        x = torch.randn(m % 17 + 1, k) * (10.0 if seed % 3 == 0 else 1.0)
        y_train = layer(x)
        with torch.no_grad():
            y_eval = layer.eval()(x)
        assert torch.equal(y_train.detach(), y_eval), (seed, k, n, m)
    torch.manual_seed(2)
    layer = lt.BitLinear(64, 37)
    x = torch.randn(9, 64)
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(y.detach(), layer.eval()(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bitlinear_half_precision_quantizes_in_float32_like_the_recipe(dtype):
    lt = pytest.importorskip("lowbit.torch")
    torch.manual_seed(0)
    layer = lt.BitLinear(256, 32, bias=False).to(dtype)
    x = torch.randn(4, 256).to(dtype).requires_grad_()
    y = layer(x)
    assert y.dtype == dtype
    y.float().square().sum().backward()
    # The recipe (AutoBitLinear online): F.linear(ActQuant(x), WeightQuant(w)), straight through.
    tq, ts = _recipe_act(x.detach())
    wq, ws = _recipe_weight(layer.weight.detach())
    xr = (tq / ts).to(dtype).requires_grad_()
    wr = (wq / ws).to(dtype).requires_grad_()
    yr = torch.nn.functional.linear(xr, wr)
    gy = 2 * y.detach().float()
    yr.backward(gy.to(dtype))
    torch.testing.assert_close(y.float(), yr.float(), rtol=1e-2, atol=1e-2)  # exact integer product vs half matmul
    assert torch.equal(x.grad, xr.grad)
    assert torch.equal(layer.weight.grad, wr.grad)


INT_SPECS = [dict(bits=8, granularity="channel", axis=0), dict(bits=4, granularity="group", group_size=32),
             dict(bits=4, symmetric=False, granularity="group", group_size=64),
             dict(bits=3, symmetric=False, granularity="group", group_size=20), dict(bits=2, granularity="tensor"),
             dict(bits=6, symmetric=False, granularity="channel", axis=0)]


def _int_reference(q: lowbit.QuantizedTensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """PyTorch's product of the transformers recipe's int8 activations with the dequantized
    weights, in float64 (the kernels' sums are exact; only their float rescale rounds)."""
    codes, s = hf_activation_quant(x)  # codes = round(x * s), s = 127 / absmax
    y = codes.double() @ torch.from_numpy(q.dequantize()).double().T / s.double()
    return (y if bias is None else y + bias.double()).float()


@pytest.mark.parametrize("spec", INT_SPECS, ids=lambda d: "-".join(f"{v}" for v in d.values()))
def test_int_linear_equals_torch_on_the_quantized_operands(spec):
    """IntLinear (W8A8 / W4A8 on a QuantizedTensor's codes) equals PyTorch multiplying the
    transformers recipe's int8 activations with the dequantized weights, on random, constant,
    one-sided, zero and tiny rows, with and without a bias; every kernel path this CPU has
    gives the same bits (the ones it lacks are named)."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(37, 100, generator=g)
    q = lowbit.quantize(w, lowbit.QuantSpec(**spec))
    bias = torch.randn(37, generator=g)
    x = torch.randn(9, 100, generator=g)
    x[1] = 3.0                       # constant
    x[2] = x[2].abs()                # one-sided
    x[3] = 0.0                       # zero row
    x[4] = torch.randn(100, generator=g) * 1e-30  # tiny range
    x[5, ::7] = 0.0                  # ties and zeros
    paths = bn.intgemm_paths()
    missing = {"avx2", "avxvnni", "avx512vnni"} - set(paths)
    if missing:
        print(f"integer GEMM paths not on this CPU (or capped by LOWBIT_ISA), not run: {sorted(missing)}")
    for b in (None, bias):
        layer = bn.IntLinear(q, None if b is None else b.numpy())
        want = _int_reference(q, x, b)
        outs = [layer.forward(x, path=p) for p in paths]
        assert all(torch.equal(outs[0], o) for o in outs[1:]), paths
        assert isinstance(outs[-1], torch.Tensor) and outs[-1].dtype == torch.float32
        torch.testing.assert_close(outs[-1], want, rtol=2e-6, atol=2e-6)
    # Non-contiguous and 3-D input, an empty batch; NumPy in, NumPy out.
    layer = bn.IntLinear(q)
    xt = torch.randn(100, 6, generator=g).T
    torch.testing.assert_close(layer(xt), _int_reference(q, xt.contiguous(), None), rtol=2e-6, atol=2e-6)
    x3 = torch.randn(2, 3, 100, generator=g)
    assert torch.equal(layer(x3), layer(x3.reshape(6, 100)).reshape(2, 3, 37))
    assert layer(np.zeros((0, 100), np.float32)).shape == (0, 37)
    assert isinstance(layer(x.numpy()), np.ndarray)


def test_int_linear_keeps_int4_at_half_a_byte_and_refuses_what_it_cannot_take():
    w = torch.randn(64, 256)
    q4 = lowbit.quantize(w, lowbit.QuantSpec(4, granularity="group", group_size=32))
    q8 = lowbit.quantize(w, lowbit.QuantSpec(8, granularity="channel", axis=0))
    n4, n8 = bn.IntLinear(q4).nbytes, bn.IntLinear(q8).nbytes
    # Codes, and per group of each 16-column panel 16 scales (symmetric: one offset for all, kept aside).
    assert n4 == 64 * 256 // 2 + (64 // 16) * (256 // 32) * 64
    assert n8 == 64 * 256 + (64 // 16) * 64
    # Zero points that differ by column add 16 offsets per group and panel.
    qa = lowbit.quantize(w, lowbit.QuantSpec(4, symmetric=False, granularity="group", group_size=32))
    assert bn.IntLinear(qa).nbytes == 64 * 256 // 2 + (64 // 16) * (256 // 32) * 128
    with pytest.raises(lowbit.LowbitValueError, match="integer GEMM"):
        bn.IntLinear(lowbit.quantize(torch.randn(4, 3, 8), lowbit.QuantSpec(4, granularity="group", group_size=4)))
    with pytest.raises(lowbit.LowbitValueError, match="integer GEMM"):  # per input channel
        bn.IntLinear(lowbit.quantize(w, lowbit.QuantSpec(8, granularity="channel", axis=1)))
    with pytest.raises(lowbit.LowbitTypeError):
        bn.IntLinear(w)  # type: ignore[arg-type]
    layer = bn.IntLinear(q8)
    with pytest.raises(lowbit.LowbitValueError, match="path"):
        layer(torch.randn(2, 256), path="sse9")
    bad = torch.randn(2, 256)
    bad[1, 3] = float("nan")
    with pytest.raises(lowbit.LowbitValueError, match="NaN"):
        layer(bad)


def test_int_linear_paths_under_every_isa_cap():
    """LOWBIT_ISA caps the integer GEMM too: each allowed cap gives the same bits."""
    code = ("import numpy as np, lowbit, lowbit.bitnet as bn; g = np.random.default_rng(0); "
            "q = lowbit.quantize(g.standard_normal((40, 72)).astype(np.float32), lowbit.QuantSpec(4, granularity='group', group_size=24)); "
            "y = bn.IntLinear(q)(g.standard_normal((5, 72)).astype(np.float32)); "
            "print(bn.intgemm_paths()[-1], y.tobytes().hex())")
    outs = {}
    for cap in ("scalar", "avx2", "avxvnni", "avx512vnni"):
        r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LOWBIT_ISA": cap}, capture_output=True,
                           text=True, check=True)
        path, y = r.stdout.split()
        outs[path] = y
    assert len(set(outs.values())) == 1, outs.keys()
    print(f"integer GEMM paths compared through LOWBIT_ISA: {sorted(outs)}")
