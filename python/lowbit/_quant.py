"""The public quantization functions: argument normalisation and torch dispatch around the core."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from lowbit import _lowbit
from lowbit._array import as_array, numpy_of, out_arg, tensor_view
from lowbit._lowbit import LowbitTypeError, LowbitValueError, QuantizedTensor, QuantSpec
from lowbit._validate import float_arg, int_arg, is_tensor, path_arg, vector_arg


def _tensor() -> Any:
    """The torch versions of these functions (imports torch: only called for a tensor)."""
    from lowbit import _tensor as t

    return t


def fake_quantize_per_tensor_affine(
    x: Any, scale: Any, zero_point: Any, quant_min: int, quant_max: int, return_mask: bool = False, out: Any = None
) -> Any:
    """Fake-quantize ``x`` with one scale and zero point, bit-identical to PyTorch.

    Computes ``(clamp(zero_point + round(x * (1/scale)), quant_min, quant_max) - zero_point) * scale``
    with the float32 reciprocal and round-half-to-even, as ATen does. NaN maps to ``quant_min``
    and ±Inf clamp, as in PyTorch. ``x`` is a float32/float16/float64 NumPy array (any strides)
    or a CPU torch tensor (also bfloat16; autograd uses the straight-through estimator). The
    result has the dtype and type of ``x``. ``return_mask=True`` also returns the boolean
    straight-through mask ``quant_min <= zero_point + round(x / scale) <= quant_max``.
    ``out=`` writes the result into a C-contiguous array of x's shape and dtype (``out=x``
    works in place) and returns it: no allocation, no page faults, full memory speed.

    Raises ``LowbitValueError`` for a non-positive or non-finite scale, a zero point outside
    ``[quant_min, quant_max]`` or ``quant_min > quant_max``; ``LowbitTypeError`` for other dtypes.
    Refused where torch accepts (each error says so): quant ranges beyond ±2^24 (torch takes
    qint32's; lowbit's kernels clamp in float32, exact only up to 2^24); scales that are positive
    as Python floats but 0 or Inf in float32, the precision torch computes in (torch returns
    zeros or NaN); a scale or zero point tensor with ``requires_grad`` (torch raises too: use
    :class:`lowbit.torch.FakeQuantize` for the STE, or ``torch._fake_quantize_learnable_*``).

    >>> import numpy as np, lowbit
    >>> x = np.array([0.1, 0.25, 0.35, 9.0], dtype=np.float32)
    >>> lowbit.fake_quantize_per_tensor_affine(x, 0.1, 0, -8, 7)
    array([0.1, 0.2, 0.4, 0.7], dtype=float32)
    >>> _, mask = lowbit.fake_quantize_per_tensor_affine(x, 0.1, 0, -8, 7, return_mask=True)
    >>> mask
    array([ True,  True,  True, False])
    >>> _ = lowbit.fake_quantize_per_tensor_affine(x, 0.1, 0, -8, 7, out=x)  # in place
    >>> x
    array([0.1, 0.2, 0.4, 0.7], dtype=float32)
    """
    if is_tensor(x):
        return _tensor().fake_quantize_per_tensor_affine(x, scale, zero_point, quant_min, quant_max, return_mask, out)
    x = as_array(x)
    o, inplace = out_arg(x, out)
    return _lowbit.fake_quantize_per_tensor_affine(
        x,
        float_arg(scale, "scale"),
        int_arg(zero_point, "zero_point"),
        int_arg(quant_min, "quant_min"),
        int_arg(quant_max, "quant_max"),
        bool(return_mask),
        out=o,
        inplace=inplace,
    )


def fake_quantize_per_channel_affine(
    x: Any,
    scale: Any,
    zero_point: Any,
    axis: int,
    quant_min: int,
    quant_max: int,
    return_mask: bool = False,
    out: Any = None,
) -> Any:
    """Fake-quantize ``x`` with one scale and zero point per index of ``axis``, bit-identical to PyTorch.

    ``scale`` and ``zero_point`` are 1-D (lists, arrays or tensors) with ``x.shape[axis]``
    entries; zero points must be integers (torch also takes float32 / float16 zero points, which
    it adds before rounding, as its learnable fake-quant does: lowbit refuses them with
    ``LowbitTypeError``; round them first). Scales may be float64, float32, float16 or bfloat16.
    Edge cases follow ``torch.fake_quantize_per_channel_affine``
    exactly, including its int64 conversion: NaN, +Inf and values whose code reaches 2^63 map to
    ``quant_min``. Other arguments and the result as in :func:`fake_quantize_per_tensor_affine`.

    >>> import numpy as np, lowbit
    >>> w = np.array([[0.5, -0.5], [3.0, 1.2]], dtype=np.float32)
    >>> lowbit.fake_quantize_per_channel_affine(w, [0.25, 1.0], [0, 0], 0, -2, 1)
    array([[ 0.25, -0.5 ],
           [ 1.  ,  1.  ]], dtype=float32)
    """
    if is_tensor(x):
        return _tensor().fake_quantize_per_channel_affine(x, scale, zero_point, axis, quant_min, quant_max, return_mask, out)
    x = as_array(x)
    o, inplace = out_arg(x, out)
    return _lowbit.fake_quantize_per_channel_affine(
        x,
        vector_arg(scale, "scale", integer=False),
        vector_arg(zero_point, "zero_point", integer=True),
        int_arg(axis, "axis"),
        int_arg(quant_min, "quant_min"),
        int_arg(quant_max, "quant_max"),
        bool(return_mask),
        out=o,
        inplace=inplace,
    )


def quantize_per_tensor(x: Any, scale: Any, zero_point: Any, quant_min: int, quant_max: int) -> Any:
    """Integer codes of ``x``: ``torch.quantize_per_tensor(...).int_repr()`` clamped to the range.

    Returns int8 codes when ``quant_min < 0`` and uint8 otherwise (the range must fit one of
    them). Equal to PyTorch for qint8/quint8 on every input, including its FBGEMM rules for
    NaN (the top of the range) and huge values. float16/float64 input is rounded to float32 first.

    >>> import numpy as np, lowbit
    >>> lowbit.quantize_per_tensor(np.array([-1.0, 0.3, 2.0], dtype=np.float32), 0.1, 3, 0, 15)
    array([ 0,  6, 15], dtype=uint8)
    """
    if is_tensor(x):
        return _tensor().quantize_per_tensor(x, scale, zero_point, quant_min, quant_max)
    return _lowbit.quantize_per_tensor(
        as_array(x), float_arg(scale, "scale"), int_arg(zero_point, "zero_point"), int_arg(quant_min, "quant_min"), int_arg(quant_max, "quant_max")
    )


def quantize_per_channel(x: Any, scales: Any, zero_points: Any, axis: int, quant_min: int, quant_max: int) -> Any:
    """Per-channel integer codes: ``torch.quantize_per_channel(...).int_repr()`` clamped to the range.

    >>> import numpy as np, lowbit
    >>> w = np.array([[0.5, -0.5], [3.0, 1.2]], dtype=np.float32)
    >>> lowbit.quantize_per_channel(w, [0.25, 1.0], [0, 0], 0, -8, 7)
    array([[ 2, -2],
           [ 3,  1]], dtype=int8)
    """
    if is_tensor(x):
        return _tensor().quantize_per_channel(x, scales, zero_points, axis, quant_min, quant_max)
    return _lowbit.quantize_per_channel(
        as_array(x),
        vector_arg(scales, "scales", integer=False),
        vector_arg(zero_points, "zero_points", integer=True),
        int_arg(axis, "axis"),
        int_arg(quant_min, "quant_min"),
        int_arg(quant_max, "quant_max"),
    )


def dequantize_per_tensor(q: Any, scale: Any, zero_point: Any) -> Any:
    """Float32 ``(q - zero_point) * scale`` of int8/uint8 codes, as ``torch.dequantize`` computes it.

    >>> import numpy as np, lowbit
    >>> lowbit.dequantize_per_tensor(np.array([0, 6, 15], dtype=np.uint8), 0.1, 3)
    array([-0.3,  0.3,  1.2], dtype=float32)
    """
    if is_tensor(q):
        return _tensor().dequantize_per_tensor(q, scale, zero_point)
    return _lowbit.dequantize_per_tensor(as_array(q, "q"), float_arg(scale, "scale"), int_arg(zero_point, "zero_point"))


def dequantize_per_channel(q: Any, scales: Any, zero_points: Any, axis: int) -> Any:
    """Float32 ``(q - zero_points[c]) * scales[c]`` along ``axis``.

    >>> import numpy as np, lowbit
    >>> lowbit.dequantize_per_channel(np.array([[2, -2], [3, 1]], dtype=np.int8), [0.25, 1.0], [0, 0], 0)
    array([[ 0.5, -0.5],
           [ 3. ,  1. ]], dtype=float32)
    """
    if is_tensor(q):
        return _tensor().dequantize_per_channel(q, scales, zero_points, axis)
    return _lowbit.dequantize_per_channel(
        as_array(q, "q"), vector_arg(scales, "scales", integer=False), vector_arg(zero_points, "zero_points", integer=True), int_arg(axis, "axis")
    )


def quantize(x: Any, spec: QuantSpec, scales: Any = None, zero_points: Any = None) -> QuantizedTensor:
    """Quantize ``x`` with ``spec`` into a :class:`QuantizedTensor` (packed codes + qparams).

    Scales and zero points come from the min-max of each tensor / channel / group (torch.ao's
    MinMaxObserver formula) unless given, shaped like ``spec``'s qparams: ``()`` per tensor,
    ``(x.shape[axis],)`` per channel, ``x.shape[:-1] + (ceil(x.shape[-1] / group_size),)`` per group.

    >>> import numpy as np, lowbit
    >>> w = np.linspace(-1, 1, 256, dtype=np.float32).reshape(2, 128)
    >>> q = lowbit.quantize(w, lowbit.QuantSpec(4, granularity="group", group_size=64))
    >>> q.nbytes, q.scales.shape
    (148, (2, 2))
    >>> bool(np.abs(q.dequantize() - w).max() <= q.scales.max() / 2 + 1e-7)
    True
    """
    if not isinstance(spec, QuantSpec):
        raise LowbitTypeError(f"spec must be a lowbit.QuantSpec, got {type(spec).__name__}")
    if is_tensor(x):
        x, bf16 = tensor_view(x, "x")
        if bf16:
            x = x.view(np.uint16).astype(np.uint32) << 16
            x = x.view(np.float32)
    s = None if scales is None else _qparams(scales, "scales", integer=False)
    z = None if zero_points is None else _qparams(zero_points, "zero_points", integer=True)
    return _lowbit.quantize(as_array(x), spec, s, z)


def _qparams(v: Any, what: str, integer: bool) -> np.ndarray:
    """Given scales (float32) or zero points (int32), checked before conversion (which would
    drop an imaginary part or wrap an integer)."""
    if v is None or isinstance(v, (str, bytes, dict)):
        raise LowbitTypeError(f"{what} must be an array, got {type(v).__name__}")
    a = numpy_of(v)
    if a.dtype.kind not in ("iu" if integer else "fiu"):
        raise LowbitTypeError(f"{what} must hold {'integers' if integer else 'floats'}, got {a.dtype}")
    if integer and a.size and (a.min() < -(2**31) or a.max() >= 2**31):
        raise LowbitValueError(f"{what} must fit in int32, got values in [{a.min()}, {a.max()}]")
    # np.array, not np.ascontiguousarray: the latter turns per-tensor 0-d qparams into shape (1,).
    return np.array(a, dtype=np.int32 if integer else np.float32, order="C")


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, spec: QuantSpec, *,
                        include: str | list[str] | tuple[str, ...] | None = None,
                        exclude: str | list[str] | tuple[str, ...] | None = None) -> list[dict]:
    """Quantize every floating 2-D tensor of the safetensors file ``src`` into ``dst`` (atomically).

    ``include`` / ``exclude`` (a pattern or a list of them: exact tensor names or
    ``fnmatch.fnmatchcase`` globs such as ``"*embeddings*"``) pick the tensors: only those matching
    an ``include`` pattern (all when None) and no ``exclude`` pattern are quantized; the others
    are stored as they are.

    ``src`` is memory-mapped and quantized one tensor at a time; its ``lowbit.sha256``, if it has
    one, is checked first. ``dst`` carries its own (see :func:`save_checkpoint`), and the same
    input gives the same bytes.

    Returns one dict per tensor: ``name, shape, dtype, bits (None if copied), sqnr_db,
    bytes_before, bytes_after``. Read back with :func:`load_quantized` or :func:`dequantize_checkpoint`.
    """
    if not isinstance(spec, QuantSpec):
        raise LowbitTypeError(f"spec must be a lowbit.QuantSpec, got {type(spec).__name__}")
    return _lowbit.quantize_checkpoint(path_arg(src, "src"), path_arg(dst, "dst"), spec,
                                       _patterns(include, "include"), _patterns(exclude, "exclude"))


def _patterns(v: Any, what: str) -> list[str]:
    """A pattern or a list / tuple of them, as a list of strings."""
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v):
        return list(v)
    raise LowbitTypeError(f"{what} must be a string or a list of strings, got {type(v).__name__}")


def dequantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> list[dict]:
    """Write a plain safetensors file with every quantized tensor of ``src`` restored to its dtype
    (atomically, with a ``lowbit.sha256``)."""
    return _lowbit.dequantize_checkpoint(path_arg(src, "src"), path_arg(dst, "dst"))


def load_quantized(path: str | os.PathLike) -> dict[str, Any]:
    """Load a quantized checkpoint: ``{name: QuantizedTensor}``, plus ``{name: np.ndarray}`` for
    tensors stored unquantized. Corrupt or foreign files, and files whose ``lowbit.sha256`` does
    not match their bytes, raise ``LowbitFormatError``.
    """
    out: dict[str, Any] = {}
    for name, v in _lowbit.load_quantized(path_arg(path, "path")).items():
        if isinstance(v, QuantizedTensor):
            out[name] = v
        else:
            dtype, shape, data = v
            out[name] = _raw_to_numpy(dtype, shape, data)
    return out


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Write ``{name: QuantizedTensor | array}`` as a lowbit checkpoint (safetensors), atomically.

    Arrays (NumPy or torch, any safetensors dtype; torch bfloat16 stays bfloat16) are stored as
    they are, quantized tensors as codes + scales + zero points (read back by
    :func:`load_quantized`). ``metadata`` (str to str) goes into the header beside lowbit's keys
    (``lowbit.format``, ``lowbit.quantized``, and ``lowbit.sha256``: the SHA-256 of the whole file
    with these 64 hex digits as ``0``s, checked by every loader).

    >>> import numpy as np, lowbit, os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(4, 16)
    >>> lowbit.save_checkpoint(path, {"w": lowbit.quantize(w, lowbit.QuantSpec(4)), "b": np.ones(4, np.float32)},
    ...                        {"note": "demo"})
    >>> sorted(lowbit.load_quantized(path)), lowbit.checkpoint_metadata(path)["note"]
    (['b', 'w'], 'demo')
    """
    path = path_arg(path, "path")
    if not isinstance(tensors, dict):
        raise LowbitTypeError(f"tensors must be a dict, got {type(tensors).__name__}")
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise LowbitTypeError("metadata must be a dict of str to str")
    out: dict[str, Any] = {}
    for name, v in tensors.items():
        if not isinstance(name, str):
            raise LowbitTypeError(f"tensors must map names (str) to arrays, got the key {name!r}")
        if isinstance(v, QuantizedTensor):
            out[name] = v
            continue
        if is_tensor(v):
            import torch

            v = v.detach().cpu()
            if v.dtype == torch.bfloat16:
                a = v.contiguous().view(torch.int16).numpy()
                out[name] = ("BF16", list(a.shape), a.tobytes())
                continue
            v = v.numpy()
        if v is None or isinstance(v, (str, bytes, dict)):
            raise LowbitTypeError(f"tensor {name!r} must be an array or a QuantizedTensor, got {type(v).__name__}")
        a = np.asarray(v)
        le = a.dtype.newbyteorder("<")
        dt = _DTYPE_NAMES.get(le.str)
        if dt is None:
            raise LowbitTypeError(f"tensor {name!r}: dtype {a.dtype} cannot be stored in safetensors")
        out[name] = (dt, list(a.shape), np.ascontiguousarray(a, dtype=le).tobytes())
    _lowbit.save_checkpoint(path, out, metadata)


def checkpoint_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata in a safetensors file's header (only the header is read, so its
    ``lowbit.sha256`` is not checked; :func:`load_quantized` does)."""
    return dict(_lowbit.checkpoint_metadata(path_arg(path, "path")))


_NP = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BF16": "<u2"}


_DTYPE_NAMES = {np.dtype(v).str: k for k, v in _NP.items() if k != "BF16"}


def _raw_to_numpy(dtype: str, shape: list[int], data: bytes) -> np.ndarray:
    if dtype not in _NP:
        return np.frombuffer(data, dtype=np.uint8)
    return np.frombuffer(data, dtype=_NP[dtype]).reshape(shape)
