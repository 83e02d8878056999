"""Latency measured on this machine, and a cost model fitted to measurements."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from lowbit import _lowbit
from lowbit._lowbit import DeviceProfile, Graph, LowbitTypeError, LowbitValueError
from lowbit._validate import float_arg, int_arg
from lowbit.nas.capture import _as_args, _Hooks
from lowbit.nas.cost import Cost, _bits, estimate
from lowbit.nas.device import _device


@dataclass(frozen=True)
class Measurement:
    """What :func:`measure` returns. ``total_ms`` is the median wall time of the whole forward
    pass; ``layers`` has one row per ATen op (its module, op and median time)."""

    total_ms: float
    samples_ms: list[float] = field(repr=False)
    layers: list[dict[str, Any]] = field(repr=False)

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.layers)


def measure(model: Any, example_inputs: Any, repeats: int = 20, warmup: int = 3, per_op: bool = True) -> Measurement:
    """Time ``model(*example_inputs)`` on this machine, whole and op by op.

    The whole pass is timed ``repeats`` times under ``torch.no_grad()`` after ``warmup`` runs
    (median reported); then, with ``per_op``, each ATen op is timed in a separate pass (the
    per-op times include the dispatch hook's overhead, so they are for finding the slow ops,
    not for adding up).

    >>> import torch
    >>> m = torch.nn.Linear(64, 64)
    >>> r = measure(m, torch.randn(8, 64), repeats=5)
    >>> r.total_ms > 0, [l["op"] for l in r.layers]
    (True, ['aten.t', 'aten.addmm'])
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    if not callable(model):
        raise LowbitTypeError(f"model must be callable (a torch.nn.Module), got {type(model).__name__}")
    repeats, warmup = int_arg(repeats, "repeats", 1, None), int_arg(warmup, "warmup", 0, None)
    args = _as_args(example_inputs)
    samples = []
    with torch.no_grad():
        for _ in range(warmup):
            model(*args)
        for _ in range(repeats):
            t = time.perf_counter()
            model(*args)
            samples.append((time.perf_counter() - t) * 1e3)
    layers: list[dict[str, Any]] = []
    if per_op:
        stack = [""]
        times: list[list[float]] = []
        names: list[tuple[str, str]] = []

        class Mode(TorchDispatchMode):
            i = 0

            def __torch_dispatch__(self, func, types, a=(), kw=None):  # noqa: ANN001, ANN204
                t = time.perf_counter()
                out = func(*a, **(kw or {}))
                dt = (time.perf_counter() - t) * 1e3
                i = self.i
                if i == len(times):
                    times.append([])
                    names.append((stack[-1], f"aten.{func.overloadpacket.__name__}"))
                times[i].append(dt)
                self.i += 1
                return out

        mode = Mode()
        with torch.no_grad(), _Hooks(model, stack):
            for _ in range(max(3, min(repeats, 10))):
                mode.i = 0
                with mode:
                    model(*args)
        layers = [{"name": n, "op": o, "ms": float(np.median(t))} for (n, o), t in zip(names, times)]
    return Measurement(float(np.median(samples)), samples, layers)


class CostModel:
    """A device profile whose per-op-kind efficiencies and per-op overheads are fitted to
    measured latencies.

    The roofline estimate is linear in ``1 / efficiency`` per op kind and in the overheads, so
    :meth:`fit` solves a non-negative least-squares problem in relative error over measured
    graphs and returns a model whose :meth:`predict` is :func:`estimate` with the fitted profile.

    >>> import torch
    >>> from lowbit.nas import CostModel, from_torch, measure
    >>> nets = [torch.nn.Sequential(torch.nn.Linear(64, w), torch.nn.ReLU(), torch.nn.Linear(w, 8))
    ...         for w in (64, 256, 1024)]
    >>> graphs = [from_torch(n, torch.randn(4, 64)) for n in nets]
    >>> model = CostModel.fit(graphs, [measure(n, torch.randn(4, 64), per_op=False).total_ms for n in nets])
    >>> model.predict(graphs[0]) > 0
    True
    """

    def __init__(self, device: str | DeviceProfile = "host", weight_bits: int = 32, act_bits: int = 32) -> None:
        self.device = _device(device)
        self.weight_bits = _bits(weight_bits, "weight_bits")
        self.act_bits = _bits(act_bits, "act_bits")

    @classmethod
    def fit(
        cls,
        graphs: Sequence[Graph],
        measured_ms: Sequence[float],
        device: str | DeviceProfile = "host",
        weight_bits: int = 32,
        act_bits: int = 32,
    ) -> CostModel:
        if isinstance(graphs, (str, bytes, dict)) or not hasattr(graphs, "__iter__"):
            raise LowbitTypeError(f"graphs must be a list of lowbit.nas.Graph, got {type(graphs).__name__}")
        graphs = list(graphs)
        if not all(isinstance(g, Graph) for g in graphs):
            raise LowbitTypeError("graphs must be lowbit.nas.Graph objects")
        if isinstance(measured_ms, (str, bytes, dict)) or not hasattr(measured_ms, "__iter__"):
            raise LowbitTypeError(f"measured_ms must be a list of floats, got {type(measured_ms).__name__}")
        measured = [float_arg(m, "measured_ms") for m in measured_ms]
        if len(measured) != len(graphs):
            raise LowbitValueError(f"measured_ms has {len(measured)} measurements for {len(graphs)} graphs")
        fitted = _lowbit.fit_device(graphs, measured, _device(device),
                                    _bits(weight_bits, "weight_bits"), _bits(act_bits, "act_bits"))
        return cls(fitted, weight_bits, act_bits)

    def estimate(self, graph: Graph) -> Cost:
        return estimate(graph, self.device, self.weight_bits, self.act_bits)

    def predict(self, graph: Graph) -> float:
        """Predicted latency of ``graph`` in milliseconds."""
        return self.estimate(graph).latency_ms

    def __repr__(self) -> str:
        eff = {k: round(v, 3) if v < 1e6 else "free" for k, v in self.device.efficiency.items()}
        d = self.device
        return f"CostModel(device={d.name!r}, efficiency={eff}, overhead_us={d.overhead_us:.2f}, view_overhead_us={d.view_overhead_us:.2f})"
