"""Integrity of the files lowbit writes: a SHA-256 in every safetensors file, checked by every
loader; atomic writes; headers that claim more than the file holds refused before allocating."""

from __future__ import annotations

import json
import os
import pathlib
import re
import struct
from typing import Any, Callable

import numpy as np
import pytest

import lowbit
from lowbit import LowbitFormatError, nas
from lowbit._io import write_atomic

SHA_MSG = "do not match the file's SHA-256"
W = np.linspace(-1, 1, 64 * 32, dtype=np.float32).reshape(64, 32)


def hf_file(path: pathlib.Path) -> pathlib.Path:
    from safetensors.numpy import save_file

    save_file({"w": W, "b": np.ones(64, np.float32)}, str(path), metadata={"note": "hello"})
    return path


def tiny_vlm() -> Any:
    pytest.importorskip("torch")
    from lowbit import models

    cfg = models.MultiTaskConfig(width=32, depth=1, heads=2, decoder_depth=1, vqa_depth=1, embed_dim=16,
                                 text={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                       "intermediate_size": 64})
    return models.MultiTaskVLM(cfg).eval()


# Each writer: (write a file into the folder and return its path, loaders, a metadata value in its header)
def _quantize(d: pathlib.Path) -> pathlib.Path:
    lowbit.quantize_checkpoint(hf_file(d / "in.safetensors"), d / "q.safetensors", lowbit.QuantSpec(4))
    return d / "q.safetensors"


def _dequantize(d: pathlib.Path) -> pathlib.Path:
    lowbit.dequantize_checkpoint(_quantize(d), d / "dq.safetensors")
    return d / "dq.safetensors"


def _save_checkpoint(d: pathlib.Path) -> pathlib.Path:
    lowbit.save_checkpoint(d / "s.safetensors", {"w": lowbit.quantize(W, lowbit.QuantSpec(4)), "b": W[0]},
                           {"note": "hello"})
    return d / "s.safetensors"


def _tensor_save(d: pathlib.Path) -> pathlib.Path:
    lowbit.quantize(W, lowbit.QuantSpec(8, granularity="channel")).save(d / "t.safetensors", name="x")
    return d / "t.safetensors"


def _models_save(d: pathlib.Path) -> pathlib.Path:
    from lowbit import models

    models.save(tiny_vlm(), d / "m.safetensors", weights="int4")
    return d / "m.safetensors"


def _requantize(p: pathlib.Path) -> None:
    lowbit.quantize_checkpoint(p, p.with_name("again.safetensors"), lowbit.QuantSpec(4))


def _models_load(p: pathlib.Path) -> None:
    from lowbit import models

    models.load(p)


WRITERS: dict[str, tuple[Callable[[pathlib.Path], pathlib.Path], list[Callable[[pathlib.Path], Any]], bytes]] = {
    "quantize": (_quantize, [lowbit.load_quantized, lambda p: lowbit.dequantize_checkpoint(p, p.with_name("x"))],
                 b"hello"),
    "dequantize": (_dequantize, [_requantize], b"hello"),
    "save_checkpoint": (_save_checkpoint, [lowbit.load_quantized], b"hello"),
    "QuantizedTensor.save": (_tensor_save, [lowbit.load_quantized], b"quantized-v1"),
    "models.save": (_models_save, [_models_load, lambda p: lowbit.runtime.MultiTaskModel.load(p)], b"int4"),
}


def flip(path: pathlib.Path, at: int) -> pathlib.Path:
    b = bytearray(path.read_bytes())
    b[at] ^= 1
    out = path.with_name(f"flipped-{at}-{path.name}")
    out.write_bytes(bytes(b))
    return out


@pytest.mark.parametrize("writer", list(WRITERS))
def test_every_writer_carries_a_checked_sha256(writer: str, tmp_path: pathlib.Path) -> None:
    write, loaders, marker = WRITERS[writer]
    path = write(tmp_path)
    meta = lowbit.checkpoint_metadata(path)
    assert re.fullmatch("[0-9a-f]{64}", meta["lowbit.sha256"])
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    value = raw.index(marker, 8, 8 + n)  # a metadata value inside the header
    for load in loaders:
        load(path)  # untouched: loads
        for at in (len(raw) - 1, 8 + n + (len(raw) - 8 - n) // 2, value):  # data end, data middle, header
            bad = flip(path, at)
            with pytest.raises(LowbitFormatError, match=SHA_MSG) as e:
                load(bad)
            assert bad.name in str(e.value) and "corrupted or was modified" in str(e.value)
        # a flip that breaks the header's structure is refused as an invalid file
        for at in (3, 8):  # the header length, the opening brace
            with pytest.raises(LowbitFormatError):
                load(flip(path, at))


def test_files_without_the_key_load_as_before(tmp_path: pathlib.Path) -> None:
    src = hf_file(tmp_path / "hf.safetensors")
    assert "lowbit.sha256" not in lowbit.checkpoint_metadata(src)
    lowbit.quantize_checkpoint(src, tmp_path / "q.safetensors", lowbit.QuantSpec(4))
    assert lowbit.checkpoint_metadata(tmp_path / "q.safetensors")["note"] == "hello"


def test_the_key_is_lowbits_own(tmp_path: pathlib.Path) -> None:
    with pytest.raises(lowbit.LowbitValueError, match="lowbit.sha256"):
        lowbit.save_checkpoint(tmp_path / "x.safetensors", {"w": W}, {"lowbit.sha256": "0" * 64})
    # a converted file gets a digest of its own, not its input's
    q = _quantize(tmp_path)
    dq = tmp_path / "dq.safetensors"
    lowbit.dequantize_checkpoint(q, dq)
    assert lowbit.checkpoint_metadata(dq)["lowbit.sha256"] != lowbit.checkpoint_metadata(q)["lowbit.sha256"]


def test_the_digest_covers_the_whole_file(tmp_path: pathlib.Path) -> None:
    import hashlib

    path = _save_checkpoint(tmp_path)
    raw = path.read_bytes()
    digest = lowbit.checkpoint_metadata(path)["lowbit.sha256"]
    assert hashlib.sha256(raw.replace(digest.encode(), b"0" * 64)).hexdigest() == digest


# ---------------------------------------------------------------------------------------------
# Headers that claim terabytes


def _file(path: pathlib.Path, header: bytes | dict, n: int | None = None, data: bytes = b"") -> pathlib.Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if n is None else n) + text + data)
    return path


def _terabyte_files(d: pathlib.Path) -> dict[str, pathlib.Path]:
    tb = 10**12
    spec = json.loads(lowbit.checkpoint_metadata(_tensor_save(d))["lowbit.quantized"])["x"]["spec"]
    q = {"__metadata__": {"lowbit.format": "quantized-v1",
                          "lowbit.quantized": json.dumps({"x": {"shape": [tb, tb], "dtype": "F32", "spec": spec}})},
         "x.codes": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
         "x.scales": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
         "x.zero_points": {"dtype": "I8", "shape": [1], "data_offsets": [8, 9]}}
    return {
        "header length 2^60": _file(d / "len.safetensors", b"{}", n=2**60),
        "header length past the end": _file(d / "past.safetensors", b"{}", n=2**20),
        "terabyte shape": _file(d / "shape.safetensors",
                                {"w": {"dtype": "F32", "shape": [tb, tb], "data_offsets": [0, 4 * tb * tb]}}),
        "shape overflow": _file(d / "overflow.safetensors",
                                {"w": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 16]}}, data=b"\0" * 16),
        "terabyte offsets": _file(d / "offsets.safetensors",
                                  {"w": {"dtype": "U8", "shape": [4 * tb], "data_offsets": [0, 4 * tb]}}, data=b"\0" * 8),
        "terabyte quantized shape": _file(d / "q.safetensors", q, data=b"\0" * 9),
    }


LOADERS: dict[str, Callable[[pathlib.Path], Any]] = {
    "load_quantized": lowbit.load_quantized,
    "quantize_checkpoint": lambda p: lowbit.quantize_checkpoint(p, p.with_name("out"), lowbit.QuantSpec(4)),
    "dequantize_checkpoint": lambda p: lowbit.dequantize_checkpoint(p, p.with_name("out")),
    "runtime": lambda p: lowbit.runtime.MultiTaskModel.load(p),
}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_headers_claiming_terabytes_are_refused(loader: str, tmp_path: pathlib.Path) -> None:
    for what, path in _terabyte_files(tmp_path).items():
        # quantize refuses a quantized input before reading its tensors
        err = lowbit.LowbitValueError if (loader, what) == ("quantize_checkpoint", "terabyte quantized shape") \
            else LowbitFormatError
        with pytest.raises(err) as e:
            LOADERS[loader](path)
        assert path.name in str(e.value), what
        if what.startswith("header length"):
            assert "header length field claims" in str(e.value)
            with pytest.raises(LowbitFormatError, match="header length field claims"):
                lowbit.checkpoint_metadata(path)


# ---------------------------------------------------------------------------------------------
# Atomic writes


def _no_temporaries(d: pathlib.Path) -> None:
    assert not [p.name for p in d.iterdir() if p.name.startswith(".lowbit-")]


def test_write_atomic_failure_midway_keeps_the_old_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "results.json"
    write_atomic(path, "old")

    def half(f: Any) -> None:
        f.write(b"new, but only half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_atomic(path, half)
    assert path.read_text() == "old"
    _no_temporaries(tmp_path)
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"


def test_write_atomic_failed_rename_keeps_the_old_file(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "results.txt"
    write_atomic(path, "old")

    def fail(*a: Any) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk gone"):
        write_atomic(path, "new")
    assert path.read_text() == "old"
    _no_temporaries(tmp_path)


def test_demo_plot_failure_keeps_the_old_plot(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from lowbit import demo

    rows = [{"format": f, "caption_exact": 1.0, "ocr_char_acc": 2.0, "vqa_acc": 3.0, "retrieval_r1": 4.0,
             "size_mb": 1.0} for f in ("f32", "int4")]
    path = tmp_path / "results.png"
    demo.plot(rows, path)
    old = path.read_bytes()
    assert old.startswith(b"\x89PNG")
    real = Figure.savefig

    def half(self: Any, f: Any, **kw: Any) -> None:
        real(self, f, **kw)
        raise RuntimeError("interrupted")

    monkeypatch.setattr(Figure, "savefig", half)
    with pytest.raises(RuntimeError):
        demo.plot(rows, path)
    assert path.read_bytes() == old
    _no_temporaries(tmp_path)


def test_rust_writers_leave_the_old_file_when_the_rename_fails(tmp_path: pathlib.Path) -> None:
    # the target is a non-empty folder: the temporary file is written, the rename fails
    target = tmp_path / "model.safetensors"
    target.mkdir()
    (target / "keep").write_text("old")
    for write in (lambda: lowbit.save_checkpoint(target, {"w": W}),
                  lambda: lowbit.quantize(W, lowbit.QuantSpec(4)).save(target),
                  lambda: lowbit.quantize_checkpoint(hf_file(tmp_path / "in.safetensors"), target, lowbit.QuantSpec(4)),
                  lambda: nas.DeviceProfile("dev", {"f32": 1.0}, 5.0).save(target)):
        with pytest.raises(OSError):
            write()
        assert (target / "keep").read_text() == "old"
        _no_temporaries(tmp_path)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_atomic_writes_get_the_mode_a_plain_write_would(tmp_path: pathlib.Path) -> None:
    # new files: 0666 less the umask (not the temporary file's private 0600); replaced files keep
    # their mode
    old = os.umask(0o027)
    try:
        writers = {"py": lambda p: write_atomic(p, b"x"),
                   "rust": lambda p: lowbit.save_checkpoint(p, {"w": W}),
                   "profile": lambda p: nas.DeviceProfile("dev", {"f32": 1.0}, 5.0).save(p)}
        for name, write in writers.items():
            path = tmp_path / name
            write(path)
            assert path.stat().st_mode & 0o777 == 0o640, name
            path.chmod(0o604)
            write(path)
            assert path.stat().st_mode & 0o777 == 0o604, name
    finally:
        os.umask(old)


# ---------------------------------------------------------------------------------------------
# Device profiles, observers


def test_device_profile_checksum(tmp_path: pathlib.Path) -> None:
    d = nas.DeviceProfile("dev", {"f32": 10.0, "int8": 40.0}, 0.1 + 0.2, overhead_us=3.3)
    path = tmp_path / "dev.json"
    d.save(path)
    assert nas.DeviceProfile.load(path) == d
    text = path.read_text()
    assert re.search(r'"sha256": "[0-9a-f]{64}"', text)
    edited = path.with_name("edited.json")
    edited.write_text(text.replace('"int8": 40.0', '"int8": 41.0'))
    with pytest.raises(LowbitFormatError, match="does not match its \"sha256\" field") as e:
        nas.DeviceProfile.load(edited)
    assert "edited.json" in str(e.value)
    # a profile edited by hand loads once the field is gone; one written by hand needs none
    edited.write_text(re.sub(r',?\s*"sha256": "[0-9a-f]+"', "", edited.read_text()))
    assert nas.DeviceProfile.load(edited).peak_gops["int8"] == 41.0
    assert nas.DeviceProfile.from_json(d.to_json()) == d


def test_observer_state_is_json_not_pickle() -> None:
    import pickle

    from lowbit.calib import HistogramObserver

    obs = HistogramObserver(bits=4)
    obs.update(np.linspace(-1, 1, 100, dtype=np.float32))
    state = obs.__getstate__()
    assert set(state) == {"lowbit_observer"} and isinstance(json.loads(state["lowbit_observer"]), dict)
    assert pickle.loads(pickle.dumps(obs)).qparams() == obs.qparams()


def test_no_lowbit_format_unpickles() -> None:
    root = pathlib.Path(lowbit.__file__).parent
    for src in root.rglob("*.py"):
        text = src.read_text()
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M), src
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (src, call)


# ---------------------------------------------------------------------------------------------
# A file lowbit marks as its own carries its digest


def _rename_key(path: pathlib.Path, out: pathlib.Path, inf_at: int | None = None) -> pathlib.Path:
    """``path`` with ``lowbit.sha256`` renamed to ``lowbit.sha254`` (the header stays valid) and,
    optionally, the float32 at byte ``inf_at`` of the data set to +inf."""
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    at = raw.index(b'"lowbit.sha256"', 8, 8 + n)
    raw[at:at + 15] = b'"lowbit.sha254"'
    if inf_at is not None:
        raw[8 + n + inf_at:8 + n + inf_at + 4] = struct.pack("<f", float("inf"))
    out.write_bytes(bytes(raw))
    return out


def test_a_renamed_or_removed_digest_is_refused(tmp_path: pathlib.Path) -> None:
    # Renaming the key switched the check off: +inf loaded without a word.
    path = tmp_path / "s.safetensors"
    lowbit.save_checkpoint(path, {"w": lowbit.quantize(W, lowbit.QuantSpec(4)), "b": W[0]})
    assert np.isfinite(lowbit.load_quantized(path)["b"]).all()
    bad = _rename_key(path, tmp_path / "renamed.safetensors", inf_at=0)  # "b" is the first tensor
    meta = lowbit.checkpoint_metadata(bad)
    assert "lowbit.sha254" in meta and "lowbit.sha256" not in meta
    loaders = [lowbit.load_quantized, lambda p: lowbit.dequantize_checkpoint(p, p.with_name("out.safetensors"))]
    for load in loaders:
        with pytest.raises(LowbitFormatError, match="carries lowbit metadata .*lowbit.format.* but no lowbit.sha256") as e:
            load(bad)
        assert bad.name in str(e.value)
    # Removed by another tool that copied lowbit's other keys: the same.
    from safetensors.numpy import load_file, save_file

    moved = tmp_path / "moved.safetensors"
    save_file(load_file(str(path)), str(moved),
              metadata={k: v for k, v in lowbit.checkpoint_metadata(path).items() if k != "lowbit.sha256"})
    for load in loaders:
        with pytest.raises(LowbitFormatError, match="no lowbit.sha256"):
            load(moved)
    # Any key lowbit writes marks the file (a float file of models.save has no lowbit.format).
    plain = tmp_path / "plain.safetensors"
    save_file({"w": W}, str(plain), metadata={"lowbit.weights": "f32"})
    with pytest.raises(LowbitFormatError, match=r"\(lowbit.weights\)"):
        lowbit.quantize_checkpoint(plain, tmp_path / "q.safetensors", lowbit.QuantSpec(4))


def test_a_renamed_digest_in_a_model_file_is_refused(tmp_path: pathlib.Path) -> None:
    from lowbit import models

    path = tmp_path / "m.safetensors"
    models.save(tiny_vlm(), path)
    bad = _rename_key(path, tmp_path / "renamed.safetensors", inf_at=0)
    for load in (models.load, lowbit.runtime.MultiTaskModel.load):
        with pytest.raises(LowbitFormatError, match="lowbit.multitask.* but no lowbit.sha256"):
            load(bad)


# ---------------------------------------------------------------------------------------------
# The same input gives the same bytes


_SAVE_TWICE = """
import sys, numpy as np, lowbit
W = np.linspace(-1, 1, 64 * 32, dtype=np.float32).reshape(64, 32)
meta = {f"key{i}": f"value{i}" for i in range(12)}
lowbit.save_checkpoint(sys.argv[1], {"w": lowbit.quantize(W, lowbit.QuantSpec(4)), "b": W[0]}, meta)
lowbit.quantize_checkpoint(sys.argv[2], sys.argv[3], lowbit.QuantSpec(4))
"""


def test_writes_are_reproducible(tmp_path: pathlib.Path) -> None:
    import subprocess
    import sys

    from safetensors.numpy import save_file

    src = tmp_path / "in.safetensors"
    save_file({"w": W, "b": np.ones(64, np.float32)}, str(src), metadata={f"k{i}": str(i) for i in range(12)})
    runs = []
    for i in range(3):  # separate processes: a hash map's order differs between them
        s, q = tmp_path / f"s{i}.safetensors", tmp_path / f"q{i}.safetensors"
        subprocess.run([sys.executable, "-c", _SAVE_TWICE, str(s), str(src), str(q)], check=True)
        runs.append((s.read_bytes(), q.read_bytes()))
    # and twice in this process
    for i in range(2):
        s, q = tmp_path / f"t{i}.safetensors", tmp_path / f"u{i}.safetensors"
        lowbit.save_checkpoint(s, {"w": lowbit.quantize(W, lowbit.QuantSpec(4)), "b": W[0]},
                               {f"key{i}": f"value{i}" for i in range(12)})
        lowbit.quantize_checkpoint(src, q, lowbit.QuantSpec(4))
        runs.append((s.read_bytes(), q.read_bytes()))
    assert all(r == runs[0] for r in runs)
    header = runs[0][0][8:8 + struct.unpack("<Q", runs[0][0][:8])[0]]
    keys = list(json.loads(header)["__metadata__"])
    assert keys == sorted(keys)


# ---------------------------------------------------------------------------------------------
# A writer killed mid-write leaves the old file and no temporary file


_PY_WRITER = """
import sys, time
from lowbit._io import write_atomic

def slow(f):
    f.write(b"x" * (1 << 20))
    f.flush()
    print("writing", flush=True)
    while True:
        f.write(b"x" * (1 << 16))
        time.sleep(0.001)

write_atomic(sys.argv[1], slow)
"""

_RUST_WRITER = """
import sys, numpy as np, lowbit
big = np.ones(1 << 24, np.float32)  # 64 MB
print("ready", flush=True)
while True:
    lowbit.save_checkpoint(sys.argv[1], {"w": big})
"""


def _writing(pid: int, folder: pathlib.Path, target: pathlib.Path) -> bool:
    """Whether process ``pid`` holds a file of ``folder`` open that is not ``target``: a
    temporary file being written (``/dir/#123 (deleted)`` when unnamed)."""
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    return any(link.startswith(str(folder) + "/") and link != str(target) for link in links)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to see a writer's open files")
@pytest.mark.parametrize("writer", ["python", "rust"])
def test_a_sigkilled_writer_leaves_the_old_file_and_no_temporary(writer: str, tmp_path: pathlib.Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "model.safetensors"
    lowbit.save_checkpoint(target, {"w": W})
    old = target.read_bytes()
    for delay in (0.0, 0.003, 0.02, 0.05):
        p = subprocess.Popen([sys.executable, "-c", _PY_WRITER if writer == "python" else _RUST_WRITER, str(target)],
                             stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout is not None
            p.stdout.readline()
            deadline = time.monotonic() + 60
            while not _writing(p.pid, tmp_path, target):
                assert time.monotonic() < deadline and p.poll() is None, "the writer never wrote"
            time.sleep(delay)
            os.kill(p.pid, signal.SIGKILL)
        finally:
            p.kill()
            p.wait()
        # the Rust writer loops over whole writes, so a kill may land after one completed
        names = sorted(q.name for q in tmp_path.iterdir())
        assert names == ["model.safetensors"], (delay, names)
        now = target.read_bytes()
        if writer == "python" or now == old:
            assert now == old
            np.testing.assert_array_equal(lowbit.load_quantized(target)["w"], W)
        else:
            assert lowbit.load_quantized(target)["w"].shape == (1 << 24,)
            lowbit.save_checkpoint(target, {"w": W})
            old = target.read_bytes()


def test_write_atomic_without_unnamed_files_still_cleans_up(tmp_path: pathlib.Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # where the OS has no O_TMPFILE the temporary file is named: removed when the write fails
    from lowbit import _io

    monkeypatch.setattr(_io, "_unnamed", lambda folder: None)
    path = tmp_path / "r.txt"
    write_atomic(path, "old")

    def half(f: Any) -> None:
        f.write(b"half")
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".lowbit-")]  # named
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_atomic(path, half)
    assert path.read_text() == "old"
    _no_temporaries(tmp_path)


@pytest.mark.skipif(not hasattr(os, "O_TMPFILE"), reason="Linux O_TMPFILE")
def test_write_atomic_names_nothing_while_writing(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "r.txt"
    write_atomic(path, "old")

    def look(f: Any) -> None:
        f.write(b"new")
        assert [p.name for p in tmp_path.iterdir()] == ["r.txt"]

    write_atomic(path, look)
    assert path.read_text() == "new"
    _no_temporaries(tmp_path)


# ---------------------------------------------------------------------------------------------
# Empty inputs that raised numpy's errors, or misleading ones


def test_empty_ternary_layer_and_empty_per_channel_qparams() -> None:
    torch = pytest.importorskip("torch")
    from lowbit.bitnet import TernaryLinear

    bias = np.array([0.5, -1.0, 2.0], np.float32)
    for b in (None, bias):
        layer = TernaryLinear.from_float(np.zeros((3, 0), np.float32), b)
        for shape in ((2, 0), (0, 0), (4, 1, 0)):
            x = np.zeros(shape, np.float32)
            # the recipe's product is F.linear on the quantized weight: an empty sum, then the bias
            want = torch.nn.functional.linear(torch.from_numpy(x), torch.zeros(3, 0),
                                              None if b is None else torch.from_numpy(b)).numpy()
            got = layer.forward(x)
            assert got.shape == shape[:-1] + (3,) and got.dtype == np.float32
            np.testing.assert_array_equal(got, want)
        assert isinstance(layer.forward(torch.zeros(2, 0)), torch.Tensor)
    # no rows for a layer with inputs: the empty output
    assert TernaryLinear.from_float(np.ones((3, 4), np.float32)).forward(np.zeros((0, 4), np.float32)).shape == (0, 3)
    # an empty per-channel tensor with empty scale / zero-point lists: an empty result
    y, mask = lowbit.fake_quantize_per_channel_affine(np.zeros((0, 4), np.float32), [], [], 0, -8, 7, return_mask=True)
    assert y.shape == mask.shape == (0, 4) and y.dtype == np.float32
    assert lowbit.quantize_per_channel(np.zeros((0, 4), np.float32), [], [], 0, -8, 7).shape == (0, 4)
    # but an empty list for channels that exist is still refused, by count
    with pytest.raises(lowbit.LowbitValueError, match="0 entries"):
        lowbit.fake_quantize_per_channel_affine(np.zeros((2, 4), np.float32), [], [], 0, -8, 7)
