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


@pytest.mark.parametrize("weights", ["int8", "int4", "ternary"])
def test_fake_quant_simulation_predicts_the_deployed_model(bert, weights):
    model, path, inputs = bert
    runtime = BertEncoder.load(path, weights=weights)
    cv.assert_close(cv.simulate(model, weights), runtime, inputs, mode="quantization")
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


def test_bad_arguments(bert):
    model, path, inputs = bert
    with pytest.raises(ValueError, match="mode must be"):
        cv.compare(model, BertEncoder.load(path), inputs, mode="exact")
    with pytest.raises(ValueError, match="weights must be"):
        cv.simulate(model, "int3")
    with pytest.raises(ValueError, match="dict of keyword"):
        cv.compare(model, BertEncoder.load(path), [inputs["input_ids"]])
