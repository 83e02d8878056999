"""Benchmark lowbit's BitNet kernels (ternary W1.58A8 and binary XNOR-popcount) against PyTorch float32.

Method
------
* Ceilings: PyTorch's float32 GEMM rate (``torch.matmul``, 2048x2048 @ 2048x2048,
  GFLOP/s = 2*M*N*K / time) and the memory copy bandwidth (``np.copyto`` into a preallocated
  destination, 256 MiB float32, bytes read + written / time).
* Each row times lowbit and the float32 PyTorch op of the same shape in the same process:
  best of ``--repeat`` runs after 2 warmup runs (``time.perf_counter``), each measurement
  starting after a 0.2 s pause so that the other library's spinning worker threads (OpenMP,
  rayon) have gone idle and do not steal a core from it. Speedup is
  ``torch time / lowbit time``; G MAC/s is ``M*N*K / time`` and per core is that / ``--threads``.
  ``--threads`` sets ``torch.set_num_threads`` and (unless already set) ``RAYON_NUM_THREADS``,
  lowbit's thread pool, so both sides use the same number of cores.
* ``int_matmul`` rows time the ternary integer kernel alone on pre-quantized int8 activations,
  separating it from the activation quantization and float rescale that ``TernaryLinear`` adds.
* The decode GEMV (1 row) is bound by reading the weights: its effective bandwidth is
  ``layer.nbytes / time`` (packed 2-bit weights), also shown as a fraction of copy bandwidth.
* Before timing, integer results are checked for exact equality with NumPy int64 products:
  ``q @ codes.T`` for ternary and ``sign(a) @ sign(b).T`` (sign(0) = +1) for binary.
* Targets are computed from the measurements: TernaryLinear 1x4096->4096 >= 10x torch,
  64x4096->4096 >= 3x, binary_matmul 256x4096 by 4096x4096 >= 5x, and ternary G MAC/s per core
  >= 92 (bitnet.cpp's reported per-core rate).

Run: ``python benches/compare_bitnet.py [--repeat N] [--threads N]``
"""

from __future__ import annotations

import argparse
import functools
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from benchutil import best_time as _best_time
from benchutil import copy_bandwidth

# Each measurement starts after a short pause, so the other library's idle threads give the
# cores back first.
best_time = functools.partial(_best_time, pause=0.2)

K = N = 4096
BITNET_CPP_GMAC_PER_CORE = 92.0


@dataclass
class Row:
    name: str
    macs: int
    lowbit_s: float
    torch_s: float

    @property
    def speedup(self) -> float:
        return self.torch_s / self.lowbit_s

    def gmacs(self) -> float:
        return self.macs / self.lowbit_s / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=7, help="timed runs per function (best is kept)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (and lowbit's pool)")
    args = ap.parse_args()
    rep, th = args.repeat, args.threads
    torch.set_num_threads(th)
    os.environ.setdefault("RAYON_NUM_THREADS", str(th))  # read when lowbit first starts its pool
    import lowbit
    import lowbit.bitnet as bn

    lowbit.show_config()  # the machine and the kernel paths behind every figure below

    rng = np.random.default_rng(0)
    g = torch.from_numpy(rng.standard_normal((2048, 2048), dtype=np.float32))
    gemm = 2 * 2048**3 / best_time(lambda: torch.matmul(g, g), rep) / 1e9
    bw = copy_bandwidth(rep)
    print(f"lowbit {lowbit.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"kernel {bn.kernel()}, threads {th} (torch {torch.get_num_threads()}, "
          f"RAYON_NUM_THREADS={os.environ['RAYON_NUM_THREADS']}), best of {rep}")
    print(f"ceiling: torch float32 GEMM 2048^3 {gemm:.1f} GFLOP/s ({gemm / th:.1f}/core); "
          f"copy bandwidth (np.copyto 256 MiB, read+write) {bw / 1e9:.2f} GB/s\n")

    w = rng.standard_normal((N, K), dtype=np.float32)
    wt = torch.from_numpy(w)
    tern = bn.TernaryLinear.from_float(w)
    codes64 = lowbit.ternary_quantize(w)[0].astype(np.int64)
    binl = bn.BinaryLinear.from_float(w)
    a = rng.standard_normal((256, K), dtype=np.float32)
    b = rng.standard_normal((N, K), dtype=np.float32)
    at, bt = torch.from_numpy(a), torch.from_numpy(b)
    pa, pb = bn.pack_signs(a), bn.pack_signs(b)

    print("exactness (vs NumPy int64 products):")
    print(f"  layer.codes == ternary_quantize(w) codes: {'yes' if np.array_equal(tern.codes, codes64) else 'no'}")
    rows: list[Row] = []
    for m in (1, 64):
        x = rng.standard_normal((m, K), dtype=np.float32)
        xt = torch.from_numpy(x)
        q = lowbit.activation_quant(x)[0]
        ok = np.array_equal(tern._core.int_matmul(q), q.astype(np.int64) @ codes64.T)
        print(f"  ternary int_matmul {m}x{K} @ codes.T ({N} outputs): {'yes' if ok else 'no'}")
        lb_s, int_s = best_time(lambda: tern(x), rep), best_time(lambda: tern._core.int_matmul(q), rep)
        t_s = best_time(lambda: F.linear(xt, wt), rep)
        rows.append(Row(f"TernaryLinear {m}x{K}->{N}", m * N * K, lb_s, t_s))
        rows.append(Row(f"  int_matmul only {m}x{K}->{N}", m * N * K, int_s, t_s))
    sa = np.where(a[:64] >= 0, 1, -1).astype(np.int64)
    sb = np.where(b >= 0, 1, -1).astype(np.int64)
    ok = np.array_equal(bn.binary_matmul(pa, pb)[:64], sa @ sb.T)
    print(f"  binary_matmul == sign(a) @ sign(b).T (first 64 of 256 rows, all {N} cols): {'yes' if ok else 'no'}\n")
    rows.append(Row(f"binary_matmul 256x{K} by {N}x{K}", 256 * N * K,
                    best_time(lambda: bn.binary_matmul(pa, pb), rep), best_time(lambda: at @ bt.T, rep)))
    x = rng.standard_normal((64, K), dtype=np.float32)
    xt = torch.from_numpy(x)
    rows.append(Row(f"BinaryLinear 64x{K}->{N}", 64 * N * K,
                    best_time(lambda: binl(x), rep), best_time(lambda: F.linear(xt, wt), rep)))

    hdr = f"{'kernel':<34}{'lowbit ms':>10}{'torch ms':>10}{'speedup':>9}{'G MAC/s':>9}{'per core':>10}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r.name:<34}{r.lowbit_s * 1e3:>10.3f}{r.torch_s * 1e3:>10.3f}{r.speedup:>8.1f}x"
              f"{r.gmacs():>9.1f}{r.gmacs() / th:>10.1f}")
    by = {r.name: r for r in rows}
    gemv = by[f"TernaryLinear 1x{K}->{N}"]
    gemv_bw = tern.nbytes / gemv.lowbit_s
    print(f"\nGEMV effective bandwidth (packed weights {tern.nbytes / 2**20:.1f} MiB / time): "
          f"{gemv_bw / 1e9:.2f} GB/s = {gemv_bw / bw:.0%} of copy bandwidth "
          f"(int_matmul only: {tern.nbytes / by[f'  int_matmul only 1x{K}->{N}'].lowbit_s / 1e9:.2f} GB/s)")

    f32 = w.nbytes
    print(f"weight memory for {N}x{K}: float32 {f32 / 2**20:.1f} MiB; ternary {tern.nbytes / 2**20:.2f} MiB "
          f"({f32 / tern.nbytes:.0f}x smaller); packed signs {pb.nbytes / 2**20:.2f} MiB ({f32 / pb.nbytes:.0f}x), "
          f"BinaryLinear {binl.nbytes / 2**20:.2f} MiB ({f32 / binl.nbytes:.0f}x)\n")

    print(f"Targets (speedup = torch float32 time / lowbit time; kernel {bn.kernel()}):")
    for name, want in [(f"TernaryLinear 1x{K}->{N}", 10.0), (f"TernaryLinear 64x{K}->{N}", 3.0),
                       (f"binary_matmul 256x{K} by {N}x{K}", 5.0)]:
        r = by[name]
        print(f"  {'PASS' if r.speedup >= want else 'MISS'} {name}: {r.speedup:.1f}x torch (target >= {want:g}x)")
    for r in rows:
        if "ernary" in r.name or "int_matmul" in r.name:
            pc = r.gmacs() / th
            print(f"  {'PASS' if pc >= BITNET_CPP_GMAC_PER_CORE else 'MISS'} {r.name.strip()}: {pc:.1f} G ternary "
                  f"MAC/s per core (bitnet.cpp: {BITNET_CPP_GMAC_PER_CORE:g} G/core)")


if __name__ == "__main__":
    main()
