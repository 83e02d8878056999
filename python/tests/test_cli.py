"""The `lowbit` command on the built-in checkpoint and on a user checkpoint."""

import subprocess
import sys

import numpy as np
import pytest
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


def test_totals_say_which_way_the_size_went(tmp_path, capsys):
    # dequantize printed "11.8 MiB  86.6 MiB (0.14x)": the ratio upside down and unnamed
    src = tmp_path / "m.safetensors"
    save_file({"w": np.ones((256, 256), np.float32)}, str(src))
    q, d = tmp_path / "q.safetensors", tmp_path / "d.safetensors"
    assert main(["quantize", str(src), str(q)]) == 0
    total = [line for line in capsys.readouterr().out.splitlines() if line.startswith("total")][0]
    assert total.endswith("x smaller)") and "0." not in total.split("(")[-1]
    assert main(["dequantize", str(q), str(d)]) == 0
    total = [line for line in capsys.readouterr().out.splitlines() if line.startswith("total")][0]
    ratio = float(total.split("(")[-1].split("x")[0])
    assert total.endswith("x larger)") and ratio > 1
    rows = lowbit.dequantize_checkpoint(q, d)
    before, after = sum(r["bytes_before"] for r in rows), sum(r["bytes_after"] for r in rows)
    assert f"{after / before:.2f}x larger" in total


def _names_checkpoint(path, names):
    save_file({n: np.full((4, 32), i + 1, np.float32) for i, n in enumerate(names)}, str(path))
    return path


def test_exclude_and_include_pick_the_tensors(tmp_path, capsys):
    names = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
             "encoder.layer.0.dense.weight", "encoder.layer.1.dense.weight", "head.weight"]
    src = _names_checkpoint(tmp_path / "m.safetensors", names)
    spec = ["--granularity", "channel"]

    def quantized(*args):
        out = tmp_path / "o.safetensors"
        assert main(["quantize", str(src), str(out), *spec, *args]) == 0
        loaded = lowbit.load_quantized(out)
        for n in names:  # tensors left out are stored as they were
            if not isinstance(loaded[n], lowbit.QuantizedTensor):
                np.testing.assert_array_equal(loaded[n], np.full((4, 32), names.index(n) + 1, np.float32))
        return {n for n, v in loaded.items() if isinstance(v, lowbit.QuantizedTensor)}

    assert quantized() == set(names)
    assert quantized("--exclude", "*embeddings*") == set(names[2:])
    assert quantized("--exclude", "*embeddings*", "--exclude", "head.weight") == set(names[2:4])
    assert quantized("--include", "encoder.*") == set(names[2:4])
    assert quantized("--include", "encoder.*", "--exclude", "encoder.layer.1.dense.weight") == {names[2]}
    assert quantized("--include", "encoder.layer.[!0].*", "--include", "head.?eight") == {names[3], names[4]}
    capsys.readouterr()
    assert quantized("--exclude", "embedings.*") == set(names)  # a typo: warned about
    assert "--exclude 'embedings.*' matches no tensor" in capsys.readouterr().err


def test_patterns_match_like_fnmatch(tmp_path):
    # the core's glob against Python's fnmatch.fnmatchcase, on random names and patterns
    import fnmatch

    rng = np.random.default_rng(0)
    names = sorted({"".join(rng.choice(list("ab.-]"), rng.integers(1, 6))) for _ in range(60)})
    src = _names_checkpoint(tmp_path / "m.safetensors", names)
    spec = lowbit.QuantSpec(8, granularity="channel")
    pats = ["".join(rng.choice(list("ab.-*?[]!"), rng.integers(0, 7))) for _ in range(150)]
    for pat in pats + ["[a-b]*", "[!a]*", "[]]*", "[b-a]*", "*[.-]", "[", "a[", "[!]a]*"]:
        rows = lowbit.quantize_checkpoint(src, tmp_path / "o.safetensors", spec, exclude=pat)
        kept = {r["name"] for r in rows if r["bits"] is None}
        assert kept == {n for n in names if fnmatch.fnmatchcase(n, pat)}, pat
    with pytest.raises(lowbit.LowbitTypeError, match="exclude"):
        lowbit.quantize_checkpoint(src, tmp_path / "o.safetensors", spec, exclude=[1])


def test_quantize_twice_gives_the_same_bytes(tmp_path):
    # header metadata came out in a new order on every run
    src = tmp_path / "m.safetensors"
    save_file({"w": np.linspace(-1, 1, 4096, dtype=np.float32).reshape(32, 128)}, str(src),
              metadata={f"note{i}": str(i) for i in range(10)})
    outs = []
    for i in range(3):
        out = tmp_path / f"q{i}.safetensors"
        subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", str(src), str(out)], check=True,
                       capture_output=True)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_demo_without_torch_says_what_to_install(tmp_path):
    # `pip install . && lowbit demo` ended in a ModuleNotFoundError traceback
    code = ("import sys; sys.modules['torch'] = None\n"
            "from lowbit.cli import main\n"
            f"sys.exit(main(['demo', '--out', {str(tmp_path / 'd')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2
    assert 'pip install "lowbit[torch]"' in r.stderr and 'pip install ".[torch]"' in r.stderr
    assert "torch is not installed" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "d").exists()


def test_demo_uses_the_shipped_models_on_an_empty_cache(tmp_path, monkeypatch):
    # a first `lowbit demo` trained for minutes (20 on a busy machine); the trained models ship
    from lowbit import demo, models

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    d = demo.DEFAULTS

    def no_training(*a, **k):
        raise AssertionError("trained although the shipped models fit")

    monkeypatch.setattr(models, "train", no_training)
    logs = []
    f32, qat = demo._trained(d["steps"], d["qat_steps"], d["n_train"], d["seed"], False, False, logs.append)
    assert "shipped with lowbit" in logs[0] and "shipped with lowbit" in logs[1]
    assert f32.config.to_json() == models.MultiTaskConfig().to_json() == qat.config.to_json()
    assert not any(torch.equal(a, b) for a, b in zip(f32.state_dict().values(), qat.state_dict().values())
                   if a.ndim == 2)  # two models: the QAT one is fine-tuned
    # the cache, when it holds a model, comes first; --retrain trains
    monkeypatch.setattr(models, "train", lambda *a, **k: models.MultiTaskVLM())
    demo._trained(d["steps"], d["qat_steps"], d["n_train"], d["seed"], True, False, logs.append)
    assert list((tmp_path / "cache").glob("*.safetensors"))
    logs.clear()
    demo._trained(d["steps"], d["qat_steps"], d["n_train"], d["seed"], False, False, logs.append)
    assert all("reusing" in line for line in logs)
    # other settings than the shipped ones train
    logs.clear()
    demo._trained(10, 5, 20, 0, False, False, logs.append)
    assert logs[0].startswith("trained 10 steps")


def test_demo_retrain_flag_reaches_the_demo(monkeypatch):
    from lowbit import demo

    seen = {}
    monkeypatch.setattr(demo, "run", lambda out, **kw: seen.update(kw, out=out))
    assert main(["demo", "--retrain", "--out", "x"]) == 0
    assert seen["retrain"] is True and seen["out"] == "x" and seen["steps"] == demo.DEFAULTS["steps"]


def test_demo_onnx_rows_are_the_deployed_models_numbers(tmp_path, monkeypatch):
    """`lowbit demo`'s ONNX columns: the deployed file's weights as ONNX QDQ, run by ONNX
    Runtime, give the OCR accuracy and recall@1 of the PyTorch model with the same weights."""
    pytest.importorskip("onnxruntime")
    from lowbit import demo, models
    from lowbit.data import SyntheticScenes

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    d = demo.DEFAULTS
    f32, qat = demo._trained(d["steps"], d["qat_steps"], d["n_train"], d["seed"], False, False, lambda s: None)
    held = list(SyntheticScenes(seed=7, n=64, image_size=f32.config.image_size))
    images = np.stack([s["image"] for s in held[:4]])
    for fmt, src in (("int4", f32), ("int2", f32), ("ternary", qat)):  # int2: ORT 1.32 2-bit MatMulNBits bug
        path = tmp_path / f"m-{fmt}.safetensors"
        models.save(src, path, weights=fmt)
        row = demo._onnx_side(path, fmt, tmp_path, held, images, 1)
        want = models.evaluate(models.load(path), held)
        assert row["onnx_crossval"] == "pass"
        assert abs(row["ort_ocr_char_acc"] - want["ocr_char_acc"]) < 1.0 and want["ocr_char_acc"] > 30
        assert abs(row["ort_retrieval_r1"] - want["retrieval_r1"]) < 2.0
        assert row["onnx_mb"] > 0 and (tmp_path / f"multitask-{fmt}-ocr.onnx").exists()
