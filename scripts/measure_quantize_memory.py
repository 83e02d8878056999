"""Peak memory of ``lowbit quantize`` on a large generated checkpoint, against the file size.

    python scripts/measure_quantize_memory.py [--mb 1024] [--tensors 8] [--bits 4] [--dir /tmp]

Writes a plain (Hugging Face style) float32 safetensors file of ``--tensors`` 2-D weights plus
small 1-D biases into a temporary folder, runs ``lowbit quantize`` on it in a child process
while sampling the child's ``/proc/<pid>/status``, prints the figures, and deletes the folder.
Resident memory is split into anonymous pages (what lowbit allocates) and file-backed pages (the
memory-mapped input: page cache the kernel can drop at any time, not allocations).
Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

MB = 2**20


def write_checkpoint(path: str, n_tensors: int, total_mb: int) -> tuple[int, int]:
    """A float32 checkpoint of about ``total_mb`` MiB, written one tensor at a time.
    Returns (file size, bytes of the largest tensor)."""
    cols = 4096
    rows = max(1, total_mb * MB // (4 * cols * n_tensors))
    tensors = {f"layer{i}.weight": (rows, cols) for i in range(n_tensors)}
    tensors |= {f"layer{i}.bias": (rows,) for i in range(n_tensors)}
    header, offset = {}, 0
    for name, shape in tensors.items():
        n = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for shape in tensors.values():
            f.write(rng.standard_normal(shape, dtype=np.float32).tobytes())
    return os.path.getsize(path), 4 * rows * cols


def run_measured(cmd: list[str]) -> dict[str, float]:
    """Runs ``cmd``; its peak resident memory (the kernel's high-water mark, VmHWM) and sampled
    peaks of anonymous and file-backed resident memory, in MiB, and the wall time in s."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    peaks = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    for line in f:
                        key, _, val = line.partition(":")
                        if key in peaks:
                            peaks[key] = max(peaks[key], int(val.split()[0]))
            except (OSError, ValueError):  # exited, or a zombie without memory figures
                pass
            time.sleep(0.002)

    th = threading.Thread(target=sample)
    th.start()
    code = p.wait()
    done.set()
    th.join()
    if code:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {code}")
    return {"peak": peaks["VmHWM"] / 1024, "anon": peaks["RssAnon"] / 1024,
            "file": peaks["RssFile"] / 1024, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=1024, help="size of the generated checkpoint in MiB (default 1024)")
    ap.add_argument("--tensors", type=int, default=8, help="number of 2-D weights (default 8)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--dir", default=None, help="where to write the temporary files (default: the system temp dir)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="lowbit-mem-", dir=args.dir)
    try:
        src, dst = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.safetensors")
        size, largest = write_checkpoint(src, args.tensors, args.mb)
        base = run_measured([sys.executable, "-c", "import lowbit.cli"])
        q = run_measured([sys.executable, "-m", "lowbit.cli", "quantize", src, dst, "--bits", str(args.bits)])
        out = os.path.getsize(dst)
        print(f"input:  {size / MB:8.1f} MiB  ({args.tensors} float32 weights of {largest / MB:.1f} MiB + biases)")
        print(f"output: {out / MB:8.1f} MiB  ({args.bits}-bit, group 128)")
        print(f"python + import lowbit alone: peak RSS {base['peak']:7.1f} MiB (anonymous {base['anon']:.1f})")
        print(f"lowbit quantize:              peak RSS {q['peak']:7.1f} MiB, of which sampled peaks: "
              f"anonymous {q['anon']:.1f} MiB, file-backed {q['file']:.1f} MiB; {q['seconds']:.1f} s")
        extra = q["anon"] - base["anon"]
        print(f"allocated by quantize (anonymous peak - baseline): {extra:.1f} MiB = "
              f"{extra * MB / size:.2f} x input, {extra * MB / largest:.2f} x largest tensor, {extra * MB / out:.2f} x output")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
