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
                                   "intgemm (W8A8 / W4A8 GEMM)", "runtime (GEMM epilogues, attention, norms)"}
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
    ({"LOWBIT_ISA": "scalar"}, "quant (fake-quant, quantize, observers)", "scalar"),
    ({"LOWBIT_ISA": "scalar"}, "bitnet (ternary / binary GEMM)", "scalar"),
    ({"LOWBIT_ISA": "sse4.1"}, "bitnet (ternary / binary GEMM)", "scalar"),
    ({"LOWBIT_ISA": "scalar"}, "intgemm (W8A8 / W4A8 GEMM)", "portable"),
    ({"RAYON_NUM_THREADS": "1"}, None, "1"),
])
def test_forced_paths_are_reported(env, key, want):
    code = "import json, lowbit; print(json.dumps(lowbit.show_config(mode='dicts')))"
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                       check=True)
    cfg = json.loads(r.stdout)
    got = cfg["threads"]["rayon threads"] if key is None else cfg["kernels"][key]
    assert got == want


@pytest.mark.parametrize("cap", ["scalar", "sse4.1", "avx2", "avxvnni", "avx512vnni", "neon", "bogus", None])
def test_one_isa_cap_for_every_area(cap):
    """LOWBIT_ISA caps the level every area uses; it never raises it above what the CPU has, a
    cap from the other architecture leaves the portable code, and a bogus value is ignored."""
    order = ["scalar", "sse4.1", "avx2", "avxvnni", "avx512vnni"]
    code = "import json, lowbit; print(json.dumps(lowbit.show_config(mode='dicts')))"
    env = {k: v for k, v in os.environ.items() if k != "LOWBIT_ISA"}
    if cap is not None:
        env["LOWBIT_ISA"] = cap
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    isa = json.loads(r.stdout)["isa"]
    hw = isa["detected"]
    if cap in (None, "bogus"):
        want = hw
    elif hw == "neon" or cap == "neon":
        want = "neon" if hw == cap else "scalar"
    else:
        want = order[min(order.index(hw), order.index(cap))]
    assert isa["in use"] == want, isa
    kernels = json.loads(r.stdout)["kernels"]
    if want in ("scalar", "sse4.1"):
        assert kernels["bitnet (ternary / binary GEMM)"] == "scalar"
    vnni = "avx_vnni" in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else False
    assert kernels["intgemm (W8A8 / W4A8 GEMM)"] == {"avx512vnni": "avx512vnni", "avx2": "avx2",
                                                     "avxvnni": "avxvnni" if vnni else "avx2"}.get(want, "portable")
    print(f"LOWBIT_ISA={cap}: detected {hw}, in use {isa['in use']}")
