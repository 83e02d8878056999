"""Post-training quantization of weights with calibration statistics.

:class:`Hessian` gathers a layer's input statistics ``H = Σ x xᵀ`` over calibration batches
(mergeable, so batches can be spread over workers); :func:`gptq` quantizes the layer's weight
with GPTQ's Hessian-guided error feedback (Frantar et al., 2022; solver in Rust, float64), into
a :class:`lowbit.QuantizedTensor` of any :class:`lowbit.QuantSpec` grid: per output channel or
per group of input features, 2 to 8 bits, symmetric or not.

>>> import numpy as np, lowbit
>>> from lowbit.ptq import Hessian, gptq
>>> rng = np.random.default_rng(0)
>>> x = rng.standard_normal((512, 64)).astype(np.float32) + rng.standard_normal((512, 1)).astype(np.float32)
>>> w = rng.standard_normal((32, 64)).astype(np.float32)
>>> h = Hessian(64)
>>> h.update(x)
>>> r = gptq(w, h, lowbit.QuantSpec(3, symmetric=False, granularity="group", group_size=16))
>>> r.error < r.rtn_error   # the layer's output error on the calibration inputs
True
>>> r.tensor.int_repr().shape, r.weight.dtype
((32, 64), dtype('float32'))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lowbit import _lowbit
from lowbit._array import as_array, float32
from lowbit._lowbit import LowbitTypeError, LowbitValueError, QuantizedTensor, QuantSpec
from lowbit._validate import float_arg, int_arg, is_tensor

__all__ = ["GPTQResult", "Hessian", "gptq"]


class Hessian:
    """``Σ x xᵀ`` over the rows of every batch (float64), for a layer with ``features`` inputs.

    ``update(x)`` takes an array or tensor whose last axis is the features (leading axes are
    samples: (batch, seq, features) works); ``merge`` adds another's statistics, so the sum over
    workers equals one pass over all the data.
    """

    def __init__(self, features: int) -> None:
        self.features = int_arg(features, "features", 1, 1 << 20)
        self.matrix = np.zeros((self.features, self.features), dtype=np.float64)
        self.samples = 0

    def update(self, x: Any) -> None:
        if is_tensor(x):
            if not x.is_floating_point():
                raise LowbitTypeError(f"x must hold floats, got {x.dtype}")
            a = x.detach().cpu().double().numpy()
        else:
            a = as_array(x)
            if a.dtype.kind != "f":
                raise LowbitTypeError(f"x must hold floats, got {a.dtype}")
            a = a.astype(np.float64, copy=False)
        if a.ndim == 0 or a.shape[-1] != self.features:
            raise LowbitValueError(f"x must end in {self.features} features, got shape {a.shape}")
        a = a.reshape(-1, self.features)
        if not np.isfinite(a).all():
            raise LowbitValueError("x holds NaN or Inf; nothing was added")
        self.matrix += a.T @ a
        self.samples += a.shape[0]

    def merge(self, other: Hessian) -> None:
        if not isinstance(other, Hessian) or other.features != self.features:
            raise LowbitValueError("can only merge a Hessian of the same number of features")
        self.matrix += other.matrix
        self.samples += other.samples


@dataclass(frozen=True)
class GPTQResult:
    """One layer's GPTQ result: the quantized tensor, its dequantized weight (the kind that came
    in: NumPy or torch), input features never active in the calibration data (their weights are
    set to 0), and the layer's output error ``Σ (w - q) H (w - q)ᵀ`` against round-to-nearest's
    on the same grid."""

    tensor: QuantizedTensor
    weight: Any
    dead: int
    error: float
    rtn_error: float


def gptq(weight: Any, hessian: Hessian | Any, spec: QuantSpec, damp: float = 0.01, act_order: bool = True) -> GPTQResult:
    """Quantize ``weight`` (out_features, in_features) with GPTQ given its inputs' ``hessian``
    (a :class:`Hessian` or an (in, in) matrix).

    Columns are quantized in order of decreasing Hessian diagonal with ``act_order`` (groups
    stay runs of consecutive input features, their grids taken from the weight as given);
    ``damp`` times the mean diagonal is added to the diagonal. A Hessian that is not positive
    definite even after damping raises ``LowbitValueError`` (raise ``damp``), never NaN.
    """
    if not isinstance(spec, QuantSpec):
        raise LowbitTypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    torch_in = is_tensor(weight)
    w = np.ascontiguousarray(float32(weight, "weight"))
    raw: Any = hessian.matrix if isinstance(hessian, Hessian) else hessian
    if is_tensor(raw):
        raw = raw.detach().cpu().double().numpy()
    h = np.ascontiguousarray(np.asarray(raw, dtype=np.float64))
    if h.ndim != 2:
        raise LowbitValueError(f"hessian must be a 2-D matrix, got shape {h.shape}")
    d = float_arg(damp, "damp", 0.0, None, finite=True)
    qt, deq, dead = _lowbit.gptq(w, h, spec, d, bool(act_order))
    rtn = _lowbit.quantize(w, spec).dequantize()
    err = _lowbit.output_error(w, deq, h)
    rtn_err = _lowbit.output_error(w, rtn, h)
    out: Any = deq
    if torch_in:
        import torch

        out = torch.from_numpy(deq)
    return GPTQResult(qt, out, dead, err, rtn_err)
