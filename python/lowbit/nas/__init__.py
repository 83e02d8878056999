"""Hardware cost models for neural architecture search.

Exact FLOP and parameter counts of real PyTorch models (equal to
``torch.utils.flop_counter.FlopCounterMode`` and ``sum(p.numel())``), a roofline latency,
energy and peak-memory estimate on phone CPU / GPU / NPU profiles at any bit width, a cost
model fitted to latencies measured on this machine, and search spaces that score millions of
candidates per second, with gradients for differentiable NAS.

One concern per module: :mod:`~lowbit.nas.device` (profiles), :mod:`~lowbit.nas.cost`
(roofline cost), :mod:`~lowbit.nas.capture` (graphs of PyTorch models),
:mod:`~lowbit.nas.profiling` (timing and fitted cost models), :mod:`~lowbit.nas.search`
(search spaces, evolution).

>>> import lowbit.nas as nas
>>> g = nas.Graph.sequential((1, 3, 32, 32), [
...     {"op": "conv2d", "out_channels": 16, "kernel": 3, "stride": 2},
...     {"op": "relu"},
...     {"op": "global_avgpool"},
...     {"op": "linear", "out_features": 10},
... ])
>>> g.flops, g.params
(221504, 618)
>>> cost = nas.estimate(g, "cortex-a76", weight_bits=4, act_bits=8)
>>> cost.weight_bytes < 618 * 4
True
"""

from lowbit._lowbit import DeviceProfile, Graph
from lowbit.nas.capture import from_torch
from lowbit.nas.cost import METRICS, Cost, estimate
from lowbit.nas.device import devices
from lowbit.nas.profiling import CostModel, Measurement, measure
from lowbit.nas.search import ParetoFront, SearchSpace, evolve

__all__ = [
    "Cost",
    "CostModel",
    "DeviceProfile",
    "Graph",
    "Measurement",
    "METRICS",
    "ParetoFront",
    "SearchSpace",
    "devices",
    "estimate",
    "evolve",
    "from_torch",
    "measure",
]

