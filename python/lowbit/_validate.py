"""Argument validation, the package's bottom layer: numbers, paths and short vectors from Python,
NumPy or one-element torch tensors, each refused with a ``LowbitError`` that names the argument.

Imports nothing from lowbit but the extension's error types; every other module may use it.
"""

from __future__ import annotations

import math
import operator
import os
from typing import Any

import numpy as np

from lowbit._lowbit import LowbitTypeError, LowbitValueError

__all__ = ["float_arg", "int_arg", "is_tensor", "path_arg", "vector_arg"]


def is_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor, told without importing torch (and, for Python numbers,
    without string methods, which ``torch.compile`` cannot trace)."""
    if type(x) in (int, float, bool):
        return False
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _bounds(v: Any, what: str, lo: Any, hi: Any) -> None:
    if lo is None and hi is None:
        return
    if (lo is not None and not v >= lo) or (hi is not None and not v <= hi):  # NaN is out of any range
        want = (f"between {lo} and {hi}" if lo is not None and hi is not None
                else f">= {lo}" if lo is not None else f"<= {hi}")
        raise LowbitValueError(f"{what} must be {want}, got {v}")


def float_arg(v: Any, what: str, lo: float | None = None, hi: float | None = None, finite: bool = False) -> float:
    """A real number (Python, NumPy or a one-element array / tensor); optionally finite and in ``[lo, hi]``."""
    if is_tensor(v) or isinstance(v, np.ndarray):
        if (v.numel() if is_tensor(v) else v.size) != 1:
            raise LowbitTypeError(f"{what} must be a single number")
        v = v.item()
    if isinstance(v, (bool, str, bytes)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise LowbitTypeError(f"{what} must be a float, got {type(v).__name__}")
    try:
        f = float(v)
    except OverflowError:
        raise LowbitValueError(f"{what} is too large for a float, got {v}") from None
    if finite and not math.isfinite(f):
        raise LowbitValueError(f"{what} must be finite, got {f}")
    _bounds(f, what, lo, hi)
    return f


_I64 = (-(2**63), 2**63 - 1)


def int_arg(v: Any, what: str, lo: int | None = _I64[0], hi: int | None = _I64[1]) -> int:
    """An integer (Python, NumPy or a one-element array / tensor, not bool) in ``[lo, hi]``: by
    default the int64 range the core takes, so that no argument overflows on its way in."""
    if is_tensor(v) or isinstance(v, np.ndarray):
        if (v.numel() if is_tensor(v) else v.size) != 1:
            raise LowbitTypeError(f"{what} must be a single integer")
        v = v.item()
    if isinstance(v, (bool, np.bool_)):
        raise LowbitTypeError(f"{what} must be an integer, got bool")
    try:
        i = operator.index(v)
    except TypeError:
        raise LowbitTypeError(f"{what} must be an integer, got {type(v).__name__}") from None
    _bounds(i, what, lo, hi)
    return i


def path_arg(p: Any, what: str) -> str:
    """``os.fspath(p)``, naming the argument when ``p`` is not a path."""
    try:
        path = os.fspath(p)
    except TypeError:
        raise LowbitTypeError(f"{what} must be a path (str or os.PathLike), got {type(p).__name__}") from None
    return os.fsdecode(path)


def vector_arg(v: Any, what: str, integer: bool) -> list:
    if is_tensor(v):
        v = v.detach().cpu()
        a = (v.float() if str(v.dtype) == "torch.bfloat16" else v).numpy()  # bf16 -> f32 is exact
    else:
        a = np.asarray(v)
    if a.ndim != 1:
        raise LowbitTypeError(f"{what} must be one-dimensional, got shape {a.shape}")
    if a.size == 0:  # np.asarray([]) is float64: an empty list holds no wrong type
        return []
    if integer and a.dtype.kind not in "iu":
        raise LowbitTypeError(f"{what} must hold integers, got {a.dtype} (torch's float zero points, "
                              "added before rounding as in its learnable fake-quant, are not supported: round them)")
    if not integer and a.dtype.kind not in "fiu":
        raise LowbitTypeError(f"{what} must hold floats, got {a.dtype}")
    return a.tolist()
