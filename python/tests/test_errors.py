"""Bad input gets a clear lowbit exception (never a panic or silent garbage)."""

import numpy as np
import pytest
import torch

import lowbit

X = np.ones((4, 6), dtype=np.float32)

CASES = [
    # (callable, expected exception, message fragment)
    (lambda: lowbit.fake_quantize_per_tensor_affine(X, 0.0, 0, -8, 7), lowbit.LowbitValueError, "scale"),
    (lambda: lowbit.fake_quantize_per_tensor_affine(X, -1.0, 0, -8, 7), lowbit.LowbitValueError, "scale"),
    (lambda: lowbit.fake_quantize_per_tensor_affine(X, float("nan"), 0, -8, 7), lowbit.LowbitValueError, "scale"),
    (lambda: lowbit.fake_quantize_per_tensor_affine(X, float("inf"), 0, -8, 7), lowbit.LowbitValueError, "scale"),
    (lambda: lowbit.fake_quantize_per_tensor_affine(X, 1e-60, 0, -8, 7), lowbit.LowbitValueError, "float32"),
    (lambda: lowbit.fake_quantize_per_tensor_affine(X, 0.1, 9, -8, 7), lowbit.LowbitValueError, "zero_point"),
    (lambda: lowbit.fake_quantize_per_tensor_affine(X, 0.1, 0, 7, -8), lowbit.LowbitValueError, "quant_min"),
    (lambda: lowbit.fake_quantize_per_tensor_affine(X, 0.1, 0, 0, 2**30), lowbit.LowbitValueError, "2^24"),
    (lambda: lowbit.fake_quantize_per_tensor_affine(X.astype(np.int32), 0.1, 0, -8, 7), lowbit.LowbitTypeError, "float32"),
    (lambda: lowbit.fake_quantize_per_tensor_affine(X.astype(np.complex64), 0.1, 0, -8, 7), lowbit.LowbitTypeError, "x"),
    (lambda: lowbit.fake_quantize_per_tensor_affine("abc", 0.1, 0, -8, 7), lowbit.LowbitTypeError, "x"),
    (lambda: lowbit.fake_quantize_per_tensor_affine(None, 0.1, 0, -8, 7), lowbit.LowbitTypeError, "x"),
    (lambda: lowbit.fake_quantize_per_tensor_affine(X, "0.1", 0, -8, 7), lowbit.LowbitTypeError, "scale"),
    (lambda: lowbit.fake_quantize_per_tensor_affine(X, 0.1, 0.5, -8, 7), lowbit.LowbitTypeError, "zero_point"),
    (lambda: lowbit.fake_quantize_per_channel_affine(X, [0.1] * 3, [0] * 3, 0, -8, 7), lowbit.LowbitValueError, "scales has 3"),
    (lambda: lowbit.fake_quantize_per_channel_affine(X, [0.1] * 4, [0] * 3, 0, -8, 7), lowbit.LowbitValueError, "zero_points"),
    (lambda: lowbit.fake_quantize_per_channel_affine(X, [0.1] * 4, [0] * 4, 2, -8, 7), lowbit.LowbitValueError, "axis"),
    (lambda: lowbit.fake_quantize_per_channel_affine(X, [0.1, 0.1, 0.0, 0.1], [0] * 4, 0, -8, 7), lowbit.LowbitValueError, "scales[2]"),
    (lambda: lowbit.fake_quantize_per_channel_affine(X, [0.1] * 4, [0.0] * 4, 0, -8, 7), lowbit.LowbitTypeError, "zero_point"),
    (lambda: lowbit.fake_quantize_per_channel_affine(X, [[0.1] * 4], [0] * 4, 0, -8, 7), lowbit.LowbitTypeError, "one-dimensional"),
    (lambda: lowbit.fake_quantize_per_channel_affine(np.float32(1.0), [0.1], [0], 0, -8, 7), lowbit.LowbitValueError, "axis"),
    (lambda: lowbit.quantize_per_tensor(X, 0.1, 0, -1, 200), lowbit.LowbitValueError, "int8"),
    (lambda: lowbit.quantize_per_tensor(X, 0.1, 0, 0, 256), lowbit.LowbitValueError, "uint8"),
    (lambda: lowbit.dequantize_per_tensor(X, 0.1, 0), lowbit.LowbitTypeError, "int8"),
    (lambda: lowbit.dequantize_per_channel(np.zeros((2, 3), np.int8), [0.1] * 2, [0] * 2, 1), lowbit.LowbitValueError, "scales has 2"),
    (lambda: lowbit.quantize(X, "4bit"), lowbit.LowbitTypeError, "QuantSpec"),
    (lambda: lowbit.quantize(X, lowbit.QuantSpec(4, granularity="channel", axis=3)), lowbit.LowbitValueError, "axis"),
    (lambda: lowbit.quantize(np.array([1.0, np.inf], np.float32), lowbit.QuantSpec(4)), lowbit.LowbitValueError, "NaN or Inf"),
    (lambda: lowbit.quantize(X, lowbit.QuantSpec(4), scales=np.ones(3, np.float32), zero_points=np.zeros(3, np.int32)), lowbit.LowbitValueError, "shape"),
    (lambda: lowbit.quantize(X, lowbit.QuantSpec(4), scales=np.ones((), np.float32)), lowbit.LowbitValueError, "both"),
    (lambda: lowbit.quantize(np.zeros((), np.float32), lowbit.QuantSpec(4, granularity="group", group_size=4)), lowbit.LowbitValueError, "dimension"),
    (lambda: lowbit.fake_quantize_per_tensor_affine(torch.ones(3, dtype=torch.int32), 0.1, 0, -8, 7), lowbit.LowbitTypeError, "float32"),
    (lambda: lowbit.load_quantized("/nonexistent/file.safetensors"), lowbit.LowbitIOError, "cannot open"),
]


@pytest.mark.parametrize("i", range(len(CASES)))
def test_bad_input_raises_clear_error(i):
    fn, exc, fragment = CASES[i]
    with pytest.raises(exc, match=None) as info:
        fn()
    assert fragment in str(info.value), str(info.value)
    assert isinstance(info.value, lowbit.LowbitError)


def test_read_only_inputs_work_and_are_not_modified():
    x = np.linspace(-2, 2, 50, dtype=np.float32)
    x.flags.writeable = False
    before = x.copy()
    lowbit.fake_quantize_per_tensor_affine(x, 0.1, 0, -8, 7)
    lowbit.quantize(x, lowbit.QuantSpec(4))
    np.testing.assert_array_equal(x, before)


def test_corrupt_and_foreign_files(tmp_path):
    from safetensors.numpy import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": np.ones((4, 4), np.float32)}, str(plain))
    with pytest.raises(lowbit.LowbitFormatError, match="not a lowbit quantized checkpoint"):
        lowbit.load_quantized(plain)
    q = tmp_path / "q.safetensors"
    lowbit.quantize_checkpoint(plain, q, lowbit.QuantSpec(4))
    data = q.read_bytes()
    for bad in [data[:20], data[: len(data) - 3], b"\xff" * 8 + data[8:], b""]:
        p = tmp_path / "bad.safetensors"
        p.write_bytes(bad)
        with pytest.raises(lowbit.LowbitFormatError):
            lowbit.load_quantized(p)
    # a header that claims an absurd size fails fast instead of allocating
    p.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    with pytest.raises(lowbit.LowbitFormatError):
        lowbit.load_quantized(p)


def test_failed_write_leaves_existing_file_intact(tmp_path):
    from safetensors.numpy import save_file

    src = tmp_path / "src.safetensors"
    save_file({"w": np.ones((4, 4), np.float32)}, str(src))
    dst = tmp_path / "dst.safetensors"
    dst.write_bytes(b"previous contents")
    bad = tmp_path / "nan.safetensors"
    save_file({"w": np.full((4, 4), np.nan, np.float32)}, str(bad))
    with pytest.raises(lowbit.LowbitValueError, match="tensor w"):
        lowbit.quantize_checkpoint(bad, dst, lowbit.QuantSpec(4))
    assert dst.read_bytes() == b"previous contents"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".lowbit-")] == []
