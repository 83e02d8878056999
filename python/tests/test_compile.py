"""lowbit's ops inside ``torch.compile`` and ``torch.export``: every op is a torch custom op
(checked by ``torch.library.opcheck``), models built from lowbit's modules compile with
``fullgraph=True`` and zero graph breaks, and the compiled model gives the eager values and
gradients bit for bit. Small models keep the compile times within CI's budget (one inductor
compile, the rest through ``aot_eager``, which runs the same captured graphs without codegen)."""

from __future__ import annotations

import pytest
import torch

import lowbit._ops  # noqa: F401  (registers torch.ops.lowbit)
import lowbit.torch as lt
from lowbit.models.qat import QATLinear
from upstream._reference import assert_bits_equal


class _Model(torch.nn.Module):
    """Every lowbit module that can sit in a training script, in one small network."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.act = lt.FakeQuantize(-128, 127, 0.05)
        self.lsq = lt.LearnableFakeQuantize(-8, 7, 0.2)
        self.lsq_c = lt.LearnableFakeQuantize.from_tensor(torch.randn(5, 16), bits=4, axis=1, learn_zero_point=True)
        self.bit = lt.BitLinear(16, 24)
        self.qat = QATLinear(torch.nn.Linear(24, 12), "int4")
        self.w_fq = lt.FakeQuantize.from_tensor(torch.randn(12, 12), bits=4, axis=0)
        self.head = torch.nn.Linear(12, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lsq_c(self.lsq(self.act(x)))
        x = torch.relu(self.qat(self.bit(x)))
        return torch.nn.functional.linear(x, self.w_fq(self.head.weight), self.head.bias)


def _step(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["x"] = x.grad.clone()
    return y.detach(), grads


def test_every_op_passes_torch_opcheck():
    x = torch.randn(6, 16, requires_grad=True)
    s, z = torch.tensor(0.1, dtype=torch.float64), torch.tensor(2)
    torch.library.opcheck(torch.ops.lowbit.fake_quant_per_tensor, (x, s, z, -8, 7, True))
    torch.library.opcheck(torch.ops.lowbit.fake_quant_per_channel,
                          (x, torch.rand(16, dtype=torch.float64) + 0.01, torch.zeros(16, dtype=torch.int64), 1, -8, 7, True))
    sl, zl = torch.tensor([0.1], requires_grad=True), torch.tensor([1.0], requires_grad=True)
    torch.library.opcheck(torch.ops.lowbit.learnable_fake_quant, (x, sl, zl, None, -8, 7, 0.5))
    sc, zc = (torch.rand(6) + 0.01).requires_grad_(), torch.zeros(6, requires_grad=True)
    torch.library.opcheck(torch.ops.lowbit.learnable_fake_quant, (x, sc, zc, 0, 0, 15, 1.0))
    w = torch.randn(8, 16, requires_grad=True)
    torch.library.opcheck(torch.ops.lowbit.bitlinear, (x, w, torch.randn(8)))
    torch.library.opcheck(torch.ops.lowbit.bitlinear_packed, (x.detach(), w.detach(), None))
    torch.library.opcheck(torch.ops.lowbit.qat_weight, (w, "int4"))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_model_compiles_with_zero_graph_breaks(mode):
    m = _Model().train(mode == "train")
    x = torch.randn(5, 16)
    with torch.no_grad() if mode == "eval" else torch.enable_grad():
        explained = torch._dynamo.explain(m)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_training_step_equals_eager_bit_for_bit():
    torch._dynamo.reset()
    m = _Model()
    x = torch.randn(5, 16)
    y_e, g_e = _step(m, x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        y_c, g_c = _step(compiled, x)
        assert_bits_equal(y_c, y_e)
        assert g_c.keys() == g_e.keys()
        for k in g_e:
            assert_bits_equal(g_c[k], g_e[k])


class _LowbitOnly(torch.nn.Module):
    """lowbit's modules with no torch layer between them: every value and gradient is computed
    inside a lowbit op, so the compiler has nothing of its own to reorder."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.act = lt.FakeQuantize(-128, 127, 0.05)
        self.lsq = lt.LearnableFakeQuantize(-8, 7, 0.2)
        self.lsq_c = lt.LearnableFakeQuantize.from_tensor(torch.randn(5, 16), bits=4, axis=1, learn_zero_point=True)
        self.bit = lt.BitLinear(16, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bit(self.lsq_c(self.lsq(self.act(x))))


def test_inductor_compiles_and_keeps_the_bits():
    """Inductor generates code for torch's own ops between lowbit's and may reorder their sums
    (an ``nn.Linear``'s bias gradient can differ from eager in the last bit, lowbit or not); what
    lowbit's ops compute it keeps bit for bit."""
    torch._dynamo.reset()
    m = _LowbitOnly()
    x = torch.randn(5, 16)
    y_e, g_e = _step(m, x)
    y_c, g_c = _step(torch.compile(m, fullgraph=True), x)
    assert_bits_equal(y_c, y_e)
    assert g_c.keys() == g_e.keys()
    for k in g_e:
        assert_bits_equal(g_c[k], g_e[k])
    torch._dynamo.reset()
    full = _Model()
    assert_bits_equal(torch.compile(full, fullgraph=True)(x), full(x))


def test_compiled_eval_runs_the_packed_kernel_and_equals_eager():
    torch._dynamo.reset()
    m = _Model().eval()
    x = torch.randn(7, 16)
    with torch.no_grad():
        y_e = m(x)
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        assert_bits_equal(compiled(x), y_e)
        before = dict(lt._PACKED)
        assert_bits_equal(compiled(x), y_e)
        assert {k: v[2] for k, v in lt._PACKED.items()} == {k: v[2] for k, v in before.items()}  # no repacking
        with torch.no_grad():
            m.bit.weight.mul_(-1)   # changed weights are repacked
        assert not torch.equal(compiled(x), y_e)
        assert_bits_equal(compiled(x), m(x))


def test_torch_export_captures_lowbit_ops():
    m = _Model().eval()
    x = torch.randn(3, 16)
    with torch.no_grad():   # BitLinear's packed kernel serves inference (with grad on: the STE path)
        ep = torch.export.export(m, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"lowbit.fake_quant_per_tensor.default", "lowbit.learnable_fake_quant.default",
            "lowbit.bitlinear_packed.default", "lowbit.qat_weight.default"} <= targets, targets
    with torch.no_grad():
        assert_bits_equal(ep.module()(x), m(x))


def test_meta_tensors_trace_every_module():
    m = _Model().to("meta")
    y = m(torch.randn(5, 16, device="meta"))
    assert y.shape == (5, 12) and y.device.type == "meta"
    m.eval()
    with torch.no_grad():
        assert m(torch.randn(7, 16, device="meta")).shape == (7, 12)


def test_calibrate_and_ptq_results_compile():
    import lowbit.ptq as ptq
    from lowbit import QuantSpec

    torch._dynamo.reset()
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    data = [torch.randn(4, 16) for _ in range(4)]
    ptq.quantize_model(net, data, QuantSpec(4, granularity="group", group_size=16), method="gptq")
    fqs = lt.calibrate(net, data, progress=False)
    hooked = torch.nn.Sequential(*[torch.nn.Sequential(fqs[name]["input"], layer) if name in fqs else layer
                                   for name, layer in net.named_children()])
    x = torch.randn(4, 16)
    with torch.no_grad():
        eager = hooked(x)
        explained = torch._dynamo.explain(hooked)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert_bits_equal(torch.compile(hooked, fullgraph=True, backend="aot_eager")(x), eager)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitlinear_under_autocast_and_half_parameters_quantizes_in_float32(param_dtype):
    """The transformers recipe: codes and scales from float32 copies whatever the dtypes, so
    the integer product (exact in float32) does not depend on autocast or the layer's dtype."""
    torch.manual_seed(4)
    ref = lt.BitLinear(64, 24)
    layer = lt.BitLinear(64, 24, dtype=param_dtype)
    with torch.no_grad():
        layer.weight.copy_(ref.weight)
        layer.bias.copy_(ref.bias)
    x = torch.randn(6, 64).to(param_dtype)
    y = layer(x.clone().requires_grad_())
    assert y.dtype == param_dtype
    # The same codes as the float32 layer given the float32 values of the same inputs.
    with torch.no_grad():
        exact = ref.train()(x.float())
        w32 = layer.weight.float()
        ref_half = lt.BitLinear(64, 24)
        ref_half.weight.copy_(w32)
        ref_half.bias.copy_(layer.bias.float())
        assert_bits_equal(y.detach(), ref_half(x.float()).to(param_dtype))
    y.float().sum().backward()
    assert layer.weight.grad.dtype == param_dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = ref(x.float())
        zc = torch.compile(ref, fullgraph=True, backend="aot_eager")(x.float())
    assert z.dtype == torch.float32
    assert_bits_equal(z.detach(), exact)
    assert_bits_equal(zc.detach(), exact)


def test_fake_quant_modules_under_autocast_compile_and_equal_eager():
    torch._dynamo.reset()
    m = _Model()
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = m(x)
        explained = torch._dynamo.explain(m)(x)
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert_bits_equal(compiled.detach(), eager.detach())
    fq = lt.FakeQuantize(-8, 7, 0.1)
    xb = torch.randn(100).bfloat16()
    assert_bits_equal(fq(xb), torch.fake_quantize_per_tensor_affine(xb, 0.1, 0, -8, 7))


@pytest.mark.parametrize("qmin,qmax", [(-128, 127), (0, 255), (-8, 7), (0, 15), (-2, 1)])
def test_the_other_device_path_of_quantize_equals_the_kernels(qmin, qmax):
    """On devices other than the CPU the codes come from torch's quantize / dequantize; that
    path (device-independent torch code) runs here on CPU tensors and must give the kernels' codes."""
    from conftest import adversarial

    from lowbit import _ops

    x = torch.from_numpy(adversarial(0.05, 3000, seed=qmax)).reshape(-1, 5)
    zp = (qmin + qmax) // 2
    q = _ops.quantize_per_tensor(x, 0.05, zp, qmin, qmax)
    assert_bits_equal(_ops._torch_quantize_per_tensor(x, 0.05, zp, qmin, qmax), q)
    assert_bits_equal(_ops._torch_dequantize_per_tensor(q, 0.05, zp), _ops.dequantize_per_tensor(q, 0.05, zp))
    s = torch.tensor([0.05, 0.1, 0.003, 1.0, 0.2], dtype=torch.float64)
    z = torch.tensor([zp, qmin, qmax, 0 if qmin <= 0 <= qmax else qmin, zp], dtype=torch.int64)
    for axis in (1, -1):
        qc = _ops.quantize_per_channel(x, s, z, axis, qmin, qmax)
        assert_bits_equal(_ops._torch_quantize_per_channel(x, s, z, axis, qmin, qmax), qc)
        assert_bits_equal(_ops._torch_dequantize_per_channel(qc, s, z, axis), _ops.dequantize_per_channel(qc, s, z, axis))


def test_quantize_ops_pass_opcheck_and_compile():
    x = torch.randn(6, 16)
    s, z = torch.rand(16, dtype=torch.float64) + 0.01, torch.zeros(16, dtype=torch.int64)
    torch.library.opcheck(torch.ops.lowbit.quantize_per_tensor, (x, 0.1, 3, 0, 15))
    torch.library.opcheck(torch.ops.lowbit.quantize_per_channel, (x, s, z, 1, -8, 7))
    q = lt.quantize_per_tensor(x, 0.1, 3, 0, 15)
    torch.library.opcheck(torch.ops.lowbit.dequantize_per_tensor, (q, 0.1, 3))
    torch.library.opcheck(torch.ops.lowbit.dequantize_per_channel, (q, s, z, 1))

    def roundtrip(t):
        return lt.dequantize_per_tensor(lt.quantize_per_tensor(t, 0.1, 3, 0, 15), 0.1, 3)

    torch._dynamo.reset()
    assert torch._dynamo.explain(roundtrip)(x).graph_break_count == 0
    assert_bits_equal(torch.compile(roundtrip, fullgraph=True, backend="aot_eager")(x), roundtrip(x))


def test_expected_latency_compiles_for_dnas():
    import lowbit.nas as nas

    space = nas.SearchSpace([[{"latency_ms": 1.0}, {"latency_ms": 3.0}, {"latency_ms": 2.5}]] * 3 + [[{"latency_ms": 4.0}]])
    torch.manual_seed(0)
    logits = torch.randn(4, 3)

    def loss(l):
        return lt.expected_latency(l, space, tau=0.5)

    torch._dynamo.reset()
    assert torch._dynamo.explain(loss)(logits).graph_break_count == 0
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ya, yb = loss(a), torch.compile(loss, fullgraph=True, backend="aot_eager")(b)
    ya.backward()
    yb.backward()
    assert_bits_equal(yb.detach(), ya.detach())
    assert_bits_equal(b.grad, a.grad)
    probs = torch.softmax(logits, -1)
    probs[3, 1:] = 0.0   # the last block has one choice
    torch.library.opcheck(torch.ops.lowbit.expected_cost, (probs.requires_grad_(), space._op_id, "latency_ms"))


@pytest.mark.parametrize("qmin,qmax", [(-128, 127), (0, 255), (-8, 7), (0, 15), (-2, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_other_device_path_of_fake_quant_equals_the_kernels(qmin, qmax, dtype):
    """Off the CPU, fake-quant runs ATen's kernel for that device; the same call on CPU tensors
    must give lowbit's bits (values and mask) on adversarial inputs."""
    from conftest import adversarial

    from lowbit import _ops

    x = torch.from_numpy(adversarial(0.05, 3000, seed=qmax)).reshape(-1, 5).to(dtype)
    zp = (qmin + qmax) // 2
    s, z = torch.tensor(0.05, dtype=torch.float64), torch.tensor(zp)
    for a, b in zip(_ops._torch_fake_quant_per_tensor(x, s, z, qmin, qmax, True),
                    _ops.fake_quant_per_tensor(x, s, z, qmin, qmax, True)):
        assert_bits_equal(a, b)
    sc = torch.tensor([0.05, 0.1, 0.003, 1.0, 0.2], dtype=torch.float64)
    zc = torch.tensor([zp, qmin, qmax, zp, zp], dtype=torch.int64)
    for axis in (1, -1):
        for a, b in zip(_ops._torch_fake_quant_per_channel(x, sc, zc, axis, qmin, qmax, True),
                        _ops.fake_quant_per_channel(x, sc, zc, axis % 2, qmin, qmax, True)):
            assert_bits_equal(a, b)
