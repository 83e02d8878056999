"""Type stubs of the Rust extension ``lowbit._lowbit``. Use the wrappers in ``lowbit``; they
accept lists and torch tensors and document each function with examples."""

import os
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__version__: str

class LowbitError(Exception):
    """Base class of every error lowbit raises."""

class LowbitValueError(LowbitError, ValueError):
    """A bad shape, value or range."""

class LowbitTypeError(LowbitError, TypeError):
    """A wrong dtype or argument type."""

class LowbitIOError(LowbitError, OSError):
    """A file could not be read or written."""

class LowbitFormatError(LowbitError, ValueError):
    """A corrupt, truncated or foreign file."""

class QuantSpec:
    """How to quantize: ``bits`` (2..8), symmetric (signed codes, zero point 0) or asymmetric
    (unsigned codes), and one scale per tensor, per channel along ``axis`` or per ``group_size``
    elements of the last axis. Immutable, hashable, picklable.

    >>> import lowbit
    >>> s = lowbit.QuantSpec(4, granularity="group", group_size=128)
    >>> s.quant_min, s.quant_max
    (-8, 7)
    """

    def __init__(
        self,
        bits: int,
        symmetric: bool = True,
        granularity: Literal["tensor", "channel", "group"] = "tensor",
        axis: int = 0,
        group_size: int | None = None,
    ) -> None: ...
    @property
    def bits(self) -> int: ...
    @property
    def symmetric(self) -> bool: ...
    @property
    def granularity(self) -> str: ...
    @property
    def axis(self) -> int: ...
    @property
    def group_size(self) -> int | None: ...
    @property
    def quant_min(self) -> int: ...
    @property
    def quant_max(self) -> int: ...

class QuantizedTensor:
    """Packed codes (``code - quant_min`` at ``bits`` bits each, little-endian bit stream in C
    order) with float32 scales and integer zero points shaped by the spec."""

    @property
    def spec(self) -> QuantSpec: ...
    @property
    def shape(self) -> list[int]: ...
    @property
    def codes(self) -> npt.NDArray[np.uint8]: ...
    @property
    def scales(self) -> npt.NDArray[np.float32]: ...
    @property
    def zero_points(self) -> npt.NDArray[np.int32]: ...
    @property
    def nbytes(self) -> int:
        """Bytes a file stores: packed codes + 4 per scale + 1 per zero point."""
    def int_repr(self) -> npt.NDArray[np.int8] | npt.NDArray[np.uint8]:
        """Unpacked integer codes in ``[quant_min, quant_max]``."""
    def dequantize(self) -> npt.NDArray[np.float32]:
        """``(q - zero_point) * scale`` as float32."""
    def save(self, path: str | os.PathLike[str], name: str = "tensor") -> None:
        """Write a one-tensor quantized safetensors file atomically."""

def fake_quantize_per_tensor_affine(
    x: npt.NDArray[Any],
    scale: float,
    zero_point: int,
    quant_min: int,
    quant_max: int,
    return_mask: bool = False,
    bf16: bool = False,
    out: npt.NDArray[Any] | None = None,
    inplace: bool = False,
) -> Any: ...
def fake_quantize_per_channel_affine(
    x: npt.NDArray[Any],
    scale: list[float],
    zero_point: list[int],
    axis: int,
    quant_min: int,
    quant_max: int,
    return_mask: bool = False,
    bf16: bool = False,
    out: npt.NDArray[Any] | None = None,
    inplace: bool = False,
) -> Any: ...
def quantize_per_tensor(x: npt.NDArray[Any], scale: float, zero_point: int, quant_min: int, quant_max: int) -> npt.NDArray[Any]: ...
def quantize_per_channel(x: npt.NDArray[Any], scales: list[float], zero_points: list[int], axis: int, quant_min: int, quant_max: int) -> npt.NDArray[Any]: ...
def dequantize_per_tensor(q: npt.NDArray[Any], scale: float, zero_point: int) -> npt.NDArray[np.float32]: ...
def dequantize_per_channel(q: npt.NDArray[Any], scales: list[float], zero_points: list[int], axis: int) -> npt.NDArray[np.float32]: ...
def quantize(
    x: npt.NDArray[Any], spec: QuantSpec, scales: npt.NDArray[np.float32] | None = None, zero_points: npt.NDArray[np.int32] | None = None
) -> QuantizedTensor: ...
def quantize_checkpoint(src: str, dst: str, spec: QuantSpec) -> list[dict[str, Any]]: ...
def dequantize_checkpoint(src: str, dst: str) -> list[dict[str, Any]]: ...
def load_quantized(path: str) -> dict[str, Any]: ...
def pack_bits(codes: npt.NDArray[np.uint8], bits: int) -> npt.NDArray[np.uint8]: ...
def unpack_bits(packed: npt.NDArray[np.uint8], bits: int, n: int) -> npt.NDArray[np.uint8]: ...

class Observer:
    """State and settings of one calibration observer; ``lowbit.calib`` wraps it in the
    ``MinMaxObserver`` / ``HistogramObserver`` / ... classes."""

    def __init__(
        self,
        kind: Literal["minmax", "moving_average", "per_channel", "histogram", "per_channel_histogram"],
        bits: int = 8,
        symmetric: bool = False,
        averaging_constant: float = 0.01,
        axis: int = 0,
        method: Literal["mse", "sqnr", "percentile", "entropy"] = "mse",
        percentile: float = 99.99,
        bins: int = 2048,
    ) -> None: ...
    @property
    def quant_min(self) -> int: ...
    @property
    def quant_max(self) -> int: ...
    def update(self, x: npt.NDArray[Any], bf16: bool = False) -> None: ...
    def qparams(self) -> tuple[Any, Any]: ...
    def clip_range(self) -> tuple[float, float]: ...
    def merge(self, other: Observer) -> None: ...
    def to_json(self) -> str: ...
    @staticmethod
    def from_json(s: str) -> Observer: ...
    def histogram(self) -> tuple[npt.NDArray[np.uint64], float, float, float, float]: ...
