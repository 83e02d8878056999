"""Quantization-aware training with lowbit's modules against PyTorch's own, in the same run.

Method
------
* **LSQ kernel**: ``lowbit.torch.fake_quantize_learnable_per_{tensor,channel}_affine`` against
  ``torch._fake_quantize_learnable_per_{tensor,channel}_affine`` on a 4096 x 4096 float32
  tensor (int4, grad_factor 1/sqrt(n * 7)): forward plus the backward of x, scale and zero
  point, best of ``--repeat``; both give the same bits (``python/tests/test_lsq.py``).
* **Compiled QAT step**: a small CNN (two 3x3 convolutions and two linear layers, batch 32 of
  3 x 32 x 32) whose weights and activations are fake-quantized at int8 (activations per tensor,
  weights per output channel), once with ``lowbit.torch.FakeQuantize`` and once with
  ``torch.ao.quantization.FakeQuantize`` (its observers off, so both do fake-quant only, with the
  same qparams), and an LSQ variant (``lowbit.torch.LearnableFakeQuantize`` against
  ``torch.ao.quantization._learnable_fake_quantize._LearnableFakeQuantize``). Each model is
  compiled with ``torch.compile`` (inductor; ``fullgraph=True`` for lowbit's, while torch.ao's
  modules cannot compile whole: dynamo skips torch.ao's code, a graph break at each module, which
  the bench counts) and timed over a training step (forward, backward, SGD step), best of
  ``--repeat`` after warm-ups.
* Each thread count runs in a fresh process; ``torch/lowbit`` above 1 means lowbit is faster.

Run: ``python benches/compare_qat.py [--threads 1,2] [--repeat 10]``. Quote ratios from a quiet
machine only: the load average is printed beside them.
"""

from __future__ import annotations

import math
import os

from benchutil import best_time, main_per_thread_count


def _lsq(repeat: int) -> None:
    import torch

    import lowbit.torch as lt

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 4096, generator=g)
    dy = torch.randn(4096, 4096, generator=g)
    gf = 1 / math.sqrt(x.numel() * 7)
    for per_channel in (False, True):
        if per_channel:
            s0, z0 = torch.rand(4096, generator=g) * 0.05 + 0.01, torch.zeros(4096)
            ours, theirs = lt.fake_quantize_learnable_per_channel_affine, torch._fake_quantize_learnable_per_channel_affine
            extra: tuple = (0,)
        else:
            s0, z0 = torch.tensor([0.02]), torch.tensor([0.0])
            ours, theirs = lt.fake_quantize_learnable_per_tensor_affine, torch._fake_quantize_learnable_per_tensor_affine
            extra = ()
        xl = x.clone().requires_grad_()
        s, z = s0.clone().requires_grad_(), z0.clone().requires_grad_()

        def step(fn=None):
            xl.grad = s.grad = z.grad = None
            fn(xl, s, z, *extra, -8, 7, gf).backward(dy)

        t_l = best_time(lambda: step(ours), repeat)
        t_t = best_time(lambda: step(theirs), repeat)
        what = "per channel" if per_channel else "per tensor"
        print(f"  LSQ {what:11s} 4096x4096 fwd+bwd: lowbit {t_l * 1e3:7.1f} ms   torch {t_t * 1e3:7.1f} ms   "
              f"torch/lowbit {t_t / t_l:5.2f}")


def _cnn(kind: str, learnable: bool):
    import torch
    from torch import nn

    import lowbit.torch as lt

    torch.manual_seed(0)

    def act():
        if kind == "lowbit":
            return lt.LearnableFakeQuantize(-128, 127, 0.05) if learnable else lt.FakeQuantize(-128, 127, 0.05)
        if learnable:
            from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize
            fq = _LearnableFakeQuantize(torch.ao.quantization.MovingAverageMinMaxObserver, quant_min=-128, quant_max=127,
                                        dtype=torch.qint8, qscheme=torch.per_tensor_affine, scale=0.05, zero_point=0.0,
                                        use_grad_scaling=True)
            fq.toggle_observer_update(False)
            return fq
        fq = torch.ao.quantization.FakeQuantize(torch.ao.quantization.MovingAverageMinMaxObserver, quant_min=-128,
                                                quant_max=127, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
        fq.scale.fill_(0.05)
        fq.disable_observer()
        return fq

    class QConv(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.conv, self.a = nn.Conv2d(cin, cout, 3, padding=1), act()
            w = self.conv.weight.detach()
            if kind == "lowbit":
                self.w = (lt.LearnableFakeQuantize.from_tensor(w, bits=8, axis=0) if learnable
                          else lt.FakeQuantize.from_tensor(w, bits=8, axis=0))
            else:
                self.w = torch.ao.quantization.FakeQuantize(
                    torch.ao.quantization.MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127,
                    dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
                self.w(w)   # qparams from the weight once, then the observer stays off
                self.w.disable_observer()

        def forward(self, x):
            return torch.relu(nn.functional.conv2d(self.a(x), self.w(self.conv.weight), self.conv.bias, padding=1))

    return nn.Sequential(QConv(3, 32), nn.MaxPool2d(2), QConv(32, 64), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10))


def _qat(repeat: int) -> None:
    import torch

    x = torch.randn(32, 3, 32, 32)
    y = torch.randint(0, 10, (32,))
    for learnable in (False, True):
        times, breaks = {}, {}
        for kind in ("lowbit", "torch"):
            torch._dynamo.reset()
            model = _cnn(kind, learnable)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            breaks[kind] = torch._dynamo.explain(model)(x).graph_break_count
            torch._dynamo.reset()
            # torch.ao's modules cannot compile with fullgraph (dynamo skips torch.ao's code, a
            # graph break at each of them); lowbit's must.
            compiled = torch.compile(model, fullgraph=kind == "lowbit")

            def step():
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(compiled(x), y).backward()
                opt.step()

            times[kind] = best_time(step, repeat, warmup=3)
        what = "LSQ (learnable)" if learnable else "fixed qparams  "
        print(f"  compiled QAT step, CNN int8 W+A, {what}: lowbit {times['lowbit'] * 1e3:7.2f} ms   "
              f"torch.ao {times['torch'] * 1e3:7.2f} ms   torch/lowbit {times['torch'] / times['lowbit']:5.2f}   "
              f"graph breaks: lowbit {breaks['lowbit']}, torch.ao {breaks['torch']}")


def _child(threads: int, repeat: int) -> None:
    import torch

    torch.set_num_threads(threads)
    print(f"\n== {threads} thread(s); load average {os.getloadavg()[0]:.2f} ==")
    _lsq(repeat)
    _qat(repeat)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def main() -> None:
    main_per_thread_count(__doc__, __file__, _child)


if __name__ == "__main__":
    main()
