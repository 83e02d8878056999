"""Timing helpers shared by the benchmark scripts in this folder."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np


def best_time(fn: Callable[[], Any], repeat: int, warmup: int = 2, pause: float = 0.0) -> float:
    """Best wall time of ``fn()`` in seconds over ``repeat`` runs, after an optional pause (so
    another library's idle worker threads give the cores back) and ``warmup`` runs."""
    if pause:
        time.sleep(pause)
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def copy_bandwidth(repeat: int) -> float:
    """The memory ceiling in bytes/s: (read + written) / best time of ``np.copyto`` into a
    preallocated 256 MiB float32 array."""
    src = np.random.default_rng(1).standard_normal(64 * 2**20, dtype=np.float32)
    dst = np.empty_like(src)
    return 2 * src.nbytes / best_time(lambda: np.copyto(dst, src), repeat)
