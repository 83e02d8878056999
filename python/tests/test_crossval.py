"""lowbit.crossval: layer-by-layer agreement of the Rust runtime with PyTorch."""

import json

import matplotlib
import pytest
import torch
from transformers import BertConfig, BertModel

import lowbit.crossval as cv
from lowbit.runtime import BertEncoder

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=211, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=48)
    model = BertModel(cfg).eval()
    path = tmp_path_factory.mktemp("bert")
    model.save_pretrained(path)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 211, (3, 21), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, 4:] = 0
    return model, path, dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.randint(0, 2, ids.shape, generator=g))


def test_float_runtime_passes_every_layer(bert):
    model, path, inputs = bert
    r = cv.assert_close(model, BertEncoder.load(path), inputs)
    names = [layer.name for layer in r.layers]
    assert names[0] == "embeddings" and names[-1] == "output" and "encoder.layer.2.attention" in names
    assert r.passed and r.first_failure is None
    assert all(layer.cosine > 0.999999 and layer.sqnr_db > 100 for layer in r.layers)
    d = json.loads(r.to_json())
    assert d["passed"] and len(d["layers"]) == len(r.layers)
    assert "PASS (inference)" in str(r)
    ax = r.plot()
    assert len(ax.get_lines()) >= 3


@pytest.mark.parametrize("weights, act_bits", [("int8", None), ("int4", None), ("ternary", None), ("binary", None),
                                               ("int8", 8), ("f32", 8), ("int4", 6)])
def test_fake_quant_simulation_predicts_the_deployed_model(bert, weights, act_bits):
    model, path, inputs = bert
    runtime = BertEncoder.load(path, weights=weights, act_bits=act_bits)
    # With int activations a one-ulp float difference before a quantizer can flip a code by one
    # step (here: one element in layer 0 at act_bits=8); that is all the looser bound admits.
    tol = cv.Tolerances(quantization=1e-5 if act_bits is None else 2e-4)
    r = cv.assert_close(cv.simulate(model, weights, act_bits=act_bits), runtime, inputs, tol, mode="quantization")
    assert all(layer.sqnr_db > 100 for layer in r.layers)
    # Each layer on the runtime's own input: no flip is inherited, the strict tolerance holds.
    cv.assert_close(cv.simulate(model, weights, act_bits=act_bits), runtime, inputs, mode="quantization",
                    isolate=True)
    assert not cv.compare(model, runtime, inputs, mode="quantization", isolate=True).passed
    # Without the simulation the float model is far off: the check can fail.
    r = cv.compare(model, runtime, inputs, mode="quantization")
    assert not r.passed and r.first_failure.name == "encoder.layer.0.attention.self"


def test_the_first_departing_layer_is_named(bert):
    model, path, inputs = bert
    broken = cv.simulate(model, "f32")
    with torch.no_grad():
        broken.encoder.layer[1].intermediate.dense.weight[3, 5] += 0.05
    with pytest.raises(AssertionError, match=r"first at layer 'encoder.layer.1.intermediate': max abs error"):
        cv.assert_close(broken, BertEncoder.load(path), inputs)
    r = cv.compare(broken, BertEncoder.load(path), inputs)
    ok = [layer.name for layer in r.layers if layer.passed]
    assert ok[:6] == ["embeddings", "encoder.layer.0.attention.self", "encoder.layer.0.attention",
                      "encoder.layer.0.intermediate", "encoder.layer.0", "encoder.layer.1.attention.self"]
    # A per-layer tolerance can accept a known difference.
    loose = cv.Tolerances(layers={n: 1.0 for n in [x.name for x in r.layers]})
    assert cv.compare(broken, BertEncoder.load(path), inputs, loose).passed
    # Isolated, only the broken layer departs: every later layer is fed the runtime's input.
    r = cv.compare(broken, BertEncoder.load(path), inputs, isolate=True)
    assert [layer.name for layer in r.layers if not layer.passed] == ["encoder.layer.1.intermediate"]
    assert len(r.layers) == len(cv.compare(model, BertEncoder.load(path), inputs).layers)


def test_bad_arguments(bert):
    model, path, inputs = bert
    with pytest.raises(ValueError, match="mode must be"):
        cv.compare(model, BertEncoder.load(path), inputs, mode="exact")
    with pytest.raises(TypeError, match="isolate must be"):
        cv.compare(model, BertEncoder.load(path), inputs, isolate="yes")
    with pytest.raises(ValueError, match="weights must be"):
        cv.simulate(model, "int3")
    with pytest.raises(ValueError, match="dict of keyword"):
        cv.compare(model, BertEncoder.load(path), [inputs["input_ids"]])


def test_a_quantized_checkpoint_loads_as_stored(bert, tmp_path):
    """What `lowbit quantize` writes loads directly: the runtime equals PyTorch running the
    dequantized checkpoint, and asking for a weight mode does not re-quantize stored tensors."""
    import shutil

    import lowbit

    model, path, inputs = bert
    q, deq = tmp_path / "q", tmp_path / "deq"
    for d in (q, deq):
        d.mkdir()
        shutil.copy(path / "config.json", d / "config.json")
    spec = lowbit.QuantSpec(4, symmetric=True, granularity="group", group_size=32)
    lowbit.quantize_checkpoint(path / "model.safetensors", q / "model.safetensors", spec)
    lowbit.dequantize_checkpoint(q / "model.safetensors", deq / "model.safetensors")
    reference = BertModel.from_pretrained(deq).eval()
    stored = BertEncoder.load(q)
    cv.assert_close(reference, stored, inputs)
    assert torch.equal(stored(**inputs), BertEncoder.load(q, weights="int8")(**inputs))
    assert not cv.compare(model, stored, inputs).passed  # the stored codes really are 4-bit


@pytest.mark.parametrize("spec_args", [dict(bits=4, symmetric=True, granularity="group", group_size=32),
                                       dict(bits=3, symmetric=False, granularity="group", group_size=16),
                                       dict(bits=8, symmetric=False, granularity="channel", axis=0),
                                       dict(bits=6, symmetric=True, granularity="tensor"),
                                       dict(bits=2, symmetric=False, granularity="group", group_size=24)])
def test_a_quantized_checkpoint_runs_the_integer_gemm_with_8_bit_activations(bert, tmp_path, spec_args):
    """With act_bits=8 the stored codes feed the integer GEMM (any width, symmetric or not, per
    tensor, channel or group, groups not a multiple of 8 included): the runtime equals PyTorch
    running the dequantized checkpoint with the same per-token int8 activations, layer by layer."""
    import shutil

    import lowbit

    model, path, inputs = bert
    q, deq = tmp_path / "q", tmp_path / "deq"
    for d in (q, deq):
        d.mkdir()
        shutil.copy(path / "config.json", d / "config.json")
    lowbit.quantize_checkpoint(path / "model.safetensors", q / "model.safetensors", lowbit.QuantSpec(**spec_args))
    lowbit.dequantize_checkpoint(q / "model.safetensors", deq / "model.safetensors")
    reference = BertModel.from_pretrained(deq).eval()
    runtime = BertEncoder.load(q, act_bits=8)
    cv.assert_close(cv.simulate(reference, "f32", act_bits=8), runtime, inputs, mode="quantization", isolate=True)
    # The integer GEMM is not the float one: without activation quantization the check fails.
    assert not cv.compare(reference, runtime, inputs, isolate=True).passed
