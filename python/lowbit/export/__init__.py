"""The way out: files that other runtimes load, with the numbers lowbit validated.

* :func:`onnx` (``lowbit.export.qdq``): a quantized torch model as ONNX QDQ, integer weights
  behind ``DequantizeLinear`` and activations as ``QuantizeLinear`` → ``DequantizeLinear``
  pairs, for ONNX Runtime.
* :func:`gguf` (``lowbit.export.ggml``): tensors or a torch model as a GGUF file for llama.cpp,
  quantized weights in GGML's block types (TQ2_0 / TQ1_0, Q4_0, Q8_0); read back with
  :func:`lowbit.load_gguf`.
* :func:`session` (``lowbit.export.ort``) opens such a file in ONNX Runtime with the file's
  numbers; :class:`OrtModel` runs it for :func:`lowbit.crossval.compare`, layer by layer.

>>> import lowbit.export
>>> lowbit.export.onnx.__name__
'onnx'
"""

from lowbit.export.ggml import GGUFReport, gguf
from lowbit.export.ort import OrtModel, session
from lowbit.export.qdq import ExportReport, onnx

__all__ = ["ExportReport", "GGUFReport", "OrtModel", "gguf", "onnx", "session"]
