"""Post-training quantization of the demo's multi-task model (the float model lowbit ships, as
``lowbit demo`` uses it): task metrics on the demo's held-out scenes at int4 / int3 / int2
(asymmetric groups of 32 inputs, every linear layer and the patch convolution) by each
``lowbit.ptq`` method, calibrated on training scenes, against the float model. Called by
``compare_ptq.py --model vlm``; run alone: ``python benches/ptq_vlm.py [--scenes 256]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

import lowbit
from lowbit import demo, models
from lowbit.data import SyntheticScenes
from lowbit.ptq import quantize_model

#: (label, quantize_model keywords): round to nearest, HQQ, AWQ, GPTQ and its combinations.
METHODS = [("rtn", dict(method="rtn")), ("hqq", dict(method="hqq")), ("awq", dict(method="awq")),
           ("gptq", dict(method="gptq")), ("gptq+asym", dict(method="gptq", asymmetric=True)),
           ("gptq+mse+hadamard+asym", dict(method="gptq", grid="mse", rotate="hadamard", asymmetric=True))]


def vlm_rows(scenes: int = 256, n_eval: int = 200, bits: tuple[int, ...] = (4, 3, 2), methods: str = "") -> None:
    """Prints one table: the float model's task metrics, then each method at each bit width."""
    d = demo.DEFAULTS
    f32, _ = demo._trained(d["steps"], d["qat_steps"], d["n_train"], d["seed"], False, False, lambda s: None)
    c = f32.config
    held = list(SyntheticScenes(seed=12345, n=n_eval, image_size=c.image_size))  # the demo's held-out scenes
    calib = models.calibration_batches(SyntheticScenes(seed=d["seed"], n=scenes, image_size=c.image_size), c)
    tasks = ("caption_exact", "ocr_char_acc", "vqa_acc", "retrieval_r1")
    print(f"\nmulti-task VLM (lowbit demo's float model), {scenes} calibration scenes, {n_eval} held-out scenes, "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'weights':10s} {'method':24s} {'caption EM':>10s} {'OCR char':>9s} {'VQA':>6s} {'R@1':>6s} {'seconds':>8s}")
    ref = models.evaluate(f32, held)
    print(f"{'f32':10s} {'':24s} " + " ".join(f"{ref[t]:{w}.1f}" for t, w in zip(tasks, (10, 9, 6, 6))))
    for b in bits:
        spec = lowbit.QuantSpec(b, symmetric=False, granularity="group", group_size=32)
        for label, kw in METHODS:
            if methods and label not in methods.split(","):
                continue
            m = copy.deepcopy(f32)
            t = time.perf_counter()
            r = quantize_model(m, calib, spec, progress=False, **kw)
            secs = time.perf_counter() - t
            got = models.evaluate(m, held)
            worst = max(ref[t] - got[t] for t in tasks)
            print(f"W{b} g32    {r.method:24s} " + " ".join(f"{got[t]:{w}.1f}" for t, w in zip(tasks, (10, 9, 6, 6)))
                  + f" {secs:8.1f}  worst task {-worst:+.1f} points")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenes", type=int, default=256)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="", help="comma-separated labels to run (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lowbit.show_config()
    vlm_rows(args.scenes, args.eval, methods=args.methods)


if __name__ == "__main__":
    main()
