"""Cross-validation of the Rust runtime against PyTorch, layer by layer.

Both sides run the same inputs; the torch side's module outputs are caught with forward hooks,
the runtime's with ``record=True``, and layers are matched by name. For each layer the report
gives the max absolute error, the relative L2 error, the cosine similarity and the SQNR, and
whether it is within tolerance; the first layer over tolerance is where to look.

A layer passes when ``max|runtime - torch| <= tol * max(1, max|torch|)``: an absolute
tolerance for activations of order one, relative for larger ones.

>>> Tolerances().inference, Tolerances(inference=1e-3, layers={"pooler": 1e-2}).tolerance("pooler", "inference")
(0.0001, 0.01)
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from lowbit._lowbit import LowbitTypeError, LowbitValueError
from lowbit._validate import float_arg, int_arg

__all__ = ["LayerReport", "Report", "Tolerances", "assert_close", "compare", "simulate"]


@dataclass(frozen=True)
class Tolerances:
    """Tolerances by mode (defaults from the BitNet-rs cross-validation plan): ``inference``
    for float runtimes against float PyTorch, ``quantization`` for a quantized runtime against
    PyTorch simulating the same quantization (fake-quant), ``perplexity`` for language-model
    perplexity (relative). ``layers`` overrides the tolerance of named layers."""

    inference: float = 1e-4
    quantization: float = 1e-5
    perplexity: float = 1e-3
    layers: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for mode in ("inference", "quantization", "perplexity"):
            object.__setattr__(self, mode, float_arg(getattr(self, mode), mode, lo=0.0, finite=True))
        if not isinstance(self.layers, Mapping) or not all(isinstance(k, str) for k in self.layers):
            raise LowbitTypeError(f"layers must map layer names (str) to tolerances, got {self.layers!r}")
        object.__setattr__(self, "layers", {k: float_arg(v, f"layers[{k!r}]", lo=0.0, finite=True)
                                            for k, v in self.layers.items()})

    def tolerance(self, layer: str, mode: str) -> float:
        if not isinstance(layer, str):
            raise LowbitTypeError(f"layer must be a layer name (str), got {type(layer).__name__}")
        if mode not in ("inference", "quantization", "perplexity"):
            raise LowbitValueError(f"mode must be 'inference', 'quantization' or 'perplexity', got {mode!r}")
        return float(self.layers.get(layer, getattr(self, mode)))


@dataclass(frozen=True)
class LayerReport:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    rel_l2: float
    cosine: float
    sqnr_db: float
    tolerance: float
    passed: bool


@dataclass(frozen=True)
class Report:
    """Per-layer agreement in execution order. ``first_failure`` names the first layer over
    tolerance (None when all pass)."""

    mode: str
    layers: list[LayerReport]

    @property
    def passed(self) -> bool:
        return all(layer.passed for layer in self.layers)

    @property
    def first_failure(self) -> LayerReport | None:
        return next((layer for layer in self.layers if not layer.passed), None)

    def __str__(self) -> str:
        w = max([len(r.name) for r in self.layers] + [5])
        lines = [f"{'layer':<{w}}  {'max abs':>10}  {'rel L2':>10}  {'cosine':>10}  {'SQNR dB':>8}  {'tol':>8}  ok"]
        for r in self.layers:
            lines.append(f"{r.name:<{w}}  {r.max_abs:>10.3e}  {r.rel_l2:>10.3e}  {r.cosine:>10.7f}  "
                         f"{r.sqnr_db:>8.1f}  {r.tolerance:>8.1e}  {'yes' if r.passed else 'NO'}")
        f = self.first_failure
        lines.append(f"{'PASS' if f is None else 'FAIL'} ({self.mode}): "
                     + ("all layers within tolerance" if f is None else f"first layer over tolerance: {f.name}"))
        return "\n".join(lines)

    __repr__ = __str__

    def to_json(self) -> str:
        return json.dumps({"mode": self.mode, "passed": self.passed,
                           "first_failure": None if self.first_failure is None else self.first_failure.name,
                           "layers": [asdict(r) for r in self.layers]})

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame([asdict(r) for r in self.layers])

    def plot(self, ax: Any = None) -> Any:
        """Max abs error and relative L2 error by layer depth (log scale), with the tolerance."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(8, 3.5))
        x = np.arange(len(self.layers))
        ax.semilogy(x, [max(r.max_abs, 1e-12) for r in self.layers], "o-", label="max abs error")
        ax.semilogy(x, [max(r.rel_l2, 1e-12) for r in self.layers], "s-", label="relative L2 error")
        ax.semilogy(x, [r.tolerance for r in self.layers], "k--", label="tolerance")
        bad = [i for i, r in enumerate(self.layers) if not r.passed]
        if bad:
            ax.axvline(bad[0], color="r", alpha=0.4, label=f"first failure: {self.layers[bad[0]].name}")
        ax.set_xticks(x, [r.name for r in self.layers], rotation=70, fontsize=7)
        ax.set_ylabel("error")
        ax.set_title(f"runtime vs PyTorch by layer ({self.mode})")
        ax.legend(fontsize=7)
        return ax


#: Suffix of a recorded name that is the input the runtime fed that module, not its output.
INPUT = ":input"


def _runtime_side(model: Any) -> Any:
    """A lowbit runtime model as it is; an ONNX file (a path, an ``onnx.ModelProto`` or an
    ONNX Runtime session of a file) as a :class:`lowbit.export.OrtModel`."""
    import os

    if isinstance(model, (str, os.PathLike)):
        from lowbit.export.ort import OrtModel, _load

        return OrtModel(_load(model, "runtime_model"))
    if hasattr(model, "graph"):
        from lowbit.export.ort import OrtModel

        return OrtModel(model)
    if type(model).__name__ == "InferenceSession" and getattr(model, "_model_path", None):
        from lowbit.export.ort import OrtModel

        return OrtModel(model._model_path)
    if not callable(getattr(model, "forward", None)):
        raise LowbitTypeError(f"runtime_model must be a lowbit runtime model, an .onnx path or an ONNX Runtime "
                              f"session, got {type(model).__name__}")
    return model


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def _first(out: Any) -> Any:
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out


def _layer(name: str, got: Any, ref: Any, tol: float) -> LayerReport:
    a, b = _np(got).astype(np.float64), _np(ref).astype(np.float64)
    if a.shape != b.shape:
        raise LowbitValueError(f"layer {name!r}: runtime output {a.shape} but torch output {b.shape}")
    diff = a - b
    max_abs = float(np.abs(diff).max()) if diff.size else 0.0
    nb, nd = float(np.linalg.norm(b)), float(np.linalg.norm(diff))
    rel = nd / nb if nb else (0.0 if nd == 0 else math.inf)
    na = float(np.linalg.norm(a))
    cos = float(np.dot(a.ravel(), b.ravel()) / (na * nb)) if na and nb else float(na == nb)
    sqnr = math.inf if nd == 0 else 20 * math.log10(nb / nd) if nb else -math.inf
    scale = max(1.0, float(np.abs(b).max()) if b.size else 0.0)
    ok = bool(np.isfinite(a).all()) and max_abs <= tol * scale
    return LayerReport(name, tuple(a.shape), max_abs, rel, cos, sqnr, tol, ok)


def compare(
    torch_module: Any,
    runtime_model: Any,
    inputs: Mapping[str, Any],
    tolerances: Tolerances | None = None,
    mode: str = "inference",
    isolate: bool = False,
) -> Report:
    """Run ``torch_module(**inputs)`` and ``runtime_model.forward(**inputs, record=True)`` and
    compare every layer the runtime records that is also a submodule of ``torch_module`` (by
    name), in the runtime's order, then the final output (``"output"``). ``runtime_model`` may
    also be an ONNX file (a path, an ``onnx.ModelProto`` or an ONNX Runtime session): its layers
    are the modules whose outputs the graph holds (see :class:`lowbit.export.OrtModel`).

    ``mode="quantization"`` is for a quantized runtime against a torch model that simulates the
    same quantization (see :func:`simulate`).

    A recorded name ending in ``":input"`` (``"vision.blocks.0.mlp.fc2:input"``) is the input
    the runtime fed that module, compared with the one torch feeds it.

    ``isolate=True`` feeds each torch layer what the runtime computed before it: every compared
    module's output (and recorded input) is replaced, once caught, by the runtime's, so each
    layer's error is its own and not what it inherits. With quantized activations this is the
    check that matters: a float difference of one ulp before a quantizer can move a code by one
    step, and end to end that step travels through every later layer. The ``"output"`` row then
    compares only what follows the last recorded layer.
    """
    import torch

    if not isinstance(torch_module, torch.nn.Module):
        raise LowbitTypeError(f"torch_module must be a torch.nn.Module, got {type(torch_module).__name__}")
    runtime_model = _runtime_side(runtime_model)
    if tolerances is not None and not isinstance(tolerances, Tolerances):
        raise LowbitTypeError(f"tolerances must be a Tolerances, got {type(tolerances).__name__}")
    tol = tolerances or Tolerances()
    if not isinstance(inputs, Mapping) or not all(isinstance(k, str) for k in inputs):
        raise LowbitValueError("inputs must be a dict of keyword arguments for both models")
    if not isinstance(isolate, bool):
        raise LowbitTypeError(f"isolate must be True or False, got {isolate!r}")
    tol.tolerance("output", mode)  # checks mode before anything runs
    caught: dict[str, Any] = {}
    modules = dict(torch_module.named_modules())
    out, rec = runtime_model.forward(**inputs, record=True)
    hooks = []

    def recorded_like(name: str, ref: Any) -> Any:
        # A copy: the torch side may change it in place, and the record must stay as recorded.
        return torch.as_tensor(_np(rec[name])).to(device=ref.device, dtype=ref.dtype, copy=True)

    def hook(name: str, o: Any) -> Any:
        if name in caught:  # a module run twice: the runtime recorded its first call
            return None
        first = _first(o)
        # A copy: a later in-place op (ResNet's ReLU(inplace=True) after a BatchNorm) would
        # overwrite the output torch handed the hook.
        caught[name] = first.clone() if isinstance(first, torch.Tensor) else first
        if not isolate or not isinstance(first, torch.Tensor):
            return None
        got = recorded_like(name, first)
        if got.shape != first.shape:
            return None
        if isinstance(o, tuple):
            return (got, *o[1:])
        if isinstance(o, list):
            return [got, *o[1:]]
        return got if isinstance(o, torch.Tensor) else None

    def pre_hook(name: str, args: tuple) -> Any:
        # A name ending in ":input" is what the runtime fed that module (see INPUT).
        if name in caught or not args or not isinstance(args[0], torch.Tensor):
            return None
        x = args[0]
        caught[name] = x.clone()
        got = recorded_like(name, x)
        return (got, *args[1:]) if isolate and got.shape == x.shape else None

    for name in rec:
        base = name.removesuffix(INPUT)
        if base != name and base in modules:
            # First in line: the input as it reaches the module, before its own pre-hooks (the
            # activation quantizer of simulate(act_bits=...), say) see it.
            hooks.append(modules[base].register_forward_pre_hook(lambda m, a, name=name: pre_hook(name, a),
                                                                 prepend=True))
        elif name in modules:
            hooks.append(modules[name].register_forward_hook(lambda m, a, o, name=name: hook(name, o)))
    try:
        with torch.no_grad():
            ref_out = _first(torch_module(**inputs))
    finally:
        for h in hooks:
            h.remove()
    layers = [_layer(n, rec[n], caught[n], tol.tolerance(n, mode)) for n in rec if n in caught]
    if not layers and not rec:
        raise LowbitValueError("the runtime recorded no layers")
    layers.append(_layer("output", out, ref_out, tol.tolerance("output", mode)))
    return Report(mode, layers)


def assert_close(
    torch_module: Any,
    runtime_model: Any,
    inputs: Mapping[str, Any],
    tolerances: Tolerances | None = None,
    mode: str = "inference",
    isolate: bool = False,
) -> Report:
    """:func:`compare`, raising ``AssertionError`` that names the first layer over tolerance
    and its numbers (for pytest)."""
    r = compare(torch_module, runtime_model, inputs, tolerances, mode, isolate)
    f = r.first_failure
    if f is not None:
        raise AssertionError(
            f"runtime departs from PyTorch first at layer {f.name!r}: max abs error {f.max_abs:.3e} > "
            f"{f.tolerance:.1e} (x max(1, max|torch|)), relative L2 {f.rel_l2:.3e}, cosine {f.cosine:.7f}, "
            f"SQNR {f.sqnr_db:.1f} dB\n{r}"
        )
    return r


def _xnor_linear(lin: Any) -> Any:
    """What the runtime's ``weights="binary"`` layer computes, in float64 (exact sign products):
    ``(sign(x) @ sign(w - mean(w)).T) * mean|x| * mean|w_row| + b``, sign(0) = +1."""
    import torch

    class XnorLinear(torch.nn.Module):
        signs: torch.Tensor
        scales: torch.Tensor
        bias: torch.Tensor | None

        def __init__(self, lin: torch.nn.Linear) -> None:
            super().__init__()
            from lowbit.bitnet import binary_quantize

            # The runtime's own quantizer: its means are added in torch's float32 order.
            signs, scales = binary_quantize(lin.weight.detach().float().numpy())
            self.register_buffer("signs", torch.from_numpy(signs).double())
            self.register_buffer("scales", torch.from_numpy(scales).double())
            self.register_buffer("bias", None if lin.bias is None else lin.bias.detach().double())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            xd = x.double()
            signs = torch.where(xd >= 0, 1.0, -1.0).double()
            y = (signs @ self.signs.T) * (xd.abs().mean(-1, keepdim=True) * self.scales)
            if self.bias is not None:
                y = y + self.bias
            return y.to(x.dtype)

    return XnorLinear(lin)


def simulate(torch_module: Any, weights: str, exclude: Sequence[str] = ("pooler",), act_bits: int | None = None) -> Any:
    """A copy of ``torch_module`` whose ``nn.Linear`` layers simulate what the runtime's
    ``weights`` mode deploys: ``"int8"`` weights through :class:`lowbit.torch.FakeQuantize` per
    output channel (symmetric), ``"int4"`` per group of 32 inputs (symmetric, FakeQuantize per
    channel over (out * in/32, 32) rows), ``"ternary"`` as :class:`lowbit.torch.BitLinear` in its
    training (fake-quant, STE) form, ``"binary"`` as the XNOR-Net product in float64.
    ``act_bits`` quantizes each float layer's input per token (absmax), as the runtime's
    ``act_bits`` does. Layers whose name starts with an ``exclude`` entry stay float, as they do
    in the runtime.
    """
    import torch

    from lowbit.torch import BitLinear, FakeQuantize, _bitnet_activation_codes

    if not isinstance(torch_module, torch.nn.Module):
        raise LowbitTypeError(f"torch_module must be a torch.nn.Module, got {type(torch_module).__name__}")
    if weights not in ("f32", "int8", "int4", "ternary", "binary"):
        raise LowbitValueError(f"weights must be 'f32', 'int8', 'int4', 'ternary' or 'binary', got {weights!r}")
    if act_bits is not None and weights in ("ternary", "binary"):
        raise LowbitValueError(f"act_bits does not apply to {weights!r} layers, which quantize their own inputs")
    if act_bits is not None:
        act_bits = int_arg(act_bits, "act_bits", 2, 8)
    sim = copy.deepcopy(torch_module).eval()
    targets = [(n, m) for n, m in sim.named_modules()
               if isinstance(m, torch.nn.Linear) and not any(n.startswith(e) for e in exclude)]
    for name, lin in targets:
        parent, _, leaf = name.rpartition(".")
        if weights in ("ternary", "binary"):
            new = BitLinear.from_linear(lin).train() if weights == "ternary" else _xnor_linear(lin)
            setattr(sim.get_submodule(parent) if parent else sim, leaf, new)
            continue
        with torch.no_grad():
            w = lin.weight
            if weights == "int8":
                lin.weight.copy_(FakeQuantize.from_tensor(w, bits=8, symmetric=True, axis=0)(w))
            elif weights == "int4":
                if w.shape[1] % 32:
                    raise LowbitValueError(f"layer {name!r}: int4 groups of 32 need in_features divisible by 32")
                rows = w.reshape(-1, 32)
                lin.weight.copy_(FakeQuantize.from_tensor(rows, bits=4, symmetric=True, axis=0)(rows).reshape(w.shape))
        if act_bits is not None:
            def quantize_input(m: Any, args: tuple, bits: int = act_bits) -> tuple:
                q, s = _bitnet_activation_codes(args[0], bits)
                return ((q / s).to(args[0].dtype),) + tuple(args[1:])

            lin.register_forward_pre_hook(quantize_input)
    return sim
