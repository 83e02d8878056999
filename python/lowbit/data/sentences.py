"""English sentences available offline: the docstrings of the Python standard library.

For calibrating and evaluating text models (a sentence encoder's PTQ, say) on a machine that
cannot download a dataset.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import sys
import warnings

from lowbit._validate import int_arg

__all__ = ["english_sentences"]

# Standard-library modules never imported here (they open windows, print, or need a display).
_SKIP = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"})


def english_sentences(limit: int = 100_000) -> list[str]:
    """Up to ``limit`` distinct English sentences of 6 to 40 words, from the docstrings of the
    standard-library modules and their functions and classes, in a fixed order (modules by name),
    without code-like characters. About 4,000 on CPython 3.11; the same list on every run of one
    Python installation.

    >>> from lowbit.data import english_sentences
    >>> s = english_sentences(50)
    >>> len(s), all(6 <= len(x.split()) <= 40 for x in s), s == english_sentences(50)
    (50, True, True)
    """
    limit = int_arg(limit, "limit", 0, 10_000_000)
    stdlib = sys.stdlib_module_names
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in stdlib)
    out: list[str] = []
    seen: set[str] = set()
    for name in names:
        if len(out) >= limit:
            break
        if name.startswith("_") or name in _SKIP:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module that does not import here has no sentences
            continue
        docs = [inspect.getdoc(mod) or ""] + [inspect.getdoc(v) or "" for _, v in sorted(vars(mod).items())
                                              if callable(v) and getattr(v, "__module__", None) == name]
        for doc in docs:
            for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 6 <= len(s.split()) <= 40 and s not in seen and not any(c in s for c in "{}[]<>=`|"):
                    seen.add(s)
                    out.append(s)
    return out[:limit]
