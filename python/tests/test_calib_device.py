"""Observers fed tensors on another device reduce them there and hand the core only a summary
(min / max, per-channel min / max, or histogram counts on the batch's canonical grid). The
summary path is device-independent torch code, so it runs here on CPU tensors (forced) and must
leave exactly the state a CPU update leaves, on random and degenerate batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lowbit
import lowbit.calib as lc

BATCHES = [
    lambda g: torch.randn(64, 33, generator=g),
    lambda g: torch.randn(64, 33, generator=g) * 1e3 + 5e3,    # one-sided, wide
    lambda g: torch.rand(64, 33, generator=g) + 1.0,          # all positive
    lambda g: -torch.rand(64, 33, generator=g) - 0.5,         # all negative
    lambda g: torch.full((64, 33), 7.0),                      # constant
    lambda g: torch.zeros(64, 33),                            # zeros
    lambda g: torch.full((64, 33), 1e-30),                    # tiny constant
    lambda g: torch.rand(64, 33, generator=g) * 1e-6,         # tiny range
    lambda g: torch.rand(64, 33, generator=g) * 1e-40,        # denormals
    lambda g: torch.randn(64, 33, generator=g)[:, ::2],       # strided
]


def _observers():
    return [
        lambda: lc.MinMaxObserver(bits=8),
        lambda: lc.MovingAverageMinMaxObserver(averaging_constant=0.1, bits=4, symmetric=True),
        lambda: lc.PerChannelMinMaxObserver(axis=1, bits=8),
        lambda: lc.PerChannelMinMaxObserver(axis=-2, bits=4, symmetric=True),
        lambda: lc.HistogramObserver(bits=8, method="mse"),
        lambda: lc.HistogramObserver(bits=4, method="percentile", bins=64),
        lambda: lc.HistogramObserver(bits=8, per_channel=True, axis=1, bins=128),
        lambda: lc.HistogramObserver(bits=4, method="entropy", per_channel=True, axis=-2, bins=256),
    ]


@pytest.mark.parametrize("make", _observers())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_device_summaries_leave_the_cpu_state(make, dtype):
    g = torch.Generator().manual_seed(0)
    cpu, dev = make(), make()
    for i, batch in enumerate(BATCHES):
        x = batch(g).to(dtype)
        if dtype == torch.float64:  # values between float32's
            x = x + torch.randn(x.shape, generator=g, dtype=torch.float64) * 1e-9 * x.abs().max().clamp(min=1e-30)
        if isinstance(cpu, lc.PerChannelMinMaxObserver) or cpu._kind == "per_channel_histogram":
            x = x[:, :16].contiguous() if x.shape[1] >= 16 else x
        cpu.update(x)
        dev._update_on_device(x)
        assert dev.state_dict() == cpu.state_dict(), f"batch {i}"
    assert dev.qparams().__repr__() == cpu.qparams().__repr__()


@pytest.mark.parametrize("make", _observers())
def test_bad_batches_are_refused_the_same_way(make):
    obs, ref = make(), make()
    good = torch.randn(8, 16)
    obs._update_on_device(good)
    ref.update(good)
    for bad in (torch.tensor([[1.0, float("nan")] * 8]), torch.tensor([[float("inf"), 1.0] * 8])):
        with pytest.raises(lowbit.LowbitValueError) as e_dev:
            obs._update_on_device(bad)
        with pytest.raises(lowbit.LowbitValueError) as e_cpu:
            ref.update(bad)
        assert str(e_dev.value) == str(e_cpu.value)
        assert obs.state_dict() == ref.state_dict()
    empty = torch.zeros(0, 16)
    outcomes = []
    for f in (obs._update_on_device, ref.update):
        try:
            f(empty)
            outcomes.append("ok")
        except lowbit.LowbitError as e:
            outcomes.append(str(e))
    assert outcomes[0] == outcomes[1]
    assert obs.state_dict() == ref.state_dict()
    with pytest.raises(lowbit.LowbitTypeError):
        obs._update_on_device(torch.ones(3, 16, dtype=torch.int32))
    with pytest.raises(lowbit.LowbitTypeError):
        obs.update(torch.empty(3, 16, device="meta"))


def test_per_channel_summaries_keep_every_axis():
    g = torch.Generator().manual_seed(1)
    for shape in [(5,), (4, 5), (2, 3, 5), (2, 3, 4, 5)]:
        for axis in range(-len(shape), len(shape)):
            x = torch.randn(shape, generator=g)
            a, b = lc.PerChannelMinMaxObserver(axis=axis), lc.PerChannelMinMaxObserver(axis=axis)
            a.update(x)
            b._update_on_device(x)
            assert a.state_dict() == b.state_dict(), (shape, axis)
    with pytest.raises(lowbit.LowbitValueError):
        lc.PerChannelMinMaxObserver(axis=3)._update_on_device(torch.randn(2, 3))
    with pytest.raises(lowbit.LowbitValueError):
        lc.HistogramObserver(bits=8, per_channel=True, axis=2)._update_on_device(torch.randn(2, 3))


def test_a_big_batch_moves_only_its_summary(monkeypatch):
    """The histogram path calls ``.cpu()`` on the counts and the extremes only."""
    moved = []
    real_cpu = torch.Tensor.cpu

    def spy(self, *a, **k):
        moved.append(self.numel())
        return real_cpu(self, *a, **k)

    obs = lc.HistogramObserver(bits=8)
    x = torch.randn(1000, 1000)
    monkeypatch.setattr(torch.Tensor, "cpu", spy)
    obs._update_on_device(x)
    assert moved and max(moved) <= 2048
    ref = lc.HistogramObserver(bits=8)
    monkeypatch.undo()
    ref.update(x)
    assert ref.state_dict() == obs.state_dict()
    np.testing.assert_equal(ref.qparams(), obs.qparams())
