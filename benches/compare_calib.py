"""Benchmark lowbit's calibration observers against torch.ao's, in the same run.

Method
------
* Ceiling: the machine's copy bandwidth, ``np.copyto(dst, src)`` into a preallocated
  destination on a 256 MiB float32 array, counted as (bytes read + bytes written) / best time.
  An observer reads its input once (4 bytes per float32 value) and writes nothing of its size,
  so its GB/s is reported as a fraction of that ceiling.
* Workload: 32 batches of 256x1024 float32 standard-normal values, batch ``i`` scaled by
  ``1 + 0.05 i`` (so the observed range keeps growing). Each timed run builds a fresh observer
  and updates it with all 32 batches: lowbit gets the NumPy arrays, torch the same memory as
  tensors (``torch.from_numpy``, no copy).
* Timing: best of ``--repeat`` runs after 2 warmup runs (``time.perf_counter``), with
  ``torch.set_num_threads(--threads)``; speedup is torch time / lowbit time.
* ``qparams()`` is timed on a HistogramObserver (2048 bins) that has seen the workload, for
  every method at 2, 4 and 8 bits, beside torch's ``calculate_qparams()`` on the same data.
* SQNR: 2^22 samples of a unit-variance Gaussian and Laplacian (``default_rng(2024)``),
  observed in 8 chunks, fake-quantized with each observer's qparams on the asymmetric range
  ``0..2^bits-1``; SQNR = 10 log10(sum x^2 / sum (x - fq(x))^2).

Run: ``python benches/compare_calib.py [--repeat N] [--threads N]``
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import numpy as np
import torch
from torch.ao.quantization import HistogramObserver as TorchHist
from torch.ao.quantization import MinMaxObserver as TorchMinMax
from torch.ao.quantization import PerChannelMinMaxObserver as TorchPerChannel

from benchutil import best_time, copy_bandwidth

import lowbit
import lowbit.calib as lc

METHODS = ("mse", "sqnr", "percentile", "entropy")
QP_BITS = (2, 4, 8)
SQNR_BITS = (2, 3, 4, 8)
TARGETS = {"gaussian": (8.26, 13.91, 19.26, 40.57), "laplacian": (6.84, 11.43, 15.98, 35.21)}


def feed(obs: Any, batches: list) -> Any:
    """Observe every batch (lowbit ``update`` or a torch observer's forward); return ``obs``."""
    for b in batches:
        obs(b)
    return obs


def torch_hist(bits: int) -> TorchHist:
    """torch's HistogramObserver on the asymmetric range 0..2^bits-1 (quint8 at 8 bits)."""
    return TorchHist(quant_min=0, quant_max=2**bits - 1)


def sqnr_db(x: np.ndarray, qparams: tuple[Any, Any], bits: int) -> float:
    """SQNR in dB of ``x`` fake-quantized with ``(scale, zero_point)`` on 0..2^bits-1."""
    scale, zp = float(qparams[0]), int(qparams[1])
    err = x - lowbit.fake_quantize_per_tensor_affine(x, scale, zp, 0, 2**bits - 1)
    return float(10 * np.log10(np.square(x).sum(dtype=np.float64) / np.square(err).sum(dtype=np.float64)))


def grid_optimum(x: np.ndarray, bits: int, scale: float, zp: int) -> float:
    """Best SQNR of a brute-force search on the data itself: scales 0.8x..1.25x ``scale`` (then
    refined to 0.1%), zero points ``zp - 1 .. zp + 1``. Tells whether a target is reachable."""
    def best(scales: np.ndarray) -> tuple[float, float]:
        return max((sqnr_db(x, (s, z), bits), s) for s in scales for z in range(zp - 1, zp + 2))
    _, s1 = best(scale * np.geomspace(0.8, 1.25, 19))
    return best(s1 * np.linspace(0.985, 1.015, 13))[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per function (best is kept)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lowbit.show_config()  # the machine and the kernel paths behind every figure below
    rep = args.repeat

    bw = copy_bandwidth(rep)
    print(f"lowbit {lowbit.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"torch threads {torch.get_num_threads()}, best of {rep}")
    print(f"copy bandwidth ceiling (np.copyto, 256 MiB, read+write): {bw / 1e9:.2f} GB/s\n")

    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((256, 1024), dtype=np.float32) * np.float32(1 + 0.05 * i) for i in range(32)]
    ts = [torch.from_numpy(x) for x in xs]
    n_values = sum(x.size for x in xs)
    cases: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
        ("HistogramObserver (mse, 2048 bins)", lambda: feed(lc.HistogramObserver(), xs), lambda: feed(TorchHist(), ts)),
        ("MinMaxObserver", lambda: feed(lc.MinMaxObserver(), xs), lambda: feed(TorchMinMax(), ts)),
        ("PerChannelMinMaxObserver axis 0", lambda: feed(lc.PerChannelMinMaxObserver(axis=0), xs),
         lambda: feed(TorchPerChannel(ch_axis=0), ts)),
    ]
    print(f"update over 32 batches of 256x1024 float32 ({n_values / 2**20:.0f} Mi values, {4 * n_values / 2**20:.0f} MiB)")
    hdr = f"{'observer':<36}{'lowbit ms':>10}{'torch ms':>10}{'speedup':>9}{'Mvalues/s':>11}{'GB/s':>8}{'of copy':>9}"
    print(hdr + "\n" + "-" * len(hdr))
    speedups: dict[str, float] = {}
    for name, lb, tf in cases:
        lb_s, t_s = best_time(lb, rep), best_time(tf, rep)
        speedups[name] = t_s / lb_s
        gbs = 4 * n_values / lb_s
        print(f"{name:<36}{lb_s * 1e3:>10.2f}{t_s * 1e3:>10.2f}{t_s / lb_s:>8.1f}x{n_values / lb_s / 1e6:>11.0f}"
              f"{gbs / 1e9:>8.2f}{gbs / bw:>9.0%}")

    print("\nqparams() of a 2048-bin HistogramObserver that saw the workload (ms)")
    hdr = f"{'method':<34}" + "".join(f"{f'{b} bits':>10}" for b in QP_BITS)
    print(hdr + "\n" + "-" * len(hdr))
    qp_ms: dict[tuple[str, int], float] = {}
    for m in METHODS:
        for b in QP_BITS:
            obs = feed(lc.HistogramObserver(bits=b, method=m, bins=2048), xs)
            qp_ms[m, b] = best_time(obs.qparams, rep) * 1e3
        print(f"{'lowbit ' + m:<34}" + "".join(f"{qp_ms[m, b]:>10.2f}" for b in QP_BITS))
    t_qp = [best_time(feed(torch_hist(b), ts).calculate_qparams, rep) * 1e3 for b in QP_BITS]
    print(f"{'torch calculate_qparams()':<34}" + "".join(f"{t:>10.2f}" for t in t_qp))

    print("\nTargets:")
    sp = speedups[cases[0][0]]
    print(f"  {'PASS' if sp >= 10 else 'MISS'} HistogramObserver update: {sp:.1f}x torch (target >= 10x)")
    for b in QP_BITS:
        ms = qp_ms["mse", b]
        print(f"  {'PASS' if ms < 10 else 'MISS'} qparams(method='mse', bins=2048) at {b} bits: {ms:.2f} ms (target < 10 ms)")

    rng = np.random.default_rng(2024)
    data = {"gaussian": rng.standard_normal(2**22, dtype=np.float32),
            "laplacian": rng.laplace(0.0, 1 / np.sqrt(2), 2**22).astype(np.float32)}
    print("\nSQNR (dB) on 2^22 samples, asymmetric range 0..2^bits-1, observers fed in 8 chunks")
    hdr = (f"{'data':<10}{'bits':>5}{'mse':>8}{'entropy':>9}{'pctile':>8}{'minmax':>8}{'torch':>8}{'search':>8}"
           f"{'target':>8}  mse vs target (>= -0.1 dB) and torch")
    print(hdr + "\n" + "-" * len(hdr))
    torch_s = 0.0
    for dname, x in data.items():
        chunks = np.array_split(x, 8)
        tchunks = [torch.from_numpy(c) for c in chunks]
        for b, target in zip(SQNR_BITS, TARGETS[dname]):
            qp = {m: feed(lc.HistogramObserver(bits=b, method=m), chunks).qparams() for m in ("mse", "entropy", "percentile")}
            row = {m: sqnr_db(x, q, b) for m, q in qp.items()}
            row["minmax"] = sqnr_db(x, feed(lc.MinMaxObserver(bits=b), chunks).qparams(), b)
            t0 = time.perf_counter()
            tq = feed(torch_hist(b), tchunks).calculate_qparams()
            torch_s += time.perf_counter() - t0
            row["torch"] = sqnr_db(x, (tq[0].item(), tq[1].item()), b)
            row["search"] = grid_optimum(x, b, float(qp["mse"][0]), int(qp["mse"][1]))
            ok = row["mse"] >= target - 0.1 and row["mse"] >= row["torch"]
            print(f"{dname:<10}{b:>5}{row['mse']:>8.2f}{row['entropy']:>9.2f}{row['percentile']:>8.2f}"
                  f"{row['minmax']:>8.2f}{row['torch']:>8.2f}{row['search']:>8.2f}{target:>8.2f}  {'PASS' if ok else 'MISS'}"
                  f" ({row['mse'] - target:+.2f} dB vs target, {row['mse'] - row['torch']:+.2f} dB vs torch)")
    print(f"(torch's HistogramObserver took {torch_s:.2f} s in all for the {2 * len(SQNR_BITS)} observers above, "
          "update + calculate_qparams)")
    print("('search': the best SQNR a brute-force search over scale and zero point finds on the data itself)")


if __name__ == "__main__":
    main()
