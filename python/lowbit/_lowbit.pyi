"""Type stubs of the Rust extension ``lowbit._lowbit``. Use the wrappers in ``lowbit``; they
accept lists and torch tensors and document each function with examples."""

import os
from typing import Any, Literal, Mapping, Sequence, final

import numpy as np
import numpy.typing as npt

__version__: str
__all__ = [
    "LowbitError",
    "build_config",
    "Observer",
    "activation_quant",
    "binary_matmul_packed",
    "binary_quantize",
    "bitnet_kernel",
    "pack_rows",
    "pack_tq1",
    "ternary_quantize",
    "unpack_rows",
    "unpack_tq1",
    "PackedSigns",
    "TernaryLinear",
    "IntLinear",
    "intgemm_paths",
    "intgemm_peak",
    "BertCore",
    "MultiTaskCore",
    "builtin_devices",
    "estimate_json",
    "fit_device",
    "DeviceProfile",
    "Graph",
    "SpaceCore",
    "dequantize_per_channel",
    "dequantize_per_tensor",
    "fake_quantize_learnable_grad",
    "fake_quantize_per_channel_affine",
    "fake_quantize_per_tensor_affine",
    "quantize",
    "quantize_per_channel",
    "quantize_per_tensor",
    "QuantSpec",
    "QuantizedTensor",
    "awq_search",
    "gptq",
    "hqq",
    "output_error",
    "hadamard_conjugate",
    "hadamard_rotate",
    "gguf_dequantize",
    "gguf_quantize",
    "load_gguf",
    "checkpoint_metadata",
    "dequantize_checkpoint",
    "load_quantized",
    "quantize_checkpoint",
    "save_checkpoint",
    "LowbitValueError",
    "LowbitTypeError",
    "LowbitIOError",
    "LowbitFormatError",
    "__version__",
]

class LowbitError(Exception):
    """Base class of every error lowbit raises."""

class LowbitValueError(LowbitError, ValueError):
    """A bad shape, value or range."""

class LowbitTypeError(LowbitError, TypeError):
    """A wrong dtype or argument type."""

class LowbitIOError(LowbitError, OSError):
    """A file could not be read or written."""

class LowbitFormatError(LowbitError, ValueError):
    """A corrupt, truncated or foreign file."""

@final
class QuantSpec:
    """How to quantize: ``bits`` (2..8), symmetric (signed codes, zero point 0) or asymmetric
    (unsigned codes), and one scale per tensor, per channel along ``axis`` or per ``group_size``
    elements of the last axis. Immutable, hashable, picklable.

    >>> import lowbit
    >>> s = lowbit.QuantSpec(4, granularity="group", group_size=128)
    >>> s.quant_min, s.quant_max
    (-8, 7)
    """

    def __new__(
        cls,
        bits: int,
        symmetric: bool = True,
        granularity: Literal["tensor", "channel", "group"] = "tensor",
        axis: int = 0,
        group_size: int | None = None,
    ) -> QuantSpec: ...
    @property
    def bits(self) -> int: ...
    @property
    def symmetric(self) -> bool: ...
    @property
    def granularity(self) -> str: ...
    @property
    def axis(self) -> int: ...
    @property
    def group_size(self) -> int | None: ...
    @property
    def quant_min(self) -> int: ...
    @property
    def quant_max(self) -> int: ...

@final
class QuantizedTensor:
    """Packed codes (``code - quant_min`` at ``bits`` bits each, little-endian bit stream in C
    order) with float32 scales and integer zero points shaped by the spec."""

    @property
    def spec(self) -> QuantSpec: ...
    @property
    def shape(self) -> list[int]: ...
    @property
    def codes(self) -> npt.NDArray[np.uint8]: ...
    @property
    def scales(self) -> npt.NDArray[np.float32]: ...
    @property
    def zero_points(self) -> npt.NDArray[np.int32]: ...
    @property
    def nbytes(self) -> int:
        """Bytes a file stores: packed codes + 4 per scale + 1 per zero point."""
    def int_repr(self) -> npt.NDArray[np.int8] | npt.NDArray[np.uint8]:
        """Unpacked integer codes in ``[quant_min, quant_max]``."""
    def dequantize(self) -> npt.NDArray[np.float32]:
        """``(q - zero_point) * scale`` as float32."""
    def save(self, path: str | os.PathLike[str], name: str = "tensor") -> None:
        """Write a one-tensor quantized safetensors file atomically, with its ``lowbit.sha256``."""

def fake_quantize_per_tensor_affine(
    x: npt.NDArray[Any],
    scale: float,
    zero_point: int,
    quant_min: int,
    quant_max: int,
    return_mask: bool = False,
    bf16: bool = False,
    out: npt.NDArray[Any] | None = None,
    inplace: bool = False,
) -> Any: ...
def fake_quantize_per_channel_affine(
    x: npt.NDArray[Any],
    scale: list[float],
    zero_point: list[int],
    axis: int,
    quant_min: int,
    quant_max: int,
    return_mask: bool = False,
    bf16: bool = False,
    out: npt.NDArray[Any] | None = None,
    inplace: bool = False,
) -> Any: ...
def fake_quantize_learnable_grad(
    x: npt.NDArray[np.float32],
    dy: npt.NDArray[np.float32],
    scale: list[float],
    zero_point: list[float],
    axis: int | None,
    quant_min: int,
    quant_max: int,
    grad_factor: float,
    fused: bool,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]: ...
def quantize_per_tensor(x: npt.NDArray[Any], scale: float, zero_point: int, quant_min: int, quant_max: int) -> npt.NDArray[Any]: ...
def quantize_per_channel(x: npt.NDArray[Any], scales: list[float], zero_points: list[int], axis: int, quant_min: int, quant_max: int) -> npt.NDArray[Any]: ...
def dequantize_per_tensor(q: npt.NDArray[Any], scale: float, zero_point: int) -> npt.NDArray[np.float32]: ...
def dequantize_per_channel(q: npt.NDArray[Any], scales: list[float], zero_points: list[int], axis: int) -> npt.NDArray[np.float32]: ...
def quantize(
    x: npt.NDArray[Any], spec: QuantSpec, scales: npt.NDArray[np.float32] | None = None, zero_points: npt.NDArray[np.int32] | None = None
) -> QuantizedTensor: ...
def quantize_checkpoint(
    src: str, dst: str, spec: QuantSpec, include: list[str] = ..., exclude: list[str] = ...
) -> list[dict[str, Any]]: ...
def dequantize_checkpoint(src: str, dst: str) -> list[dict[str, Any]]: ...
def load_quantized(path: str) -> dict[str, Any]: ...
def gguf_quantize(x: npt.NDArray[np.float32], ggml_type: str, name: str = "x") -> npt.NDArray[np.uint8]:
    """Float32 ``x`` (its last axis a whole number of blocks) as the bytes of GGML type
    ``ggml_type`` (``"Q8_0"``, ``"Q4_0"``, ``"TQ1_0"``, ``"TQ2_0"``, ``"F16"``, ``"BF16"``, ``"F32"``),
    shaped ``(*x.shape[:-1], bytes per row)``, byte for byte as ``gguf.quants.quantize``. Errors call
    the input ``name``.

    >>> import numpy as np
    >>> from lowbit._lowbit import gguf_quantize
    >>> gguf_quantize(np.full((1, 32), 2.0, np.float32), "Q8_0")[0, :4].tolist()  # f16 d, then int8 codes
    [8, 36, 127, 127]
    """
def gguf_dequantize(data: npt.NDArray[np.uint8], ggml_type: str) -> npt.NDArray[np.float32]:
    """GGML blocks back to float32, shaped ``(*data.shape[:-1], elements per row)``, bit for bit as
    ``gguf.quants.dequantize``."""
def load_gguf(
    path: str, dequantize: bool = False
) -> tuple[int, list[tuple[str, Any, str]], list[tuple[str, str, Any, bool]]]: ...

@final
class Observer:
    """State and settings of one calibration observer; ``lowbit.calib`` wraps it in the
    ``MinMaxObserver`` / ``HistogramObserver`` / ... classes."""

    def __new__(
        cls,
        kind: Literal["minmax", "moving_average", "per_channel", "histogram", "per_channel_histogram"],
        bits: int = 8,
        symmetric: bool = False,
        averaging_constant: float = 0.01,
        axis: int = 0,
        method: Literal["mse", "sqnr", "percentile", "entropy"] = "mse",
        percentile: float = 99.99,
        bins: int = 2048,
    ) -> Observer: ...
    @property
    def observed(self) -> bool: ...
    @property
    def quant_min(self) -> int: ...
    @property
    def quant_max(self) -> int: ...
    @property
    def axis(self) -> int | None: ...
    def update(self, x: npt.NDArray[Any], bf16: bool = False) -> None: ...
    def histogram_grids(self, lo: list[float], hi: list[float]) -> tuple[list[int], list[int], int]: ...
    def add_histogram_counts(self, counts: list[int], lo: list[float], hi: list[float]) -> None: ...
    def qparams(self) -> tuple[Any, Any]: ...
    def clip_range(self) -> tuple[float, float]: ...
    def merge(self, other: Observer) -> None: ...
    def to_json(self) -> str: ...
    @staticmethod
    def from_json(s: str) -> Observer: ...
    def histogram(self) -> tuple[npt.NDArray[np.uint64], float, float, float, float]: ...

# ---- lowbit.bitnet ------------------------------------------------------------------------

def ternary_quantize(w: npt.NDArray[np.float32], per_channel: bool, threads: int = 1) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """``threads``: torch's thread count, which decides the order it adds the mean in."""
def activation_quant(x: npt.NDArray[np.float32], bits: int) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]: ...
def binary_quantize(w: npt.NDArray[np.float32], center: bool) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]: ...
@final
class PackedSigns:
    """Signs of a float matrix packed one bit per value (sign(0) = +1)."""

    def __new__(cls, x: npt.NDArray[np.float32]) -> PackedSigns: ...
    @property
    def shape(self) -> tuple[int, int]: ...
    @property
    def nbytes(self) -> int: ...

def binary_matmul_packed(a: PackedSigns, b: PackedSigns) -> npt.NDArray[np.int32]:
    """``sign(a) @ sign(b).T`` in int32 by XNOR + popcount."""

@final
class TernaryLinear:
    """A ternary linear layer: packed 2-bit weights, per-row int8 activations, integer GEMM."""

    def __new__(cls, codes: npt.NDArray[np.int8], scale: npt.NDArray[np.float32], bias: npt.NDArray[np.float32] | None = None) -> TernaryLinear: ...
    @property
    def in_features(self) -> int: ...
    @property
    def out_features(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def codes(self) -> npt.NDArray[np.int8]: ...
    def int_matmul(self, q: npt.NDArray[np.int8]) -> npt.NDArray[np.int32]:
        """Integer product ``q @ codes.T`` for int8 activations."""
    def forward(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``(q_x @ codes.T) * (scale_w / s_x) + bias``, computed in float64 and rounded to float32."""

@final
class IntLinear:
    """A linear layer on quantized weights as stored: int8 activations per row, the W8A8 / W4A8
    integer GEMM."""

    def __new__(cls, weight: QuantizedTensor, bias: npt.NDArray[np.float32] | None = None) -> IntLinear: ...
    @property
    def in_features(self) -> int: ...
    @property
    def out_features(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    def forward(self, x: npt.NDArray[np.float32], path: str | None = None) -> npt.NDArray[np.float32]:
        """``q_x @ dequantized(w).T / s_x + bias`` on the chosen kernel path ("avx512vnni", "avx2",
        "portable"; the fastest allowed when None)."""

def intgemm_peak(seconds: float) -> tuple[str, float] | None:
    """``(instruction, MAC/s)`` of one thread's tight int8 multiply-accumulate loop (the benches'
    GEMM ceiling); None on the portable path."""

def intgemm_paths() -> list[str]:
    """The integer GEMM paths this machine can run, fastest last."""

def bitnet_kernel() -> str:
    """The kernel path in use, chosen by the CPU and ``LOWBIT_ISA``."""
def pack_rows(codes: npt.NDArray[np.uint8], bits: int) -> npt.NDArray[np.uint8]: ...
def unpack_rows(packed: npt.NDArray[np.uint8], bits: int, k: int) -> npt.NDArray[np.uint8]: ...
def pack_tq1(codes: npt.NDArray[np.int8]) -> npt.NDArray[np.uint8]: ...
def unpack_tq1(packed: npt.NDArray[np.uint8], k: int) -> npt.NDArray[np.int8]: ...

# ---- lowbit.ptq --------------------------------------------------------------------------

def gptq(
    w: npt.NDArray[np.float32],
    h: npt.NDArray[np.float64],
    spec: QuantSpec,
    damp: float = 0.01,
    act_order: bool = True,
    mse_grid: bool = False,
    feedback: bool = True,
) -> tuple[QuantizedTensor, npt.NDArray[np.float32], int]:
    """GPTQ on one layer: ``(QuantizedTensor, dequantized float32 weight, dead input count)``."""
def awq_search(
    w: npt.NDArray[np.float32],
    h: npt.NDArray[np.float64],
    activation: npt.NDArray[np.float64],
    spec: QuantSpec,
    grid: int = 20,
) -> tuple[npt.NDArray[np.float32], float, float]:
    """AWQ's per-input scales: ``(scales, alpha, output error)``, the best of ``grid`` exponents."""
def hqq(
    w: npt.NDArray[np.float32],
    spec: QuantSpec,
    lp: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    iters: int = 20,
) -> QuantizedTensor:
    """HQQ's calibration-free grids of ``spec`` for ``w``."""
def output_error(w: npt.NDArray[np.float32], q: npt.NDArray[np.float32], h: npt.NDArray[np.float64]) -> float:
    """``Σ_rows (w - q) H (w - q)ᵀ``."""
def hadamard_rotate(x: npt.NDArray[np.float64], seed: int, inverse: bool = False) -> npt.NDArray[np.float64]:
    """``x R`` (``x Rᵀ`` with ``inverse``) for the randomized Hadamard rotation ``seed`` draws."""
def hadamard_conjugate(h: npt.NDArray[np.float64], seed: int) -> npt.NDArray[np.float64]:
    """``Rᵀ h R``: the Hessian of the rotated inputs."""

# ---- lowbit.nas ---------------------------------------------------------------------------

@final
class Graph:
    """Ops in execution order over buffers (inputs, weights, constants, activations), with exact
    FLOP counts (the formulas of ``torch.utils.flop_counter``: FLOPs = 2 x MACs).

    Build one with :func:`lowbit.nas.from_torch`, from layer descriptions, or from JSON.

    >>> from lowbit.nas import Graph
    >>> g = Graph.sequential((1, 64), [{"op": "linear", "out_features": 32}, {"op": "relu"}])
    >>> g.flops, g.params, len(g)
    (4096, 2080, 2)
    """

    @staticmethod
    def from_json(text: str) -> Graph:
        """Parse and validate a graph (references, execution order, shapes of arithmetic ops)."""
    @staticmethod
    def from_layers(inputs: dict[str, Sequence[int]], layers: Sequence[Mapping[str, Any]]) -> Graph:
        """A graph from layer descriptions with shape inference.

        Each layer is a dict with ``"op"``, an optional ``"name"`` (default: op + index; the
        layer's output tensor takes this name), optional ``"inputs"`` (tensor names; default: the
        previous layer's output, or the last input for the first layer) and the op's attributes:
        ``conv2d`` (out_channels, kernel, stride=1, padding=kernel//2, groups=1, bias=True),
        ``linear`` (out_features, in_features optional check, bias=True), ``matmul`` (2 inputs),
        ``attention`` (inputs q, k, v shaped (batch, heads, seq, dim)), ``layernorm``,
        ``batchnorm``, ``groupnorm``, ``rmsnorm``, ``relu``/``relu6``/``gelu``/``silu``/
        ``sigmoid``/``tanh``/``hardswish``/``hardsigmoid``, ``softmax``, ``add``/``mul``/``sub``/
        ``div`` (2 inputs, broadcasting), ``maxpool``/``avgpool`` (kernel, stride=kernel,
        padding=0), ``global_avgpool``, ``flatten``, ``reshape`` (shape), ``embedding``
        (num_embeddings, dim), ``concat`` (axis=1). Unknown ops, shape mismatches and reads of
        tensors not defined yet raise ``LowbitValueError``.
        """
    @staticmethod
    def sequential(input_shape: Sequence[int], layers: Sequence[Mapping[str, Any]]) -> Graph:
        """``from_layers({"x": input_shape}, layers)``: a chain of layers."""
    def to_json(self) -> str: ...
    @property
    def flops(self) -> int: ...
    @property
    def macs(self) -> int: ...
    @property
    def params(self) -> int:
        """Parameters: weight buffers plus parameters of the model that no op read."""
    def __len__(self) -> int: ...

@final
class DeviceProfile:
    """Peak compute by precision (G ops/s, 1 MAC = 2 ops; keys ``f32``, ``f16``, ``int8``,
    ``int4``; a missing precision runs at the next wider one), sustained bandwidth (GB/s),
    per-op-kind efficiency (keys: the op kinds and ``conv_dw``; default 1), per-op overheads (µs:
    ``overhead_us``, overridden per kind by ``kind_overhead_us``; ``view_overhead_us`` for views), energy (``energy_scale`` times the Horowitz 45 nm figures; DRAM pJ/byte),
    and the source of each figure.

    >>> from lowbit.nas import DeviceProfile
    >>> d = DeviceProfile("my-phone", {"f32": 100.0, "int8": 400.0}, 15.0, efficiency={"conv": 0.5})
    >>> DeviceProfile.from_json(d.to_json()) == d, d.peak(8, 8)
    (True, 400.0)
    """

    def __new__(
        cls,
        name: str,
        peak_gops: Mapping[str, float],
        bandwidth_gbs: float,
        *,
        efficiency: Mapping[str, float] | None = None,
        overhead_us: float = 0.0,
        kind_overhead_us: Mapping[str, float] | None = None,
        view_overhead_us: float = 0.0,
        energy_scale: float = 1.0,
        dram_pj_per_byte: float = 243.75,
        description: str = ...,
        sources: Mapping[str, str] | None = None,
    ) -> DeviceProfile: ...
    @staticmethod
    def from_json(text: str) -> DeviceProfile: ...
    def to_json(self) -> str: ...
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the JSON with a ``"sha256"`` field over its content, atomically (temporary file
        in the same folder, then rename)."""
    @staticmethod
    def load(path: str | os.PathLike[str]) -> DeviceProfile:
        """Read a profile; a ``"sha256"`` field that does not match raises ``LowbitFormatError``."""
    def peak(self, weight_bits: int, act_bits: int) -> float:
        """Peak G ops/s at the precision these bit widths compute in."""
    @property
    def name(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def peak_gops(self) -> dict[str, float]: ...
    @property
    def bandwidth_gbs(self) -> float: ...
    @property
    def efficiency(self) -> dict[str, float]: ...
    @property
    def overhead_us(self) -> float: ...
    @property
    def kind_overhead_us(self) -> dict[str, float]: ...
    @property
    def view_overhead_us(self) -> float: ...
    @property
    def energy_scale(self) -> float: ...
    @property
    def dram_pj_per_byte(self) -> float: ...
    @property
    def sources(self) -> dict[str, str]: ...

@final
class SpaceCore:
    def __new__(cls, costs: npt.NDArray[np.float64], choices: list[int], base: list[float]) -> SpaceCore: ...
    def evaluate(self, choices: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]: ...
    def expected(self, probs: npt.NDArray[np.float64], metric: str) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...

def builtin_devices() -> list[DeviceProfile]: ...
def estimate_json(graph: Graph, device: DeviceProfile, weight_bits: int, act_bits: int) -> str: ...
def fit_device(graphs: list[Graph], measured_ms: list[float], base: DeviceProfile, weight_bits: int, act_bits: int) -> DeviceProfile: ...

# ---- lowbit.runtime -----------------------------------------------------------------------

@final
class BertCore:
    """The Rust BERT encoder; ``lowbit.runtime.BertEncoder`` wraps it."""

    @staticmethod
    def load(path: str, weights: str, act_bits: int | None = None) -> BertCore: ...
    @property
    def config(self) -> dict[str, Any]: ...
    def forward(
        self,
        input_ids: npt.NDArray[np.int64],
        attention_mask: npt.NDArray[np.int64],
        token_type_ids: npt.NDArray[np.int64] | None = None,
        record: bool = False,
    ) -> tuple[npt.NDArray[np.float32], dict[str, npt.NDArray[np.float32]] | None]: ...
    def embed(
        self,
        input_ids: npt.NDArray[np.int64],
        attention_mask: npt.NDArray[np.int64],
        token_type_ids: npt.NDArray[np.int64] | None = None,
    ) -> npt.NDArray[np.float32]: ...
def save_checkpoint(path: str, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None: ...
def checkpoint_metadata(path: str) -> dict[str, str]: ...

@final
class MultiTaskCore:
    """The Rust multi-task model; ``lowbit.runtime.MultiTaskModel`` wraps it."""

    @staticmethod
    def load(path: str, weights: str, act_bits: int | None = None) -> MultiTaskCore: ...
    @property
    def config_json(self) -> str: ...
    @property
    def logit_scale(self) -> float: ...
    def forward(
        self,
        task: str,
        images: npt.NDArray[np.float32] | None = None,
        ids: npt.NDArray[np.int64] | None = None,
        mask: npt.NDArray[np.int64] | None = None,
        record: bool = False,
    ) -> tuple[npt.NDArray[np.float32], dict[str, npt.NDArray[np.float32]] | None]: ...
    def caption(self, images: npt.NDArray[np.float32], max_len: int, beam: int) -> list[list[int]]: ...
    def ocr(self, images: npt.NDArray[np.float32]) -> list[list[int]]: ...

def build_config() -> list[tuple[str, str, str]]:
    """``lowbit.show_config()``'s facts: (section, key, value) rows."""
