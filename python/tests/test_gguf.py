"""GGUF export and load, checked against the ``gguf`` package (llama.cpp's ``gguf-py``), the oracle:
its reader reads lowbit's files and its dequantize gives lowbit's values bit for bit; lowbit's
quantization equals ``gguf.quants.quantize`` byte for byte on random and degenerate data; lowbit
reads what ``gguf.GGUFWriter`` writes as ``GGUFReader`` does; bad files are ``LowbitFormatError``."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

import lowbit
import lowbit.export
from lowbit import _lowbit

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as GT  # noqa: E402
from gguf.quants import dequantize as g_dequantize  # noqa: E402
from gguf.quants import quantize as g_quantize  # noqa: E402

BLOCK_TYPES = ["Q8_0", "Q4_0", "TQ1_0", "TQ2_0"]
FLOAT_TYPES = ["F16", "BF16", "F32"]


def flat(v: object) -> object:
    """GGUFReader's ``contents()`` of an array of arrays: the inner elements, flattened (lowbit
    keeps the nesting)."""
    if isinstance(v, list) and v and isinstance(v[0], list):
        return [x for inner in v for x in flat(inner)]  # type: ignore[union-attr]
    return v


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(bits(a), bits(b))


def ref_quantize(x: np.ndarray, ty: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = g_quantize(x, GT[ty])
    return q.view(np.uint8).reshape(*x.shape[:-1], -1)


def ref_dequantize(data: np.ndarray, ty: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return g_dequantize(data, GT[ty])


# ---------------------------------------------------------------------------------------------
# (b) quantization equals gguf.quants.quantize byte for byte


def _degenerate() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    n = (4, 512)
    ties_q8 = np.tile((np.arange(32) - 16 + 0.5).astype(np.float32), (4, 16))
    ties_q8[:, ::32] = 127.0  # amax 127: d = 1, x * (1/d) lands on .5 exactly
    ties_q4 = np.tile((np.arange(32) / 2 - 8).astype(np.float32), (4, 16))  # max -8: d = 1, x + 8.5 on integers
    ties_t = np.tile(np.array([2.0, 1.0, -1.0, 0.5, -0.5, 0.0, 1.5, -1.5], np.float32), (4, 64))  # amax 2: x/d = .5 ties
    return {
        "normal": rng.standard_normal(n).astype(np.float32),
        "zeros": np.zeros(n, np.float32),
        "negative-zeros": -np.zeros(n, np.float32),
        "constant": np.full(n, 0.37, np.float32),
        "negative-constant": np.full(n, -3.0, np.float32),
        "one-sided": np.abs(rng.standard_normal(n)).astype(np.float32),
        "one-sided-negative": -np.abs(rng.standard_normal(n)).astype(np.float32),
        "tiny-range": (1.0 + rng.standard_normal(n) * 1e-7).astype(np.float32),
        "tiny-values": (rng.standard_normal(n) * 1e-30).astype(np.float32),
        "near-f16-max": (rng.uniform(-1, 1, n) * 65504).astype(np.float32),
        "f16-overflow": (rng.standard_normal(n) * 1e7).astype(np.float32),  # d rounds to inf, as gguf writes it
        "huge": (rng.standard_normal(n) * 1e37).astype(np.float32),
        "denormals-beside-normals": np.where(rng.random(n) < 0.5, 1e-42, 1.0).astype(np.float32),
        "ties-q8": ties_q8,
        "ties-q4": ties_q4,
        "ties-ternary": ties_t,
        "few-outliers": np.where(rng.random(n) < 0.01, 100.0, 1e-3 * rng.standard_normal(n)).astype(np.float32),
    }


DEGENERATE = _degenerate()


@pytest.mark.parametrize("ty", BLOCK_TYPES + FLOAT_TYPES)
@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_quantize_equals_gguf(case: str, ty: str) -> None:
    x = DEGENERATE[case]
    ref = ref_quantize(x, ty)
    got = _lowbit.gguf_quantize(x, ty)
    assert got.dtype == np.uint8 and got.shape == ref.shape
    assert np.array_equal(got, ref)
    assert same_bits(_lowbit.gguf_dequantize(ref, ty), ref_dequantize(ref, ty))


@pytest.mark.parametrize("ty", FLOAT_TYPES)
def test_float_types_keep_nan_and_inf_as_gguf_does(ty: str) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2**32, (4, 4096), dtype=np.uint64).astype(np.uint32).view(np.float32)  # NaN payloads too
    x[0, :4] = [np.nan, np.inf, -np.inf, -0.0]
    assert np.array_equal(_lowbit.gguf_quantize(x, ty), ref_quantize(x, ty))


@pytest.mark.parametrize("ty", ["F16", "BF16"])
def test_every_16_bit_pattern_dequantizes_as_gguf(ty: str) -> None:
    b = np.arange(2**16, dtype=np.uint16).view(np.uint8).reshape(4, -1)
    assert same_bits(_lowbit.gguf_dequantize(b, ty), ref_dequantize(b, ty))


@pytest.mark.parametrize("ty", BLOCK_TYPES)
def test_random_blocks_dequantize_as_gguf(ty: str) -> None:
    """Any bytes, NaN / Inf / subnormal / negative d and codes quantizers never write included."""
    _, size = gguf.GGML_QUANT_SIZES[GT[ty]]
    raw = np.random.default_rng(2).integers(0, 256, (64, size * 8), dtype=np.uint8)
    assert same_bits(_lowbit.gguf_dequantize(raw, ty), ref_dequantize(raw, ty))


@pytest.mark.parametrize("ty", BLOCK_TYPES)
def test_undefined_inputs_are_refused(ty: str) -> None:
    """Where gguf's reference converts NaN / Inf to integers (undefined in C and NumPy) lowbit
    raises LowbitValueError instead of guessing: non-finite inputs, and blocks whose 1/d overflows."""
    x = np.ones((2, 256), np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[1, 7] = bad
        with pytest.raises(lowbit.LowbitValueError, match="element 263"):
            _lowbit.gguf_quantize(y, ty)
    tiny = np.full((1, 256), 1e-41, np.float32)
    with pytest.raises(lowbit.LowbitValueError, match="block 0 is too close to zero"):
        _lowbit.gguf_quantize(tiny, ty)


def test_codec_arguments() -> None:
    with pytest.raises(lowbit.LowbitValueError, match="Q4_K"):
        _lowbit.gguf_quantize(np.zeros((1, 256), np.float32), "Q4_K")
    with pytest.raises(lowbit.LowbitValueError, match="last axis"):
        _lowbit.gguf_quantize(np.zeros((2, 33), np.float32), "Q8_0")
    with pytest.raises(lowbit.LowbitValueError, match="last axis"):
        _lowbit.gguf_dequantize(np.zeros((2, 33), np.uint8), "Q8_0")
    x = np.random.default_rng(3).standard_normal((64, 64)).astype(np.float32)
    assert np.array_equal(_lowbit.gguf_quantize(x.T, "Q4_0"), ref_quantize(np.ascontiguousarray(x.T), "Q4_0"))


# ---------------------------------------------------------------------------------------------
# (a) gguf's reader reads lowbit's files; its dequantize gives lowbit's values bit for bit


def _reader_values(path: str) -> dict[str, tuple[str, np.ndarray]]:
    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, ref_dequantize(t.data, t.tensor_type.name).reshape(
        tuple(int(d) for d in reversed(t.shape)))) for t in r.tensors}


def _check_against_reader(path: str) -> lowbit.GGUFFile:
    ref = _reader_values(path)
    exact = lowbit.load_gguf(path, dequantize=True)
    loaded = lowbit.load_gguf(path)
    assert list(ref) == list(loaded.tensors) == list(exact.tensors)
    for name, (ty, want) in ref.items():
        assert loaded.types[name] == exact.types[name] == ty
        assert same_bits(exact.tensors[name], want), name
        got = loaded.arrays()[name]
        if loaded.exact[name]:
            assert same_bits(got, want), name
        else:  # only the sign of some zeros differs (see GGUFFile.exact)
            assert np.array_equal(got, want), name
            diff = bits(got) != bits(want)
            assert diff.any() and np.all(want[diff] == 0) and np.all(np.signbit(want[diff])), name
    return loaded


def test_export_is_read_by_gguf_bit_for_bit(tmp_path) -> None:
    rng = np.random.default_rng(4)
    w = {f"w{i}": rng.standard_normal((16, 512)).astype(np.float32) for i in range(3)}
    spec8 = lowbit.QuantSpec(8, granularity="group", group_size=32)
    tensors = {
        "q8": lowbit.quantize(w["w0"], spec8),
        "q4": lowbit.quantize(w["w1"], lowbit.QuantSpec(4, symmetric=False, granularity="channel", axis=0)),
        "tern": lowbit.quantize(np.sign(w["w2"]), lowbit.QuantSpec(2), np.array(1.0, np.float32),
                                np.array(0, np.int32)),
        "float2d": w["w0"],
        "bias": rng.standard_normal(16).astype(np.float32),
        "zeros": np.zeros((4, 256), np.float32),
    }
    for ternary in ("TQ2_0", "TQ1_0"):
        for float_type in FLOAT_TYPES:
            path = str(tmp_path / f"{ternary}-{float_type}.gguf")
            r = lowbit.export.gguf(tensors, path, ternary=ternary, float_type=float_type)
            assert r.tensors == {"q8": "Q8_0", "q4": "Q4_0", "tern": ternary, "float2d": float_type,
                                 "bias": float_type, "zeros": float_type}
            assert r.nbytes == os.path.getsize(path) and r.path == path
            f = _check_against_reader(path)
            assert isinstance(f.tensors["q8"], lowbit.QuantizedTensor) and f.exact["q8"]
            assert isinstance(f.tensors["tern"], lowbit.QuantizedTensor) and f.exact["tern"]
            assert isinstance(f.tensors["q4"], lowbit.QuantizedTensor)
            # ternary codes and their scale survive exactly
            assert np.array_equal(f.tensors["tern"].dequantize(), tensors["tern"].dequantize())
            assert f.tensors["tern"].int_repr().min() == -1 and f.tensors["tern"].int_repr().max() == 1
    # bits= quantizes float matrices; what is not a whole number of blocks stays float
    path = str(tmp_path / "bits.gguf")
    for b, ty in ((2, "TQ2_0"), (4, "Q4_0"), (8, "Q8_0")):
        r = lowbit.export.gguf({"m": w["w0"], "odd": w["w0"][:, :40], "v": w["w0"][0]}, path, bits=b)
        assert r.tensors == {"m": ty, "odd": "F16", "v": "F16"}
        f = _check_against_reader(path)
        assert same_bits(lowbit.load_gguf(path, dequantize=True).tensors["m"],
                         ref_dequantize(ref_quantize(w["w0"], ty), ty))


def test_zero_blocks_and_signs_of_zero(tmp_path) -> None:
    """Q4_0's d is -max/8: about half its blocks have d < 0, where gguf's zero codes give -0.0."""
    x = np.random.default_rng(5).standard_normal((8, 256)).astype(np.float32)
    x[0] = 0.0
    path = str(tmp_path / "z.gguf")
    lowbit.export.gguf({"q4": x, "q8": x, "t": x}, path, bits=4)
    f = _check_against_reader(path)
    assert f.exact["q4"] is False
    lowbit.export.gguf({"q8": x}, path, bits=8)
    f = _check_against_reader(path)
    assert f.exact["q8"] and isinstance(f.tensors["q8"], lowbit.QuantizedTensor)


def test_model_export(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    import lowbit.torch as lt
    from lowbit.models.qat import QATLinear

    torch.manual_seed(0)
    net = torch.nn.Sequential(lt.BitLinear(256, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32))
    net.add_module("4", QATLinear(torch.nn.Linear(32, 64), "int4"))
    net.add_module("5", QATLinear(torch.nn.Linear(64, 32), "int2"))
    path = str(tmp_path / "net.gguf")
    r = lowbit.export.gguf(net, path, metadata={"general.architecture": "lowbit-test", "general.name": "net"})
    assert r.tensors["0.weight"] == "TQ2_0" and r.tensors["2.weight"] == "F16"
    assert r.tensors["4.weight"] == r.tensors["5.weight"] == "Q4_0"  # 2-bit codes of 4 levels are not ternary
    assert "3.num_batches_tracked" not in r.tensors
    f = _check_against_reader(path)
    codes, scale = lowbit.ternary_quantize(net[0].weight.detach().numpy())
    assert np.array_equal(f.tensors["0.weight"].int_repr(), codes)
    assert same_bits(f.tensors["0.weight"].dequantize(), codes * np.float32(np.float16(scale)))
    assert f.metadata["general.architecture"] == "lowbit-test" and f.metadata["general.name"] == "net"
    r = lowbit.export.gguf(net, path, ternary="TQ1_0", float_type="F32")
    assert r.tensors["0.weight"] == "TQ1_0" and r.tensors["2.weight"] == "F32"
    _check_against_reader(path)


def test_metadata_types_round_trip(tmp_path) -> None:
    meta = {
        "general.architecture": "llama", "general.name": "t", "u8": np.uint8(200), "i8": np.int8(-5),
        "u16": np.uint16(60000), "i16": np.int16(-300), "u32": np.uint32(4_000_000_000), "i32": -7,
        "u64": np.uint64(2**63 + 5), "i64": 2**40, "f32": 0.1, "f64": np.float64(0.1), "flag": True,
        "s": "héllo", "ints": [1, 2, 3], "strs": ["a", "b"], "floats": np.array([0.5, 1.5], np.float32),
        "nested": [[1, 2], [3]], "general.alignment": 64,
    }
    path = str(tmp_path / "m.gguf")
    lowbit.export.gguf({"w": np.ones((2, 32), np.float32)}, path, metadata=meta)
    f = lowbit.load_gguf(path)
    r = gguf.GGUFReader(path)
    for key in meta:
        assert flat(f.metadata[key]) == r.fields[key].contents(), key
    assert f.metadata["nested"] == [[1, 2], [3]]
    assert f.metadata_types["u8"] == "UINT8" and f.metadata_types["f64"] == "FLOAT64"
    assert f.metadata_types["i64"] == "INT64" and f.metadata_types["floats"] == "ARRAY[FLOAT32]"
    assert f.metadata_types["nested"] == "ARRAY[ARRAY[INT32]]" and f.metadata_types["general.alignment"] == "UINT32"
    assert f.metadata["f32"] == float(np.float32(0.1)) and f.metadata["f64"] == 0.1
    with pytest.raises(lowbit.LowbitValueError, match="alignment"):
        lowbit.export.gguf({"w": np.ones(2, np.float32)}, path, metadata={"general.alignment": 3})
    for bad, err in (({"e": []}, lowbit.LowbitValueError), ({"m": [1, "a"]}, lowbit.LowbitValueError),
                     ({"b": b"x"}, lowbit.LowbitTypeError), ({"n": None}, lowbit.LowbitTypeError),
                     ({1: 2}, lowbit.LowbitTypeError), ({"big": 2**70}, lowbit.LowbitValueError),
                     ({"general.architecture": 5}, lowbit.LowbitTypeError)):
        with pytest.raises(err):
            lowbit.export.gguf({"w": np.ones(2, np.float32)}, path, metadata=bad)


# ---------------------------------------------------------------------------------------------
# (c) lowbit reads what gguf's own writer writes, as GGUFReader does


def _gguf_written(path: str, raw_random: bool = False) -> None:
    rng = np.random.default_rng(6)
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint8("k.u8", 7)
    w.add_int8("k.i8", -7)
    w.add_uint16("k.u16", 65535)
    w.add_int16("k.i16", -32768)
    w.add_uint32("k.u32", 2**32 - 1)
    w.add_int32("k.i32", -(2**31))
    w.add_uint64("k.u64", 2**64 - 1)
    w.add_int64("k.i64", -(2**63))
    w.add_float32("k.f32", 1.5)
    w.add_float64("k.f64", 1e300)
    w.add_bool("k.bool", False)
    w.add_string("k.str", "ünïcode")
    w.add_array("k.arr_i", [1, -2, 3])
    w.add_array("k.arr_f", [0.25, 1e-3])
    w.add_array("k.arr_s", ["x", "", "yz"])
    w.add_array("k.arr_b", [True, False])
    w.add_array("k.arr_nested", [[1, 2], [3, 4, 5]])
    w.add_key_value("k.arr_u8", [1, 255], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT8)
    x = rng.standard_normal((4, 512)).astype(np.float32)
    for ty in BLOCK_TYPES:
        w.add_tensor(f"t.{ty}", ref_quantize(x, ty), raw_dtype=GT[ty])
    w.add_tensor("t.F32", x)
    w.add_tensor("t.F16", x.astype(np.float16))
    w.add_tensor("t.BF16", ref_quantize(x, "BF16"), raw_dtype=GT.BF16)
    w.add_tensor("t.3d", rng.standard_normal((2, 3, 32)).astype(np.float32))
    if raw_random:  # any block bytes: NaN / Inf / negative d, TQ2_0 code 3
        for ty in BLOCK_TYPES:
            _, size = gguf.GGML_QUANT_SIZES[GT[ty]]
            w.add_tensor(f"r.{ty}", rng.integers(0, 256, (3, size * 2), dtype=np.uint8), raw_dtype=GT[ty])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("raw_random", [False, True])
def test_load_what_gguf_writes(tmp_path, raw_random: bool) -> None:
    path = str(tmp_path / "g.gguf")
    _gguf_written(path, raw_random)
    f = _check_against_reader(path)
    r = gguf.GGUFReader(path)
    assert set(f.metadata) == set(r.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    for key, field in r.fields.items():
        if not key.startswith("GGUF."):
            assert flat(f.metadata[key]) == field.contents(), key
            names = [gguf.GGUFValueType(t).name for t in field.types]
            want = names[0] if len(names) == 1 else "".join(f"{n}[" for n in names[:-1]) + names[-1] + "]" * (len(names) - 1)
            assert f.metadata_types[key] == want, key
    assert f.version == 3
    assert f.tensors["t.3d"].shape == (2, 3, 32)
    for ty in BLOCK_TYPES:
        assert isinstance(f.tensors[f"t.{ty}"], lowbit.QuantizedTensor), ty
    assert f.tensors["t.F16"].dtype == np.float32


# ---------------------------------------------------------------------------------------------
# (d) bad files and failed writes


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[bytes, int]:
    """A small valid file and the end of its last tensor's data."""
    path = str(tmp_path_factory.mktemp("gguf") / "small.gguf")
    lowbit.export.gguf({"a": np.ones((1, 32), np.float32), "b": np.arange(256, dtype=np.float32).reshape(1, 256)},
                       path, bits=2, metadata={"general.name": "s", "list": ["x", "y"], "n": np.uint16(3)})
    r = gguf.GGUFReader(path)
    end = max(int(t.data_offset) + int(t.n_bytes) for t in r.tensors)
    return open(path, "rb").read(), end


def _load_bytes(tmp_path, data: bytes) -> lowbit.GGUFFile:
    p = tmp_path / "x.gguf"
    p.write_bytes(data)
    return lowbit.load_gguf(p)


def test_every_truncation_is_a_format_error(tmp_path, small) -> None:
    data, end = small
    for n in range(len(data)):
        if n < end:
            with pytest.raises(lowbit.LowbitFormatError):
                _load_bytes(tmp_path, data[:n])
        else:  # only the padding after the last tensor is missing
            _load_bytes(tmp_path, data[:n])


def test_flipped_bytes_load_or_raise_format_errors(tmp_path, small) -> None:
    data, _ = small
    for i in range(len(data)):
        for x in (0x01, 0xFF):
            b = bytearray(data)
            b[i] ^= x
            try:
                f = _load_bytes(tmp_path, bytes(b))
            except lowbit.LowbitFormatError:
                continue
            f.arrays()


def _file(tensors: list[tuple[str, list[int], int, bytes]], kv: bytes = b"", n_kv: int = 0) -> bytes:
    """A GGUF v3 file written by hand: ``tensors`` are (name, dims innermost first, type id, data)."""
    import struct

    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), n_kv) + kv
    infos, datas, off = b"", b"", 0
    for name, dims, ty, d in tensors:
        infos += struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", len(dims))
        infos += b"".join(struct.pack("<Q", x) for x in dims) + struct.pack("<IQ", ty, off)
        pad = (-len(d)) % 32
        datas += d + b"\0" * pad
        off += len(d) + pad
    out = head + infos
    return out + b"\0" * ((-len(out)) % 32) + datas


def test_malicious_headers(tmp_path) -> None:
    import struct

    ok = _file([("w", [32], 8, bytes(34))])
    assert _load_bytes(tmp_path, ok).types == {"w": "Q8_0"}
    cases = {
        "huge tensor count": b"GGUF" + struct.pack("<IQQ", 3, 2**63, 0),
        "huge kv count": b"GGUF" + struct.pack("<IQQ", 3, 0, 2**62),
        "huge string": b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**60),
        "huge array": _file([], struct.pack("<Q", 1) + b"a" + struct.pack("<IIQ", 9, 0, 2**50), 1),
        "unknown value type": _file([], struct.pack("<Q", 1) + b"a" + struct.pack("<I", 99), 1),
        "version 1": b"GGUF" + struct.pack("<IQQ", 1, 0, 0),
        "wrong magic": b"GGUX" + ok[4:],
    }
    for label, data in cases.items():
        with pytest.raises(lowbit.LowbitFormatError):
            _load_bytes(tmp_path, data)
    named = {
        "unknown GGML type id 77": _file([("bad_type", [32], 77, bytes(34))]),
        "not a whole number": _file([("bad_block", [33], 8, bytes(68))]),
        "needs more bytes": _file([("huge_dims", [2**40, 2**40], 0, bytes(4))]),
        "runs past the end": _file([("a", [32], 8, bytes(34)), ("short", [64], 8, bytes(34))]),
        "5 dimensions": _file([("rank5", [1, 1, 1, 1, 1], 0, bytes(4))]),
        "appears twice": _file([("dup", [1], 0, bytes(4)), ("dup", [1], 0, bytes(4))]),
        "does not decode": _file([("kquant", [256], 12, bytes(144))]),
    }
    for msg, data in named.items():
        with pytest.raises(lowbit.LowbitFormatError, match=msg) as e:
            _load_bytes(tmp_path, data)
        assert any(n in str(e.value) for n in ("bad_type", "bad_block", "huge_dims", "short", "rank5", "dup", "kquant"))


def test_unreadable_files(tmp_path) -> None:
    with pytest.raises(lowbit.LowbitIOError):
        lowbit.load_gguf(tmp_path / "missing.gguf")
    with pytest.raises(lowbit.LowbitIOError):
        lowbit.load_gguf(tmp_path)
    with pytest.raises(lowbit.LowbitFormatError):
        _load_bytes(tmp_path, b"")
    with pytest.raises(lowbit.LowbitTypeError):
        lowbit.load_gguf(123)  # type: ignore[arg-type]


def test_failed_writes_leave_nothing(tmp_path) -> None:
    good = {"w": np.ones((2, 32), np.float32)}
    bad = {"w": np.ones((2, 32), np.float32), "v": np.full((1, 32), np.nan, np.float32)}
    path = tmp_path / "out.gguf"
    with pytest.raises(lowbit.LowbitValueError, match="v: element 0"):
        lowbit.export.gguf(bad, path, bits=8)
    assert os.listdir(tmp_path) == []
    lowbit.export.gguf(good, path)
    before = path.read_bytes()
    with pytest.raises(lowbit.LowbitValueError):
        lowbit.export.gguf(bad, path, bits=8)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["out.gguf"]
    with pytest.raises(lowbit.LowbitIOError):
        lowbit.export.gguf(good, tmp_path / "missing" / "x.gguf")
    with pytest.raises(lowbit.LowbitValueError, match="whole 32-element blocks"):
        lowbit.export.gguf({"q": lowbit.quantize(np.ones((2, 40), np.float32), lowbit.QuantSpec(8))}, path)
    for kw, err in (({"ternary": "TQ3_0"}, lowbit.LowbitValueError), ({"float_type": "F64"}, lowbit.LowbitValueError),
                    ({"bits": 3}, lowbit.LowbitValueError), ({"bits": "4"}, lowbit.LowbitTypeError),
                    ({"ternary": 2}, lowbit.LowbitTypeError)):
        with pytest.raises(err):
            lowbit.export.gguf(good, path, **kw)
    for t in ("abc", [1, 2], {"w": "x"}, {"w": np.ones(3, np.int32)}, {"": np.ones(3, np.float32)}):
        with pytest.raises(lowbit.LowbitTypeError):
            lowbit.export.gguf(t, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["out.gguf"]


@pytest.mark.parametrize("ternary", ["TQ2_0", "TQ1_0"])
def test_load_then_export_gives_the_same_blocks(tmp_path, ternary: str) -> None:
    """GGML's quantizers always write the block's extreme code, so lowbit re-quantizing the values
    of a loaded tensor gives back the very bytes: load_gguf → export.gguf is lossless."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((6, 512)).astype(np.float32)
    x[1] = 0.0
    x[2, :256] = -x[2, :256] * 1e-3
    src = str(tmp_path / "src.gguf")
    w = gguf.GGUFWriter(src, "llama")
    for ty in ("Q8_0", "Q4_0", ternary):
        w.add_tensor(ty, ref_quantize(x, ty), raw_dtype=GT[ty])
    w.add_tensor("F16", x.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = lowbit.load_gguf(src)
    dst = str(tmp_path / "dst.gguf")
    r = lowbit.export.gguf(f.tensors, dst, ternary=ternary)
    assert r.tensors == f.types
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(dst)
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.name == tb.name and ta.tensor_type == tb.tensor_type
        assert np.array_equal(np.asarray(ta.data).view(np.uint8), np.asarray(tb.data).view(np.uint8)), ta.name
