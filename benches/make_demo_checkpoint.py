"""Build lowbit's built-in demo checkpoint, ``python/lowbit/data/demo.safetensors``.

A small MLP (64 -> 256 -> 256 -> 10, ReLU, with biases) trained for a few seconds on
scikit-learn's bundled 8x8 handwritten digits (``sklearn.datasets.load_digits``, no
download), so the checkpoint holds real trained weights rather than random ones. Two extra
2-D tensors exercise the half-precision dtypes:

* ``embed.weight`` (10x64, float16): a linear probe trained on the raw pixels; row ``k`` is
  a pixel-space template for digit ``k``.
* ``head_bf16.weight`` (10x256, bfloat16): the MLP's trained output layer ``fc3.weight``
  rounded to bfloat16.

Everything runs on the CPU in a single thread with fixed seeds, so running the script again
gives the same file. Needs torch, safetensors and scikit-learn (only for this script)::

    python benches/make_demo_checkpoint.py [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import struct
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SEED = 0
EPOCHS = 40
BATCH = 64
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "python" / "lowbit" / "data" / "demo.safetensors"


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 256)
        self.fc2 = torch.nn.Linear(256, 256)
        self.fc3 = torch.nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits split 80/20 (stratified, fixed seed), pixels scaled from 0..16 to 0..1."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=SEED, stratify=y)
    return torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), torch.from_numpy(yte)


def train(model: torch.nn.Module, xtr: torch.Tensor, ytr: torch.Tensor, epochs: int, lr: float) -> None:
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), BATCH):
            idx = perm[i : i + BATCH]
            loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def stable_header(blob: bytes, meta_order: list[str]) -> bytes:
    """``blob`` (a safetensors file) with its ``__metadata__`` keys in a fixed order.

    safetensors writes the metadata map in hash order, which changes from run to run; this
    rewrites only the JSON header (padded with spaces to 8 bytes, as the format requires)
    so the same weights always give the same bytes.
    """
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    meta = header.pop("__metadata__")
    header = {"__metadata__": {k: meta[k] for k in meta_order}, **header}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + n :]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the checkpoint")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    xtr, ytr, xte, yte = data()

    t0 = time.perf_counter()
    mlp = MLP()
    train(mlp, xtr, ytr, EPOCHS, lr=1e-3)
    mlp.eval()
    acc = accuracy(mlp, xte, yte)

    probe = torch.nn.Linear(64, 10)
    train(probe, xtr, ytr, EPOCHS, lr=1e-2)
    probe_acc = accuracy(probe, xte, yte)
    dt = time.perf_counter() - t0

    tensors = {k: v.detach().contiguous() for k, v in mlp.state_dict().items()}
    tensors["embed.weight"] = probe.weight.detach().to(torch.float16).contiguous()
    tensors["head_bf16.weight"] = mlp.fc3.weight.detach().to(torch.bfloat16).contiguous()
    metadata = {
        "description": (
            "lowbit demo: digits MLP 64-256-256-10 (ReLU) trained on sklearn's 8x8 digits (pixels/16); "
            "embed.weight = float16 linear probe on raw pixels, head_bf16.weight = fc3.weight in bfloat16"
        ),
        "test_accuracy": f"{acc:.4f}",
        "probe_test_accuracy": f"{probe_acc:.4f}",
        "train_test_split": f"{len(xtr)}/{len(xte)} stratified, seed {SEED}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(stable_header(save(tensors, metadata=metadata), list(metadata)))

    print(f"trained in {dt:.1f} s on {len(xtr)} digits")
    print(f"MLP test accuracy:          {acc:.4f} ({len(xte)} test digits)")
    print(f"linear probe test accuracy: {probe_acc:.4f}")
    for k, v in tensors.items():
        print(f"  {k:18s} {str(v.dtype):15s} {tuple(v.shape)}")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
