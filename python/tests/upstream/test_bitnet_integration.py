"""transformers' BitNet integration (``src/transformers/integrations/bitnet.py``) and its tests
(``tests/quantization/bitnet_integration/test_bitnet.py``), adapted: the recipe's quantizers and
its 2-bit packing, evaluated eagerly here (upstream wraps them in ``torch.compile``), against
lowbit's ``activation_quant``, ``ternary_quantize``, ``pack`` / ``pack_ternary``,
``TernaryLinear`` and ``lowbit.torch.BitLinear`` on the same inputs, over many seeds and shapes,
with float32 / bfloat16 / float16 inputs (the recipe converts them to float32 first).

Packing layouts: the recipe packs along dim 0, value ``i`` of packed row ``r`` being row
``i * ceil(N / 4) + r`` at bits ``2i``; lowbit packs along the last axis, four consecutive codes
per byte, code ``j`` at bits ``2j``. Moving the recipe's four row blocks to a last axis of size 4
maps one onto the other exactly (``_to_lowbit_layout``), padding rows as the recipe pads them (a
zero field, ternary code -1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lowbit
import lowbit.bitnet as bn
import lowbit.torch as lt

from ._reference import assert_bits_equal, dtype_id

VALUES_PER_ITEM = 4
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SEEDS = range(8)
SHAPES = [(1, 1), (1, 7), (3, 5), (8, 128), (33, 100), (64, 300), (5, 1027)]



def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- the recipe, evaluated eagerly ----------------------------------------------------------------


def recipe_weight_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """WeightQuant.forward: ``s = 1 / x.float().abs().mean().clamp(min=1e-5)``,
    ``(x * s).round().clamp(-1, 1) / s`` cast back; returns (fake-quant weight, codes, s)."""
    x = w.float()
    s = 1.0 / x.abs().mean().clamp_(min=1e-5)
    codes = (x * s).round().clamp(-1, 1)
    return (codes / s).to(w.dtype), codes, s


def recipe_act_quant(a: torch.Tensor, num_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ActQuant.forward (``num_bits=8``) / BitLinear.activation_quant on the float32 input:
    ``s = Qp / x.abs().max(-1, keepdim=True).values.clamp(min=1e-5)``,
    ``(x * s).round().clamp(Qn, Qp)``; returns (fake-quant activation cast back, codes, s)."""
    qn, qp = -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
    x = a.float()
    s = qp / x.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
    codes = (x * s).round().clamp(qn, qp)
    return (codes / s).to(a.dtype), codes, s


def recipe_pack_weights(quantized: torch.Tensor) -> torch.Tensor:
    """pack_weights: values + 1 at 2 bits, four row blocks of ceil(N / 4) rows per byte."""
    n = quantized.shape[0]
    row_dim = (n + VALUES_PER_ITEM - 1) // VALUES_PER_ITEM
    packed = torch.zeros((row_dim, *quantized.shape[1:]), dtype=torch.uint8)
    fields = (quantized + 1).to(torch.uint8)
    for i in range(VALUES_PER_ITEM):
        start, end = i * row_dim, min((i + 1) * row_dim, n)
        if start >= end:
            break
        packed[: end - start] |= fields[start:end] << (2 * i)
    return packed


def recipe_unpack_weights(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """unpack_weights: the four 2-bit fields of each byte to four row blocks, minus 1."""
    rows = packed.shape[0]
    out = torch.zeros((rows * VALUES_PER_ITEM, *packed.shape[1:]), dtype=torch.uint8)
    for i in range(VALUES_PER_ITEM):
        out[i * rows : (i + 1) * rows] = (packed & (3 << (2 * i))) >> (2 * i)
    return out.to(dtype) - 1


def _to_lowbit_layout(codes: np.ndarray) -> np.ndarray:
    """(N, ...) recipe-ordered values -> (ceil(N/4), ..., 4), padded as a zero field: ternary
    code -1 for int8 codes, 0 for uint8 fields."""
    n = codes.shape[0]
    rows = -(-n // VALUES_PER_ITEM)
    pad = np.full((rows * VALUES_PER_ITEM - n, *codes.shape[1:]), -1 if codes.dtype == np.int8 else 0, codes.dtype)
    full = np.concatenate([codes, pad]).reshape(VALUES_PER_ITEM, rows, *codes.shape[1:])
    return np.moveaxis(full, 0, -1)


def _from_lowbit_layout(codes: np.ndarray) -> np.ndarray:
    """The inverse of _to_lowbit_layout, keeping the padding rows (as unpack_weights does)."""
    blocks = np.moveaxis(codes, -1, 0)
    return blocks.reshape(-1, *codes.shape[1:-1])


def _inputs(shape: tuple[int, ...], seed: int, dtype: torch.dtype, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=_gen(seed)) * std).to(dtype)


# ---- activation quantization ----------------------------------------------------------------------


class TestActivationQuant:
    def test_activation_quant(self):
        """test_bitnet.py::BitNetTest::test_activation_quant: [[1, -1, -1, 1], [1, -1, 1, 1]] with
        scale 127. Upstream asserts the int8 codes equal the input, which the recipe itself does
        not give (round(1 * 127) = 127; the test is @slow @require_torch_gpu and its assertEqual on
        two multi-element tensors cannot pass); here the codes equal the recipe's (±127), the codes
        divided by the scale equal the input, and the scale is 127, bit for bit."""
        x = torch.tensor([[1.0, -1.0, -1.0, 1.0], [1.0, -1.0, 1.0, 1.0]], dtype=torch.float32)
        q, s = lowbit.activation_quant(x)
        _, codes, rs = recipe_act_quant(x)
        assert q.dtype == np.int8
        assert_bits_equal(torch.from_numpy(q), codes.to(torch.int8))
        assert_bits_equal(torch.from_numpy(q).float() / torch.from_numpy(s)[:, None], x)
        assert s.tolist() == [127.0, 127.0]
        assert_bits_equal(torch.from_numpy(s), rs[:, 0])

    @pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
    @pytest.mark.parametrize("num_bits", [8, 4, 2])
    def test_activation_quant_matches_recipe(self, dtype, num_bits):
        """bitnet.py BitLinear.activation_quant / ActQuant.forward: per-row codes and multipliers
        ``s`` bit-identical to the recipe on the float32 input, over 8 seeds x 7 shapes; lowbit's
        codes / s (cast back) equal ActQuant's output."""
        for seed in SEEDS:
            for shape in SHAPES:
                x = _inputs(shape, seed, dtype, std=3.0)
                q, s = lowbit.activation_quant(x, num_bits)
                fq, codes, rs = recipe_act_quant(x, num_bits)
                assert_bits_equal(torch.from_numpy(q), codes.to(torch.int8))
                assert_bits_equal(torch.from_numpy(s), rs[:, 0])
                ours = (torch.from_numpy(q).float() / torch.from_numpy(s)[:, None]).to(dtype)
                assert torch.equal(ours, fq)  # by value: int8 codes carry no -0 (round(-0.3) is -0.0)

    def test_activation_quant_degenerate_rows(self):
        """ActQuant.forward on rows that are all zero (the 1e-5 clamp), tiny (denormal), huge
        (3e38), of one repeated value, and with .5 ties of the code grid: lowbit equals the recipe."""
        f32 = np.float32
        rows = [
            np.zeros(9, f32),
            np.full(9, 1e-40, f32),
            np.array([3e38, -3e38, 1.0, 0.0, -1e30, 5e37, 2.0, 7.0, -0.0], f32),
            np.full(9, -2.5, f32),
            np.array([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 126.5, -127.5, 63.5], f32),
            np.array([2.0**-10, 2.0**-11, -(2.0**-12), 0.0, 1e-6, 9.9e-6, 1e-5, 2e-5, -3e-6], f32),
        ]
        x = torch.from_numpy(np.stack(rows))
        q, s = lowbit.activation_quant(x)
        _, codes, rs = recipe_act_quant(x)
        assert_bits_equal(torch.from_numpy(q), codes.to(torch.int8))
        assert_bits_equal(torch.from_numpy(s), rs[:, 0])

    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
    def test_activation_quant_non_finite(self, bad):
        """ActQuant on a row with NaN / ±Inf propagates it (a NaN or zero scale); lowbit
        deliberately refuses such input with LowbitValueError."""
        x = torch.ones(2, 4)
        x[1, 2] = bad
        _, _, rs = recipe_act_quant(x)
        assert not torch.isfinite(rs).all() or (rs == 0).any()
        with pytest.raises(lowbit.LowbitValueError):
            lowbit.activation_quant(x)

    @pytest.mark.parametrize("shape", [(7,), (2, 3, 16)])
    def test_activation_quant_any_rank(self, shape):
        """ActQuant.forward takes (..., features) (BitLinear sees (batch, seq, hidden)): per-token
        codes over the last axis; lowbit must give the recipe's codes and multipliers."""
        x = _inputs(shape, 0, torch.float32, std=2.0)
        q, s = lowbit.activation_quant(x)
        _, codes, rs = recipe_act_quant(x)
        assert_bits_equal(torch.as_tensor(q), codes.to(torch.int8))
        assert_bits_equal(torch.as_tensor(s).reshape(rs.shape[:-1]), rs[..., 0])


# ---- weight quantization --------------------------------------------------------------------------


class TestWeightQuant:
    @pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
    def test_weight_quant_codes_match_recipe(self, dtype):
        """bitnet.py WeightQuant.forward: lowbit.ternary_quantize's int8 codes equal the recipe's
        ``(x * s).round().clamp(-1, 1)`` over 8 seeds x 7 shapes (weights ~ N(0, 0.02))."""
        for seed in SEEDS:
            for shape in SHAPES:
                w = _inputs(shape, seed, dtype, std=0.02)
                codes, _ = lowbit.ternary_quantize(w)
                _, rcodes, _ = recipe_weight_quant(w)
                assert codes.dtype == np.int8
                assert_bits_equal(torch.from_numpy(codes), rcodes.to(torch.int8))

    @pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
    def test_weight_quant_scale_matches_recipe(self, dtype):
        """bitnet.py WeightQuant.forward: lowbit's scale equals the recipe's 1 / s bit for bit, so
        codes * scale equals the recipe's fake-quant weight, over 8 seeds x 7 shapes."""
        for seed in SEEDS:
            for shape in SHAPES:
                w = _inputs(shape, seed, dtype, std=0.02)
                codes, scale = lowbit.ternary_quantize(w)
                fq, _, s = recipe_weight_quant(w)
                assert np.float32(scale) == (1.0 / s).item(), f"seed {seed}, shape {shape}"
                ours = (torch.from_numpy(codes).float() * np.float32(scale)).to(dtype)
                assert ours.dtype == fq.dtype and torch.equal(ours, fq)  # by value: int8 codes carry no -0

    def test_weight_quant_degenerate(self):
        """WeightQuant.forward on all-zero weights (the 1e-5 clamp: codes 0), one weight, a constant
        matrix, and exact .5 ties (mean |w| = 1, so s = 1): lowbit's codes and scale equal the recipe's."""
        cases = [
            torch.zeros(3, 4),
            torch.tensor([[0.7]]),
            torch.full((2, 5), -0.3),
            torch.tensor([[0.5, 1.5, -0.5, -1.5], [2.5, -2.5, 0.25, -0.25]]) / 1.25,
            torch.tensor([[0.5, 1.5, -0.5, -1.5]]),
        ]
        for w in cases:
            codes, scale = lowbit.ternary_quantize(w)
            _, rcodes, s = recipe_weight_quant(w)
            assert_bits_equal(torch.from_numpy(codes), rcodes.to(torch.int8))
            assert np.float32(scale) == (1.0 / s).item()

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_weight_quant_non_finite(self, bad):
        """WeightQuant on weights with NaN / Inf propagates it; lowbit deliberately refuses them
        with LowbitValueError."""
        w = torch.ones(2, 4)
        w[0, 1] = bad
        with pytest.raises(lowbit.LowbitValueError):
            lowbit.ternary_quantize(w)

    @pytest.mark.parametrize("shape", [(10,), (4, 3, 8), (2, 3, 4, 50)])
    def test_weight_quant_any_rank(self, shape):
        """WeightQuant.forward takes a weight of any rank (one mean over all of it); lowbit's codes
        (shaped like the weight) and scale must equal the recipe's, 5 seeds."""
        for seed in range(5):
            w = _inputs(shape, seed, torch.float32, std=0.02)
            codes, scale = lowbit.ternary_quantize(w)
            _, rcodes, s = recipe_weight_quant(w)
            assert_bits_equal(torch.as_tensor(codes), rcodes.to(torch.int8))
            assert np.float32(scale) == (1.0 / s).item()


# ---- packing --------------------------------------------------------------------------------------


class TestPacking:
    @pytest.mark.parametrize("shape", [(4,), (10,), (4, 3), (5, 7), (8, 128), (1, 9), (6, 2, 3), (1027, 5)])
    def test_pack_weights_matches_lowbit_layout(self, shape):
        """bitnet.py pack_weights / unpack_weights against lowbit.pack_ternary("i2") /
        unpack_ternary on random ternary weights (5 seeds; N divisible by 4 or not; 1-D to 3-D):
        the same bytes after the layout mapping, of shape (ceil(N/4), ...) as
        test_bitnet.py::test_replace_with_bitlinear_shape expects, and both unpack to the same codes."""
        for seed in range(5):
            codes = torch.randint(-1, 2, shape, generator=_gen(seed), dtype=torch.int8)
            want = recipe_pack_weights(codes.clone())
            assert want.shape == ((shape[0] + 3) // 4, *shape[1:])
            ours = lowbit.pack_ternary(_to_lowbit_layout(codes.numpy()), "i2")[..., 0]
            assert_bits_equal(torch.from_numpy(np.ascontiguousarray(ours)), want)
            back = lowbit.unpack_ternary(ours[..., None], _to_lowbit_layout(codes.numpy()).shape, "i2")
            assert_bits_equal(torch.from_numpy(_from_lowbit_layout(back)).to(torch.float32), recipe_unpack_weights(want, torch.float32))
            assert_bits_equal(torch.from_numpy(_from_lowbit_layout(back)[: shape[0]]), codes)

    @pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
    def test_packing_unpacking(self, dtype):
        """test_bitnet.py::BitNetTest::test_packing_unpacking: arbitrary bytes (fields 0..3, so
        unpacked values -1..2) unpack and repack to the same bytes. lowbit.unpack / pack at 2 bits
        (pack_ternary accepts only -1..1) give the recipe's values and bytes; 6 seeds and shapes."""
        for seed, shape in enumerate([(256, 256), (1, 1), (3, 17), (64, 5), (7, 1, 9), (100,)]):
            u = torch.randint(0, 256, shape, generator=_gen(seed), dtype=torch.int32).to(torch.uint8)
            unpacked = recipe_unpack_weights(u, dtype)
            assert_bits_equal(recipe_pack_weights(unpacked.clone()), u)
            fields = lowbit.unpack(u.numpy()[..., None], 2, (*shape, 4))
            values = torch.from_numpy(_from_lowbit_layout(fields).astype(np.int16) - 1)
            assert_bits_equal(values.to(dtype), unpacked)
            repacked = lowbit.pack(_to_lowbit_layout((unpacked + 1).to(torch.uint8).numpy()), 2)[..., 0]
            assert_bits_equal(torch.from_numpy(np.ascontiguousarray(repacked)), u)


# ---- layers ---------------------------------------------------------------------------------------


class _WeightQuant(torch.autograd.Function):
    """WeightQuant: the recipe's value forward, the identity (straight-through) backward."""

    @staticmethod
    def forward(ctx, w):  # noqa: ANN001, ANN205
        return recipe_weight_quant(w)[0]

    @staticmethod
    def backward(ctx, grad_output):  # noqa: ANN001, ANN205
        return grad_output.clone()


class _ActQuant(torch.autograd.Function):
    """ActQuant: the recipe's value forward, the identity (straight-through) backward."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return recipe_act_quant(x)[0]

    @staticmethod
    def backward(ctx, grad_output):  # noqa: ANN001, ANN205
        return grad_output.clone()


def _recipe_autobitlinear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """AutoBitLinear.forward with online_quant: F.linear(ActQuant(x), WeightQuant(w), b)."""
    return torch.nn.functional.linear(_ActQuant.apply(x), _WeightQuant.apply(w), b)


def _layer_and_recipe(n_in: int, n_out: int, lead: tuple, seed: int, dtype: torch.dtype):
    torch.manual_seed(seed)
    layer = lt.BitLinear(n_in, n_out, dtype=dtype)
    x = torch.randn(*lead, n_in, generator=_gen(seed + 100)).to(dtype)
    w, b = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    return layer, x, w, b


LAYERS = [(64, 16, (4,)), (300, 7, (2, 3)), (1024, 32, (5,))]


class TestBitLinear:
    def test_bitlinear_matches_recipe_float32(self):
        """bitnet.py AutoBitLinear(online_quant=True) against lowbit.torch.BitLinear in training
        mode, float32, 4 seeds x 3 layer shapes: gradients of input, weight and bias bit for bit
        (the same straight-through estimator); the forward within 1e-5 of max |y| (lowbit takes the
        exact integer product, the recipe rounds every product in float32)."""
        for seed in range(4):
            for n_in, n_out, lead in LAYERS:
                layer, x, w, b = _layer_and_recipe(n_in, n_out, lead, seed, torch.float32)
                xl, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
                y = layer(xl)
                yr = _recipe_autobitlinear(xr, w, b)
                assert (y - yr).abs().max() <= 1e-5 * yr.abs().max()
                g = torch.randn(y.shape, generator=_gen(seed))
                y.backward(g)
                yr.backward(g)
                assert_bits_equal(xl.grad, xr.grad)
                assert_bits_equal(layer.weight.grad, w.grad)
                assert_bits_equal(layer.bias.grad, b.grad)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
    def test_bitlinear_low_precision_matches_recipe(self, dtype):
        """AutoBitLinear's quantizers convert bfloat16 / float16 to float32 before quantizing
        (ActQuant / WeightQuant: ``x = x.float()``). lowbit.torch.BitLinear on such tensors must
        give the recipe's result computed in float32 to within one unit in the last place of the
        dtype at max |y| (4 seeds x 3 layer shapes)."""
        eps = torch.finfo(dtype).eps
        for seed in range(4):
            for n_in, n_out, lead in LAYERS:
                layer, x, w, b = _layer_and_recipe(n_in, n_out, lead, seed, dtype)
                with torch.no_grad():
                    y = layer(x).float()
                    yr = _recipe_autobitlinear(x.float(), w.float(), b.float())
                err = (y - yr).abs().max().item()
                assert err <= eps * yr.abs().max().item(), f"seed {seed}, {n_in}->{n_out}: max error {err}"

    def test_bitlinear_eval_kernel_equals_training_forward(self):
        """lowbit.torch.BitLinear documents its training forward as the integer kernel's value; in
        eval() (CPU, no grad) the packed ternary kernel must give the same float32 bits, 4 seeds x 3 shapes."""
        for seed in range(4):
            for n_in, n_out, lead in LAYERS:
                layer, x, _, _ = _layer_and_recipe(n_in, n_out, lead, seed, torch.float32)
                with torch.no_grad():
                    y_train = layer.train()(x)
                    y_eval = layer.eval()(x)
                assert_bits_equal(y_eval, y_train)

    def test_packed_bitlinear_matches_transformers_bitlinear(self):
        """bitnet.py BitLinear.forward (pre-quantized: packed uint8 weight (out/4, in),
        weight_scale, bias): y = F.linear(activation_quant(x), unpack_weights(w)) / (weight_scale *
        input_scale) + bias. The same packed bytes, read through the layout mapping into
        lowbit.bitnet.TernaryLinear (scale 1 / weight_scale), give the same output to 2e-7 relative
        (both integer products are exact; the rescaling rounds differently), 4 seeds x 3 shapes."""
        for seed in range(4):
            for n_in, n_out, lead in LAYERS:
                g = _gen(seed)
                w = torch.randn(max(4, n_out - n_out % 4), n_in, generator=g) * 0.02
                _, codes, s = recipe_weight_quant(w)
                packed = recipe_pack_weights(codes.to(torch.int8))
                bias = torch.randn(w.shape[0], generator=g)
                x = torch.randn(*lead, n_in, generator=g)
                q_x, s_x = recipe_act_quant(x)[1:]
                y_ref = torch.nn.functional.linear(q_x, recipe_unpack_weights(packed, torch.float32)) / (s * s_x) + bias
                layout_shape = (packed.shape[0], n_in, VALUES_PER_ITEM)
                ours_codes = _from_lowbit_layout(lowbit.unpack_ternary(packed.numpy()[..., None], layout_shape, "i2"))
                layer = bn.TernaryLinear(np.ascontiguousarray(ours_codes), float(1.0 / s), bias.numpy())
                y = layer(x)
                assert isinstance(y, torch.Tensor) and y.shape == y_ref.shape
                torch.testing.assert_close(y, y_ref, rtol=2e-7, atol=2e-7 * y_ref.abs().max().item())


def test_eager_recipe_is_transformers_recipe():
    """The eager recipe above against the installed transformers' own functions (their eager
    bodies, without torch.compile): WeightQuant.forward, ActQuant.forward,
    BitLinear.activation_quant, pack_weights and unpack_weights give the same bits, so the oracle
    of this file is the upstream code."""
    tb = pytest.importorskip("transformers.integrations.bitnet")

    def eager(f):  # noqa: ANN001, ANN202
        return getattr(f, "_torchdynamo_orig_callable", f)

    for seed, dtype in zip(range(6), DTYPES * 2):
        w = _inputs((33, 100), seed, dtype, std=0.02)
        x = _inputs((2, 5, 100), seed + 50, dtype, std=3.0)
        assert_bits_equal(eager(tb.WeightQuant.forward)(None, w), recipe_weight_quant(w)[0])
        assert_bits_equal(eager(tb.ActQuant.forward)(None, x), recipe_act_quant(x)[0])
        layer = tb.BitLinear(100, 4, bias=False, dtype=torch.float32)
        q, s = eager(tb.BitLinear.activation_quant)(layer, x.float())
        _, codes, rs = recipe_act_quant(x)
        assert_bits_equal(q, codes.to(torch.int8))
        assert_bits_equal(s, rs)
        for shape in [(33, 7), (8, 3), (5,)]:
            c = torch.randint(-1, 2, shape, generator=_gen(seed), dtype=torch.int8)
            packed = tb.pack_weights(c.clone())
            assert_bits_equal(packed, recipe_pack_weights(c))
            assert_bits_equal(eager(tb.unpack_weights)(packed, dtype), recipe_unpack_weights(packed, dtype))
