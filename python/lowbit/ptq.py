"""Post-training quantization of weights with calibration statistics.

:class:`Hessian` gathers a layer's input statistics ``H = Σ x xᵀ`` over calibration batches
(mergeable, so batches can be spread over workers); :func:`gptq` quantizes the layer's weight
with GPTQ's Hessian-guided error feedback (Frantar et al., 2022; solver in Rust, float64), into
a :class:`lowbit.QuantizedTensor` of any :class:`lowbit.QuantSpec` grid: per output channel or
per group of input features, 2 to 8 bits, symmetric or not.

>>> import numpy as np, lowbit
>>> from lowbit.ptq import Hessian, gptq
>>> rng = np.random.default_rng(0)
>>> x = rng.standard_normal((512, 64)).astype(np.float32) + rng.standard_normal((512, 1)).astype(np.float32)
>>> w = rng.standard_normal((32, 64)).astype(np.float32)
>>> h = Hessian(64)
>>> h.update(x)
>>> r = gptq(w, h, lowbit.QuantSpec(3, symmetric=False, granularity="group", group_size=16))
>>> r.error < r.rtn_error   # the layer's output error on the calibration inputs
True
>>> r.tensor.int_repr().shape, r.weight.dtype
((32, 64), dtype('float32'))
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from lowbit import _lowbit
from lowbit._array import as_array, float32
from lowbit._lowbit import LowbitTypeError, LowbitValueError, QuantizedTensor, QuantSpec
from lowbit._validate import float_arg, int_arg, is_tensor

__all__ = ["GPTQResult", "Hessian", "LayerResult", "PTQResult", "Rotation", "gptq", "hqq", "quantize_model"]


class Hessian:
    """``Σ x xᵀ`` over the rows of every batch (float64), for a layer with ``features`` inputs.
    The products of a torch tensor are formed in float32 on its device (as the reference GPTQ
    does), those of a NumPy array in float64; both are summed in float64.

    ``update(x)`` takes an array or tensor whose last axis is the features (leading axes are
    samples: (batch, seq, features) works); ``merge`` adds another's statistics, so the sum over
    workers equals one pass over all the data.
    """

    def __init__(self, features: int) -> None:
        self.features = int_arg(features, "features", 1, 1 << 20)
        self.matrix = np.zeros((self.features, self.features), dtype=np.float64)
        #: ``Σ |x|`` per feature (float64): AWQ's activation statistic.
        self.absolute = np.zeros(self.features, dtype=np.float64)
        self.samples = 0

    def update(self, x: Any) -> None:
        product, samples = self._product(x)
        self.matrix += product
        self.absolute += self._absolute(x)
        self.samples += samples

    def _absolute(self, x: Any) -> np.ndarray:
        """``Σ |x|`` over the samples, per feature (float64)."""
        a = self._rows(x).abs() if is_tensor(x) else np.abs(self._rows(x))
        total = a.sum(0)
        return total.cpu().double().numpy() if is_tensor(total) else total

    def _rows(self, x: Any) -> Any:
        """``x`` checked and flattened to (samples, features): float32 for a tensor (on its
        device), float64 for an array."""
        tensor = is_tensor(x)
        if tensor and x.is_meta:
            raise LowbitValueError("x is a meta tensor: it holds no values")
        a: Any = x.detach() if tensor else as_array(x)  # a tensor or an ndarray: the same calls below
        if not (a.is_floating_point() if tensor else a.dtype.kind == "f"):
            raise LowbitTypeError(f"x must hold floats, got {a.dtype}")
        if a.ndim == 0 or a.shape[-1] != self.features:
            raise LowbitValueError(f"x must end in {self.features} features, got shape {tuple(a.shape)}")
        # A tensor's products in float32 on its own device, as the reference GPTQ forms them.
        return a.reshape(-1, self.features).float() if tensor else a.reshape(-1, self.features).astype(np.float64)

    def _product(self, x: Any, y: Any = None) -> tuple[np.ndarray, int]:
        """``Σ x yᵀ`` over the samples (``y = x`` by default) in float64, and the sample count.
        A NaN or Inf anywhere in feature ``i`` of either makes entry ``(i, i)`` NaN or Inf
        (``Inf·0`` is NaN): the diagonal tells, without a pass over the inputs."""
        a = self._rows(x)
        b = a if y is None else self._rows(y)
        product = a.T @ b
        out = product.cpu().double().numpy() if is_tensor(product) else product
        if not np.isfinite(np.diagonal(out)).all():
            raise LowbitValueError("x holds NaN or Inf; nothing was added")
        return out, a.shape[0]

    def sync(self, group: Any = None) -> None:
        """Make every rank of ``group`` (``torch.distributed``) hold the statistics of all
        ranks together (summed, identically on each: data-parallel calibration gives one
        process's Hessian over all the data). Every rank must call it. A no-op outside
        ``torch.distributed``."""
        if not _distributed(group):
            return
        import torch
        import torch.distributed as dist

        flat = torch.from_numpy(np.concatenate([self.matrix.ravel(), self.absolute, [float(self.samples)]]))
        if dist.get_backend(group) == "nccl":
            flat = flat.cuda()
        dist.all_reduce(flat, group=group)
        out = flat.cpu().numpy()
        n = self.features
        self.matrix = out[:n * n].reshape(n, n).copy()
        self.absolute = out[n * n:n * n + n].copy()
        self.samples = int(out[-1])

    def merge(self, other: Hessian) -> None:
        if not isinstance(other, Hessian) or other.features != self.features:
            raise LowbitValueError("other must be a Hessian of the same number of features")
        self.matrix += other.matrix
        self.absolute += other.absolute
        self.samples += other.samples


def _globs(v: Any, what: str) -> list[str]:
    """A glob or a sequence of globs of module names, as a list."""
    if isinstance(v, str):
        return [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(p, str) for p in v):
        raise LowbitTypeError(f"{what} must be a glob or a list of globs of module names, got {v!r}")
    return list(v)


def _progress_bar(total: int, desc: str) -> Any:
    """A ``tqdm`` bar of ``total`` steps, or None without tqdm."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="layer")


def _distributed(group: Any = None) -> bool:
    """Whether ``torch.distributed`` runs more than one rank in ``group``."""
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _matrix(h: Any, what: str, n: int | None = None) -> np.ndarray:
    """A square float64 matrix (C order) from a :class:`Hessian`, an array or a tensor."""
    if isinstance(h, Hessian):
        h = h.matrix
    if is_tensor(h):
        if h.is_meta or h.is_complex():
            raise LowbitTypeError(f"{what} must be a real matrix with values, got a {h.dtype} tensor on {h.device}")
        h = h.detach().cpu().double().numpy()
    a = as_array(h, what)
    if a.dtype.kind not in "fiub":
        raise LowbitTypeError(f"{what} must be a real matrix, got {a.dtype}")
    if a.ndim != 2 or a.shape[0] != a.shape[1] or (n is not None and a.shape[0] != n):
        want = f"({n}, {n})" if n is not None else "a square 2-D matrix"
        raise LowbitValueError(f"{what} must be {want}, got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float64)


@dataclass(frozen=True)
class Rotation:
    """The randomized Hadamard rotation ``R = D H`` of ``features`` inputs (incoherence
    processing, as in QuIP# and QuaRot): ``D`` random signs drawn from ``seed`` (the same on
    every machine), ``H`` block-diagonal Sylvester-Hadamard blocks of :attr:`block` features
    scaled by ``1/√block``, applied by the fast Walsh–Hadamard transform in Rust. ``R`` is
    orthogonal, so a layer computes the same with its weight ``W R`` and its input ``x R``;
    the rotated weight spreads each row's outliers over its block, which a grid of 2–4 bits
    fits better.

    >>> import numpy as np
    >>> r = Rotation(384)
    >>> r.block
    128
    >>> w, x = np.ones((2, 384), np.float32), np.arange(384, dtype=np.float32)
    >>> bool(np.allclose(r.apply(w) @ r.apply(x), w @ x, rtol=1e-5))
    True
    >>> bool(np.allclose(r.inverse(r.apply(x)), x, atol=1e-3))
    True
    """

    features: int
    seed: int = 0  # below 2**32

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", int_arg(self.features, "features", 1, 1 << 24))
        object.__setattr__(self, "seed", int_arg(self.seed, "seed", 0, (1 << 32) - 1))

    @property
    def block(self) -> int:
        """Features per Hadamard block: the largest power of two dividing :attr:`features`."""
        return self.features & -self.features

    def _map(self, x: Any, inverse: bool) -> Any:
        tensor = is_tensor(x)
        if tensor and (x.is_meta or not x.is_floating_point()):
            raise (LowbitValueError if x.is_meta else LowbitTypeError)(
                "x is a meta tensor: it holds no values" if x.is_meta else f"x must hold floats, got {x.dtype}")
        a = x.detach().cpu().double().numpy() if tensor else np.asarray(as_array(x))
        if a.dtype.kind != "f":
            raise LowbitTypeError(f"x must hold floats, got {a.dtype}")
        if a.ndim == 0 or a.shape[-1] != self.features:
            raise LowbitValueError(f"x must end in {self.features} features, got shape {tuple(a.shape)}")
        out = _lowbit.hadamard_rotate(np.ascontiguousarray(a.reshape(-1, self.features), np.float64),
                                      self.seed, inverse).reshape(a.shape)
        if tensor:
            import torch

            return torch.from_numpy(out).to(dtype=x.dtype, device=x.device)
        return out.astype(a.dtype.newbyteorder("="), copy=False)

    def apply(self, x: Any) -> Any:
        """``x R`` over the last axis (a NumPy array or torch tensor, any leading axes; the
        same kind, dtype and device back). Rotates a weight (out, in) and its inputs alike."""
        return self._map(x, False)

    def inverse(self, x: Any) -> Any:
        """``x Rᵀ``: undoes :meth:`apply`."""
        return self._map(x, True)

    def hessian(self, h: Any) -> np.ndarray:
        """``Rᵀ h R``: the Hessian of the rotated inputs ``x R`` from that of ``x`` (float64)."""
        return _lowbit.hadamard_conjugate(_matrix(h, "h", self.features), self.seed)


@dataclass(frozen=True)
class GPTQResult:
    """One layer's GPTQ result: the quantized tensor, its dequantized weight (the kind that came
    in: NumPy or torch), input features never active in the calibration data (their weights are
    set to 0), and the layer's output error ``Σ (w - q) H (w - q)ᵀ`` against round-to-nearest's
    on the same grid."""

    tensor: QuantizedTensor
    weight: Any
    dead: int
    error: float
    rtn_error: float


def _grid_arg(grid: Any) -> bool:
    if grid not in ("minmax", "mse"):
        raise LowbitValueError(f"grid must be 'minmax' or 'mse', got {grid!r}")
    return grid == "mse"


def gptq(weight: Any, hessian: Hessian | Any, spec: QuantSpec, damp: float = 0.01, act_order: bool = True,
         grid: str = "minmax") -> GPTQResult:
    """Quantize ``weight`` (out_features, in_features) with GPTQ given its inputs' ``hessian``
    (a :class:`Hessian` or an (in, in) matrix).

    Columns are quantized in order of decreasing Hessian diagonal with ``act_order`` (groups
    stay runs of consecutive input features, their grids taken from the weight as given);
    ``damp`` times the mean diagonal is added to the diagonal. A Hessian that is not positive
    definite even after damping raises ``LowbitValueError`` (raise ``damp``), never NaN.
    ``grid="mse"`` searches each grid: the min-max range shrunk by 1.00, 0.99, ..., 0.20, the
    one of least squared error weighted by the Hessian diagonal (never worse than min-max there).
    """
    if not isinstance(spec, QuantSpec):
        raise LowbitTypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    torch_in = is_tensor(weight)
    w = np.ascontiguousarray(float32(weight, "weight"))
    h = _matrix(hessian, "hessian")
    d = float_arg(damp, "damp", 0.0, None, finite=True)
    qt, deq, dead = _lowbit.gptq(w, h, spec, d, bool(act_order), _grid_arg(grid))
    rtn = _lowbit.quantize(w, spec).dequantize()
    err = _lowbit.output_error(w, deq, h)
    rtn_err = _lowbit.output_error(w, rtn, h)
    out: Any = deq
    if torch_in:
        import torch

        out = torch.from_numpy(deq)
    return GPTQResult(qt, out, dead, err, rtn_err)


def hqq(weight: Any, spec: QuantSpec, lp: float = 0.7, beta: float = 10.0, kappa: float = 1.01,
        iters: int = 20) -> QuantizedTensor:
    """``weight`` (out, in) quantized on HQQ's grids (half-quadratic quantization, Badri &
    Shaji 2023; solver in Rust): calibration-free, each grid fitted to its weights under an
    ``ℓp`` error model (``lp`` < 1: robust to the few weights a grid cannot fit) by
    half-quadratic splitting, ``beta`` growing by ``kappa`` for at most ``iters`` steps while
    the mean absolute error falls. lowbit's grids have integer zero points, so each step fits
    the scale and zero point by least squares and rounds the zero point (the published solver
    keeps a fractional one). Never worse than min-max's grid in mean absolute error.

    >>> import numpy as np, lowbit
    >>> from lowbit.ptq import hqq
    >>> w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32) ** 3
    >>> spec = lowbit.QuantSpec(3, symmetric=False, granularity="group", group_size=32)
    >>> err = lambda q: float(np.abs(q.dequantize() - w).mean())
    >>> err(hqq(w, spec)) < err(lowbit.quantize(w, spec))
    True
    """
    if not isinstance(spec, QuantSpec):
        raise LowbitTypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    w = np.ascontiguousarray(float32(weight, "weight"))
    return _lowbit.hqq(w, spec, float_arg(lp, "lp", 1e-6, 1.0, finite=True),
                       float_arg(beta, "beta", 1e-12, None, finite=True),
                       float_arg(kappa, "kappa", 1.0, None, finite=True), int_arg(iters, "iters", 0, 10_000))


# ------------------------------------------------------------------------------------------
# Whole models


@dataclass(frozen=True)
class LayerResult:
    """One layer of :func:`quantize_model`: its quantized weight, the layer's output error on the
    calibration inputs ``Σ (w - q) H (w - q)ᵀ`` and round-to-nearest's on the same grid (both
    measured on the inputs the layer saw when it was quantized), and the seconds it took. With
    a ``rotation``, ``tensor`` holds the rotated weight ``W R`` (the layer computes
    ``tensor · (x R)``: its input must be rotated online) and ``rtn_error`` is plain
    round-to-nearest's, without the rotation. With AWQ's per-input ``scales`` ``s``, ``tensor``
    holds ``W diag(s)`` (the layer computes ``tensor · (x / s)``: the division belongs in the
    operation before the layer)."""

    tensor: QuantizedTensor
    error: float
    rtn_error: float
    dead: int
    seconds: float
    rotation: Rotation | None = None
    scales: np.ndarray | None = None

    @property
    def transforms_input(self) -> bool:
        """Whether ``tensor`` multiplies a rotated or scaled input, not the layer's own."""
        return self.rotation is not None or self.scales is not None

    def weight(self) -> np.ndarray:
        """The float32 weight the layer computes with, ``(out, in)`` (a convolution's as its
        matrix): ``tensor`` dequantized and taken back to the layer's own inputs, as
        :func:`quantize_model` wrote it into the model."""
        w = self.tensor.dequantize().reshape(self.tensor.shape[0], -1)
        if self.rotation is not None:
            w = np.ascontiguousarray(self.rotation.inverse(w), np.float32)
        if self.scales is not None:
            w = np.ascontiguousarray(w / self.scales, np.float32)
        return w

    def _transform(self) -> dict[str, Any]:
        """The layer's entry of the checkpoint's input transforms (see :meth:`PTQResult.save`)."""
        entry: dict[str, Any] = {}
        if self.scales is not None:
            entry["scales"] = [float(v) for v in self.scales]
        if self.rotation is not None:
            entry["rotation_seed"] = self.rotation.seed
        return entry


@dataclass
class PTQResult:
    """What :func:`quantize_model` did: ``layers`` maps each quantized module's name to its
    :class:`LayerResult`, in the order they were quantized; ``seconds`` is the whole call."""

    method: str
    layers: dict[str, LayerResult] = field(default_factory=dict)
    seconds: float = 0.0

    def tensors(self) -> dict[str, QuantizedTensor]:
        """``{"<module>.weight": QuantizedTensor}``, for :func:`lowbit.save_checkpoint` (a rotated
        layer's tensor is of its rotated weight: see :class:`LayerResult`; a convolution's is
        of its weight as a matrix, ``(out_channels, in_channels · kh · kw)``)."""
        return {f"{name}.weight": r.tensor for name, r in self.layers.items()}

    def transforms_metadata(self) -> dict[str, str]:
        """The checkpoint metadata that tells loaders what the rotated or AWQ-scaled layers do
        to their inputs (``{"lowbit.input_transforms": JSON}``: weight name to
        ``{"scales": [...], "rotation_seed": seed}``; empty without such layers)."""
        entries = {f"{n}.weight": r._transform() for n, r in self.layers.items() if r.transforms_input}
        return {INPUT_TRANSFORMS_KEY: json.dumps(entries)} if entries else {}

    def save(self, model: Any, path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> None:
        """Write ``model``'s state dict with the quantized layers as their
        :class:`lowbit.QuantizedTensor` (codes, scales, zero points) and every other tensor as
        it is, as one lowbit checkpoint (:func:`lowbit.save_checkpoint`, atomic): the file
        :class:`lowbit.runtime.BertEncoder` loads as stored (beside the model's
        ``config.json``). Rotated and AWQ-scaled layers keep their tensors in that basis, with
        :meth:`transforms_metadata`: the runtime transforms their inputs online.

        >>> import os, tempfile, torch, lowbit
        >>> from lowbit.ptq import quantize_model
        >>> net = torch.nn.Sequential(torch.nn.Linear(16, 8))
        >>> r = quantize_model(net, [torch.randn(32, 16)], lowbit.QuantSpec(4, granularity="channel"), method="rtn")
        >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
        >>> r.save(net, path)
        >>> lowbit.load_quantized(path)["0.weight"].spec.bits
        4
        """
        import torch

        from lowbit._quant import save_checkpoint

        if not isinstance(model, torch.nn.Module):
            raise LowbitTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if metadata is not None and not isinstance(metadata, dict):
            raise LowbitTypeError(f"metadata must be a dict of str to str, got {type(metadata).__name__}")
        state: dict[str, Any] = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        tensors = self.tensors()
        _check_deployed({k: v.float().numpy() for k, v in state.items() if k in tensors}, self)
        save_checkpoint(path, {**state, **tensors}, {**(metadata or {}), **self.transforms_metadata()})

    def __repr__(self) -> str:
        worse = sum(r.error > r.rtn_error for r in self.layers.values())
        return (f"PTQResult(method={self.method!r}, {len(self.layers)} layers, {self.seconds:.2f} s, "
                f"{worse} with an error above round-to-nearest's)")


def _check_deployed(state: Mapping[str, np.ndarray], quantized: Any) -> None:
    """Checks that ``quantized`` (a :class:`PTQResult`, or a dict of weight name to
    :class:`lowbit.QuantizedTensor`) holds weights of ``state`` (name to float32 array) that
    compute the values ``state`` holds, as :func:`quantize_model` leaves a model (a
    convolution's tensor may be its matrix; a rotated or scaled layer's, in its basis)."""
    if isinstance(quantized, PTQResult):
        weights = {f"{n}.weight": r.weight for n, r in quantized.layers.items()}
    elif isinstance(quantized, Mapping):
        for name, q in quantized.items():
            if not isinstance(q, QuantizedTensor):
                raise LowbitTypeError(f"tensors[{name!r}] must be a QuantizedTensor, got {type(q).__name__}")
        weights = {n: q.dequantize for n, q in quantized.items()}
    else:
        raise LowbitTypeError("quantized must be a PTQResult or a dict of name to QuantizedTensor, got "
                              f"{type(quantized).__name__}")
    for name, weight in weights.items():
        if name not in state:
            raise LowbitValueError(f"{name!r}: the model has no such tensor")
        w, deq = state[name], weight()
        if deq.size != w.size or not np.array_equal(deq.reshape(w.shape), w):
            raise LowbitValueError(f"{name!r} does not compute the model's {name} (another model's tensor, or the "
                                   "model changed since it was quantized)")


#: The checkpoint metadata key of rotated and AWQ-scaled layers' input transforms (the
#: runtime's ``INPUT_TRANSFORMS_KEY``).
INPUT_TRANSFORMS_KEY = "lowbit.input_transforms"


#: The methods of :func:`quantize_model`.
METHODS = ("gptq", "rtn", "mse", "awq", "awq+gptq", "hqq")


class _Stop(Exception):
    """Raised by a hook once the layer being calibrated has seen its input."""


def _until_stop(run: Callable[[], Any]) -> None:
    """Runs one pass, which a hook may end early by raising :class:`_Stop`."""
    try:
        run()
    except _Stop:
        pass


def _call(model: Any, batch: Any) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def _quantizable(m: Any) -> bool:
    """A ``Linear``, or a ``Conv2d`` of one group (each output channel reads every input
    channel: the layer is a matrix product over its unfolded patches)."""
    import torch

    return isinstance(m, torch.nn.Linear) or (isinstance(m, torch.nn.Conv2d) and m.groups == 1)


def _features(m: Any) -> int:
    """The columns of the layer's weight as a matrix: ``in_features``, or a convolution's
    ``in_channels · kh · kw``."""
    return int(m.weight[0].numel())


def _layer_rows(m: Any, x: Any) -> Any:
    """The layer's input as rows of its weight matrix's columns: a convolution's input as its
    unfolded patches (channel-major, as ``weight.reshape(out, -1)`` orders them), padded as
    the layer pads."""
    import torch
    import torch.nn.functional as F

    if not isinstance(m, torch.nn.Conv2d):
        return x
    padding: Any = m.padding
    if m.padding_mode != "zeros" or isinstance(padding, str):
        # Pad as the layer does (its own padding mode; "same" / "valid" resolved by torch).
        pads = m._reversed_padding_repeated_twice
        x = F.pad(x, pads, mode=m.padding_mode if m.padding_mode != "zeros" else "constant")
        padding = 0
    cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
    return cols.transpose(1, 2)


def _spec_for(name: str, spec: Any) -> QuantSpec | None:
    if isinstance(spec, QuantSpec):
        return spec
    for pattern, s in spec.items():
        if fnmatch.fnmatchcase(name, pattern):
            return s
    return None


def _find_blocks(model: Any, chosen: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The model's repeated blocks (a ``ModuleList``'s children: a transformer's layers), those
    of the ``ModuleList`` whose children hold the most of the ``chosen`` layers; [] if none
    holds chosen layers in two children."""
    import torch

    best: list[tuple[str, Any]] = []
    best_count = 1
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList):
            blocks = [(f"{name}.{i}" if name else str(i), b) for i, b in enumerate(m)]
            count = sum(any(n.startswith(bn + ".") for n in chosen) for bn, _ in blocks)
            if count > best_count:
                best, best_count = blocks, count
    return best


def _first(out: Any) -> Any:
    """A block's output hidden states: the output, or its first element."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _chain(out: Any, args: tuple) -> tuple:
    """The next block's positional inputs: this block's output in place of its first input."""
    return (_first(out),) + tuple(args[1:])


def _run_order(model: Any, chosen: Mapping[str, Any], batches: Sequence[Any]) -> list[str]:
    """The ``chosen`` layers in the order passes over ``batches`` first run them (the passes
    stop once every one ran; layers that never run are left out)."""
    import torch

    order: dict[str, None] = {}

    def hook(name: str) -> Callable[..., None]:
        def seen(_m: Any, _a: tuple) -> None:
            order[name] = None
            if len(order) == len(chosen):
                raise _Stop

        return seen

    handles = [m.register_forward_pre_hook(hook(n)) for n, (m, _) in chosen.items()]
    try:
        with torch.no_grad():
            for b in batches:
                if len(order) == len(chosen):
                    break
                _until_stop(functools.partial(_call, model, b))
    finally:
        for h in handles:
            h.remove()
    return list(order)


def _stages(model: Any, chosen: Mapping[str, Any], batches: Sequence[Any]) -> list[tuple[list[str], Any]]:
    """The chosen layers in execution order, split into stages: those run before the repeated
    blocks (``None``: calibrated on passes of the whole model), each block's own (calibrated by
    running that block alone on its inputs, the previous block's outputs), and those run
    after. Blocks qualify only if, on the first batch, each runs once, each takes the previous
    one's output as its first input, and each chosen layer runs inside its own block's call;
    otherwise one stage of whole-model passes. Layers the first batch does not run (another
    task's head) come last, on whole-model passes, in the order the other batches run them."""
    import torch

    blocks = _find_blocks(model, chosen)
    owner = {n: next((i for i, (bn, _) in enumerate(blocks) if n.startswith(bn + ".")), None) for n in chosen}
    events: list[tuple[str, Any, Any]] = []  # ("layer", name, None) | ("in" / "out", block, tensor)
    handles = [m.register_forward_pre_hook(lambda _m, _a, n=n: events.append(("layer", n, None)))
               for n, (m, _) in chosen.items()]
    for i, (_, b) in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(
            lambda _m, a, k, i=i: events.append(("in", i, a[0] if a else None)), with_kwargs=True))
        handles.append(b.register_forward_hook(lambda _m, _a, out, i=i: events.append(("out", i, _first(out)))))
    try:
        with torch.no_grad():
            _call(model, batches[0])
    finally:
        for h in handles:
            h.remove()
    order: list[str] = []
    for kind, n, _ in events:
        if kind == "layer" and n not in order:
            order.append(n)
    missing = {n: chosen[n] for n in chosen if n not in order}
    rest = _run_order(model, missing, batches[1:]) if missing else []
    whole = [(order + rest, None)]
    calls = [(i, x) for kind, i, x in events if kind == "in"]
    if not blocks or len(calls) != len(blocks) or len({i for i, _ in calls}) != len(blocks):
        return whole
    # Each block's input is the previous one's output, and each layer runs inside its block.
    current: int | None = None
    last_out: Any = None
    ran: list[int] = []
    stages: list[tuple[list[str], Any]] = [([], None)]
    after: list[tuple[int, str]] = []  # layers outside every block, after some block ran
    for kind, n, x in events:
        if kind == "in":
            if current is not None or (ran and x is not last_out):
                return whole
            current = n
            ran.append(n)
            stages.append(([], blocks[n][1]))
        elif kind == "out":
            if current != n:
                return whole
            current, last_out = None, x
        elif owner[n] != current:
            return whole  # a block's layer run outside its block's call, or another inside it
        elif current is None and ran:
            after.append((len(ran), n))
        elif n not in stages[-1][0]:
            stages[-1][0].append(n)
    suffix = list(dict.fromkeys(n for _, n in after))
    if any(k < len(blocks) for k, _ in after) or set(suffix) & set(stages[0][0]):
        return whole  # a layer between two blocks, or one run both before and after them
    return stages + [(suffix + rest, None)]


def _block_inputs(block: Any, passes: Sequence[Callable[[], Any]]) -> list[tuple[tuple, dict]]:
    """The positional and keyword inputs ``block`` receives in each of ``passes`` (each pass
    stops there)."""
    import torch

    inputs: list[tuple[tuple, dict]] = []

    def hook(_m: Any, args: tuple, kwargs: dict) -> None:
        inputs.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for run in passes:
                _until_stop(run)
    finally:
        handle.remove()
    return inputs


def _asymmetric_goal(w: np.ndarray, h: np.ndarray, cross: np.ndarray) -> np.ndarray:
    """The weight whose outputs on the quantized inputs best match the float layer's on the
    float inputs, ridge-regularized towards ``w``: ``w + w (C - H)(H + μI)⁻¹`` (float32)."""
    w64 = w.astype(np.float64)
    ridge = h + np.eye(h.shape[0]) * max(float(np.mean(np.diag(h))), 1e-12)
    return np.ascontiguousarray(w64 + np.linalg.solve(ridge, (w64 @ (cross - h)).T).T, np.float32)


def quantize_model(
    model: Any,
    data: Iterable[Any],
    spec: QuantSpec | Mapping[str, QuantSpec],
    method: str = "gptq",
    exclude: str | Sequence[str] = (),
    damp: float = 0.01,
    act_order: bool = True,
    sequential: bool = True,
    grid: str = "minmax",
    rotate: str | None = None,
    asymmetric: bool = False,
    modules: str | Sequence[str] | None = None,
    progress: bool = True,
) -> PTQResult:
    """Quantize every ``torch.nn.Linear`` and ``torch.nn.Conv2d`` of ``model`` in place (its
    weight becomes the dequantized quantized weight, so torch runs the model as it will be
    deployed) and return a :class:`PTQResult` with each layer's :class:`lowbit.QuantizedTensor`.
    A convolution is quantized as the matrix ``weight.reshape(out_channels, -1)`` (groups run
    along ``in_channels · kh · kw``, channel-major) on its unfolded input patches; grouped and
    depthwise convolutions (``groups > 1``) stay float.

    ``data`` yields calibration batches as :func:`lowbit.torch.calibrate` takes them (a tensor,
    a tuple of positional inputs or a dict of keyword inputs). ``spec`` is a
    :class:`lowbit.QuantSpec`, or a dict of module-name glob to ``QuantSpec`` (mixed precision;
    the first match wins, unmatched layers stay float). ``exclude`` names globs of modules to
    keep in float (embeddings, heads); ``modules``, if given, globs of the only modules to
    quantize. ``progress`` shows a progress bar over the layers (with ``tqdm``, when
    installed). ``method``: ``"gptq"``, ``"rtn"`` (round to nearest on
    the same grid) or ``"mse"`` (round to nearest on MSE-searched grids: each group's min-max
    range shrunk to the least error weighted by the layer's Hessian diagonal; a layer keeps the
    min-max grids where they give the lower output error on the calibration data), ``"awq"``
    (activation-aware scales, Lin et al. 2023: input channel ``j`` scaled by ``a_j^α``, ``a_j``
    its mean absolute activation, ``α`` searched over 0, 0.05, ..., 0.95 in Rust for the least
    output error on the calibration inputs; the weight becomes ``Q(W diag(s)) diag(s)⁻¹``, what
    a deployment computes that folds ``1/s`` into the operation before the layer) or
    ``"awq+gptq"`` (GPTQ on the scaled weight), or ``"hqq"`` (half-quadratic grids, Badri &
    Shaji 2023, calibration-free: see :func:`hqq`; the data only measures the errors). ``grid="mse"`` gives GPTQ the same searched
    grids (see :func:`gptq`), and AWQ after its scales (as AWQ's clipping search follows them). ``rotate="hadamard"``: each layer is quantized in a
    randomized Hadamard basis (:class:`Rotation`, incoherence processing): its weight becomes
    ``Q(W R) Rᵀ``, so torch computes exactly what a deployment that rotates the layer's input
    online (``x R``) and multiplies by the stored ``Q(W R)`` computes.

    With ``sequential`` (GPTQ's usual recipe, for ``"gptq"`` and ``"awq+gptq"``) layers are
    quantized in the order the model runs them, each calibrated on the outputs of the layers
    already quantized. A model's repeated blocks (the children of a ``torch.nn.ModuleList``: a
    transformer's layers) are run alone on their cached inputs, each block's on the previous
    one's outputs, so each layer costs a part of one block's pass over ``data``; where blocks
    do not chain so, passes of the whole model stop at the layer being calibrated. The other
    methods, and ``sequential=False``, gather every layer's statistics in one pass.

    Under ``torch.distributed``, each rank calibrates on its own ``data`` and every layer's
    statistics are summed over the ranks before it is quantized (:meth:`Hessian.sync`), so all
    ranks quantize the same and their result is one process's on all the data; every rank must
    run the same layers in the same order (the same kind of batches).

    ``asymmetric=True`` (GPTQ and AWQ + GPTQ; asymmetric calibration, as in GPTAQ) fits each layer's
    output on the quantized model's inputs ``x_q`` to the *float* model's output on its own
    inputs ``x_f``, so a layer also corrects the error the layers before it left: GPTQ runs on
    the ridge-regularized least-squares goal ``W + W (C - H)(H + μI)⁻¹`` (``H = Σ x_q x_qᵀ``,
    ``C = Σ x_f x_qᵀ``, ``μ`` the mean of ``H``'s diagonal), and each layer's errors are
    those of that goal's outputs (GPTQ's objective there). It keeps a float copy of the model and runs
    it beside the quantized one.

    >>> import torch, lowbit
    >>> from lowbit.ptq import quantize_model
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    >>> data = [torch.randn(16, 32) for _ in range(8)]
    >>> r = quantize_model(net, data, lowbit.QuantSpec(3, symmetric=False, granularity="group", group_size=16))
    >>> list(r.layers), all(l.error <= l.rtn_error for l in r.layers.values())
    (['0', '2'], True)
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise LowbitTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise LowbitValueError(f"method must be one of {METHODS}, got {method!r}")
    mse_grid = _grid_arg(grid) or method == "mse"
    if rotate not in (None, "hadamard"):
        raise LowbitValueError(f"rotate must be None or 'hadamard', got {rotate!r}")
    awq = method.startswith("awq")
    if awq and rotate:
        raise LowbitValueError("AWQ's scales come from the layer's own inputs' statistics: they do not compose with "
                               "rotate='hadamard' here (use one or the other)")
    if not isinstance(asymmetric, bool):
        raise LowbitTypeError(f"asymmetric must be True or False, got {type(asymmetric).__name__}")
    # GPTQ's error feedback calibrates layers in order, each on the outputs of those before it.
    in_order = method in ("gptq", "awq+gptq") and sequential
    if asymmetric and not in_order:
        raise LowbitValueError("asymmetric calibration fits each layer to the float model's outputs on top of the "
                               "layers quantized before it: it needs method='gptq' or 'awq+gptq' with "
                               "sequential=True")
    if not isinstance(spec, (QuantSpec, Mapping)) or (isinstance(spec, Mapping) and not all(
            isinstance(v, QuantSpec) for v in spec.values())):
        raise LowbitTypeError("spec must be a QuantSpec or a dict of module-name glob to QuantSpec")
    patterns = _globs(exclude, "exclude")
    include = None if modules is None else _globs(modules, "modules")
    d = float_arg(damp, "damp", 0.0, None, finite=True)
    try:
        batches = list(data)
    except TypeError:
        raise LowbitTypeError(f"data must be an iterable of calibration batches, got {type(data).__name__}") from None
    if not batches:
        raise LowbitValueError("data yielded no batches to calibrate on")
    t0 = time.perf_counter()
    chosen = {name: (m, _spec_for(name, spec)) for name, m in model.named_modules()
              if _quantizable(m) and not any(fnmatch.fnmatchcase(name, p) for p in patterns)
              and (include is None or any(fnmatch.fnmatchcase(name, p) for p in include))}
    chosen = {n: ms for n, ms in chosen.items() if ms[1] is not None}
    if not chosen:
        raise LowbitValueError("the model has no Linear or Conv2d layers to quantize (after spec, modules and exclude)")

    distributed = _distributed()
    bar = _progress_bar(len(chosen), "quantizing") if progress else None
    was_training = model.training
    model.eval()
    order: list[str] = []
    hessians: dict[str, Hessian] = {}
    crosses: dict[str, Any] = {}  # asymmetric calibration: Σ x_f x_qᵀ
    # The float model, which the quantized one's layers are fitted to with ``asymmetric``.
    float_model: Any = copy.deepcopy(model) if asymmetric else None
    full_passes = [functools.partial(_call, model, b) for b in batches]

    def gather(names: Sequence[str], passes: Sequence[Callable[[], Any]], target: str | None = None,
               float_passes: Sequence[Callable[[], Any]] | None = None) -> None:
        """Hessians of ``names`` over every one of ``passes`` (the model, or one block of it, on
        each batch). With a ``target`` (the first of ``names`` a pass runs), each pass stops at
        the first of ``names`` after it whose input is not the target's very input tensor:
        layers that share it (attention's q, k, v) are gathered in the same pass, before the
        target is quantized, which leaves their input unchanged. With ``float_passes`` (the
        float model's, pass for pass), the target's float input ``x_f`` is taken first and each
        layer also gathers ``Σ x_f x_qᵀ`` (asymmetric calibration)."""
        seen: dict[str, Any] = {}

        def hook_for(name: str) -> Any:
            def hook(_mod: Any, args: tuple) -> None:
                x = args[0]
                if target is not None:
                    if name == target:
                        seen["x"] = x
                    elif "x" not in seen:
                        return  # ran before the target in this pass: gathered in a later one
                    elif x is not seen["x"]:
                        raise _Stop
                if name not in hessians:
                    hessians[name] = Hessian(_features(chosen[name][0]))
                    order.append(name)
                stats = hessians[name]
                # Layers reading one tensor in a row (attention's q, k, v) share its products.
                if seen.get("last", (None,))[0] is not x:
                    try:
                        mod = chosen[name][0]
                        rows = _layer_rows(mod, x)
                        products = [stats._product(rows)]
                        if "x_f" in seen:
                            products.append(stats._product(_layer_rows(mod, seen["x_f"]), rows))
                    except LowbitValueError:
                        raise LowbitValueError(f"layer {name!r}: its input from the calibration data holds NaN or "
                                               "Inf") from None
                    seen["last"] = (x, products, stats._absolute(rows) if awq else None)
                _, ((h, n), *extra), absolute = seen["last"]
                stats.matrix += h
                stats.samples += n
                if absolute is not None:
                    stats.absolute += absolute
                if extra:
                    crosses[name] = crosses.get(name, 0.0) + extra[0][0]

            return hook

        def float_hook(_mod: Any, args: tuple) -> None:
            seen["x_f"] = args[0]
            raise _Stop

        handles = [chosen[n][0].register_forward_pre_hook(hook_for(n)) for n in names]
        if float_passes is not None and target is not None:
            handles.append(float_model.get_submodule(target).register_forward_pre_hook(float_hook))
        try:
            with torch.no_grad():
                for i, run in enumerate(passes):
                    seen.clear()
                    if float_passes is not None:
                        _until_stop(float_passes[i])  # the float input x_f first
                    _until_stop(run)
        finally:
            for h in handles:
                h.remove()
        if target is not None:
            # A layer that shared the target's input in some passes only has a partial sum:
            # it is gathered again when its turn comes.
            full = hessians[target].samples if target in hessians else -1
            for n in list(hessians):
                if n != target and hessians[n].samples != full:
                    del hessians[n]
                    crosses.pop(n, None)

    result = PTQResult(method + ("+mse" if mse_grid and method not in ("rtn", "mse") else "") + ("+hadamard" if rotate else "")
                       + ("+asym" if asymmetric else ""))

    def quantize_layer(name: str) -> None:
        """Quantizes layer ``name`` from its gathered Hessian and writes its weight back."""
        mod, s = chosen[name]
        t = time.perf_counter()
        stats = hessians.pop(name, None)
        cross = crosses.pop(name, None)
        if distributed:
            # Every rank's statistics summed (every rank reaches every layer, in one order).
            stats = stats or Hessian(_features(mod))
            stats.sync()
            if asymmetric:
                both = Hessian(stats.features)
                both.matrix = cross if cross is not None else np.zeros_like(stats.matrix)
                both.sync()
                cross = both.matrix
        if stats is None or stats.samples == 0:
            return  # never ran on the calibration data
        w = np.ascontiguousarray(mod.weight.detach().float().cpu().reshape(mod.weight.shape[0], -1).numpy())
        h = stats.matrix
        goal = w if cross is None else _asymmetric_goal(w, h, cross)
        rot = Rotation(w.shape[1]) if rotate else None
        # The method runs on the rotated weight W R against the rotated inputs' Hessian.
        wq = np.ascontiguousarray(rot.apply(goal), np.float32) if rot else goal
        hq = rot.hessian(h) if rot else h
        assert s is not None
        try:
            dead = 0
            # (error, RTN's error) where the branch measured both on the layer's own inputs.
            errors: tuple[float, float] | None = None
            scales = None
            if awq:
                # AWQ: the weight scaled per input, W diag(s), against the inputs x / s.
                activation = stats.absolute / max(stats.samples, 1)
                scales = _lowbit.awq_search(goal, h, activation, s, 20)[0]
                wq = np.ascontiguousarray(goal * scales)
                hq = h / np.outer(scales, scales)
            if method in ("gptq", "awq+gptq"):
                qt, deq, dead = _lowbit.gptq(wq, hq, s, d, bool(act_order), mse_grid)
            elif method == "hqq":
                qt = _lowbit.hqq(wq, s)
                deq = qt.dequantize()
            elif method == "awq" and mse_grid:
                qt, deq, _ = _lowbit.gptq(wq, hq, s, d, False, True, False)
            elif method == "mse":
                qt, deq, _ = _lowbit.gptq(wq, hq, s, d, False, True, False)
                rtn_qt = _lowbit.quantize(wq, s)
                e_mse, e_rtn = (_lowbit.output_error(wq, q, hq) for q in (deq, rtn_qt.dequantize()))
                # The diagonal-weighted search can lose on correlated inputs: keep the better.
                if e_rtn < e_mse:
                    qt, deq = rtn_qt, rtn_qt.dequantize()
                errors = (min(e_mse, e_rtn), e_rtn)
            else:
                qt = _lowbit.quantize(wq, s)
                deq = qt.dequantize()
                if not awq:
                    errors = (_lowbit.output_error(wq, deq, hq),) * 2
            if rot:
                # Back to the layer's own inputs: W ≈ Q(W R) Rᵀ.
                deq = np.ascontiguousarray(rot.inverse(np.asarray(deq)), np.float32)
            if scales is not None:
                deq = np.ascontiguousarray(np.asarray(deq) / scales, np.float32)  # W ≈ Q(W diag(s)) diag(s)⁻¹
            # The errors against plain RTN's on the layer's inputs: of the layer's own weight,
            # or with asymmetric calibration of the goal GPTQ fitted (unrotated RTN and MSE
            # measured them already: their wq, hq are the layer's own w, h).
            if errors is None or rot:
                rtn = _lowbit.quantize(w, s).dequantize()
                errors = (_lowbit.output_error(goal, deq, h), _lowbit.output_error(goal, rtn, h))
            err, rtn_err = errors
        except LowbitValueError as e:
            raise LowbitValueError(f"layer {name!r}: {e}") from None
        with torch.no_grad():
            mod.weight.copy_(torch.from_numpy(np.asarray(deq)).reshape(mod.weight.shape).to(mod.weight.dtype))
        result.layers[name] = LayerResult(qt, err, rtn_err, dead, time.perf_counter() - t, rot, scales)
        if bar is not None:
            bar.set_postfix_str(name, refresh=False)
            bar.update()

    try:
        if not in_order:
            gather(list(chosen), full_passes)
            stages: list[tuple[list[str], Any]] = [(list(order), None)]
        else:
            stages = _stages(model, chosen, batches)
        # The float model's passes and block inputs, pass for pass, with ``asymmetric``.
        float_full = [functools.partial(_call, float_model, b) for b in batches] if float_model else None
        names_of = {id(m): n for n, m in model.named_modules()}
        block_inputs: list[tuple[tuple, dict]] = []
        float_inputs: list[tuple[tuple, dict]] = []
        for names, block in stages:
            float_block: Any = float_model.get_submodule(names_of[id(block)]) if float_model and block else None
            if block is None:
                passes, float_passes = full_passes, float_full
            else:
                if not block_inputs:
                    block_inputs = _block_inputs(block, full_passes)
                    float_inputs = _block_inputs(float_block, float_full) if float_full else []
                passes = [functools.partial(block, *a, **k) for a, k in block_inputs]
                float_passes = [functools.partial(float_block, *a, **k) for a, k in float_inputs] or None
            for i, name in enumerate(names):
                if in_order and name not in hessians:
                    gather(names[i:], passes, target=name, float_passes=float_passes)
                quantize_layer(name)
            if block is not None:
                # This block's outputs, from its quantized layers, are the next block's inputs.
                with torch.no_grad():
                    block_inputs = [(_chain(block(*a, **k), a), k) for a, k in block_inputs]
                    float_inputs = [(_chain(float_block(*a, **k), a), k) for a, k in float_inputs]
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    result.seconds = time.perf_counter() - t0
    return result
