"""lowbit.nas against PyTorch's FlopCounterMode, parameter counts, exact reference formulas,
finite differences and brute force."""

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import lowbit
import lowbit.nas as nas
import lowbit.torch as lt


def torch_flops(model, *args) -> int:
    """FlopCounterMode's total with autograd enabled (PyTorch's fused eval paths hide work from it)."""
    with torch.enable_grad(), FlopCounterMode(display=False) as fc:
        model(*args)
    return fc.get_total_flops()


def check_counts(model, *args) -> nas.Graph:
    g = nas.from_torch(model, args)
    assert g.flops == torch_flops(model, *args)
    assert g.macs * 2 == g.flops
    assert g.params == sum(p.numel() for p in model.parameters())
    return g


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "vit_b_16"])
def test_torchvision_models_match_flop_counter(name):
    import torchvision.models as tvm

    torch.manual_seed(0)
    model = getattr(tvm, name)().eval()
    size = 224 if name == "vit_b_16" else 96
    g = check_counts(model, torch.randn(2, 3, size, size))
    cost = nas.estimate(g, "cortex-a76", weight_bits=8, act_bits=8)
    assert cost.flops == g.flops and cost.params == g.params
    assert len(cost.layers) == len(g)


class Block(nn.Module):
    """A pre-norm transformer block on nn.MultiheadAttention (fused in eval under no_grad)."""

    def __init__(self, d=48, heads=4, batch_first=True):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        h = self.n1(x)
        x = x + self.attn(h, h, h)[0]
        return x + self.mlp(self.n2(x))


class SdpaBlock(nn.Module):
    """Attention through F.scaled_dot_product_attention, with grouped-query heads and a mask."""

    def __init__(self, d=64, heads=8, kv_heads=2):
        super().__init__()
        self.h, self.kv, self.dh = heads, kv_heads, d // heads
        self.q = nn.Linear(d, d)
        self.kvp = nn.Linear(d, 2 * kv_heads * self.dh, bias=False)
        self.o = nn.Linear(d, d)

    def forward(self, x, mask=None):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.h, self.dh).transpose(1, 2)
        k, v = self.kvp(x).view(b, s, 2, self.kv, self.dh).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o(a.transpose(1, 2).reshape(b, s, -1))


@pytest.mark.parametrize("train", [False, True])
def test_hand_made_transformer_blocks(train):
    torch.manual_seed(0)
    x = torch.randn(3, 17, 48)
    for m in [Block(), Block(batch_first=False)]:
        check_counts(m.train(train), x)
    sdpa = SdpaBlock().train(train)
    y = torch.randn(2, 9, 64)
    check_counts(sdpa, y)
    check_counts(sdpa, y, torch.rand(9, 9) > 0.3)
    for norm_first in (False, True):
        layer = nn.TransformerEncoderLayer(48, 4, 96, dropout=0.0, batch_first=True, norm_first=norm_first)
        check_counts(layer.train(train), x)
        check_counts(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).train(train), x)


def test_fused_attention_is_counted_anyway():
    """In eval under no_grad, nn.MultiheadAttention runs one fused kernel that FlopCounterMode
    counts as 0; lowbit expands it into projections and attention."""
    m = Block().eval()
    x = torch.randn(2, 10, 48)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(x)
    fused = fc.get_total_flops()
    g = nas.from_torch(m, x)
    assert g.flops == torch_flops(m, x) > fused
    kinds = [row["kind"] for row in nas.estimate(g).layers]
    assert "attention" in kinds


def test_other_ops_and_convs():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=False),
        nn.BatchNorm2d(8),
        nn.Hardswish(),
        nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1),
        nn.Conv2d(6, 6, 5, padding=2, groups=6),
        nn.AdaptiveAvgPool2d(3),
        nn.Flatten(),
        nn.Linear(54, 7),
    )
    check_counts(m.eval(), torch.randn(2, 4, 16, 16))
    check_counts(m.train(), torch.randn(2, 4, 16, 16))
    check_counts(nn.Sequential(nn.Conv1d(3, 5, 3), nn.ReLU()), torch.randn(1, 3, 20))
    check_counts(nn.Conv3d(2, 4, 3, padding=1), torch.randn(1, 2, 5, 6, 7))

    class Mats(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 6))
            self.emb = nn.Embedding(11, 5)
            self.unused = nn.Linear(3, 3)  # never called: still a parameter

        def forward(self, ids, a):
            e = self.emb(ids)  # (b, s, 5)
            y = torch.einsum("bsk,kn->bsn", e, self.w)
            z = torch.baddbmm(y, a, y)  # (b, s, s) @ (b, s, 6)
            return torch.bmm(z.transpose(1, 2), z) + torch.addmm(torch.zeros(6), z[0, :6].T, z[0, :6])

    check_counts(Mats(), torch.randint(0, 11, (2, 6)), torch.randn(2, 6, 6))


def test_matrix_vector_products_are_counted():
    # FlopCounterMode has no formula for mv / dot and counts them as 0; lowbit counts them.
    class MV(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 32))

        def forward(self, x):
            y = torch.mv(self.w, x)
            return torch.dot(y, y)

    m, x = MV(), torch.randn(32)
    assert torch_flops(m, x) == 0
    assert nas.from_torch(m, x).flops == 2 * 32 * 16 + 2 * 16


def test_names_peak_memory_and_views():
    m = nn.Sequential(nn.Linear(100, 200), nn.ReLU(), nn.Linear(200, 50)).eval()
    g = nas.from_torch(m, torch.randn(4, 100))
    c = nas.estimate(g, "cortex-a76")
    names = [row["name"] for row in c.layers if row["kind"] != "view"]
    assert names == ["0", "1", "2"]
    # Each Linear's parameters sit on its addmm row, not on the transpose that feeds it.
    assert [r["params"] for r in c.layers if r["target"] == "aten.addmm"] == [100 * 200 + 200, 200 * 50 + 50]
    # Live sets by op: {x, h} -> {h, relu(h)} -> {relu(h), out}; the largest is 2 x (4x200).
    assert c.peak_activation_bytes == 4 * 4 * (200 + 200)
    assert nas.estimate(g, "cortex-a76", 32, 8).peak_activation_bytes == 4 * (200 + 200)
    # In place, relu(h) is h's buffer: the largest live set is {x, h}.
    m2 = nn.Sequential(nn.Linear(100, 200), nn.ReLU(inplace=True), nn.Linear(200, 50)).eval()
    c2 = nas.estimate(nas.from_torch(m2, torch.randn(4, 100)), "cortex-a76")
    assert c2.peak_activation_bytes == 4 * 4 * (100 + 200)
    assert c.weight_bytes == 4 * sum(p.numel() for p in m.parameters())


def reference_latency(g: nas.Graph, d: nas.DeviceProfile, wb: int, ab: int) -> float:
    """The documented roofline, recomputed from the graph's JSON."""
    gj = json.loads(g.to_json())
    bufs = gj["buffers"]
    prec = "f32" if ab > 16 else "f16" if ab > 8 else "int4" if wb <= 4 and ab <= 4 else "int8"
    order = ["f32", "f16", "int8", "int4"]
    wider = [d.peak_gops[p] for p in reversed(order[: order.index(prec) + 1]) if p in d.peak_gops]
    peak = wider[0] if wider else min(d.peak_gops.values())

    def nbytes(ref):
        b = bufs[ref["buffer"]]
        bits = (wb if len(b["shape"]) >= 2 else 32) if b["role"] == "weight" else 32 if b["role"] == "constant" else ab
        numel = min(int(np.prod(ref["shape"])), int(np.prod(b["shape"])))
        return -(-numel * bits // 8)

    total = 0.0
    for op in gj["ops"]:
        if op["kind"] == "view":
            total += d.view_overhead_us * 1e-3
            continue
        shapes = [r["shape"] for r in op["inputs"]]
        flops = 0
        if op["kind"] in ("matmul", "conv"):
            a, b = shapes[:2]
        if op["kind"] == "matmul":
            flops = 2 * int(np.prod(a[:-2])) * a[-2] * a[-1] * b[-1]
        elif op["kind"] == "conv":
            flops = 2 * int(np.prod(op["outputs"][0]["shape"][2:])) * int(np.prod(b[2:])) * a[0] * b[0] * b[1]
        key = op["kind"]
        if key == "conv" and op["groups"] > 1 and b[1] == 1:
            key = "conv_dw"
        mem = sum(nbytes(r) for r in op["inputs"] + op["outputs"])
        t = max(flops / (peak * 1e9), mem / (d.bandwidth_gbs * 1e9)) / d.efficiency.get(key, 1.0)
        total += (t + d.kind_overhead_us.get(key, d.overhead_us) * 1e-6) * 1e3
    return total


@pytest.mark.parametrize("bits", [(32, 32), (16, 16), (8, 8), (4, 8), (4, 4), (2, 8), (1, 32)])
def test_estimate_matches_the_documented_roofline(bits):
    torch.manual_seed(0)
    import torchvision.models as tvm

    g = nas.from_torch(tvm.mobilenet_v3_small().eval(), torch.randn(1, 3, 64, 64))
    for d in nas.devices().values():
        c = nas.estimate(g, d, *bits)
        assert c.latency_ms == pytest.approx(reference_latency(g, d, *bits), rel=1e-9)
        assert c.latency_ms == pytest.approx(sum(r["latency_ms"] for r in c.layers), rel=1e-12)
    lo = nas.estimate(g, "hexagon-npu", *bits)
    assert lo.energy_mj > 0 and lo.weight_bytes <= nas.estimate(g, "hexagon-npu").weight_bytes


def test_hand_built_graph_and_json_round_trip():
    layers = [
        {"op": "conv2d", "name": "stem", "out_channels": 16, "kernel": 3, "stride": 2},
        {"op": "batchnorm"},
        {"op": "relu6", "name": "a"},
        {"op": "conv2d", "name": "dw", "out_channels": 16, "kernel": 3, "groups": 16},
        {"op": "add", "inputs": ["dw", "a"]},
        {"op": "global_avgpool"},
        {"op": "linear", "out_features": 10, "name": "fc"},
    ]
    g = nas.Graph.sequential((1, 3, 32, 32), layers)
    ref = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU6())
    dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16)
    fc = nn.Linear(16, 10)
    tot = sum(p.numel() for mod in (ref, dw, fc) for p in mod.parameters())
    flops = torch_flops(lambda x: fc(dw(ref(x)).mean((2, 3))), torch.randn(1, 3, 32, 32))
    assert (g.flops, g.params) == (flops, tot)
    g2 = nas.Graph.from_json(g.to_json())
    assert g2.to_json() == g.to_json()
    att = nas.Graph.from_layers(
        {"q": (2, 4, 10, 8), "k": (2, 2, 12, 8), "v": (2, 2, 12, 16)},
        [{"op": "attention", "inputs": ["q", "k", "v"]}],
    )
    assert att.flops == 2 * 2 * 4 * 10 * 12 * 8 + 2 * 2 * 4 * 10 * 12 * 16


@pytest.mark.parametrize(
    "inputs, layers, message",
    [
        ({"x": (1, 8)}, [{"op": "warp"}], "unknown op 'warp'"),
        ({"x": (1, 8)}, [{"op": "linear", "out_features": 4, "in_features": 9}], "shape mismatch"),
        ({"x": (1, 8)}, [{"op": "linear"}], "needs 'out_features'"),
        ({"x": (1, 3, 8, 8)}, [{"op": "conv2d", "out_channels": 4, "kernel": 3, "groups": 2}], "groups=2 must divide"),
        ({"x": (1, 3, 4, 4)}, [{"op": "conv2d", "out_channels": 4, "kernel": 9, "padding": 0}], "larger than"),
        ({"x": (2, 8), "y": (3, 8)}, [{"op": "add", "inputs": ["x", "y"]}], "cannot broadcast"),
        ({"x": (2, 8), "y": (3, 8)}, [{"op": "matmul", "inputs": ["x", "y"]}], "cannot multiply"),
        ({"x": (2, 8)}, [{"op": "relu", "inputs": ["b"]}, {"op": "relu", "name": "b"}], "not an input or an earlier"),
        ({"x": (2, 8)}, [{"op": "relu", "name": "x"}], "two tensors are named 'x'"),
        ({"x": (0, 8)}, [{"op": "relu"}], "positive sizes"),
        ({"x": (2, 8)}, ["relu"], "must be a dict"),
    ],
)
def test_bad_layer_descriptions(inputs, layers, message):
    with pytest.raises(lowbit.LowbitValueError, match=message):
        nas.Graph.from_layers(inputs, layers)


def test_bad_graph_json():
    g = json.loads(nas.Graph.sequential((1, 4), [{"op": "relu", "name": "a"}, {"op": "relu", "name": "b"}]).to_json())
    cyc = json.loads(json.dumps(g))
    cyc["ops"][0]["inputs"][0]["buffer"] = 2  # reads b's output: a cycle
    with pytest.raises(lowbit.LowbitValueError, match="cycle"):
        nas.Graph.from_json(json.dumps(cyc))
    bad = json.loads(json.dumps(g))
    bad["ops"][0]["kind"] = "teleport"
    with pytest.raises(lowbit.LowbitValueError, match="unknown variant `teleport`"):
        nas.Graph.from_json(json.dumps(bad))
    bad = json.loads(json.dumps(g))
    bad["ops"][1]["inputs"][0]["buffer"] = 99
    with pytest.raises(lowbit.LowbitValueError, match="refers to buffer 99"):
        nas.Graph.from_json(json.dumps(bad))
    bad = json.loads(json.dumps(g))
    bad["ops"][0]["kind"] = "matmul"
    with pytest.raises(lowbit.LowbitValueError, match="needs 2 inputs"):
        nas.Graph.from_json(json.dumps(bad))
    for text in ["", "{", "[]", '{"buffers": 3}', "\x00" * 10]:
        with pytest.raises(lowbit.LowbitValueError, match="bad graph JSON"):
            nas.Graph.from_json(text)


def test_device_profiles(tmp_path):
    ds = nas.devices()
    assert {"cortex-a76", "adreno-640", "hexagon-npu", "host"} <= set(ds)
    for d in ds.values():
        assert d.sources and d.bandwidth_gbs > 0
        assert nas.DeviceProfile.from_json(d.to_json()) == d
    d = nas.DeviceProfile("phone", {"f32": 100.0, "int8": 400.0}, 10.0, efficiency={"conv": 0.5}, overhead_us=3.0)
    path = tmp_path / "phone.json"
    d.save(path)
    assert nas.DeviceProfile.load(path) == d
    assert d.peak(4, 4) == 400.0 and d.peak(32, 32) == 100.0
    for kwargs, message in [
        (dict(peak_gops={"f64": 1.0}), "unknown precision"),
        (dict(peak_gops={"f32": -1.0}), "must be positive"),
        (dict(bandwidth_gbs=float("nan")), "bandwidth_gbs"),
        (dict(efficiency={"warp": 1.0}), "unknown op kind"),
        (dict(overhead_us=-1.0), "overhead_us"),
    ]:
        args = dict(name="x", peak_gops={"f32": 1.0}, bandwidth_gbs=1.0) | kwargs
        with pytest.raises(lowbit.LowbitValueError, match=message):
            nas.DeviceProfile(**args)
    path.write_text('{"name": "x", "peak_gops": {"f32": 1}, "bandwidth_gbs": 1, "extra": 2}')
    with pytest.raises(lowbit.LowbitValueError, match="unknown field `extra`"):
        nas.DeviceProfile.load(path)
    with pytest.raises(lowbit.LowbitIOError):
        nas.DeviceProfile.load(tmp_path / "missing.json")
    g = nas.Graph.sequential((1, 4), [{"op": "relu"}])
    with pytest.raises(lowbit.LowbitValueError, match="unknown device"):
        nas.estimate(g, "pixel-99")
    for bad in (0, 33, 4.0, True):
        with pytest.raises(lowbit.LowbitValueError, match="weight_bits"):
            nas.estimate(g, "cortex-a76", weight_bits=bad)


def test_fit_recovers_a_known_device():
    """Latencies made by a device with known efficiencies and overheads are fitted back exactly."""
    rng = np.random.default_rng(0)
    truth = nas.DeviceProfile(
        "truth", {"f32": 50.0}, 10.0,
        efficiency={"conv": 0.4, "conv_dw": 0.05, "matmul": 0.7, "attention": 0.3, "norm": 0.5,
                    "activation": 0.6, "elementwise": 0.8},
        overhead_us=7.0, view_overhead_us=1.5, kind_overhead_us={"conv": 20.0, "conv_dw": 20.0, "matmul": 9.0,
                                                                   "attention": 9.0},
    )
    graphs = []
    for i in range(40):
        # Every op reads its own randomly sized input, so the features are independent.
        n = lambda lo=4, hi=64: int(rng.integers(lo, hi))  # noqa: E731
        c1, c2, h = n(), n(), n(4, 32)
        inputs = {
            "a": (1, c1, h, h), "b": (1, c2, n(4, 32), n(4, 32)), "m": (n(1, 64), n()), "q": (1, 2, n(), 16),
            "e": (1, n(), n()), "x": (1, n(100, 5000)), "y": (n(1, 9), n(100, 900)),
        }
        layers = [
            {"op": "conv2d", "inputs": ["a"], "out_channels": n(), "kernel": int(rng.choice([1, 3, 5]))},
            {"op": "conv2d", "inputs": ["b"], "out_channels": c2, "kernel": int(rng.choice([3, 5])), "groups": c2},
            {"op": "linear", "inputs": ["m"], "out_features": n()},
            {"op": "attention", "inputs": ["q", "q", "q"]},
            {"op": "layernorm", "inputs": ["e"]},
            {"op": "gelu", "inputs": ["x"]},
            {"op": "add", "inputs": ["y", "y"]},
        ] + [{"op": "gelu", "inputs": ["x"]}] * (i % 4) + [{"op": "linear", "inputs": ["m"], "out_features": 8}] * (
            i // 4 % 3) + [{"op": "conv2d", "inputs": ["a"], "out_channels": 4, "kernel": 1}] * (i // 12) + [{"op": "flatten", "inputs": ["a"]}] * (i % 5)
        graphs.append(nas.Graph.from_layers(inputs, layers))
    measured = [nas.estimate(g, truth).latency_ms for g in graphs]
    model = nas.CostModel.fit(graphs, measured, device=nas.DeviceProfile("base", {"f32": 50.0}, 10.0))
    for k, v in truth.efficiency.items():
        assert model.device.efficiency[k] == pytest.approx(v, rel=1e-6), k
    assert model.device.overhead_us == pytest.approx(7.0, rel=1e-6)
    assert model.device.view_overhead_us == pytest.approx(1.5, rel=1e-6)
    for k, v in truth.kind_overhead_us.items():
        assert model.device.kind_overhead_us[k] == pytest.approx(v, rel=1e-6), k
    assert [model.predict(g) for g in graphs] == pytest.approx(measured, rel=1e-9)
    with pytest.raises(lowbit.LowbitValueError, match="measurements"):
        nas.CostModel.fit(graphs, measured[:-1])
    with pytest.raises(lowbit.LowbitValueError, match="positive"):
        nas.CostModel.fit(graphs[:2], [1.0, float("nan")])


def test_measure_times_every_op():
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
    r = nas.measure(m, torch.randn(2, 16), repeats=3, warmup=1)
    assert r.total_ms > 0 and len(r.samples_ms) == 3
    assert [(row["name"], row["op"]) for row in r.layers] == [("0", "aten.t"), ("0", "aten.addmm"), ("1", "aten.relu")]
    with pytest.raises(lowbit.LowbitValueError, match="repeats"):
        nas.measure(m, torch.randn(2, 16), repeats=0)


def random_space(rng, nb=6, max_c=5, ragged=True):
    blocks = []
    for b in range(nb):
        n = int(rng.integers(1, max_c + 1)) if ragged else max_c
        blocks.append([{m: float(rng.random() * 10) for m in nas.METRICS} for _ in range(n)])
    base = {m: float(rng.random()) for m in nas.METRICS}
    return nas.SearchSpace(blocks, base=base), blocks, base


def test_evaluate_equals_a_python_loop():
    rng = np.random.default_rng(1)
    space, blocks, base = random_space(rng)
    cand = space.random(500, seed=3)
    out = space.evaluate(cand)
    for i, c in enumerate(cand):
        for m in nas.METRICS:
            vals = [blocks[b][k][m] for b, k in enumerate(c)]
            want = max([base[m]] + vals) if m == "peak_activation_bytes" else base[m] + sum(vals)
            assert out[m][i] == pytest.approx(want, rel=1e-12)
    with pytest.raises(lowbit.LowbitValueError, match="out of range"):
        space.evaluate(np.full((1, space.n_blocks), 7))
    with pytest.raises(lowbit.LowbitValueError, match="out of range"):
        space.evaluate(-np.ones((1, space.n_blocks), dtype=np.int64))
    with pytest.raises(lowbit.LowbitValueError, match="blocks"):
        space.evaluate(np.zeros((1, space.n_blocks + 1), dtype=np.int64))
    with pytest.raises(lowbit.LowbitValueError, match="integer"):
        space.evaluate(np.zeros((1, space.n_blocks)))
    assert space.evaluate(np.zeros((0, space.n_blocks), dtype=np.int64))["latency_ms"].shape == (0,)


def test_expected_gradient_matches_finite_differences_and_autograd():
    rng = np.random.default_rng(2)
    space, _, _ = random_space(rng)
    costs = np.nan_to_num(space.costs("energy_mj"))
    logits = rng.standard_normal((3, space.n_blocks, max(space.n_choices)))
    mask = np.isnan(space.costs())
    p = np.exp(logits) * ~mask
    p /= p.sum(-1, keepdims=True)
    v, g = space.expected(p, "energy_mj")
    assert v == pytest.approx((p * costs).sum((1, 2)) + space.evaluate(np.zeros((1, space.n_blocks), dtype=np.int64))["energy_mj"][0] - costs[:, 0].sum())
    eps = 1e-6
    for b, c in [(0, 0), (1, 0), (space.n_blocks - 1, space.n_choices[-1] - 1)]:
        q = p.copy()
        q[:, b, c] += eps
        fd = (space.expected(q, "energy_mj")[0] - v) / eps
        assert fd == pytest.approx(g[:, b, c], rel=1e-6)
    # Through the softmax: lowbit's autograd function against plain torch autograd.
    t = torch.tensor(logits, requires_grad=True)
    loss = lt.expected_latency(t, space, tau=0.7, metric="energy_mj").sum()
    loss.backward()
    t2 = torch.tensor(logits, requires_grad=True)
    pr = torch.softmax(t2.masked_fill(torch.tensor(mask), float("-inf")) / 0.7, -1)
    ref = (pr * torch.tensor(costs)).sum() + 3 * (v[0] - (p[0] * costs).sum())
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
    assert torch.allclose(t.grad, t2.grad, rtol=1e-9, atol=1e-12)
    s = lt.expected_latency(torch.zeros(space.n_blocks, max(space.n_choices), requires_grad=True), space, gumbel=True, hard=True)
    assert s.ndim == 0
    with pytest.raises(lowbit.LowbitValueError, match="not linear"):
        space.expected(p, "peak_activation_bytes")
    bad = p.copy()
    bad[0][mask] = 0.5
    if mask.any():
        with pytest.raises(lowbit.LowbitValueError, match="choices but probability"):
            space.expected(bad)
    with pytest.raises(lowbit.LowbitValueError, match="logits must be"):
        lt.expected_latency(torch.zeros(2, 2), space)


def test_evolve_finds_the_brute_force_pareto_front():
    rng = np.random.default_rng(4)
    space, _, _ = random_space(rng, nb=4, max_c=4, ragged=False)
    w = rng.random((4, 4))

    def fitness(c):
        return w[np.arange(4), c].sum(1)

    allc = np.array(list(itertools.product(range(4), repeat=4)))
    m = space.evaluate(allc)
    bound = float(np.median(m["energy_mj"]))
    ok = m["energy_mj"] <= bound
    f, lat = fitness(allc)[ok], m["latency_ms"][ok]
    truth = {tuple(c) for c, fi, li in zip(allc[ok], f, lat) if not np.any((f >= fi) & (lat <= li) & ((f > fi) | (lat < li)))}
    front = nas.evolve(space, fitness, {"energy_mj": bound}, population=32, generations=60, seed=1, progress=False)
    assert {tuple(c) for c in front.choices} == truth
    assert np.all(front.metrics["energy_mj"] <= bound)
    again = nas.evolve(space, fitness, {"energy_mj": bound}, population=32, generations=60, seed=1, progress=False)
    assert np.array_equal(again.choices, front.choices)
    with pytest.raises(lowbit.LowbitValueError, match="fitness must return"):
        nas.evolve(space, lambda c: np.zeros(3), generations=1, progress=False)
    with pytest.raises(lowbit.LowbitValueError, match="unknown metric"):
        nas.evolve(space, fitness, {"speed": 1.0}, progress=False)
