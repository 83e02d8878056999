"""The way out: files that other runtimes load, with the numbers lowbit validated.

* :func:`onnx` (``lowbit.export.qdq``): a quantized torch model as ONNX QDQ, integer weights
  behind ``DequantizeLinear`` and activations as ``QuantizeLinear`` → ``DequantizeLinear``
  pairs, for ONNX Runtime.
* :func:`session` (``lowbit.export.ort``) opens such a file in ONNX Runtime with the file's
  numbers; :class:`OrtModel` runs it for :func:`lowbit.crossval.compare`, layer by layer.

>>> import lowbit.export
>>> lowbit.export.onnx.__name__
'onnx'
"""

from lowbit.export.ort import OrtModel, session
from lowbit.export.qdq import ExportReport, onnx

__all__ = ["ExportReport", "OrtModel", "onnx", "session"]
