"""``lowbit.show_config()``: what this build of lowbit found on this machine and chose."""

from __future__ import annotations

import sys
from typing import Any, Literal

from lowbit import _lowbit
from lowbit._lowbit import LowbitValueError


def show_config(mode: Literal["stdout", "dicts"] = "stdout") -> dict[str, dict[str, str]] | None:
    """The lowbit version and build, the CPU's instruction sets as detected (AVX-512
    F/BW/VL/DQ/VNNI/VPOPCNTDQ/BF16, AVX-VNNI, AVX2, FMA, SSE4.1; NEON, dotprod, i8mm on
    aarch64), the instruction-set level in use (detected, capped by ``LOWBIT_ISA``) and the kernel path each area chose, the
    thread count, the allocator and the Python / NumPy / torch versions, like
    ``numpy.show_config()``. ``mode="stdout"`` prints it; ``mode="dicts"`` returns it as
    ``{section: {key: value}}`` instead.

    >>> import lowbit
    >>> cfg = lowbit.show_config(mode="dicts")
    >>> sorted(cfg)
    ['build', 'cpu', 'environment', 'isa', 'kernels', 'lowbit', 'python', 'threads']
    >>> cfg["lowbit"]["version"] == lowbit.__version__
    True
    """
    if mode not in ("stdout", "dicts"):
        raise LowbitValueError(f"mode must be 'stdout' or 'dicts', got {mode!r}")
    out: dict[str, dict[str, str]] = {}
    for section, key, value in _lowbit.build_config():
        out.setdefault(section, {})[key] = value
    import numpy

    py = out.setdefault("python", {})
    py["python"] = sys.version.split()[0]
    py["numpy"] = numpy.__version__
    torch: Any = sys.modules.get("torch")
    py["torch"] = getattr(torch, "__version__", "(not imported)")
    if mode == "dicts":
        return out
    width = max(len(k) for s in out.values() for k in s)
    for section, entries in out.items():
        print(f"{section}:")
        if section == "cpu":
            have = [k for k, v in entries.items() if v == "yes"]
            lack = [k for k, v in entries.items() if v != "yes"]
            print(f"  {'has':<{width}}  {' '.join(have) or '-'}")
            print(f"  {'lacks':<{width}}  {' '.join(lack) or '-'}")
            continue
        for k, v in entries.items():
            print(f"  {k:<{width}}  {v}")
    return None
