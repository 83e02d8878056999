"""Quantization-aware training: linear layers that train through their quantized weights."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.models.files import _check_weights, _spec
from lowbit.models.modules import MultiTaskVLM



@torch.library.custom_op("lowbit::qat_weight", mutates_args=())
def _qat_weight(w: torch.Tensor, weights: str) -> torch.Tensor:
    """``w`` quantized and dequantized as :func:`save` stores it for ``weights`` (lowbit's
    quantizer on the CPU: a weight matrix, never an activation, crosses to it), in ``w``'s dtype
    and device."""
    from lowbit._quant import quantize

    return torch.from_numpy(quantize(w.detach().float().cpu().numpy(), _spec(weights)).dequantize()).to(w)


@_qat_weight.register_fake
def _(w: torch.Tensor, weights: str) -> torch.Tensor:
    return torch.empty_like(w)


def _qat_weight_backward(ctx: Any, g: torch.Tensor) -> tuple:
    return g, None  # straight through


torch.library.register_autograd("lowbit::qat_weight", _qat_weight_backward)


class QATLinear(nn.Linear):
    """A linear layer whose forward uses its weights as :func:`save` stores them for ``weights``
    (lowbit's quantizer, min-max qparams recomputed every step), with a straight-through gradient."""

    def __init__(self, lin: nn.Linear, weights: str) -> None:
        super().__init__(lin.in_features, lin.out_features, lin.bias is not None)
        self.weights = weights
        self.spec = _spec(weights)
        with torch.no_grad():
            self.weight.copy_(lin.weight)
            if lin.bias is not None:
                self.bias.copy_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _qat_weight(self.weight, self.weights), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weights={self.weights}"


def quantize_for_training(model: MultiTaskVLM, weights: str) -> MultiTaskVLM:
    """A copy of ``model`` whose linear layers train as ``weights`` deploys them:
    :class:`lowbit.torch.BitLinear` for ``"ternary"`` (absmean weights, int8 activations, STE),
    :class:`QATLinear` for the integer formats. Its state dict keeps the latent float weights
    under the same names, so :func:`save` writes it like the float model."""
    import copy

    from lowbit.torch import BitLinear

    _check_weights(weights)
    if weights == "f32":
        return copy.deepcopy(model)
    q = copy.deepcopy(model)
    for name, m in list(q.named_modules()):
        if isinstance(m, nn.Linear) and type(m) is nn.Linear:
            parent, _, leaf = name.rpartition(".")
            new = BitLinear.from_linear(m) if weights == "ternary" else QATLinear(m, weights)
            setattr(q.get_submodule(parent) if parent else q, leaf, new)
    return q
