"""Task metrics of the PyTorch model or the Rust runtime on a scene dataset."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lowbit._lowbit import LowbitValueError


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
