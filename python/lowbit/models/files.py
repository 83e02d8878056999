"""Model files: :func:`save` in every weight format the runtime runs, and :func:`load`."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from lowbit._lowbit import LowbitValueError
from lowbit._multitask import CONFIG_KEY, WEIGHTS, MultiTaskConfig
from lowbit.models.modules import MultiTaskVLM


def _spec(weights: str) -> Any:
    from lowbit._lowbit import QuantSpec

    return {
        "int8": QuantSpec(8, symmetric=True, granularity="channel", axis=0),
        "int4": QuantSpec(4, symmetric=True, granularity="group", group_size=32),
        "int2": QuantSpec(2, symmetric=False, granularity="group", group_size=32),
    }[weights]


def _check_weights(weights: str) -> None:
    if weights not in WEIGHTS:
        raise LowbitValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")


def _linear_weights(model: nn.Module) -> set[str]:
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _ternary_tensor(w: np.ndarray) -> Any:
    """BitNet absmean ternary codes of ``w`` as a 2-bit per-tensor QuantizedTensor (scale = absmean)."""
    from lowbit._lowbit import QuantSpec
    from lowbit._quant import quantize
    from lowbit.bitnet import ternary_quantize

    codes, s = ternary_quantize(w)
    s = np.float32(s)
    return quantize(codes.astype(np.float32) * s, QuantSpec(2, symmetric=True, granularity="tensor"),
                    scales=np.array(s), zero_points=np.array(0, dtype=np.int32))


def save(model: MultiTaskVLM, path: str | os.PathLike[str], weights: str = "f32",
         tensors: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Write ``model`` as one safetensors file with its config in the metadata, atomically and
    with a ``lowbit.sha256`` that :func:`load` and the runtime check (see :func:`lowbit.save_checkpoint`).

    ``weights`` other than ``"f32"`` stores every linear layer quantized: ``"int8"`` symmetric
    per output channel, ``"int4"`` symmetric per group of 32 inputs, ``"int2"`` asymmetric per
    group of 32, ``"ternary"`` BitNet b1.58 absmean codes at 2 bits (the runtime runs these on the
    packed ternary kernel). Embeddings, positions and the patch embedding are then stored int8
    per row / channel, norms and biases float16. ``tensors`` stores the given
    :class:`lowbit.QuantizedTensor` for those weights instead, as they are (a
    :func:`lowbit.ptq.quantize_model` result's ``tensors()``: each must dequantize to the
    model's weight). Returns ``{"bytes": file size, "tensors": n}``.
    """
    from lowbit._lowbit import QuantSpec
    from lowbit._quant import quantize, save_checkpoint

    _check_weights(weights)
    state = {k: v.detach().float().cpu().contiguous().numpy() for k, v in model.state_dict().items()}
    given: dict[str, Any] = {}
    if tensors is not None:
        from lowbit.ptq import _check_deployed

        _check_deployed(state, tensors)
        given = dict(tensors)
    meta = {CONFIG_KEY: model.config.to_json(), "lowbit.weights": weights}
    if weights != "f32":
        linear = _linear_weights(model)
        ternary = []
        for name, w in state.items():
            if name in given:
                continue
            if name in linear:
                state[name] = _ternary_tensor(w) if weights == "ternary" else quantize(w, _spec(weights))
                if weights == "ternary":
                    ternary.append(name)
            elif w.ndim >= 2:
                axis = 1 if name == "vision.pos_embed" else 0
                state[name] = quantize(w, QuantSpec(8, symmetric=True, granularity="channel", axis=axis))
            elif w.ndim == 1:
                state[name] = w.astype(np.float16)
        if ternary:
            meta["lowbit.ternary"] = json.dumps(ternary)
    save_checkpoint(path, {**state, **given}, meta)
    return {"bytes": os.path.getsize(path), "tensors": len(state)}


def load(path: str | os.PathLike[str]) -> MultiTaskVLM:
    """The PyTorch model of a file :func:`save` wrote (quantized tensors dequantized: a float
    model with the deployed weights; ternary layers then run as float products, not BitLinear)."""
    from lowbit._lowbit import QuantizedTensor
    from lowbit._quant import checkpoint_metadata, load_quantized

    meta = checkpoint_metadata(path)
    if CONFIG_KEY not in meta:
        raise LowbitValueError(f"{os.fspath(path)} has no {CONFIG_KEY!r} metadata: not a lowbit multi-task model")
    model = MultiTaskVLM(MultiTaskConfig.from_json(meta[CONFIG_KEY]))
    tensors = {k: torch.from_numpy(np.array(v.dequantize() if isinstance(v, QuantizedTensor) else v, dtype=np.float32))
               for k, v in load_quantized(path).items()}
    expected = model.state_dict()
    for k, v in tensors.items():
        if k in expected and tuple(v.shape) != tuple(expected[k].shape):
            tensors[k] = v.reshape(expected[k].shape)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise LowbitValueError(f"{os.fspath(path)}: missing tensors {missing}, unexpected {unexpected}")
    model.load_state_dict(tensors)
    return model.eval()
