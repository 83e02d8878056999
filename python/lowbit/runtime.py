"""The Rust runtime: models run on candle-core tensors from safetensors checkpoints, with
quantized linear layers chosen at load time and every layer's output recordable by name:
:class:`BertEncoder` (Hugging Face BERT checkpoints) and :class:`MultiTaskModel` (the twin of
:class:`lowbit.models.MultiTaskVLM`).

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
from lowbit._validate import int_arg, is_tensor, path_arg

__all__ = ["BertEncoder", "MultiTaskModel"]


def _ids(x: Any, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if is_tensor(x):
        x = x.detach().cpu().numpy()
    if x is None or isinstance(x, (str, bytes, dict)):
        raise LowbitTypeError(f"{name} must be an integer array, got {type(x).__name__}")
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
    and ``"int4"`` (symmetric, groups of 32 inputs), quantized with lowbit's ``QuantSpec`` at load;
    ``"ternary"`` (BitNet b1.58 absmean weights at 2 bits, int8 activations per token, the packed
    integer kernel); ``"binary"`` (XNOR-Net: signs of the centred weights with per-row scales,
    activations binarized per token, the XNOR-popcount kernel).
    ``act_bits`` (2..8) quantizes the input of every float linear layer per token (absmax,
    BitNet's recipe). With ``act_bits=8``, int8 and int4 weights run the integer GEMM on their
    codes (W8A8 / W4A8: exact int32 sums per group, a float rescale; int4 kept at half a byte per
    weight); without it, or with fewer bits, they are dequantized once for the float GEMM.
    Embeddings, norms and the pooler stay float32.

    A quantized checkpoint written by ``lowbit quantize`` loads directly: its tensors are used as
    stored (never re-quantized: the integer GEMM on their codes with ``act_bits=8`` where they are
    quantized per tensor, per output channel or per group of inputs, at any width, else dequantized
    once); ``weights`` then applies only to linear weights the file keeps in float.
    """

    WEIGHTS = ("f32", "int8", "int4", "ternary", "binary")

    def __init__(self, core: Any, path: str) -> None:
        if not isinstance(core, _lowbit.BertCore):
            raise LowbitTypeError(f"core must be a BertCore (use BertEncoder.load), got {type(core).__name__}")
        self._core = core
        self.path = path

    @classmethod
    def load(cls, path: str | os.PathLike[str], weights: str = "f32", act_bits: int | None = None) -> BertEncoder:
        """Load ``config.json`` + ``model.safetensors`` from a folder (what
        ``BertModel.save_pretrained`` writes), or from a folder whose only ``.safetensors`` file
        is another (such as the ``model.q4.safetensors`` ``lowbit quantize`` wrote there), or a
        ``.safetensors`` file with ``config.json`` beside it; a folder that holds neither gets
        an error naming the files it found. Names with the ``bert.`` prefix of the task models
        load too (their heads are ignored); missing, unexpected or misshapen tensors are listed in
        one error. Every numeric field of ``config.json`` is checked (sizes from 1 to 2^31 - 1,
        ``num_hidden_layers`` from 0, ``layer_norm_eps`` positive and finite in float32,
        ``hidden_size`` a multiple of ``num_attention_heads``): a bad one raises
        ``LowbitValueError`` naming it."""
        path, act_bits = _load_args(path, weights, act_bits)
        return cls(_lowbit.BertCore.load(path, weights, act_bits), path)

    @property
    def config(self) -> dict[str, Any]:
        return self._core.config

    def _inputs(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
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
        torch_in = is_tensor(input_ids)
        hidden, rec = self._core.forward(*self._inputs(input_ids, attention_mask, token_type_ids), bool(record))
        out = _torch_out(hidden, torch_in)
        if rec is not None:
            return out, {k: _torch_out(v, torch_in) for k, v in rec.items()}
        return out

    __call__ = forward

    def embed(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> Any:
        """Sentence embeddings: the mean of the hidden states over unmasked tokens, L2-normalised
        (sentence-transformers' mean pooling), float32 (batch, hidden). Trailing columns that
        no row attends to are not computed, so a batch padded far beyond its longest text costs
        what its longest text costs."""
        out = self._core.embed(*self._inputs(input_ids, attention_mask, token_type_ids))
        if is_tensor(input_ids):
            import torch

            return torch.from_numpy(out)
        return out

    def __repr__(self) -> str:
        c = self.config
        return (f"BertEncoder(layers={c['num_hidden_layers']}, hidden={c['hidden_size']}, "
                f"heads={c['num_attention_heads']}, vocab={c['vocab_size']})")


def _load_args(path: Any, weights: Any, act_bits: Any) -> tuple[str, int | None]:
    if not isinstance(weights, str):
        raise LowbitTypeError(f"weights must be a string, got {type(weights).__name__}")
    return path_arg(path, "path"), None if act_bits is None else int_arg(act_bits, "act_bits", 2, 8)


def _strings(texts: Any, what: str) -> list[str]:
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise LowbitTypeError(f"{what} must be a list of strings, got {type(texts).__name__}")
    return list(texts)


def _torch_out(x: np.ndarray, torch_in: bool) -> Any:
    if torch_in:
        import torch

        return torch.from_numpy(x)
    return x


class MultiTaskModel:
    """The Rust twin of :class:`lowbit.models.MultiTaskVLM`, loaded from the file
    :func:`lowbit.models.save` writes: the same ``forward(images, task, ids, mask)`` and the
    same user-facing tasks (``caption``, ``ocr``, ``vqa``, ``embed_images``, ``embed_texts``,
    ``retrieve``), each running only its own head.

    ``weights`` picks every ``nn.Linear`` of the model (heads, projections and the BERT text
    tower's included), as :class:`BertEncoder` does; the patch convolution, embeddings, norms
    and ``pos_embed`` stay float32 (what :func:`lowbit.crossval.simulate` quantizes too).
    Tensors the file stores quantized are used as stored, those it lists as ternary on the
    packed ternary kernel.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from lowbit import models
    >>> from lowbit.runtime import MultiTaskModel
    >>> cfg = models.MultiTaskConfig(width=32, depth=1, heads=2, decoder_depth=1, vqa_depth=1, embed_dim=16,
    ...                              text={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
    ...                                    "intermediate_size": 64})
    >>> torch_model = models.MultiTaskVLM(cfg).eval()
    >>> path = os.path.join(tempfile.mkdtemp(), "vlm.safetensors")
    >>> _ = models.save(torch_model, path)
    >>> model = MultiTaskModel.load(path)
    >>> images = torch.rand(2, 3, 64, 64)
    >>> model(images, task="ocr").shape          # (batch, 8 columns x 2 steps, 36 characters + blank)
    torch.Size([2, 16, 37])
    >>> model.caption(images, max_len=5, beam=3) == torch_model.caption(images, max_len=5, beam=3)
    True
    >>> model.retrieve(images, ["a red circle", "two blue squares"], k=2).shape
    torch.Size([2, 2])
    >>> out, layers = model(images, task="image", record=True)
    >>> sorted(n for n in layers if not n.startswith("vision."))
    ['retrieval.image_proj', 'vision']
    >>> _ = models.save(torch_model, path, weights="ternary")   # linear layers on the ternary kernel
    >>> MultiTaskModel.load(path).vqa(images, ["what color is the circle ?"] * 2)[0] in cfg.answers
    True
    """

    WEIGHTS = ("f32", "int8", "int4", "ternary", "binary")
    TASKS = ("caption", "ocr", "vqa", "image", "text")

    def __init__(self, core: Any, path: str) -> None:
        import json

        from lowbit.data import Tokenizer

        if not isinstance(core, _lowbit.MultiTaskCore):
            raise LowbitTypeError(f"core must be a MultiTaskCore (use MultiTaskModel.load), got {type(core).__name__}")
        self._core = core
        self.path = path
        self._cfg = json.loads(core.config_json)
        self.tokenizer = Tokenizer()

    @classmethod
    def load(cls, path: str | os.PathLike[str], weights: str = "f32", act_bits: int | None = None) -> MultiTaskModel:
        """Load a model file; its config comes from the ``lowbit.multitask`` metadata. Missing,
        unexpected or misshapen tensors are listed in one error."""
        path, act_bits = _load_args(path, weights, act_bits)
        return cls(_lowbit.MultiTaskCore.load(path, weights, act_bits), path)

    @property
    def config(self) -> Any:
        """The :class:`lowbit.models.MultiTaskConfig` of the file."""
        from lowbit._multitask import MultiTaskConfig

        return MultiTaskConfig.from_json(self._core.config_json)

    @property
    def logit_scale(self) -> float:
        return self._core.logit_scale

    def _images(self, images: Any) -> np.ndarray:
        if is_tensor(images):
            images = images.detach().cpu().float().numpy()
        if images is None or isinstance(images, (str, bytes, dict)):
            raise LowbitTypeError(f"images must be a float array, got {type(images).__name__}")
        x = np.asarray(images)
        c = self._cfg
        want = (c["channels"], c["image_size"], c["image_size"])
        if x.ndim != 4 or x.shape[1:] != want:
            raise LowbitValueError(f"images must be (batch, {want[0]}, {want[1]}, {want[2]}), got {x.shape}")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer) or x.dtype == bool):
            raise LowbitTypeError(f"images must hold numbers, got {x.dtype}")
        return np.ascontiguousarray(x, dtype=np.float32)

    def forward(self, images: Any = None, task: str = "caption", ids: Any = None, mask: Any = None,
                record: bool = False) -> Any:
        """As :meth:`lowbit.models.MultiTaskVLM.forward`: ``"caption"`` next-token logits
        (batch, len, vocab) for ``ids``; ``"ocr"`` CTC logits (batch, frames, classes);
        ``"vqa"`` answer logits (batch, answers) for question ``ids`` / ``mask`` (default
        ``ids != pad``); ``"image"`` / ``"text"`` L2-normalised embeddings (``"text"`` takes
        ``ids`` / ``mask`` and no images). A torch tensor in gives torch tensors out.

        With ``record=True`` returns ``(out, layers)``: the output of every layer that ran, by
        the name of the matching torch module (``"vision.blocks.0.attn"``, ``"caption_head.head"``,
        ``"retrieval.text.encoder.layer.0"``, ...).
        """
        if task not in self.TASKS:
            raise LowbitValueError(f"task must be one of {self.TASKS}, got {task!r}")
        torch_in = is_tensor(ids) or (task != "text" and is_tensor(images))
        needs_ids = task in ("caption", "vqa", "text")
        if needs_ids and ids is None:
            raise LowbitValueError("this task needs ids")
        a_ids = _ids(ids, "ids") if needs_ids else None
        a_mask = _ids(mask, "mask", a_ids.shape) if a_ids is not None and mask is not None and task in ("vqa", "text") else None
        a_img = None if task == "text" else self._images(images)
        out, rec = self._core.forward(task, a_img, a_ids, a_mask, bool(record))
        out = _torch_out(out, torch_in)
        if rec is not None:
            return out, {k: _torch_out(v, torch_in) for k, v in rec.items()}
        return out

    __call__ = forward

    def caption(self, images: Any, max_len: int | None = None, beam: int = 1) -> list[str]:
        """Captions by greedy (``beam=1``) or beam search decoding, with the rules of
        :meth:`lowbit.models.MultiTaskVLM.caption` (``max_len`` new tokens at most, default
        ``max_caption_len``)."""
        max_len = int_arg(self._cfg["max_caption_len"] if max_len is None else max_len, "max_len", 1)
        ids = self._core.caption(self._images(images), max_len, int_arg(beam, "beam", 1))
        return [self.tokenizer.decode(s) for s in ids]

    def ocr(self, images: Any) -> list[str]:
        """Greedy CTC decoding: best class per frame, repeats merged, blanks dropped."""
        charset = self._cfg["charset"]
        return ["".join(charset[i - 1] for i in row) for row in self._core.ocr(self._images(images))]

    def vqa(self, images: Any, questions: Any) -> list[str]:
        """One answer (from ``config.answers``) per image and question."""
        ids, mask = self.encode_questions(questions)
        if not len(ids):
            raise LowbitValueError("questions is empty: give one question per image")
        best = np.asarray(self.forward(self._images(images), "vqa", ids, mask)).argmax(-1)
        return [self._cfg["answers"][i] for i in best.tolist()]

    def embed_images(self, images: Any) -> Any:
        return self.forward(images, "image")

    def embed_texts(self, ids: Any, mask: Any = None) -> Any:
        """Text embeddings of token ids (and mask), or of a list of strings (tokenized as
        :meth:`encode_texts`). Like :meth:`vqa`'s question encoder, the text tower skips the
        trailing columns no row attends to (``record=True`` runs them all)."""
        if isinstance(ids, (list, tuple)) and ids and isinstance(ids[0], str):
            ids, mask = self.encode_texts(ids)
        return self.forward(None, "text", ids, mask)

    def retrieve(self, images: Any, texts: Any, k: int = 1) -> Any:
        """Indices (batch, k) of the ``k`` texts most similar to each image, best first."""
        texts = _strings(texts, "texts")
        if not texts:
            raise LowbitValueError("retrieve needs at least one text in texts")
        k = int_arg(k, "k", 1, None)
        sim = np.asarray(self.embed_images(self._images(images))) @ np.asarray(self.embed_texts(texts)).T
        top = np.argsort(-sim, axis=-1, kind="stable")[:, : min(k, len(texts))]
        return _torch_out(np.ascontiguousarray(top), is_tensor(images))

    def encode_questions(self, questions: Any) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) int64 (len(questions), max_question_len), ``[CLS]`` first."""
        return self.tokenizer.batch(_strings(questions, "questions"), self._cfg["max_question_len"], cls=True)

    def encode_texts(self, texts: Any) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) int64 (len(texts), max_text_len), ``[CLS]`` first."""
        return self.tokenizer.batch(_strings(texts, "texts"), self._cfg["max_text_len"], cls=True)

    def __repr__(self) -> str:
        c = self._cfg
        return (f"MultiTaskModel(image_size={c['image_size']}, patch_size={c['patch_size']}, width={c['width']}, "
                f"depth={c['depth']}, heads={c['heads']})")
