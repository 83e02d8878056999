"""The PyTorch modules of :class:`MultiTaskVLM` (the runtime records each layer under the same
name), and greedy / beam decoding."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowbit._lowbit import LowbitValueError
from lowbit._multitask import _TOKENIZER, MultiTaskConfig


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
