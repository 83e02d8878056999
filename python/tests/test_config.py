import json
import os
import subprocess
import sys

import pytest

import lowbit


def test_show_config_reports_version_cpu_kernels_threads(capsys):
    cfg = lowbit.show_config(mode="dicts")
    assert cfg["lowbit"]["version"] == lowbit.__version__
    assert cfg["build"]["allocator"] == "mimalloc"
    assert int(cfg["threads"]["rayon threads"]) >= 1
    assert set(cfg["kernels"]) == {"quant (fake-quant, quantize, observers)", "bitnet (ternary / binary GEMM)",
                                   "runtime (GEMM epilogues, attention, norms)"}
    if os.uname().machine == "x86_64":
        flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split() if os.path.exists("/proc/cpuinfo") else []
        if flags:  # the detection agrees with the kernel's view of the CPU
            assert (cfg["cpu"]["avx2"] == "yes") == ("avx2" in flags)
            assert (cfg["cpu"]["avx512vnni"] == "yes") == ("avx512_vnni" in flags)
    assert lowbit.show_config() is None
    out = capsys.readouterr().out
    assert "kernels:" in out and lowbit.__version__ in out
    with pytest.raises(lowbit.LowbitValueError):
        lowbit.show_config(mode="json")  # type: ignore[arg-type]


@pytest.mark.parametrize(("env", "key", "want"), [
    ({"LOWBIT_SIMD": "scalar"}, "quant (fake-quant, quantize, observers)", "scalar"),
    ({"LOWBIT_KERNEL": "scalar"}, "bitnet (ternary / binary GEMM)", "scalar"),
    ({"RAYON_NUM_THREADS": "1"}, None, "1"),
])
def test_forced_paths_are_reported(env, key, want):
    code = "import json, lowbit; print(json.dumps(lowbit.show_config(mode='dicts')))"
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                       check=True)
    cfg = json.loads(r.stdout)
    got = cfg["threads"]["rayon threads"] if key is None else cfg["kernels"][key]
    assert got == want
