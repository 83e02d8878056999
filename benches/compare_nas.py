"""Benchmark lowbit's NAS cost models, and validate the fitted latency model on this machine.

Method
------
* ``SearchSpace.evaluate``: a 20-block space with 9 choices per block (costs from random
  layer graphs), 1 million random candidates scored in one call; candidates per second = n /
  best time. Compared with the same gather-and-sum in NumPy (``costs[arange(blocks),
  candidates].sum(1)``, ``.max(1)`` for peak memory, for all six metrics), and checked for
  equality with a Python loop over the first 1000 candidates.
* ``SearchSpace.expected`` with gradient, batch form: ``batch`` probability tables (20 x 9) per
  call; calls per second = batch / best time. Compared with PyTorch autograd of the same
  expectation (``(p * costs).sum()`` and ``backward``), and the gradients checked equal.
* ``from_torch`` + ``estimate`` of torchvision's resnet18 (no weights, 1x3x224x224), after one
  warm-up forward pass; compared with one forward pass under ``FlopCounterMode``.
* Fit validation: a family of ``--archs`` architectures (MobileNetV2-style: width multiplier,
  depth, kernel, expansion and resolution varied; small ViTs: width, depth, heads, MLP ratio,
  patch and resolution varied), each measured with ``lowbit.nas.measure`` (median of
  ``--repeats`` forward passes, batch 1, float32, ``--threads`` torch threads). The cost model is
  fitted on the even-indexed half and predicts the odd-indexed half: reported are the share of
  predictions within +-10% of measured, the Kendall tau of the predicted vs measured ranking,
  and the same for the unfitted roofline of the measured ``host`` profile.

Targets (issue): evaluate >= 1e6 candidates/s, expected >= 1e5 calls/s, resnet18 capture +
estimate < 1 s, >= 80% of held-out predictions within +-10%, Kendall tau >= 0.9.

Run: ``python benches/compare_nas.py [--archs N] [--repeats N] [--threads N]``
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from benchutil import best_time

import lowbit
import lowbit.nas as nas


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-a over all pairs (no ties in continuous timings)."""
    s = 0
    n = len(a)
    for i in range(n):
        s += np.sum(np.sign(a[i] - a[i + 1:]) * np.sign(b[i] - b[i + 1:]))
    return float(s / (n * (n - 1) / 2))


def family(n: int, seed: int = 0) -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    """Half MobileNetV2-style, half small-ViT architectures with randomly drawn hyperparameters."""
    from torchvision.models import MobileNetV2, VisionTransformer

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 2 == 0:
            width = float(rng.choice([0.35, 0.5, 0.75, 1.0]))
            depth = int(rng.integers(1, 4))
            k = int(rng.choice([3, 5]))  # MobileNetV2 blocks are 3x3; k=5 is expressed via more blocks
            t = int(rng.choice([3, 6]))
            res = int(rng.choice([96, 128, 160]))
            setting = [[1, 16, 1, 1], [t, 24, depth, 2], [t, 32, depth + (k == 5), 2],
                       [t, 64, depth + 1, 2], [t, 96, depth, 1], [t, 160, depth, 2], [t, 320, 1, 1]]
            m = MobileNetV2(num_classes=100, width_mult=width, inverted_residual_setting=setting)
            name = f"mbv2 w{width} d{depth} t{t} r{res}"
        else:
            dim = int(rng.choice([96, 128, 192]))
            heads = int(rng.choice([2, 3, 4]))
            dim = dim // heads * heads
            layers = int(rng.integers(2, 7))
            mlp = int(rng.choice([2, 4]))
            patch = int(rng.choice([16, 32]))
            res = int(rng.choice([128, 160, 224]))
            res -= res % patch
            m = VisionTransformer(image_size=res, patch_size=patch, num_layers=layers, num_heads=heads,
                                  hidden_dim=dim, mlp_dim=mlp * dim, num_classes=100)
            name = f"vit d{dim} L{layers} h{heads} m{mlp} p{patch} r{res}"
        out.append((name, m.eval(), torch.randn(1, 3, res, res)))
    return out


def space_bench(rep: int) -> None:
    rng = np.random.default_rng(0)
    nb, nc = 20, 9
    blocks = []
    for _ in range(nb):
        choices = []
        for _ in range(nc):
            c, e, k = int(rng.integers(16, 128)), int(rng.integers(1, 7)), int(rng.choice([3, 5, 7]))
            g = nas.Graph.sequential((1, c, 28, 28), [  # an inverted residual block
                {"op": "conv2d", "out_channels": c * e, "kernel": 1}, {"op": "relu6"},
                {"op": "conv2d", "out_channels": c * e, "kernel": k, "groups": c * e}, {"op": "relu6"},
                {"op": "conv2d", "out_channels": c, "kernel": 1},
            ])
            choices.append(g)
        blocks.append(choices)
    space = nas.SearchSpace(blocks, device="cortex-a76", bits=4)
    n = 1_000_000
    cand = space.random(n, seed=1)
    t = best_time(lambda: space.evaluate(cand), rep)
    lat = space.costs("latency_ms")
    tables = [space.costs(m) for m in nas.METRICS]
    rows = np.arange(nb)

    def numpy_all() -> list:
        return [t[rows, cand].max(axis=1) if m == "peak_activation_bytes" else t[rows, cand].sum(axis=1)
                for m, t in zip(nas.METRICS, tables)]

    tn = best_time(numpy_all, rep)
    got = space.evaluate(cand[:1000])
    loop = [sum(lat[b, c[b]] for b in range(nb)) for c in cand[:1000]]
    ok = np.allclose(got["latency_ms"], loop, rtol=1e-12)
    print(f"SearchSpace.evaluate: {nb} blocks x {nc} choices, {n:,} candidates, 6 metrics: {t * 1e3:.1f} ms = "
          f"{n / t / 1e6:.2f} M candidates/s (NumPy gather-sum/max of the same 6 metrics: {n / tn / 1e6:.2f} M/s, "
          f"lowbit {tn / t:.1f}x); equals a Python loop: {'yes' if ok else 'no'}")
    batch = 4096
    probs = rng.dirichlet(np.ones(nc), size=(batch, nb))
    t = best_time(lambda: space.expected(probs), rep)
    pt = torch.tensor(probs, requires_grad=True)
    ct = torch.tensor(lat)

    def torch_expected() -> None:
        pt.grad = None
        (pt * ct).sum().backward()

    tt = best_time(torch_expected, rep)
    v, g = space.expected(probs)
    torch_expected()
    ok = np.allclose(g, pt.grad.numpy()) and np.allclose(v, (probs * lat).sum(axis=(1, 2)))
    print(f"SearchSpace.expected + gradient, batch {batch}: {t * 1e3:.2f} ms = {batch / t / 1e3:.0f} k calls/s "
          f"(PyTorch autograd: {batch / tt / 1e3:.0f} k/s, lowbit {tt / t:.1f}x); equal: {'yes' if ok else 'no'}")


def capture_bench(rep: int) -> None:
    from torch.utils.flop_counter import FlopCounterMode
    from torchvision.models import resnet18

    m = resnet18().eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        m(x)
    t = best_time(lambda: nas.estimate(nas.from_torch(m, x), "cortex-a76"), max(rep // 2, 1), warmup=1)

    def counter() -> int:
        with FlopCounterMode(display=False) as fc:
            m(x)
        return fc.get_total_flops()

    tf = best_time(counter, max(rep // 2, 1), warmup=1)
    with torch.no_grad():
        tfw = best_time(lambda: m(x), rep)
    g = nas.from_torch(m, x)
    print(f"from_torch + estimate, resnet18 1x3x224x224: {t * 1e3:.0f} ms (a plain forward: {tfw * 1e3:.0f} ms; "
          f"FlopCounterMode forward: {tf * 1e3:.0f} ms); flops equal: {'yes' if g.flops == counter() else 'no'}")


def fit_bench(n: int, repeats: int) -> dict:
    archs = family(n)
    graphs, ms = [], []
    t0 = time.perf_counter()
    for name, m, x in archs:
        graphs.append(nas.from_torch(m, x))
        ms.append(nas.measure(m, x, repeats=repeats, per_op=False).total_ms)
    ms = np.array(ms)
    print(f"\nfit validation: {n} architectures measured in {time.perf_counter() - t0:.0f} s "
          f"(latency {ms.min():.2f}-{ms.max():.2f} ms, median of {repeats})")
    train, test = np.arange(0, n, 2), np.arange(1, n, 2)
    # Fit on a mix of both families: alternate entries are MobileNets and ViTs, so take pairs.
    train = np.array([i for i in range(n) if (i // 2) % 2 == 0])
    test = np.array([i for i in range(n) if (i // 2) % 2 == 1])
    model = nas.CostModel.fit([graphs[i] for i in train], ms[train], device="host")
    pred = np.array([model.predict(graphs[i]) for i in test])
    roof = np.array([nas.estimate(graphs[i], "host").latency_ms for i in test])
    err = pred / ms[test] - 1
    within = float(np.mean(np.abs(err) <= 0.10))
    tau = kendall_tau(pred, ms[test])
    rw = float(np.mean(np.abs(roof / ms[test] - 1) <= 0.10))
    print(f"fitted on {len(train)}, predicting {len(test)} held out: {within:.0%} within +-10% "
          f"(median |error| {np.median(np.abs(err)):.1%}, max {np.abs(err).max():.1%}), Kendall tau {tau:.3f}")
    print(f"unfitted host roofline: {rw:.0%} within +-10%, Kendall tau {kendall_tau(roof, ms[test]):.3f}")
    print(f"fitted: {model}")
    print(f"  {'PASS' if within >= 0.8 else 'MISS'} >= 80% within +-10%; {'PASS' if tau >= 0.9 else 'MISS'} tau >= 0.9")
    return {"names": [archs[i][0] for i in test], "measured_ms": ms[test].tolist(), "predicted_ms": pred.tolist(),
            "within_10pct": within, "kendall_tau": tau}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="timed runs for the throughput rows (best kept)")
    ap.add_argument("--archs", type=int, default=48, help="architectures in the fit validation family")
    ap.add_argument("--repeats", type=int, default=30, help="forward passes per architecture (median kept)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--json", help="write the fit validation points here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lowbit.show_config()  # the machine and the kernel paths behind every figure below
    host = nas.devices()["host"]
    print(f"lowbit {__import__('lowbit').__version__}, torch {torch.__version__}, threads {args.threads}; "
          f"ceiling (host profile): float32 GEMM {host.peak_gops['f32']} GFLOP/s, copy {host.bandwidth_gbs} GB/s\n")
    space_bench(args.repeat)
    capture_bench(args.repeat)
    res = fit_bench(args.archs, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
