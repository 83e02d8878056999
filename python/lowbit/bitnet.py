"""BitNet layers and kernels: ternary (W1.58 A8) and binary (XNOR-popcount) products with
exact integer arithmetic, many times faster than a float32 matmul.

* :func:`ternary_quantize`, :func:`binary_quantize`, :func:`activation_quant`: the quantizers of
  the BitNet b1.58 / BitNet recipes (as in Hugging Face transformers' BitNet integration).
* :class:`TernaryLinear`: packs ternary weights once at 2 bits per weight; ``forward`` quantizes
  activations per row to int8, runs an int32-accumulating ternary GEMM/GEMV (AVX2 ``maddubs``
  where available) and rescales.
* :class:`BinaryLinear` and :func:`binary_matmul`: signs packed 1 bit per value, dot products as
  ``K - 2 * popcount(a xor b)``.
* :class:`IntLinear`: the W8A8 / W4A8 integer GEMM on a :class:`lowbit.QuantizedTensor`'s codes
  as stored (2..8 bits, per tensor, output channel or group of inputs): int8 activations per
  row, exact int32 sums per group (AVX-512 VNNI ``vpdpbusd``, AVX2 ``maddubs``, portable).

``LOWBIT_ISA=scalar`` forces the portable kernels (every path gives the same integers).

>>> import numpy as np, lowbit.bitnet as bn
>>> rng = np.random.default_rng(0)
>>> w = rng.standard_normal((8, 300)).astype(np.float32)
>>> layer = bn.TernaryLinear.from_float(w)
>>> layer.nbytes  # 2 bits per weight, rows padded to 128
768
>>> x = rng.standard_normal((2, 300)).astype(np.float32)
>>> layer(x).shape
(2, 8)
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from lowbit import _lowbit
from lowbit._lowbit import LowbitTypeError, LowbitValueError, PackedSigns
from lowbit._array import float32, numpy_of
from lowbit._validate import float_arg, int_arg, is_tensor

__all__ = [
    "BinaryLinear",
    "IntLinear",
    "PackedSigns",
    "TernaryLinear",
    "activation_quant",
    "binary_matmul",
    "binary_quantize",
    "kernel",
    "pack",
    "pack_signs",
    "pack_ternary",
    "ternary_quantize",
    "unpack",
    "unpack_ternary",
    "intgemm_paths",
]


def _torch_threads() -> int:
    """``torch.get_num_threads()`` when torch is loaded (its mean adds in an order that depends
    on it), else 1."""
    torch = sys.modules.get("torch")
    get = getattr(torch, "get_num_threads", None)
    return int(get()) if callable(get) else 1


def ternary_quantize(w: Any, per_channel: bool = False) -> tuple[np.ndarray, Any]:
    """BitNet b1.58 absmean ternary weights: ``s = 1 / max(mean(|w|), 1e-5)``,
    ``codes = clamp(round_half_even(w * s), -1, 1)`` (int8) and ``scale = 1 / s``, so ``w ≈ codes * scale``.

    Bit for bit the transformers recipe (``w.float().abs().mean()`` ...): the mean is added in
    float32 in the order torch's CPU kernel adds it in this process (it depends on
    ``torch.get_num_threads()``; without torch imported, as torch on one thread), not correctly
    rounded. ``w`` may have any shape (float16 / bfloat16 / float64 are converted to
    float32 first, as the recipe does); codes have its shape. ``per_channel=True`` uses one mean
    per index of the first axis (output feature) over the rest and returns ``scale`` of shape
    ``(w.shape[0],)``; it needs at least 2 dimensions. Inputs whose layout is neither C-ordered
    nor a permutation of it are added in logical order, where torch may differ.

    >>> import numpy as np, lowbit
    >>> codes, scale = lowbit.ternary_quantize(np.array([[0.4, -1.2, 0.05, 2.0]], dtype=np.float32))
    >>> codes, round(scale, 4)
    (array([[ 0, -1,  0,  1]], dtype=int8), 0.9125)
    """
    a = float32(w, "w", None)
    per_channel = bool(per_channel)
    if per_channel and a.ndim < 2:
        raise LowbitValueError(f"per_channel needs w with at least 2 dimensions (one scale per row), got shape {a.shape}")
    if a.ndim == 2:
        a2 = a
    elif per_channel:
        a2 = a.reshape(a.shape[0], -1)
    else:
        a2 = a.reshape(1, -1) if a.ndim < 2 else _rows2d(a)
    codes, s = _lowbit.ternary_quantize(a2, per_channel, _torch_threads())
    return codes.reshape(a.shape), (s if per_channel else float(s[0]))


def binary_quantize(w: Any, center: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """BitNet 1-bit / XNOR-Net weights: signs (int8 ±1) of ``w - mean(w)`` (the whole tensor's
    mean; 0 without ``center``), sign(0) = +1, and per-row scales ``mean(|w|)``."""
    return _lowbit.binary_quantize(float32(w, "w"), bool(center))


def activation_quant(x: Any, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Per-token absmax quantization along the last axis: ``s = Qb / max(max|x|, 1e-5)`` with
    ``Qb = 2^(bits-1) - 1``, ``q = clamp(round_half_even(x * s), -Qb - 1, Qb)`` as int8; returns
    ``(q, s)`` with ``q`` of ``x``'s shape and ``s`` of shape ``x.shape[:-1]`` (any leading
    dimensions, e.g. transformers' (batch, seq, hidden)). NaN or Inf raises ``LowbitValueError``.

    >>> import numpy as np, lowbit
    >>> q, s = lowbit.activation_quant(np.array([[[1.0, -1.0, -1.0, 1.0]]], np.float32))
    >>> q.tolist(), s.shape, float(s[0, 0])
    ([[[127, -127, -127, 127]]], (1, 1), 127.0)
    """
    a = float32(x, "x", None)
    if a.ndim == 0:
        raise LowbitValueError("x must have at least 1 dimension (the last is quantized per row)")
    q, s = _lowbit.activation_quant(a if a.ndim == 2 else _rows2d(a), int_arg(bits, "bits", 2, 8))
    return q.reshape(a.shape), s.reshape(a.shape[:-1])


def pack_signs(x: Any) -> PackedSigns:
    """Pack the signs of a float (rows, K) matrix, 1 bit per value (sign(0) = +1)."""
    return PackedSigns(float32(x, "x"))


def binary_matmul(a: Any, b: Any) -> np.ndarray:
    """``sign(a) @ sign(b).T`` as int32, by XNOR + popcount: ``a`` is (M, K), ``b`` is (N, K),
    floats or :func:`pack_signs` results; sign(0) = +1.

    >>> import numpy as np, lowbit.bitnet as bn
    >>> bn.binary_matmul(np.array([[1.0, -2.0, 0.0]], np.float32), np.array([[3.0, 1.0, -1.0]], np.float32))
    array([[-1]], dtype=int32)
    """
    pa = a if isinstance(a, PackedSigns) else PackedSigns(float32(a, "a"))
    pb = b if isinstance(b, PackedSigns) else PackedSigns(float32(b, "b"))
    if pa.shape[1] != pb.shape[1]:
        raise LowbitValueError(f"a and b must have the same number of columns (the inner dimension), "
                               f"got {pa.shape[1]} and {pb.shape[1]}")
    return _lowbit.binary_matmul_packed(pa, pb)


def kernel() -> str:
    """The kernel path in use: ``"avx2"`` or ``"scalar"`` (``LOWBIT_ISA`` can force scalar)."""
    return _lowbit.bitnet_kernel()


def _rows(x: Any, k: int) -> tuple[np.ndarray, tuple[int, ...], bool]:
    torch_in = is_tensor(x)
    a = float32(x, "x", ndim=None)
    if a.ndim == 0 or a.shape[-1] != k:
        raise LowbitValueError(f"x must have shape (..., {k}), got {a.shape}")
    # The row count spelled out: reshape(-1, 0) cannot infer it.
    return a.reshape(int(np.prod(a.shape[:-1], dtype=np.int64)), k), a.shape[:-1], torch_in


def _out(y: np.ndarray, lead: tuple[int, ...], torch_in: bool) -> Any:
    y = y.reshape(*lead, y.shape[-1])
    if torch_in:
        import torch

        return torch.from_numpy(y)
    return y


class TernaryLinear:
    """A BitNet b1.58 linear layer on packed ternary weights.

    ``forward(x)`` for ``x`` of shape (..., in_features) quantizes each row to int8
    (:func:`activation_quant`), computes the exact int32 product with the ternary codes and
    returns ``(q_x @ codes.T) * (scale_w / s_x) + bias`` (float64, rounded to float32).
    NumPy in, NumPy out; CPU tensors in, tensors out.
    """

    def __init__(self, codes: np.ndarray, scale: Any, bias: Any = None) -> None:
        codes = numpy_of(codes)
        if codes.dtype != np.int8 or codes.ndim != 2:
            raise LowbitTypeError(f"codes must be a 2-D int8 array, got {codes.dtype} with shape {codes.shape}")
        s = _scales(scale, "scale")
        b = None if bias is None else float32(bias, "bias", ndim=1)
        self._core = _lowbit.TernaryLinear(codes, s, b)
        self.scale = s if s.size > 1 else float(s[0])
        self.bias = b

    @classmethod
    def from_float(cls, w: Any, bias: Any = None, per_channel: bool = False) -> TernaryLinear:
        """Quantize float weights (out_features, in_features) with :func:`ternary_quantize` and pack them."""
        codes, scale = ternary_quantize(float32(w, "w"), per_channel)
        return cls(codes, scale, bias)

    @property
    def in_features(self) -> int:
        return self._core.in_features

    @property
    def out_features(self) -> int:
        return self._core.out_features

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weights (2 bits per weight, rows padded to 128)."""
        return self._core.nbytes

    @property
    def codes(self) -> np.ndarray:
        return self._core.codes

    def forward(self, x: Any) -> Any:
        rows, lead, torch_in = _rows(x, self.in_features)
        if rows.size == 0:
            # No rows, or no inputs: every product is an empty sum, so the output is the bias.
            y = np.zeros((rows.shape[0], self.out_features), np.float32)
            if self.bias is not None:
                y += self.bias
            return _out(y, lead, torch_in)
        return _out(self._core.forward(rows), lead, torch_in)

    __call__ = forward

    def __repr__(self) -> str:
        return f"TernaryLinear(in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None})"


class IntLinear:
    """A linear layer on quantized weights as a :class:`lowbit.QuantizedTensor` stores them
    (shape (out_features, in_features); or (out_features, ...) with one scale per tensor or per
    output channel, axis 0): W8A8 / W4A8.

    ``forward(x)`` quantizes each row of ``x`` (..., in_features) to int8 as
    :func:`activation_quant` does (``q = round(x * s_x)``), sums ``(code - zero_point) * q``
    exactly in int32 per group of inputs, and returns
    ``f / s_x + bias`` with ``f = fma(sum_g, scale_g, f)`` over the groups in float32 (the rescale
    in float64, rounded to float32): the product of the quantized activations with the
    dequantized weights, as every kernel path computes it bit for bit. Widths up to 4 bits are
    kept at half a byte per weight. NumPy in, NumPy out; CPU tensors in, tensors out.

    >>> import numpy as np, lowbit, lowbit.bitnet as bn
    >>> w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    >>> q = lowbit.quantize(w, lowbit.QuantSpec(4, granularity="group", group_size=32))
    >>> layer = bn.IntLinear(q)
    >>> layer.nbytes  # 16-column panels: half a byte per code, 16 scales per group (64 bytes)
    640
    >>> x = np.ones((2, 64), np.float32)
    >>> bool(np.allclose(layer(x), x @ q.dequantize().T, rtol=1e-5, atol=1e-5))
    True
    """

    def __init__(self, weight: Any, bias: Any = None) -> None:
        if not isinstance(weight, _lowbit.QuantizedTensor):
            raise LowbitTypeError(f"weight must be a lowbit.QuantizedTensor, got {type(weight).__name__}")
        b = None if bias is None else float32(bias, "bias", ndim=1)
        self._core = _lowbit.IntLinear(weight, b)
        self.bias = b

    @property
    def in_features(self) -> int:
        return self._core.in_features

    @property
    def out_features(self) -> int:
        return self._core.out_features

    @property
    def nbytes(self) -> int:
        """Bytes of the weights in memory: codes (a byte, or half a byte up to 4 bits, in panels
        of 16 output columns) and, per group and panel, 16 scales (and 16 code offsets where the
        zero points differ; a symmetric spec shares one)."""
        return self._core.nbytes

    def forward(self, x: Any, path: str | None = None) -> Any:
        """``path``: ``"avx512vnni"``, ``"avxvnni"``, ``"avx2"`` or ``"portable"`` (those :func:`intgemm_paths`
        lists); the fastest the CPU and ``LOWBIT_ISA`` allow when None."""
        rows, lead, torch_in = _rows(x, self.in_features)
        if path is not None and not isinstance(path, str):
            raise LowbitTypeError(f"path must be a string or None, got {type(path).__name__}")
        return _out(self._core.forward(rows, path), lead, torch_in)

    __call__ = forward

    def __repr__(self) -> str:
        return f"IntLinear(in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None})"


def intgemm_paths() -> list[str]:
    """The integer GEMM paths this machine can run (``"portable"`` first, the fastest last);
    ``LOWBIT_ISA`` caps them."""
    return _lowbit.intgemm_paths()


class BinaryLinear:
    """An XNOR-Net layer: weights are :func:`binary_quantize` signs with per-row scales ``a_w``;
    each input row is binarized to its signs with scale ``a_x = mean(|x|)``;
    ``y = (sign(x) @ sign_w.T) * a_x * a_w + bias`` (float64, rounded to float32), the dot
    products by XNOR + popcount."""

    def __init__(self, signs: np.ndarray, scales: np.ndarray, bias: Any = None) -> None:
        signs = numpy_of(signs)
        if signs.dtype != np.int8 or signs.ndim != 2 or not np.all(np.abs(signs) == 1):
            raise LowbitValueError("signs must be a 2-D int8 array of +1 / -1")
        self._w = PackedSigns(signs.astype(np.float32))
        self.scales = float32(scales, "scales", ndim=1)
        if self.scales.shape[0] != signs.shape[0] or not np.isfinite(self.scales).all():
            raise LowbitValueError(f"scales must be {signs.shape[0]} finite numbers, got {self.scales}")
        self.bias = None if bias is None else float32(bias, "bias", ndim=1)
        if self.bias is not None and (self.bias.shape[0] != signs.shape[0] or not np.isfinite(self.bias).all()):
            raise LowbitValueError(f"bias must be {signs.shape[0]} finite numbers, got {self.bias}")
        self.out_features, self.in_features = signs.shape

    @classmethod
    def from_float(cls, w: Any, bias: Any = None, center: bool = True) -> BinaryLinear:
        signs, scales = binary_quantize(w, center)
        return cls(signs, scales, bias)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weights (1 bit per weight, rows padded to 64)."""
        return self._w.nbytes

    def forward(self, x: Any) -> Any:
        rows, lead, torch_in = _rows(x, self.in_features)
        if not np.isfinite(rows).all():
            raise LowbitValueError("x contains NaN or Inf")
        ax = np.abs(rows).mean(axis=1, dtype=np.float64)
        acc = _lowbit.binary_matmul_packed(pack_signs(rows), self._w)
        y = acc * ax[:, None] * self.scales.astype(np.float64)[None, :]
        if self.bias is not None:
            y += self.bias.astype(np.float64)[None, :]
        return _out(y.astype(np.float32), lead, torch_in)

    __call__ = forward


def _scales(scale: Any, what: str) -> np.ndarray:
    """A scale or per-row scales as a float32 vector (refusing what float32 cannot hold)."""
    if is_tensor(scale) or isinstance(scale, (np.ndarray, list, tuple)):
        a = numpy_of(scale)
        if a.dtype.kind not in "fiu":
            raise LowbitTypeError(f"{what} must hold floats, got {a.dtype}")
        return np.atleast_1d(a.astype(np.float32))
    return np.array([float_arg(scale, what)], dtype=np.float32)


def _shape(shape: Any, what: str = "shape") -> tuple[int, ...]:
    if shape is None or isinstance(shape, (str, bytes, dict)) or not hasattr(shape, "__iter__"):
        raise LowbitTypeError(f"{what} must be a tuple of integers, got {type(shape).__name__}")
    return tuple(int_arg(s, what, 0, None) for s in shape)


def _codes(x: Any, what: str) -> np.ndarray:
    if x is None or isinstance(x, (str, bytes, dict)):
        raise LowbitTypeError(f"{what} must be an integer array, got {type(x).__name__}")
    a = numpy_of(x)
    if a.ndim == 0:
        raise LowbitValueError(f"{what} must have at least one dimension")
    return a


def _rows2d(a: np.ndarray) -> np.ndarray:
    rows = int(np.prod(a.shape[:-1], dtype=np.int64))  # explicit: reshape(-1, 0) is ambiguous
    return np.ascontiguousarray(a.reshape(rows, a.shape[-1]))


def pack(codes: Any, bits: int) -> np.ndarray:
    """Pack integer codes along the last axis at ``bits`` (1, 2 or 4; any width 1..8 works).

    Layout: every row (last axis) starts on a byte; code ``i`` of a row occupies bits
    ``[i*bits, (i+1)*bits)`` counted from the least significant bit of the row's first byte.
    uint8 codes must be below ``2^bits``; int8 codes in ``[-2^(bits-1), 2^(bits-1))`` are stored
    offset by ``2^(bits-1)`` (unpack with ``signed=True``). The result has shape
    ``codes.shape[:-1] + (ceil(K * bits / 8),)``, and its ``nbytes`` is what a file stores.

    >>> import numpy as np, lowbit
    >>> p = lowbit.pack(np.array([[1, 2, 3, 0, 1]], np.uint8), 2)
    >>> p, lowbit.unpack(p, 2, (1, 5))
    (array([[57,  1]], dtype=uint8), array([[1, 2, 3, 0, 1]], dtype=uint8))
    """
    a = _codes(codes, "codes")
    bits = int_arg(bits, "bits", 1, 8)
    if a.dtype == np.int8:
        half = 1 << (bits - 1)
        if a.size and (a.min() < -half or a.max() >= half):
            raise LowbitValueError(f"int8 codes must lie in [{-half}, {half - 1}] for {bits} bits")
        a = (a.astype(np.int16) + half).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise LowbitTypeError(f"codes must be uint8 or int8, got {a.dtype}")
    p = _lowbit.pack_rows(_rows2d(a), bits)
    return p.reshape(*a.shape[:-1], p.shape[-1])


def unpack(packed: Any, bits: int, shape: tuple[int, ...], signed: bool = False) -> np.ndarray:
    """Reverse :func:`pack`: ``shape`` is the codes' shape; ``signed=True`` gives int8 codes."""
    p = _codes(packed, "packed")
    shape = _shape(shape)
    bits = int_arg(bits, "bits", 1, 8)
    if p.dtype != np.uint8:
        raise LowbitTypeError(f"packed must be uint8, got {p.dtype}")
    if not shape or p.shape != shape[:-1] + (-(-shape[-1] * bits // 8),):
        raise LowbitValueError(f"packed has shape {p.shape}, which does not fit codes of shape {shape} at {bits} bits")
    u = _lowbit.unpack_rows(_rows2d(p), bits, shape[-1]).reshape(shape)
    if signed:
        return (u.astype(np.int16) - (1 << (bits - 1))).astype(np.int8)
    return u


def pack_ternary(codes: Any, format: str = "i2") -> np.ndarray:
    """Pack ternary codes (-1, 0, 1) along the last axis.

    * ``"i2"``: 2 bits per weight, ``code + 1`` in :func:`pack`'s layout (4 per byte).
    * ``"tq1"``: base 3, five per byte (1.6 bits per weight): byte ``i`` of a row is
      ``Σ_j (code[5i + j] + 1) * 3^j`` for ``j = 0..4``; a short last group is padded with code 0
      (digit 1).

    >>> import numpy as np, lowbit
    >>> c = np.array([[1, -1, 0, 0, 1, -1]], np.int8)
    >>> lowbit.pack_ternary(c, "tq1"), lowbit.pack_ternary(c, "i2").nbytes
    (array([[200, 120]], dtype=uint8), 2)
    """
    a = _codes(codes, "codes")
    if a.dtype != np.int8:
        raise LowbitTypeError(f"ternary codes must be int8, got {a.dtype}")
    if format == "i2":
        if a.size and (a.min() < -1 or a.max() > 1):
            raise LowbitValueError("ternary codes must be -1, 0 or 1")
        return pack((a + 1).astype(np.uint8), 2)
    if format == "tq1":
        p = _lowbit.pack_tq1(_rows2d(a))
        return p.reshape(*a.shape[:-1], p.shape[-1])
    raise LowbitValueError(f"format must be 'i2' or 'tq1', got {format!r}")


def unpack_ternary(packed: Any, shape: tuple[int, ...], format: str = "i2") -> np.ndarray:
    """Reverse :func:`pack_ternary` to int8 codes of ``shape``."""
    if format == "i2":
        return (unpack(packed, 2, shape).astype(np.int8) - 1).astype(np.int8)
    if format == "tq1":
        p = _codes(packed, "packed")
        shape = _shape(shape)
        if p.dtype != np.uint8 or not shape or p.shape != shape[:-1] + (-(-shape[-1] // 5),):
            raise LowbitValueError(f"packed has shape {p.shape} and dtype {p.dtype}, not tq1 bytes for codes of shape {shape}")
        return _lowbit.unpack_tq1(_rows2d(p), shape[-1]).reshape(shape)
    raise LowbitValueError(f"format must be 'i2' or 'tq1', got {format!r}")
