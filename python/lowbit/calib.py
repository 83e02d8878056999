"""Calibration observers: they watch data and choose quantization parameters.

* :class:`MinMaxObserver`, :class:`MovingAverageMinMaxObserver` and
  :class:`PerChannelMinMaxObserver` give the same ``(scale, zero_point)`` as the ``torch.ao``
  observers of the same names, bit for bit.
* :class:`HistogramObserver` keeps a streaming histogram and picks the clip range by
  ``method="mse"`` (the integer affine grid with the least expected squared error), ``"sqnr"``
  (the same optimum), ``"percentile"`` (of |x|) or ``"entropy"`` (TensorRT's KL calibration).

Asymmetric observers use the unsigned range ``0..2^bits-1``, symmetric ones the signed range
``-2^(bits-1)..2^(bits-1)-1`` (torch's quint8 / qint8 conventions). Every observer takes NumPy
arrays and CPU torch tensors without copying, releases the GIL while it works, can ``merge`` the
state of another (so calibration can be split across data-loader workers or machines), and
round-trips through ``state_dict()`` / ``load_state_dict()`` and pickle.

>>> import numpy as np
>>> from lowbit.calib import HistogramObserver
>>> obs = HistogramObserver(bits=4, method="mse")
>>> for _ in range(4):
...     obs.update(np.random.default_rng(0).standard_normal(10_000, dtype=np.float32))
>>> scale, zero_point = obs.qparams()
>>> obs.quant_min, obs.quant_max, zero_point
(0, 15, 8)
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from typing import Any, Literal

import numpy as np

from lowbit import _lowbit
from lowbit._lowbit import LowbitTypeError, LowbitValueError
from lowbit._array import float_tensor, view
from lowbit._validate import float_arg, int_arg, is_tensor

__all__ = [
    "HistogramObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "PerChannelMinMaxObserver",
]


_Kind = Literal["minmax", "moving_average", "per_channel", "histogram", "per_channel_histogram"]


class Observer:
    """Base class: ``update(x)`` (or call it), ``qparams()``, ``merge``, ``state_dict``."""

    _kind: _Kind

    def __init__(self, **settings: Any) -> None:
        if not hasattr(self, "_kind"):
            raise LowbitTypeError("Observer is the base class: use MinMaxObserver, MovingAverageMinMaxObserver, PerChannelMinMaxObserver or HistogramObserver")
        for k, v in settings.items():
            if k == "bits":
                settings[k] = int_arg(v, k, 2, 8)
            elif k == "bins":
                settings[k] = int_arg(v, k, 16, 1 << 20)
            elif k == "axis":
                settings[k] = int_arg(v, k)
            elif k in ("averaging_constant", "percentile"):
                settings[k] = float_arg(v, k)
            elif k == "method" and not isinstance(v, str):
                raise LowbitTypeError(f"method must be a string, got {type(v).__name__}")
            elif k == "symmetric":
                settings[k] = bool(v)
        self._core = _lowbit.Observer(self._kind, **settings)

    @property
    def quant_min(self) -> int:
        return self._core.quant_min

    @property
    def quant_max(self) -> int:
        return self._core.quant_max

    def update(self, x: Any) -> None:
        """Observe a batch (any shape). NaN or Inf refuses the batch with ``LowbitValueError``
        and leaves the state unchanged; empty batches are ignored."""
        if is_tensor(x) and x.device.type != "cpu":
            self._update_on_device(x)
            return
        a, bf16 = view(x)
        self._core.update(a, bf16)

    def _update_on_device(self, x: Any) -> None:
        """Reduces a tensor on its own device (CUDA, MPS, ...) and hands the core only the summary
        an update needs (min and max, per channel min and max, or a histogram's counts on the
        batch's canonical grid): the same state as updating with the whole tensor on the CPU."""
        import torch

        x = float_tensor(x, "x").detach()
        if x.device.type == "meta":
            raise LowbitTypeError("x is on the meta device: it holds no data to observe")
        if x.numel() == 0:
            self._core.update(np.empty(tuple(x.shape), np.float32))
            return
        if self._kind == "per_channel":
            self._core.update(_channel_extremes(x, self._core.axis or 0))
            return
        if self._kind in ("minmax", "moving_average"):
            lo, hi = torch.aminmax(x)
            self._core.update(torch.stack([lo, hi]).to(torch.float32).cpu().numpy())
            return
        # Histograms: one row per channel (a single row per tensor), counted on each row's
        # canonical grid, all rows in one bincount.
        if self._kind == "per_channel_histogram":
            axis = self._core.axis or 0
            if not -x.ndim <= axis < x.ndim:
                raise LowbitValueError(f"axis {axis} is out of range for a {x.ndim}-D batch")
            rows = x.movedim(axis % x.ndim, 0).reshape(x.shape[axis], -1)
        else:
            rows = x.reshape(1, -1)
        lo_t, hi_t = rows.amin(1), rows.amax(1)
        lo, hi = lo_t.to(torch.float32).cpu().tolist(), hi_t.to(torch.float32).cpu().tolist()
        c = len(lo)
        if not all(math.isfinite(v) for v in lo + hi):  # refused with the CPU path's message
            self._core.add_histogram_counts([0] * (c * self._core.histogram_grids([0.0], [0.0])[2]), lo, hi)
            return
        exps, starts, bins = self._core.histogram_grids(lo, hi)
        # floor(x / 2^e): a power-of-two scaling of a float32 in float64 is exact, and so is its
        # floor. Only a row of zeros has 2^-e beyond float64 (the core then uses its MAX too).
        inv = [math.ldexp(1.0, -e) if -e <= 1023 else sys.float_info.max for e in exps]
        f64 = {"device": x.device, "dtype": torch.float64}
        # (float64 batches are binned as float32 values, as the core bins them.)
        xs = (rows.to(torch.float32) if rows.dtype == torch.float64 else rows).to(torch.float64)
        cells = torch.floor(xs * torch.tensor(inv, **f64)[:, None]) - torch.tensor(starts, **f64)[:, None]
        cells = cells.to(torch.int64) + torch.arange(c, device=x.device)[:, None] * bins
        counts = torch.bincount(cells.reshape(-1), minlength=c * bins)
        self._core.add_histogram_counts(counts.cpu().tolist(), lo, hi)

    def __call__(self, x: Any) -> Any:
        """Observe ``x`` and return it unchanged, like a ``torch.ao`` observer's forward."""
        self.update(x)
        return x

    def qparams(self) -> tuple[Any, Any]:
        """``(scale, zero_point)``: floats per tensor, float32 / int32 arrays per channel.

        Before any data, like ``torch.ao``'s observers, it warns and returns the defaults
        ``(1.0, 0)`` (per channel: one-element arrays ``[1.0]`` and ``[0]``)."""
        if not self._core.observed:
            warnings.warn(
                f"{type(self).__name__}.qparams() called before the observer saw any data; "
                "returning the default (scale 1.0, zero point 0), as torch.ao does",
                UserWarning,
                stacklevel=2,
            )
            if self._kind in ("per_channel", "per_channel_histogram"):
                return np.ones(1, np.float32), np.zeros(1, np.int32)
            return 1.0, 0
        return self._core.qparams()

    def merge(self, other: Observer) -> None:
        """Add ``other``'s observations to this observer (see the class docs for exactness)."""
        if type(other) is not type(self):
            raise LowbitTypeError(f"other must be a {type(self).__name__} to merge, got a {type(other).__name__}")
        self._core.merge(other._core)

    def state_dict(self) -> dict[str, str]:
        """Settings and observed state, as plain data (JSON text)."""
        return {"lowbit_observer": self._core.to_json()}

    def load_state_dict(self, state: dict[str, str]) -> None:
        """Restore what ``state_dict`` returned; the observer kind must match."""
        try:
            text = state["lowbit_observer"]
            kind = next(iter(json.loads(text)["state"]))
        except (KeyError, TypeError, ValueError, StopIteration) as e:
            raise LowbitValueError(f"not a lowbit observer state: {e}") from None
        if kind not in self._state_kinds:
            raise LowbitValueError(f"state of a {kind} observer cannot load into {type(self).__name__}")
        self._core = _lowbit.Observer.from_json(text)

    _state_kinds: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, str]:
        return self.state_dict()

    def __setstate__(self, state: dict[str, str]) -> None:
        self.load_state_dict(state)

    def __repr__(self) -> str:
        saved = json.loads(self._core.to_json())
        cfg, (kind, state) = saved["config"], next(iter(saved["state"].items()))
        extra = ""
        if kind in ("Histogram", "PerChannelHistogram"):
            extra = f", method={cfg['method']!r}, bins={state['bins']}"
            extra += f", percentile={cfg['percentile']}" if cfg["method"] == "percentile" else ""
        return f"{type(self).__name__}(bits={cfg['bits']}, symmetric={cfg['symmetric']}{extra})"


def _channel_extremes(x: Any, axis: int) -> np.ndarray:
    """Per-channel min and max of a tensor, reduced on its device, as a float32 array of
    ``x``'s rank whose channel axis holds the channels and one other axis the (min, max) pair:
    the same per-channel extremes (and the same channel axis, negative or not) as ``x``."""
    import torch

    if not -x.ndim <= axis < x.ndim:
        raise LowbitValueError(f"axis {axis} is out of range for a {x.ndim}-D batch")
    a = axis % x.ndim
    if x.ndim == 1:
        return x.to(torch.float32).cpu().numpy()  # one value per channel is its own summary
    dims = [d for d in range(x.ndim) if d != a]
    mins, maxs = x.amin(dim=dims), x.amax(dim=dims)
    shape = [1] * x.ndim
    shape[a] = x.shape[a]
    pair = torch.stack([mins, maxs], dim=1 if a == 0 else 0)
    shape[1 if a == 0 else 0] = 2
    return pair.reshape(shape).to(torch.float32).cpu().numpy()


class MinMaxObserver(Observer):
    """Running min and max; qparams as ``torch.ao.quantization.MinMaxObserver``.

    >>> import numpy as np, lowbit.calib as lc
    >>> o = lc.MinMaxObserver(bits=8, symmetric=True)
    >>> o.update(np.array([-1.0, 0.5], dtype=np.float32))
    >>> o.qparams()
    (0.007843137718737125, 0)
    """

    _kind: _Kind = "minmax"
    _state_kinds = ("MinMax",)

    def __init__(self, bits: int = 8, symmetric: bool = False) -> None:
        super().__init__(bits=bits, symmetric=symmetric)


class MovingAverageMinMaxObserver(Observer):
    """Moving average of each batch's min and max (``torch.ao``'s, bit for bit). ``merge`` takes
    the batch-weighted mean of the two running ranges: an exponential average has no exact merge."""

    _kind: _Kind = "moving_average"
    _state_kinds = ("MovingAverage",)

    def __init__(self, averaging_constant: float = 0.01, bits: int = 8, symmetric: bool = False) -> None:
        super().__init__(bits=bits, symmetric=symmetric, averaging_constant=averaging_constant)


class PerChannelMinMaxObserver(Observer):
    """Running min and max per index of ``axis`` (``torch.ao``'s ``PerChannelMinMaxObserver``,
    whose ``ch_axis`` this is); ``qparams()`` returns arrays."""

    _kind: _Kind = "per_channel"
    _state_kinds = ("PerChannel",)

    def __init__(self, axis: int = 0, bits: int = 8, symmetric: bool = False) -> None:
        super().__init__(bits=bits, symmetric=symmetric, axis=axis)


class HistogramObserver(Observer):
    """A streaming histogram and a clip-range search.

    The histogram's bins have a power-of-two width on a grid anchored at zero, so growing the
    range merges pairs of bins without moving a count, and the state depends only on the data:
    ``merge`` equals one observer over both inputs. ``per_channel=True`` keeps one histogram per
    index of ``axis``. ``bins`` (16 to 2^20) is the histogram's capacity. ``method="mse"`` evaluates every integer affine grid (zero representable,
    ``2^bits`` levels) over a fine range of steps and all zero points, with the expected error
    computed exactly from the histogram (uniform within bins), and returns the best.
    """

    _kind: _Kind = "histogram"
    _state_kinds = ("Histogram", "PerChannelHistogram")

    def __init__(
        self,
        bits: int = 8,
        symmetric: bool = False,
        method: str = "mse",
        percentile: float = 99.99,
        bins: int = 2048,
        per_channel: bool = False,
        axis: int = 0,
    ) -> None:
        self._kind = "per_channel_histogram" if per_channel else "histogram"
        super().__init__(bits=bits, symmetric=symmetric, method=method, percentile=percentile, bins=bins, axis=axis)

    def clip_range(self) -> tuple[float, float]:
        """The range ``[(quant_min - zp) * scale, (quant_max - zp) * scale]`` the qparams cover,
        for every method (percentile and entropy choose a threshold t, cover ``[-t, t]``
        clipped to the data, and round that onto the integer grid)."""
        return self._core.clip_range()

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """``(counts, edges)`` like ``np.histogram`` (per-tensor observers)."""
        counts, left, width, _, _ = self._core.histogram()
        return counts, left + width * np.arange(len(counts) + 1)
