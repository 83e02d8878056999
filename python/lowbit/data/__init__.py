"""Synthetic vision-language data that needs no download: coloured shapes and rendered text.

Every scene is a small RGB image of one to three coloured shapes (circle, square, triangle)
side by side on a varied background, with a short string of capital letters and digits
rendered under them. Each comes with its ground truth for the four tasks of
:class:`lowbit.models.MultiTaskVLM`:

* **caption**: ``"a red circle left of a blue square"`` (shapes from left to right);
* **OCR**: the rendered string, e.g. ``"K7Q2"``;
* **VQA**: questions about colour, count, position and text, each with a one-word answer from
  :data:`ANSWERS`;
* **retrieval**: the image and its caption as a positive pair.

Scene ``i`` of ``SyntheticScenes(seed, n)`` depends only on ``(seed, i)``, so a dataset is
reproducible, indexable in any order and safe to read from several DataLoader workers.

>>> from lowbit.data import SyntheticScenes, Tokenizer
>>> ds = SyntheticScenes(seed=0, n=100)
>>> s = ds[3]
>>> s["image"].shape, s["image"].dtype
((3, 64, 64), dtype('float32'))
>>> s["caption"] == SyntheticScenes(seed=0, n=100)[3]["caption"]
True
>>> tok = Tokenizer()
>>> tok.decode(tok.encode("a red circle left of a blue square"))
'a red circle left of a blue square'
"""

from __future__ import annotations

import operator
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from lowbit.data.sentences import english_sentences

__all__ = ["ANSWERS", "CHARSET", "COLORS", "COUNTS", "POSITIONS", "SHAPES", "ShapeSpec", "SyntheticScenes", "Tokenizer",
           "english_sentences"]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 190),
    "orange": (240, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "middle", "right")
COUNTS = ("one", "two", "three")
#: Characters the OCR strings are drawn from (CTC index 0 is the blank, so ``i + 1`` is ``CHARSET[i]``).
CHARSET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
#: Every VQA answer: colours, shapes, counts, positions, and the characters of the text.
ANSWERS: tuple[str, ...] = (*COLORS, *SHAPES, *COUNTS, *POSITIONS, *(c.lower() for c in CHARSET))

_SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[CLS]", "[SEP]")
_WORDS = (
    "a", "an", "left", "of", "what", "color", "is", "the", "how", "many", "shapes", "are", "there",
    "where", "first", "character", "text", "which", "shape", "?",
)


# The longest token sequence Tokenizer.batch pads to: far beyond any caption, and a bound on
# what one call allocates.
_MAX_LEN = 1 << 20


def _count(v: Any, what: str, lo: int, hi: int | None) -> int:
    """An integer argument in ``[lo, hi]`` (NumPy integers too, not bool)."""
    if isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{what} must be an integer, got bool")
    try:
        i = operator.index(v)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {type(v).__name__}") from None
    if i < lo or (hi is not None and i > hi):
        raise ValueError(f"{what} must be between {lo} and {hi}, got {i}" if hi is not None
                         else f"{what} must be >= {lo}, got {i}")
    return i


class Tokenizer:
    """Word-level tokenizer for the scenes' captions and questions (lower case, ``?`` split off).

    Ids: ``[PAD]`` 0, ``[UNK]`` 1, ``[BOS]`` 2, ``[EOS]`` 3, ``[CLS]`` 4, ``[SEP]`` 5, then the
    words of every caption, question and answer.

    >>> tok = Tokenizer()
    >>> ids = tok.encode("What color is the circle?", bos=True, eos=True)
    >>> ids[0] == tok.bos and ids[-1] == tok.eos
    True
    >>> tok.decode(ids)
    'what color is the circle ?'
    >>> tok.batch(["a red circle", "a blue square left of a red circle"], max_len=6)[1].tolist()
    [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    """

    def __init__(self) -> None:
        words = [*_SPECIALS, *_WORDS]
        for w in (*COLORS, *SHAPES, *POSITIONS, *COUNTS, *(c.lower() for c in CHARSET)):
            if w not in words:
                words.append(w)
        self.vocab: list[str] = words
        self.index: dict[str, int] = {w: i for i, w in enumerate(words)}
        self.pad, self.unk, self.bos, self.eos, self.cls, self.sep = range(6)

    def __len__(self) -> int:
        return len(self.vocab)

    def split(self, text: str) -> list[str]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        return text.lower().replace("?", " ?").split()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [self.index.get(w, self.unk) for w in self.split(text)]
        return [self.bos] * bool(bos) + ids + [self.eos] * bool(eos)

    def decode(self, ids: Any) -> str:
        """Words of `ids` up to the first ``[EOS]``, without padding and ``[BOS]``/``[CLS]``."""
        a = np.asarray(ids.detach().cpu() if hasattr(ids, "detach") else ids)
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise TypeError(f"ids must be a 1-D sequence of integers, got {a.dtype} with shape {a.shape}")
        out = []
        for i in a.tolist():
            if i == self.eos:
                break
            if i not in (self.pad, self.bos, self.cls):
                out.append(self.vocab[i] if 0 <= i < len(self.vocab) else "[UNK]")
        return " ".join(out)

    def batch(self, texts: list[str], max_len: int, bos: bool = False, eos: bool = False,
              cls: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(ids, attention mask), both int64 (len(texts), max_len); too long texts are cut.
        ``max_len`` is at most 2^20."""
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
        max_len = _count(max_len, "max_len", 1, _MAX_LEN)
        ids = np.zeros((len(texts), max_len), dtype=np.int64)
        for r, t in enumerate(texts):
            seq = [self.cls] * bool(cls) + self.encode(t, bos=bos, eos=eos)
            seq = seq[:max_len]
            ids[r, : len(seq)] = seq
        return ids, (ids != self.pad).astype(np.int64)


@dataclass(frozen=True)
class ShapeSpec:
    """One shape of a scene: kind, colour name, slot (0 left .. 2 right), centre and radius in pixels."""

    kind: str
    color: str
    slot: int
    cx: int
    cy: int
    r: int


def _font(size: int):  # noqa: ANN202
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class SyntheticScenes:
    """`n` deterministic scenes from `seed` (a map-style dataset: ``len`` and ``[i]``), each an
    ``image_size`` (32 to 4096) pixels square.

    Item ``i`` is a dict: ``image`` float32 (3, size, size) in [0, 1]; ``caption``; ``text`` (the
    OCR string) and ``text_ids`` (CTC targets, ``CHARSET.index(c) + 1``); ``qa``: list of
    (question, answer) pairs, one per kind that applies (colour, count, position, shape, text);
    ``shapes``: the :class:`ShapeSpec` list, left to right. Raises ``IndexError`` past the end.

    >>> ds = SyntheticScenes(seed=1, n=10, image_size=48)
    >>> len(ds), ds[0]["image"].shape
    (10, (3, 48, 48))
    >>> all(a in ANSWERS for s in ds for _, a in s["qa"])
    True
    """

    def __init__(self, seed: int = 0, n: int = 1000, image_size: int = 64, max_shapes: int = 3,
                 text_len: tuple[int, int] = (3, 5)) -> None:
        seed, n = _count(seed, "seed", 0, None), _count(n, "n", 0, sys.maxsize)
        image_size = _count(image_size, "image_size", 32, 4096)
        max_shapes = _count(max_shapes, "max_shapes", 1, 3)
        if not (isinstance(text_len, (tuple, list)) and len(text_len) == 2
                and all(isinstance(t, int) and not isinstance(t, bool) for t in text_len)
                and 1 <= text_len[0] <= text_len[1] <= 8):
            raise ValueError(f"text_len must be (lo, hi) with 1 <= lo <= hi <= 8, got {text_len}")
        self.seed, self.n, self.size, self.max_shapes, self.text_len = seed, n, image_size, max_shapes, text_len
        self._font = _font(max(8, image_size // 5))

    def __len__(self) -> int:
        return self.n

    def __iter__(self):  # noqa: ANN204
        return (self[i] for i in range(self.n))

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -self.n <= i < self.n:
            raise IndexError(f"scene {i} out of range for {self.n} scenes")
        i %= self.n
        rng = np.random.default_rng([self.seed, i])
        shapes = self._layout(rng)
        text = "".join(rng.choice(list(CHARSET), int(rng.integers(self.text_len[0], self.text_len[1] + 1))))
        image = self._render(rng, shapes, text)
        return {
            "image": image,
            "caption": " left of ".join(f"{_article(s.color)} {s.color} {s.kind}" for s in shapes),
            "text": text,
            "text_ids": np.array([CHARSET.index(c) + 1 for c in text], dtype=np.int64),
            "qa": self._questions(rng, shapes, text),
            "shapes": shapes,
        }

    def _layout(self, rng: np.random.Generator) -> list[ShapeSpec]:
        k = int(rng.integers(1, self.max_shapes + 1))
        slots = sorted(rng.choice(3, k, replace=False).tolist())
        colors = rng.choice(list(COLORS), k, replace=False)
        size, band = self.size, self.size // 3
        w = size / 3
        shapes = []
        for slot, color in zip(slots, colors):
            # At most 0.38 of a slot, so that with 2 px of jitter neighbours never touch.
            r = int(rng.integers(int(w * 0.25), int(w * 0.38) + 1))
            cx = int(round(w * (slot + 0.5) + rng.integers(-2, 3)))
            cy = int(rng.integers(r + 2, size - band - r))
            shapes.append(ShapeSpec(str(rng.choice(SHAPES)), str(color), slot, cx, cy, r))
        return shapes

    def _render(self, rng: np.random.Generator, shapes: list[ShapeSpec], text: str) -> np.ndarray:
        from PIL import Image, ImageDraw

        size, band = self.size, self.size // 3
        # Background: a light tone with a gentle gradient and pixel noise, distinct from every colour.
        base = rng.integers(150, 256, 3)
        ramp = np.linspace(-20, 20, size)[:, None, None] * rng.choice([-1, 1], 3)
        bg = np.clip(base + ramp + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(bg)
        draw = ImageDraw.Draw(img)
        for s in shapes:
            box = (s.cx - s.r, s.cy - s.r, s.cx + s.r, s.cy + s.r)
            if s.kind == "circle":
                draw.ellipse(box, fill=COLORS[s.color])
            elif s.kind == "square":
                draw.rectangle(box, fill=COLORS[s.color])
            else:
                draw.polygon([(s.cx, s.cy - s.r), (s.cx - s.r, s.cy + s.r), (s.cx + s.r, s.cy + s.r)],
                             fill=COLORS[s.color])
        # Text band: dark characters on a white strip.
        draw.rectangle((0, size - band, size, size), fill=(255, 255, 255))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=self._font)
        x = max(0, (size - (right - left)) // 2 - left)
        y = size - band + max(0, (band - (bottom - top)) // 2) - top
        draw.text((x, y), text, fill=(0, 0, 0), font=self._font)
        return np.ascontiguousarray(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0)

    def _questions(self, rng: np.random.Generator, shapes: list[ShapeSpec], text: str) -> list[tuple[str, str]]:
        kinds = [s.kind for s in shapes]
        unique = [s for s in shapes if kinds.count(s.kind) == 1]
        qa = [("how many shapes are there?", COUNTS[len(shapes) - 1])]
        if unique:
            s = unique[int(rng.integers(len(unique)))]
            qa.append((f"what color is the {s.kind}?", s.color))
        s = shapes[int(rng.integers(len(shapes)))]
        qa.append((f"where is the {s.color} {s.kind}?", POSITIONS[s.slot]))
        qa.append((f"which shape is {s.color}?", s.kind))
        qa.append(("what is the first character of the text?", text[0].lower()))
        return qa
