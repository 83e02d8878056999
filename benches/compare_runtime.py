"""Benchmark lowbit's Rust runtime (BertEncoder) against transformers' BertModel on PyTorch.

Method
------
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

Run: ``python benches/compare_runtime.py [--hidden 384] [--layers 6] [--heads 12] [--batch 8] [--length 128]``
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile

import numpy as np
import torch
from benchutil import best_time as _best_time

best_time = functools.partial(_best_time, pause=0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
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
