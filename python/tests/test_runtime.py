"""The Rust runtime's BERT encoder against transformers.BertModel on random configs."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForMaskedLM, BertModel

import lowbit
from lowbit.runtime import BertEncoder


def make(tmp_path, seed=0, pooler=True, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=257, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
               max_position_embeddings=40, type_vocab_size=3)
    cfg.update(overrides)
    model = BertModel(BertConfig(**cfg), add_pooling_layer=pooler).eval()
    path = tmp_path / f"bert{seed}"
    model.save_pretrained(path)
    return model, path


def inputs(batch, length, vocab=257, types=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for b in range(1, batch):
        mask[b, max(1, length - 3 * b):] = 0  # right padding of varied lengths
    return ids, mask, torch.randint(0, types, (batch, length), generator=g)


@pytest.mark.parametrize(
    "seed, overrides",
    [
        (0, {}),
        (1, dict(hidden_act="gelu_new", num_hidden_layers=3)),
        (2, dict(hidden_act="relu", hidden_size=30, num_attention_heads=5, intermediate_size=64)),
        (3, dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-5, num_attention_heads=1)),
    ],
)
def test_matches_transformers(tmp_path, seed, overrides):
    model, path = make(tmp_path, seed, **overrides)
    enc = BertEncoder.load(path)
    for batch, length in [(1, 1), (1, 7), (4, 19), (3, 40)]:
        ids, mask, tt = inputs(batch, length, seed=seed + length)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
            ref0 = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = enc(ids, mask, tt)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
        torch.testing.assert_close(enc(ids.numpy(), mask.numpy()), ref0.numpy(), rtol=0, atol=1e-4)


def test_records_every_layer_like_torch_hooks(tmp_path):
    model, path = make(tmp_path)
    enc = BertEncoder.load(path)
    ids, mask, tt = inputs(3, 12)
    seen = {}
    names = ["embeddings", "pooler"] + [f"encoder.layer.{i}{s}" for i in range(2)
                                         for s in ("", ".attention", ".attention.self", ".intermediate")]
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: seen.__setitem__(n, out[0] if isinstance(out, tuple) else out)) for n in names]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    for h in hooks:
        h.remove()
    _, rec = enc.forward(ids, mask, tt, record=True)
    assert set(rec) == set(names)
    for n in names:
        torch.testing.assert_close(rec[n], seen[n], rtol=0, atol=1e-4, msg=n)


def test_embed_is_mean_pooled_and_normalised(tmp_path):
    model, path = make(tmp_path)
    ids, mask, _ = inputs(4, 16)
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask[..., None].float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
    got = BertEncoder.load(path).embed(ids, mask)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert np.allclose(np.linalg.norm(got.numpy(), axis=1), 1, atol=1e-6)


def test_embed_skips_only_columns_nobody_attends_to(tmp_path):
    # Every row padded on the right (the trailing columns no row attends to are not computed),
    # a hole inside a row, and a row of padding only: the same embeddings as transformers.
    model, path = make(tmp_path, seed=5)
    enc = BertEncoder.load(path)
    ids, _, tt = inputs(4, 20, seed=5)
    mask = torch.zeros_like(ids)
    mask[0, :9], mask[1, :4], mask[2, [0, 1, 5, 6, 7]] = 1, 1, 1
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    m = mask[..., None].float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
    got = enc.embed(ids, mask, tt)
    torch.testing.assert_close(got[:3], ref[:3], rtol=0, atol=1e-5)
    assert torch.isfinite(got).all()
    # What the skipped columns hold is still checked.
    bad = ids.clone()
    bad[0, -1] = 257
    with pytest.raises(lowbit.LowbitValueError, match="vocabulary"):
        enc.embed(bad, mask)
    tt[1, -1] = 3
    with pytest.raises(lowbit.LowbitValueError, match="token_type_ids"):
        enc.embed(ids, mask, tt)


def test_loads_task_checkpoints_and_single_files(tmp_path):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=16)
    mlm = BertForMaskedLM(cfg).eval()
    mlm.save_pretrained(tmp_path / "mlm")  # names carry "bert.", plus the "cls." head
    enc = BertEncoder.load(tmp_path / "mlm" / "model.safetensors")
    ids, mask, _ = inputs(2, 9, vocab=100, types=2)
    with torch.no_grad():
        ref = mlm.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(enc(ids, mask), ref, rtol=0, atol=1e-4)
    # f16 and bf16 checkpoints load too (converted to float32).
    model, path = make(tmp_path, pooler=False)
    for dt in (torch.float16, torch.bfloat16):
        d = tmp_path / str(dt)
        d.mkdir()
        save_file({k: v.to(dt).contiguous() for k, v in model.state_dict().items()}, d / "model.safetensors")
        (d / "config.json").write_text((path / "config.json").read_text())
        half = BertModel(model.config, add_pooling_layer=False).eval()
        half.load_state_dict({k: v.to(dt).float() for k, v in model.state_dict().items()})
        with torch.no_grad():
            ref = half(input_ids=ids % 257, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(BertEncoder.load(d)(ids % 257, mask), ref, rtol=0, atol=1e-4)


def test_bad_checkpoints_name_what_is_wrong(tmp_path):
    model, path = make(tmp_path, pooler=False)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    cfg = (path / "config.json").read_text()

    def write(tensors, name):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, d / "model.safetensors")
        (d / "config.json").write_text(cfg)
        return d

    missing = dict(sd)
    del missing["encoder.layer.1.output.dense.bias"]
    missing["encoder.layer.7.extra"] = torch.zeros(3)
    with pytest.raises(lowbit.LowbitValueError, match=r'missing \["encoder.layer.1.output.dense.bias"\]; unexpected \["encoder.layer.7.extra"\]'):
        BertEncoder.load(write(missing, "missing"))
    wrong = dict(sd)
    wrong["embeddings.LayerNorm.weight"] = torch.zeros(5)
    with pytest.raises(lowbit.LowbitValueError, match="wrong shapes"):
        BertEncoder.load(write(wrong, "wrong"))
    with pytest.raises(lowbit.LowbitIOError):
        BertEncoder.load(tmp_path / "nowhere")
    bad = write(sd, "badcfg")
    (bad / "config.json").write_text(json.dumps(json.loads(cfg) | {"hidden_act": "swiglu9"}))
    with pytest.raises(lowbit.LowbitValueError, match="unsupported activation"):
        BertEncoder.load(bad)
    (bad / "config.json").write_text(json.dumps(json.loads(cfg) | {"position_embedding_type": "relative_key"}))
    with pytest.raises(lowbit.LowbitValueError, match="absolute"):
        BertEncoder.load(bad)
    # found by fuzz/run.sh: a corrupt layer count built 10^9 expected names before any check
    (bad / "config.json").write_text(json.dumps(json.loads(cfg) | {"num_hidden_layers": 10**9}))
    with pytest.raises(lowbit.LowbitFormatError, match="asks for 1000000000 layers, but the file holds only"):
        BertEncoder.load(bad)
    trunc = write(sd, "trunc")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(lowbit.LowbitFormatError):
        BertEncoder.load(trunc)
    with pytest.raises(lowbit.LowbitValueError, match="weights must be"):
        BertEncoder.load(path, weights="int3")


def test_bad_inputs(tmp_path):
    _, path = make(tmp_path)
    enc = BertEncoder.load(path)
    ids = np.zeros((2, 5), np.int64)
    for args, kind, message in [
        ((np.full((1, 5), 257),), lowbit.LowbitValueError, "outside the vocabulary"),
        ((np.full((1, 5), -1),), lowbit.LowbitValueError, "outside the vocabulary"),
        ((np.zeros((1, 41), np.int64),), lowbit.LowbitValueError, "max_position_embeddings"),
        ((ids, np.ones((2, 4), np.int64)), lowbit.LowbitValueError, "attention_mask has shape"),
        ((ids, np.full((2, 5), 2)), lowbit.LowbitValueError, "only 0 and 1"),
        ((ids, None, np.full((2, 5), 3)), lowbit.LowbitValueError, "token_type_ids must lie"),
        ((np.zeros((2, 5)),), lowbit.LowbitTypeError, "integers"),
        ((np.zeros((2, 0), np.int64),), lowbit.LowbitValueError, "empty"),
        ((np.zeros((2, 2, 2), np.int64),), lowbit.LowbitValueError, r"\(batch, length\)"),
    ]:
        with pytest.raises(kind, match=message):
            enc(*args)
    # Non-contiguous and boolean masks are accepted.
    big = np.zeros((4, 10), np.int64)
    out = enc(big[::2, ::2], np.ones((4, 10), bool)[::2, ::2])
    assert out.shape == (2, 5, 48)


@pytest.mark.parametrize("mode, spec", [
    ("int8", dict(bits=8, symmetric=True, granularity="channel", axis=0)),
    ("int4", dict(bits=4, symmetric=True, granularity="group", group_size=32)),
])
def test_integer_weights_match_torch_with_the_same_quantization(tmp_path, mode, spec):
    """int8 / int4 runtime layers equal a torch model whose linear weights went through
    lowbit.quantize with the same QuantSpec (fake-quant simulation = deployed model)."""
    model, path = make(tmp_path, hidden_size=64, intermediate_size=128)
    spec = lowbit.QuantSpec(**spec)
    sim = BertModel(model.config, add_pooling_layer=True).eval()
    sim.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, mod in sim.named_modules():
            if isinstance(mod, torch.nn.Linear) and not name.startswith("pooler"):
                w = mod.weight.numpy()
                mod.weight.copy_(torch.from_numpy(lowbit.quantize(w, spec).dequantize()))
    ids, mask, tt = inputs(3, 14)
    with torch.no_grad():
        ref = sim(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        full = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    got = BertEncoder.load(path, weights=mode)(ids, mask, tt)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    assert (got - full).abs().max() > 1e-4  # the quantization is really applied


def test_ternary_weights_match_the_bitnet_reference(tmp_path):
    """Ternary layers: absmean codes, per-token int8 activations, exact integer products."""
    model, path = make(tmp_path)
    layers = {}

    def ternary(mod, x):
        w = mod.weight
        s = 1 / w.abs().mean().clamp(min=1e-5)
        codes = (w * s).round().clamp(-1, 1)
        sx = 127 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
        q = (x * sx).round().clamp(-128, 127)
        return ((q.double() @ codes.double().T) * (1 / s.double()) / sx.double() + mod.bias.double()).float()

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.startswith("pooler"):
            layers[name] = mod
            mod.forward = lambda x, mod=mod: ternary(mod, x)
    ids, mask, tt = inputs(2, 11)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    got = BertEncoder.load(path, weights="ternary")(ids, mask, tt)
    assert layers
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("field, value", [
    ("layer_norm_eps", -1), ("layer_norm_eps", 0), ("layer_norm_eps", 1e-50), ("layer_norm_eps", 1e300),
    ("layer_norm_eps", "1e-12"), ("layer_norm_eps", None),
    ("hidden_size", 0), ("hidden_size", 2**64), ("hidden_size", 2**64 - 1), ("hidden_size", 2**40),
    ("hidden_size", -48), ("hidden_size", 48.5), ("vocab_size", 0), ("num_attention_heads", 0),
    ("num_attention_heads", 5), ("intermediate_size", 0), ("max_position_embeddings", 0),
    ("type_vocab_size", 0), ("num_hidden_layers", 2**64), ("num_hidden_layers", -1),
])
def test_config_values_are_validated_by_name(tmp_path, field, value):
    # layer_norm_eps = -1 ran and gave all-NaN output; 0 and 2^64 were taken too
    _, path = make(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | {field: value}))
    named = "num_attention_heads" if (field, value) == ("num_attention_heads", 5) else field
    with pytest.raises(lowbit.LowbitValueError, match=named) as e:
        BertEncoder.load(path)
    assert "config.json" in str(e.value)


def test_edge_config_values_still_load(tmp_path):
    # the accepted ends of the ranges: one head, a large eps, an embeddings-only encoder
    for overrides in (dict(num_attention_heads=1), dict(layer_norm_eps=0.5), dict(num_hidden_layers=0)):
        model, path = make(tmp_path / str(len(list(tmp_path.iterdir()))), **overrides)
        ids, mask, tt = inputs(2, 6)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        torch.testing.assert_close(BertEncoder.load(path)(ids, mask, tt), ref, rtol=0, atol=1e-4)


def test_a_folder_with_one_quantized_file_loads_and_others_name_what_they_hold(tmp_path):
    model, path = make(tmp_path, pooler=False)
    # `lowbit quantize` output beside config.json, no model.safetensors: the folder loads
    q = tmp_path / "q"
    q.mkdir()
    (q / "config.json").write_text((path / "config.json").read_text())
    lowbit.quantize_checkpoint(path / "model.safetensors", q / "model.q4.safetensors",
                               lowbit.QuantSpec(4, granularity="group", group_size=16))
    ids, mask, tt = inputs(2, 9)
    by_folder, by_file = BertEncoder.load(q)(ids, mask, tt), BertEncoder.load(q / "model.q4.safetensors")(ids, mask, tt)
    torch.testing.assert_close(by_folder, by_file, rtol=0, atol=0)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    assert 0 < (by_folder - full).abs().max() < 1  # the stored 4-bit weights are used
    # two candidates: the error names both and what the folder needs
    lowbit.quantize_checkpoint(path / "model.safetensors", q / "model.q8.safetensors", lowbit.QuantSpec(8))
    with pytest.raises(lowbit.LowbitValueError) as e:
        BertEncoder.load(q)
    msg = str(e.value)
    for want in ("config.json", "model.q4.safetensors", "model.q8.safetensors", "model.safetensors",
                 "give the path"):
        assert want in msg, msg
    # a PyTorch checkpoint only
    pt = tmp_path / "pt"
    pt.mkdir()
    (pt / "config.json").write_text("{}")
    (pt / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(lowbit.LowbitValueError, match=r"pytorch_model\.bin.*safe_serialization=True"):
        BertEncoder.load(pt)
    # model.safetensors wins over other files, as before
    (path / "model.q4.safetensors").write_bytes((q / "model.q4.safetensors").read_bytes())
    torch.testing.assert_close(BertEncoder.load(path)(ids, mask, tt), full, rtol=0, atol=1e-4)


def test_a_ptq_bert_runs_in_the_runtime_as_stored(tmp_path):
    """A BertModel quantized by lowbit.ptq (GPTQ, 3 and 2 bits, mixed per layer) and saved by
    PTQResult.save beside its config.json: BertEncoder runs the stored codes (dequantized once),
    equal to transformers running the quantized model; rotated results are refused."""
    from lowbit.ptq import quantize_model

    model, path = make(tmp_path, pooler=False)
    ids, mask, tt = inputs(4, 12)
    data = [dict(input_ids=i, attention_mask=m, token_type_ids=t) for i, m, t in zip(*(x.split(2) for x in inputs(8, 12, seed=1)))]
    spec = {"*.intermediate.*": lowbit.QuantSpec(2, symmetric=False, granularity="group", group_size=16),
            "encoder.*": lowbit.QuantSpec(3, symmetric=False, granularity="group", group_size=16)}
    r = quantize_model(model, data, spec)
    assert len(r.layers) == 12
    q = tmp_path / "q"
    q.mkdir()
    (q / "config.json").write_text((path / "config.json").read_text())
    r.save(model, q / "model.safetensors")
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    torch.testing.assert_close(BertEncoder.load(q)(ids, mask, tt), want, rtol=0, atol=1e-4)
    stored = lowbit.load_quantized(q / "model.safetensors")
    assert stored["encoder.layer.0.intermediate.dense.weight"].spec.bits == 2
    assert stored["encoder.layer.1.attention.self.query.weight"].spec.bits == 3
    # Rotated and AWQ-scaled layers: stored in their basis, the runtime transforms the inputs.
    for kw in (dict(rotate="hadamard", asymmetric=True), dict(method="awq+gptq", grid="mse")):
        torch.manual_seed(0)
        model, _ = make(tmp_path, pooler=False)
        r = quantize_model(model, data, spec, **kw)
        r.save(model, q / "model.safetensors", metadata={"note": "x"})
        assert lowbit.checkpoint_metadata(q / "model.safetensors")["note"] == "x"
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        torch.testing.assert_close(BertEncoder.load(q)(ids, mask, tt), want, rtol=0, atol=1e-4)
    # The model changed since: refused, nothing written.
    with torch.no_grad():
        model.encoder.layer[0].output.dense.weight.add_(1.0)
    with pytest.raises(lowbit.LowbitValueError, match="does not compute"):
        r.save(model, q / "changed.safetensors")
    assert not (q / "changed.safetensors").exists()


def test_bad_input_transforms_are_format_errors(tmp_path):
    import json

    model, path = make(tmp_path, pooler=False)
    name = "encoder.layer.0.attention.self.query.weight"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for bad, match in ((json.dumps({name: {"scales": [1.0] * 3}}), "positive finite"),
                       (json.dumps({name: {"scales": [-1.0] * 48}}), "positive finite"),
                       (json.dumps({"nope": {"rotation_seed": 1}}), "not a matrix"),
                       (json.dumps({name: {"rotate": 1}}), "unknown field"),
                       ("[1", "input_transforms")):
        lowbit.save_checkpoint(path / "model.safetensors", state, {"lowbit.input_transforms": bad})
        with pytest.raises(lowbit.LowbitFormatError, match=match):
            BertEncoder.load(path)
