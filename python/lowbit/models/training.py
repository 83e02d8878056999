"""Multi-task training on synthetic scenes."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowbit._lowbit import LowbitValueError
from lowbit._multitask import _TOKENIZER, MultiTaskConfig
from lowbit._validate import int_arg
from lowbit.data import SyntheticScenes
from lowbit.models.files import save
from lowbit.models.modules import MultiTaskVLM
from lowbit.models.qat import quantize_for_training


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


def calibration_batches(data: Any, config: MultiTaskConfig | None = None, batch_size: int = 64) -> list[dict[str, Any]]:
    """Inputs of every task of :class:`MultiTaskVLM` for scenes ``data`` (keyword batches, as
    :func:`lowbit.ptq.quantize_model` and :func:`lowbit.torch.calibrate` take them): for each
    chunk of ``batch_size`` scenes, the caption decoder on the reference captions (teacher
    forcing), OCR, VQA on each scene's first question, the retrieval text tower on the captions,
    and the image embedding, so every layer of every head sees its inputs.

    >>> from lowbit.data import SyntheticScenes
    >>> from lowbit.models import MultiTaskConfig, calibration_batches
    >>> c = MultiTaskConfig()
    >>> b = calibration_batches(SyntheticScenes(seed=1, n=3, image_size=c.image_size), c)
    >>> [x["task"] for x in b], tuple(b[0]["images"].shape)
    (['caption', 'ocr', 'vqa', 'text', 'image'], (3, 3, 64, 64))
    """
    c = config or MultiTaskConfig()
    items = list(data)
    if not items:
        raise LowbitValueError("the calibration data is empty")
    batch_size = int_arg(batch_size, "batch_size", 1, None)
    tok = _TOKENIZER
    out: list[dict[str, Any]] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        images = torch.from_numpy(np.stack([s["image"] for s in chunk]))
        captions = [s["caption"] for s in chunk]
        cap, _ = tok.batch(captions, c.max_caption_len + 1, bos=True, eos=True)
        q, qm = tok.batch([s["qa"][0][0] for s in chunk], c.max_question_len, cls=True)
        t, tm = tok.batch(captions, c.max_text_len, cls=True)
        out += [{"images": images, "task": "caption", "ids": torch.from_numpy(cap[:, :-1])},
                {"images": images, "task": "ocr"},
                {"images": images, "task": "vqa", "ids": torch.from_numpy(q), "mask": torch.from_numpy(qm)},
                {"task": "text", "ids": torch.from_numpy(t), "mask": torch.from_numpy(tm)},
                {"images": images, "task": "image"}]
    return out


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
