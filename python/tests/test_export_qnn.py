"""lowbit.export.onnx(..., target="qnn"): the QDQ form for ONNX Runtime's QNN execution provider
(Qualcomm HTP). Checked here: every operator is a QDQ node unit, shapes are fixed, lowbit's
weight codes and activation scales are the file's, ONNX Runtime's CPU provider runs it close to
lowbit's simulation; and, where the onnxruntime-qnn wheel is installed, its HTP backend (in
simulation on x86) takes the whole graph and computes the same codes within one output step."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

import lowbit  # noqa: E402
import lowbit.torch as lt  # noqa: E402
from lowbit.export import onnx as export_onnx  # noqa: E402
from lowbit.export import session  # noqa: E402

QDQ = ("QuantizeLinear", "DequantizeLinear")


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.GELU(), torch.nn.Linear(48, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 8)).eval()


def _cnn(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()


def _qnn_devices(ort: object, qnn: object) -> list:
    """The QNN plugin's devices, its library registered once per process."""
    name = qnn.get_ep_name()  # type: ignore[attr-defined]
    devices = [d for d in ort.get_ep_devices() if d.ep_name == name]  # type: ignore[attr-defined]
    if not devices:
        ort.register_execution_provider_library(name, qnn.get_library_path())  # type: ignore[attr-defined]
        devices = [d for d in ort.get_ep_devices() if d.ep_name == name]  # type: ignore[attr-defined]
    return devices


def _node_units(model: object) -> None:
    """Every operator reads its float inputs from DequantizeLinear and writes QuantizeLinear."""
    graph = model.graph  # type: ignore[attr-defined]
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    for n in graph.node:
        if n.op_type in QDQ:
            continue
        for i in n.input:
            if i and i in producer:
                assert producer[i].op_type == "DequantizeLinear", f"{n.name} reads {i} from {producer[i].op_type}"
        for o in n.output:
            assert all(r.op_type == "QuantizeLinear" for r in readers.get(o, [])), f"{n.name}'s {o} is not quantized"
            assert o not in {g.name for g in graph.output}, f"{n.name} writes a float graph output"


@pytest.mark.parametrize("weights", ["channel", "tensor"])
def test_mlp_and_cnn_are_node_units_with_lowbits_numbers(tmp_path, weights):
    for make, shape in ((_mlp, (16, 64)), (_cnn, (2, 3, 12, 12))):
        net = make(3)
        data = [torch.randn(*shape) for _ in range(4)]
        cal = lt.calibrate(net, data, weight_spec=lowbit.QuantSpec(8, symmetric=True, granularity=weights, axis=0),
                           progress=False)
        path = str(tmp_path / "qnn.onnx")
        report = export_onnx(net, data[0], path, calibration=cal, target="qnn", calibration_data=data)
        assert set(report.weights) == set(cal) and set(report.weights.values()) == {"int8"}
        model = onnx.load(path)
        onnx.checker.check_model(model, full_check=True)
        _node_units(model)
        dims = [d for i in model.graph.input for d in i.type.tensor_type.shape.dim]
        assert all(d.HasField("dim_value") for d in dims), "QNN's HTP needs fixed shapes"
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
        for name, fqs in cal.items():
            layer = net.get_submodule(name)
            fq = fqs["weight"]
            # The codes in the file are lowbit's: the weight fake-quant's integers.
            node = next(n for n in dq.values() if n.input[0].startswith(f"{name}.weight"))
            codes = inits[node.input[0]]
            if isinstance(layer, torch.nn.Linear):
                codes = codes.T
            w = layer.weight.detach()
            if fq.axis is None:
                want = torch.quantize_per_tensor(w, float(fq.scale), int(fq.zero_point), torch.qint8).int_repr()
            else:
                want = torch.quantize_per_channel(w, fq.scale.double(), fq.zero_point.long(), 0, torch.qint8).int_repr()
            np.testing.assert_array_equal(codes, want.numpy())
            # The layer's input quantizer is lowbit's, as uint8 (zero point + 128 for int8).
            a = fqs["input"]
            reads = next(n for n in model.graph.node if n.op_type in ("Gemm", "Conv", "MatMul")
                         and n.input[1] == node.output[0])
            q = dq[reads.input[0]]
            assert float(inits[q.input[1]]) == float(a.scale), (make.__name__, name, q.input)
            shift = 128 if a.quant_min < 0 else 0
            assert inits[q.input[2]].dtype == np.uint8 and int(inits[q.input[2]]) == int(a.zero_point) + shift
        # ONNX Runtime's CPU provider: lowbit's simulation plus 8-bit outputs of every op.
        ref = str(tmp_path / "cpu.onnx")
        export_onnx(net, data[0], ref, calibration=cal)
        x = data[1].numpy()
        got, want = session(path).run(None, {"input": x})[0], session(ref).run(None, {"input": x})[0]
        cos = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
        assert cos > 0.999, cos


def test_what_the_htp_cannot_run_is_refused(tmp_path):
    net = _mlp(4)
    data = [torch.randn(16, 64) for _ in range(2)]
    path = tmp_path / "m.onnx"
    cal = lt.calibrate(net, data, progress=False)
    with pytest.raises(lowbit.LowbitValueError, match="calibration_data"):
        export_onnx(net, data[0], path, calibration=cal, target="qnn")
    with pytest.raises(lowbit.LowbitValueError, match="target"):
        export_onnx(net, data[0], path, calibration=cal, target="npu")
    group = {"0.weight": lowbit.quantize(net[0].weight.detach().numpy(),
                                         lowbit.QuantSpec(4, granularity="group", group_size=16))}
    with pytest.raises(lowbit.LowbitValueError, match="blocked"):
        export_onnx(net, data[0], path, quantized=group, target="qnn", calibration_data=data)
    two = {"0.weight": lowbit.quantize(net[0].weight.detach().numpy(), lowbit.QuantSpec(2))}
    with pytest.raises(lowbit.LowbitValueError, match="4- and 8-bit weights"):
        export_onnx(net, data[0], path, quantized=two, target="qnn", calibration_data=data)
    cal4 = lt.calibrate(net, data, spec=lowbit.QuantSpec(4, symmetric=False), progress=False)
    with pytest.raises(lowbit.LowbitValueError, match="8- and 16-bit activations"):
        export_onnx(net, data[0], path, calibration=cal4, target="qnn", calibration_data=data)
    seq = [torch.randn(2, 5, 64) for _ in range(2)]  # 3-D: a MatMul, per tensor only on the HTP
    cal3 = lt.calibrate(net, seq, progress=False)
    with pytest.raises(lowbit.LowbitValueError, match="MatMul weights per tensor"):
        export_onnx(net, seq[0], path, calibration=cal3, target="qnn", calibration_data=seq)
    assert not path.exists()


def test_the_htp_backend_runs_the_whole_graph(tmp_path):
    """ONNX Runtime's QNN provider with the HTP backend (simulated on x86 Linux): one QNN
    partition holds every operator, and its outputs are the CPU provider's within one step of
    the output quantizer (the HTP rounds its integer arithmetic its own way)."""
    import json

    import onnxruntime as ort  # type: ignore[import-untyped]

    qnn = pytest.importorskip("onnxruntime_qnn", reason="the onnxruntime-qnn wheel is not installed (pip install "
                                                         "onnxruntime-qnn): the HTP backend cannot be run here")
    devices = _qnn_devices(ort, qnn)
    for make, shape in ((_mlp, (16, 64)), (_cnn, (2, 3, 12, 12))):
        net = make(5)
        data = [torch.randn(*shape) for _ in range(4)]
        cal = lt.calibrate(net, data, progress=False)
        path = str(tmp_path / "qnn.onnx")
        export_onnx(net, data[0], path, calibration=cal, target="qnn", calibration_data=data)
        so = ort.SessionOptions()
        so.add_provider_for_devices(devices, {"backend_path": qnn.get_qnn_htp_path()})
        so.enable_profiling = True
        so.profile_file_prefix = str(tmp_path / "profile")
        htp = ort.InferenceSession(path, so)
        x = data[2].numpy()
        got = htp.run(None, {"input": x})[0]
        events = json.load(open(htp.end_profiling()))
        ops = {(e["args"].get("provider"), e["args"].get("op_name")) for e in events
               if e.get("cat") == "Node" and "provider" in e.get("args", {})}
        on_cpu = {op for p, op in ops if p == "CPUExecutionProvider"}
        assert any(p == "QNNExecutionProvider" for p, _ in ops)
        assert on_cpu <= {"QuantizeLinear", "DequantizeLinear"}, on_cpu  # the graph's own input and output
        want = session(path).run(None, {"input": x})[0]
        model = onnx.load(path)
        out_dq = next(n for n in model.graph.node if n.output[0] == model.graph.output[0].name)
        step = float(numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == out_dq.input[1])))
        assert float(np.abs(got - want).max()) <= step * 1.01


def test_the_htp_backend_runs_the_multitask_vlm(tmp_path):
    """The demo VLM's image path (ViT encoder and retrieval head: LayerNorm, attention, GELU),
    calibrated with per-tensor weights (its Linears see 3-D inputs: MatMuls), in one QNN
    partition on the HTP backend."""
    import json

    import onnxruntime as ort

    qnn = pytest.importorskip("onnxruntime_qnn", reason="the onnxruntime-qnn wheel is not installed: the HTP "
                                                         "backend cannot be run here")
    from lowbit import models

    cfg = models.MultiTaskConfig(width=32, depth=1, heads=2, decoder_depth=1, vqa_depth=1, embed_dim=16,
                                 text={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                       "intermediate_size": 64})
    torch.manual_seed(6)
    vlm = models.MultiTaskVLM(cfg).eval()
    data = [{"images": torch.rand(2, cfg.channels, cfg.image_size, cfg.image_size), "task": "image"} for _ in range(3)]
    cal = lt.calibrate(vlm, data, weight_spec=lowbit.QuantSpec(8, symmetric=True, granularity="tensor"), progress=False)
    path = str(tmp_path / "vlm.onnx")
    report = export_onnx(vlm, data[0], path, calibration=cal, target="qnn", calibration_data=data)
    assert report.weights and set(report.weights.values()) == {"int8"}
    so = ort.SessionOptions()
    so.add_provider_for_devices(_qnn_devices(ort, qnn), {"backend_path": qnn.get_qnn_htp_path()})
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "profile")
    htp = ort.InferenceSession(path, so)
    x = data[1]["images"].numpy()
    got = htp.run(None, {"images": x})[0]
    events = json.load(open(htp.end_profiling()))
    on_cpu = {e["args"]["op_name"] for e in events if e.get("cat") == "Node"
              and e.get("args", {}).get("provider") == "CPUExecutionProvider"}
    assert on_cpu <= {"QuantizeLinear", "DequantizeLinear"}, on_cpu
    want = session(path).run(None, {"images": x})[0]
    with torch.no_grad():
        f = vlm(data[1]["images"], task="image").numpy()
    # The HTP's integer arithmetic rounds its own way: as far from ORT's CPU as the CPU is from float.
    assert float(np.abs(got - want).max()) <= 0.05 * float(np.abs(f).max())
