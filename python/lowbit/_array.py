"""The NumPy / torch array adapter, the package's bottom layer: zero-copy NumPy views of arrays
and CPU tensors for the core, and results handed back as the kind that came in.

bfloat16 has no NumPy dtype: a bfloat16 tensor travels as its int16 bits with a flag that says
so. torch is imported only when a tensor arrives. Imports nothing from lowbit above
:mod:`lowbit._validate`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lowbit._lowbit import LowbitTypeError, LowbitValueError
from lowbit._validate import is_tensor

__all__ = ["as_array", "float32", "float_tensor", "from_view", "numpy_of", "out_arg", "tensor_view", "view"]


def as_array(x: Any, what: str = "x") -> np.ndarray:
    """``x`` itself when it is an ndarray, else ``np.asarray(x)``; strings, dicts, sets and None
    are refused (NumPy would wrap them in an object array)."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (str, bytes, dict, set)) or x is None:
        raise LowbitTypeError(f"{what} must be an array, got {type(x).__name__}")
    return np.asarray(x)


def tensor_view(t: Any, what: str) -> tuple[np.ndarray, bool]:
    """A NumPy view of a float CPU tensor (no copy) and whether it holds bfloat16 bits."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise LowbitTypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise LowbitTypeError(f"{what} is on {t.device}; lowbit's kernels run on CPU tensors (use .cpu())")
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy(), True
    if t.dtype in (torch.float32, torch.float16, torch.float64):
        return t.numpy(), False
    raise LowbitTypeError(f"{what} must be a float32, float16, bfloat16 or float64 tensor, got {t.dtype}")


def float_tensor(t: Any, what: str) -> Any:
    """``t`` itself when it is a float32, float16, bfloat16 or float64 torch tensor (on any device)."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise LowbitTypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise LowbitTypeError(f"{what} must be a float32, float16, bfloat16 or float64 tensor, got {t.dtype}")
    return t


def from_view(a: np.ndarray, bf16: bool) -> Any:
    """The tensor sharing ``a``'s memory (bfloat16 when ``a`` holds bfloat16 bits)."""
    import torch

    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if bf16 else t


def view(x: Any, what: str = "x") -> tuple[np.ndarray, bool]:
    """A NumPy view of an array or float CPU tensor (no copy) and whether it holds bfloat16 bits."""
    if is_tensor(x):
        return tensor_view(x, what)
    return as_array(x, what), False


def numpy_of(x: Any) -> np.ndarray:
    """``x`` as NumPy: a tensor detached and moved to the CPU (shared when it is already there)."""
    return x.detach().cpu().numpy() if is_tensor(x) else np.asarray(x)


def float32(x: Any, what: str, ndim: int | None = 2) -> np.ndarray:
    """A float32 NumPy array of an array or CPU tensor (float16/bfloat16/float64 are converted;
    float32 is shared), optionally of ``ndim`` dimensions."""
    if is_tensor(x):
        if x.device.type != "cpu":
            raise LowbitTypeError(f"{what} is on {x.device}; lowbit's kernels run on CPU tensors (use .cpu())")
        x = x.detach().float().numpy()
    if x is None or isinstance(x, (str, bytes, dict)):
        raise LowbitTypeError(f"{what} must be a float array, got {type(x).__name__}")
    a = np.asarray(x)
    if a.dtype.kind != "f":
        raise LowbitTypeError(f"{what} must be a float array, got {a.dtype}")
    if a.dtype != np.float32:
        a = a.astype(np.float32)
    if ndim is not None and a.ndim != ndim:
        raise LowbitValueError(f"{what} must be {ndim}-D, got shape {a.shape}")
    return a


def out_arg(x: np.ndarray, out: Any) -> tuple[Any, bool]:
    """Validates ``out=`` and tells whether it is ``x`` itself (an in-place call)."""
    if out is None:
        return None, False
    if not isinstance(out, np.ndarray):
        raise LowbitTypeError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.shape != x.shape:
        raise LowbitValueError(f"out has shape {out.shape}, x has {x.shape}")
    if out.dtype != x.dtype:
        raise LowbitTypeError(f"out has dtype {out.dtype}, x has {x.dtype}")
    same = out.__array_interface__["data"][0] == x.__array_interface__["data"][0] and out.strides == x.strides
    if not same and np.may_share_memory(x, out):
        raise LowbitValueError("out overlaps x without being x; pass out=x to work in place")
    return out, same
