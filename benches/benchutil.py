"""Timing helpers shared by the benchmark scripts in this folder."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
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


def main_per_thread_count(doc: str, script: str, child: Callable[[int, int], None],
                          preamble: Callable[[], None] | None = None) -> None:
    """The ``--threads 1,2 --repeat N`` driver the comparison scripts share: prints
    ``lowbit.show_config()`` (and ``preamble()``), then runs ``child(threads, repeat)`` in a fresh
    process per thread count (lowbit's pool and torch's are sized at start), with
    ``RAYON_NUM_THREADS`` and ``OMP_NUM_THREADS`` set to it."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.repeat)
        return
    import lowbit

    lowbit.show_config()
    if preamble is not None:
        preamble()
    run_children(script, args.threads, args.repeat)


def run_children(script: str, threads: str, repeat: int, extra: tuple[str, ...] = ()) -> None:
    """Runs ``script --child T --repeat N`` (and ``extra``) in a fresh process for each thread
    count ``T`` of ``threads`` ("1,2"), with ``RAYON_NUM_THREADS`` and ``OMP_NUM_THREADS`` set to it."""
    for t in (int(v) for v in threads.split(",")):
        env = dict(os.environ, RAYON_NUM_THREADS=str(t), OMP_NUM_THREADS=str(t))
        subprocess.run([sys.executable, script, *extra, "--child", str(t), "--repeat", str(repeat)], env=env,
                       check=True)
