"""The multi-task model's definition that the PyTorch reference (:mod:`lowbit.models`) and
the Rust runtime (:mod:`lowbit.runtime`) share: its sizes and the file's metadata key. Imports
no torch."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lowbit._lowbit import LowbitValueError
from lowbit.data import ANSWERS, CHARSET, Tokenizer


#: Metadata key of the config in a saved model file.
CONFIG_KEY = "lowbit.multitask"
#: Weight formats :func:`save` writes and the runtime runs.
WEIGHTS = ("f32", "int8", "int4", "int2", "ternary")

_TOKENIZER = Tokenizer()


def _default_text() -> dict[str, Any]:
    return {
        "hidden_size": 96,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "intermediate_size": 192,
    }


@dataclass
class MultiTaskConfig:
    """Sizes of :class:`MultiTaskVLM`. ``text`` holds the BERT text tower's ``BertConfig``
    fields; the ones it leaves out take their defaults (``vocab_size`` and the position table
    follow the scene tokenizer and ``max_text_len``)."""

    image_size: int = 64
    patch_size: int = 8
    channels: int = 3
    width: int = 96
    depth: int = 3
    heads: int = 4
    mlp_ratio: int = 2
    decoder_depth: int = 1
    vqa_depth: int = 1
    vocab_size: int = len(_TOKENIZER)
    max_caption_len: int = 20
    max_question_len: int = 12
    max_text_len: int = 20
    charset: str = CHARSET
    ocr_steps: int = 2
    answers: tuple[str, ...] = ANSWERS
    embed_dim: int = 64
    layer_norm_eps: float = 1e-6
    pad_id: int = _TOKENIZER.pad
    bos_id: int = _TOKENIZER.bos
    eos_id: int = _TOKENIZER.eos
    cls_id: int = _TOKENIZER.cls
    text: dict[str, Any] = field(default_factory=_default_text)

    def __post_init__(self) -> None:
        self.answers = tuple(self.answers)
        t = {
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_text_len,
            "type_vocab_size": 1,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-12,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            **_default_text(),
        }
        t.update(self.text)
        self.text = t
        for name in ("image_size", "patch_size", "channels", "width", "depth", "heads", "mlp_ratio",
                     "decoder_depth", "vqa_depth", "vocab_size", "max_caption_len", "max_question_len",
                     "max_text_len", "ocr_steps", "embed_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise LowbitValueError(f"MultiTaskConfig.{name} must be a positive int, got {v!r}")
        if self.image_size % self.patch_size:
            raise LowbitValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise LowbitValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        if self.text["hidden_size"] % self.text["num_attention_heads"]:
            raise LowbitValueError("text hidden_size is not a multiple of its num_attention_heads")
        if not self.charset or not self.answers:
            raise LowbitValueError("charset and answers must not be empty")
        if not self.layer_norm_eps > 0:
            raise LowbitValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MultiTaskConfig:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise LowbitValueError("a MultiTaskConfig JSON must be an object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LowbitValueError(f"unknown MultiTaskConfig fields: {unknown}")
        return cls(**d)
