"""Peers of ``lowbit.ptq`` for ``benches/compare_ptq.py``, each used as a library on CPU.

Every peer is a function ``(model, calib, bits, group_size) -> model``: it takes a deep copy of
the float model, the calibration batches (dicts of keyword inputs), the weight bit width and the
group size, quantizes every ``nn.Linear`` outside ``EXCLUDE`` (asymmetric groups of
``group_size`` consecutive input features per output row, as lowbit's rows, unless its label in
``LABELS`` says otherwise) and returns the model with each weight replaced by its dequantized
value, so that torch evaluates it as deployed. A peer that cannot run here raises
:class:`PeerUnavailable` (or the library's own error), whose message is the reason.

- ``hqq``: HQQ's ``Quantizer`` (calibration-free), with HQQ's own defaults
  (``BaseQuantizeConfig``: float zero-points, rounded at 4 bits).
- ``brevitas-gptq``: Brevitas ``gptq_mode`` on ``QuantLinear`` layers with its asymmetric
  group quantizer (``ShiftedUint8WeightGroupQuantFloat``, integer zero-points), act order.
- ``torchao-hqq``: torchao's only HQQ path on CPU, ``IntxWeightOnlyConfig`` with
  ``hqq_scale_only``: symmetric groups, scale only (its asymmetric HQQ needs CUDA).
- ``torchao-gptq``: torchao's GPTQ (``torchao.prototype.gptq``); int4 (groups) or int8 (rows).
- ``gptqmodel``: GPTQModel's layer-level ``GPTQ`` (its model-level API has no BERT definition),
  with its default config (group-aware act order, static consecutive groups), calibrated layer
  by layer in the order the model runs them, each on the already-quantized layers' outputs.
- ``aimet-adaround``: AIMET's ``Adaround.apply_adaround``, per output channel (it takes no block
  size), ``ADAROUND_ITERATIONS`` iterations per layer: AIMET's default, 10,000 to 15,000, would
  take hours per bit width on two cores, and so few leave the rounding close to nearest (Adam at
  AIMET's learning rate barely moves it); about 6 minutes a bit width, most of it AIMET's
  activation sampling. Weights taken from a QuantSim holding AdaRound's encodings (as deployed);
  its activation sampler concatenates batches, so they are zero-padded to one length (BERT's pad
  id, masked: the real tokens' activations are unchanged, the padding adds rows to its loss).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Callable, Iterator

import torch
from torch import nn

Batches = list[dict[str, torch.Tensor]]
Peer = Callable[[nn.Module, Batches, int, int], nn.Module]

# Top-level modules kept float (a BertModel's embeddings and pooler), as lowbit's exclude globs.
EXCLUDE = ("embeddings", "pooler")
ADAROUND_ITERATIONS = 100


class PeerUnavailable(RuntimeError):
    """The peer cannot run here; the message says why."""


def quantized_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers every method quantizes: all but those under ``EXCLUDE``."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.split(".")[0] not in EXCLUDE}


def _check_groups(model: nn.Module, group_size: int) -> dict[str, nn.Linear]:
    layers = quantized_linears(model)
    for name, m in layers.items():
        if m.in_features % group_size:
            raise PeerUnavailable(f"{name}: {m.in_features} input features are not a multiple of {group_size}")
    return layers


def hqq(model: nn.Module, calib: Batches, bits: int, group_size: int) -> nn.Module:
    from hqq.core.quantize import BaseQuantizeConfig, Quantizer

    params = BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1)["weight_quant_params"]
    for m in _check_groups(model, group_size).values():
        # axis=1 on (out, in) reshaped to (-1, group_size): groups of consecutive inputs per row.
        wq, meta = Quantizer.quantize(m.weight.data, **params, bitpack=False, device="cpu")
        meta["compute_dtype"] = torch.float32
        m.weight.data = Quantizer.dequantize(wq, meta).to(m.weight.dtype)
    return model


def brevitas_gptq(model: nn.Module, calib: Batches, bits: int, group_size: int) -> nn.Module:
    import brevitas.nn as qnn
    from brevitas.graph.gptq import gptq_mode
    from brevitas.graph.quantize import layerwise_quantize
    from brevitas.quant.shifted_scaled_int import ShiftedUint8WeightGroupQuantFloat

    layers = _check_groups(model, group_size)
    keep = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers]
    quant = ShiftedUint8WeightGroupQuantFloat.let(bit_width=bits, group_size=group_size)
    layer_map = {nn.Linear: (qnn.QuantLinear, {"weight_quant": quant, "input_quant": None, "output_quant": None,
                                               "bias_quant": None, "return_quant_tensor": False})}
    model = layerwise_quantize(model, compute_layer_map=layer_map, name_blacklist=keep)
    with torch.no_grad(), gptq_mode(model, use_quant_activations=False, act_order=True,
                                    create_weight_orig=False) as g:
        for _ in range(g.num_layers):
            for b in calib:
                g.model(**b)
            g.update()
    with torch.no_grad():
        for name, m in list(model.named_modules()):
            if isinstance(m, qnn.QuantLinear):
                lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
                lin.weight.copy_(m.quant_weight().value)
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
                model.set_submodule(name, lin)
    return model


def torchao_hqq(model: nn.Module, calib: Batches, bits: int, group_size: int) -> nn.Module:
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    layers = _check_groups(model, group_size)
    config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(group_size),
                                  intx_choose_qparams_algorithm="hqq_scale_only")
    quantize_(model, config, filter_fn=lambda m, fqn: fqn in layers)
    for m in layers.values():
        m.weight = nn.Parameter(m.weight.dequantize(), requires_grad=False)
    return model


def torchao_gptq(model: nn.Module, calib: Batches, bits: int, group_size: int) -> nn.Module:
    from torchao.prototype.gptq import GPTQConfig
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, PerRow, quantize_

    if bits not in (4, 8):
        raise PeerUnavailable(f"torchao's GPTQ quantizes to int4 or int8 only, not {bits} bits")
    base = Int4WeightOnlyConfig(group_size=group_size) if bits == 4 else Int8WeightOnlyConfig(granularity=PerRow())
    layers = _check_groups(model, group_size)

    def chosen(_m: nn.Module, fqn: str) -> bool:
        return fqn in layers

    quantize_(model, GPTQConfig(step="observe", base_config=base), filter_fn=chosen)
    with torch.no_grad():
        for b in calib:
            model(**b)
    quantize_(model, GPTQConfig(step="convert", base_config=base), filter_fn=chosen)
    for m in layers.values():
        m.weight = nn.Parameter(m.weight.dequantize(), requires_grad=False)
    return model


class _Stop(Exception):
    pass


@contextlib.contextmanager
def _inputs_to(layer: nn.Module, sink: Callable[[torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Feed ``layer``'s input and output to ``sink`` on each forward, then stop the forward."""

    def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        sink(inp[0], out)
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def gptqmodel(model: nn.Module, calib: Batches, bits: int, group_size: int) -> nn.Module:
    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    config = QuantizeConfig(bits=bits, group_size=group_size, sym=False, damp_percent=0.01)
    with torch.no_grad():
        for m in _check_groups(model, group_size).values():  # named_modules order: the order BERT runs them
            g = GPTQ(m, qcfg=config)
            g.quantizer.configure(perchannel=True)
            with _inputs_to(m, lambda x, y: g.add_batch(x, y)):
                for b in calib:
                    with contextlib.suppress(_Stop):
                        model(**b)
            m.weight.data = g.quantize()[0].to(m.weight.dtype)
    return model


class _Positional(nn.Module):
    """A BertModel called with positional tensors, returning a tensor: what AIMET traces."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


# AIMET's quantsim configuration: asymmetric per-channel weights (activations are switched off by
# AdaRound itself; AIMET rejects a default config with unquantized outputs).
_AIMET_CONFIG: dict[str, Any] = {
    "defaults": {"ops": {"is_output_quantized": "True"}, "params": {"is_quantized": "True", "is_symmetric": "False"},
                 "strict_symmetric": "False", "per_channel_quantization": "True"},
    "params": {"bias": {"is_quantized": "False"}}, "op_type": {}, "supergroups": [],
    "model_input": {"is_input_quantized": "True"}, "model_output": {}}


def aimet_adaround(model: nn.Module, calib: Batches, bits: int, group_size: int) -> nn.Module:
    from aimet_torch.adaround import Adaround, AdaroundParameters
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.quantsim import QuantizationSimModel

    keys = ("input_ids", "attention_mask", "token_type_ids")
    length = max(b["input_ids"].shape[1] for b in calib)
    padded = [tuple(nn.functional.pad(b[k], (0, length - b[k].shape[1])) for k in keys) for b in calib]
    wrapped = _Positional(model).eval()
    layers = quantized_linears(wrapped.model)
    keep = [m for m in wrapped.model.modules() if isinstance(m, nn.Linear) and m not in layers.values()]
    params = AdaroundParameters(padded, len(padded), default_num_iterations=ADAROUND_ITERATIONS,
                                forward_fn=lambda m, b: m(*b))
    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "config.json")
        with open(config, "w") as f:
            json.dump(_AIMET_CONFIG, f)
        out = Adaround.apply_adaround(wrapped, padded[0], params, tmp, "adaround", default_param_bw=bits,
                                      ignore_quant_ops_list=keep, default_quant_scheme=QuantScheme.post_training_tf,
                                      default_config_file=config)
        # AdaRound folds its soft rounding into the float weights; the deployed weights are those
        # of a QuantSim holding the exported encodings (the hard rounding on the per-channel grid).
        sim = QuantizationSimModel(out, dummy_input=padded[0], quant_scheme=QuantScheme.post_training_tf,
                                   default_param_bw=bits, config_file=config)
        sim.load_encodings(os.path.join(tmp, "adaround.encodings"), strict=True, partial=True,
                           requires_grad=False, allow_overwrite=False)
    with torch.no_grad():
        for name, m in quantized_linears(out.model).items():
            qm = sim.model.model.get_submodule(name)
            m.weight.data = qm.param_quantizers["weight"](qm.weight).as_subclass(torch.Tensor).clone()
    return out.model


PEERS: dict[str, Peer] = {"hqq": hqq, "brevitas-gptq": brevitas_gptq, "torchao-hqq": torchao_hqq,
                          "torchao-gptq": torchao_gptq, "gptqmodel": gptqmodel, "aimet-adaround": aimet_adaround}
# Each peer's row label; those that differ from lowbit's groups say how.
LABELS = {"hqq": "hqq", "brevitas-gptq": "brevitas-gptq", "torchao-hqq": "torchao-hqq (sym)",
          "torchao-gptq": "torchao-gptq", "gptqmodel": "gptqmodel-gptq",
          "aimet-adaround": f"aimet-adaround ch {ADAROUND_ITERATIONS}it"}
