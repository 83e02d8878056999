"""Device profiles: the built-in phone CPU / GPU / NPU profiles and one measured on this machine."""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np

from lowbit import _lowbit
from lowbit._lowbit import DeviceProfile, LowbitValueError


_HOST: DeviceProfile | None = None

def _best_of(n: int, fn: Callable[[], Any], budget_s: float = 0.0) -> float:
    """Shortest wall time of ``n`` calls, or of as many as fit in ``budget_s`` seconds when that
    is more, seconds."""
    best, calls, start = math.inf, 0, time.perf_counter()
    while calls < n or time.perf_counter() - start < budget_s:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        calls += 1
    return best

def _measure_host() -> DeviceProfile:
    """This machine: float32 GEMM rate (PyTorch's when it is installed, since that is what
    ``measure`` times, else NumPy's BLAS) and copy bandwidth, best of 10, measured once."""
    n = 1024
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    matmul: Callable[[], Any] = lambda: a @ a  # noqa: E731
    engine = "NumPy"
    try:
        import torch

        at = torch.from_numpy(a)
        matmul, engine = (lambda: at @ at), f"PyTorch ({torch.get_num_threads()} threads)"
    except ImportError:
        pass
    gemm = 2 * n**3 / _best_of(10, matmul) / 1e9
    src = np.ones(64 * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    bw = 2 * src.nbytes / _best_of(10, lambda: np.copyto(dst, src)) / 1e9
    return DeviceProfile(
        "host",
        {"f32": round(gemm, 1)},
        round(bw, 1),
        description="this machine, measured at first use (float32 only: int8/int4 fall back to it)",
        sources={
            "peak_gops": f"{engine} float32 matmul {n}x{n}, best of 10",
            "bandwidth_gbs": "np.copyto of 64 MiB, bytes read + written, best of 10",
            "efficiency": "1 until fitted: use CostModel.fit with lowbit.nas.measure",
        },
    )


def devices() -> dict[str, DeviceProfile]:
    """The built-in device profiles by name, plus ``"host"`` (this machine, measured once).

    Every figure carries its source in ``profile.sources``.

    >>> sorted(devices())
    ['adreno-640', 'cortex-a76', 'hexagon-npu', 'host']
    >>> devices()["cortex-a76"].peak(8, 8)  # int8 G ops/s (SDOT)
    646.7
    """
    global _HOST
    if _HOST is None:
        _HOST = _measure_host()
    out = {d.name: d for d in _lowbit.builtin_devices()}
    out["host"] = _HOST
    return out


def _device(device: str | DeviceProfile) -> DeviceProfile:
    if isinstance(device, DeviceProfile):
        return device
    if not isinstance(device, str):
        raise LowbitValueError(f"device must be a name or a DeviceProfile, got {type(device).__name__}")
    table = {d.name: d for d in _lowbit.builtin_devices()}
    if device == "host":
        return devices()["host"]
    if device not in table:
        raise LowbitValueError(f"unknown device {device!r}; known: {sorted(table) + ['host']}")
    return table[device]
