"""lowbit's low-bit matmul kernels per core against PyTorch's float32 and int8 GEMMs, in the same run.

Method
------
* Shapes (m x k -> n): 1x4096->4096, 8x4096->4096, 64x4096->4096, 1024x384->1536, 1024x1536->384
  (decode GEMV, small batch, batch, and MiniLM's FFN shapes), plus a 1x16384->16384 GEMV whose
  64 MiB of packed ternary weights exceed the last-level cache.
* lowbit ternary: ``TernaryLinear._core.int_matmul`` (int8 activations x packed 2-bit codes, the
  integer kernel alone) and ``TernaryLinear`` (float in, float out: per-token int8 activation
  quantization and the rescale included). lowbit int8 / int4: ``IntLinear`` on
  ``QuantSpec(8, per output channel)`` and ``QuantSpec(4, groups of 32)`` weights (W8A8 / W4A8,
  float in, float out, activation quantization and rescale included; the runtime's
  ``weights="int8" | "int4"`` with ``act_bits=8``). torch f32: ``x @ w.T``. torch int8:
  ``torch._int_mm`` (int8 x int8 -> int32, no quantization or rescale), where it runs on this CPU.
* G MAC/s = m*k*n / time, best of ``--repeat`` after warm-ups; every thread count runs in a fresh
  process. Ceilings: the copy bandwidth (``np.copyto``, 256 MiB) for GEMVs, as bytes of packed
  weights per second; for GEMMs the int8 MAC rate of a tight register-only loop of the
  instruction lowbit's kernels use (``vpdpbusd`` with AVX-512 VNNI, else ``maddubs``), per thread
  times the thread count; the rate torch._int_mm reaches at 1024^3 is printed beside it.
* Integer results are checked against NumPy int64 before timing.
* Not measured yet: ggml / bitnet.cpp in the same run.

Run: ``python benches/compare_kernels.py [--threads 1,2] [--repeat 10]``. Quote ratios from a
quiet machine only: the load average is printed beside them.
"""

from __future__ import annotations

import os

import numpy as np
from benchutil import best_time, copy_bandwidth, main_per_thread_count

SHAPES = [(1, 4096, 4096), (8, 4096, 4096), (64, 4096, 4096), (1024, 384, 1536), (1024, 1536, 384)]


def _child(threads: int, repeat: int) -> None:
    import torch

    import lowbit
    import lowbit.bitnet as bn
    from lowbit import _lowbit

    torch.set_num_threads(threads)
    r = np.random.default_rng(0)
    bw = copy_bandwidth(repeat)
    a8 = torch.randint(-128, 128, (1024, 1024), dtype=torch.int8)
    try:
        int_mm = 1024**3 / best_time(lambda: torch._int_mm(a8, a8), repeat) / 1e9
    except RuntimeError:
        int_mm = float("nan")
    probe = _lowbit.intgemm_peak(0.5)
    name, peak = (probe[0], threads * probe[1] / 1e9) if probe else ("none", float("nan"))
    print(f"\n== {threads} thread(s); load average {os.getloadavg()[0]:.2f}; copy bandwidth {bw / 1e9:.1f} GB/s; "
          f"int8 MAC ceiling ({name} loop x {threads}) {peak:.1f} G MAC/s; torch._int_mm (1024^3) {int_mm:.1f} ==")
    print(f"{'shape':18s} {'tern int':>9s} {'tern f32io':>10s} {'int8 f32io':>10s} {'int4 f32io':>10s} "
          f"{'torch f32':>9s} {'torch int8':>10s} {'tern/f32':>8s} {'tern/int8':>9s} {'int8/f32':>8s} "
          f"{'int4/f32':>8s}  ceiling")
    for m, k, n in SHAPES + [(1, 16384, 16384)]:
        codes = r.integers(-1, 2, (n, k), dtype=np.int8)
        layer = bn.TernaryLinear(codes, 1.0)
        q = r.integers(-128, 128, (m, k), dtype=np.int8)
        if m * n <= 64 * 4096:
            assert np.array_equal(layer._core.int_matmul(q), q.astype(np.int64) @ codes.astype(np.int64).T)
        x = r.standard_normal((m, k)).astype(np.float32)
        t_int = best_time(lambda: layer._core.int_matmul(q), repeat, pause=0.2)
        t_lin = best_time(lambda: layer(x), repeat, pause=0.2)
        t_q = {}
        if k * n <= 4096 * 4096:
            wf = r.standard_normal((n, k)).astype(np.float32)
            for bits, spec in ((8, lowbit.QuantSpec(8, granularity="channel", axis=0)),
                               (4, lowbit.QuantSpec(4, granularity="group", group_size=32))):
                il = bn.IntLinear(lowbit.quantize(wf, spec))
                t_q[bits] = best_time(lambda: il(x), repeat, pause=0.2)
        else:
            t_q = {8: float("nan"), 4: float("nan")}
        xt, wt = torch.from_numpy(x), torch.from_numpy(codes.astype(np.float32))
        t_f32 = best_time(lambda: xt @ wt.T, repeat, pause=0.2) if k * n <= 4096 * 4096 else float("nan")
        try:
            qa, qb = torch.from_numpy(q), torch.from_numpy(codes).T.contiguous()
            t_i8 = best_time(lambda: torch._int_mm(qa, qb), repeat, pause=0.2) if k * n <= 4096 * 4096 else float("nan")
        except RuntimeError:
            t_i8 = float("nan")
        g = lambda t: m * k * n / t / 1e9  # noqa: E731
        if m == 1:
            ceil = f"{layer.nbytes / t_int / 1e9:5.1f} GB/s of packed weights = {layer.nbytes / t_int / bw:4.0%} of copy"
        else:
            ceil = (f"tern {g(t_int) / peak:4.0%}, int8 {g(t_q[8]) / peak:4.0%}, int4 {g(t_q[4]) / peak:4.0%} "
                    "of the MAC ceiling") if peak == peak else "-"
        print(f"{m}x{k}->{n:<8d} {g(t_int):9.1f} {g(t_lin):10.1f} {g(t_q[8]):10.1f} {g(t_q[4]):10.1f} "
              f"{g(t_f32):9.1f} {g(t_i8):10.1f} {t_f32 / t_int:8.2f} {t_i8 / t_int:9.2f} {t_f32 / t_q[8]:8.2f} "
              f"{t_f32 / t_q[4]:8.2f}  {ceil}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def main() -> None:
    main_per_thread_count(__doc__, __file__, _child)


if __name__ == "__main__":
    main()
