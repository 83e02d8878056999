"""The Rust runtime's MultiTaskModel against lowbit.models.MultiTaskVLM, layer by layer."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as _save_numpy
from safetensors.torch import save_file as _save_torch

import lowbit
import lowbit.crossval as cv
from lowbit import models
from lowbit.models import MultiTaskConfig, MultiTaskVLM
from lowbit.runtime import MultiTaskModel

TEXT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
CONFIGS = {
    "small": dict(width=32, depth=1, heads=2, decoder_depth=1, vqa_depth=1, embed_dim=16, text=TEXT),
    "patch16": dict(width=32, depth=2, heads=2, decoder_depth=2, vqa_depth=2, embed_dim=24, patch_size=16,
                    ocr_steps=3, mlp_ratio=3, text=dict(TEXT, num_hidden_layers=2)),
    "gray48": dict(image_size=48, channels=1, width=64, depth=1, heads=4, decoder_depth=1, vqa_depth=1,
                   embed_dim=16, max_caption_len=9, max_question_len=10, max_text_len=14, layer_norm_eps=1e-5,
                   text=dict(TEXT, num_attention_heads=4, hidden_act="gelu_new")),
}
QUESTIONS = ["what color is the circle ?", "how many shapes are there ?", "what is the first character ?"]
TEXTS = ["a red circle", "a blue square left of a red circle", "two", "a green triangle"]
PREFIXES = ("vision", "caption_head", "ocr_head", "vqa_head", "retrieval.image_proj", "retrieval.text")
ROUTED = {"caption": {"vision", "caption_head"}, "ocr": {"vision", "ocr_head"}, "vqa": {"vision", "vqa_head"},
          "image": {"vision", "retrieval.image_proj"}, "text": {"retrieval.text"}}


def _signed(save):
    """safetensors' writer, giving a file with lowbit metadata the ``lowbit.sha256`` lowbit would
    compute (a file lowbit marks as its own must carry a valid one), so that what these tests
    reach is the checking of the metadata and tensors behind the digest."""
    import hashlib
    import pathlib
    import struct

    def write(tensors, path, metadata=None):
        lowbits = bool(metadata) and any(k.startswith("lowbit.") for k in metadata)
        save(tensors, str(path), metadata={**metadata, "lowbit.sha256": "0" * 64} if lowbits else metadata)
        if lowbits:
            raw = bytearray(pathlib.Path(path).read_bytes())
            key = b'"lowbit.sha256":"' + b"0" * 64 + b'"'
            at = raw.index(key, 8, 8 + struct.unpack("<Q", raw[:8])[0]) + len(key) - 65
            raw[at:at + 64] = hashlib.sha256(raw).hexdigest().encode()
            pathlib.Path(path).write_bytes(bytes(raw))

    return write


save_numpy, save_file = _signed(_save_numpy), _signed(_save_torch)


def save_f32(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path,
              metadata={models.CONFIG_KEY: model.config.to_json()})


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def vlm(request, tmp_path_factory):
    torch.manual_seed(sorted(CONFIGS).index(request.param))
    model = MultiTaskVLM(MultiTaskConfig(**CONFIGS[request.param])).eval()
    path = tmp_path_factory.mktemp("vlm") / f"{request.param}.safetensors"
    save_f32(model, path)
    return model, path


def task_inputs(model, seed=0):
    c = model.config
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(3, c.channels, c.image_size, c.image_size, generator=g)
    caption = torch.randint(0, c.vocab_size, (3, c.max_caption_len - 2), generator=g)
    caption[:, 0] = c.bos_id
    qids, qmask = model.encode_questions(QUESTIONS)
    tids, tmask = model.encode_texts(TEXTS[:3])
    return {
        "caption": dict(images=images, task="caption", ids=caption),
        "ocr": dict(images=images, task="ocr"),
        "vqa": dict(images=images, task="vqa", ids=qids, mask=qmask),
        "image": dict(images=images, task="image"),
        "text": dict(task="text", ids=tids, mask=tmask),
    }


@pytest.mark.parametrize("task", list(ROUTED))
def test_float_runtime_matches_torch_layer_by_layer(vlm, task):
    model, path = vlm
    runtime = MultiTaskModel.load(path)
    inputs = task_inputs(model)[task]
    r = cv.assert_close(model, runtime, inputs)
    names = [layer.name for layer in r.layers]
    # Only the routed parts run and record; they cover every block's sublayers.
    _, rec = runtime.forward(**inputs, record=True)
    assert {p for p in PREFIXES if any(n == p or n.startswith(p + ".") for n in rec)} == ROUTED[task]
    # Every recorded name is a torch module's output, or (":input") the input of one.
    assert {n.removesuffix(cv.INPUT) for n in rec} <= set(dict(model.named_modules())) and len(names) == len(rec) + 1
    if task != "text":
        assert {f"vision.blocks.0.{s}{cv.INPUT}" for s in ("attn.out", "mlp.fc2")} <= set(rec)
    if task != "text":
        c = model.config
        blocks = [f"vision.blocks.{i}" for i in range(c.depth)]
        assert all(f"{b}.{s}" in rec for b in blocks for s in ("attn", "mlp", "norm1", "norm2"))
        assert names[0] == "vision.patch"
    else:
        assert "retrieval.text.encoder.layer.0.attention.self" in rec and "retrieval.text_proj" in rec
    # numpy in, numpy out (the same values); torch in, torch out.
    out = runtime.forward(**inputs)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np_inputs = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    np_out = runtime(**np_inputs)
    assert isinstance(np_out, np.ndarray) and np.array_equal(np_out, out.numpy())


def test_default_masks_follow_padding(vlm):
    model, path = vlm
    runtime = MultiTaskModel.load(path)
    inputs = task_inputs(model)
    for task in ("vqa", "text"):
        ids = inputs[task]["ids"]
        with torch.no_grad():
            ref = model(inputs[task].get("images"), task, ids)
        torch.testing.assert_close(runtime(inputs[task].get("images"), task, ids), ref, rtol=0, atol=1e-5)


def test_padding_columns_are_skipped_exactly(vlm):
    # Without record=True the text tower and the question encoder skip the trailing columns
    # that no row attends to; with it every column runs (each layer at its torch shape).
    model, path = vlm
    runtime = MultiTaskModel.load(path)
    c = model.config
    images = task_inputs(model, seed=4)["ocr"]["images"]
    for task, n in (("text", c.max_text_len), ("vqa", c.max_question_len)):
        g = torch.Generator().manual_seed(n)
        ids = torch.randint(5, c.vocab_size, (3, n), generator=g)
        mask = torch.zeros_like(ids)
        mask[0, :4], mask[1, [0, 1, 3]], mask[2, :2] = 1, 1, 1
        imgs = None if task == "text" else images
        with torch.no_grad():
            ref = model(imgs, task, ids, mask)
        got = runtime(imgs, task, ids, mask)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
        recorded, _ = runtime.forward(imgs, task, ids, mask, record=True)
        torch.testing.assert_close(got, recorded, rtol=0, atol=1e-6)
        bad = ids.clone()
        bad[1, -1] = c.vocab_size
        with pytest.raises(lowbit.LowbitValueError, match="vocabulary"):
            runtime(imgs, task, bad, mask)
        mask[2, -1] = 2
        with pytest.raises(lowbit.LowbitValueError, match="0 and 1"):
            runtime(imgs, task, ids, mask)


def test_decoding_matches_torch(vlm):
    model, path = vlm
    runtime = MultiTaskModel.load(path)
    c = model.config
    images = task_inputs(model, seed=3)["ocr"]["images"]
    for max_len, beam in [(None, 1), (4, 1), (None, 3), (c.max_caption_len, 5)]:
        assert runtime.caption(images, max_len, beam) == model.caption(images, max_len, beam), (max_len, beam)
    assert runtime.caption(images.numpy(), 1) == model.caption(images, 1)
    assert runtime.ocr(images) == model.ocr(images)
    assert runtime.vqa(images, QUESTIONS) == model.vqa(images, QUESTIONS)
    for k in (1, 3, 10):
        got = runtime.retrieve(images, TEXTS, k=k)
        assert isinstance(got, torch.Tensor) and torch.equal(got, model.retrieve(images, TEXTS, k=k))
    assert isinstance(runtime.retrieve(images.numpy(), TEXTS), np.ndarray)
    ids, mask = model.encode_texts(TEXTS)
    torch.testing.assert_close(runtime.embed_texts(TEXTS), model.embed_texts(TEXTS).numpy(), rtol=0, atol=1e-5)
    torch.testing.assert_close(runtime.embed_texts(ids, mask), model.embed_texts(ids, mask), rtol=0, atol=1e-5)
    torch.testing.assert_close(runtime.embed_images(images), model.embed_images(images), rtol=0, atol=1e-5)
    assert runtime.config == c and repr(runtime).startswith("MultiTaskModel(")


@pytest.mark.parametrize("weights", ["int8", "int4", "binary"])
def test_simulated_quantization_predicts_the_runtime(vlm, weights):
    model, path = vlm
    runtime = MultiTaskModel.load(path, weights=weights)
    sim = cv.simulate(model, weights)
    for task, inputs in task_inputs(model).items():
        cv.assert_close(sim, runtime, inputs, mode="quantization")
    assert not cv.compare(model, runtime, task_inputs(model)["ocr"], mode="quantization").passed


def assert_isolated_close(sim, runtime, inputs):
    """Every recorded layer agrees to the quantization tolerance (1e-5) on the runtime's own
    input (``isolate=True``): the int8 activation-code flips that float rounding upstream causes
    do not travel into later layers. Returns the names compared."""
    return [layer.name for layer in cv.assert_close(sim, runtime, inputs, mode="quantization", isolate=True).layers]


@pytest.mark.parametrize("weights, act_bits", [("ternary", None), ("int8", 8), ("int4", 8)])
def test_quantized_activations_match_layer_by_layer(vlm, weights, act_bits):
    """weights="ternary" puts every nn.Linear on the packed ternary kernel with int8 activations
    (as BitLinear simulates); act_bits quantizes float layers' inputs the same way. End to end, a
    one-ulp difference of a LayerNorm output can flip one int8 activation code and move a layer's
    output by ~1e-3 (measured, ternary on other random images: vision.blocks.0.mlp by 3.5e-3 from one
    code of 6144; here ocr_head.head of 'gray48' at int8 + act_bits=8 by 1.1e-3), beyond the 1e-5
    tolerance; so each layer is checked on the runtime's own input (isolate=True, with the
    attention context and the MLP activation recorded as inputs of the layers after them), and
    end to end only the cosine of the outputs."""
    model, path = vlm
    runtime = MultiTaskModel.load(path, weights=weights, act_bits=act_bits)
    sim = cv.simulate(model, weights, act_bits=act_bits)
    seen = set()
    for task, inputs in task_inputs(model).items():
        seen |= set(assert_isolated_close(sim, runtime, inputs))
        assert cv.compare(sim, runtime, inputs, mode="quantization").layers[-1].cosine > 0.9999
    c = model.config
    assert {"caption_head.head", "vqa_head.head", "ocr_head.head", "retrieval.image_proj", "retrieval.text_proj",
            f"vision.blocks.{c.depth - 1}.mlp", "caption_head.blocks.0.cross", "vqa_head.blocks.0.attn",
            "retrieval.text.encoder.layer.0.intermediate", "retrieval.text.encoder.layer.0"} <= seen


def test_saved_quantized_files_run_as_stored(vlm, tmp_path):
    """Files lowbit.models.save writes: int8 ones equal the dequantized torch model; ternary ones
    run their stored codes on the ternary kernel (BitLinear of the original weights), never
    re-quantized by the load-time weights mode."""
    model, _ = vlm
    inputs = task_inputs(model)
    for weights in ("int8", "int4", "int2"):
        path = tmp_path / f"{weights}.safetensors"
        models.save(model, path, weights=weights)
        stored = MultiTaskModel.load(path)
        reference = models.load(path)
        for task in ROUTED:
            cv.assert_close(reference, stored, inputs[task])
        assert torch.equal(stored(**inputs["ocr"]), MultiTaskModel.load(path, "ternary")(**inputs["ocr"]))
        assert not cv.compare(model, stored, inputs["ocr"]).passed

    models.save(model, tmp_path / "ternary.safetensors", weights="ternary")
    meta = lowbit.checkpoint_metadata(tmp_path / "ternary.safetensors")
    assert "retrieval.text.encoder.layer.0.output.dense.weight" in json.loads(meta["lowbit.ternary"])
    tern = MultiTaskModel.load(tmp_path / "ternary.safetensors")
    # The float model of the file's other tensors, with BitLinear on the original linear weights.
    reference = models.load(tmp_path / "ternary.safetensors")
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    reference.load_state_dict({k: model.state_dict()[k] if k in linear else v for k, v in reference.state_dict().items()})
    sim = cv.simulate(reference, "ternary")
    for task in ROUTED:
        assert_isolated_close(sim, tern, inputs[task])
    for weights in ("f32", "ternary", "int4"):
        other = MultiTaskModel.load(tmp_path / "ternary.safetensors", weights)
        assert torch.equal(tern(**inputs["vqa"]), other(**inputs["vqa"]))
    # Not the float product of the dequantized weights: activations are int8.
    assert not cv.compare(models.load(tmp_path / "ternary.safetensors"), tern, inputs["ocr"], mode="quantization").passed
    with pytest.raises(lowbit.LowbitValueError, match="ternary layers quantize activations to 8 bits"):
        MultiTaskModel.load(tmp_path / "ternary.safetensors", act_bits=4)


def test_bad_ternary_metadata_is_a_format_error(tmp_path):
    torch.manual_seed(0)
    model = MultiTaskVLM(MultiTaskConfig(**CONFIGS["small"])).eval()
    models.save(model, tmp_path / "t.safetensors", weights="ternary")
    from safetensors import safe_open

    with safe_open(tmp_path / "t.safetensors", "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        # rewritten by another tool (which gives it a valid digest: see _signed)
        meta = {k: v for k, v in f.metadata().items() if k != "lowbit.sha256"}

    def write(name, **changes):
        p = tmp_path / name
        save_numpy(tensors, p, metadata={**meta, **changes})
        return p

    for listed, why in [("vision.norm.weight", "not stored quantized"),          # float
                        ("caption_head.embed.weight", "stored as 8 bits"),       # int8 per channel
                        ("no.such.tensor", "not stored quantized")]:
        with pytest.raises(lowbit.LowbitFormatError, match=why):
            MultiTaskModel.load(write("bad.safetensors", **{"lowbit.ternary": json.dumps([listed])}))
    with pytest.raises(lowbit.LowbitFormatError, match="bad lowbit.ternary metadata"):
        MultiTaskModel.load(write("bad.safetensors", **{"lowbit.ternary": "{not json"}))
    f32 = tmp_path / "f32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f32,
              metadata={models.CONFIG_KEY: model.config.to_json(), "lowbit.ternary": '["ocr_head.head.weight"]'})
    with pytest.raises(lowbit.LowbitFormatError, match="not a lowbit quantized checkpoint"):
        MultiTaskModel.load(f32)


def test_bad_inputs_raise_lowbit_errors(vlm):
    model, path = vlm
    runtime = MultiTaskModel.load(path)
    c = model.config
    inputs = task_inputs(model)
    images = inputs["ocr"]["images"]
    E = lowbit.LowbitError
    cases = [
        (lambda: runtime(images[:, :, :-1], "ocr"), "images must be"),
        (lambda: runtime(images[0], "ocr"), "images must be"),
        (lambda: runtime(None, "image"), "images must be"),
        (lambda: runtime(images[:0], "ocr"), "empty"),
        (lambda: runtime(images, "segment"), "task must be one of"),
        (lambda: runtime(images, "caption"), "needs ids"),
        (lambda: runtime(None, "text"), "needs ids"),
        (lambda: runtime(images, "caption", torch.full((3, 2), c.vocab_size)), "outside the vocabulary"),
        (lambda: runtime(images, "caption", torch.full((3, 2), -1)), "outside the vocabulary"),
        (lambda: runtime(images, "caption", torch.ones(3, c.max_caption_len + 1, dtype=torch.long)), "exceed the maximum"),
        (lambda: runtime(images, "caption", torch.ones(2, 3, dtype=torch.long)), "batch"),
        (lambda: runtime(images, "caption", torch.ones(3, 0, dtype=torch.long)), "empty"),
        (lambda: runtime(images, "caption", torch.ones(3, 2)), "integers"),
        (lambda: runtime(images, "vqa", torch.ones(3, c.max_question_len + 1, dtype=torch.long)), "exceed the maximum"),
        (lambda: runtime(images, "vqa", inputs["vqa"]["ids"], inputs["vqa"]["mask"] * 2), "only 0 and 1"),
        (lambda: runtime(images, "vqa", inputs["vqa"]["ids"], inputs["vqa"]["mask"][:, :3]), "shape"),
        (lambda: runtime(None, "text", torch.ones(2, c.max_text_len + 1, dtype=torch.long)), "exceed"),
        (lambda: runtime(None, "text", inputs["text"]["ids"], inputs["text"]["mask"] - 1), "only 0 and 1"),
        (lambda: runtime(None, "text", torch.full((1, 3), 10**6)), "outside the vocabulary"),
        (lambda: runtime.caption(images, 0), "max_len"),
        (lambda: runtime.caption(images, c.max_caption_len + 1), "max_len"),
        (lambda: runtime.caption(images, 3, beam=0), "beam"),
        (lambda: runtime.caption(images, 3, beam=True), "beam"),
        (lambda: runtime.vqa(images, QUESTIONS[:2]), "batch"),
        (lambda: runtime.vqa(images, "what color ?"), "list of strings"),
        (lambda: runtime.retrieve(images, TEXTS, k=0), "k must be"),
        (lambda: runtime.retrieve(images, [], k=1), "at least one text"),
        (lambda: runtime.ocr(np.zeros((2, 5), np.float32)), "images must be"),
        (lambda: runtime.embed_texts(np.zeros((0, 3), np.int64)), "empty"),
    ]
    for call, match in cases:
        with pytest.raises(E, match=match):
            call()


def test_bad_files_name_what_is_wrong(tmp_path):
    torch.manual_seed(0)
    cfg = MultiTaskConfig(**CONFIGS["small"])
    sd = {k: v.contiguous() for k, v in MultiTaskVLM(cfg).state_dict().items()}
    meta = {models.CONFIG_KEY: cfg.to_json()}

    def write(tensors, metadata, name="m.safetensors"):
        save_file(tensors, tmp_path / name, metadata=metadata)
        return tmp_path / name

    with pytest.raises(lowbit.LowbitFormatError, match="no \"lowbit.multitask\" metadata"):
        MultiTaskModel.load(write(sd, None))
    with pytest.raises(lowbit.LowbitFormatError, match="bad lowbit.multitask config JSON"):
        MultiTaskModel.load(write(sd, {models.CONFIG_KEY: "{oops"}))
    d = json.loads(cfg.to_json())
    with pytest.raises(lowbit.LowbitFormatError, match="unknown field `colour`"):
        MultiTaskModel.load(write(sd, {models.CONFIG_KEY: json.dumps(d | {"colour": 1})}))
    with pytest.raises(lowbit.LowbitFormatError, match="missing field `width`"):
        MultiTaskModel.load(write(sd, {models.CONFIG_KEY: json.dumps({k: v for k, v in d.items() if k != "width"})}))
    with pytest.raises(lowbit.LowbitValueError, match="not a multiple of heads"):
        MultiTaskModel.load(write(sd, {models.CONFIG_KEY: json.dumps(d | {"heads": 3})}))
    with pytest.raises(lowbit.LowbitValueError, match="unsupported activation"):
        MultiTaskModel.load(write(sd, {models.CONFIG_KEY: json.dumps(d | {"text": d["text"] | {"hidden_act": "swish9"}})}))
    broken = dict(sd)
    del broken["vqa_head.blocks.0.cross.k.bias"]
    broken["ocr_head.extra"] = torch.zeros(2)
    broken["vision.pos_embed"] = torch.zeros(1, 3, 32)
    broken["retrieval.text.encoder.layer.0.output.dense.weight"] = torch.zeros(32, 63)
    with pytest.raises(lowbit.LowbitValueError,
                       match=r'missing \["vqa_head.blocks.0.cross.k.bias"\]; unexpected \["ocr_head.extra"\]; wrong shapes '
                             r'\["vision.pos_embed: \[1, 3, 32\] in the file, \[1, 64, 32\] expected", '
                             r'"retrieval.text.encoder.layer.0.output.dense.weight: \[32, 63\] in the file, \[32, 64\] '
                             r'expected"\]'):
        MultiTaskModel.load(write(broken, meta))
    # found by fuzz/run.sh: a corrupt layer count built 10^9 expected names before any check
    for field in ("depth", "decoder_depth", "vqa_depth"):
        with pytest.raises(lowbit.LowbitFormatError, match="layers, but the file holds only"):
            MultiTaskModel.load(write(sd, {models.CONFIG_KEY: json.dumps(d | {field: 10**9})}))
    with pytest.raises(lowbit.LowbitFormatError, match="layers, but the file holds only"):
        MultiTaskModel.load(write(sd, {models.CONFIG_KEY: json.dumps(d | {"text": d["text"] | {"num_hidden_layers": 10**9}})}))
    with pytest.raises(lowbit.LowbitIOError):
        MultiTaskModel.load(tmp_path / "nowhere.safetensors")
    path = write(sd, meta)
    with pytest.raises(lowbit.LowbitValueError, match="weights must be"):
        MultiTaskModel.load(path, weights="int3")
    with pytest.raises(lowbit.LowbitTypeError):
        MultiTaskModel.load(path, weights=8)
    (tmp_path / "trunc.safetensors").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(lowbit.LowbitFormatError):
        MultiTaskModel.load(tmp_path / "trunc.safetensors")


def test_exported():
    assert "MultiTaskModel" in lowbit.runtime.__all__
    assert MultiTaskModel.WEIGHTS == lowbit.runtime.BertEncoder.WEIGHTS


def test_a_ptq_model_runs_in_the_runtime_as_stored(vlm, tmp_path):
    """lowbit.ptq's GPTQ codes (any bits and group size, the patch convolution included) saved
    with models.save(quantized=...): the runtime runs them as stored, equal layer by layer to the
    PyTorch model quantize_model left; rotated and AWQ-scaled layers with their inputs
    transformed online."""
    from lowbit.data import SyntheticScenes
    from lowbit.ptq import quantize_model

    model, _ = vlm
    c = model.config
    twin = MultiTaskVLM(c).eval()
    twin.load_state_dict(model.state_dict())
    scenes = [dict(s, image=s["image"][:c.channels]) for s in SyntheticScenes(seed=3, n=8, image_size=c.image_size)]
    calib = models.calibration_batches(scenes, c, batch_size=4)
    assert {b["task"] for b in calib} == {"caption", "ocr", "vqa", "text", "image"}
    spec = lowbit.QuantSpec(3, symmetric=False, granularity="group", group_size=16)
    r = quantize_model(twin, calib, spec)
    linear = {n for n, m in twin.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert set(r.layers) == linear  # every head's layers, though each batch runs one head
    path = tmp_path / "ptq.safetensors"
    models.save(twin, path, quantized=r)
    stored = lowbit.load_quantized(path)
    for name, q in r.tensors().items():
        np.testing.assert_array_equal(stored[name].int_repr(), q.int_repr())
    runtime = MultiTaskModel.load(path)
    inputs = task_inputs(model)
    for task in ROUTED:
        cv.assert_close(twin, runtime, inputs[task])
    torch.testing.assert_close(models.load(path)(**inputs["vqa"]), twin(**inputs["vqa"]), rtol=0, atol=0)
    # Tensors that are not the model's deployed weights are refused, and nothing is written.
    other = tmp_path / "other.safetensors"
    with pytest.raises(lowbit.LowbitValueError, match="does not compute"):
        models.save(model, other, quantized=r)
    with pytest.raises(lowbit.LowbitValueError, match="does not compute"):
        models.save(model, other, quantized=r.tensors())
    with pytest.raises(lowbit.LowbitValueError, match="no such tensor"):
        models.save(twin, other, quantized={"nope.weight": next(iter(r.tensors().values()))})
    with pytest.raises(lowbit.LowbitTypeError):
        models.save(twin, other, quantized={"ocr_head.head.weight": np.zeros(3)})
    with pytest.raises(lowbit.LowbitTypeError):
        models.save(twin, other, quantized=3)
    assert not other.exists()
    # Rotated layers, and AWQ-scaled ones: stored in their basis, inputs transformed online.
    for kw in (dict(rotate="hadamard"), dict(method="awq+gptq")):
        twin.load_state_dict(model.state_dict())
        r = quantize_model(twin, calib, spec, **kw)
        assert all(lr.transforms_input for lr in r.layers.values())
        models.save(twin, path, quantized=r)
        meta = json.loads(lowbit.checkpoint_metadata(path)["lowbit.input_transforms"])
        assert set(meta) == set(r.tensors())
        runtime = MultiTaskModel.load(path)
        for task in ROUTED:
            cv.assert_close(twin, runtime, inputs[task])
        torch.testing.assert_close(models.load(path)(**inputs["ocr"]), twin(**inputs["ocr"]), rtol=0, atol=0)
