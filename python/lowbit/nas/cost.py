"""The roofline cost of a graph on a device at given bit widths."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lowbit import _lowbit
from lowbit._lowbit import DeviceProfile, Graph, LowbitTypeError, LowbitValueError
from lowbit._validate import int_arg
from lowbit.nas.device import _device


METRICS = ("latency_ms", "energy_mj", "flops", "params", "weight_bytes", "peak_activation_bytes")

@dataclass(frozen=True)
class Cost:
    """What :func:`estimate` returns: totals and one row per op in ``layers``."""

    device: str
    weight_bits: int
    act_bits: int
    flops: int
    macs: int
    params: int
    weight_bytes: int
    peak_activation_bytes: int
    latency_ms: float
    energy_mj: float
    layers: list[dict[str, Any]] = field(repr=False)

    def to_pandas(self) -> Any:
        """The per-op table as a ``pandas.DataFrame`` (pandas must be installed)."""
        import pandas as pd

        return pd.DataFrame(self.layers)

    def metric(self, name: str) -> float:
        return float(getattr(self, _metric(name, "name")))


def estimate(
    graph: Graph, device: str | DeviceProfile = "cortex-a76", weight_bits: int = 32, act_bits: int = 32
) -> Cost:
    """Roofline latency, energy and memory of ``graph`` on ``device``.

    Per op: ``latency = max(flops / peak[precision], bytes / bandwidth) / efficiency[kind] +
    overhead``, where the precision follows the bits (float activations compute in float, int
    activations in int8, both <= 4 bits in int4; INT2 / ternary as packed int4) and bytes count
    weights at ``weight_bits`` (biases and norm scales stay float32) and activations at
    ``act_bits``. Energy is MACs x pJ/MAC + elementwise ops x pJ/op + bytes x DRAM pJ/byte
    (Horowitz, ISSCC 2014, scaled by the profile's ``energy_scale``). ``peak_activation_bytes``
    is the largest total of activations alive at once over the op order.

    >>> g = Graph.sequential((1, 256), [{"op": "linear", "out_features": 256}])
    >>> c32, c4 = estimate(g, "cortex-a76"), estimate(g, "cortex-a76", weight_bits=4, act_bits=8)
    >>> c32.flops == 2 * 256 * 256, c32.weight_bytes, c4.weight_bytes
    (True, 263168, 33792)
    """
    if not isinstance(graph, Graph):
        raise LowbitValueError(f"graph must be a lowbit.nas.Graph, got {type(graph).__name__}")
    d = json.loads(_lowbit.estimate_json(graph, _device(device), _bits(weight_bits, "weight_bits"), _bits(act_bits, "act_bits")))
    return Cost(**d)


def _bits(b: Any, name: str) -> int:
    try:
        return int_arg(b, name, 1, 32)
    except LowbitTypeError as e:  # lowbit.nas has always raised ValueError for any bad bit width
        raise LowbitValueError(str(e)) from None


def _metric(m: str, what: str = "metric") -> str:
    if not isinstance(m, str) or m not in METRICS:
        raise LowbitValueError(f"{what}: unknown metric {m!r}; known: {list(METRICS)}")
    return m
