"""Model files: :func:`save` in every weight format the runtime runs, and :func:`load`."""

from __future__ import annotations

import json
import os
from typing import Any

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
         quantized: Any = None) -> dict[str, int]:
    """Write ``model`` as one safetensors file with its config in the metadata, atomically and
    with a ``lowbit.sha256`` that :func:`load` and the runtime check (see :func:`lowbit.save_checkpoint`).

    ``weights`` other than ``"f32"`` stores every linear layer quantized: ``"int8"`` symmetric
    per output channel, ``"int4"`` symmetric per group of 32 inputs, ``"int2"`` asymmetric per
    group of 32, ``"ternary"`` BitNet b1.58 absmean codes at 2 bits (the runtime runs these on the
    packed ternary kernel). Embeddings, positions and the patch embedding are then stored int8
    per row / channel, norms and biases float16. ``quantized`` (a :func:`lowbit.ptq.quantize_model`
    result, or a dict of weight name to :class:`lowbit.QuantizedTensor`) stores those weights
    as they are instead, each of which must compute the model's weight: rotated and AWQ-scaled
    layers keep their tensors in that basis, with the metadata the runtime and :func:`load`
    transform their inputs by. Returns ``{"bytes": file size, "tensors": n}``.
    """
    from lowbit._lowbit import QuantSpec
    from lowbit._quant import quantize, save_checkpoint

    _check_weights(weights)
    state = {k: v.detach().float().cpu().contiguous().numpy() for k, v in model.state_dict().items()}
    given: dict[str, Any] = {}
    meta = {CONFIG_KEY: model.config.to_json(), "lowbit.weights": weights}
    if quantized is not None:
        from lowbit.ptq import PTQResult, _check_deployed

        _check_deployed(state, quantized)
        if isinstance(quantized, PTQResult):
            given = quantized.tensors()
            meta.update(quantized.transforms_metadata())
        else:
            given = dict(quantized)
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

    from lowbit.ptq import INPUT_TRANSFORMS_KEY, LayerResult, Rotation

    meta = checkpoint_metadata(path)
    if CONFIG_KEY not in meta:
        raise LowbitValueError(f"{os.fspath(path)} has no {CONFIG_KEY!r} metadata: not a lowbit multi-task model")
    model = MultiTaskVLM(MultiTaskConfig.from_json(meta[CONFIG_KEY]))
    stored = load_quantized(path)
    transforms = json.loads(meta.get(INPUT_TRANSFORMS_KEY, "{}"))

    def value(name: str, v: Any) -> np.ndarray:
        if name in transforms and isinstance(v, QuantizedTensor):
            # A rotated or AWQ-scaled layer: its weight back in the layer's own basis.
            t = transforms[name]
            rot = Rotation(int(np.prod(v.shape[1:])), t["rotation_seed"]) if "rotation_seed" in t else None
            scales = np.asarray(t["scales"], np.float32) if "scales" in t else None
            return LayerResult(v, 0.0, 0.0, 0, 0.0, rot, scales).weight()
        return np.array(v.dequantize() if isinstance(v, QuantizedTensor) else v, dtype=np.float32)

    tensors = {k: torch.from_numpy(value(k, v)) for k, v in stored.items()}
    expected = model.state_dict()
    for k, v in tensors.items():
        if k in expected and tuple(v.shape) != tuple(expected[k].shape):
            tensors[k] = v.reshape(expected[k].shape)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise LowbitValueError(f"{os.fspath(path)}: missing tensors {missing}, unexpected {unexpected}")
    model.load_state_dict(tensors)
    return model.eval()
