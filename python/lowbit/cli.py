"""The ``lowbit`` command: quantize and dequantize safetensors checkpoints, and the demo.

    lowbit quantize [IN.safetensors] [OUT.safetensors] --bits 4 --granularity group --group-size 128
                    [--exclude PATTERN ...] [--include PATTERN ...]
    lowbit dequantize IN.safetensors OUT.safetensors
    lowbit demo [--out DIR] [--steps N] [--qat-steps N] [--retrain]

With no IN, ``quantize`` runs on lowbit's built-in demo checkpoint (a small MLP trained on
scikit-learn's digits), so it works on a fresh machine with nothing else. ``--exclude`` /
``--include`` (repeatable; exact tensor names or ``fnmatch`` globs such as ``'*embeddings*'``)
keep tensors out of the quantization or restrict it to some: the others are stored as they are.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from importlib.resources import as_file, files
from pathlib import Path
from typing import Sequence

import lowbit


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_table(rows: list[dict], bits_label: str = "bits") -> str:
    """The per-tensor table with a totals line."""
    head = ["tensor", "shape", "dtype", bits_label, "SQNR dB", "before", "after"]
    body = []
    for r in rows:
        sq = r.get("sqnr_db")
        body.append([
            r["name"],
            "x".join(map(str, r["shape"])) or "scalar",
            r["dtype"],
            "-" if r["bits"] is None else str(r["bits"]),
            "-" if sq is None else ("inf" if sq == float("inf") else f"{sq:.2f}"),
            _fmt_bytes(r["bytes_before"]),
            _fmt_bytes(r["bytes_after"]),
        ])
    before = sum(r["bytes_before"] for r in rows)
    after = sum(r["bytes_after"] for r in rows)
    # Which way round: quantizing shrinks a checkpoint, dequantizing grows it back.
    if not after or not before:
        ratio = "-"
    elif after <= before:
        ratio = f"{before / after:.2f}x smaller"
    else:
        ratio = f"{after / before:.2f}x larger"
    body.append(["total", f"{len(rows)} tensors", "", "", "", _fmt_bytes(before), f"{_fmt_bytes(after)} ({ratio})"])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), sep, *map(line, body[:-1]), sep, line(body[-1])])


def _missing_demo_dependency() -> str | None:
    """The first of the demo's dependencies that cannot be imported, or None."""
    for name in ("torch", "transformers"):
        try:
            __import__(name)
        except ImportError:
            return name
    return None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="Low-bit quantization of safetensors checkpoints.")
    p.add_argument("--version", action="version", version=f"lowbit {lowbit.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize every floating 2-D tensor of a checkpoint")
    q.add_argument("input", nargs="?", help="safetensors file (default: the built-in demo checkpoint)")
    q.add_argument("output", nargs="?", help="output file (default: <input stem>.q<bits>.safetensors here)")
    q.add_argument("--bits", type=int, default=4, help="code width, 2..8 (default 4)")
    q.add_argument("--granularity", choices=["tensor", "channel", "group"], default="group")
    q.add_argument("--group-size", type=int, default=128, help="elements per group along the last axis (default 128)")
    q.add_argument("--axis", type=int, default=0, help="channel axis for --granularity channel (default 0)")
    q.add_argument("--asymmetric", action="store_true", help="unsigned codes with a zero point (default: symmetric)")
    q.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="keep tensors whose name matches PATTERN (an exact name or a glob such as "
                   "'*embeddings*') as they are; repeatable")
    q.add_argument("--include", action="append", default=[], metavar="PATTERN",
                   help="quantize only tensors whose name matches PATTERN (then --exclude applies); repeatable")
    d = sub.add_parser("dequantize", help="restore a quantized checkpoint to float tensors")
    d.add_argument("input")
    d.add_argument("output")
    m = sub.add_parser("demo", help="the multi-task VLM trained on synthetic scenes (shipped with lowbit for the "
                       "default settings, else trained and cached), quantized to f32 / int8 / int4 / int2 / ternary "
                       "QAT, run in the Rust runtime, cross-validated and evaluated on every task")
    m.add_argument("--out", default="lowbit-demo", help="folder for the models, results.json/.txt/.png (default lowbit-demo)")
    m.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    m.add_argument("--qat-steps", type=int, default=600, help="ternary QAT fine-tuning steps (default 600)")
    m.add_argument("--train-scenes", type=int, default=3000, help="training scenes (default 3000)")
    m.add_argument("--eval-scenes", type=int, default=200, help="held-out scenes (default 200)")
    m.add_argument("--retrain", action="store_true",
                   help="train both models from scratch, ignoring the cache and the models shipped with lowbit")
    m.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "quantize":
            spec = lowbit.QuantSpec(
                args.bits,
                symmetric=not args.asymmetric,
                granularity=args.granularity,
                axis=args.axis,
                group_size=args.group_size if args.granularity == "group" else None,
            )
            with as_file(files("lowbit") / "data" / "demo.safetensors") as builtin:
                src = Path(args.input) if args.input else builtin
                dst = Path(args.output) if args.output else Path(f"{src.stem}.q{args.bits}.safetensors")
                if not args.input:
                    print(f"no input given: quantizing the built-in demo checkpoint ({src.name})")
                rows = lowbit.quantize_checkpoint(src, dst, spec, include=args.include, exclude=args.exclude)
            print(format_table(rows))
            for flag, patterns in (("--include", args.include), ("--exclude", args.exclude)):
                for pat in patterns:
                    if not any(fnmatch.fnmatchcase(r["name"], pat) for r in rows):
                        print(f"lowbit: warning: {flag} {pat!r} matches no tensor of {src.name}", file=sys.stderr)
            print(f"wrote {dst} ({spec})")
        elif args.command == "demo":
            missing = _missing_demo_dependency()
            if missing:
                print(f"lowbit: error: lowbit demo needs PyTorch and transformers, and {missing} is not "
                      "installed: pip install \"lowbit[torch]\" (from a source checkout: "
                      "pip install \".[torch]\")", file=sys.stderr)
                return 2
            from lowbit import demo

            demo.run(args.out, steps=args.steps, qat_steps=args.qat_steps, n_train=args.train_scenes,
                     n_eval=args.eval_scenes, retrain=args.retrain, progress=not args.no_progress)
        else:
            rows = lowbit.dequantize_checkpoint(args.input, args.output)
            print(format_table(rows, "from bits"))
            print(f"wrote {args.output}")
    except lowbit.LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
