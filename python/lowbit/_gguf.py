"""GGUF files (llama.cpp's format) read into lowbit's terms: :func:`load_gguf` and :class:`GGUFFile`.

Writing them is :func:`lowbit.export.gguf`. The Rust core parses the file as untrusted bytes and
decodes GGML's blocks exactly as the ``gguf`` package (llama.cpp's ``gguf-py``) does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lowbit import _lowbit
from lowbit._lowbit import QuantizedTensor
from lowbit._validate import path_arg

__all__ = ["GGUFFile", "load_gguf"]


@dataclass
class GGUFFile:
    """What :func:`load_gguf` read from a GGUF file.

    * ``tensors``: ``{name: QuantizedTensor | np.ndarray}`` in file order, NumPy's shape
      (outermost axis first, the reverse of GGUF's dimension list). Q8_0 is an 8-bit symmetric
      QuantizedTensor in groups of 32 (int8 codes, scale ``d``); Q4_0 a 4-bit asymmetric one in
      groups of 32 (codes ``q`` with zero point 8, or ``15 - q`` with zero point 7 where ``d`` is
      negative); TQ1_0 / TQ2_0 2-bit symmetric ones in groups of 256 with codes -1 / 0 / 1.
      F32, F16 and BF16 tensors are float32 arrays, as is a block tensor no QuantizedTensor holds
      (a NaN or infinite ``d``, a TQ2_0 code 3).
    * ``types``: ``{name: GGML type name}`` (``"Q4_0"``, ``"F16"``, ...).
    * ``exact``: ``{name: bool}``: whether the tensor (dequantized, for a QuantizedTensor) equals
      ``gguf.quants.dequantize`` bit for bit. False only where gguf's value is ``-0.0`` and
      lowbit's ``+0.0``: a QuantizedTensor's scales are positive, so a zero code in a block of
      negative ``d`` (Q4_0 writes those for about half its blocks) or a block of ``d = -0`` gives
      ``+0.0``. Every other bit agrees; ``load_gguf(path, dequantize=True)`` gives gguf's exact
      float32 values for every tensor.
    * ``metadata``: ``{key: value}`` (int, float, bool, str, or a list of them) and
      ``metadata_types``: ``{key: GGUF value type}`` (``"UINT32"``, ``"ARRAY[STRING]"``, ...).
    * ``version``: the GGUF version (2 or 3).
    """

    tensors: dict[str, Any] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)
    exact: dict[str, bool] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    metadata_types: dict[str, str] = field(default_factory=dict)
    version: int = 3

    def arrays(self) -> dict[str, np.ndarray]:
        """Every tensor as float32 (QuantizedTensors dequantized; see ``exact``)."""
        return {k: v.dequantize() if isinstance(v, QuantizedTensor) else v for k, v in self.tensors.items()}


def load_gguf(path: str | os.PathLike[str], *, dequantize: bool = False) -> GGUFFile:
    """Read the GGUF file at ``path`` into a :class:`GGUFFile` (tensors, their GGML types,
    metadata). ``dequantize=True`` gives every tensor as the float32 values
    ``gguf.quants.dequantize`` computes, bit for bit.

    The file is parsed as untrusted input: a truncated or corrupt file, counts or sizes the file
    cannot back, unknown type ids or rows that are not whole blocks raise ``LowbitFormatError``
    naming what is wrong, as does a tensor of a GGML type lowbit does not decode (K-quants,
    I-quants, ...); an unreadable file raises ``LowbitIOError``.

    >>> import numpy as np, os, tempfile, lowbit, lowbit.export
    >>> path = os.path.join(tempfile.mkdtemp(), "m.gguf")
    >>> w = np.linspace(-1, 1, 256, dtype=np.float32).reshape(4, 64)
    >>> _ = lowbit.export.gguf({"w": w, "b": np.ones(4, np.float32)}, path, bits=8,
    ...                        metadata={"general.name": "demo"})
    >>> f = lowbit.load_gguf(path)
    >>> f.types, f.metadata["general.name"]
    ({'w': 'Q8_0', 'b': 'F16'}, 'demo')
    >>> f.tensors["w"]
    QuantizedTensor(shape=[4, 64], bits=8, granularity='group', nbytes=296)
    >>> bool(np.abs(f.tensors["w"].dequantize() - w).max() < 0.005)
    True
    """
    if not isinstance(dequantize, (bool, np.bool_)):
        from lowbit._lowbit import LowbitTypeError

        raise LowbitTypeError(f"dequantize must be a bool, got {type(dequantize).__name__}")
    version, meta, tensors = _lowbit.load_gguf(path_arg(path, "path"), bool(dequantize))
    out = GGUFFile(version=version)
    for key, value, vtype in meta:
        out.metadata[key] = value
        out.metadata_types[key] = vtype
    for name, ggml_type, value, exact in tensors:
        out.tensors[name] = value
        out.types[name] = ggml_type
        out.exact[name] = exact
    return out
