"""Benchmark lowbit against PyTorch's CPU quantization ops on one large float32 tensor.

Method
------
* Ceiling: the machine's memory copy bandwidth, measured as ``np.copyto(dst, src)`` into a
  pre-allocated destination on a 256 MiB float32 array (best of several runs). Bandwidth counts
  bytes read + bytes written. A streaming elementwise kernel cannot beat it, so each kernel is
  reported as a fraction of it (``torch.clone`` and an allocating ``x.copy()`` are printed for
  reference: a kernel that returns a fresh array also pays the kernel's first-touch page faults,
  so fake-quant is also timed writing into a preallocated ``out=`` array and in place).
* Ratio: ``torch time / lowbit time``, both best-of-N (after warmup, ``time.perf_counter``) in
  the same process, on the same input, with the same thread count.
* Bytes moved: what lowbit reads plus writes, e.g. fake-quant f32->f32 is 8 bytes per element,
  quantize f32->int8 and dequantize int8->f32 are 5, a returned mask adds 1.
* Before timing, every lowbit result is checked for exact equality with PyTorch's.

Run: ``python benches/compare_torch.py [--size N] [--repeat N] [--threads N]``
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from benchutil import best_time, copy_bandwidth

import lowbit
import lowbit.torch as lt

# torch.quantize_per_tensor / quantize_per_channel warn that quantized tensors are deprecated.
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)


def to_np(r: Any) -> np.ndarray:
    """A NumPy array of a result: int_repr for quantized tensors, a view for tensors."""
    if isinstance(r, torch.Tensor):
        return (r.int_repr() if r.is_quantized else r).numpy()
    return np.asarray(r)


@dataclass
class Row:
    name: str
    lowbit_s: float
    torch_s: float | None
    bytes_moved: int
    exact: bool | None
    note: str = ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=4096, help="the tensor is size x size float32")
    ap.add_argument("--repeat", type=int, default=7, help="timed runs per function (best is kept)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lowbit.show_config()  # the machine and the kernel paths behind every figure below
    n, rep = args.size, args.repeat

    bw = copy_bandwidth(rep)
    xt = torch.from_numpy(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    x = xt.numpy()
    clone_s = best_time(xt.clone, rep)
    npcopy_s = best_time(x.copy, rep)
    print(f"lowbit {lowbit.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"{n}x{n} float32, torch threads {torch.get_num_threads()}, best of {rep}")
    print(f"copy bandwidth ceiling (np.copyto, 256 MiB, read+write): {bw / 1e9:.2f} GB/s")
    print(f"torch x.clone() on the input: {clone_s * 1e3:.2f} ms ({2 * x.nbytes / clone_s / 1e9:.2f} GB/s); "
          f"x.copy() (fresh destination): {npcopy_s * 1e3:.2f} ms ({2 * x.nbytes / npcopy_s / 1e9:.2f} GB/s)\n")

    sc = np.linspace(0.01, 0.05, n, dtype=np.float32)
    zp = (np.arange(n) % 7 - 3).astype(np.int32)
    sc_t, zp_t, zp_t64 = torch.from_numpy(sc), torch.from_numpy(zp), torch.from_numpy(zp).long()
    tq = torch.quantize_per_tensor(xt, 0.03, 0, torch.qint8)
    q = tq.int_repr().numpy()
    e = n * n
    buf = np.empty_like(x)
    y = x.copy()
    xn = x.copy()
    xn.reshape(-1)[::2] = np.nan  # NaN-heavy: every other value
    xnt = torch.from_numpy(xn)
    cases: list[tuple[str, Callable[[], Any], Callable[[], Any] | None, int]] = [
        ("fake_quant per_tensor 4b", lambda: lowbit.fake_quantize_per_tensor_affine(x, 0.03, 0, -8, 7),
         lambda: torch.fake_quantize_per_tensor_affine(xt, 0.03, 0, -8, 7), 8 * e),
        ("fake_quant per_tensor 4b out=", lambda: lowbit.fake_quantize_per_tensor_affine(x, 0.03, 0, -8, 7, out=buf),
         lambda: torch.fake_quantize_per_tensor_affine(xt, 0.03, 0, -8, 7), 8 * e),
        ("fake_quant per_tensor 4b in place", lambda: lowbit.fake_quantize_per_tensor_affine(y, 0.03, 0, -8, 7, out=y),
         lambda: torch.fake_quantize_per_tensor_affine(xt, 0.03, 0, -8, 7), 8 * e),
        # The trust issue's clamp-heavy case: N(0, 1) at scale 0.05 in -8..7 (80% of values clamp).
        ("fake_quant 4b s0.05 clamp-heavy", lambda: lowbit.fake_quantize_per_tensor_affine(x, 0.05, 0, -8, 7),
         lambda: torch.fake_quantize_per_tensor_affine(xt, 0.05, 0, -8, 7), 8 * e),
        ("fake_quant 4b clamp-heavy out=", lambda: lowbit.fake_quantize_per_tensor_affine(x, 0.05, 0, -8, 7, out=buf),
         lambda: torch.fake_quantize_per_tensor_affine(xt, 0.05, 0, -8, 7), 8 * e),
        ("fake_quant 4b half NaN", lambda: lowbit.fake_quantize_per_tensor_affine(xn, 0.05, 0, -8, 7),
         lambda: torch.fake_quantize_per_tensor_affine(xnt, 0.05, 0, -8, 7), 8 * e),
        ("fake_quant per_channel half NaN", lambda: lowbit.fake_quantize_per_channel_affine(xn, sc, zp, 0, -8, 7),
         lambda: torch.fake_quantize_per_channel_affine(xnt, sc_t, zp_t, 0, -8, 7), 8 * e),
        ("fake_quant per_tensor 8b", lambda: lowbit.fake_quantize_per_tensor_affine(x, 0.03, 0, -128, 127),
         lambda: torch.fake_quantize_per_tensor_affine(xt, 0.03, 0, -128, 127), 8 * e),
        ("fake_quant per_tensor +mask", lambda: lowbit.fake_quantize_per_tensor_affine(x, 0.03, 0, -8, 7, True),
         lambda: torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(xt, 0.03, 0, -8, 7), 9 * e),
        ("fake_quant per_channel ax0", lambda: lowbit.fake_quantize_per_channel_affine(x, sc, zp, 0, -8, 7),
         lambda: torch.fake_quantize_per_channel_affine(xt, sc_t, zp_t, 0, -8, 7), 8 * e),
        ("fake_quant per_channel ax1", lambda: lowbit.fake_quantize_per_channel_affine(x, sc, zp, 1, -8, 7),
         lambda: torch.fake_quantize_per_channel_affine(xt, sc_t, zp_t, 1, -8, 7), 8 * e),
        ("fake_quant per_channel ax0 out=", lambda: lowbit.fake_quantize_per_channel_affine(x, sc, zp, 0, -8, 7, out=buf),
         lambda: torch.fake_quantize_per_channel_affine(xt, sc_t, zp_t, 0, -8, 7), 8 * e),
        ("fake_quant per_channel ax1 out=", lambda: lowbit.fake_quantize_per_channel_affine(x, sc, zp, 1, -8, 7, out=buf),
         lambda: torch.fake_quantize_per_channel_affine(xt, sc_t, zp_t, 1, -8, 7), 8 * e),
        ("lowbit.torch fake_quant tensor", lambda: lt.fake_quantize_per_tensor_affine(xt, 0.03, 0, -8, 7),
         lambda: torch.fake_quantize_per_tensor_affine(xt, 0.03, 0, -8, 7), 8 * e),
        ("quantize_per_tensor int8", lambda: lowbit.quantize_per_tensor(x, 0.03, 0, -128, 127),
         lambda: torch.quantize_per_tensor(xt, 0.03, 0, torch.qint8), 5 * e),
        ("quantize_per_tensor half NaN", lambda: lowbit.quantize_per_tensor(xn, 0.03, 0, -128, 127),
         lambda: torch.quantize_per_tensor(xnt, 0.03, 0, torch.qint8), 5 * e),
        ("quantize_per_channel int8", lambda: lowbit.quantize_per_channel(x, sc, zp, 0, -128, 127),
         lambda: torch.quantize_per_channel(xt, sc_t, zp_t64, 0, torch.qint8), 5 * e),
        ("dequantize_per_tensor int8", lambda: lowbit.dequantize_per_tensor(q, 0.03, 0), tq.dequantize, 5 * e),
        ("quantize 4b group128", lambda: lowbit.quantize(x, lowbit.QuantSpec(4, granularity="group", group_size=128)),
         None, 4 * e + e // 2),
    ]

    rows: list[Row] = []
    for name, lb, tf, nbytes in cases:
        try:
            got = lb()
        except Exception as err:  # report, don't hide: a failing kernel is a finding
            print(f"{name}: lowbit raised {type(err).__name__}: {err}")
            continue
        exact: bool | None = None
        if tf is not None:
            a, b = (got[0], got[1]) if isinstance(got, tuple) else (got, None)
            ref = tf()
            ra, rb = (ref[0], ref[1]) if isinstance(ref, tuple) else (ref, None)
            exact = np.array_equal(to_np(a), to_np(ra), equal_nan=True) and (
                b is None or np.array_equal(to_np(b), to_np(rb)))
        lb_s = best_time(lb, rep)
        t_s = best_time(tf, rep) if tf is not None else None
        note = ""
        if name.startswith("quantize_per_tensor"):
            ir_s = best_time(lambda: torch.quantize_per_tensor(xt, 0.03, 0, torch.qint8).int_repr(), rep)
            note = f"torch incl. .int_repr(): {ir_s * 1e3:.2f} ms -> {ir_s / lb_s:.1f}x"
        rows.append(Row(name, lb_s, t_s, nbytes, exact, note))

    hdr = f"{'function':<31}{'lowbit ms':>10}{'torch ms':>10}{'speedup':>9}{'MB moved':>10}{'GB/s':>8}{'of copy':>9}  bit-exact"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        t_ms = f"{r.torch_s * 1e3:.2f}" if r.torch_s else "-"
        sp = f"{r.torch_s / r.lowbit_s:.1f}x" if r.torch_s else "-"
        gbs = r.bytes_moved / r.lowbit_s
        ex = "-" if r.exact is None else ("yes" if r.exact else "no")
        print(f"{r.name:<31}{r.lowbit_s * 1e3:>10.2f}{t_ms:>10}{sp:>9}{r.bytes_moved / 2**20:>10.0f}"
              f"{gbs / 1e9:>8.2f}{gbs / bw:>9.0%}  {ex}")
        if r.note:
            print(f"  ({r.note}; headline speedup above is against torch without .int_repr())")

    print("\nTargets (speedup = torch/lowbit, bandwidth = fraction of copy ceiling):")
    by = {r.name: r for r in rows}
    for name, want in [("fake_quant per_tensor 4b", 10.0), ("fake_quant per_tensor 4b out=", 10.0),
                       ("fake_quant per_tensor 8b", 10.0), ("fake_quant per_channel ax0", 10.0),
                       ("fake_quant per_channel ax0 out=", 10.0), ("fake_quant per_channel ax1", 10.0),
                       ("fake_quant per_channel ax1 out=", 10.0), ("fake_quant 4b s0.05 clamp-heavy", 10.0),
                       ("fake_quant 4b clamp-heavy out=", 10.0), ("fake_quant 4b half NaN", 10.0),
                       ("fake_quant per_channel half NaN", 10.0), ("quantize_per_tensor int8", 1.5)]:
        r = by.get(name)
        if r is None or r.torch_s is None:
            print(f"  MISS {name}: no measurement (lowbit raised)")
            continue
        sp, frac = r.torch_s / r.lowbit_s, r.bytes_moved / r.lowbit_s / bw
        ok = sp >= want and frac >= 0.70 and bool(r.exact)
        print(f"  {'PASS' if ok else 'MISS'} {name}: {sp:.1f}x torch (target >= {want:g}x), "
              f"{frac:.0%} of copy bandwidth (target >= 70%), bit-exact {'yes' if r.exact else 'no'}")
        if r.note:
            print(f"       {r.note} (torch's codes need .int_repr(); lowbit returns them directly)")


if __name__ == "__main__":
    main()
