"""lowbit.torch.calibrate on a real model, and sync_observers across two gloo processes."""

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import lowbit
import lowbit.calib as lc
import lowbit.torch as lt


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10)
    )


def test_calibrate_observes_inputs_and_weights():
    model = make_model()
    data = [torch.randn(4, 3, 8, 8) for _ in range(5)]
    cal = lt.calibrate(model, data, spec=lowbit.QuantSpec(8, symmetric=False), method="mse", progress=False)
    assert sorted(cal) == ["0", "3"]
    # the input observer of layer 0 saw exactly the data; its qparams equal a direct observer's
    direct = lc.HistogramObserver(bits=8, method="mse")
    for d in data:
        direct.update(d)
    assert cal.observers["0"]["input"].state_dict() == direct.state_dict()
    s, z = direct.qparams()
    assert cal["0"]["input"].scale.item() == s and cal["0"]["input"].zero_point.item() == z
    # layer 3's input is the flattened ReLU output
    with torch.no_grad():
        acts = [model[2](model[1](model[0](d))) for d in data]
    direct = lc.HistogramObserver(bits=8, method="mse")
    for a in acts:
        direct.update(a)
    assert cal.observers["3"]["input"].state_dict() == direct.state_dict()
    # weights: per-channel symmetric min-max, as torch.ao's observer
    ref = torch.ao.quantization.PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    ref(model[0].weight.detach())
    rs, rz = ref.calculate_qparams()
    assert torch.equal(cal["0"]["weight"].scale, rs.float())
    # the fake quantizers work on the layer's tensors
    out = cal["0"]["weight"](model[0].weight.detach())
    assert torch.equal(out, torch.fake_quantize_per_channel_affine(model[0].weight.detach(), rs.float(), rz.int(), 0, -128, 127))
    assert model.training  # mode restored


def _rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    rng = np.random.default_rng(7)
    data = [rng.standard_normal((32, 16)).astype(np.float32) * (1 + i) for i in range(6)]
    obs = {"h": lc.HistogramObserver(bits=4), "m": lc.MinMaxObserver(), "c": lc.PerChannelMinMaxObserver(1)}
    for i, d in enumerate(data):
        if i % world == rank:
            for o in obs.values():
                o.update(d)
    lt.sync_observers(obs)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        for k in sorted(obs):
            f.write(obs[k].state_dict()["lowbit_observer"] + "\n")
    dist.destroy_process_group()


def test_sync_observers_across_two_processes(tmp_path):
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = (tmp_path / "rank0.txt").read_text()
    r1 = (tmp_path / "rank1.txt").read_text()
    assert r0 == r1
    rng = np.random.default_rng(7)
    data = [rng.standard_normal((32, 16)).astype(np.float32) * (1 + i) for i in range(6)]
    one = {"h": lc.HistogramObserver(bits=4), "m": lc.MinMaxObserver(), "c": lc.PerChannelMinMaxObserver(1)}
    for d in data:
        for o in one.values():
            o.update(d)
    lines = r0.splitlines()
    for line, k in zip(lines, sorted(one)):
        restored = type(one[k])()
        restored.load_state_dict({"lowbit_observer": line})
        np.testing.assert_array_equal(np.asarray(restored.qparams()[0]), np.asarray(one[k].qparams()[0]))
        if k == "h":
            assert restored.state_dict() == one[k].state_dict()


def test_sync_is_a_no_op_without_distributed():
    o = lc.MinMaxObserver()
    o.update(np.ones(3, np.float32))
    before = o.state_dict()
    lt.sync_observers([o])
    assert o.state_dict() == before
    with pytest.raises(lowbit.LowbitTypeError):
        lt.sync_observers([1])


def test_layers_the_data_never_runs_are_left_out():
    """A model with a head the inputs do not take: that head's layers are not in the result (they
    once came back with torch.ao's default qparams and a warning), and data that runs no layer
    at all is an error."""
    import warnings

    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Linear(8, 8)
            self.a = torch.nn.Linear(8, 2)
            self.b = torch.nn.Linear(8, 3)

        def forward(self, x: torch.Tensor, head: str = "a") -> torch.Tensor:
            return getattr(self, head)(self.body(x))

    net = TwoHeads()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cal = lt.calibrate(net, [{"x": torch.randn(4, 8), "head": "a"} for _ in range(2)], progress=False)
    assert sorted(cal) == ["a", "body"]
    assert sorted(cal.observers) == ["a", "b", "body"]

    class Skips(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unused = torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    with pytest.raises(lowbit.LowbitValueError, match="none of the model's"):
        lt.calibrate(Skips(), [torch.randn(2, 8)], progress=False)


def test_attach_runs_the_model_as_calibrated_and_removes_cleanly():
    import torch

    import lowbit
    import lowbit.torch as lt

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    net = Net()
    data = [torch.randn(16, 8) for _ in range(4)]
    cal = lt.calibrate(net, data, progress=False)
    x = torch.randn(5, 8)
    before = net(x).detach()
    keys = sorted(net.state_dict())
    handle = cal.attach(net)
    with torch.no_grad():
        h = torch.nn.functional.linear(cal["a"]["input"](x), cal["a"]["weight"](net.a.parametrizations.weight.original), net.a.bias)
        want = torch.nn.functional.linear(cal["b"]["input"](torch.relu(h)), cal["b"]["weight"](net.b.parametrizations.weight.original), net.b.bias)
        got = net(x)
    assert torch.equal(got, want) and not torch.equal(got, before)
    torch._dynamo.reset()
    assert torch._dynamo.explain(net)(x).graph_break_count == 0
    with pytest.raises(lowbit.LowbitValueError, match="already"):
        cal.attach(net)
    handle.remove()
    assert torch.equal(net(x), before) and sorted(net.state_dict()) == keys
    assert not hasattr(net.a, "lowbit_input")
    # Inputs only; a model without the layers is refused and keeps nothing attached.
    handle = cal.attach(net, weights=False)
    assert not hasattr(net.a, "parametrizations")
    handle.remove()
    other = torch.nn.Sequential(torch.nn.Linear(8, 4))
    with pytest.raises(lowbit.LowbitValueError, match="no layer"):
        cal.attach(other)
    assert not hasattr(other[0], "lowbit_input")
