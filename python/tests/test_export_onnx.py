"""lowbit.export.onnx, checked by ONNX Runtime itself: every export passes onnx.checker, its
integer codes read back with onnx.numpy_helper equal lowbit's exactly, and ONNX Runtime's
outputs equal the torch model that lowbit's quantization left (its fake-quant simulation)."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

import lowbit  # noqa: E402
import lowbit.crossval  # noqa: E402
import lowbit.ptq  # noqa: E402
import lowbit.torch as lt  # noqa: E402
from lowbit.export import onnx as export_onnx  # noqa: E402
from lowbit.export import session  # noqa: E402

RTOL = 1e-5


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.GELU(), torch.nn.Linear(48, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 8))


def _run(path: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(path).run(None, feeds)


def _close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal within float32 rounding of a different summation order: 1e-5 of the output's scale."""
    scale = max(float(np.abs(want).max()), 1e-6)
    err = float(np.abs(got - want).max())
    assert err <= RTOL * scale, f"max error {err:.3g} on outputs of scale {scale:.3g}"


def _initializers(path: str) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


SPECS = [
    ("int8 per channel", lowbit.QuantSpec(8, symmetric=True, granularity="channel"), "int8", 13),
    ("uint8 per tensor", lowbit.QuantSpec(8, symmetric=False, granularity="tensor"), "uint8", 13),
    ("int4 g32", lowbit.QuantSpec(4, symmetric=True, granularity="group", group_size=32), "int4", 21),
    ("uint4 g16", lowbit.QuantSpec(4, symmetric=False, granularity="group", group_size=16), "uint4", 21),
    ("3-bit g16 (4-bit storage)", lowbit.QuantSpec(3, symmetric=False, granularity="group", group_size=16), "uint4", 21),
    ("int2 per channel", lowbit.QuantSpec(2, symmetric=True, granularity="channel"), "int2", 25),
    ("uint2 g32", lowbit.QuantSpec(2, symmetric=False, granularity="group", group_size=32), "uint2", 25),
]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("label,spec,kind,opset", SPECS, ids=[s[0] for s in SPECS])
def test_ptq_weights(tmp_path, label, spec, kind, opset, method):
    net = _mlp()
    data = [torch.randn(24, 64) for _ in range(3)]
    result = lowbit.ptq.quantize_model(net, data, spec, method=method)
    path = str(tmp_path / "mlp.onnx")
    report = export_onnx(net, data[0], path, quantized=result)
    assert report.opset == opset and set(report.weights.values()) == {kind}
    onnx.checker.check_model(onnx.load(path), full_check=True)
    inits = _initializers(path)
    for name, r in result.layers.items():
        codes = inits[f"{name}.weight_quantized"].astype(np.int32)
        np.testing.assert_array_equal(codes, r.tensor.int_repr().astype(np.int32).T)
        assert f"{name}.weight" not in inits  # the float weights are not stored
    x = torch.randn(5, 64)
    _close(_run(path, {"input": x.numpy()})[0], net(x).detach().numpy())


def test_file_size_follows_the_bits(tmp_path):
    torch.manual_seed(1)
    net = torch.nn.Linear(1024, 512, bias=False)
    data = [torch.randn(4, 1024)]
    sizes = {}
    for bits in (8, 4, 2):
        m = torch.nn.Linear(1024, 512, bias=False)
        m.load_state_dict(net.state_dict())
        r = lowbit.ptq.quantize_model(m, data, lowbit.QuantSpec(bits, symmetric=False, granularity="group", group_size=128),
                                      method="rtn")
        sizes[bits] = export_onnx(m, data[0], str(tmp_path / f"w{bits}.onnx"), quantized=r).nbytes
    codes = 1024 * 512
    # codes at bits / 8 bytes each, plus a float32 scale and a zero point per group of 128
    for bits in (8, 4, 2):
        assert codes * bits / 8 <= sizes[bits] <= codes * bits / 8 + codes / 128 * 5 + 4096, (bits, sizes)


def test_calibration_result(tmp_path):
    net = _mlp(2)
    data = [torch.randn(32, 64) for _ in range(4)]
    cal = lt.calibrate(net, data, progress=False)
    path = str(tmp_path / "cal.onnx")
    report = export_onnx(net, data[0], path, calibration=cal)
    assert report.activations == 3 and report.opset == 13
    # The simulation: every Linear's input and weight through its calibrated fake-quant.
    sim = _simulated(net, cal)
    nodes = [n.op_type for n in onnx.load(path).graph.node]
    assert nodes.count("QuantizeLinear") == 3 and nodes.count("DequantizeLinear") == 6
    x = torch.randn(7, 64) * 1.5  # some values beyond the calibrated ranges: saturation
    _close(_run(path, {"input": x.numpy()})[0], sim(x).detach().numpy())


@pytest.mark.parametrize("qmin,qmax,axis", [(-8, 7, None), (0, 15, None), (-7, 7, None), (-128, 127, 1), (0, 255, None),
                                            (-2, 1, None), (-100, 100, None)])
def test_fake_quantize_modules(tmp_path, qmin, qmax, axis):
    torch.manual_seed(3)
    if axis is None:
        fq = lt.FakeQuantize(qmin, qmax, scale=0.05, zero_point=(qmin + qmax + 1) // 2 if qmin >= 0 else 0)
    else:
        fq = lt.FakeQuantize(qmin, qmax, scale=torch.linspace(0.01, 0.05, 16), zero_point=torch.zeros(16, dtype=torch.int32),
                             axis=axis)
    net = torch.nn.Sequential(fq, torch.nn.Linear(16, 4))
    x = torch.randn(9, 16) * 2
    x[0, :4] = torch.tensor([-1e9, 1e9, 3e9, -3e9])
    if axis is None:
        x[1, :2] = torch.tensor([float("inf"), float("-inf")])
    path = str(tmp_path / "fq.onnx")
    export_onnx(net, x, path)
    got = _run(path, {"input": x.numpy()})[0]
    want = net(x).detach().numpy()
    _close(got, want)


def test_per_channel_infinity_is_the_documented_difference(tmp_path):
    """torch's per-channel fake-quant (and lowbit's, equal to it bit for bit) sends +inf to
    quant_min (its float-to-integer conversion overflows); ONNX's QuantizeLinear saturates it
    to quant_max, as the ONNX specification says."""
    fq = lt.FakeQuantize(-128, 127, scale=torch.full((2,), 0.5), zero_point=torch.zeros(2, dtype=torch.int32), axis=1)
    x = torch.tensor([[float("inf"), 1.0]])
    path = str(tmp_path / "inf.onnx")
    export_onnx(torch.nn.Sequential(fq), x, path)
    assert fq(x).tolist() == [[-64.0, 1.0]]
    assert _run(path, {"input": x.numpy()})[0].tolist() == [[63.5, 1.0]]


def test_bitlinear_is_ternary_int2(tmp_path):
    torch.manual_seed(4)
    net = torch.nn.Sequential(lt.BitLinear(64, 32), torch.nn.ReLU(), lt.BitLinear(32, 16, bias=False))
    x = torch.randn(2, 5, 64)
    path = str(tmp_path / "bit.onnx")
    report = export_onnx(net, x, path)
    assert report.opset == 25 and set(report.weights.values()) == {"int2"}
    inits = _initializers(path)
    for name in ("0", "2"):
        codes = inits[f"{name}.weight_quantized"].astype(np.int32)
        w = net.get_submodule(name).weight.detach()
        want = (w / w.abs().mean().clamp(min=1e-5)).round().clamp(-1, 1).to(torch.int32).numpy()
        np.testing.assert_array_equal(codes, want.T)
    with torch.no_grad():
        want = net.train()(x).numpy()  # the recipe's forward (STE value)
    _close(_run(path, {"input": x.numpy()})[0], want)


def test_transformers_bert_int8_and_int4(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    bert = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 120, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    data = [{"input_ids": torch.randint(0, 120, (4, 12))} for _ in range(3)]
    for bits, kind in ((8, "int8"), (4, "uint4")):
        model = transformers.BertModel(cfg).eval()
        model.load_state_dict(bert.state_dict())
        spec = (lowbit.QuantSpec(8, granularity="channel") if bits == 8 else
                lowbit.QuantSpec(4, symmetric=False, granularity="group", group_size=32))
        result = lowbit.ptq.quantize_model(model, data, spec, method="gptq", exclude=["pooler.*"])
        path = str(tmp_path / f"bert{bits}.onnx")
        report = export_onnx(model, {"input_ids": ids, "attention_mask": mask}, path, quantized=result,
                             output_names=["last_hidden_state", "pooler_output"],
                             dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}})
        assert len(report.weights) == 12 and set(report.weights.values()) == {kind}
        ids2 = torch.randint(0, 120, (2, 9))
        mask2 = torch.ones_like(ids2)
        got = _run(path, {"input_ids": ids2.numpy(), "attention_mask": mask2.numpy()})[0]
        with torch.no_grad():
            want = model(input_ids=ids2, attention_mask=mask2).last_hidden_state.numpy()
        _close(got, want)


def test_multitask_vlm_qat_heads(tmp_path):
    from lowbit import models

    cfg = models.MultiTaskConfig(width=32, depth=1, heads=2, decoder_depth=1, vqa_depth=1, embed_dim=16,
                                 text={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                       "intermediate_size": 64})
    torch.manual_seed(6)
    vlm = models.quantize_for_training(models.MultiTaskVLM(cfg), "int4").eval()
    images = torch.rand(2, cfg.channels, cfg.image_size, cfg.image_size)
    q, qm = vlm.encode_questions(["what color is the circle ?", "how many shapes are there ?"])
    t, tm = vlm.encode_texts(["a red circle", "a blue square left of a green triangle"])
    tasks = {"ocr": {"images": images, "task": "ocr"}, "image": {"images": images, "task": "image"},
             "caption": {"images": images, "task": "caption", "ids": torch.full((2, 5), cfg.bos_id)},
             "vqa": {"images": images, "task": "vqa", "ids": q, "mask": qm},
             "text": {"task": "text", "ids": t, "mask": tm}}
    for task, inputs in tasks.items():  # the encoder and every head
        path = str(tmp_path / f"{task}.onnx")
        report = export_onnx(vlm, inputs, path)
        assert report.weights and set(report.weights.values()) <= {"int4", "uint4"}
        with torch.no_grad():
            want = vlm(**inputs).numpy()
        feeds = {k: v.numpy() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        _close(_run(path, feeds)[0], want)
        assert lowbit.crossval.compare(vlm, path, inputs).passed


def _cnn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),  # depthwise
        torch.nn.Conv2d(8, 16, 3, stride=2, dilation=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 5))


def _simulated(net: torch.nn.Module, cal: dict) -> torch.nn.Module:
    """A copy of ``net`` whose calibrated layers run their weights and inputs through the
    calibrated fake-quants: what the export must compute."""
    sim = copy.deepcopy(net)
    for name, fqs in cal.items():
        layer = sim.get_submodule(name)
        with torch.no_grad():
            layer.weight.copy_(fqs["weight"](layer.weight))
        layer.register_forward_pre_hook(lambda m, a, fq=fqs["input"]: (fq(a[0]),))
    return sim


@pytest.mark.parametrize("bits", [8, 4])
def test_calibrated_cnn_conv_weights_per_channel(tmp_path, bits):
    net = _cnn(5)
    data = [torch.randn(4, 3, 12, 12) for _ in range(3)]
    cal = lt.calibrate(net, data, spec=lowbit.QuantSpec(bits, symmetric=False), progress=False)
    assert set(cal) == {"0", "2", "3", "7"}
    path = str(tmp_path / "cnn.onnx")
    report = export_onnx(net, data[0], path, calibration=cal)
    assert set(report.weights) == {"0", "2", "3", "7"} and report.activations == 4
    model = onnx.load(path)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3
    inits = _initializers(path)
    for name in ("0", "2", "3"):
        codes = inits[f"{name}.weight_quantized"]
        layer = net.get_submodule(name)
        fq = cal[name]["weight"]
        want = torch.fake_quantize_per_channel_affine(layer.weight, fq.scale, fq.zero_point, 0, fq.quant_min, fq.quant_max)
        s = inits[f"{name}.weight_scale"].reshape(-1, 1, 1, 1)
        z = inits[f"{name}.weight_zero_point"].astype(np.float32).reshape(-1, 1, 1, 1)
        assert codes.shape == tuple(layer.weight.shape)
        np.testing.assert_array_equal((codes.astype(np.float32) - z) * s, want.detach().numpy())
    x = torch.randn(2, 3, 12, 12) * 1.3
    _close(_run(path, {"input": x.numpy()})[0], _simulated(net, cal)(x).detach().numpy())


def test_conv1d_and_conv3d_ptq_weights(tmp_path):
    torch.manual_seed(8)
    for net, x in ((torch.nn.Sequential(torch.nn.Conv1d(4, 6, 3), torch.nn.ReLU(), torch.nn.Conv1d(6, 2, 1)), torch.randn(2, 4, 9)),
                   (torch.nn.Sequential(torch.nn.Conv3d(2, 3, 2)), torch.randn(1, 2, 4, 4, 4))):
        spec = lowbit.QuantSpec(4, symmetric=True, granularity="channel")
        quantized = {f"{n}.weight": lowbit.quantize(m.weight.detach().numpy(), spec) for n, m in net.named_modules()
                     if isinstance(m, torch.nn.modules.conv._ConvNd)}
        path = str(tmp_path / "conv.onnx")
        report = export_onnx(net, x, path, quantized=quantized)
        assert set(report.weights.values()) == {"int4"} and report.opset == 21
        with torch.no_grad():
            for k, qt in quantized.items():
                net.get_submodule(k[: -len(".weight")]).weight.copy_(torch.from_numpy(qt.dequantize()))
        _close(_run(path, {"input": x.numpy()})[0], net(x).detach().numpy())


def test_torchvision_resnet18_calibrated(tmp_path):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = tv.models.resnet18(num_classes=10).eval()
    data = [torch.randn(2, 3, 64, 64) for _ in range(2)]
    cal = lt.calibrate(net, data, progress=False)
    path = str(tmp_path / "resnet18.onnx")
    report = export_onnx(net, data[0], path, calibration=cal)
    assert len(report.weights) == len(cal) == 21 and report.activations == 21
    sim = _simulated(net, cal)
    x = torch.randn(1, 3, 64, 64)
    # Layer by layer, each torch layer fed what ONNX Runtime computed before it: every layer
    # (convolutions, BatchNorms before in-place ReLUs, residual blocks) within 1e-4.
    report = lowbit.crossval.compare(sim, path, {"x": x}, isolate=True)
    names = [layer.name for layer in report.layers]
    assert {"layer1.0.conv1", "layer2.0.downsample.0", "layer4.1.bn2", "fc"} <= set(names)
    assert report.passed, str(report)
    # End to end a one-ulp difference before a quantizer can move a code by one step, and the
    # step travels: close, not equal.
    end = lowbit.crossval.compare(sim, path, {"x": x})
    assert end.layers[-1].cosine > 0.9999 and [layer.name for layer in end.layers][:4] == ["conv1", "bn1", "relu", "maxpool"]
    assert all(layer.passed for layer in end.layers[:4]), str(end)


def test_bad_input_leaves_the_old_file(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    net = torch.nn.Sequential(torch.nn.ConvTranspose2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 10 * 10, 2))
    w = lowbit.quantize(np.random.randn(3, 4, 3, 3).astype(np.float32), lowbit.QuantSpec(8))
    with pytest.raises(lowbit.LowbitTypeError, match=r"0 \(ConvTranspose2d\)"):
        export_onnx(net, torch.randn(1, 3, 8, 8), path, quantized={"0.weight": w})
    conv = torch.nn.Sequential(torch.nn.Conv1d(2, 2, 1))
    g3 = lowbit.quantize(np.random.randn(2, 2, 32).astype(np.float32), lowbit.QuantSpec(4, granularity="group", group_size=32))
    with pytest.raises(lowbit.LowbitValueError, match="group-quantized"):
        export_onnx(conv, torch.randn(1, 2, 5), path, quantized={"0.weight": g3})
    with pytest.raises(lowbit.LowbitValueError, match="no module 'nope'"):
        export_onnx(net, torch.randn(1, 3, 8, 8), path, quantized={"nope.weight": w})
    with pytest.raises(lowbit.LowbitTypeError, match="torch.nn.Module"):
        export_onnx("model", torch.randn(1, 3), path)
    with pytest.raises(lowbit.LowbitTypeError, match="example_inputs"):
        export_onnx(net, 3.0, path)
    wrong = lowbit.quantize(np.random.randn(2, 5).astype(np.float32), lowbit.QuantSpec(8))
    with pytest.raises(lowbit.LowbitValueError, match="shape"):
        export_onnx(net, torch.randn(1, 3, 8, 8), path, quantized={"2.weight": wrong})

    class NoOnnxForm(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.special.zeta(x, x)

    with pytest.raises(lowbit.LowbitValueError, match="special_zeta"):
        export_onnx(NoOnnxForm(), torch.randn(3), path)
    with pytest.raises(lowbit.LowbitValueError, match="do not fit"):
        export_onnx(net, {"nonsense": torch.randn(3)}, path)
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
    # The model's own forward is back after a failed export.
    out = net(torch.randn(1, 3, 8, 8))
    assert out.shape == (1, 2)


def test_crossval_layer_by_layer_on_onnx_runtime(tmp_path):
    """lowbit.crossval.compare with the ONNX file as the runtime side: every module whose
    output the graph holds is compared with torch's, for a path, a ModelProto and a session."""
    import onnxruntime

    import lowbit.crossval
    from lowbit.export import OrtModel

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(7)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    bert = transformers.BertModel(cfg).eval()
    data = [{"input_ids": torch.randint(0, 100, (4, 10))} for _ in range(2)]
    result = lowbit.ptq.quantize_model(bert, data, lowbit.QuantSpec(8, granularity="channel"), method="rtn",
                                       exclude=["pooler.*"])
    path = str(tmp_path / "bert.onnx")
    ids = torch.randint(0, 100, (2, 10))
    mask = torch.ones_like(ids)
    export_onnx(bert, {"input_ids": ids, "attention_mask": mask}, path, quantized=result,
                dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}})
    inputs = {"input_ids": torch.randint(0, 100, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    tol = lowbit.crossval.Tolerances(inference=1e-5)
    for side in (path, onnx.load(path), onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])):
        report = lowbit.crossval.compare(bert, side, inputs, tol)
        names = [layer.name for layer in report.layers]
        assert "encoder.layer.1.attention.self.query" in names and "encoder.layer.0.output.dense" in names
        assert report.passed, str(report)
    model = OrtModel(path)
    with pytest.raises(lowbit.LowbitValueError, match="attention_mask"):
        model.forward(input_ids=inputs["input_ids"])
    with pytest.raises(lowbit.LowbitTypeError, match="onnx"):
        OrtModel(42)
    with pytest.raises(lowbit.LowbitIOError, match="cannot read"):
        OrtModel(str(tmp_path / "missing.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07junk")
    with pytest.raises(lowbit.LowbitFormatError):
        OrtModel(str(tmp_path / "junk.onnx"))
    with pytest.raises(lowbit.LowbitFormatError, match="ONNX Runtime cannot load"):
        session(str(tmp_path / "junk.onnx"))


def test_crossval_nested_containers_and_in_place_ops(tmp_path):
    """A module inside containers (``/block/block.0/lin/MatMul`` in the graph) is found under
    its torch name, and an in-place ReLU after it does not change what either side recorded."""

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)
            self.act = torch.nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.lin(x)) + x

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(inplace=True),
                              torch.nn.Sequential(Block(), Block()), torch.nn.Linear(8, 2)).eval()
    path = str(tmp_path / "nested.onnx")
    export_onnx(net, torch.randn(2, 8), path)
    x = {"input": torch.randn(5, 8)}
    for isolate in (False, True):
        report = lowbit.crossval.compare(net, path, x, isolate=isolate)
        names = [layer.name for layer in report.layers]
        assert {"0", "2.0.lin", "2.1.lin", "2.1", "3"} <= set(names), names
        assert report.passed, str(report)
        # Both sides of "0" are its output before the in-place ReLU: with negative values.
        assert report.layers[names.index("0")].max_abs < 1e-5


@pytest.mark.parametrize("big", [False, True], ids=["asked", "over the protobuf limit"])
def test_external_data(tmp_path, monkeypatch, big):
    """Initializers in one data file named by its content, written before the .onnx that names
    it; a new export replaces both and removes the old data file; ORT loads it with the same
    numbers. ``big`` stands in for a model over 2 GB by lowering the limit."""
    from lowbit.export import qdq

    if big:
        monkeypatch.setattr(qdq, "_PROTOBUF_LIMIT", 4096)
    net = _mlp(4)
    spec = lowbit.QuantSpec(4, symmetric=False, granularity="group", group_size=16)
    q = {f"{n}.weight": lowbit.quantize(m.weight.detach().numpy(), spec) for n, m in net.named_modules()
         if isinstance(m, torch.nn.Linear)}
    path = tmp_path / "m.onnx"
    ask = None if big else True
    report = export_onnx(net, torch.randn(2, 64), str(path), quantized=q, external_data=ask)
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0] == "m.onnx" and files[1].startswith("m.onnx.") and files[1].endswith(".data")
    assert report.nbytes == sum(os.path.getsize(tmp_path / f) for f in files)
    onnx.checker.check_model(str(path), full_check=True)
    for k, qt in q.items():
        assert np.array_equal(_initializers(str(path))[f"{k[:-7]}.weight_quantized"].T, qt.int_repr())
    sim = _mlp(4)
    with torch.no_grad():
        for k, qt in q.items():
            sim.get_submodule(k[:-7]).weight.copy_(torch.from_numpy(qt.dequantize()))
    x = torch.randn(5, 64)
    _close(_run(str(path), {"input": x.numpy()})[0], sim(x).detach().numpy())
    # Exported again with other weights: a new data file, the old one gone.
    q["0.weight"] = lowbit.quantize(torch.randn(48, 64).numpy(), spec)
    export_onnx(net, torch.randn(2, 64), str(path), quantized=q, external_data=ask)
    again = sorted(os.listdir(tmp_path))
    assert len(again) == 2 and again[1] != files[1]
    if big:
        with pytest.raises(lowbit.LowbitValueError, match="external_data=True"):
            export_onnx(net, torch.randn(2, 64), str(path), quantized=q, external_data=False)
        assert sorted(os.listdir(tmp_path)) == again
    else:
        export_onnx(net, torch.randn(2, 64), str(path), quantized=q)
        assert os.listdir(tmp_path) == ["m.onnx"]
