"""The Rust runtime: models run on candle-core tensors from safetensors checkpoints, with
quantized linear layers chosen at load time and every layer's output recordable by name.

>>> import numpy as np
>>> from lowbit.runtime import BertEncoder
>>> BertEncoder.WEIGHTS
('f32', 'int8', 'int4', 'ternary', 'binary')
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from lowbit import _lowbit
from lowbit._lowbit import LowbitTypeError, LowbitValueError
from lowbit._quant import _is_tensor

__all__ = ["BertEncoder"]


def _ids(x: Any, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if _is_tensor(x):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype == bool:
        a = a.astype(np.int64)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise LowbitTypeError(f"{name} must hold integers, got {a.dtype}")
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise LowbitValueError(f"{name} must be (batch, length), got shape {a.shape}")
    if shape is not None and a.shape != shape:
        raise LowbitValueError(f"{name} has shape {a.shape}, input_ids {shape}")
    return np.ascontiguousarray(a, dtype=np.int64)


class BertEncoder:
    """A BERT-architecture text encoder (post-LayerNorm, GELU, absolute position and token-type
    embeddings) that loads Hugging Face ``BertModel`` checkpoints and runs in Rust.

    ``weights`` picks the linear layers: ``"f32"``; ``"int8"`` (symmetric, per output channel)
    and ``"int4"`` (symmetric, groups of 32 inputs), quantized with lowbit's ``QuantSpec`` at load
    and dequantized once; ``"ternary"`` (BitNet b1.58 absmean weights at 2 bits, int8 activations
    per token, the packed integer kernel); ``"binary"`` (XNOR-Net: signs of the centred weights
    with per-row scales, activations binarized per token, the XNOR-popcount kernel).
    ``act_bits=8`` (2..8) quantizes the input of every float linear layer per token (absmax,
    BitNet's recipe). Embeddings, norms and the pooler stay float32.

    A quantized checkpoint written by ``lowbit quantize`` loads directly: its tensors are used as
    stored (dequantized once from the codes, never re-quantized); ``weights`` then applies only to
    linear weights the file keeps in float.
    """

    WEIGHTS = ("f32", "int8", "int4", "ternary", "binary")

    def __init__(self, core: Any, path: str) -> None:
        self._core = core
        self.path = path

    @classmethod
    def load(cls, path: str | os.PathLike[str], weights: str = "f32", act_bits: int | None = None) -> BertEncoder:
        """Load ``config.json`` + ``model.safetensors`` from a folder (what
        ``BertModel.save_pretrained`` writes), or a ``.safetensors`` file with ``config.json``
        beside it. Names with the ``bert.`` prefix of the task models load too (their heads are
        ignored); missing, unexpected or misshapen tensors are listed in one error."""
        if not isinstance(weights, str):
            raise LowbitTypeError(f"weights must be a string, got {type(weights).__name__}")
        if act_bits is not None and (isinstance(act_bits, bool) or not isinstance(act_bits, int)):
            raise LowbitTypeError(f"act_bits must be an int or None, got {type(act_bits).__name__}")
        return cls(_lowbit.BertCore.load(os.fspath(path), weights, act_bits), os.fspath(path))

    @property
    def config(self) -> dict[str, Any]:
        return self._core.config

    def _inputs(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> tuple:
        ids = _ids(input_ids, "input_ids")
        mask = np.ones_like(ids) if attention_mask is None else _ids(attention_mask, "attention_mask", ids.shape)
        types = None if token_type_ids is None else _ids(token_type_ids, "token_type_ids", ids.shape)
        return ids, mask, types

    def forward(
        self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None, record: bool = False
    ) -> Any:
        """The last hidden state, float32 (batch, length, hidden). With ``record=True``, returns
        ``(hidden, layers)`` where ``layers`` maps the names of the matching ``transformers``
        modules (``"embeddings"``, ``"encoder.layer.0.attention"``, ``"encoder.layer.0"``, ...,
        ``"pooler"``) to their outputs. A torch tensor in gives torch tensors out."""
        torch_in = _is_tensor(input_ids)
        out, rec = self._core.forward(*self._inputs(input_ids, attention_mask, token_type_ids), bool(record))
        if torch_in:
            import torch

            out = torch.from_numpy(out)
            rec = None if rec is None else {k: torch.from_numpy(v) for k, v in rec.items()}
        return (out, rec) if record else out

    __call__ = forward

    def embed(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> Any:
        """Sentence embeddings: the mean of the hidden states over unmasked tokens, L2-normalised
        (sentence-transformers' mean pooling), float32 (batch, hidden)."""
        out = self._core.embed(*self._inputs(input_ids, attention_mask, token_type_ids))
        if _is_tensor(input_ids):
            import torch

            return torch.from_numpy(out)
        return out

    def __repr__(self) -> str:
        c = self.config
        return (f"BertEncoder(layers={c['num_hidden_layers']}, hidden={c['hidden_size']}, "
                f"heads={c['num_attention_heads']}, vocab={c['vocab_size']})")
