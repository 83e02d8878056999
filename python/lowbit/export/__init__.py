"""The way out: files that other runtimes load, with the numbers lowbit validated.

* :func:`onnx` (``lowbit.export.qdq``): a quantized torch model as ONNX QDQ, integer weights
  behind ``DequantizeLinear`` and activations as ``QuantizeLinear`` → ``DequantizeLinear``
  pairs, for ONNX Runtime; :func:`session` opens one in ONNX Runtime with the file's numbers.

>>> import lowbit.export
>>> lowbit.export.onnx.__name__
'onnx'
"""

from lowbit.export.qdq import ExportReport, onnx, session

__all__ = ["ExportReport", "onnx", "session"]
