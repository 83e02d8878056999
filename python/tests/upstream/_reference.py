"""Shared pieces of the upstream adaptations: bit-exact comparison, the float references the
PyTorch tests use, and hypothesis strategies with the semantics of
``torch.testing._internal.hypothesis_utils`` (``array_shapes``, ``qparams``, ``tensor``,
``per_channel_tensor``), written here so the suite does not import PyTorch's private test helpers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

# PyTorch's quantization tests compare against their float references with this tolerance.
TOLERANCE = 1e-6

QRANGES = {torch.quint8: (0, 255), torch.qint8: (-128, 127)}

F32_EPS = float(torch.finfo(torch.float32).eps)


def dtype_id(d: Any) -> str:
    """A readable pytest id for a dtype parameter ("float32", "quint8")."""
    return str(d).replace("torch.", "") if isinstance(d, torch.dtype) else str(d)


def _as_numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        if a.dtype == torch.bfloat16:
            return a.contiguous().view(torch.int16).numpy()
        return a.contiguous().numpy()
    return np.ascontiguousarray(a)


def assert_bits_equal(actual: Any, expected: Any) -> None:
    """Same kind of array (tensor or NumPy), dtype, shape and bytes, so NaN payloads and the sign
    of zero count."""
    assert isinstance(actual, torch.Tensor) == isinstance(expected, torch.Tensor), (
        f"{type(actual).__name__} returned where {type(expected).__name__} was expected"
    )
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    assert tuple(actual.shape) == tuple(expected.shape), f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = _as_numpy(actual), _as_numpy(expected)
    width = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    ab, eb = a.reshape(-1).view(width), e.reshape(-1).view(width)
    bad = np.flatnonzero(ab != eb)
    if bad.size:
        first = bad[:5]
        raise AssertionError(
            f"not bit-identical: {bad.size} of {eb.size} elements differ; first at flat indices {first.tolist()}: "
            f"{a.reshape(-1)[first]} != {e.reshape(-1)[first]}"
        )


# ---- the float references of test_workflow_ops.py -----------------------------------------------


def _along(v: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast along ``axis`` of an ``ndim``-D tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def fq_per_tensor_reference(x: torch.Tensor, scale: Any, zero_point: Any, qmin: int, qmax: int) -> torch.Tensor:
    """``(clamp(round(x * (1 / scale)) + zp, qmin, qmax) - zp) * scale`` in float32, cast back.

    Upstream's reference rounds after adding the zero point (``round(x / scale + zp)``), which
    differs from torch's kernel (``zp + nearbyint(x * inv_scale)``) at exact ties with an odd zero
    point (x * inv = -127.5, zp = 127: upstream -0.0, torch -1); these references follow torch."""
    r = (torch.clamp(torch.round(x.to(torch.float32) * (1.0 / scale)) + zero_point, qmin, qmax) - zero_point) * scale
    return r.to(x.dtype)


def fq_per_tensor_grad_reference(dy: torch.Tensor, x: torch.Tensor, scale: Any, zero_point: Any, qmin: int, qmax: int) -> torch.Tensor:
    """The straight-through gradient: ``dy`` where the rounded code is inside the range, else 0
    (the code rounded before the zero point is added, as in ``fq_per_tensor_reference``)."""
    xq = torch.round(x.to(torch.float32) * (1.0 / scale)) + zero_point
    return torch.where((xq >= qmin) & (xq <= qmax), dy, torch.zeros_like(dy)).to(x.dtype)


def _codes(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The unclamped codes by torch's per-channel rule: ``round(x * inv) + zp`` for integer zero
    points, ``round(x * inv + zp)`` for float ones (its learnable-qparams path), which is the
    formula upstream's reference uses for both."""
    t = x.to(torch.float32) * (1.0 / s)
    return torch.round(t + z) if z.is_floating_point() else torch.round(t) + z


def fq_per_channel_reference(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, qmin: int, qmax: int) -> torch.Tensor:
    """The per-channel float reference, one scale and zero point per index of ``axis``."""
    s = _along(scale.to(torch.float32), axis, x.ndim)
    z = _along(zero_point, axis, x.ndim)
    r = (torch.clamp(_codes(x, s, z), qmin, qmax) - z) * s
    return r.to(x.dtype)


def fq_per_channel_grad_reference(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, qmin: int, qmax: int) -> torch.Tensor:
    s = _along(scale.to(torch.float32), axis, x.ndim)
    z = _along(zero_point, axis, x.ndim)
    xq = _codes(x, s, z)
    return torch.where((xq >= qmin) & (xq <= qmax), dy, torch.zeros_like(dy)).to(x.dtype)


# ---- hypothesis strategies ------------------------------------------------------------------------


def array_shapes(min_dims: int = 1, max_dims: int | None = None, min_side: int = 1, max_side: int | None = None) -> st.SearchStrategy:
    """Shapes of rank ``min_dims..max_dims`` (default ``min_dims + 2``) with sides ``min_side..max_side``
    (default ``min_side + 5``), as PyTorch's ``hu.array_shapes``."""
    max_dims = min_dims + 2 if max_dims is None else max_dims
    max_side = min_side + 5 if max_side is None else max_side
    return st.lists(st.integers(min_side, max_side), min_size=min_dims, max_size=max_dims).map(tuple)


@st.composite
def qparams(draw: Any, dtypes: Any = (torch.quint8, torch.qint8), scale_min: float | None = None, scale_max: float | None = None) -> tuple[float, int, torch.dtype]:
    """``(scale, zero_point, qdtype)``: a zero point anywhere in the dtype's range and a float32
    scale in ``[eps, float32 max]`` unless bounded."""
    dtypes = dtypes if isinstance(dtypes, (list, tuple)) else (dtypes,)
    qdtype = draw(st.sampled_from(dtypes))
    qmin, qmax = QRANGES[qdtype]
    zero_point = draw(st.integers(qmin, qmax))
    lo = F32_EPS if scale_min is None else scale_min
    hi = float(torch.finfo(torch.float32).max) if scale_max is None else scale_max
    scale = draw(st.floats(lo, hi, width=32))
    return scale, zero_point, qdtype


def _valid_range(scale: float, zero_point: int) -> tuple[float, float]:
    """Values whose code ``x / scale + zp`` (and ``(q - zp) * scale``) stays inside int64, as
    ``hu._get_valid_min_max`` bounds the elements it draws."""
    adjust = 1 + F32_EPS
    lmin, lmax = -(2.0**63) / adjust, (2.0**63 - 1) / adjust
    lo = max((lmin - zero_point) * scale, lmin / scale + zero_point)
    hi = min((lmax - zero_point) * scale, lmax / scale + zero_point)
    return float(np.float32(lo)), float(np.float32(hi))


def dynamic_qparams(x: np.ndarray, qmin: int, qmax: int) -> tuple[float, int]:
    """The min-max qparams the PyTorch strategies recompute from the drawn data: ``(1.0, 0)``
    for a constant tensor, else ``scale = max(range / levels, eps)`` over a range that includes 0
    and ``zp = clamp(qmin - round(min / scale))``."""
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:
        return 1.0, 0
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(float(np.float32((hi - lo) / (qmax - qmin))), F32_EPS)
    zp = int(min(qmax, max(qmin, qmin - round(lo / scale))))
    return scale, zp


@st.composite
def tensor(draw: Any, shapes: st.SearchStrategy, qparams: st.SearchStrategy, elements: st.SearchStrategy | None = None) -> tuple[np.ndarray, tuple[float, int, torch.dtype]]:
    """A float32 array of a drawn shape without NaN / Inf, its elements bounded by the drawn
    qparams so codes fit int64, and min-max qparams recomputed from it (``hu.tensor``)."""
    shape = draw(shapes)
    scale, zp, qdtype = draw(qparams)
    if elements is None:
        lo, hi = _valid_range(scale, zp)
        elements = st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=32)
    x = draw(hnp.arrays(np.float32, shape, elements=elements))
    return x, (*dynamic_qparams(x, *QRANGES[qdtype]), qdtype)


@st.composite
def per_channel_tensor(draw: Any, shapes: st.SearchStrategy, qparams: st.SearchStrategy, elements: st.SearchStrategy | None = None) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, int, torch.dtype]]:
    """A float32 array, a drawn channel axis and per-channel min-max qparams along it
    (``hu.per_channel_tensor``; the qparams here come from each channel's own range)."""
    shape = draw(shapes)
    scale, zp, qdtype = draw(qparams)
    if elements is None:
        lo, hi = _valid_range(scale, zp)
        elements = st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=32)
    x = draw(hnp.arrays(np.float32, shape, elements=elements))
    axis = draw(st.integers(0, x.ndim - 1))
    qmin, qmax = QRANGES[qdtype]
    per = [dynamic_qparams(np.take(x, i, axis=axis), qmin, qmax) for i in range(x.shape[axis])]
    scales = np.array([p[0] for p in per], np.float32)
    zps = np.array([p[1] for p in per], np.int32)
    return x, (scales, zps, axis, qdtype)
