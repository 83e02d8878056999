"""Threads and determinism: lowbit's kernels release the GIL, give the same bits from 8 Python
threads as serially and for any rayon thread count, and observers fed from several threads lose
no counts."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import pytest

import lowbit
import lowbit.bitnet as bn
import lowbit.calib as lc
from lowbit import _lowbit

THREADS = 8


def _bytes(r: Any) -> bytes:
    """Every bit of a result (arrays, tuples of arrays, numbers, quantized tensors)."""
    if isinstance(r, lowbit.QuantizedTensor):
        return b"".join(_bytes(a) for a in (r.codes, r.scales, r.zero_points)) + repr(r.spec).encode()
    if isinstance(r, (tuple, list)):
        return b"".join(_bytes(x) for x in r)
    if isinstance(r, np.ndarray):
        return r.dtype.str.encode() + str(r.shape).encode() + np.ascontiguousarray(r).tobytes()
    return repr(r).encode()


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=256, max_position_embeddings=64, type_vocab_size=2)
    path = tmp_path_factory.mktemp("bert") / "tiny"
    BertModel(cfg).eval().save_pretrained(path)
    return str(path)


def _kernels(bert_path: str) -> dict[str, Callable[[], Any]]:
    """Calls on shared inputs (the same arrays for every thread)."""
    from lowbit.runtime import BertEncoder

    g = np.random.default_rng(0)
    x = (g.standard_normal((256, 512)) * 3).astype(np.float32)
    w = g.standard_normal((96, 512)).astype(np.float32)
    scales = (np.abs(g.standard_normal(256)) / 10 + 0.01).tolist()
    zps = g.integers(-4, 4, 256).tolist()
    layer = bn.TernaryLinear.from_float(w, g.standard_normal(96).astype(np.float32))
    binary = bn.BinaryLinear.from_float(w)
    packed_w = bn.pack_signs(w)
    bert = BertEncoder.load(bert_path)
    ids = g.integers(0, 100, (4, 32))
    mask = np.ones_like(ids)
    mask[1:, 20:] = 0
    spec = lowbit.QuantSpec(4, granularity="group", group_size=64)
    return {
        "fake_quantize_per_tensor": lambda: lowbit.fake_quantize_per_tensor_affine(x, 0.05, 3, -8, 7, return_mask=True),
        "fake_quantize_per_channel": lambda: lowbit.fake_quantize_per_channel_affine(x, scales, zps, 0, -8, 7),
        "quantize_per_tensor": lambda: lowbit.quantize_per_tensor(x, 0.05, 128, 0, 255),
        "quantize": lambda: lowbit.quantize(x, spec),
        "ternary_linear": lambda: layer(x),
        "binary_linear": lambda: binary(x),
        "binary_matmul": lambda: bn.binary_matmul(bn.pack_signs(x), packed_w),
        "activation_quant": lambda: bn.activation_quant(x),
        "bert_forward": lambda: bert(ids, mask),
        "histogram_observer": lambda: _observe(lc.HistogramObserver(bits=4), x),
        "minmax_observer": lambda: _observe(lc.PerChannelMinMaxObserver(axis=1), x),
    }


def _observe(o: lc.Observer, x: np.ndarray) -> Any:
    o.update(x)
    return o.qparams()


def test_threads_give_the_serial_results(bert_path: str) -> None:
    kernels = _kernels(bert_path)
    serial = {name: _bytes(fn()) for name, fn in kernels.items()}
    start = threading.Barrier(THREADS)

    def worker(seed: int) -> dict[str, list[bytes]]:
        order = list(kernels)
        np.random.default_rng(seed).shuffle(order)  # threads run different kernels at the same time
        start.wait()
        got: dict[str, list[bytes]] = {name: [] for name in kernels}
        for _ in range(2):
            for name in order:
                got[name].append(_bytes(kernels[name]()))
        return got

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(worker, range(THREADS)))
    for got in results:
        for name, outs in got.items():
            assert all(o == serial[name] for o in outs), f"{name} differs between threads and a serial call"


class _Overlap:
    """Runs ``fn`` in two threads, each marking when it is between the instruction before the call
    and the one after, and tells whether one thread ever found the other inside its call.

    With Python's switch interval made longer than the test, a thread that holds the GIL keeps it
    until it blocks or releases it itself, so the other thread can only run Python code (and look)
    while the first is inside a call that released the GIL. No clock is involved: the result does
    not depend on the machine's load or its number of cores.
    """

    def __init__(self, fn: Callable[[], Any], max_calls: int = 200) -> None:
        self.fn, self.max_calls = fn, max_calls
        self.inside: list[int] = []
        self.seen: list[tuple[int, list[int]]] = []

    def worker(self, k: int) -> None:
        for _ in range(self.max_calls):
            if self.seen:
                return
            if self.inside:
                self.seen.append((k, list(self.inside)))
                return
            self.inside.append(k)
            self.fn()
            self.inside.remove(k)

    def run(self) -> bool:
        old = sys.getswitchinterval()
        sys.setswitchinterval(1000.0)
        try:
            threads = [threading.Thread(target=self.worker, args=(k,)) for k in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            sys.setswitchinterval(old)
        return bool(self.seen)


def _spin() -> int:
    return sum(range(20_000))  # pure Python: holds the GIL throughout


@pytest.mark.parametrize("name", ["fake_quantize", "quantize", "ternary_linear", "binary_matmul", "observer"])
def test_kernels_release_the_gil(name: str) -> None:
    g = np.random.default_rng(1)
    x = g.standard_normal((512, 1024)).astype(np.float32)
    layer = bn.TernaryLinear.from_float(g.standard_normal((256, 1024)).astype(np.float32))
    a, b = bn.pack_signs(x), bn.pack_signs(x[:256])
    obs = _lowbit.Observer("histogram")
    spec = lowbit.QuantSpec(4)
    # The core entry points themselves, so that nothing but the kernel can release the GIL.
    fn = {
        "fake_quantize": lambda: _lowbit.fake_quantize_per_tensor_affine(x, 0.1, 0, -8, 7),
        "quantize": lambda: _lowbit.quantize(x, spec),
        "ternary_linear": lambda: layer._core.forward(x),
        "binary_matmul": lambda: _lowbit.binary_matmul_packed(a, b),
        "observer": lambda: obs.update(x),
    }[name]
    assert not _Overlap(_spin).run(), "the control holds the GIL, yet a thread got in: the method is broken"
    assert _Overlap(fn).run(), f"{name}: no thread ever ran while another was inside the kernel: the GIL is held"


def test_bert_forward_releases_the_gil(bert_path: str) -> None:
    from lowbit.runtime import BertEncoder

    core = BertEncoder.load(bert_path)._core
    ids = np.random.default_rng(2).integers(0, 100, (4, 32))
    assert _Overlap(lambda: core.forward(ids, np.ones_like(ids), None, False)).run()


# A script that prints a hash of every kernel's output; run under several RAYON_NUM_THREADS.
_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    import numpy as np
    import lowbit, lowbit.bitnet as bn, lowbit.calib as lc
    from lowbit.runtime import BertEncoder

    g = np.random.default_rng(0)
    x = (g.standard_normal((512, 1024)) * 3).astype(np.float32)
    w = g.standard_normal((256, 1024)).astype(np.float32)
    ids = g.integers(0, 100, (4, 32))
    mask = np.ones_like(ids)
    mask[1:, 20:] = 0

    def h(*arrays):
        d = hashlib.sha256()
        for a in arrays:
            d.update(np.ascontiguousarray(a).tobytes())
        return d.hexdigest()

    def observed(o, data):
        for chunk in np.array_split(data, 7):
            o.update(chunk)
        s, z = o.qparams()
        return h(np.asarray(s), np.asarray(z))

    q = lowbit.quantize(x, lowbit.QuantSpec(4, granularity="group", group_size=128))
    out = {
        "fake_quantize": h(*lowbit.fake_quantize_per_tensor_affine(x, 0.05, 3, -8, 7, return_mask=True)),
        "fake_quantize_per_channel": h(lowbit.fake_quantize_per_channel_affine(x, [0.1] * 512, [1] * 512, 0, -8, 7)),
        "quantize": h(q.codes, q.scales, q.zero_points, q.dequantize()),
        "ternary_linear": h(bn.TernaryLinear.from_float(w, per_channel=True)(x)),
        "binary_linear": h(bn.BinaryLinear.from_float(w)(x)),
        "binary_matmul": h(bn.binary_matmul(x, w)),
        "activation_quant": h(*bn.activation_quant(x, 6)),
        "histogram_mse": observed(lc.HistogramObserver(bits=4), x),
        "histogram_entropy": observed(lc.HistogramObserver(method="entropy"), x),
        "per_channel_histogram": observed(lc.HistogramObserver(bits=4, per_channel=True, axis=1, bins=256), x),
        "per_channel_minmax": observed(lc.PerChannelMinMaxObserver(axis=1), x),
        "bert": h(*[BertEncoder.load(sys.argv[1], weights=wt)(ids, mask) for wt in ("f32", "int8", "ternary")]),
    }
    print(json.dumps(out))
""")


def test_results_do_not_depend_on_the_rayon_thread_count(bert_path: str) -> None:
    runs = {}
    for n in (1, 2, 8):
        env = dict(os.environ, RAYON_NUM_THREADS=str(n))
        p = subprocess.run([sys.executable, "-c", _SCRIPT, bert_path], env=env, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr
        runs[n] = json.loads(p.stdout.strip().splitlines()[-1])
    differ = {k for k in runs[1] if len({runs[n][k] for n in runs}) > 1}
    assert not differ, f"results depend on RAYON_NUM_THREADS: {sorted(differ)}"


def _chunks(seed: int, n: int = 64) -> list[np.ndarray]:
    g = np.random.default_rng(seed)
    return [(g.standard_normal((int(g.integers(1, 200)), 8)) * g.uniform(0.1, 20)).astype(np.float32)
            for _ in range(n)]


@pytest.mark.parametrize("make", [
    lambda: lc.MinMaxObserver(bits=4),
    lambda: lc.PerChannelMinMaxObserver(axis=1),
    lambda: lc.HistogramObserver(bits=4, bins=256),
    lambda: lc.HistogramObserver(per_channel=True, axis=1, bins=64),
], ids=["minmax", "per_channel_minmax", "histogram", "per_channel_histogram"])
def test_observers_fed_from_threads_lose_nothing(make: Callable[[], lc.Observer]) -> None:
    """Min-max and histogram states depend only on the data seen, not on its order (the property
    that makes ``merge`` exact), so one observer fed by 8 threads at once must equal one fed the
    same batches serially: a lost or torn update would show."""
    chunks = _chunks(0)
    serial = make()
    for c in chunks:
        serial.update(c)
    shared = make()
    start = threading.Barrier(THREADS)

    def feed(k: int) -> None:
        start.wait()
        for c in chunks[k::THREADS]:
            shared.update(c)

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(feed, range(THREADS)))
    assert shared.state_dict() == serial.state_dict()
    assert _bytes(shared.qparams()) == _bytes(serial.qparams())


def test_observers_merged_from_threads_equal_one_over_all_data() -> None:
    """Each thread calibrates its own observer (the data-loader-worker pattern), concurrently
    merging into a shared one: the result equals one observer over all the data."""
    chunks = _chunks(1)
    serial = lc.HistogramObserver(bits=4, bins=256)
    for c in chunks:
        serial.update(c)
    total = lc.HistogramObserver(bits=4, bins=256)

    def work(k: int) -> None:
        mine = lc.HistogramObserver(bits=4, bins=256)
        for c in chunks[k::THREADS]:
            mine.update(c)
        total.merge(mine)

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(work, range(THREADS)))
    assert total.state_dict() == serial.state_dict()


def test_moving_average_counts_every_batch_from_threads() -> None:
    """A moving average depends on the order, so only its batch count is comparable: none lost."""
    o = lc.MovingAverageMinMaxObserver()
    chunks = _chunks(2)

    def feed(k: int) -> None:
        for c in chunks[k::THREADS]:
            o.update(c)

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(feed, range(THREADS)))
    state = json.loads(o.state_dict()["lowbit_observer"])["state"]["MovingAverage"]
    assert state["mm"]["batches"] == len(chunks)
    lo = min(float(c.min()) for c in chunks)
    hi = max(float(c.max()) for c in chunks)
    assert lo <= state["mm"]["min"] <= state["mm"]["max"] <= hi


def test_hash_helper_sees_every_bit() -> None:
    a = np.zeros(4, np.float32)
    b = a.copy()
    b.view(np.uint32)[2] = 1  # a denormal: equal to 0 in most comparisons, not in bits
    assert _bytes(a) != _bytes(b)
    assert hashlib.sha256(_bytes(a)).digest() == hashlib.sha256(_bytes(a.copy())).digest()
