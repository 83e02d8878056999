"""PyTorch's ``test/quantization/core/test_workflow_module.py`` (``TestObserver``,
``TestHistogramObserver``, ``TestFakeQuantize``), adapted: lowbit's observers watch the same
batches as torch.ao's and must give their qparams bit for bit, plus the values upstream asserts.

How torch.ao's settings map onto lowbit's: ``reduce_range`` is one bit less (``bits=7``: 0..127 /
-64..63, which is what torch.ao's reduce_range gives); ``per_*_symmetric`` is ``symmetric=True``.
lowbit's asymmetric observers always use unsigned codes and its symmetric ones signed codes, so
torch's qint8-affine and quint8-symmetric observers are the same grid with the zero point moved by
``torch quant_min - lowbit quant_min``; the tests check exactly that. lowbit has no
moving-average per-channel observer, no ``per_channel_affine_float_qparams`` and no memoryless
mode, and its HistogramObserver searches the grid differently from torch's (by design), so those
upstream cases are checked for what they assert about lowbit's own observers only.
"""

from __future__ import annotations

import io
import itertools
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings

import lowbit
import lowbit.calib as lc
import lowbit.torch as lt

from ._reference import (
    TOLERANCE,
    array_shapes,
    assert_bits_equal,
    fq_per_channel_grad_reference,
    fq_per_channel_reference,
    per_channel_tensor,
    qparams,
)

pytestmark = pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max:UserWarning")

ao = torch.ao.quantization
PER_TENSOR = list(itertools.product((torch.qint8, torch.quint8), (torch.per_tensor_affine, torch.per_tensor_symmetric), (False, True)))
PER_CHANNEL = list(itertools.product((torch.qint8, torch.quint8), (torch.per_channel_affine, torch.per_channel_symmetric), (0, 1, 2, 3), (False, True)))


def _ids(cases: list) -> list[str]:
    return ["-".join(str(v).replace("torch.", "") for v in c) for c in cases]


def _settings(qscheme: torch.qscheme, reduce_range: bool) -> dict:
    """lowbit's observer settings for a torch.ao qscheme and reduce_range."""
    symmetric = qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric)
    return {"bits": 7 if reduce_range else 8, "symmetric": symmetric}


def _roundtrip(state: dict, weights_only: bool = True) -> dict:
    b = io.BytesIO()
    torch.save(state, b)
    b.seek(0)
    return torch.load(b, weights_only=weights_only)


class TestObserver:
    @pytest.mark.parametrize("qdtype,qscheme,reduce_range", PER_TENSOR, ids=_ids(PER_TENSOR))
    def test_per_tensor_observers(self, qdtype, qscheme, reduce_range):
        """test_workflow_module.py::TestObserver::test_per_tensor_observers: MinMaxObserver and
        MovingAverageMinMaxObserver(0.5) over the upstream batches. lowbit's observer returns its
        input, gives torch.ao's scale bit for bit and its zero point (after the grid offset, see the
        module docstring), equal to upstream's reference values; the state survives
        torch.save / torch.load (weights_only) and pickle into a fresh observer of the same class.
        Upstream loads a MovingAverage state into a MinMaxObserver; lowbit deliberately refuses a
        state of another observer kind (LowbitValueError)."""
        if qdtype == torch.quint8 and qscheme == torch.per_tensor_symmetric:
            reduce_range = False  # as upstream: not a valid combination
        cfg = _settings(qscheme, reduce_range)
        pairs = [
            (ao.MinMaxObserver(dtype=qdtype, qscheme=qscheme, reduce_range=reduce_range), lc.MinMaxObserver(**cfg)),
            (
                ao.MovingAverageMinMaxObserver(averaging_constant=0.5, dtype=qdtype, qscheme=qscheme, reduce_range=reduce_range),
                lc.MovingAverageMinMaxObserver(averaging_constant=0.5, **cfg),
            ),
        ]
        for theirs, ours in pairs:
            if isinstance(ours, lc.MovingAverageMinMaxObserver):
                x = torch.tensor([0.0, 2.0, 2.0, 3.0, 4.0, 5.0, 6.0])
                y = torch.tensor([2.0, 5.0, 5.0, 6.0, 7.0, 10.0])
            else:
                x = torch.tensor([1.0, 2.0, 2.0, 3.0, 4.0, 5.0, 6.0])
                y = torch.tensor([4.0, 5.0, 5.0, 6.0, 7.0, 8.0])
            theirs(x)
            theirs(y)
            assert ours(x) is x
            result = ours(y)
            assert result is y
            assert (theirs.min_val.item(), theirs.max_val.item()) == (1.0, 8.0)
            offset = theirs.quant_min - ours.quant_min
            assert theirs.quant_max - ours.quant_max == offset
            t_scale, t_zp = theirs.calculate_qparams()
            scale, zp = ours.qparams()
            assert scale == t_scale.item()
            assert zp + offset == t_zp.item()
            if reduce_range:
                if qscheme == torch.per_tensor_symmetric:
                    ref_scale, ref_zp = 0.062745 * 255 / 127, 0 if qdtype is torch.qint8 else 128
                else:
                    ref_scale, ref_zp = 0.0313725 * 255 / 127, -64 if qdtype is torch.qint8 else 0
            else:
                if qscheme == torch.per_tensor_symmetric:
                    ref_scale, ref_zp = 0.062745, 0 if qdtype is torch.qint8 else 128
                else:
                    ref_scale, ref_zp = 0.0313725, -128 if qdtype is torch.qint8 else 0
            assert zp + offset == ref_zp
            assert abs(scale - ref_scale) <= 1e-5
            for weights_only in (True, False):
                state = ours.state_dict()
                loaded_dict = _roundtrip(state, weights_only)
                assert loaded_dict == state
                loaded = type(ours)(**cfg)
                loaded.load_state_dict(loaded_dict)
                assert loaded.qparams() == ours.qparams()
            assert pickle.loads(pickle.dumps(ours)).qparams() == ours.qparams()
            other = lc.MinMaxObserver(**cfg) if isinstance(ours, lc.MovingAverageMinMaxObserver) else lc.MovingAverageMinMaxObserver(0.5, **cfg)
            with pytest.raises(lowbit.LowbitValueError):
                other.load_state_dict(ours.state_dict())

    @pytest.mark.parametrize("qdtype,qscheme,ch_axis,reduce_range", PER_CHANNEL, ids=_ids(PER_CHANNEL))
    def test_per_channel_observers(self, qdtype, qscheme, ch_axis, reduce_range):
        """test_workflow_module.py::TestObserver::test_per_channel_observers for
        PerChannelMinMaxObserver (per_channel_affine and per_channel_symmetric, every axis of the
        upstream 2x2x2x2 tensor): lowbit's scales equal torch.ao's bit for bit, its zero points
        after the grid offset, and both equal upstream's reference tables (rtol 1e-5, atol 1e-4 for
        scales, exact zero points); the state survives torch.save / torch.load."""
        if qdtype == torch.quint8 and qscheme == torch.per_channel_symmetric:
            reduce_range = False
        cfg = _settings(qscheme, reduce_range)
        theirs = ao.PerChannelMinMaxObserver(reduce_range=reduce_range, ch_axis=ch_axis, dtype=qdtype, qscheme=qscheme)
        ours = lc.PerChannelMinMaxObserver(axis=ch_axis, **cfg)
        x = torch.tensor(
            [
                [[[1.0, 2.0], [2.0, 2.5]], [[3.0, 4.0], [4.5, 6.0]]],
                [[[-4.0, -3.0], [5.0, 5.0]], [[6.0, 3.0], [7.0, 8.0]]],
            ]
        )
        theirs(x)
        assert ours(x) is x
        ref_min_vals = [[1.0, -4.0], [-4.0, 3.0], [-4.0, 2.0], [-4.0, -3.0]]
        ref_max_vals = [[6.0, 8.0], [5.0, 8.0], [6.0, 8.0], [7.0, 8.0]]
        assert theirs.min_val.tolist() == ref_min_vals[ch_axis] and theirs.max_val.tolist() == ref_max_vals[ch_axis]
        per_channel_symmetric_ref_scales = [[0.04705882, 0.06274509], [0.03921569, 0.0627451], [0.04705882, 0.0627451], [0.05490196, 0.0627451]]
        per_channel_affine_ref_scales = [[0.02352941, 0.04705882], [0.03529412, 0.03137255], [0.03921569, 0.03137255], [0.04313726, 0.04313726]]
        per_channel_affine_qint8_zp = [[-128, -43], [-15, -128], [-26, -128], [-35, -58]]
        per_channel_affine_quint8_zp = [[0, 85], [113, 0], [102, 0], [93, 70]]
        if qscheme == torch.per_channel_symmetric:
            ref_scales = per_channel_symmetric_ref_scales[ch_axis]
            ref_zero_points = [0, 0] if qdtype is torch.qint8 else [128, 128]
        else:
            ref_scales = per_channel_affine_ref_scales[ch_axis]
            ref_zero_points = per_channel_affine_qint8_zp[ch_axis] if qdtype is torch.qint8 else per_channel_affine_quint8_zp[ch_axis]
        if reduce_range:
            ref_scales = [s * 255 / 127 for s in ref_scales]
            ref_zero_points = [math.floor(z / 2) for z in ref_zero_points]
        offset = theirs.quant_min - ours.quant_min
        t_scale, t_zp = theirs.calculate_qparams()
        scale, zp = ours.qparams()
        assert scale.dtype == np.float32 and zp.dtype == np.int32
        assert_bits_equal(torch.from_numpy(scale), t_scale)
        assert (zp + offset).tolist() == t_zp.tolist() == ref_zero_points
        np.testing.assert_allclose(scale, ref_scales, rtol=1e-5, atol=1e-4)
        loaded_dict = _roundtrip(ours.state_dict())
        assert loaded_dict == ours.state_dict()
        loaded = lc.PerChannelMinMaxObserver(axis=ch_axis, **cfg)
        loaded.load_state_dict(loaded_dict)
        for a, b in zip(loaded.qparams(), ours.qparams()):
            assert_bits_equal(a, b)

    @pytest.mark.parametrize("kind", ["minmax", "moving_average", "per_channel", "histogram", "per_channel_histogram"])
    def test_qparams_before_data(self, kind):
        """test_workflow_module.py::TestObserver::test_per_tensor_observers /
        test_per_channel_observers / TestHistogramObserver::test_histogram_observer call
        calculate_qparams() before any data: torch.ao warns and returns scale 1.0, zero point 0
        (per channel: one-element tensors). lowbit must do the same."""
        theirs = {
            "minmax": ao.MinMaxObserver(),
            "moving_average": ao.MovingAverageMinMaxObserver(),
            "per_channel": ao.PerChannelMinMaxObserver(),
            "histogram": ao.HistogramObserver(),
            "per_channel_histogram": ao.PerChannelMinMaxObserver(),
        }[kind]
        ours = {
            "minmax": lc.MinMaxObserver,
            "moving_average": lc.MovingAverageMinMaxObserver,
            "per_channel": lc.PerChannelMinMaxObserver,
            "histogram": lc.HistogramObserver,
            "per_channel_histogram": lambda: lc.HistogramObserver(per_channel=True),
        }[kind]()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_scale, t_zp = theirs.calculate_qparams()
        with pytest.warns(UserWarning):
            scale, zp = ours.qparams()
        if kind.startswith("per_channel"):
            assert np.asarray(scale).tolist() == t_scale.tolist() == [1.0]
            assert np.asarray(zp).tolist() == t_zp.tolist() == [0]
        else:
            assert (scale, zp) == (t_scale.item(), t_zp.item()) == (1.0, 0)

    def test_zero_numel(self):
        """test_workflow_module.py::TestObserver::test_zero_numel: every lowbit observer and
        lowbit.torch.FakeQuantize (learned and fixed qparams) takes an empty tensor without
        crashing and returns it, as torch.ao's do; an empty batch leaves the observer's state as it was."""
        x = torch.tensor([])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's FakeQuantize warns that its observer has no data
            for theirs in (ao.MinMaxObserver(), ao.MovingAverageMinMaxObserver(), ao.PerChannelMinMaxObserver(),
                           ao.HistogramObserver(), ao.FakeQuantize(), ao.default_fixed_qparams_range_0to1_fake_quant()):
                theirs(x)
        for ours, per_channel in ((lc.MinMaxObserver(), False), (lc.MovingAverageMinMaxObserver(), False),
                                  (lc.PerChannelMinMaxObserver(), True), (lc.HistogramObserver(), False),
                                  (lc.HistogramObserver(per_channel=True), True)):
            assert ours(x) is x
            ours(torch.tensor([[-1.0, 2.0, 0.5], [3.0, -4.0, 1.0]]))
            before = ours.state_dict()
            empty = torch.empty(2, 0) if per_channel else x  # an empty batch with the channels seen so far
            assert ours(empty) is empty
            assert ours.state_dict() == before
        for fq in (lt.FakeQuantize(0, 255), lt.FakeQuantize(0, 255, 0.1, 0)):
            assert_bits_equal(fq(x), x.clone())


class TestHistogramObserver:
    @pytest.mark.parametrize("symmetric,reduce_range", list(itertools.product((False, True), (False, True))))
    def test_histogram_observer(self, symmetric, reduce_range):
        """test_workflow_module.py::TestHistogramObserver::test_histogram_observer: batches
        [2, 3, 4, 5] (requires_grad) and [5, 6, 7, 8], a range that excludes 0. lowbit's search
        differs from torch's by design, so this checks what upstream's reference values imply for
        any grid: the input comes back as it went in, the grid covers 0 (zero point = quant_min for
        affine codes of non-negative data, 0 for symmetric), its range lies within the data's
        hull plus a step, and the state survives torch.save / torch.load."""
        obs = lc.HistogramObserver(bits=7 if reduce_range else 8, symmetric=symmetric)
        x = torch.tensor([2.0, 3.0, 4.0, 5.0], requires_grad=True)
        out_x = obs(x)
        assert out_x is x and out_x.requires_grad
        obs(torch.tensor([5.0, 6.0, 7.0, 8.0]))
        scale, zp = obs.qparams()
        assert zp == (0 if symmetric else obs.quant_min)
        assert scale > 0
        lo, hi = obs.clip_range()
        assert (obs.quant_min - zp) * scale == pytest.approx(lo) and (obs.quant_max - zp) * scale == pytest.approx(hi)
        assert -8.0 - scale <= lo <= 0.0 <= hi <= 8.0 + scale
        loaded = lc.HistogramObserver(bits=7 if reduce_range else 8, symmetric=symmetric)
        loaded.load_state_dict(_roundtrip(obs.state_dict()))
        assert loaded.qparams() == (scale, zp)

    def test_histogram_observer_one_sided(self):
        """test_workflow_module.py::TestHistogramObserver::test_histogram_observer_one_sided:
        non-negative data whose minimum is 0 (quint8 with reduce_range: bits=7) gives zero point 0."""
        obs = lc.HistogramObserver(bits=7)
        obs(torch.tensor([0.0, 0.3, 1.2, 1.7]))
        obs(torch.tensor([0.1, 1.3, 2.0, 2.7]))
        assert obs.qparams()[1] == 0

    def test_histogram_observer_same_inputs(self):
        """test_workflow_module.py::TestHistogramObserver::test_histogram_observer_same_inputs:
        constant batches (ones, zeros twice) before [2..5] and [5..8], symmetric qint8: valid
        qparams (zero point 0, positive scale) whose range reaches the data's maximum within a step."""
        obs = lc.HistogramObserver(symmetric=True)
        for t in (torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True), torch.zeros(4, requires_grad=True),
                  torch.tensor([2.0, 3.0, 4.0, 5.0], requires_grad=True), torch.tensor([5.0, 6.0, 7.0, 8.0])):
            assert obs(t) is t
        scale, zp = obs.qparams()
        assert zp == 0 and scale > 0
        assert 8.0 - 2 * scale <= obs.quant_max * scale <= 8.0 + scale

    def test_histogram_observer_save_load_state_dict(self):
        """test_workflow_module.py::TestHistogramObserver::test_histogram_observer_save_load_state_dict:
        a state saved after one batch loads into a fresh observer (through torch.save / torch.load)
        with the same histogram and qparams."""
        obs1 = lc.HistogramObserver()
        obs1(torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(0)))
        obs2 = lc.HistogramObserver()
        obs2.load_state_dict(_roundtrip(obs1.state_dict()))
        for a, b in zip(obs1.histogram(), obs2.histogram()):
            assert_bits_equal(a, b)
        assert obs1.qparams() == obs2.qparams()


class TestFakeQuantize:
    @given(X=per_channel_tensor(shapes=array_shapes(2, 5), qparams=qparams(dtypes=torch.qint8)))
    @settings(max_examples=30, deadline=None)
    def test_fq_module_per_channel(self, X):
        """test_workflow_module.py::TestFakeQuantize::test_fq_module_per_channel: torch's
        FakeQuantize(default_per_channel_weight_observer, -128, 127, ch_axis=axis) against lowbit's
        PerChannelMinMaxObserver(axis, symmetric=True) + lowbit.torch.FakeQuantize(axis=axis): the
        same qparams, forward and gradient bit for bit, and within tolerance of the references."""
        x, (_, _, axis, _) = X
        qmin, qmax = -128, 127
        xt, xl = torch.from_numpy(x).requires_grad_(), torch.from_numpy(x.copy()).requires_grad_()
        fq_module = ao.FakeQuantize(ao.default_per_channel_weight_observer, qmin, qmax, ch_axis=axis)
        yt = fq_module(xt)
        obs = lc.PerChannelMinMaxObserver(axis=axis, symmetric=True)
        obs.update(xl)
        scale, zp = obs.qparams()
        ours = lt.FakeQuantize(qmin, qmax, scale, zp, axis=axis)
        assert_bits_equal(ours.scale, fq_module.scale)
        assert_bits_equal(ours.zero_point, fq_module.zero_point)
        yl = ours(xl)
        assert_bits_equal(yl.detach(), yt.detach())
        np.testing.assert_allclose(fq_per_channel_reference(xl.detach(), ours.scale, ours.zero_point, axis, qmin, qmax), yl.detach(), rtol=TOLERANCE, atol=TOLERANCE)
        dout = torch.rand(xt.shape, generator=torch.Generator().manual_seed(19))
        yt.backward(dout)
        yl.backward(dout)
        assert_bits_equal(xl.grad, xt.grad)
        np.testing.assert_allclose(fq_per_channel_grad_reference(dout, xl.detach(), ours.scale, ours.zero_point, axis, qmin, qmax), xl.grad, rtol=TOLERANCE, atol=TOLERANCE)

    def test_fq_serializable_per_channel(self):
        """test_workflow_module.py::TestFakeQuantize::test_fq_serializable_per_channel: scales
        [0.054902, 0.078431] and zero points [0, 0] as upstream asserts (and torch's bits); the
        layer's state_dict survives torch.save / torch.load and the reloaded layer gives the same output."""
        x = torch.tensor([[-5, -3.5, -2, 0, 3, 5, 7], [1, 3, 2, 5, 6.5, 8, 10]], dtype=torch.float32)
        fq_module = ao.FakeQuantize(ao.default_per_channel_weight_observer, -128, 127)
        y_ref = fq_module(x)
        obs = lc.PerChannelMinMaxObserver(axis=0, symmetric=True)
        obs.update(x)
        ours = lt.FakeQuantize(-128, 127, *obs.qparams(), axis=0)
        state_dict = ours.state_dict()
        torch.testing.assert_close(state_dict["scale"], torch.tensor([0.054902, 0.078431]), rtol=1e-5, atol=1e-6)
        assert state_dict["zero_point"].tolist() == [0, 0]
        assert_bits_equal(state_dict["scale"], fq_module.state_dict()["scale"])
        assert_bits_equal(ours(x), y_ref)
        loaded_dict = _roundtrip(state_dict)
        for key in state_dict:
            assert_bits_equal(loaded_dict[key], state_dict[key])
        loaded = lt.FakeQuantize(-128, 127, [1.0, 1.0], [0, 0], axis=0)
        loaded.load_state_dict(loaded_dict)
        assert_bits_equal(loaded(x), y_ref)
