"""Fork safety: a process that forks after lowbit ran a parallel kernel (a torch DataLoader
worker with Linux's default start method, or a raw os.fork()) gets working kernels in the child:
rayon's global pool has no threads there, so lowbit gives the child a pool of its own."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

import lowbit
import lowbit.bitnet as bn
import lowbit.calib as lc

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs fork()")

RNG = np.random.default_rng(0)
BIG = RNG.standard_normal((1024, 1024)).astype(np.float32)  # large enough for every parallel path
W = RNG.standard_normal((256, 512)).astype(np.float32)


def _bert_dir() -> str:
    import transformers

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64)
    path = tempfile.mkdtemp()
    torch.manual_seed(0)
    transformers.BertModel(cfg).eval().save_pretrained(path)
    return path


def _work(bert_dir: str) -> tuple:
    """Every kind of parallel call: fake-quant, an observer, the ternary kernel, the runtime."""
    from lowbit.runtime import BertEncoder

    fq = lowbit.fake_quantize_per_tensor_affine(BIG, 0.05, 0, -8, 7)
    obs = lc.HistogramObserver(bits=4, method="mse")
    obs.update(BIG)
    layer = bn.TernaryLinear.from_float(W)
    y = layer(BIG[:64, :512])
    enc = BertEncoder.load(bert_dir)
    ids = np.tile(np.arange(1, 17, dtype=np.int64), (4, 1))
    e = enc.embed(ids, np.ones_like(ids))
    return fq, obs.qparams(), y, e


def _same(a: tuple, b: tuple) -> bool:
    return (np.array_equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])
            and np.array_equal(a[3], b[3]))


@pytest.fixture(scope="module")
def bert_dir() -> str:
    return _bert_dir()


def _wait(pid: int, timeout: float = 120.0) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the forked child hung for {timeout:.0f} s on its first parallel lowbit call")


def test_raw_fork_child_runs_every_kernel(bert_dir):
    want = _work(bert_dir)  # the parent's global pool now has threads
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 only if every call returned the parent's bits
        code = 1
        try:
            got = _work(bert_dir)
            code = 0 if _same(got, want) else 3
            pid2 = os.fork()  # a grandchild gets a pool of its own too
            if pid2 == 0:
                os._exit(0 if _same(_work(bert_dir), want) else 3)
            _, st = os.waitpid(pid2, 0)
            code = code or os.waitstatus_to_exitcode(st)
        finally:
            os._exit(code)
    assert _wait(pid) == 0
    assert _same(_work(bert_dir), want)  # and the parent still works


class _Batches(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(BIG[i * 64:(i + 1) * 64])
        o = lc.MinMaxObserver(bits=8)
        o.update(x)
        s, z = o.qparams()
        return lowbit.fake_quantize_per_tensor_affine(x, s, z, 0, 255)


def test_dataloader_fork_workers_call_lowbit():
    lowbit.fake_quantize_per_tensor_affine(BIG, 0.05, 0, -8, 7)  # parent uses the pool first
    loader = torch.utils.data.DataLoader(_Batches(), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork", timeout=120)
    got = [b for b in loader]
    want = [_Batches()[i] for i in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
