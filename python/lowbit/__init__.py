"""lowbit: low-bit quantization for PyTorch researchers, with a Rust core.

Affine INT2-INT8 quantization and fake-quant that match PyTorch bit for bit, packed
quantized checkpoints, and the `lowbit` command line tool. NumPy arrays and CPU torch
tensors go in and come out without copies.

>>> import numpy as np, lowbit
>>> x = np.array([-1.0, -0.26, 0.25, 0.74], dtype=np.float32)
>>> lowbit.fake_quantize_per_tensor_affine(x, 0.5, 0, -2, 1)
array([-1. , -0.5,  0. ,  0.5], dtype=float32)
"""

from lowbit._lowbit import (
    LowbitError,
    LowbitFormatError,
    LowbitIOError,
    LowbitTypeError,
    LowbitValueError,
    QuantizedTensor,
    QuantSpec,
    __version__,
)
from lowbit import bitnet, calib, crossval, nas, ptq, runtime
from lowbit._config import show_config
from lowbit._gguf import GGUFFile, load_gguf
from lowbit.bitnet import activation_quant, binary_quantize, pack, pack_ternary, ternary_quantize, unpack, unpack_ternary
from lowbit._quant import (
    checkpoint_metadata,
    dequantize_checkpoint,
    dequantize_per_channel,
    dequantize_per_tensor,
    fake_quantize_per_channel_affine,
    fake_quantize_per_tensor_affine,
    load_quantized,
    quantize,
    quantize_checkpoint,
    quantize_per_channel,
    quantize_per_tensor,
    save_checkpoint,
)



def __getattr__(name: str):  # noqa: ANN202
    # The PyTorch parts on first use, so `import lowbit` works without PyTorch installed.
    if name in ("torch", "models", "demo", "export"):
        import importlib

        return importlib.import_module(f"lowbit.{name}")
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


__all__ = [
    "GGUFFile",
    "LowbitError",
    "LowbitFormatError",
    "LowbitIOError",
    "LowbitTypeError",
    "LowbitValueError",
    "QuantSpec",
    "QuantizedTensor",
    "__version__",
    "activation_quant",
    "binary_quantize",
    "bitnet",
    "dequantize_checkpoint",
    "dequantize_per_channel",
    "dequantize_per_tensor",
    "calib",
    "checkpoint_metadata",
    "crossval",
    "fake_quantize_per_channel_affine",
    "fake_quantize_per_tensor_affine",
    "load_gguf",
    "load_quantized",
    "nas",
    "pack",
    "pack_ternary",
    "quantize",
    "quantize_checkpoint",
    "quantize_per_channel",
    "quantize_per_tensor",
    "runtime",
    "save_checkpoint",
    "ternary_quantize",
    "unpack",
    "unpack_ternary",
    "show_config",
]
