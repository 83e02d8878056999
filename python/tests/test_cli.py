"""The `lowbit` command on the built-in checkpoint and on a user checkpoint."""

import subprocess
import sys

import numpy as np
import torch
from safetensors.numpy import save_file

import lowbit
from lowbit.cli import main


def test_quantize_builtin_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["quantize"]) == 0
    out = capsys.readouterr().out
    assert "built-in demo checkpoint" in out and "total" in out and "SQNR dB" in out
    written = list(tmp_path.glob("*.q4.safetensors"))
    assert len(written) == 1
    q = lowbit.load_quantized(written[0])
    assert any(isinstance(v, lowbit.QuantizedTensor) for v in q.values())


def test_quantize_and_dequantize_user_checkpoint(tmp_path, capsys):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 300)).astype(np.float32)
    h = torch.from_numpy(rng.standard_normal((32, 128)).astype(np.float32)).bfloat16()
    src = tmp_path / "m.safetensors"
    from safetensors.torch import save_file as save_torch

    save_torch({"w": torch.from_numpy(w), "h": h, "b": torch.zeros(64), "step": torch.tensor([3])}, str(src))
    q, d = tmp_path / "q.safetensors", tmp_path / "d.safetensors"
    assert main(["quantize", str(src), str(q), "--bits", "4", "--granularity", "group", "--group-size", "128"]) == 0
    table = capsys.readouterr().out
    assert "64x300" in table and "BF16" in table
    assert main(["dequantize", str(q), str(d)]) == 0
    from safetensors.torch import load_file as load_torch

    back = load_torch(str(d))
    assert back["h"].dtype == torch.bfloat16 and torch.equal(back["step"], torch.tensor([3]))
    want = lowbit.quantize(w, lowbit.QuantSpec(4, granularity="group", group_size=128)).dequantize()
    np.testing.assert_array_equal(back["w"].numpy(), want)
    sq = 10 * np.log10((w**2).sum() / ((w - want) ** 2).sum())
    assert f"{sq:.2f}" in table


def test_errors_exit_nonzero_with_message(tmp_path, capsys):
    assert main(["quantize", str(tmp_path / "missing.safetensors"), str(tmp_path / "o.safetensors")]) == 2
    assert "lowbit: error:" in capsys.readouterr().err
    p = tmp_path / "x.safetensors"
    save_file({"a": np.ones((2, 2), np.float32)}, str(p))
    assert main(["dequantize", str(p), str(tmp_path / "y.safetensors")]) == 2


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "--version"], capture_output=True, text=True, check=True)
    assert lowbit.__version__ in r.stdout
