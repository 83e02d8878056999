"""lowbit.ptq: GPTQ against a plain NumPy transcription of the published algorithm (Frantar et
al. 2022, Algorithm 1 with lazy batch updates; grids from torch.ao's observers), on random and
degenerate layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lowbit
from lowbit.ptq import Hessian, gptq


def _grid(w: np.ndarray, qmin: int, qmax: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-row scale and zero point of ``w`` by torch.ao's PerChannelMinMaxObserver."""
    obs = torch.ao.quantization.PerChannelMinMaxObserver(
        ch_axis=0,
        dtype=torch.qint8 if qmin < 0 else torch.quint8,
        qscheme=torch.per_channel_symmetric if symmetric else torch.per_channel_affine,
        quant_min=qmin,
        quant_max=qmax,
    )
    obs(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))
    s, z = obs.calculate_qparams()
    return s.double().numpy(), z.double().numpy()


def _tensor_grid(w, qmin, qmax, symmetric):
    obs = torch.ao.quantization.MinMaxObserver(
        dtype=torch.qint8 if qmin < 0 else torch.quint8,
        qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine,
        quant_min=qmin, quant_max=qmax)
    obs(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))
    s, z = obs.calculate_qparams()
    return np.full(w.shape[0], float(s)), np.full(w.shape[0], float(z))


def reference_gptq(W, H, bits, symmetric, group_size=None, per_tensor=False, act_order=True,
                   percdamp=0.01, blocksize=128):
    """The published GPTQ loop (``fasterquant``), in float64 NumPy."""
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    W = W.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    rows, cols = W.shape
    W0 = W.copy()
    static = per_tensor or group_size is None or act_order
    gs = cols if group_size is None else group_size
    if per_tensor:
        grid = _tensor_grid(W0, qmin, qmax, symmetric)
    elif group_size is None:
        grid = _grid(W0, qmin, qmax, symmetric)
    elif static:
        groups = [_grid(W0[:, g:g + gs], qmin, qmax, symmetric) for g in range(0, cols, gs)]
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H[np.diag_indices(cols)] += percdamp * np.mean(np.diag(H))
    L = np.linalg.cholesky(H)
    Linv = np.linalg.inv(L)
    Hinv = np.linalg.cholesky(Linv.T @ Linv).T
    Q = np.zeros_like(W)
    codes = np.zeros(W.shape, dtype=np.int64)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = perm[i1 + i]
            if not static and col % gs == 0:
                grid = _grid(W[:, i1 + i:i1 + i + gs], qmin, qmax, symmetric)
            elif static and group_size is not None and not per_tensor:
                grid = groups[col // gs]
            s, z = grid
            w = W1[:, i]
            q = np.clip(np.round(w / s) + z, qmin, qmax)
            codes[:, i1 + i] = q
            Q[:, i1 + i] = (q - z) * s
            err = (w - Q[:, i1 + i]) / Hinv1[i, i]
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    inv = np.argsort(perm)
    return codes[:, inv], Q[:, inv]


def _layer(rows, cols, samples, seed, correlated=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, cols))
    if correlated:
        x = x + 2 * rng.standard_normal((samples, 1)) + x @ rng.standard_normal((cols, cols)) * 0.3
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    return w, x.T @ x


CASES = [
    # bits, symmetric, granularity, group size, act_order
    (4, True, "channel", None, True),
    (4, False, "channel", None, False),
    (3, False, "group", 16, True),
    (2, False, "group", 32, True),
    (4, True, "group", 16, False),
    (8, False, "tensor", None, True),
    (2, True, "channel", None, True),
]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("bits,sym,gran,gs,act_order", CASES)
def test_gptq_equals_the_published_algorithm(bits, sym, gran, gs, act_order, seed):
    w, h = _layer(24, 64, 300, seed)
    spec = lowbit.QuantSpec(bits, symmetric=sym, granularity=gran, group_size=gs)
    r = gptq(w, h, spec, act_order=act_order)
    # Dynamic groups read the weights as error feedback left them at the group's first column:
    # the published loop does so exactly when groups start at block starts (block = group).
    block = gs if (gs is not None and not act_order) else 128
    codes, q = reference_gptq(w, h, bits, sym, gs, gran == "tensor", act_order, blocksize=block)
    assert np.array_equal(r.tensor.int_repr(), codes)
    np.testing.assert_allclose(r.weight, q.astype(np.float32), rtol=1e-6, atol=1e-7)
    err = float(np.einsum("ij,jk,ik->", w - q, h, w - q))
    assert r.error == pytest.approx(err, rel=1e-6)
    assert r.error < r.rtn_error


def test_the_hessian_accumulates_any_leading_shape_and_merges():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 10, 8)).astype(np.float32)
    a, b, whole = Hessian(8), Hessian(8), Hessian(8)
    a.update(x[:2])
    b.update(x[2:])
    whole.update(x)
    a.merge(b)
    np.testing.assert_allclose(a.matrix, whole.matrix, rtol=1e-12)
    flat = x.reshape(-1, 8).astype(np.float64)
    np.testing.assert_allclose(whole.matrix, flat.T @ flat, rtol=1e-12)
    assert whole.samples == 40
    with pytest.raises(lowbit.LowbitValueError, match="NaN"):
        whole.update(np.full((2, 8), np.nan))
    assert whole.samples == 40
    with pytest.raises(lowbit.LowbitValueError, match="8 features"):
        whole.update(np.zeros((2, 7)))
    with pytest.raises(lowbit.LowbitValueError):
        a.merge(Hessian(7))
    with pytest.raises(lowbit.LowbitTypeError):
        a.update(np.ones((2, 8), dtype=np.int64))
    with pytest.raises(lowbit.LowbitTypeError):
        a.update(torch.ones(2, 8, dtype=torch.int64))
    a.update(torch.ones(2, 8, dtype=torch.bfloat16))
    assert a.samples == 42
    empty = Hessian(8)
    empty.update(np.zeros((0, 8), np.float32))
    assert empty.samples == 0 and not empty.matrix.any()


def test_degenerate_layers():
    spec = lowbit.QuantSpec(4, symmetric=False, granularity="channel")
    w, h = _layer(8, 16, 64, 0)
    # A dead input (never active): weight 0, like the reference.
    h2 = h.copy()
    h2[5, :] = h2[:, 5] = 0
    r = gptq(w, h2, spec)
    assert r.dead == 1 and np.all(r.weight[:, 5] == 0)
    codes, _ = reference_gptq(w, h2, 4, False)
    assert np.array_equal(r.tensor.int_repr(), codes)
    # Duplicated features (rank one): damping solves it; without damping a clear error.
    ones = np.ones((16, 16))
    assert np.isfinite(gptq(w, ones, spec).weight).all()
    with pytest.raises(lowbit.LowbitValueError, match="not positive definite.*raise damp"):
        gptq(w, ones, spec, damp=0.0)
    # Constant and zero weights, an uncorrelated (diagonal) Hessian: GPTQ is round-to-nearest.
    for wc in (np.full((4, 16), 0.3, np.float32), np.zeros((4, 16), np.float32)):
        r = gptq(wc, h, spec)
        np.testing.assert_array_equal(r.weight, lowbit.quantize(wc, spec).dequantize())
    diag = np.diag(np.arange(1.0, 17.0))
    r = gptq(w, diag, spec)
    np.testing.assert_array_equal(r.weight, lowbit.quantize(w, spec).dequantize())
    # Non-contiguous weights and torch tensors in, the same kind out.
    wt = torch.from_numpy(np.asfortranarray(w))
    rt = gptq(wt, torch.from_numpy(h), spec)
    assert isinstance(rt.weight, torch.Tensor)
    np.testing.assert_array_equal(rt.weight.numpy(), gptq(w, h, spec).weight)


def test_bad_input_is_refused():
    w, h = _layer(4, 8, 32, 0)
    spec = lowbit.QuantSpec(4)
    with pytest.raises(lowbit.LowbitValueError, match="Hessian must be"):
        gptq(w, h[:4, :4], spec)
    with pytest.raises(lowbit.LowbitValueError, match="NaN"):
        gptq(np.where(w > 0, np.nan, w).astype(np.float32), h, spec)
    bad = h.copy()
    bad[0, 0] = np.inf
    with pytest.raises(lowbit.LowbitValueError, match="NaN or Inf"):
        gptq(w, bad, spec)
    with pytest.raises(lowbit.LowbitValueError, match="damp"):
        gptq(w, h, spec, damp=-1)
    with pytest.raises(lowbit.LowbitTypeError):
        gptq(w, h, "int4")
    with pytest.raises(lowbit.LowbitValueError, match="axis"):
        gptq(w, h, lowbit.QuantSpec(4, granularity="channel", axis=1))
    with pytest.raises(lowbit.LowbitValueError):
        gptq(w[0], h, spec)


# ---- whole models ---------------------------------------------------------------------------

from lowbit.ptq import quantize_model  # noqa: E402


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 32)
        self.up = torch.nn.Linear(32, 64)
        self.down = torch.nn.Linear(64, 32)
        self.head = torch.nn.Linear(32, 5)

    def forward(self, ids: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        h = self.embed(ids) * scale
        h = h + self.down(torch.nn.functional.gelu(self.up(h)))
        return self.head(h)


def _net_and_data(seed=0):
    torch.manual_seed(seed)
    net = _Net()
    data = [torch.randint(0, 50, (4, 12)) for _ in range(6)]
    return net, data


@pytest.mark.parametrize("sequential", [True, False])
def test_quantize_model_replaces_every_linear_and_beats_rtn(sequential):
    net, data = _net_and_data()
    spec = lowbit.QuantSpec(3, symmetric=False, granularity="group", group_size=16)
    ref = {n: m.weight.detach().clone() for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)}
    net.train()
    r = quantize_model(net, data, spec, sequential=sequential)
    assert list(r.layers) == ["up", "down", "head"]  # execution order
    assert net.training  # mode restored
    for name, lr in r.layers.items():
        mod = net.get_submodule(name)
        np.testing.assert_array_equal(mod.weight.detach().numpy(), lr.tensor.dequantize())
        assert not mod._forward_pre_hooks  # hooks removed
        assert lr.error <= lr.rtn_error
        assert not torch.equal(mod.weight, ref[name])
    assert set(r.tensors()) == {"up.weight", "down.weight", "head.weight"}
    assert "3 layers" in repr(r)


def test_quantize_model_rtn_exclude_mixed_precision_and_batch_kinds():
    net, data = _net_and_data(1)
    w = net.up.weight.detach().numpy().copy()
    head = net.head.weight.detach().clone()
    s4 = lowbit.QuantSpec(4, granularity="channel")
    r = quantize_model(net, [(d, 0.5) for d in data], {"up": s4, "down": lowbit.QuantSpec(8)}, method="rtn",
                       exclude="head")
    assert list(r.layers) == ["up", "down"]
    np.testing.assert_array_equal(net.up.weight.detach().numpy(), lowbit.quantize(w, s4).dequantize())
    assert torch.equal(net.head.weight, head)
    r = quantize_model(net, [{"ids": d} for d in data], s4, exclude=["up", "down"])
    assert list(r.layers) == ["head"]
    r = quantize_model(net, data, s4, modules=["d*", "head"], exclude="head", progress=False)
    assert list(r.layers) == ["down"]
    with pytest.raises(lowbit.LowbitTypeError, match="modules"):
        quantize_model(net, data, s4, modules=[3])


def test_quantize_model_refuses_bad_input():
    net, data = _net_and_data()
    spec = lowbit.QuantSpec(4)
    with pytest.raises(lowbit.LowbitValueError, match="no batches"):
        quantize_model(net, [], spec)
    with pytest.raises(lowbit.LowbitValueError, match="method"):
        quantize_model(net, data, spec, method="hqq2")
    with pytest.raises(lowbit.LowbitValueError, match="no Linear"):
        quantize_model(net, data, spec, exclude="*")
    with pytest.raises(lowbit.LowbitTypeError):
        quantize_model(np.zeros(3), data, spec)
    with pytest.raises(lowbit.LowbitTypeError):
        quantize_model(net, data, {"up": "int4"})
    with pytest.raises(lowbit.LowbitValueError, match="layer 'up'.*not positive definite"):
        quantize_model(net, [torch.zeros(4, 12, dtype=torch.long)], spec, damp=0.0)


def test_tensor_hessians_are_float32_products_summed_in_float64():
    x = torch.randn(3, 50, 16)
    h = Hessian(16)
    h.update(x)
    flat = x.reshape(-1, 16).double().numpy()
    np.testing.assert_allclose(h.matrix, flat.T @ flat, rtol=1e-5, atol=1e-4)
    with pytest.raises(lowbit.LowbitValueError, match="NaN"):
        h.update(torch.full((2, 16), float("inf")))
    with pytest.raises(lowbit.LowbitValueError, match="16 features"):
        h.update(torch.zeros(2, 15))
    assert h.samples == 150


class _Attn(torch.nn.Module):
    """q, k and v read one input tensor; o reads their mix."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(16, 16) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1) @ self.v(x)
        return self.o(a)


def test_layers_sharing_an_input_are_gathered_in_one_pass_with_full_statistics():
    torch.manual_seed(0)
    net = _Attn()
    data = [torch.randn(2, 8, 16) for _ in range(5)]
    ref = _Attn()
    ref.load_state_dict(net.state_dict())
    spec = lowbit.QuantSpec(3, symmetric=False, granularity="group", group_size=8)
    r = quantize_model(net, data, spec)
    assert list(r.layers) == ["q", "k", "v", "o"]
    # q, k and v see the float input: their Hessian is the data's own.
    h = Hessian(16)
    for d in data:
        h.update(d)
    for name in ("q", "k", "v"):
        want = gptq(ref.get_submodule(name).weight.detach(), h, spec)
        np.testing.assert_array_equal(r.layers[name].tensor.int_repr(), want.tensor.int_repr())
    # o is calibrated on the outputs of the quantized q, k, v.
    x_o = []
    hook = ref.o.register_forward_pre_hook(lambda _m, a: x_o.append(a[0].detach()))
    for name in ("q", "k", "v"):
        with torch.no_grad():
            ref.get_submodule(name).weight.copy_(torch.from_numpy(r.layers[name].tensor.dequantize()))
    with torch.no_grad():
        for d in data:
            ref(d)
    hook.remove()
    ho = Hessian(16)
    for x in x_o:
        ho.update(x)
    want = gptq(ref.o.weight.detach(), ho, spec)
    np.testing.assert_array_equal(r.layers["o"].tensor.int_repr(), want.tensor.int_repr())


@pytest.mark.parametrize("method,grid", [("mse", "minmax"), ("gptq", "mse")])
def test_mse_grids_lower_the_error_of_every_layer(method, grid):
    """Round to nearest on MSE-searched grids, and GPTQ on them: every layer's output error on
    the calibration data at most round-to-nearest's on min-max grids, and the model's output
    closer to the float model's than plain RTN at 2 and 3 bits."""
    import torch

    import lowbit
    from lowbit.ptq import quantize_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    data = [torch.randn(32, 64) * torch.linspace(0.1, 3, 64) for _ in range(8)]
    x = torch.cat(data)
    ref = net(x).detach()
    for bits, gs in ((3, 32), (2, 32)):
        spec = lowbit.QuantSpec(bits, symmetric=False, granularity="group", group_size=gs)
        outs = {}
        for m, g in (("rtn", "minmax"), (method, grid)):
            import copy

            q = copy.deepcopy(net)
            r = quantize_model(q, data, spec, method=m, grid=g)
            outs[m + g] = ((q(x) - ref).pow(2).mean() / ref.pow(2).mean()).item()
            if m != "rtn":
                assert r.method == ("gptq+mse" if m == "gptq" else "mse")
                for name, layer in r.layers.items():
                    assert layer.error <= layer.rtn_error * (1 + 1e-9), (name, layer)
        assert outs[method + grid] < outs["rtnminmax"], outs


def test_bad_grid_is_refused():
    import torch

    import lowbit
    from lowbit.ptq import gptq, quantize_model

    net = torch.nn.Sequential(torch.nn.Linear(8, 4))
    with pytest.raises(lowbit.LowbitValueError, match="grid"):
        quantize_model(net, [torch.randn(4, 8)], lowbit.QuantSpec(4), grid="best")
    with pytest.raises(lowbit.LowbitValueError, match="method"):
        quantize_model(net, [torch.randn(4, 8)], lowbit.QuantSpec(4), method="adaround")
    with pytest.raises(lowbit.LowbitValueError, match="grid"):
        gptq(np.ones((4, 8), np.float32), np.eye(8), lowbit.QuantSpec(4), grid=None)


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _Attn()
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 16)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        x = x + self.attn(x * mask) * scale
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class _Stack(torch.nn.Module):
    """A transformer-like model: a layer before the blocks, repeated blocks taking the previous
    block's output (and a mask, positionally, and a keyword), a head after them."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(8, 16)
        self.blocks = torch.nn.ModuleList(_Block() for _ in range(3))
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        mask = (x[..., :1] > -1).float()
        for b in self.blocks:
            h = b(h, mask, scale=0.5)
        return self.head(h)


def test_blocks_calibrated_alone_give_the_codes_of_whole_model_passes(monkeypatch):
    """Sequential GPTQ runs each repeated block alone on its cached inputs (the previous
    block's outputs): the same Hessians, so the same codes, as passes of the whole model."""
    import copy

    import lowbit.ptq as ptq

    torch.manual_seed(0)
    net = _Stack()
    data = [torch.randn(2, 6, 8) for _ in range(4)]
    names = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    chosen = {n: (net.get_submodule(n), None) for n in names}
    stages = ptq._stages(net, chosen, data[0])
    assert [len(n) for n, _ in stages] == [1, 6, 6, 6, 1]
    assert [b for _, b in stages[1:4]] == list(net.blocks)
    spec = lowbit.QuantSpec(3, symmetric=False, granularity="group", group_size=8)
    fast = copy.deepcopy(net)
    r_fast = quantize_model(fast, data, spec)
    monkeypatch.setattr(ptq, "_find_blocks", lambda *_: [])
    assert len(ptq._stages(net, chosen, data[0])) == 1
    r_slow = quantize_model(net, data, spec)
    assert list(r_fast.layers) == list(r_slow.layers) == names[:1] + [
        n for n in names if n.startswith("blocks")] + ["head"]
    for n in names:
        np.testing.assert_array_equal(r_fast.layers[n].tensor.int_repr(), r_slow.layers[n].tensor.int_repr())
    x = torch.randn(3, 6, 8)
    torch.testing.assert_close(fast(x), net(x), rtol=0, atol=0)


def test_blocks_that_do_not_chain_fall_back_to_whole_model_passes():
    """A block whose input is not the previous block's output (here: a norm between them), or a
    block run twice, is calibrated by passes of the whole model."""
    import lowbit.ptq as ptq

    class Between(_Stack):
        def forward(self, x):
            h = self.inp(x)
            for b in self.blocks:
                h = torch.nn.functional.layer_norm(b(h, 1.0), (16,))
            return self.head(h)

    class Twice(_Stack):
        def forward(self, x):
            h = self.inp(x)
            for b in list(self.blocks) + [self.blocks[0]]:
                h = b(h, 1.0)
            return self.head(h)

    for cls in (Between, Twice):
        torch.manual_seed(0)
        net = cls()
        chosen = {n: (m, None) for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)}
        x = torch.randn(2, 6, 8)
        assert len(ptq._stages(net, chosen, x)) == 1, cls
        r = quantize_model(net, [x], lowbit.QuantSpec(4, granularity="channel"))
        assert len(r.layers) == 20


# ---- rotations ------------------------------------------------------------------------------

from lowbit.ptq import Rotation  # noqa: E402


@pytest.mark.parametrize("features,block", [(1, 1), (6, 2), (48, 16), (384, 128), (1536, 512)])
def test_rotations_are_orthogonal_block_hadamard_and_keep_a_layer_exact(features, block):
    r = Rotation(features, seed=3)
    assert r.block == block
    m = r.apply(np.eye(features))  # R itself
    np.testing.assert_allclose(m.T @ m, np.eye(features), atol=1e-12)
    blocks = np.arange(features) // block
    inside = blocks[:, None] == blocks[None, :]
    np.testing.assert_allclose(np.abs(m[inside]), 1 / np.sqrt(block), rtol=1e-12)
    assert not m[~inside].any()
    assert not np.array_equal(m, Rotation(features, seed=4).apply(np.eye(features))) or features == 1
    # A linear layer computes the same on rotated weights and inputs (float32, to 1e-5).
    torch.manual_seed(0)
    lin = torch.nn.Linear(features, 7)
    x = torch.randn(3, 5, features)[:, ::2]  # non-contiguous, leading axes
    y = torch.nn.functional.linear(r.apply(x), r.apply(lin.weight), lin.bias)
    assert y.dtype == torch.float32 and y.shape == (3, 3, 7)
    torch.testing.assert_close(y, lin(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.inverse(r.apply(lin.weight)), lin.weight, rtol=0, atol=1e-6)
    # The Hessian of rotated inputs.
    flat = x.reshape(-1, features).double().numpy()
    np.testing.assert_allclose(r.hessian(flat.T @ flat), m.T @ (flat.T @ flat) @ m, atol=1e-9)


def test_rotation_refuses_bad_input():
    r = Rotation(16)
    with pytest.raises(lowbit.LowbitValueError, match="16 features"):
        r.apply(np.ones((2, 15)))
    with pytest.raises(lowbit.LowbitTypeError):
        r.apply(np.ones((2, 16), np.int32))
    with pytest.raises(lowbit.LowbitValueError):
        r.hessian(np.eye(15))
    with pytest.raises(lowbit.LowbitValueError):
        Rotation(0)
    with pytest.raises(lowbit.LowbitValueError):
        Rotation(16, seed=-1)


def _outlier_mlp():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    with torch.no_grad():
        for lin in (net[0], net[2]):  # heavy-tailed weights: a few outliers per row
            lin.weight.copy_(torch.distributions.StudentT(2.0).sample(lin.weight.shape) * 0.05)
    return net, [torch.randn(32, 64) for _ in range(8)]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_rotated_quantization_is_what_torch_runs_and_lowers_the_error(method):
    """With ``rotate="hadamard"`` each weight becomes ``Q(W R) Rᵀ`` (the stored tensor is
    ``Q(W R)``); its reported error is measured on the layer's own inputs, and on heavy-tailed
    weights it is below the unrotated method's at 3 bits."""
    import copy

    import lowbit.ptq as ptq

    net, data = _outlier_mlp()
    spec = lowbit.QuantSpec(3, symmetric=False, granularity="group", group_size=32)
    plain, rotated = copy.deepcopy(net), copy.deepcopy(net)
    r0 = quantize_model(plain, data, spec, method=method)
    r1 = quantize_model(rotated, data, spec, method=method, rotate="hadamard")
    assert r1.method == ("gptq" if method == "gptq" else "rtn") + "+hadamard"
    for name, layer in r1.layers.items():
        rot = layer.rotation
        assert rot == Rotation(net.get_submodule(name).in_features)
        w = rotated.get_submodule(name).weight.detach().numpy()
        np.testing.assert_allclose(w, rot.inverse(layer.tensor.dequantize()), rtol=0, atol=1e-6)
        assert layer.error < r0.layers[name].error, name
    # The first layer sees the same inputs either way: the same plain (unrotated) RTN error.
    assert r1.layers["0"].rtn_error == pytest.approx(r0.layers["0"].rtn_error, rel=1e-9)
    x = torch.cat(data)
    ref = net(x)
    assert (rotated(x) - ref).pow(2).mean() < (plain(x) - ref).pow(2).mean()
    with pytest.raises(lowbit.LowbitValueError, match="rotate"):
        quantize_model(copy.deepcopy(net), data, spec, rotate="random")
    from lowbit.export import onnx as export_onnx

    with pytest.raises(lowbit.LowbitValueError, match="rotate='hadamard'"):
        export_onnx(rotated, data[0], "never.onnx", quantized=r1)
    assert ptq.Rotation(64).block == 64


# ---- asymmetric calibration -----------------------------------------------------------------


def test_asymmetric_calibration_fits_the_float_models_outputs():
    """``asymmetric=True``: each layer's GPTQ goal is ``W + W (C - H)(H + μI)⁻¹`` from the float
    model's inputs ``x_f`` and the quantized model's ``x_q`` (NumPy transcription below, for the
    head, whose inputs come after every block); the first layer, whose inputs are the data
    itself, is plain GPTQ; every layer's error is at most RTN's; the model ends closer to the
    float model than plain GPTQ leaves it."""
    import copy

    torch.manual_seed(0)
    net = _Stack()
    data = [torch.randn(2, 6, 8) for _ in range(6)]
    spec = lowbit.QuantSpec(3, symmetric=False, granularity="group", group_size=8)
    plain, asym = copy.deepcopy(net), copy.deepcopy(net)
    r0 = quantize_model(plain, data, spec)
    r1 = quantize_model(asym, data, spec, asymmetric=True)
    assert list(r1.layers) == list(r0.layers)
    np.testing.assert_array_equal(r1.layers["inp"].tensor.int_repr(), r0.layers["inp"].tensor.int_repr())
    assert all(lr.error <= lr.rtn_error for lr in r1.layers.values())
    # The head's goal, from its inputs in the float and in the quantized model.
    xs: dict[str, list] = {"f": [], "q": []}
    hooks = [m.head.register_forward_pre_hook(lambda _m, a, k=k: xs[k].append(a[0].reshape(-1, 16).double()))
             for k, m in (("f", net), ("q", asym))]
    with torch.no_grad():
        for d in data:
            net(d)
            asym(d)
    for h in hooks:
        h.remove()
    xf, xq = torch.cat(xs["f"]).numpy(), torch.cat(xs["q"]).numpy()
    hq, cross = xq.T @ xq, xf.T @ xq
    w = net.head.weight.detach().double().numpy()
    goal = w + np.linalg.solve(hq + np.eye(16) * np.mean(np.diag(hq)), (w @ (cross - hq)).T).T
    want = gptq(goal.astype(np.float32), hq, spec)
    np.testing.assert_array_equal(r1.layers["head"].tensor.int_repr(), want.tensor.int_repr())
    x = torch.cat(data)
    ref = net(x)
    assert (asym(x) - ref).pow(2).mean() < (plain(x) - ref).pow(2).mean()
    # Whole-model passes (no blocks) give the same.
    flat = copy.deepcopy(net)
    import lowbit.ptq as ptq

    find = ptq._find_blocks
    ptq._find_blocks = lambda *_: []
    try:
        r2 = quantize_model(flat, data, spec, asymmetric=True)
    finally:
        ptq._find_blocks = find
    for n in r1.layers:
        np.testing.assert_array_equal(r2.layers[n].tensor.int_repr(), r1.layers[n].tensor.int_repr())


def test_asymmetric_calibration_refuses_what_it_cannot_do():
    net, data = _net_and_data()
    spec = lowbit.QuantSpec(4)
    with pytest.raises(lowbit.LowbitValueError, match="asymmetric"):
        quantize_model(net, data, spec, method="rtn", asymmetric=True)
    with pytest.raises(lowbit.LowbitValueError, match="asymmetric"):
        quantize_model(net, data, spec, sequential=False, asymmetric=True)
    with pytest.raises(lowbit.LowbitTypeError, match="asymmetric"):
        quantize_model(net, data, spec, asymmetric="yes")


# ------------------------------------------------------------------------------------------
# Convolutions, and models whose batches run different layers


def _patches(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """The conv's input patches by slicing (rows: image, then output position in row-major
    order; columns: channel, then kernel row, then kernel column), padded by hand."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    left, right, top, bottom = conv._reversed_padding_repeated_twice
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = torch.nn.functional.pad(x, (left, right, top, bottom), mode=mode)
    oh = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = [xp[n, :, i * sh:i * sh + dh * (kh - 1) + 1:dh, j * sw:j * sw + dw * (kw - 1) + 1:dw].reshape(-1)
            for n in range(x.shape[0]) for i in range(oh) for j in range(ow)]
    return torch.stack(rows)


@pytest.mark.parametrize("kwargs", [dict(padding=1, stride=2), dict(padding="same", dilation=2),
                                    dict(padding=2, padding_mode="reflect"), dict(kernel_size=(1, 3), bias=False)])
def test_conv2d_layers_are_matrices_over_their_input_patches(kwargs):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, **{"kernel_size": 3, **kwargs})
    net = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    data = [torch.randn(2, 3, 9, 10) for _ in range(3)]
    w = conv.weight.detach().reshape(8, -1).numpy().copy()
    spec = lowbit.QuantSpec(3, symmetric=False, granularity="group", group_size=9)
    h = Hessian(w.shape[1])
    for x in data:
        h.update(_patches(x, conv))
    want = gptq(w, h, spec)
    r = quantize_model(net, data, spec)
    assert list(r.layers) == ["0", "2"]
    np.testing.assert_array_equal(r.layers["0"].tensor.int_repr(), want.tensor.int_repr())
    assert r.layers["0"].error == pytest.approx(want.error, rel=1e-6)
    for name, lr in r.layers.items():
        mod = net.get_submodule(name)
        np.testing.assert_array_equal(mod.weight.detach().reshape(mod.weight.shape[0], -1).numpy(),
                                      lr.tensor.dequantize())
        assert lr.error <= lr.rtn_error


def test_grouped_convolutions_stay_float_and_a_model_of_them_alone_is_refused():
    torch.manual_seed(0)
    dw = torch.nn.Conv2d(4, 4, 3, groups=4)
    net = torch.nn.Sequential(dw, torch.nn.Conv2d(4, 6, 1))
    before = dw.weight.detach().clone()
    r = quantize_model(net, [torch.randn(2, 4, 8, 8)], lowbit.QuantSpec(4, granularity="channel"))
    assert list(r.layers) == ["1"] and torch.equal(dw.weight, before)
    with pytest.raises(lowbit.LowbitValueError, match="no Linear or Conv2d"):
        quantize_model(torch.nn.Sequential(dw), [torch.randn(2, 4, 8, 8)], lowbit.QuantSpec(4))


class _TwoTasks(torch.nn.Module):
    """Shared blocks and a head per task: a batch runs one task's head."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU())
                                          for _ in range(2))
        self.a = torch.nn.Linear(16, 4)
        self.b = torch.nn.Linear(16, 5)
        self.unused = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.a(x) if task == "a" else self.b(x)


def test_layers_only_later_batches_run_are_quantized_too():
    torch.manual_seed(0)
    data = [{"x": torch.randn(32, 16), "task": t} for t in ("a", "b", "a", "b")]
    spec = lowbit.QuantSpec(3, symmetric=False, granularity="group", group_size=8)
    net = _TwoTasks()
    twin = _TwoTasks()
    twin.load_state_dict(net.state_dict())
    r = quantize_model(net, data, spec)
    assert list(r.layers) == ["blocks.0.0", "blocks.1.0", "a", "b"]  # "unused" never ran: float
    # Head b is calibrated on its own batches' inputs, through the quantized blocks.
    h = Hessian(16)
    with torch.no_grad():
        for d in data[1::2]:
            h.update(net.blocks[1](net.blocks[0](d["x"])))
    want = gptq(twin.b.weight.detach().numpy(), h, spec)
    np.testing.assert_array_equal(r.layers["b"].tensor.int_repr(), want.tensor.int_repr())
    assert torch.equal(net.unused.weight, twin.unused.weight)


# ------------------------------------------------------------------------------------------
# AWQ


def reference_awq(w, x, spec, n_grid=20):
    """The published scale search (llm-awq's auto_scale for one linear layer), in float64 on
    the calibration inputs themselves: mean |x| per channel to the power of each grid ratio,
    normalized, the weight quantized scaled and unscaled, the output MSE against the float
    layer's; on lowbit's grid (the search, not the grid, is what is checked)."""
    x_max = np.abs(x).mean(0)
    ref_out = x @ w.T.astype(np.float64)
    best, best_loss = None, np.inf
    for i in range(n_grid):
        s = np.maximum(x_max ** (i / n_grid), 1e-4)
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        q = lowbit.quantize(np.ascontiguousarray(w * s), spec).dequantize() / s
        loss = ((ref_out - x @ q.T.astype(np.float64)) ** 2).mean()
        if loss < best_loss:
            best, best_loss = s, loss
    return best


@pytest.mark.parametrize("bits, gs, seed", [(3, 16, 0), (4, 32, 1), (2, 16, 2), (3, None, 3)])
def test_awq_scales_are_the_published_search(bits, gs, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((512, 64)) * np.where(np.arange(64) % 9 == 0, 25.0, 1.0)  # salient channels
    w = rng.standard_normal((24, 64)).astype(np.float32)
    spec = (lowbit.QuantSpec(bits, symmetric=False, granularity="group", group_size=gs) if gs
            else lowbit.QuantSpec(bits, symmetric=False, granularity="channel"))
    h = Hessian(64)
    h.update(x)
    np.testing.assert_allclose(h.absolute, np.abs(x).sum(0), rtol=1e-12)
    s, alpha, err = lowbit._lowbit.awq_search(w, h.matrix, h.absolute / h.samples, spec)
    want = reference_awq(w, x, spec)
    np.testing.assert_allclose(s, want, rtol=1e-5)
    assert 0 < alpha < 1
    q = lowbit.quantize(np.ascontiguousarray(w * s), spec).dequantize() / s
    assert err == pytest.approx(lowbit._lowbit.output_error(w, q, h.matrix), rel=1e-9)
    assert err < lowbit._lowbit.output_error(w, lowbit.quantize(w, spec).dequantize(), h.matrix)


def test_awq_models_compute_the_scaled_quantized_weights_and_refuse_what_they_cannot_do(tmp_path):
    torch.manual_seed(0)
    gain = torch.ones(32)
    gain[::5] = 20
    data = [torch.randn(64, 32) * gain for _ in range(6)]
    spec = lowbit.QuantSpec(3, symmetric=False, granularity="group", group_size=16)
    errors = {}
    for method in ("awq", "awq+gptq"):
        torch.manual_seed(1)
        net = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 8))
        r = quantize_model(net, data, spec, method=method)
        assert r.method == method and list(r.layers) == ["0", "2"]
        for name, lr in r.layers.items():
            w = net.get_submodule(name).weight.detach().numpy()
            assert lr.scales is not None and lr.transforms_input and lr.scales.dtype == np.float32
            np.testing.assert_array_equal(w, lr.tensor.dequantize() / lr.scales)
            assert lr.error <= lr.rtn_error
        errors[method] = r.layers["0"].error
        with pytest.raises(lowbit.LowbitValueError, match="AWQ"):
            lowbit.export.onnx(net, data[0], tmp_path / "awq.onnx", quantized=r)
    assert errors["awq+gptq"] < errors["awq"]
    assert not list(tmp_path.iterdir())
    net = torch.nn.Sequential(torch.nn.Linear(32, 8))
    r = quantize_model(net, data, spec, method="awq+gptq", grid="mse", asymmetric=True)
    assert r.method == "awq+gptq+mse+asym"
    with pytest.raises(lowbit.LowbitValueError, match="rotate"):
        quantize_model(net, data, spec, method="awq", rotate="hadamard")
    with pytest.raises(lowbit.LowbitValueError, match="asymmetric"):
        quantize_model(net, data, spec, method="awq", asymmetric=True)
    h, other = Hessian(32), Hessian(32)
    h.update(data[0])
    other.update(data[1])
    h.merge(other)
    np.testing.assert_allclose(h.absolute, (data[0].abs().sum(0) + data[1].abs().sum(0)).double().numpy(), rtol=1e-6)


# ------------------------------------------------------------------------------------------
# HQQ


def _seq_sum(a):
    return float(np.cumsum(a)[-1]) if len(a) else 0.0  # in order, as the Rust solver sums


def reference_hqq_grid(v, qmin, qmax, symmetric, lp=0.7, beta=10.0, kappa=1.01, iters=20):
    """One group's grid by HQQ's half-quadratic steps (Badri & Shaji 2023) with lowbit's
    integer zero points, in float64: min-max start (torch.ao's formula), codes, shrunk error,
    least-squares scale and zero point on the codes, kept while the mean |error| falls."""
    lo, hi = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
    eps = float(np.finfo(np.float32).eps)
    if symmetric:
        s = np.float32(max(np.float32(max(-lo, hi)) / np.float32((qmax - qmin) / 2), eps))
        z = 0 if qmin < 0 else (qmin + qmax) // 2
    else:
        s = np.float32(max(np.float32(np.float32(hi) - np.float32(lo)) / np.float32(qmax - qmin), eps))
        z = int(np.clip(qmin - np.round(np.float32(lo) / s), qmin, qmax))

    def codes(s, z):
        return np.clip(np.round(v / float(s)) + z, qmin, qmax)

    def err(s, z):
        return _seq_sum(np.abs(v - float(s) * (codes(s, z) - z))) / len(v)

    best = err(s, z)
    for _ in range(iters):
        q = codes(s, z)
        e = v - float(s) * (q - z)
        a = np.abs(e)
        with np.errstate(divide="ignore"):
            shr = np.where(a == 0, 0.0, np.sign(e) * np.maximum(a - a ** (lp - 1) / beta, 0))
        t = v - shr
        beta *= kappa
        if not symmetric:
            mq, mt = _seq_sum(q) / len(v), _seq_sum(t) / len(v)
            sqq, sqt = _seq_sum((q - mq) ** 2), _seq_sum((q - mq) * (t - mt))
            if sqq <= 0 or sqt <= 0:
                break
            z = int(np.clip(np.round(mq - mt / (sqt / sqq)), qmin, qmax))
        d = q - z
        s_new = np.float32(_seq_sum(t * d) / _seq_sum(d * d))
        if not (np.isfinite(s_new) and s_new > 0):
            break
        e_new = err(s_new, z)
        if e_new >= best:
            break
        s, best = s_new, e_new
    return s, z


@pytest.mark.parametrize("bits, sym, gs, seed", [(4, False, 32, 0), (3, False, 16, 1), (2, False, 16, 2),
                                                 (4, True, 32, 3), (3, False, 64, 4)])
def test_hqq_grids_are_the_half_quadratic_steps(bits, sym, gs, seed):
    from lowbit.ptq import hqq

    w = (np.random.default_rng(seed).standard_normal((12, 64)) ** 3).astype(np.float32)
    spec = lowbit.QuantSpec(bits, symmetric=sym, granularity="group", group_size=gs)
    q = hqq(w, spec)
    qmin, qmax = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if sym else (0, (1 << bits) - 1)
    for i in range(w.shape[0]):
        for g in range(64 // gs):
            s, z = reference_hqq_grid(w[i, g * gs:(g + 1) * gs].astype(np.float64), qmin, qmax, sym)
            assert q.scales[i, g] == pytest.approx(s, rel=1e-6)
            assert q.zero_points[i, g] == z
    rtn = lowbit.quantize(w, spec)
    assert np.abs(q.dequantize() - w).mean() < np.abs(rtn.dequantize() - w).mean()


def test_hqq_models_and_degenerate_weights():
    from lowbit.ptq import hqq

    net, data = _net_and_data()
    spec = lowbit.QuantSpec(3, symmetric=False, granularity="group", group_size=16)
    r = quantize_model(net, data, spec, method="hqq")
    assert r.method == "hqq" and len(r.layers) == 3
    for name, lr in r.layers.items():
        np.testing.assert_array_equal(net.get_submodule(name).weight.detach().numpy(), lr.tensor.dequantize())
    w = np.zeros((3, 32), np.float32)
    w[1] = 0.5
    w[2, 3] = -1e-30
    q = hqq(w, spec)
    assert np.isfinite(q.dequantize()).all() and (q.dequantize()[0] == 0).all()
    with pytest.raises(lowbit.LowbitValueError):
        hqq(np.full((2, 16), np.nan, np.float32), spec)
    with pytest.raises(lowbit.LowbitValueError):
        hqq(w, spec, lp=2.0)
    with pytest.raises(lowbit.LowbitTypeError):
        hqq(w, "int3")


# ------------------------------------------------------------------------------------------
# torch.distributed


_DIST_CASES = {"gptq": dict(), "asym": dict(asymmetric=True, grid="mse"), "awq": dict(method="awq")}


def _dist_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    spec = lowbit.QuantSpec(3, symmetric=False, granularity="group", group_size=16)
    for case, kw in _DIST_CASES.items():
        net, data = _net_and_data(4)
        r = quantize_model(net, data[rank::world], spec, **kw)
        np.savez(f"{out_dir}/{case}-rank{rank}.npz", **{n: lr.tensor.int_repr() for n, lr in r.layers.items()},
                 **{f"{n}.error": lr.error for n, lr in r.layers.items()})
    h = Hessian(3)
    h.update(np.full((rank + 1, 3), rank + 1.0))
    h.sync()
    np.save(f"{out_dir}/hessian-rank{rank}.npy", np.concatenate([h.matrix.ravel(), h.absolute, [h.samples]]))
    dist.destroy_process_group()


def test_distributed_statistics_equal_one_process(tmp_path):
    """Two gloo ranks, each calibrating on half the batches: both quantize every layer as one
    process does on all of them (the Hessians summed over the ranks before each layer)."""
    import torch.multiprocessing as mp

    mp.spawn(_dist_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    spec = lowbit.QuantSpec(3, symmetric=False, granularity="group", group_size=16)
    for case, kw in _DIST_CASES.items():
        net, data = _net_and_data(4)
        # One process, batches in the order the ranks' halves are summed.
        one = quantize_model(net, data[0::2] + data[1::2], spec, **kw)
        for rank in range(2):
            got = np.load(tmp_path / f"{case}-rank{rank}.npz")
            for name, lr in one.layers.items():
                np.testing.assert_array_equal(got[name], lr.tensor.int_repr(), err_msg=f"{case} {name}")
                assert float(got[f"{name}.error"]) == pytest.approx(lr.error, rel=1e-6)
    for rank in range(2):
        h = np.load(tmp_path / f"hessian-rank{rank}.npy")
        np.testing.assert_array_equal(h, np.concatenate([np.full(9, 1 + 8.0), np.full(3, 1 + 4.0), [3]]))
