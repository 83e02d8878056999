"""A small multi-task vision-language model: one shared ViT encoder, four task heads.

``MultiTaskVLM`` is the PyTorch reference (for training); :class:`lowbit.runtime.MultiTaskModel`
is its Rust twin, loaded from the file :func:`save` writes. Heads:

* **caption**: a pre-LN transformer decoder with causal self-attention and cross-attention to
  the image tokens (greedy or beam decoding);
* **ocr**: CTC over the columns of the patch grid (``ocr_steps`` time steps per column);
* **vqa**: a question encoder (self-attention plus cross-attention to the image tokens), a
  classifier over :data:`lowbit.data.ANSWERS` on its first (``[CLS]``) token;
* **retrieval**: the mean image token projected to ``embed_dim``, and a BERT text tower
  (``transformers.BertModel``, so a pretrained checkpoint's weights can be loaded into it),
  mean-pooled and projected, both L2-normalised, trained contrastively.

``model(images, task=...)`` routes to one head and runs nothing else.

>>> import torch
>>> from lowbit.models import MultiTaskConfig, MultiTaskVLM
>>> cfg = MultiTaskConfig(width=32, depth=1, heads=2, decoder_depth=1, vqa_depth=1, embed_dim=16,
...                       text={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
...                             "intermediate_size": 64})
>>> MultiTaskConfig.from_json(cfg.to_json()) == cfg
True
>>> model = MultiTaskVLM(cfg).eval()
>>> images = torch.rand(2, 3, 64, 64)
>>> model(images, task="ocr").shape          # (batch, 8 columns x 2 steps, 36 characters + blank)
torch.Size([2, 16, 37])
>>> len(model.caption(images, max_len=5)), len(model.vqa(images, ["what color is the circle ?"] * 2))
(2, 2)
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowbit._lowbit import LowbitValueError
from lowbit.data import ANSWERS, CHARSET, SyntheticScenes, Tokenizer

__all__ = [
    "CONFIG_KEY",
    "WEIGHTS",
    "MultiTaskConfig",
    "MultiTaskVLM",
    "evaluate",
    "load",
    "quantize_for_training",
    "save",
    "train",
]

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


# ---------------------------------------------------------------------------------------------
# Modules (the runtime records each under the same name)


class Attention(nn.Module):
    """Multi-head attention with query / key / value / output projections; self-attention, or
    cross-attention over ``context``. ``key_mask`` (batch, keys) is 1 for real keys, 0 for padding."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim or dim, dim)
        self.v = nn.Linear(kv_dim or dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        ctx = x if context is None else context
        (b, lq, d), lk, h = x.shape, ctx.shape[1], self.heads
        q = self.q(x).view(b, lq, h, d // h).transpose(1, 2)
        k = self.k(ctx).view(b, lk, h, d // h).transpose(1, 2)
        v = self.v(ctx).view(b, lk, h, d // h).transpose(1, 2)
        s = (q * (1.0 / math.sqrt(d // h))) @ k.transpose(-1, -2)
        if key_mask is not None:
            s = s + torch.where(key_mask[:, None, None, :] != 0, 0.0, torch.finfo(s.dtype).min)
        if causal:
            hide = torch.ones(lq, lk, dtype=torch.bool, device=x.device).triu(1 + lk - lq)
            s = s.masked_fill(hide, float("-inf"))
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, lq, d)
        return self.out(o)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, optional cross-attention, MLP."""

    def __init__(self, dim: int, heads: int, hidden: int, eps: float, cross: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        if cross:
            self.norm_cross = nn.LayerNorm(dim, eps=eps)
            self.cross = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, hidden)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask=key_mask, causal=causal)
        if context is not None:
            x = x + self.cross(self.norm_cross(x), context)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, c: MultiTaskConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c.channels, c.width, c.patch_size, stride=c.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class VisionEncoder(nn.Module):
    def __init__(self, c: MultiTaskConfig) -> None:
        super().__init__()
        self.patch = PatchEmbed(c)
        self.pos_embed = nn.Parameter(torch.randn(1, c.grid * c.grid, c.width) * 0.02)
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.width * c.mlp_ratio, c.layer_norm_eps)
                                    for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width, eps=c.layer_norm_eps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class TextDecoder(nn.Module):
    """Token and position embeddings, blocks with cross-attention to the image tokens, a norm.
    The caption head runs it causally; the VQA head bidirectionally with a padding mask."""

    def __init__(self, c: MultiTaskConfig, depth: int, max_len: int, out: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(c.vocab_size, c.width)
        self.pos = nn.Embedding(max_len, c.width)
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.width * c.mlp_ratio, c.layer_norm_eps, cross=True)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.head = nn.Linear(c.width, out)

    def hidden(self, image_tokens: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None,
               causal: bool) -> torch.Tensor:
        if ids.shape[1] > self.pos.num_embeddings:
            raise LowbitValueError(f"{ids.shape[1]} tokens exceed the maximum of {self.pos.num_embeddings}")
        x = self.embed(ids) + self.pos.weight[: ids.shape[1]]
        for blk in self.blocks:
            x = blk(x, image_tokens, key_mask=mask, causal=causal)
        return self.norm(x)


class CaptionHead(TextDecoder):
    def __init__(self, c: MultiTaskConfig) -> None:
        super().__init__(c, c.decoder_depth, c.max_caption_len, c.vocab_size)

    def forward(self, image_tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(image_tokens, ids, None, causal=True))


class VQAHead(TextDecoder):
    def __init__(self, c: MultiTaskConfig) -> None:
        super().__init__(c, c.vqa_depth, c.max_question_len, len(c.answers))

    def forward(self, image_tokens: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(image_tokens, ids, mask, causal=False)[:, 0])


class OCRHead(nn.Module):
    """Per column of the patch grid, the column's tokens (top to bottom) concatenated and
    projected to ``ocr_steps`` CTC frames of ``len(charset) + 1`` classes (0 is the blank)."""

    def __init__(self, c: MultiTaskConfig) -> None:
        super().__init__()
        self.grid, self.steps, self.classes = c.grid, c.ocr_steps, len(c.charset) + 1
        self.head = nn.Linear(c.grid * c.width, c.ocr_steps * self.classes)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        b, _, d = image_tokens.shape
        cols = image_tokens.view(b, self.grid, self.grid, d).transpose(1, 2).reshape(b, self.grid, self.grid * d)
        return self.head(cols).reshape(b, self.grid * self.steps, self.classes)


def _mean_pool(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean(1)
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(1) / m.sum(1).clamp(min=1e-9)


class RetrievalHead(nn.Module):
    def __init__(self, c: MultiTaskConfig) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        self.image_proj = nn.Linear(c.width, c.embed_dim)
        self.text = BertModel(BertConfig(**c.text), add_pooling_layer=False)
        self.text_proj = nn.Linear(c.text["hidden_size"], c.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed_image(self, image_tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(image_tokens.mean(1)), dim=-1)

    def embed_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.text(input_ids=ids, attention_mask=mask).last_hidden_state
        return F.normalize(self.text_proj(_mean_pool(h, mask)), dim=-1)


TASKS = ("caption", "ocr", "vqa", "image", "text")


class MultiTaskVLM(nn.Module):
    """The multi-task model (see the module docstring). ``forward(images, task, ids, mask)``:

    * ``"caption"``: next-token logits (batch, len, vocab) for the decoder input ``ids``
      (``[BOS]`` + caption, teacher forcing);
    * ``"ocr"``: CTC logits (batch, frames, len(charset) + 1);
    * ``"vqa"``: answer logits (batch, len(answers)) for question ``ids`` / ``mask`` (``[CLS]`` first);
    * ``"image"`` / ``"text"``: L2-normalised retrieval embeddings (``"text"`` takes ``ids`` /
      ``mask`` and no images).
    """

    def __init__(self, config: MultiTaskConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or MultiTaskConfig()
        self.tokenizer = _TOKENIZER
        self.vision = VisionEncoder(c)
        self.caption_head = CaptionHead(c)
        self.ocr_head = OCRHead(c)
        self.vqa_head = VQAHead(c)
        self.retrieval = RetrievalHead(c)

    def _images(self, images: Any) -> torch.Tensor:
        x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
        c = self.config
        if x.ndim != 4 or tuple(x.shape[1:]) != (c.channels, c.image_size, c.image_size):
            raise LowbitValueError(f"images must be (batch, {c.channels}, {c.image_size}, {c.image_size}), "
                                   f"got {tuple(x.shape)}")
        return x.to(self.vision.pos_embed.dtype)

    def forward(self, images: Any = None, task: str = "caption", ids: Any = None, mask: Any = None) -> torch.Tensor:
        if task not in TASKS:
            raise LowbitValueError(f"task must be one of {TASKS}, got {task!r}")
        if task == "text":
            return self.retrieval.embed_text(_as_ids(ids), _as_ids(mask if mask is not None else ids != self.config.pad_id))
        tokens = self.vision(self._images(images))
        if task == "caption":
            return self.caption_head(tokens, _as_ids(ids))
        if task == "ocr":
            return self.ocr_head(tokens)
        if task == "vqa":
            ids = _as_ids(ids)
            return self.vqa_head(tokens, ids, _as_ids(mask) if mask is not None else (ids != self.config.pad_id).long())
        return self.retrieval.embed_image(tokens)

    # -- the user-facing tasks, the same API as lowbit.runtime.MultiTaskModel --

    @torch.no_grad()
    def caption(self, images: Any, max_len: int | None = None, beam: int = 1) -> list[str]:
        """Captions by greedy (``beam=1``) or beam search decoding."""
        c = self.config
        max_len = c.max_caption_len if max_len is None else max_len
        tokens = self.vision(self._images(images))

        def step(rows: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
            return self.caption_head(tokens[rows], prefix)[:, -1].log_softmax(-1)

        ids = _decode(step, tokens.shape[0], c, max_len, beam)
        return [self.tokenizer.decode(s) for s in ids]

    @torch.no_grad()
    def ocr(self, images: Any) -> list[str]:
        """Greedy CTC decoding: best class per frame, repeats merged, blanks dropped."""
        return [_ctc_string(r, self.config.charset) for r in self(images, "ocr").argmax(-1).tolist()]

    @torch.no_grad()
    def vqa(self, images: Any, questions: Sequence[str]) -> list[str]:
        ids, mask = self.encode_questions(questions)
        best = self(images, "vqa", ids, mask).argmax(-1).tolist()
        return [self.config.answers[i] for i in best]

    @torch.no_grad()
    def embed_images(self, images: Any) -> torch.Tensor:
        return self(images, "image")

    @torch.no_grad()
    def embed_texts(self, ids: Any, mask: Any = None) -> torch.Tensor:
        if isinstance(ids, (list, tuple)) and ids and isinstance(ids[0], str):
            ids, mask = self.encode_texts(ids)
        return self(None, "text", ids, mask)

    @torch.no_grad()
    def retrieve(self, images: Any, texts: Sequence[str], k: int = 1) -> torch.Tensor:
        """Indices (batch, k) of the ``k`` texts most similar to each image."""
        sim = self.embed_images(images) @ self.embed_texts(list(texts)).T
        return sim.topk(min(k, len(texts)), dim=-1).indices

    def encode_questions(self, questions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer.batch(list(questions), self.config.max_question_len, cls=True)
        return torch.from_numpy(ids), torch.from_numpy(mask)

    def encode_texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer.batch(list(texts), self.config.max_text_len, cls=True)
        return torch.from_numpy(ids), torch.from_numpy(mask)


def _as_ids(x: Any) -> torch.Tensor:
    if x is None:
        raise LowbitValueError("this task needs ids")
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.dtype == torch.bool:
        t = t.long()
    if t.is_floating_point():
        raise LowbitValueError(f"ids and masks must hold integers, got {t.dtype}")
    return t.long()


def _ctc_string(frames: Iterable[int], charset: str) -> str:
    out, prev = [], 0
    for f in frames:
        if f != prev and f != 0:
            out.append(charset[f - 1])
        prev = f
    return "".join(out)


def _decode(step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch: int, c: MultiTaskConfig,
            max_len: int, beam: int) -> list[list[int]]:
    """Greedy or beam search over ``step(rows, prefix) -> log-probs of the next token`` (rows
    index the images; one call per step decodes every image). A beam keeps the ``beam`` best
    prefixes by summed log-probability, finished ones (``[EOS]``) included; the answer is the
    best by mean log-probability per token. The runtime decodes with the same rules."""
    if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
        raise LowbitValueError(f"beam must be a positive int, got {beam!r}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= c.max_caption_len:
        raise LowbitValueError(f"max_len must be between 1 and {c.max_caption_len}, got {max_len!r}")
    hyps: list[list[tuple[list[int], float, bool]]] = [[([c.bos_id], 0.0, False)] for _ in range(batch)]
    for _ in range(max_len):
        # Every live prefix of every image in one decoder call (all have the same length).
        live = [(img, h) for img in range(batch) for h in hyps[img] if not h[2]]
        if not live:
            break
        logp = step(torch.tensor([img for img, _ in live]), torch.tensor([h[0] for _, h in live])).double()
        top = logp.topk(min(beam, logp.shape[1]), dim=-1)
        cands = [[h for h in hyps[img] if h[2]] for img in range(batch)]
        for (img, (seq, score, _)), vals, idx in zip(live, top.values.tolist(), top.indices.tolist()):
            for v, t in zip(vals, idx):
                cands[img].append((seq + [t], score + v, t == c.eos_id))
        for img in range(batch):
            cands[img].sort(key=lambda h: -h[1])
            hyps[img] = cands[img][:beam]
    return [max(h, key=lambda h: h[1] / (len(h[0]) - 1))[0][1:] for h in hyps]


# ---------------------------------------------------------------------------------------------
# Files


def _spec(weights: str) -> Any:
    from lowbit._lowbit import QuantSpec

    return {
        "int8": QuantSpec(8, symmetric=True, granularity="channel", axis=0),
        "int4": QuantSpec(4, symmetric=True, granularity="group", group_size=32),
        "int2": QuantSpec(2, symmetric=False, granularity="group", group_size=32),
    }[weights]


def _check_weights(weights: str) -> None:
    if weights not in WEIGHTS:
        raise LowbitValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")


def _linear_weights(model: nn.Module) -> set[str]:
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _ternary_tensor(w: np.ndarray) -> Any:
    """BitNet absmean ternary codes of ``w`` as a 2-bit per-tensor QuantizedTensor (scale = absmean)."""
    from lowbit._lowbit import QuantSpec
    from lowbit._quant import quantize
    from lowbit.bitnet import ternary_quantize

    codes, s = ternary_quantize(w)
    s = np.float32(s)
    return quantize(codes.astype(np.float32) * s, QuantSpec(2, symmetric=True, granularity="tensor"),
                    scales=np.array(s), zero_points=np.array(0, dtype=np.int32))


def save(model: MultiTaskVLM, path: str | os.PathLike[str], weights: str = "f32") -> dict[str, int]:
    """Write ``model`` as one safetensors file with its config in the metadata, atomically and
    with a ``lowbit.sha256`` that :func:`load` and the runtime check (see :func:`lowbit.save_checkpoint`).

    ``weights`` other than ``"f32"`` stores every linear layer quantized: ``"int8"`` symmetric
    per output channel, ``"int4"`` symmetric per group of 32 inputs, ``"int2"`` asymmetric per
    group of 32, ``"ternary"`` BitNet b1.58 absmean codes at 2 bits (the runtime runs these on the
    packed ternary kernel). Embeddings, positions and the patch embedding are then stored int8
    per row / channel, norms and biases float16. Returns ``{"bytes": file size, "tensors": n}``.
    """
    from lowbit._lowbit import QuantSpec
    from lowbit._quant import quantize, save_checkpoint

    _check_weights(weights)
    state = {k: v.detach().float().cpu().contiguous().numpy() for k, v in model.state_dict().items()}
    meta = {CONFIG_KEY: model.config.to_json(), "lowbit.weights": weights}
    if weights != "f32":
        linear = _linear_weights(model)
        ternary = []
        for name, w in state.items():
            if name in linear:
                state[name] = _ternary_tensor(w) if weights == "ternary" else quantize(w, _spec(weights))
                if weights == "ternary":
                    ternary.append(name)
            elif w.ndim >= 2:
                axis = 1 if name == "vision.pos_embed" else 0
                state[name] = quantize(w, QuantSpec(8, symmetric=True, granularity="channel", axis=axis))
            elif w.ndim == 1:
                state[name] = w.astype(np.float16)
        if ternary:
            meta["lowbit.ternary"] = json.dumps(ternary)
    save_checkpoint(path, state, meta)
    return {"bytes": os.path.getsize(path), "tensors": len(state)}


def load(path: str | os.PathLike[str]) -> MultiTaskVLM:
    """The PyTorch model of a file :func:`save` wrote (quantized tensors dequantized: a float
    model with the deployed weights; ternary layers then run as float products, not BitLinear)."""
    from lowbit._lowbit import QuantizedTensor
    from lowbit._quant import checkpoint_metadata, load_quantized

    meta = checkpoint_metadata(path)
    if CONFIG_KEY not in meta:
        raise LowbitValueError(f"{os.fspath(path)} has no {CONFIG_KEY!r} metadata: not a lowbit multi-task model")
    model = MultiTaskVLM(MultiTaskConfig.from_json(meta[CONFIG_KEY]))
    tensors = {k: torch.from_numpy(np.array(v.dequantize() if isinstance(v, QuantizedTensor) else v, dtype=np.float32))
               for k, v in load_quantized(path).items()}
    expected = model.state_dict()
    for k, v in tensors.items():
        if k in expected and tuple(v.shape) != tuple(expected[k].shape):
            tensors[k] = v.reshape(expected[k].shape)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise LowbitValueError(f"{os.fspath(path)}: missing tensors {missing}, unexpected {unexpected}")
    model.load_state_dict(tensors)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Quantization-aware training


class _QuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, spec: Any) -> torch.Tensor:  # noqa: ANN401
        from lowbit._quant import quantize

        return torch.from_numpy(quantize(w.detach().float().cpu().numpy(), spec).dequantize()).to(w)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:  # noqa: ANN401
        return g, None


class QATLinear(nn.Linear):
    """A linear layer whose forward uses its weights as :func:`save` stores them for ``weights``
    (lowbit's quantizer, min-max qparams recomputed every step), with a straight-through gradient."""

    def __init__(self, lin: nn.Linear, weights: str) -> None:
        super().__init__(lin.in_features, lin.out_features, lin.bias is not None)
        self.weights = weights
        self.spec = _spec(weights)
        with torch.no_grad():
            self.weight.copy_(lin.weight)
            if lin.bias is not None:
                self.bias.copy_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _QuantSTE.apply(self.weight, self.spec), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weights={self.weights}"


def quantize_for_training(model: MultiTaskVLM, weights: str) -> MultiTaskVLM:
    """A copy of ``model`` whose linear layers train as ``weights`` deploys them:
    :class:`lowbit.torch.BitLinear` for ``"ternary"`` (absmean weights, int8 activations, STE),
    :class:`QATLinear` for the integer formats. Its state dict keeps the latent float weights
    under the same names, so :func:`save` writes it like the float model."""
    import copy

    from lowbit.torch import BitLinear

    _check_weights(weights)
    if weights == "f32":
        return copy.deepcopy(model)
    q = copy.deepcopy(model)
    for name, m in list(q.named_modules()):
        if isinstance(m, nn.Linear) and type(m) is nn.Linear:
            parent, _, leaf = name.rpartition(".")
            new = BitLinear.from_linear(m) if weights == "ternary" else QATLinear(m, weights)
            setattr(q.get_submodule(parent) if parent else q, leaf, new)
    return q


# ---------------------------------------------------------------------------------------------
# Training and evaluation


class _Batches:
    """The dataset rendered once into tensors; batches pick one question per scene at random."""

    def __init__(self, data: Any, c: MultiTaskConfig) -> None:
        items = list(data)
        if not items:
            raise LowbitValueError("the training data is empty")
        tok = _TOKENIZER
        self.images = torch.from_numpy(np.stack([s["image"] for s in items]))
        self.captions = [s["caption"] for s in items]
        cap, _ = tok.batch(self.captions, c.max_caption_len + 1, bos=True, eos=True)
        self.caption_ids = torch.from_numpy(cap)
        self.text_ids = [torch.from_numpy(s["text_ids"]) for s in items]
        self.qa = [s["qa"] for s in items]
        txt, txt_mask = tok.batch(self.captions, c.max_text_len, cls=True)
        self.texts, self.text_mask = torch.from_numpy(txt), torch.from_numpy(txt_mask)
        self.answer_index = {a: i for i, a in enumerate(c.answers)}
        self.c = c

    def __len__(self) -> int:
        return len(self.captions)

    def sample(self, idx: torch.Tensor, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        qa = [self.qa[i][rng.integers(len(self.qa[i]))] for i in idx.tolist()]
        q, qm = _TOKENIZER.batch([x for x, _ in qa], self.c.max_question_len, cls=True)
        same = [[self.captions[i] == self.captions[j] for j in idx.tolist()] for i in idx.tolist()]
        return {
            "images": self.images[idx],
            "caption": self.caption_ids[idx],
            "ocr": torch.cat([self.text_ids[i] for i in idx.tolist()]),
            "ocr_len": torch.tensor([len(self.text_ids[i]) for i in idx.tolist()]),
            "question": torch.from_numpy(q),
            "question_mask": torch.from_numpy(qm),
            "answer": torch.tensor([self.answer_index[a] for _, a in qa]),
            "text": self.texts[idx],
            "text_mask": self.text_mask[idx],
            "same": torch.tensor(same, dtype=torch.float32),
        }


LOSS_WEIGHTS = {"caption": 1.0, "ocr": 1.0, "vqa": 1.0, "retrieval": 0.5}


def multitask_loss(model: MultiTaskVLM, b: dict[str, torch.Tensor],
                   weights: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum of the four task losses on one batch (one shared encoder pass): caption
    cross-entropy (teacher forcing), OCR CTC, VQA cross-entropy, and a symmetric contrastive
    loss whose targets spread over every text equal to the image's own caption."""
    w = {**LOSS_WEIGHTS, **(weights or {})}
    pad = model.config.pad_id
    tokens = model.vision(b["images"])
    cap = b["caption"]
    logits = model.caption_head(tokens, cap[:, :-1])
    l_cap = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), cap[:, 1:].reshape(-1), ignore_index=pad)
    frames = model.ocr_head(tokens).log_softmax(-1).transpose(0, 1)
    l_ocr = F.ctc_loss(frames, b["ocr"], torch.full((frames.shape[1],), frames.shape[0]), b["ocr_len"],
                       zero_infinity=True)
    l_vqa = F.cross_entropy(model.vqa_head(tokens, b["question"], b["question_mask"]), b["answer"])
    img = model.retrieval.embed_image(tokens)
    txt = model.retrieval.embed_text(b["text"], b["text_mask"])
    sim = img @ txt.T * model.retrieval.logit_scale.clamp(max=math.log(100)).exp()
    target = b["same"] / b["same"].sum(1, keepdim=True)
    l_ret = (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target)) / 2
    parts = {"caption": l_cap, "ocr": l_ocr, "vqa": l_vqa, "retrieval": l_ret}
    total = torch.stack([w[k] * v for k, v in parts.items()]).sum()
    return total, {k: float(v.detach()) for k, v in parts.items()}


def train(
    config: MultiTaskConfig | None = None,
    data: Any = None,
    steps: int = 1000,
    batch_size: int = 32,
    lr: float = 3e-3,
    loss_weights: dict[str, float] | None = None,
    qat: str | None = None,
    init: MultiTaskVLM | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 500,
    seed: int = 0,
    progress: bool = True,
) -> MultiTaskVLM:
    """Multi-task training: every step runs the shared encoder once and sums the four task
    losses (``loss_weights`` overrides :data:`LOSS_WEIGHTS`), AdamW with warm-up and cosine decay.

    ``data`` is a :class:`lowbit.data.SyntheticScenes` (or any sequence of its items; default
    2000 scenes of seed 0). ``init`` continues from a model instead of a fresh one. ``qat``
    (``"int8"``, ``"int4"``, ``"int2"``, ``"ternary"``) fine-tunes through
    :func:`quantize_for_training`, so the weights learn to survive their deployed format.
    ``checkpoint`` saves the (float, latent) weights there every ``checkpoint_every`` steps and
    at the end. A progress bar (tqdm) shows the losses unless ``progress=False``.

    >>> from lowbit.data import SyntheticScenes
    >>> cfg = MultiTaskConfig(width=32, depth=1, heads=2, decoder_depth=1, vqa_depth=1, embed_dim=16,
    ...                       text={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
    ...                             "intermediate_size": 64})
    >>> model = train(cfg, SyntheticScenes(seed=0, n=16), steps=2, batch_size=8, progress=False)
    >>> type(model).__name__
    'MultiTaskVLM'
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise LowbitValueError(f"steps must be a non-negative int, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LowbitValueError(f"batch_size must be a positive int, got {batch_size!r}")
    torch.manual_seed(seed)
    model = init if init is not None else MultiTaskVLM(config or MultiTaskConfig())
    c = model.config
    if config is not None and init is not None and config != c:
        raise LowbitValueError("config and init.config differ")
    data = data if data is not None else SyntheticScenes(seed=0, n=2000, image_size=c.image_size)
    batches = _Batches(data, c)
    net = quantize_for_training(model, qat) if qat else model
    net.train()
    decay = [p for n, p in net.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in net.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}], lr=lr)
    warm = max(1, min(100, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
    rng = np.random.default_rng(seed)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="training" + (f" ({qat} QAT)" if qat else ""), unit="step")
        except ImportError:
            pass
    for step in range(steps):
        idx = torch.from_numpy(rng.choice(len(batches), min(batch_size, len(batches)), replace=False))
        loss, parts = multitask_loss(net, batches.sample(idx, rng), loss_weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.2f}" for k, v in parts.items()})
        if checkpoint is not None and (step + 1) % checkpoint_every == 0:
            save(_latent(net, model), checkpoint)
    if bar is not None:
        bar.close()
    out = _latent(net, model).eval()
    if checkpoint is not None:
        save(out, checkpoint)
    return out


def _latent(net: nn.Module, model: MultiTaskVLM) -> MultiTaskVLM:
    """``model`` carrying ``net``'s weights (``net`` is ``model`` or its QAT copy)."""
    if net is not model:
        model.load_state_dict(net.state_dict())
    return model


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _np_rows(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def evaluate(model: Any, data: Any, batch_size: int = 64, beam: int = 1) -> dict[str, float]:
    """Task metrics in percent on ``data`` for a :class:`MultiTaskVLM` or a
    :class:`lowbit.runtime.MultiTaskModel` (the same calls on both):

    * ``caption_exact``: captions equal to the reference, word for word;
    * ``ocr_char_acc``: ``1 - edit distance / length`` of the OCR string, floored at 0, averaged;
    * ``vqa_acc``: every question of every scene;
    * ``retrieval_r1``: image-to-text recall@1 among all the scenes' captions (a retrieved
      caption counts when its text equals the image's own).
    """
    items = list(data)
    if not items:
        raise LowbitValueError("the evaluation data is empty")
    cap = ocr = vqa_ok = vqa_n = 0.0
    img_emb = []
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        images = np.stack([x["image"] for x in chunk])
        cap += sum(p == x["caption"] for p, x in zip(model.caption(images, beam=beam), chunk))
        ocr += sum(max(0.0, 1 - _edit_distance(p, x["text"]) / len(x["text"])) for p, x in zip(model.ocr(images), chunk))
        qs = [(i, q, a) for i, x in enumerate(chunk) for q, a in x["qa"]]
        answers = model.vqa(images[[i for i, _, _ in qs]], [q for _, q, _ in qs])
        vqa_ok += sum(p == a for p, (_, _, a) in zip(answers, qs))
        vqa_n += len(qs)
        img_emb.append(_np_rows(model.embed_images(images)))
    captions = [x["caption"] for x in items]
    uniq = sorted(set(captions))
    txt = np.concatenate([_np_rows(model.embed_texts(uniq[s:s + batch_size])) for s in range(0, len(uniq), batch_size)])
    best = (np.concatenate(img_emb) @ txt.T).argmax(1)
    r1 = sum(uniq[b] == c for b, c in zip(best, captions))
    n = len(items)
    return {"caption_exact": 100 * cap / n, "ocr_char_acc": 100 * ocr / n, "vqa_acc": 100 * vqa_ok / vqa_n,
            "retrieval_r1": 100 * r1 / n}
