"""GGUF export: tensors or a torch model as a GGUF file (llama.cpp's format), with GGML's block
types for the quantized weights: ternary → TQ2_0 (TQ1_0 on request), up to 16 levels → Q4_0,
more → Q8_0, floats → F16 (or F32 / BF16). :func:`lowbit.load_gguf` reads such files back.

How it works. Each tensor is encoded by lowbit's Rust codecs, which equal ``gguf.quants.quantize``
byte for byte (``python/tests/test_gguf.py`` checks random and degenerate data), and the file is
laid out by ``gguf.GGUFWriter``: it is llama.cpp's own writer, so the header, the typing of every
metadata value and the alignment are the ones llama.cpp reads, and lowbit keeps no second copy
of that format to drift. It writes into a temporary folder; the finished file then reaches
``path`` through ``lowbit._io.write_atomic``, so a failed export leaves nothing there.

What is quantized, and how:

* a :class:`lowbit.QuantizedTensor` in ``tensors`` (or a weight lowbit deploys as integers in a
  model: :class:`lowbit.torch.BitLinear`'s ternary codes, :class:`lowbit.models.QATLinear`'s
  spec, found as :func:`lowbit.export.onnx` finds them): ternary codes (-1 / 0 / 1 with zero
  point 0) → ``ternary``; other codes of at most 16 levels → Q4_0, more → Q8_0. GGML blocks have
  one float16 scale per 32 (256 for the ternary types) elements of a row and no zero point, so
  the weight's values are quantized again by GGML's rule for the type: BitLinear's codes survive
  exactly (the block scale is the layer's scale, rounded to float16), as do the tensors
  :func:`lowbit.load_gguf` returns (GGML's quantizers always write a block's extreme code, so
  re-quantizing gives the same bytes); other codes are approximated. Such a weight's last axis
  must be a whole number of blocks.
* float tensors: ``float_type``, unless ``bits`` (2, 4 or 8) asks for every float tensor of two
  or more dimensions whose last axis is a whole number of blocks to be quantized to the type of
  that width (the others stay ``float_type``). A model's integer buffers (BatchNorm's
  ``num_batches_tracked``) are left out.

Values GGML's reference quantizer cannot encode (NaN, ±Inf, or a block so close to zero that its
``1/d`` overflows) raise ``LowbitValueError`` for the block types; float types keep them.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lowbit import _lowbit
from lowbit._io import write_atomic
from lowbit._lowbit import LowbitIOError, LowbitTypeError, LowbitValueError, QuantizedTensor
from lowbit._validate import int_arg, is_tensor, path_arg

__all__ = ["GGUFReport", "gguf"]

_BLOCK = {"Q8_0": 32, "Q4_0": 32, "TQ1_0": 256, "TQ2_0": 256, "F16": 1, "F32": 1, "BF16": 1}


@dataclass
class GGUFReport:
    """What :func:`gguf` wrote: the path, ``tensors`` (``{name: GGML type}``, in file order)
    and the file's size in bytes."""

    path: str
    tensors: dict[str, str] = field(default_factory=dict)
    nbytes: int = 0


def _choice(v: Any, what: str, options: tuple[str, ...]) -> str:
    if not isinstance(v, str):
        raise LowbitTypeError(f"{what} must be one of {', '.join(map(repr, options))}, got {type(v).__name__}")
    if v not in options:
        raise LowbitValueError(f"{what} must be one of {', '.join(map(repr, options))}, got {v!r}")
    return v


def _weight_type(codes: np.ndarray, zero_points: Any, levels: int, ternary: str) -> str:
    """Ternary codes (-1 / 0 / 1 about a zero point of 0) → ``ternary``, else by code levels."""
    if np.all(np.asarray(zero_points) == 0) and codes.size and codes.min() >= -1 and codes.max() <= 1:
        return ternary
    return "Q4_0" if levels <= 16 else "Q8_0"


def _float32(name: str, v: Any) -> np.ndarray:
    if is_tensor(v):
        v = v.detach().cpu().float().numpy()
    if not isinstance(v, np.ndarray) or v.dtype.kind != "f":
        kind = getattr(v, "dtype", type(v).__name__)
        raise LowbitTypeError(f"tensors[{name!r}] must be a float array or tensor or a QuantizedTensor, got {kind}")
    return np.ascontiguousarray(v, dtype=np.float32)


def _collect(tensors_or_model: Any, ternary: str) -> list[tuple[str, np.ndarray, str | None]]:
    """(name, float32 values, GGML type of a quantized weight or None) for every tensor."""
    if isinstance(tensors_or_model, Mapping):
        out: list[tuple[str, np.ndarray, str | None]] = []
        for name, v in tensors_or_model.items():
            if not isinstance(name, str) or not name:
                raise LowbitTypeError(f"tensors must map names (non-empty str) to arrays, got the key {name!r}")
            if isinstance(v, QuantizedTensor):
                levels = v.spec.quant_max - v.spec.quant_min + 1
                out.append((name, v.dequantize(), _weight_type(v.int_repr(), v.zero_points, levels, ternary)))
            else:
                out.append((name, _float32(name, v), None))
        return out
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is how a model arrives
        torch = None  # type: ignore[assignment]
    if torch is None or not isinstance(tensors_or_model, torch.nn.Module):
        raise LowbitTypeError("tensors_or_model must be a dict of name -> array / tensor / QuantizedTensor or a "
                              f"torch.nn.Module, got {type(tensors_or_model).__name__}")
    from lowbit.export.qdq import dequantized, module_weight

    model = tensors_or_model
    deployed = {}
    for mname, m in model.named_modules():
        if isinstance(getattr(m, "weight", None), torch.Tensor):
            wq = module_weight(mname, m, {}, {})
            if wq is not None:
                ty = _weight_type(wq.codes, wq.zero_points, wq.quant_max - wq.quant_min + 1, ternary)
                deployed[f"{mname}.weight" if mname else "weight"] = (dequantized(wq), ty)
    out = []
    for name, t in model.state_dict().items():
        if name in deployed:
            values, ty = deployed[name]
            out.append((name, values, ty))
        elif t.is_floating_point():  # integer buffers (BatchNorm's num_batches_tracked) stay out
            out.append((name, _float32(name, t), None))
    return out


_INT_TYPES = {np.dtype(np.uint8): "UINT8", np.dtype(np.int8): "INT8", np.dtype(np.uint16): "UINT16",
              np.dtype(np.int16): "INT16", np.dtype(np.uint32): "UINT32", np.dtype(np.int32): "INT32",
              np.dtype(np.uint64): "UINT64", np.dtype(np.int64): "INT64", np.dtype(np.float32): "FLOAT32",
              np.dtype(np.float64): "FLOAT64", np.dtype(np.bool_): "BOOL"}


def _scalar_type(key: str, v: Any) -> tuple[Any, str]:
    """A metadata scalar as (Python value, GGUF type name)."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v), "BOOL"
    if isinstance(v, np.generic) and v.dtype in _INT_TYPES:
        return v.item(), _INT_TYPES[v.dtype]
    if isinstance(v, int):
        for name, lo, hi in (("INT32", -(2**31), 2**31 - 1), ("INT64", -(2**63), 2**63 - 1), ("UINT64", 0, 2**64 - 1)):
            if lo <= v <= hi:
                return v, name
        raise LowbitValueError(f"metadata[{key!r}] = {v} does not fit a GGUF integer (at most 64 bits)")
    if isinstance(v, float):
        return v, "FLOAT32"  # GGUF's convention for a float (llama.cpp reads its float keys as float32)
    if isinstance(v, str):
        return v, "STRING"
    raise LowbitTypeError(f"metadata[{key!r}] must be a bool, int, float, str, NumPy scalar or a list of them, "
                          f"got {type(v).__name__}")


def _metadata(metadata: Any) -> list[tuple[str, Any, str, str | None]]:
    """(key, value, GGUF type, element type of an array) for every metadata entry."""
    if metadata is None:
        return []
    if not isinstance(metadata, Mapping):
        raise LowbitTypeError(f"metadata must be a dict of str to values, got {type(metadata).__name__}")
    out: list[tuple[str, Any, str, str | None]] = []
    for key, v in metadata.items():
        if not isinstance(key, str) or not key:
            raise LowbitTypeError(f"metadata keys must be non-empty strings, got {key!r}")
        if isinstance(v, np.ndarray):
            if v.ndim != 1:
                raise LowbitValueError(f"metadata[{key!r}] must be a 1-D array, got {v.ndim} dimensions")
            v = [v.dtype.type(x) for x in v]
        if isinstance(v, (list, tuple)):
            if not v:
                raise LowbitValueError(f"metadata[{key!r}] is an empty list, which gguf's writer does not store")
            if all(isinstance(x, (list, tuple)) for x in v):
                out.append((key, [list(x) for x in v], "ARRAY", "ARRAY"))
                continue
            typed = [_scalar_type(key, x) for x in v]
            kinds = {t for _, t in typed}
            if len(kinds) > 1 and kinds <= {"INT32", "INT64", "UINT64"}:
                kinds = {"INT64"} if max(abs(x) for x, _ in typed) < 2**63 else {"UINT64"}
            if len(kinds) != 1:
                raise LowbitValueError(f"metadata[{key!r}] mixes element types {sorted(kinds)}: a GGUF array has one")
            out.append((key, [x for x, _ in typed], "ARRAY", kinds.pop()))
        else:
            value, t = _scalar_type(key, v)
            out.append((key, value, t, None))
    return out


def _row_fits(values: np.ndarray, ty: str) -> bool:
    return values.ndim >= 1 and values.shape[-1] % _BLOCK[ty] == 0


def gguf(
    tensors_or_model: Any,
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    ternary: str = "TQ2_0",
    float_type: str = "F16",
    bits: int | None = None,
) -> GGUFReport:
    """Write ``tensors_or_model`` (a dict of name → array / torch tensor / QuantizedTensor, or a
    ``torch.nn.Module``: its ``state_dict`` with its deployed integer weights) as a GGUF file at
    ``path`` (atomically) and return a :class:`GGUFReport`. See the module docs for what becomes
    which GGML type; ``ternary`` is ``"TQ2_0"`` or ``"TQ1_0"``, ``float_type`` ``"F16"``, ``"F32"``
    or ``"BF16"``, ``bits`` None, 2, 4 or 8.

    ``metadata`` goes into the file's key-value section: ``general.architecture`` (default
    ``"lowbit"``), ``general.name`` and any other key. A Python int is written as INT32 (INT64 /
    UINT64 when it needs them), a float as FLOAT32, a bool, a str; a NumPy scalar as its own
    type (``np.uint8(3)`` as UINT8, ``np.float64`` as FLOAT64); a list, tuple or 1-D array as an
    ARRAY of one element type (lists of lists nest). ``general.alignment`` sets the data alignment.

    >>> import numpy as np, os, tempfile, torch, lowbit, lowbit.export, lowbit.torch
    >>> folder = tempfile.mkdtemp()
    >>> w = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    >>> r = lowbit.export.gguf({"ffn.weight": w, "norm": np.ones(8, np.float32)}, os.path.join(folder, "t.gguf"),
    ...                        bits=4, metadata={"general.architecture": "demo", "demo.block_count": np.uint32(1)})
    >>> r.tensors
    {'ffn.weight': 'Q4_0', 'norm': 'F16'}

    A BitLinear's ternary codes survive, with the layer's scale in float16:

    >>> net = torch.nn.Sequential(lowbit.torch.BitLinear(256, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> r = lowbit.export.gguf(net, os.path.join(folder, "net.gguf"))
    >>> r.tensors
    {'0.weight': 'TQ2_0', '0.bias': 'F16', '2.weight': 'F16', '2.bias': 'F16'}
    >>> import gguf   # llama.cpp's reader
    >>> t = gguf.GGUFReader(r.path).tensors[0]
    >>> codes, scale = lowbit.ternary_quantize(net[0].weight.detach().numpy())
    >>> np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type), codes * np.float32(np.float16(scale)))
    True
    """
    try:
        import gguf as gguf_pkg
    except ImportError as e:
        raise ImportError("lowbit.export.gguf writes through the gguf package (llama.cpp's gguf-py): "
                          "pip install gguf") from e
    dest = path_arg(path, "path")
    ternary = _choice(ternary, "ternary", ("TQ2_0", "TQ1_0"))
    float_type = _choice(float_type, "float_type", ("F16", "F32", "BF16"))
    if bits is not None:
        bits = int_arg(bits, "bits")
        if bits not in (2, 4, 8):
            raise LowbitValueError(f"bits must be None, 2, 4 or 8, got {bits}")
    kv = _metadata(metadata)
    for key, value, t, _ in kv:
        if key == "general.architecture" and t != "STRING":
            raise LowbitTypeError(f"metadata['general.architecture'] must be a str, got {type(value).__name__}")
        if key == "general.alignment" and (t not in ("INT32", "UINT32") or value <= 0 or value & (value - 1)):
            raise LowbitValueError(f"metadata['general.alignment'] must be a power of two, got {value!r}")
    by_bits = {2: ternary, 4: "Q4_0", 8: "Q8_0"}
    entries = _collect(tensors_or_model, ternary)
    blocks: list[tuple[str, np.ndarray, str, tuple[int, ...]]] = []
    for name, values, ty in entries:
        if ty is not None:
            if not _row_fits(values, ty):
                raise LowbitValueError(f"{name}: {ty} needs rows of whole {_BLOCK[ty]}-element blocks; its shape is "
                                       f"{tuple(values.shape)}")
        elif bits is not None and values.ndim >= 2 and _row_fits(values, by_bits[bits]):
            ty = by_bits[bits]
        else:
            ty = float_type
        shape = tuple(values.shape)
        if values.size == 0:
            raise LowbitValueError(f"{name}: an empty tensor (shape {shape}) has no GGUF form lowbit writes")
        rows = values.reshape(-1, shape[-1]) if values.ndim >= 1 else values.reshape(1, 1)
        data = _lowbit.gguf_quantize(rows, ty, name)
        blocks.append((name, data, ty, shape or (1,)))
    report = GGUFReport(dest, {name: ty for name, _, ty, _ in blocks})
    _write(gguf_pkg, dest, kv, blocks)
    report.nbytes = os.path.getsize(dest)
    return report


def _write(gguf_pkg: Any, dest: str, kv: list[tuple[str, Any, str, str | None]], blocks: list) -> None:
    arch = next((v for k, v, t, _ in kv if k == "general.architecture"), "lowbit")
    with tempfile.TemporaryDirectory(prefix="lowbit-gguf-") as tmp:
        tmp_path = os.path.join(tmp, "out.gguf")
        w = gguf_pkg.GGUFWriter(tmp_path, arch)
        try:
            for key, value, t, sub in kv:
                if key == "general.architecture":
                    continue
                if key == "general.alignment":
                    w.add_custom_alignment(int(value))
                    continue
                w.add_key_value(key, value, gguf_pkg.GGUFValueType[t],
                                sub_type=None if sub is None else gguf_pkg.GGUFValueType[sub])
            for name, data, ty, shape in blocks:
                # GGUF lists dimensions innermost first; the writer takes NumPy's order and reverses it
                w.add_tensor(name, data.reshape(*shape[:-1], data.shape[-1]), raw_dtype=gguf_pkg.GGMLQuantizationType[ty])
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        except (ValueError, TypeError, AssertionError, struct.error) as e:
            if isinstance(e, (LowbitValueError, LowbitTypeError)):
                raise
            raise LowbitValueError(f"gguf's writer refused the export: {e}") from e
        finally:
            w.close()

        def copy(f: Any) -> None:
            with open(tmp_path, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 24)

        try:
            write_atomic(dest, copy)
        except OSError as e:
            raise LowbitIOError(f"cannot write {dest}: {e}") from e
