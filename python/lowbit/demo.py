"""``lowbit demo``: the whole workflow on the multi-task model, end to end.

Train a small :class:`lowbit.models.MultiTaskVLM` on synthetic scenes and fine-tune a ternary
copy with quantization-aware training (or reuse the models cached by an earlier run, or, with
the default training settings, the two lowbit ships in ``lowbit/data``), then for every weight
format: quantize and save, load in the Rust runtime, cross-validate against PyTorch, evaluate
every task on held-out scenes, time each task in the runtime and in PyTorch, and estimate
latency and energy on the phone profiles of :mod:`lowbit.nas`.

>>> from lowbit.demo import cache_dir
>>> cache_dir().name
'lowbit'
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import time
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from lowbit._io import write_atomic

#: Formats the demo deploys, with the bits the NAS estimate uses (weights, activations).
FORMATS: dict[str, tuple[int, int]] = {"f32": (32, 32), "int8": (8, 8), "int4": (4, 8), "int2": (2, 32),
                                       "int3-gptq": (3, 32), "int2-gptq": (2, 32), "ternary": (2, 8)}
#: How each format's row is labelled: int8 / int4 quantize the float model's weights after
#: training and its activations per token to int8 at run time (the runtime's W8A8 / W4A8
#: integer GEMM); int2 rounds weights to nearest and keeps float32 activations; the GPTQ rows
#: quantize the float model's weights with :func:`lowbit.ptq.quantize_model` (post-training,
#: no retraining); ternary is the QAT model, BitNet b1.58 weights with int8 activations.
LABELS: dict[str, str] = {"f32": "f32", "int8": "int8 W8A8", "int4": "int4 W4A8", "int2": "int2 W2A32",
                          "int3-gptq": "int3 W3A32 GPTQ", "int2-gptq": "int2 W2A32 GPTQ",
                          "ternary": "ternary W1.58A8 QAT"}
#: The PTQ formats: GPTQ with asymmetric calibration (each layer fitted to the float model's
#: outputs) on asymmetric groups of 32 inputs, every linear layer and the patch convolution, on
#: this many training scenes.
PTQ_SCENES = 256
#: The training settings of :func:`run`'s defaults, those of the models lowbit ships.
DEFAULTS = {"steps": 1500, "qat_steps": 600, "n_train": 3000, "seed": 0}
#: Phone profiles of the NAS estimate.
PHONES = ("cortex-a76", "adreno-640", "hexagon-npu")
TASKS = ("caption", "ocr", "vqa", "retrieval")


def cache_dir() -> Path:
    """Where trained demo models are kept: ``$LOWBIT_CACHE``, else ``$XDG_CACHE_HOME/lowbit``,
    else ``~/.cache/lowbit``."""
    if os.environ.get("LOWBIT_CACHE"):
        return Path(os.environ["LOWBIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lowbit"


def _best_ms(fn: Callable[[], Any], repeat: int, budget_s: float = 0.3) -> float:
    """Shortest call in ms, after one warm-up call: of ``repeat`` calls, or of as many as fit in
    ``budget_s`` when that is more (a call of a millisecond on a shared machine needs hundreds
    of tries before one runs undisturbed)."""
    from lowbit.nas.device import _best_of

    fn()
    return 1e3 * _best_of(repeat, fn, budget_s)


def _task_calls(model: Any, images: np.ndarray, questions: list[str], texts: list[str]) -> dict[str, Callable[[], Any]]:
    return {
        "caption": lambda: model.caption(images),
        "ocr": lambda: model.ocr(images),
        "vqa": lambda: model.vqa(images, questions),
        "retrieval": lambda: model.retrieve(images, texts, 1),
    }


def shipped_names(steps: int, qat_steps: int, n_train: int, seed: int) -> tuple[str, str]:
    """The file names, in ``lowbit/data``, of the float and ternary QAT models trained with these
    settings (lowbit ships those of :data:`DEFAULTS`)."""
    stem = f"multitask-steps{steps}-scenes{n_train}-seed{seed}"
    return f"{stem}.safetensors", f"{stem}-ternary-qat{qat_steps}.safetensors"


@contextlib.contextmanager
def _shipped(name: str) -> Iterator[Path | None]:
    """The path of the model ``name`` shipped in ``lowbit/data``, or None."""
    res = files("lowbit") / "data" / name
    if not res.is_file():
        yield None
        return
    with as_file(res) as path:
        yield Path(path)


def _trained(steps: int, qat_steps: int, n_train: int, seed: int, retrain: bool, progress: bool,
             log: Callable[[str], None]) -> tuple[Any, Any]:
    """The float model and its ternary QAT fine-tune: from the cache when they are there, else
    the ones lowbit ships when they were trained with the same config and settings, else
    trained here (and cached). ``retrain`` trains both from scratch."""
    import lowbit
    from lowbit import models
    from lowbit.data import SyntheticScenes

    cfg = models.MultiTaskConfig()
    tag = hashlib.sha256(json.dumps([cfg.to_json(), steps, n_train, seed, lowbit.__version__]).encode()).hexdigest()[:12]
    folder = cache_dir()
    f32_path = folder / f"multitask-{tag}.safetensors"
    qat_path = folder / f"multitask-{tag}-ternary-qat{qat_steps}.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    data = SyntheticScenes(seed=seed, n=n_train, image_size=cfg.image_size)
    ship_f32, ship_qat = shipped_names(steps, qat_steps, n_train, seed)
    with contextlib.ExitStack() as stack:
        f32_src: Path | None = None  # the file the float model comes from
        shipped = False
        if not retrain and f32_path.is_file():
            log(f"reusing the trained model {f32_path} (--retrain to train again)")
            f32_src = f32_path
        elif not retrain:
            p = stack.enter_context(_shipped(ship_f32))
            if p is not None and models.load(p).config.to_json() == cfg.to_json():
                log(f"using the trained model shipped with lowbit ({steps} steps on {n_train} scenes; "
                    "--retrain to train from scratch)")
                f32_src, shipped = p, True
        if f32_src is None:
            t = time.perf_counter()
            trained = models.train(cfg, data, steps=steps, seed=seed, progress=progress)
            models.save(trained, f32_path)
            log(f"trained {steps} steps on {n_train} scenes in {time.perf_counter() - t:.0f} s -> {f32_path}")
            f32_src = f32_path
        model = models.load(f32_src)
        qat = None
        if not retrain and qat_path.is_file():
            log(f"reusing the ternary QAT model {qat_path}")
            qat = models.load(qat_path)
        elif shipped:
            # The shipped QAT model is the fine-tune of the shipped float model, of no other.
            p = stack.enter_context(_shipped(ship_qat))
            if p is not None:
                log(f"using the ternary QAT model shipped with lowbit ({qat_steps} QAT steps)")
                qat = models.load(p)
        if qat is None:
            t = time.perf_counter()
            qat = models.train(init=models.load(f32_src).train(), data=data, steps=qat_steps, lr=1e-3,
                               qat="ternary", seed=seed + 1, progress=progress)
            models.save(qat, qat_path)
            log(f"ternary QAT: {qat_steps} steps in {time.perf_counter() - t:.0f} s -> {qat_path}")
    return model, qat


def ship_models(folder: str | os.PathLike[str] | None = None, progress: bool = True,
                log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """Train the float and ternary QAT models of :func:`run`'s defaults from scratch, as
    ``lowbit demo --retrain`` does, and write them into ``folder`` (default: ``lowbit/data`` of
    this source tree) under :func:`shipped_names`: how the shipped models are made."""
    from lowbit import models

    d = DEFAULTS
    model, qat = _trained(d["steps"], d["qat_steps"], d["n_train"], d["seed"], True, progress, log)
    out = Path(folder) if folder is not None else Path(__file__).parent / "data"
    names = shipped_names(d["steps"], d["qat_steps"], d["n_train"], d["seed"])
    for m, name in zip((model, qat), names):
        models.save(m, out / name)
    return out / names[0], out / names[1]


def run(out: str | os.PathLike[str] = "lowbit-demo", steps: int = DEFAULTS["steps"],
        qat_steps: int = DEFAULTS["qat_steps"], n_train: int = DEFAULTS["n_train"],
        n_eval: int = 200, batch: int = 16, repeat: int = 5, retrain: bool = False, progress: bool = True,
        log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the demo; returns one row per format (also written to ``out/results.json``, with the
    table in ``out/results.txt`` and a plot in ``out/results.png`` when matplotlib is installed)."""
    import torch

    import lowbit.nas as nas
    from lowbit import crossval, models
    from lowbit._lowbit import QuantSpec
    from lowbit.data import SyntheticScenes
    from lowbit.ptq import quantize_model
    from lowbit.runtime import MultiTaskModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    f32_model, qat_model = _trained(steps, qat_steps, n_train, 0, retrain, progress, log)
    held_out = list(SyntheticScenes(seed=12345, n=n_eval, image_size=f32_model.config.image_size))
    images = np.stack([s["image"] for s in held_out[:batch]])
    questions = [s["qa"][0][0] for s in held_out[:batch]]
    texts = sorted({s["caption"] for s in held_out})
    # Latency: one image (one question), the phone's case; throughput: a batch of them.
    # Retrieval ranks every held-out caption for each image, so it encodes all of them.
    timed = {"": (images[:1], questions[:1]), "_batch": (images, questions)}

    def timings(model: Any) -> dict[str, float]:
        return {f"{k}{b}": _best_ms(f, repeat) for b, (im, q) in timed.items()
                for k, f in _task_calls(model, im, q, texts).items()}

    torch_ms = timings(f32_model)
    graph = nas.from_torch(_AllTasks(f32_model), (torch.from_numpy(images[:1]),))
    inputs = _crossval_inputs(f32_model, images[:4], questions[:4])
    rows = []
    calib = models.calibration_batches(SyntheticScenes(seed=DEFAULTS["seed"], n=PTQ_SCENES,
                                                       image_size=f32_model.config.image_size), f32_model.config)
    for fmt, (wb, ab) in FORMATS.items():
        src = qat_model if fmt == "ternary" else f32_model
        path = out / f"multitask-{fmt}.safetensors"
        if fmt.endswith("-gptq"):
            src = copy.deepcopy(f32_model)
            start = time.perf_counter()
            spec = QuantSpec(wb, symmetric=False, granularity="group", group_size=32)
            result = quantize_model(src, calib, spec, asymmetric=True, progress=progress)
            log(f"{fmt}: {result.method} on {PTQ_SCENES} scenes in {time.perf_counter() - start:.0f} s")
            # The deployed file: the GPTQ codes as they are; embeddings int8 as in the int2 row.
            size = models.save(src, path, weights="int2", quantized=result)["bytes"]
        else:
            size = models.save(src, path, weights=fmt)["bytes"]
        # The runtime quantizes the activations the format calls 8-bit (the ternary kernel does
        # so itself).
        act_bits = ab if ab < 32 and fmt != "ternary" else None
        rt = MultiTaskModel.load(path, act_bits=act_bits)
        # Cross-validation: the float runtime against PyTorch (1e-4) on the same weights (the
        # file's, dequantized, for weight-only formats), and the runtime quantizing at load time
        # against PyTorch simulating the same quantization (fake-quant), each layer on the
        # runtime's own input (a one-ulp difference before an int8 activation quantizer moves a
        # code by a step, which end to end every later layer would inherit).
        if fmt == "f32":
            reports = {t: crossval.compare(src, rt, inp) for t, inp in inputs.items()}
        elif act_bits is None and fmt != "ternary":
            deployed = models.load(path)
            reports = {t: crossval.compare(deployed, rt, inp) for t, inp in inputs.items()}
        else:
            latent = out / f"multitask-{fmt}-float.safetensors"
            models.save(src, latent)
            sim_rt = MultiTaskModel.load(latent, weights=fmt, act_bits=act_bits)
            sim = crossval.simulate(src, fmt, exclude=(), act_bits=act_bits)
            reports = {t: crossval.compare(sim, sim_rt, inp, mode="quantization", isolate=True)
                       for t, inp in inputs.items()}
            latent.unlink()
        metrics = models.evaluate(rt, held_out)
        rt_ms = timings(rt)
        row: dict[str, Any] = {"format": fmt, "bits": wb, "size_mb": size / 1e6, **metrics}
        row.update(_onnx_side(path, fmt, out, held_out, images, repeat))
        row["crossval"] = _verdict(reports)
        row["crossval_reports"] = {t: json.loads(r.to_json()) for t, r in reports.items()}
        for t in (f"{t}{b}" for b in timed for t in TASKS):
            row[f"runtime_ms_{t}"] = rt_ms[t]
            row[f"torch_ms_{t}"] = torch_ms[t]
        for phone in PHONES:
            c = nas.estimate(graph, phone, weight_bits=wb, act_bits=ab)
            row[f"{phone}_ms"], row[f"{phone}_mj"] = c.latency_ms, c.energy_mj
        rows.append(row)
        log(f"{fmt}: done ({size / 1e6:.2f} MB, crossval {row['crossval']})")
    table = format_table(rows, batch)
    log(table)
    write_atomic(out / "results.json", json.dumps(rows, indent=1))
    write_atomic(out / "results.txt", table + "\n")
    try:
        plot(rows, out / "results.png")
        log(f"wrote {out / 'results.json'}, {out / 'results.txt'} and {out / 'results.png'}")
    except ImportError:
        log(f"wrote {out / 'results.json'} and {out / 'results.txt'} (install matplotlib for the plot)")
    return rows


def _onnx_side(path: Path, fmt: str, out: Path, held_out: list, images: np.ndarray, repeat: int) -> dict[str, Any]:
    """The same deployed model as ONNX QDQ files run by ONNX Runtime (when onnx and onnxruntime
    are installed): the OCR and image-embedding paths exported with the file's integer weights,
    ONNX Runtime's OCR accuracy, recall@1 and latency, and the OCR path cross-checked layer by
    layer against the PyTorch model with the deployed weights."""
    try:
        import onnxruntime  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return {}
    import torch

    from lowbit import crossval, export, models
    from lowbit._lowbit import QuantizedTensor
    from lowbit._quant import load_quantized
    from lowbit.models.evaluation import _edit_distance, _np_rows
    from lowbit.models.files import _linear_weights
    from lowbit.models.modules import _ctc_string

    twin = models.load(path).eval()  # the deployed weights, dequantized: what the files compute
    linear = _linear_weights(twin)
    quantized = {n: v for n, v in load_quantized(path).items() if n in linear and isinstance(v, QuantizedTensor)}
    x1 = torch.from_numpy(images[:1])
    sessions, nbytes = {}, 0
    for task in ("ocr", "image"):
        onnx_path = out / f"multitask-{fmt}-{task}.onnx"
        nbytes += export.onnx(twin, {"images": x1, "task": task}, onnx_path, quantized=quantized or None).nbytes
        sessions[task] = export.session(onnx_path)

    def run(task: str, x: np.ndarray) -> np.ndarray:
        return sessions[task].run(None, {"images": x})[0]

    chars = 0.0
    embeddings = []
    for s in range(0, len(held_out), 64):
        chunk = held_out[s:s + 64]
        x = np.stack([c["image"] for c in chunk])
        for frames, c in zip(run("ocr", x).argmax(-1).tolist(), chunk):
            chars += max(0.0, 1 - _edit_distance(_ctc_string(frames, twin.config.charset), c["text"]) / len(c["text"]))
        embeddings.append(_np_rows(run("image", x)))
    captions = [c["caption"] for c in held_out]
    uniq = sorted(set(captions))
    best = (np.concatenate(embeddings) @ _np_rows(twin.embed_texts(uniq)).T).argmax(1)
    report = crossval.compare(twin, out / f"multitask-{fmt}-ocr.onnx", {"images": torch.from_numpy(images[:4]), "task": "ocr"})
    return {"onnx_mb": nbytes / 1e6, "ort_ocr_char_acc": 100 * chars / len(held_out),
            "ort_retrieval_r1": 100 * sum(uniq[b] == c for b, c in zip(best, captions)) / len(held_out),
            "ort_ms_ocr": _best_ms(lambda: run("ocr", images[:1]), repeat),
            "ort_ms_image": _best_ms(lambda: run("image", images[:1]), repeat),
            "onnx_crossval": "pass" if report.passed else f"FAIL ({report.layers[-1].max_abs:.2g})"}


def _verdict(reports: dict[str, Any]) -> str:
    """``pass``, or which tasks failed, where first, and the worst output SQNR."""
    if not reports:
        return "n/a"
    bad = {t: r for t, r in reports.items() if not r.passed}
    if not bad:
        return "pass"
    sqnr = min(layer.sqnr_db for r in reports.values() for layer in r.layers)
    return f"FAIL {len(bad)}/{len(reports)} (SQNR >= {sqnr:.0f} dB)"


class _AllTasks:
    """One image through the encoder and every head, for the NAS graph."""

    def __new__(cls, model: Any) -> Any:
        import torch

        class AllTasks(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.m = model
                q, qm = model.encode_questions(["what color is the circle ?"])
                t, tm = model.encode_texts(["a red circle left of a blue square"])
                self.register_buffer("q", q)
                self.register_buffer("qm", qm)
                self.register_buffer("t", t)
                self.register_buffer("tm", tm)
                self.register_buffer("cap", torch.full((1, model.config.max_caption_len), model.config.bos_id))

            def forward(self, images: torch.Tensor) -> tuple:
                tokens = self.m.vision(images)
                return (self.m.caption_head(tokens, self.cap), self.m.ocr_head(tokens),
                        self.m.vqa_head(tokens, self.q, self.qm), self.m.retrieval.embed_image(tokens),
                        self.m.retrieval.embed_text(self.t, self.tm))

        return AllTasks().eval()


def _crossval_inputs(model: Any, images: np.ndarray, questions: list[str]) -> dict[str, dict[str, Any]]:
    import torch

    x = torch.from_numpy(images)
    cap = torch.from_numpy(model.tokenizer.batch(["a red circle left of a blue square"] * len(images),
                                                 model.config.max_caption_len, bos=True)[0])
    q, qm = model.encode_questions(questions)
    t, tm = model.encode_texts(["a red circle", "a blue square left of a green triangle"] * (len(images) // 2))
    return {
        "caption": {"images": x, "task": "caption", "ids": cap},
        "ocr": {"images": x, "task": "ocr"},
        "vqa": {"images": x, "task": "vqa", "ids": q, "mask": qm},
        "image": {"images": x, "task": "image"},
        "text": {"task": "text", "ids": t, "mask": tm},
    }


def format_table(rows: list[dict[str, Any]], batch: int) -> str:
    onnx = all("ort_ms_ocr" in r for r in rows)
    head = ["format", "MB", "caption EM", "OCR char", "VQA", "R@1", "crossval",
            *(f"{t} ms rt/torch" for t in TASKS), f"x{batch} speedup c/o/v/r", *(f"{p} ms/mJ" for p in PHONES),
            *(["ONNX MB", "ORT OCR/R@1", "ORT ms ocr/img", "ONNX check"] if onnx else [])]
    body = []
    for r in rows:
        body.append([
            LABELS.get(r["format"], r["format"]), f"{r['size_mb']:.2f}", f"{r['caption_exact']:.1f}", f"{r['ocr_char_acc']:.1f}",
            f"{r['vqa_acc']:.1f}", f"{r['retrieval_r1']:.1f}", r["crossval"],
            *(f"{r[f'runtime_ms_{t}']:.2f}/{r[f'torch_ms_{t}']:.2f}" for t in TASKS),
            "/".join(f"{r[f'torch_ms_{t}_batch'] / r[f'runtime_ms_{t}_batch']:.1f}" for t in TASKS),
            *(f"{r[f'{p}_ms']:.2f}/{r[f'{p}_mj']:.2f}" for p in PHONES),
            *([f"{r['onnx_mb']:.2f}", f"{r['ort_ocr_char_acc']:.1f}/{r['ort_retrieval_r1']:.1f}",
               f"{r['ort_ms_ocr']:.2f}/{r['ort_ms_image']:.2f}", r["onnx_crossval"]] if onnx else []),
        ])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([
        "task metrics in % on held-out scenes; latency: one image (retrieval: against every held-out "
        f"caption), best of runs, Rust runtime / PyTorch f32 eager; x{batch} speedup: PyTorch time / runtime "
        f"time on a batch of {batch} images; NAS: one image, all heads, estimated latency / energy",
        "formats: f32 is the trained float model; int8 / int4 (W8A8 / W4A8) quantize its weights after "
        "training and its activations per token to int8 at run time (the runtime's integer GEMM on the stored "
        "codes); int2 (W2A32) rounds its weights to nearest and keeps float32 activations; the GPTQ rows "
        f"quantize its weights after training with lowbit.ptq (GPTQ, asymmetric calibration, {PTQ_SCENES} training "
        "scenes, no retraining) and keep float32 activations; ternary (W1.58A8) is a separate model, fine-tuned "
        "from it with quantization-aware training: BitNet b1.58 weights, int8 activations",
        "crossval: the runtime against PyTorch layer by layer (f32: the float model; int2 and the GPTQ rows: "
        "the PyTorch model with the file's weights; 1e-4; int8 / int4 / ternary: PyTorch's fake-quant "
        "simulation of the same format)",
        *(["ONNX: the same deployed weights as ONNX QDQ (lowbit.export.onnx: OCR and image-embedding paths) run by "
           "ONNX Runtime's CPU provider: its OCR / R@1, its latency for one image, and its OCR path against PyTorch "
           "with the deployed weights, layer by layer (1e-4); every ONNX row is weight-only, float activations "
           "(int8 / int4 / ternary: W8A32 / W4A32 / W1.58A32, where the runtime runs 8-bit activations)"] if onnx else []),
        line(head), "  ".join("-" * w for w in widths), *map(line, body)])


def plot(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Task metrics and file size by format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    x = np.arange(len(rows))
    for i, (k, name) in enumerate([("caption_exact", "caption EM"), ("ocr_char_acc", "OCR char acc"),
                                   ("vqa_acc", "VQA acc"), ("retrieval_r1", "retrieval R@1")]):
        a.bar(x + (i - 1.5) * 0.2, [r[k] for r in rows], 0.2, label=name)
    labels = [LABELS.get(r["format"], r["format"]).replace(" ", "\n") for r in rows]
    a.set_xticks(x, labels)
    a.set_ylabel("% on held-out scenes")
    a.legend(fontsize=7)
    b.bar(x, [r["size_mb"] for r in rows], color="grey")
    b.set_xticks(x, labels)
    b.set_ylabel("file size (MB)")
    fig.suptitle("lowbit multi-task VLM by weight format")
    fig.tight_layout()
    try:
        write_atomic(path, lambda f: fig.savefig(f, format=Path(path).suffix[1:] or None, dpi=110))
    finally:
        plt.close(fig)
