"""The bad-input matrix: every public entry point, every argument, systematically corrupted.

``ENTRIES`` lists each public function, constructor and method once (``test_every_public_callable_is_in_the_table``
fails when new API is not in it) with one valid call: its arguments, each tagged with a kind.
Each kind expands into corruptions (wrong dtypes, ranks and shapes, empty arrays, NaN/Inf,
non-positive scales, out-of-range bits, huge sizes, wrong Python types, and non-contiguous,
read-only, unaligned or byte-swapped arrays that must give the valid call's result), each with
what must happen:

* ``raise``: a ``lowbit.LowbitError`` or a plain ``ValueError`` / ``TypeError`` whose message names
  the argument;
* ``same``: works and returns exactly what the valid call returns;
* ``same_or_raise``: ``same``, or a clean error;
* ``either``: works, or a clean error (the kind cannot know what an entry documents);
* ``propagates``: the corruption reaches the user's own code (a model, a fitness function), whose
  error goes through unchanged, whatever its type.

An error "names the argument" when its message or its notes (pyo3 adds "while processing 'x'")
contain the name as a word; for file arguments the path itself counts.

Never a ``PanicException``, a "please report" internal error, another exception type, a crash, or a
hang (a watchdog ends the process after ``HANG_S`` seconds and prints where it was stuck). Huge
requested sizes must be refused within ``HUGE_S`` seconds.
"""

from __future__ import annotations

import copy
import warnings
import dataclasses
import faulthandler
import importlib
import inspect
import os
import pathlib
import re
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
import torch

import lowbit
import lowbit.bitnet as bn
import lowbit.calib as lc
import lowbit.crossval as cv
import lowbit.data as ld
import lowbit.export
import lowbit.export as export
import lowbit.nas as nas
import lowbit.ptq as ptq
import lowbit.runtime as rt
import lowbit.torch as lt

# Corrupted inputs make NumPy and PyTorch warn (float32 overflow to inf, zero-element tensors).
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")]

HANG_S = 120  # a case still running after this long is a hang: the watchdog ends the process
HUGE_S = 10.0  # a huge request must be refused well within this (refusing takes microseconds)
MODULES = ["lowbit", "lowbit.bitnet", "lowbit.calib", "lowbit.crossval", "lowbit.nas", "lowbit.runtime",
           "lowbit.torch", "lowbit.data", "lowbit.export", "lowbit.ptq"]
BIG = 2**40

# ---------------------------------------------------------------------------------------------
# Arguments and their corruptions


@dataclass
class V:
    """A valid value built from the context (files, models) when a case runs."""

    fn: Callable[[Any], Any]


@dataclass
class Arg:
    kind: str
    value: Any
    optional: bool = False  # None is a valid value
    lo: Any = None
    hi: Any = None
    aliases: tuple[str, ...] = ()
    over: dict[str, str] = field(default_factory=dict)  # label -> expectation, or "skip"
    extra: list[Corruption] = field(default_factory=list)
    propagate: bool = False  # the value reaches user code: what fails there propagates
    name: str = ""


@dataclass
class Corruption:
    label: str
    fn: Callable[[Any, Any], Any]  # (valid value, ctx) -> bad value
    expect: str


def _c(label: str, fn: Callable, expect: str) -> Corruption:
    return Corruption(label, fn, expect)


def _const(x: Any) -> Callable:
    return lambda v, c: copy.deepcopy(x)


WRONG_TYPES = [
    _c("None", _const(None), "raise"),
    _c("str", _const("abc"), "raise"),
    _c("list-of-str", _const(["a", "b"]), "raise"),
    _c("dict", _const({"a": 1}), "raise"),
]


def _strided(a: np.ndarray) -> np.ndarray:
    """The same values in a non-contiguous view (every other element of a larger array)."""
    if a.ndim == 0:
        return a
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    big[..., ::2] = a
    return big[..., ::2]


def _reversed(a: np.ndarray) -> np.ndarray:
    if a.ndim == 0:
        return a
    return np.ascontiguousarray(a[..., ::-1])[..., ::-1]  # negative strides


def _readonly(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


def _readonly_strided(a: np.ndarray) -> np.ndarray:
    a = _strided(a)
    a.flags.writeable = False
    return a


def _unaligned(a: np.ndarray) -> np.ndarray:
    buf = np.zeros(a.nbytes + 1, np.uint8)
    u = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    u[...] = a
    return u


def _swapped(a: np.ndarray) -> np.ndarray:
    return a.astype(a.dtype.newbyteorder())


def _with(a: np.ndarray, value: Any) -> np.ndarray:
    a = a.copy()
    if a.size:
        a.flat[0] = value
    return a


def _farray(arg: Arg) -> list[Corruption]:
    return [
        _c("int32", lambda v, c: v.astype(np.int32), "either"),
        _c("int64", lambda v, c: v.astype(np.int64), "either"),
        _c("uint8", lambda v, c: v.astype(np.uint8), "either"),
        _c("bool", lambda v, c: v != 0, "either"),
        _c("float16", lambda v, c: v.astype(np.float16), "either"),
        _c("float64", lambda v, c: v.astype(np.float64), "either"),
        _c("complex64", lambda v, c: v.astype(np.complex64), "raise"),
        _c("object", lambda v, c: v.astype(object), "raise"),
        _c("str-array", lambda v, c: np.full(v.shape, "a"), "raise"),
        _c("rank0", lambda v, c: np.asarray(v.flat[0] if v.size else 0, v.dtype), "either"),
        _c("rank+1", lambda v, c: v[None], "either"),
        _c("rank-1", lambda v, c: v.reshape(-1) if v.ndim > 1 else v[0], "either"),
        _c("last-dim+1", lambda v, c: np.concatenate([v, v[..., :1]], -1), "either"),
        _c("empty", lambda v, c: np.zeros((0,) + v.shape[1:], v.dtype), "either"),
        _c("empty-last", lambda v, c: np.zeros(v.shape[:-1] + (0,), v.dtype), "either"),
        _c("nan", lambda v, c: _with(v, np.nan), "either"),
        _c("inf", lambda v, c: _with(v, np.inf), "either"),
        _c("-inf", lambda v, c: _with(v, -np.inf), "either"),
        _c("3e38", lambda v, c: np.full_like(v, 3e38), "either"),
        # Valid but degenerate data (a dead or saturated channel, a post-ReLU range):
        _c("constant", lambda v, c: np.full_like(v, 7.0), "either"),
        _c("nearly-dead", lambda v, c: np.full_like(v, 1e-30), "either"),
        _c("all-positive", lambda v, c: np.abs(v) + 1, "either"),
        _c("all-negative", lambda v, c: -np.abs(v) - 0.5, "either"),
        _c("tiny-range", lambda v, c: (1 + 1e-7 * (v > 0)).astype(v.dtype), "either"),
        _c("denormal", lambda v, c: (v * 1e-39).astype(v.dtype), "either"),
        _c("single-value", lambda v, c: v.reshape(-1)[:1].copy() if v.size else v, "either"),
        _c("strided", lambda v, c: _strided(v), "same"),
        _c("reversed", lambda v, c: _reversed(v), "same"),
        _c("fortran", lambda v, c: np.asfortranarray(v), "same"),
        _c("readonly", lambda v, c: _readonly(v), "same"),
        _c("readonly-strided", lambda v, c: _readonly_strided(v), "same"),
        _c("unaligned", lambda v, c: _unaligned(v), "same_or_raise"),
        _c("byteswapped", lambda v, c: _swapped(v), "same_or_raise"),
        _c("nested-list", lambda v, c: v.tolist(), "either"),  # float64, so the result is too
        *WRONG_TYPES,
    ]


def _codes(arg: Arg) -> list[Corruption]:
    return [
        _c("float32", lambda v, c: v.astype(np.float32), "raise"),
        _c("int32", lambda v, c: v.astype(np.int32), "raise"),
        _c("int16", lambda v, c: v.astype(np.int16), "raise"),
        _c("uint16", lambda v, c: v.astype(np.uint16), "raise"),
        _c("bool", lambda v, c: v != 0, "either"),
        _c("complex64", lambda v, c: v.astype(np.complex64), "raise"),
        _c("object", lambda v, c: v.astype(object), "raise"),
        _c("str-array", lambda v, c: np.full(v.shape, "a"), "raise"),
        _c("rank0", lambda v, c: np.asarray(v.flat[0], v.dtype), "either"),
        _c("rank+1", lambda v, c: v[None], "either"),
        _c("rank-1", lambda v, c: v.reshape(-1) if v.ndim > 1 else v[0], "either"),
        _c("last-dim+1", lambda v, c: np.concatenate([v, v[..., :1]], -1), "either"),
        _c("empty", lambda v, c: np.zeros((0,) + v.shape[1:], v.dtype), "either"),
        _c("empty-last", lambda v, c: np.zeros(v.shape[:-1] + (0,), v.dtype), "either"),
        _c("max-code", lambda v, c: np.full_like(v, np.iinfo(v.dtype).max), "either"),
        _c("min-code", lambda v, c: np.full_like(v, np.iinfo(v.dtype).min), "either"),
        _c("strided", lambda v, c: _strided(v), "same"),
        _c("reversed", lambda v, c: _reversed(v), "same"),
        _c("fortran", lambda v, c: np.asfortranarray(v), "same"),
        _c("readonly", lambda v, c: _readonly(v), "same"),
        _c("readonly-strided", lambda v, c: _readonly_strided(v), "same"),
        *WRONG_TYPES,
    ]


def _ids(arg: Arg) -> list[Corruption]:
    return [
        _c("float32", lambda v, c: np.asarray(v).astype(np.float32), "raise"),
        _c("int32", lambda v, c: np.asarray(v).astype(np.int32), "same"),
        _c("uint8", lambda v, c: np.asarray(v).astype(np.uint8), "same"),
        _c("bool", lambda v, c: np.asarray(v) != 0, "either"),
        _c("complex64", lambda v, c: np.asarray(v).astype(np.complex64), "raise"),
        _c("object", lambda v, c: np.asarray(v).astype(object), "raise"),
        _c("str-array", lambda v, c: np.full(np.shape(v), "a"), "raise"),
        _c("rank0", lambda v, c: np.asarray(v).flat[0], "either"),
        _c("rank3", lambda v, c: np.asarray(v)[None], "raise"),
        _c("empty", lambda v, c: np.zeros((0,) + np.shape(v)[1:], np.int64), "either"),
        _c("empty-last", lambda v, c: np.zeros(np.shape(v)[:-1] + (0,), np.int64), "either"),
        _c("negative", lambda v, c: _with(np.asarray(v), -1), "raise"),
        _c("huge-id", lambda v, c: _with(np.asarray(v), BIG), "raise"),
        _c("int64-max", lambda v, c: _with(np.asarray(v), np.iinfo(np.int64).max), "raise"),
        _c("strided", lambda v, c: _strided(np.asarray(v)), "same"),
        _c("readonly", lambda v, c: _readonly(np.asarray(v)), "same"),
        _c("byteswapped", lambda v, c: _swapped(np.asarray(v)), "same_or_raise"),
        _c("list", lambda v, c: np.asarray(v).tolist(), "same"),
        *WRONG_TYPES,
    ]


def _tensor(arg: Arg) -> list[Corruption]:
    def strided(t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            return t
        big = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]

    def nan(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        if t.numel():
            t.view(-1)[0] = float("nan")
        return t

    return [
        _c("int32", lambda v, c: v.to(torch.int32), "either"),
        _c("int64", lambda v, c: v.to(torch.int64), "either"),
        _c("bool", lambda v, c: v != 0, "either"),
        _c("float16", lambda v, c: v.half(), "either"),
        _c("bfloat16", lambda v, c: v.bfloat16(), "either"),
        _c("float64", lambda v, c: v.double(), "either"),
        _c("complex64", lambda v, c: v.to(torch.complex64), "raise"),
        _c("meta", lambda v, c: torch.empty(v.shape, device="meta"), "raise"),
        _c("rank0", lambda v, c: v.reshape(-1)[0].clone(), "either"),
        _c("rank+1", lambda v, c: v[None], "either"),
        _c("last-dim+1", lambda v, c: torch.cat([v, v[..., :1]], -1), "either"),
        _c("empty", lambda v, c: torch.zeros((0,) + tuple(v.shape[1:])), "either"),
        _c("nan", lambda v, c: nan(v), "either"),
        _c("strided", lambda v, c: strided(v), "same"),
        _c("transposed-copy", lambda v, c: v.T.contiguous().T if v.ndim == 2 else v, "same"),
        _c("requires-grad", lambda v, c: v.clone().requires_grad_(True), "same_or_raise"),
        _c("numpy", lambda v, c: v.numpy().copy(), "either"),
        _c("list", lambda v, c: v.tolist(), "either"),
        *WRONG_TYPES,
    ]


def _scale(arg: Arg) -> list[Corruption]:
    return [
        _c("zero", _const(0.0), "raise"),
        _c("negative", _const(-0.1), "raise"),
        _c("nan", _const(float("nan")), "raise"),
        _c("inf", _const(float("inf")), "raise"),
        _c("-inf", _const(float("-inf")), "raise"),
        _c("underflows-f32", _const(1e-60), "raise"),
        _c("overflows-f32", _const(1e300), "raise"),
        _c("huge-int", _const(2**1100), "raise"),  # beyond float64
        _c("complex", _const(0.1 + 0j), "raise"),
        _c("np.float32", lambda v, c: np.float32(v), "same"),
        _c("0-d array", lambda v, c: np.array(v), "same"),
        _c("numpy-vector", lambda v, c: np.array([v, v]), "raise"),
        *WRONG_TYPES,
    ]


def _fvec(arg: Arg) -> list[Corruption]:
    def set0(v: Any, x: Any) -> list:
        v = list(np.asarray(v).tolist())
        v[0] = x
        return v

    return [
        _c("len+1", lambda v, c: list(v) + [list(v)[0]], "raise"),
        _c("len-1", lambda v, c: list(v)[:-1], "raise"),
        _c("empty", _const([]), "raise"),
        _c("2-D", lambda v, c: [list(v)], "raise"),
        _c("zero", lambda v, c: set0(v, 0.0), "raise"),
        _c("negative", lambda v, c: set0(v, -1.0), "raise"),
        _c("nan", lambda v, c: set0(v, float("nan")), "raise"),
        _c("inf", lambda v, c: set0(v, float("inf")), "raise"),
        _c("underflows-f32", lambda v, c: set0(v, 1e-60), "raise"),
        _c("complex", lambda v, c: np.asarray(v, np.complex64), "raise"),
        _c("str-entries", lambda v, c: ["a"] * len(v), "raise"),
        _c("tuple", lambda v, c: tuple(v), "same"),
        _c("float64-array", lambda v, c: np.asarray(v, np.float64), "same"),
        _c("strided", lambda v, c: _strided(np.asarray(v, np.float32)), "same"),
        _c("readonly", lambda v, c: _readonly(np.asarray(v, np.float32)), "same"),
        _c("tensor", lambda v, c: torch.tensor(v, dtype=torch.float32), "same"),
        *WRONG_TYPES,
    ]


def _ivec(arg: Arg) -> list[Corruption]:
    def set0(v: Any, x: Any) -> list:
        v = list(np.asarray(v).tolist())
        v[0] = x
        return v

    return [
        _c("len+1", lambda v, c: list(v) + [list(v)[0]], "raise"),
        _c("len-1", lambda v, c: list(v)[:-1], "raise"),
        _c("empty", _const([]), "raise"),
        _c("2-D", lambda v, c: [list(v)], "raise"),
        _c("float", lambda v, c: set0(v, 0.5), "raise"),
        _c("huge", lambda v, c: set0(v, BIG), "raise"),
        _c("-huge", lambda v, c: set0(v, -BIG), "raise"),
        _c("int64-overflow", lambda v, c: set0(v, 2**70), "raise"),
        _c("str-entries", lambda v, c: ["a"] * len(v), "raise"),
        _c("tuple", lambda v, c: tuple(v), "same"),
        _c("int32-array", lambda v, c: np.asarray(v, np.int32), "same"),
        _c("strided", lambda v, c: _strided(np.asarray(v, np.int64)), "same"),
        _c("tensor", lambda v, c: torch.tensor(v), "same"),
        *WRONG_TYPES,
    ]


def _int(arg: Arg) -> list[Corruption]:
    return [
        _c("float", _const(0.5), "raise"),
        _c("str-number", _const("1"), "raise"),
        _c("complex", _const(1j), "raise"),
        _c("list", lambda v, c: [v], "raise"),
        _c("huge", _const(BIG), "raise"),
        _c("-huge", _const(-BIG), "raise"),
        _c("int64-overflow", _const(2**63), "raise"),
        _c("-int64-overflow", _const(-(2**63) - 1), "raise"),
        _c("u64-overflow", _const(2**64), "raise"),
        _c("np.int64", lambda v, c: np.int64(v), "same"),
        _c("np.int8", lambda v, c: np.int8(v), "same"),
        _c("bool", _const(True), "either"),
        *WRONG_TYPES,
    ]


def _bits(arg: Arg) -> list[Corruption]:
    out = []
    for b in (0, 1, 2, 3, 4, 7, 8, 9, 16, 32, 33, -1, BIG, 2**64):
        ok = arg.lo <= b <= arg.hi
        out.append(_c(f"bits={b}", _const(b), "either" if ok else "raise"))
    return out + [
        _c("float", _const(2.5), "raise"),
        _c("str-number", _const("8"), "raise"),
        _c("np.int64", lambda v, c: np.int64(v), "same"),
        _c("bool", _const(True), "either"),
        *WRONG_TYPES,
    ]


def _size(arg: Arg) -> list[Corruption]:
    lo = 0 if arg.lo is None else arg.lo
    return [
        _c("huge", _const(BIG), "raise"),
        _c("u64-overflow", _const(2**64), "raise"),
        _c("-1", _const(-1), "raise"),
        _c("0", _const(0), "either" if lo <= 0 else "raise"),
        _c("float", _const(2.5), "raise"),
        _c("str-number", _const("3"), "raise"),
        _c("np.int64", lambda v, c: np.int64(v), "same"),
        _c("bool", _const(True), "either"),
        *WRONG_TYPES,
    ]


def _shape(arg: Arg) -> list[Corruption]:
    return [
        _c("huge-last", lambda v, c: tuple(v)[:-1] + (BIG,), "raise"),
        _c("huge-first", lambda v, c: (BIG,) + tuple(v)[1:], "raise"),
        _c("huge-product", lambda v, c: (BIG, BIG) + tuple(v)[1:], "raise"),
        _c("u64-overflow", lambda v, c: tuple(v)[:-1] + (2**64,), "raise"),
        _c("negative", lambda v, c: (-1,) + tuple(v)[1:], "raise"),
        _c("float-entry", lambda v, c: tuple(v)[:-1] + (2.5,), "raise"),
        _c("str-entries", lambda v, c: ("a",) * len(v), "raise"),
        _c("empty-tuple", _const(()), "either"),
        _c("list", lambda v, c: list(v), "same"),
        _c("numpy", lambda v, c: np.array(v), "same"),
        _c("None", _const(None), "raise"),
        _c("str", _const("abc"), "raise"),
        _c("dict", _const({"a": 1}), "raise"),
    ]


def _choice(arg: Arg) -> list[Corruption]:
    return [
        _c("unknown", _const("bogus"), "raise"),
        _c("empty-str", _const(""), "raise"),
        _c("int", _const(1), "raise"),
        _c("bytes", lambda v, c: v.encode(), "raise"),
        _c("upper", lambda v, c: v.upper(), "either"),
        _c("None", _const(None), "raise"),
        _c("list-of-str", lambda v, c: [v], "raise"),
        _c("dict", _const({"a": 1}), "raise"),
    ]


def _text(arg: Arg) -> list[Corruption]:
    return [
        _c("empty-str", _const(""), "either"),
        _c("nul", _const("\x00\udcff"), "either"),
        _c("int", _const(1), "raise"),
        _c("bytes", lambda v, c: v.encode(), "raise"),
        *(w for w in WRONG_TYPES if w.label != "str"),  # any string is a text
    ]


def _strlist(arg: Arg) -> list[Corruption]:
    return [
        _c("bare-str", lambda v, c: v[0], "raise"),
        _c("ints", lambda v, c: [1] * len(v), "raise"),
        _c("empty", _const([]), "either"),
        _c("empty-strs", lambda v, c: [""] * len(v), "either"),
        _c("tuple", lambda v, c: tuple(v), "same"),
        _c("None", _const(None), "raise"),
        _c("dict", _const({"a": 1}), "raise"),
        _c("int", _const(3), "raise"),
    ]


def _path(arg: Arg) -> list[Corruption]:
    return [
        _c("missing", lambda v, c: c.tmp / "missing" / "x.safetensors", "raise"),
        _c("directory", lambda v, c: c.tmp, "raise"),
        _c("empty-file", lambda v, c: c.empty_file, "raise"),
        _c("garbage-file", lambda v, c: c.garbage_file, "raise"),
        _c("pathlib", lambda v, c: pathlib.Path(v), "same"),
        _c("str", lambda v, c: str(v), "same"),
        _c("bytes", lambda v, c: os.fsencode(v), "either"),
        _c("None", _const(None), "raise"),
        _c("int", _const(123), "raise"),
        _c("list-of-str", _const(["a", "b"]), "raise"),
        _c("dict", _const({"a": 1}), "raise"),
    ]


def _outpath(arg: Arg) -> list[Corruption]:
    return [
        _c("missing-dir", lambda v, c: c.tmp / "missing" / "out.bin", "raise"),
        _c("directory", lambda v, c: c.tmp, "raise"),
        _c("pathlib", lambda v, c: pathlib.Path(v), "either"),
        _c("None", _const(None), "raise"),
        _c("int", _const(123), "raise"),
        _c("list-of-str", _const(["a", "b"]), "raise"),
        _c("dict", _const({"a": 1}), "raise"),
    ]


def _flag(arg: Arg) -> list[Corruption]:
    return [
        _c("np.bool_", lambda v, c: np.bool_(v), "same"),
        _c("int", lambda v, c: int(v), "either"),
        _c("None", _const(None), "either"),
        _c("str", _const("no"), "either"),
    ]


def _obj(arg: Arg) -> list[Corruption]:
    return [
        _c("None", _const(None), "raise"),
        _c("str", _const("abc"), "raise"),
        _c("int", _const(123), "raise"),
        _c("object", lambda v, c: object(), "raise"),
        _c("list-of-str", _const(["a", "b"]), "raise"),
        _c("dict", _const({"a": 1}), "raise"),
    ]


def _mapping(arg: Arg) -> list[Corruption]:
    return [
        _c("None", _const(None), "raise"),
        _c("str", _const("abc"), "raise"),
        _c("int", _const(123), "raise"),
        _c("list-of-str", _const(["a", "b"]), "raise"),
        _c("int-keys", _const({1: 2}), "raise"),
        _c("none-values", lambda v, c: {k: None for k in v} if v else {"a": None}, "raise"),
    ]


def _float(arg: Arg) -> list[Corruption]:
    out = [
        _c("nan", _const(float("nan")), "raise"),
        _c("inf", _const(float("inf")), "raise"),
        _c("-inf", _const(float("-inf")), "raise"),
        _c("str-number", _const("1"), "raise"),
        _c("complex", _const(1j), "raise"),
        _c("np.float64", lambda v, c: np.float64(v), "same"),
        *WRONG_TYPES,
    ]
    if arg.lo is not None:
        out.append(_c("below-range", _const(arg.lo - 1.0), "raise"))
    if arg.hi is not None:
        out.append(_c("above-range", _const(arg.hi + 1.0), "raise"))
    return out


def _callable(arg: Arg) -> list[Corruption]:
    return [
        _c("None", _const(None), "raise"),
        _c("str", _const("abc"), "raise"),
        _c("int", _const(123), "raise"),
    ]


def _module(arg: Arg) -> list[Corruption]:
    return [
        _c("None", _const(None), "raise"),
        _c("str", _const("abc"), "raise"),
        _c("int", _const(123), "raise"),
        _c("dict", _const({"a": 1}), "raise"),
    ]


KINDS: dict[str, Callable[[Arg], list[Corruption]]] = {
    "farray": _farray, "codes": _codes, "ids": _ids, "tensor": _tensor, "scale": _scale, "fvec": _fvec,
    "ivec": _ivec, "int": _int, "bits": _bits, "size": _size, "shape": _shape, "choice": _choice,
    "text": _text, "strlist": _strlist, "path": _path, "outpath": _outpath, "flag": _flag, "obj": _obj,
    "mapping": _mapping, "float": _float, "callable": _callable, "module": _module, "any": lambda a: [],
}


def F(v: Any, **o: Any) -> Arg: return Arg("farray", v, **o)  # noqa: E704
def CODES(v: Any, **o: Any) -> Arg: return Arg("codes", v, **o)  # noqa: E704
def IDS(v: Any, **o: Any) -> Arg: return Arg("ids", v, **o)  # noqa: E704
def T(v: Any, **o: Any) -> Arg: return Arg("tensor", v, **o)  # noqa: E704
def S(v: Any, **o: Any) -> Arg: return Arg("scale", v, **o)  # noqa: E704
def FV(v: Any, **o: Any) -> Arg: return Arg("fvec", v, **o)  # noqa: E704
def IV(v: Any, **o: Any) -> Arg: return Arg("ivec", v, **o)  # noqa: E704
def N(v: Any, **o: Any) -> Arg: return Arg("int", v, **o)  # noqa: E704
def B(v: Any, lo: int, hi: int, **o: Any) -> Arg: return Arg("bits", v, lo=lo, hi=hi, **o)  # noqa: E704
def Z(v: Any, **o: Any) -> Arg: return Arg("size", v, **o)  # noqa: E704
def SH(v: Any, **o: Any) -> Arg: return Arg("shape", v, **o)  # noqa: E704
def CH(v: Any, **o: Any) -> Arg: return Arg("choice", v, **o)  # noqa: E704
def TXT(v: Any, **o: Any) -> Arg: return Arg("text", v, **o)  # noqa: E704
def SL(v: Any, **o: Any) -> Arg: return Arg("strlist", v, **o)  # noqa: E704
def P(v: Any, **o: Any) -> Arg: return Arg("path", v, **o)  # noqa: E704
def OP(v: Any, **o: Any) -> Arg: return Arg("outpath", v, **o)  # noqa: E704
def FLAG(v: Any, **o: Any) -> Arg: return Arg("flag", v, **o)  # noqa: E704
def OBJ(v: Any, **o: Any) -> Arg: return Arg("obj", v, **o)  # noqa: E704
def M(v: Any, **o: Any) -> Arg: return Arg("mapping", v, **o)  # noqa: E704
def FL(v: Any, **o: Any) -> Arg: return Arg("float", v, **o)  # noqa: E704
def FN(v: Any, **o: Any) -> Arg: return Arg("callable", v, **o)  # noqa: E704
def MOD(v: Any, **o: Any) -> Arg: return Arg("module", v, **o)  # noqa: E704
def ANY(v: Any, **o: Any) -> Arg: return Arg("any", v, **o)  # noqa: E704


@dataclass
class Extra:
    """An entry-level corruption that may change several arguments: kw -> kw."""

    label: str
    fn: Callable[[dict, Any], dict]
    expect: str
    names: tuple[str, ...] = ()  # what the error message must name (any of)


@dataclass
class Entry:
    id: str  # public path, optionally with a "[variant]" suffix
    call: Callable[..., Any]  # call(ctx, **kwargs)
    args: dict[str, Arg]
    extras: list[Extra] = field(default_factory=list)
    valid: str = "works"  # or "raise" (the documented outcome of the valid call)
    needs: tuple[str, ...] = ()  # optional modules the entry needs (skipped without them)

    @property
    def target(self) -> str:
        return self.id.split("[")[0]


def E(id: str, call: Callable, extras: list[Extra] | None = None, valid: str = "works",
      needs: tuple[str, ...] = (), **args: Arg) -> Entry:
    for name, a in args.items():
        a.name = name
    return Entry(id, call, args, extras or [], valid, needs)


def f(fn: Callable) -> Callable:
    """A plain function called with the keyword arguments (the context is not passed)."""
    return lambda c, **kw: fn(**kw)


# ---------------------------------------------------------------------------------------------
# The context: files and models the valid calls need, built once


class Ctx:
    def __init__(self, tmp: pathlib.Path) -> None:
        from safetensors.numpy import save_file
        from transformers import BertConfig, BertModel

        from lowbit import models

        self.tmp = tmp
        self.empty_file = tmp / "empty.safetensors"
        self.empty_file.write_bytes(b"")
        self.garbage_file = tmp / "garbage.safetensors"
        self.garbage_file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
        self.plain = tmp / "plain.safetensors"
        save_file({"w": np.linspace(-1, 1, 64, dtype=np.float32).reshape(4, 16), "b": np.ones(4, np.float32)},
                  str(self.plain), metadata={"note": "x"})
        self.quantized = tmp / "quantized.safetensors"
        lowbit.quantize_checkpoint(self.plain, self.quantized, lowbit.QuantSpec(4))
        self.gguf = tmp / "m.gguf"
        lowbit.export.gguf({"w": np.linspace(-1, 1, 256, dtype=np.float32).reshape(4, 64), "b": np.ones(4, np.float32)},
                           self.gguf, bits=4, metadata={"general.name": "x", "n": np.uint16(3), "l": ["a", "b"]})
        self.device_json = tmp / "device.json"
        nas.DeviceProfile("dev", {"f32": 10.0}, 5.0).save(self.device_json)
        self.n_out = 0

        torch.manual_seed(0)
        self.bert_torch = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=32, max_position_embeddings=16, type_vocab_size=2)).eval()
        self.bert_path = tmp / "bert"
        self.bert_torch.save_pretrained(self.bert_path)
        self.bert = rt.BertEncoder.load(self.bert_path)

        cfg = models.MultiTaskConfig(width=32, depth=1, heads=2, decoder_depth=1, vqa_depth=1, embed_dim=16,
                                     text={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                           "intermediate_size": 64})
        self.vlm_path = tmp / "vlm.safetensors"
        models.save(models.MultiTaskVLM(cfg).eval(), self.vlm_path)
        self.vlm = rt.MultiTaskModel.load(self.vlm_path)

        g = np.random.default_rng(0)
        self.w = g.standard_normal((4, 40)).astype(np.float32)
        self.ternary = bn.TernaryLinear.from_float(self.w, np.ones(4, np.float32))
        self.binary = bn.BinaryLinear.from_float(self.w, np.ones(4, np.float32))
        self.intlin = bn.IntLinear(lowbit.quantize(self.w, lowbit.QuantSpec(4, granularity="group", group_size=8)))
        self.graph = nas.Graph.sequential((1, 3, 8, 8), [{"op": "conv2d", "out_channels": 4, "kernel": 3},
                                                         {"op": "relu"}, {"op": "global_avgpool"},
                                                         {"op": "linear", "out_features": 2}])
        self.graphs = [nas.Graph.sequential((1, 16), [{"op": "linear", "out_features": w}]) for w in (8, 32, 128)]
        self.space = nas.SearchSpace([[{"latency_ms": 1.0, "params": 1.0}, {"latency_ms": 2.0, "params": 3.0}]] * 3)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        self.report = cv.compare(self.bert_torch, self.bert, {"input_ids": torch.tensor([[1, 2, 3]])})
        self.ptq_net = copy.deepcopy(self.net)
        self.ptq = ptq.quantize_model(self.ptq_net, [torch.randn(4, 8)], lowbit.QuantSpec(4), method="rtn")
        self.onnx_path = tmp / "net.onnx"
        export.onnx(self.net, torch.randn(2, 8), self.onnx_path)
        self.ort_model = export.OrtModel(self.onnx_path)

    def out(self, name: str = "out.safetensors") -> pathlib.Path:
        self.n_out += 1
        d = self.tmp / f"out{self.n_out}"
        d.mkdir()
        return d / name


_CTX: Ctx | None = None


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Ctx:
    global _CTX
    if _CTX is None:
        _CTX = Ctx(tmp_path_factory.mktemp("bad_input"))
    return _CTX


def hist(c: Ctx, **kw: Any) -> lc.HistogramObserver:
    o = lc.HistogramObserver(**kw)
    o.update(np.linspace(-1, 1, 100, dtype=np.float32))
    return o


def observed(o: lc.Observer, x: Any) -> Any:
    """The observer's state after ``update(x)`` (what the matrix compares), once its qparams
    have been asked for (degenerate data once crashed the search, not the update)."""
    o.update(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no data yet: torch.ao's defaults, with a warning
        o.qparams()
    return o._core.to_json()


# ---------------------------------------------------------------------------------------------
# The table

X = np.linspace(-2, 2, 24, dtype=np.float32).reshape(4, 6)
H6 = (X.T @ X + np.eye(6)).astype(np.float64)  # a positive definite Hessian of 6 inputs
XT = torch.from_numpy(X.copy())
Q8 = np.arange(-12, 12, dtype=np.int8).reshape(4, 6)
U8 = np.arange(24, dtype=np.uint8).reshape(4, 6) % 4
TERN = (np.arange(24, dtype=np.int8).reshape(4, 6) % 3 - 1).astype(np.int8)
SIGNS = np.where(np.arange(24).reshape(4, 6) % 3, 1, -1).astype(np.int8)
W40 = np.random.default_rng(1).standard_normal((4, 40)).astype(np.float32)
X40 = np.random.default_rng(2).standard_normal((3, 40)).astype(np.float32)
IDS_ = np.array([[1, 2, 3, 4], [5, 6, 7, 0]], np.int64)
IMG = np.random.default_rng(3).random((1, 3, 64, 64), dtype=np.float32)
# A count of work (not of memory): a huge one takes long because it was asked to, so it is not refused.
WORK = {"huge": "skip", "u64-overflow": "skip"}
# An axis is checked against the data it applies to, so a huge one is refused only then.
AXIS = {"huge": "either", "-huge": "either"}
# NumPy takes any non-negative integer as a seed.
SEED = {"huge": "either", "int64-overflow": "either", "u64-overflow": "either"}
# The runtime's ids and masks: errors name them as the model does.
VLM_IDS = dict(aliases=("input_ids",))
VLM_MASK = dict(optional=True, aliases=("attention_mask",), over={"huge-id": "raise", "negative": "raise"})
ROWS = {"scale": ("scales",), "zero_point": ("zero_points",), "scales": ("scale",), "zero_points": ("zero_point",)}


def _out_extras(fn_name: str) -> list[Extra]:
    def kw_out(make: Callable[[np.ndarray], Any]) -> Callable[[dict, Any], dict]:
        return lambda kw, c: dict(kw, out=make(kw["x"]))

    def inplace(kw: dict, c: Any) -> dict:
        return dict(kw, out=kw["x"])

    def overlap(kw: dict, c: Any) -> dict:
        x = kw["x"]
        buf = np.zeros(x.size + 1, x.dtype)
        buf[:-1] = x.ravel()
        return dict(kw, x=buf[:-1].reshape(x.shape), out=buf[1:].reshape(x.shape))

    return [
        Extra("out=empty_like", kw_out(np.empty_like), "same"),
        Extra("out=x", inplace, "same"),
        Extra("out-shape", kw_out(lambda x: np.empty(x.shape[:-1] + (x.shape[-1] + 1,), x.dtype)), "raise", ("out",)),
        Extra("out-float64", kw_out(lambda x: np.empty(x.shape, np.float64)), "raise", ("out",)),
        Extra("out-int32", kw_out(lambda x: np.empty(x.shape, np.int32)), "raise", ("out",)),
        Extra("out-strided", kw_out(lambda x: _strided(np.empty_like(x))), "raise", ("out",)),
        Extra("out-fortran", kw_out(lambda x: np.asfortranarray(np.empty_like(x))), "raise", ("out",)),
        Extra("out-readonly", kw_out(lambda x: _readonly(np.empty_like(x))), "raise", ("out",)),
        Extra("out-overlaps", overlap, "raise", ("out",)),
        Extra("out-list", kw_out(lambda x: x.tolist()), "raise", ("out",)),
        Extra("out-str", kw_out(lambda x: "abc"), "raise", ("out",)),
        Extra("out-tensor", kw_out(lambda x: torch.empty(x.shape)), "raise", ("out",)),
    ]


def _attached_output(c: Any, model: Any, weights: Any = True) -> Any:
    """Calibrate a copy of the case's network, attach the result to ``model``, run, remove."""
    import copy

    cal = lt.calibrate(copy.deepcopy(c.net), [torch.randn(2, 8)], progress=False)
    handle = cal.attach(model, weights=weights)
    try:
        return tuple(model(torch.randn(2, 8)).shape)
    finally:
        handle.remove()


def _qrange(lo: int, hi: int) -> dict[str, Arg]:
    return {"quant_min": N(lo, aliases=("quant_max", "range")), "quant_max": N(hi, aliases=("quant_min", "range"))}


W64 = np.random.default_rng(4).standard_normal((4, 64)).astype(np.float32)
QT64 = lowbit.quantize(W64, lowbit.QuantSpec(8, granularity="group", group_size=32))


def _gguf_export(c: Any, **kw: Any) -> Any:
    """``lowbit.export.gguf`` without the report's path (each call writes a fresh one)."""
    r = lowbit.export.gguf(**kw)
    return r.tensors, r.nbytes


def _bitnet_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(lt.BitLinear(256, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def _entries() -> list[Entry]:
    ch = dict(axis=N(0))
    x_shape = {"last-dim+1": "either", "rank-1": "either"}
    pc_shape = {"last-dim+1": "either", "empty": "raise", "rank0": "raise", "rank-1": "raise", "rank+1": "raise"}
    pc = dict(over=pc_shape, aliases=("axis",))  # a mismatch with the qparams is reported along the axis
    qt = lowbit.quantize(X, lowbit.QuantSpec(4, granularity="channel", axis=0))
    entries = [
        # ---- lowbit: quantization
        E("lowbit.QuantSpec", f(lowbit.QuantSpec), bits=B(4, 2, 8), symmetric=FLAG(True), granularity=CH("tensor"),
          axis=N(0, over=AXIS), group_size=Z(None, optional=True, over={"huge": "either", "np.int64": "skip",
                                                                        "bool": "skip"})),
        E("lowbit.QuantSpec[group]", f(lowbit.QuantSpec), bits=B(4, 2, 8), symmetric=FLAG(False), granularity=CH("group"),
          axis=N(-1, over=AXIS), group_size=Z(32, lo=1, over={"huge": "either"})),
        E("lowbit.QuantizedTensor", f(lowbit.QuantizedTensor), valid="raise"),
        E("lowbit.QuantizedTensor.int_repr", lambda c: qt.int_repr()),
        E("lowbit.QuantizedTensor.dequantize", lambda c: qt.dequantize()),
        E("lowbit.QuantizedTensor.save", lambda c, **kw: qt.save(**kw), path=OP(V(lambda c: c.out())),
          name=TXT("w", over={"empty-str": "either"})),
        E("lowbit.fake_quantize_per_tensor_affine", f(lowbit.fake_quantize_per_tensor_affine), x=F(X),
          scale=S(0.1), zero_point=N(0, aliases=("quant_min",)), **_qrange(-8, 7), return_mask=FLAG(True),
          out=ANY(None), extras=_out_extras("per_tensor")),
        # Any device: a meta tensor gives a meta result, as torch's own op does.
        E("lowbit.fake_quantize_per_tensor_affine[torch]", f(lowbit.fake_quantize_per_tensor_affine), x=T(XT, over={"meta": "either"}),
          scale=S(0.1), zero_point=N(0, aliases=("quant_min",)), **_qrange(-8, 7), return_mask=FLAG(True)),
        E("lowbit.fake_quantize_per_channel_affine", f(lowbit.fake_quantize_per_channel_affine),
          x=F(X, **pc), scale=FV([0.1, 0.2, 0.3, 0.4]), zero_point=IV([0, 1, -1, 0]), **ch, **_qrange(-8, 7),
          return_mask=FLAG(False), out=ANY(None), extras=_out_extras("per_channel")),
        E("lowbit.fake_quantize_per_channel_affine[torch]", f(lowbit.fake_quantize_per_channel_affine),
          x=T(XT, over={"rank0": "raise", "empty": "raise", "meta": "either"}, aliases=("axis",)), scale=FV([0.1, 0.2, 0.3, 0.4]),
          zero_point=IV([0, 1, -1, 0]), **ch, **_qrange(-8, 7)),
        E("lowbit.quantize_per_tensor", f(lowbit.quantize_per_tensor), x=F(X), scale=S(0.1), zero_point=N(3),
          **_qrange(0, 15)),
        E("lowbit.quantize_per_channel", f(lowbit.quantize_per_channel), x=F(X, **pc),
          scales=FV([0.1, 0.2, 0.3, 0.4]), zero_points=IV([0, 1, -1, 0]), **ch, **_qrange(-8, 7)),
        E("lowbit.dequantize_per_tensor", f(lowbit.dequantize_per_tensor), q=CODES(Q8), scale=S(0.1), zero_point=N(2)),
        E("lowbit.dequantize_per_channel", f(lowbit.dequantize_per_channel), q=CODES(Q8, **pc),
          # float32-exact scales: the float64 product (as ATen's) must not depend on the container
          scales=FV([0.125, 0.25, 0.375, 0.5]), zero_points=IV([0, 1, -1, 0]), **ch),
        E("lowbit.quantize", f(lowbit.quantize), x=F(X), spec=OBJ(lowbit.QuantSpec(4)),
          scales=ANY(None), zero_points=ANY(None)),
        E("lowbit.quantize[group]", f(lowbit.quantize), x=F(X, over={"last-dim+1": "either"}),
          spec=OBJ(lowbit.QuantSpec(4, granularity="group", group_size=4))),
        E("lowbit.quantize[qparams]", f(lowbit.quantize), x=F(X, **pc),
          spec=OBJ(lowbit.QuantSpec(4, symmetric=False, granularity="channel", axis=0)),
          scales=FV(np.array([0.1, 0.2, 0.3, 0.4], np.float32), over={"empty": "raise"}),
          zero_points=IV(np.array([8, 7, 8, 9], np.int32))),
        E("lowbit.quantize[torch]", f(lowbit.quantize), x=T(XT), spec=OBJ(lowbit.QuantSpec(8))),
        E("lowbit.quantize_checkpoint", f(lowbit.quantize_checkpoint), src=P(V(lambda c: c.plain)),
          dst=OP(V(lambda c: c.out())), spec=OBJ(lowbit.QuantSpec(4))),
        E("lowbit.dequantize_checkpoint", f(lowbit.dequantize_checkpoint), src=P(V(lambda c: c.quantized)),
          dst=OP(V(lambda c: c.out()))),
        E("lowbit.load_quantized", f(lowbit.load_quantized), path=P(V(lambda c: c.quantized))),
        E("lowbit.checkpoint_metadata", f(lowbit.checkpoint_metadata), path=P(V(lambda c: c.quantized))),
        E("lowbit.save_checkpoint", f(lowbit.save_checkpoint), path=OP(V(lambda c: c.out())),
          tensors=M(V(lambda c: {"w": qt, "b": np.ones(3, np.float32), "t": torch.ones(2, dtype=torch.bfloat16)}),
                    extra=[_c("object-array", _const({"w": np.array([object()])}), "raise"),
                           _c("complex-array", _const({"w": np.ones(2, np.complex64)}), "raise"),
                           _c("empty", _const({}), "either")], aliases=("tensor",)),
          metadata=M({"note": "x"}, optional=True, extra=[_c("int-values", _const({"a": 1}), "raise")])),
        # ---- lowbit: GGUF
        E("lowbit.load_gguf", f(lowbit.load_gguf), path=P(V(lambda c: c.gguf)), dequantize=FLAG(False)),
        E("lowbit.GGUFFile", f(lowbit.GGUFFile)),
        E("lowbit.GGUFFile.arrays", lambda c: lowbit.load_gguf(c.gguf).arrays()),
        E("lowbit.export.gguf", _gguf_export,
          tensors_or_model=M(V(lambda c: {"w": W64, "q": QT64, "b": np.ones(4, np.float32)}), aliases=("tensors",),
                             extra=[_c("int-array", _const({"w": np.ones(3, np.int32)}), "raise"),
                                    _c("nan", _const({"w": np.full((2, 32), np.nan, np.float32)}), "either"),
                                    _c("empty-array", _const({"w": np.ones((0, 32), np.float32)}), "either"),
                                    _c("rows-not-blocks", lambda v, c: {"q": lowbit.quantize(X, lowbit.QuantSpec(8))}, "either"),
                                    _c("empty", _const({}), "either")]),
          path=OP(V(lambda c: c.out("out.gguf"))), metadata=M({"general.name": "x"}, optional=True),
          ternary=CH("TQ2_0"), float_type=CH("F16"), bits=B(4, 2, 8, optional=True)),
        E("lowbit.export.gguf[model]", _gguf_export, tensors_or_model=MOD(V(lambda c: _bitnet_net()), aliases=("tensors",)),
          path=OP(V(lambda c: c.out("out.gguf"))), ternary=CH("TQ1_0")),
        # ---- lowbit.bitnet
        E("lowbit.bitnet.ternary_quantize", f(bn.ternary_quantize), w=F(W40, over={"rank0": "raise", "rank+1": "either"}),
          per_channel=FLAG(True)),
        E("lowbit.bitnet.binary_quantize", f(bn.binary_quantize), w=F(W40, over={"rank0": "raise", "rank+1": "raise"}),
          center=FLAG(True)),
        E("lowbit.bitnet.activation_quant", f(bn.activation_quant), x=F(X40, over={"rank0": "raise", "rank+1": "either"}),
          bits=B(8, 2, 8)),
        E("lowbit.bitnet.pack_signs", f(bn.pack_signs), x=F(X40, over={"rank0": "raise", "rank+1": "raise"})),
        E("lowbit.bitnet.PackedSigns", f(bn.PackedSigns), x=F(X40, over={"rank0": "raise", "rank+1": "raise"})),
        E("lowbit.bitnet.binary_matmul", f(bn.binary_matmul), a=F(X40, over={"last-dim+1": "raise", "rank0": "raise",
                                                                              "rank+1": "raise"}),
          b=F(W40, over={"last-dim+1": "raise", "rank0": "raise", "rank+1": "raise"})),
        E("lowbit.bitnet.kernel", lambda c: bn.kernel()),
        E("lowbit.show_config", f(lowbit.show_config), mode=CH("dicts")),
        E("lowbit.bitnet.pack", f(bn.pack), codes=CODES(U8, over={"int32": "raise"}), bits=B(2, 1, 8)),
        E("lowbit.bitnet.pack[int8]", f(bn.pack), codes=CODES(Q8 // 4), bits=B(4, 1, 8, over={"bits=1": "raise",
                                                                                              "bits=2": "raise",
                                                                                              "bool": "raise"})),
        E("lowbit.bitnet.unpack", f(bn.unpack), packed=CODES(bn.pack(U8, 2)), bits=B(2, 1, 8),
          shape=SH((4, 6)), signed=FLAG(False)),
        E("lowbit.bitnet.pack_ternary", f(bn.pack_ternary), codes=CODES(TERN, over={"max-code": "raise",
                                                                                   "min-code": "raise"}),
          format=CH("i2")),
        E("lowbit.bitnet.pack_ternary[tq1]", f(bn.pack_ternary), codes=CODES(TERN, over={"max-code": "raise",
                                                                                        "min-code": "raise"}),
          format=CH("tq1")),
        E("lowbit.bitnet.unpack_ternary", f(bn.unpack_ternary), packed=CODES(bn.pack_ternary(TERN)), shape=SH((4, 6)),
          format=CH("i2")),
        E("lowbit.bitnet.unpack_ternary[tq1]", f(bn.unpack_ternary), packed=CODES(bn.pack_ternary(TERN, "tq1")),
          shape=SH((4, 6)), format=CH("tq1")),
        E("lowbit.bitnet.TernaryLinear", f(bn.TernaryLinear), codes=CODES(TERN, over={"max-code": "raise",
                                                                                     "min-code": "raise"}),
          scale=S(0.5), bias=F(np.ones(4, np.float32), optional=True, over={"last-dim+1": "raise", "rank+1": "raise",
                                                                           "empty": "raise", "rank0": "raise"})),
        E("lowbit.bitnet.TernaryLinear[per_channel]", f(bn.TernaryLinear), codes=CODES(TERN),
          scale=F(np.array([0.5, 1, 2, 3], np.float32), over={"nan": "raise", "inf": "raise", "-inf": "raise",
                                                               "empty": "raise", "last-dim+1": "raise"})),
        E("lowbit.bitnet.TernaryLinear.from_float", f(bn.TernaryLinear.from_float),
          w=F(W40, over={"rank0": "raise", "rank+1": "raise"}), bias=F(np.ones(4, np.float32), optional=True),
          per_channel=FLAG(False)),
        E("lowbit.bitnet.TernaryLinear.forward", lambda c, **kw: c.ternary.forward(**kw),
          x=F(X40, over={"last-dim+1": "raise", "rank0": "raise", "empty-last": "raise"})),
        E("lowbit.bitnet.IntLinear", f(bn.IntLinear),
          weight=OBJ(lowbit.quantize(W40, lowbit.QuantSpec(8, granularity="channel", axis=0))),
          bias=F(np.ones(4, np.float32), optional=True, over={"last-dim+1": "raise", "rank+1": "raise", "empty": "raise",
                                                              "rank0": "raise", "nan": "raise", "inf": "raise",
                                                              "-inf": "raise"})),
        E("lowbit.bitnet.IntLinear[group]", f(bn.IntLinear),
          weight=OBJ(lowbit.quantize(W40, lowbit.QuantSpec(3, symmetric=False, granularity="group", group_size=12)))),
        E("lowbit.bitnet.IntLinear.forward", lambda c, **kw: c.intlin.forward(**kw),
          x=F(X40, over={"last-dim+1": "raise", "rank0": "raise", "empty-last": "raise", "nan": "raise", "inf": "raise",
                         "-inf": "raise"}),
          path=CH("portable", optional=True)),
        E("lowbit.bitnet.intgemm_paths", lambda c: bn.intgemm_paths()),
        E("lowbit.bitnet.BinaryLinear", f(bn.BinaryLinear), signs=CODES(SIGNS, over={"max-code": "raise",
                                                                                    "min-code": "raise"}),
          scales=F(np.ones(4, np.float32), over={"last-dim+1": "raise", "nan": "raise", "inf": "raise",
                                                 "-inf": "raise"}),
          bias=F(np.ones(4, np.float32), optional=True, over={"last-dim+1": "raise", "nan": "raise", "inf": "raise",
                                                              "-inf": "raise"})),
        E("lowbit.bitnet.BinaryLinear.from_float", f(bn.BinaryLinear.from_float),
          w=F(W40, over={"rank0": "raise", "rank+1": "raise"}), bias=F(np.ones(4, np.float32), optional=True),
          center=FLAG(True)),
        E("lowbit.bitnet.BinaryLinear.forward", lambda c, **kw: c.binary.forward(**kw),
          x=F(X40, over={"last-dim+1": "raise", "rank0": "raise", "empty-last": "raise"})),
        # ---- lowbit.calib
        E("lowbit.calib.Observer", f(lc.Observer), valid="raise"),
        E("lowbit.calib.MinMaxObserver", f(lc.MinMaxObserver), bits=B(8, 2, 8), symmetric=FLAG(False)),
        E("lowbit.calib.MovingAverageMinMaxObserver", f(lc.MovingAverageMinMaxObserver),
          averaging_constant=FL(0.1, lo=0.0, hi=1.0), bits=B(8, 2, 8), symmetric=FLAG(True)),
        E("lowbit.calib.PerChannelMinMaxObserver", f(lc.PerChannelMinMaxObserver), axis=N(1, over=AXIS), bits=B(4, 2, 8),
          symmetric=FLAG(True)),
        E("lowbit.calib.HistogramObserver", f(lc.HistogramObserver), bits=B(8, 2, 8), symmetric=FLAG(False),
          method=CH("percentile"), percentile=FL(99.0, lo=0.0, hi=100.0), bins=Z(256, lo=16),
          per_channel=FLAG(False), axis=N(0, over=AXIS)),
        E("lowbit.calib.HistogramObserver[per_channel]", f(lc.HistogramObserver), per_channel=FLAG(True),
          axis=N(1, over=AXIS),
          bins=Z(64, lo=16)),
        E("lowbit.calib.Observer.update", lambda c, **kw: observed(lc.MinMaxObserver(), **kw), x=F(X)),
        E("lowbit.calib.Observer.update[moving]", lambda c, **kw: observed(lc.MovingAverageMinMaxObserver(), **kw),
          x=F(X)),
        E("lowbit.calib.Observer.update[per_channel]", lambda c, **kw: observed(lc.PerChannelMinMaxObserver(1), **kw),
          x=F(X, over={"rank0": "raise"}, aliases=("axis",))),
        E("lowbit.calib.Observer.update[histogram]", lambda c, **kw: observed(lc.HistogramObserver(bins=64), **kw),
          x=F(X)),
        E("lowbit.calib.Observer.update[per_channel_histogram]",
          lambda c, **kw: observed(lc.HistogramObserver(bins=64, per_channel=True, axis=0), **kw),
          x=F(X, over={"rank0": "raise"}, aliases=("axis",))),
        E("lowbit.calib.Observer.update[torch]", lambda c, **kw: observed(lc.HistogramObserver(bins=64), **kw),
          x=T(XT)),
        E("lowbit.calib.Observer.__call__", lambda c, **kw: lc.MinMaxObserver()(**kw), x=F(X)),
        E("lowbit.calib.Observer.qparams", lambda c: hist(c).qparams()),
        E("lowbit.calib.Observer.merge", lambda c, **kw: hist(c).merge(**kw),
          other=OBJ(V(lambda c: hist(c)), aliases=("merge",), extra=[
              _c("other-kind", lambda v, c: lc.MinMaxObserver(), "raise"),
              _c("other-settings", lambda v, c: hist(c, bits=4), "raise"),
              _c("core", lambda v, c: v._core, "raise")])),
        E("lowbit.calib.Observer.state_dict", lambda c: hist(c).state_dict()),
        E("lowbit.calib.Observer.load_state_dict", lambda c, **kw: lc.HistogramObserver().load_state_dict(**kw),
          state=M(V(lambda c: hist(c).state_dict()), extra=[
              _c("minmax-state", lambda v, c: lc.MinMaxObserver().state_dict(), "raise"),
              _c("bad-json", _const({"lowbit_observer": "{"}), "raise"),
              _c("bad-bits", lambda v, c: {"lowbit_observer": v["lowbit_observer"].replace('"bits":8', '"bits":99')},
                 "raise"),
              _c("bad-counts", lambda v, c: {"lowbit_observer": v["lowbit_observer"].replace('"counts":[', '"counts":[-1,')},
                 "raise"),
              _c("bins-huge", lambda v, c: {"lowbit_observer": v["lowbit_observer"].replace('"bins":2048', f'"bins":{BIG}')},
                 "raise"),
          ])),
        E("lowbit.calib.HistogramObserver.clip_range", lambda c: hist(c).clip_range()),
        E("lowbit.calib.HistogramObserver.histogram", lambda c: hist(c).histogram()),
        # ---- lowbit.ptq
        E("lowbit.ptq.Hessian", f(ptq.Hessian), features=Z(6, lo=1)),
        E("lowbit.ptq.Hessian.update", lambda c, **kw: ptq.Hessian(6).update(**kw), x=F(X)),
        E("lowbit.ptq.Hessian.update[tensor]", lambda c, **kw: ptq.Hessian(6).update(**kw), x=T(torch.from_numpy(X))),
        E("lowbit.ptq.Hessian.sync", lambda c, **kw: ptq.Hessian(6).sync(**kw), group=ANY(None)),
        E("lowbit.ptq.Hessian.merge", lambda c, **kw: ptq.Hessian(6).merge(**kw), other=OBJ(ptq.Hessian(6))),
        E("lowbit.ptq.gptq", lambda c, **kw: ptq.gptq(**kw).dead, weight=F(X), hessian=F(H6),
          spec=OBJ(lowbit.QuantSpec(4)), damp=FL(0.01, lo=0.0), act_order=FLAG(True), grid=CH("minmax")),
        E("lowbit.ptq.hqq", lambda c, **kw: ptq.hqq(**kw).shape, weight=F(X), spec=OBJ(lowbit.QuantSpec(4)),
          lp=FL(0.7, lo=1e-6, hi=1.0), beta=FL(10.0, lo=1e-12), kappa=FL(1.01, lo=1.0), iters=N(20, lo=0, hi=10_000)),
        E("lowbit.ptq.quantize_model", lambda c, **kw: list(ptq.quantize_model(copy.deepcopy(c.net), **kw).layers),
          data=ANY([torch.randn(4, 8)] * 2, extra=[_c("None", _const(None), "raise"), _c("int", _const(3), "raise"),
                                                  _c("empty", _const([]), "raise"),
                                                  _c("wrong-shape", _const([torch.randn(4, 9)]), "propagates"),
                                                  _c("nan", _const([torch.full((4, 8), float("nan"))]), "raise")]),
          spec=OBJ(lowbit.QuantSpec(4)), method=CH("gptq"), damp=FL(0.01, lo=0.0), act_order=FLAG(True),
          sequential=FLAG(True), grid=CH("minmax"), rotate=CH("hadamard", optional=True),
          modules=ANY(["*"], extra=[_c("int", _const(3), "raise"), _c("int-list", _const([3]), "raise"),
                                    _c("none-matching", _const("nope"), "raise")]),
          exclude=ANY((), extra=[_c("all", _const("*"), "raise")])),
        E("lowbit.ptq.quantize_model[model]", lambda c, **kw: list(ptq.quantize_model(data=[torch.randn(4, 8)],
                                                                                      spec=lowbit.QuantSpec(4), **kw).layers),
          model=MOD(V(lambda c: copy.deepcopy(c.net)))),
        E("lowbit.ptq.Rotation", f(ptq.Rotation), features=Z(16, lo=1), seed=N(0, lo=0)),
        E("lowbit.ptq.Rotation.apply", lambda c, **kw: ptq.Rotation(6).apply(**kw), x=F(X)),
        E("lowbit.ptq.Rotation.apply[tensor]", lambda c, **kw: ptq.Rotation(6).apply(**kw), x=T(torch.from_numpy(X))),
        E("lowbit.ptq.Rotation.inverse", lambda c, **kw: ptq.Rotation(6).inverse(**kw), x=F(X)),
        E("lowbit.ptq.Rotation.hessian", lambda c, **kw: ptq.Rotation(6).hessian(**kw), h=F(H6)),
        E("lowbit.ptq.PTQResult", f(ptq.PTQResult), method=ANY("gptq")),
        E("lowbit.ptq.PTQResult.tensors", lambda c: ptq.PTQResult("gptq").tensors()),
        E("lowbit.ptq.PTQResult.transforms_metadata", lambda c: c.ptq.transforms_metadata()),
        E("lowbit.ptq.LayerResult.weight", lambda c: c.ptq.layers["0"].weight().shape),
        E("lowbit.ptq.PTQResult.save", lambda c, **kw: c.ptq.save(**kw), model=MOD(V(lambda c: c.ptq_net)),
          path=OP(V(lambda c: c.out("ptq.safetensors"))),
          metadata=M({"note": "x"}, optional=True, extra=[_c("int-values", _const({"a": 1}), "raise")])),
        E("lowbit.ptq.GPTQResult", f(ptq.GPTQResult), tensor=ANY(None), weight=ANY(None), dead=ANY(0), error=ANY(0.0),
          rtn_error=ANY(0.0)),
        E("lowbit.ptq.LayerResult", f(ptq.LayerResult), tensor=ANY(None), error=ANY(0.0), rtn_error=ANY(0.0),
          dead=ANY(0), seconds=ANY(0.0)),
        # ---- lowbit.export
        E("lowbit.export.onnx", lambda c, **kw: export.onnx(**kw).opset, model=MOD(V(lambda c: c.net)),
          example_inputs=ANY(V(lambda c: torch.randn(2, 8))), path=OP(V(lambda c: c.out("net.onnx"))),
          quantized=OBJ(None, optional=True), calibration=OBJ(None, optional=True),
          opset=N(None, lo=13, hi=28, optional=True), external_data=FLAG(False)),
        E("lowbit.export.ExportReport", f(export.ExportReport), path=ANY("x.onnx"), opset=ANY(13)),
        E("lowbit.export.GGUFReport", f(export.GGUFReport), path=ANY("x.gguf")),
        E("lowbit.export.session", lambda c, **kw: len(export.session(**kw).get_inputs()),
          path=P(V(lambda c: c.onnx_path)), threads=N(None, lo=1, hi=1024, optional=True), exact=FLAG(True)),
        E("lowbit.export.OrtModel", lambda c, **kw: export.OrtModel(**kw).inputs, model=P(V(lambda c: c.onnx_path)),
          threads=N(None, lo=1, hi=1024, optional=True)),
        E("lowbit.export.OrtModel.forward", lambda c, **kw: c.ort_model.forward(**kw),
          input=ANY(V(lambda c: np.ones((2, 8), np.float32)))),
        # ---- lowbit.crossval
        E("lowbit.crossval.Tolerances", f(cv.Tolerances), inference=FL(1e-4, lo=0.0), quantization=FL(1e-5, lo=0.0),
          layers=M({"pooler": 1e-2}, extra=[_c("str-values", _const({"pooler": "x"}), "raise")])),
        E("lowbit.crossval.Tolerances.tolerance", lambda c, **kw: cv.Tolerances().tolerance(**kw),
          layer=TXT("pooler", over={"empty-str": "either", "nul": "either"}), mode=CH("inference")),
        E("lowbit.crossval.LayerReport", f(cv.LayerReport), name=ANY("x"), shape=ANY((1,)), max_abs=ANY(0.0),
          rel_l2=ANY(0.0), cosine=ANY(1.0), sqnr_db=ANY(0.0), tolerance=ANY(1e-4), passed=ANY(True)),
        E("lowbit.crossval.Report", f(cv.Report), mode=ANY("inference"), layers=ANY([])),
        E("lowbit.crossval.Report.to_json", lambda c: c.report.to_json()),
        E("lowbit.crossval.Report.to_pandas", lambda c: c.report.to_pandas().shape, needs=("pandas",)),
        E("lowbit.crossval.Report.plot", lambda c, **kw: type(c.report.plot(**kw)).__name__, ax=ANY(None)),
        E("lowbit.crossval.compare", lambda c, **kw: cv.compare(c.bert_torch, c.bert, **kw),
          inputs=M(V(lambda c: {"input_ids": torch.tensor([[1, 2, 3]])}), aliases=("input_ids",)),
          tolerances=OBJ(None, optional=True), mode=CH("inference")),
        E("lowbit.crossval.compare[models]", lambda c, **kw: cv.compare(**kw, inputs={"input_ids": torch.tensor([[1]])}),
          torch_module=MOD(V(lambda c: c.bert_torch)), runtime_model=MOD(V(lambda c: c.bert))),
        E("lowbit.crossval.assert_close", lambda c, **kw: cv.assert_close(c.bert_torch, c.bert, **kw).passed,
          inputs=M(V(lambda c: {"input_ids": torch.tensor([[1, 2, 3]])}), aliases=("input_ids",)),
          tolerances=OBJ(None, optional=True), mode=CH("inference")),
        E("lowbit.crossval.simulate", lambda c, **kw: cv.simulate(c.bert_torch, **kw)(torch.tensor([[1, 2]]))[0],
          weights=CH("int8"), exclude=ANY(("pooler",)), act_bits=B(8, 2, 8, optional=True)),
        E("lowbit.crossval.simulate[module]", lambda c, **kw: cv.simulate(weights="int8", **kw),
          torch_module=MOD(V(lambda c: c.net))),
        # ---- lowbit.nas
        E("lowbit.nas.Graph", f(nas.Graph), valid="raise"),
        E("lowbit.nas.Graph.sequential", f(nas.Graph.sequential),
          input_shape=SH((1, 3, 8, 8), over={"huge-last": "either", "huge-first": "either", "huge-product": "either"}),
          extras=[Extra("flops-overflow", lambda kw, c: dict(kw, input_shape=(BIG, BIG),
                                                             layers=[{"op": "linear", "out_features": BIG}]),
                        "raise", ("large",)),
                  Extra("elements-overflow", lambda kw, c: dict(kw, input_shape=(BIG, BIG, BIG), layers=[]),
                        "raise", ("large",)),
                  Extra("padding-overflow", lambda kw, c: dict(kw, layers=[{"op": "conv2d", "out_channels": 4,
                                                                            "kernel": 3, "padding": 2**64 - 1}]),
                        "raise", ("padding",))],
          layers=ANY([{"op": "conv2d", "out_channels": 4, "kernel": 3}, {"op": "relu"}],
                     extra=[_c("None", _const(None), "raise"), _c("str", _const("abc"), "raise"),
                            _c("list-of-str", _const(["a"]), "raise"), _c("unknown-op", _const([{"op": "x"}]), "raise"),
                            _c("huge-channels", _const([{"op": "conv2d", "out_channels": BIG, "kernel": 3}]), "raise"),
                            _c("huge-kernel", _const([{"op": "conv2d", "out_channels": 4, "kernel": BIG}]), "raise"),
                            _c("negative", _const([{"op": "conv2d", "out_channels": -4, "kernel": 3}]), "raise"),
                            _c("float", _const([{"op": "conv2d", "out_channels": 2.5, "kernel": 3}]), "raise"),
                            _c("nan", _const([{"op": "conv2d", "out_channels": float("nan"), "kernel": 3}]), "raise"),
                            _c("huge-linear", _const([{"op": "linear", "out_features": BIG}]), "raise"),
                            _c("not-json", _const([{"op": object()}]), "raise")],
                     aliases=("layer",), over={"huge-channels": "either", "huge-linear": "either"})),
        E("lowbit.nas.Graph.from_layers", f(nas.Graph.from_layers), inputs=M({"x": [1, 16]}),
          layers=ANY([{"op": "linear", "out_features": 4}])),
        E("lowbit.nas.Graph.from_json", f(nas.Graph.from_json), text=TXT(V(lambda c: c.graph.to_json()), aliases=("json",),
                                                                          over={"empty-str": "raise", "nul": "raise"})),
        E("lowbit.nas.Graph.to_json", lambda c: c.graph.to_json()),
        E("lowbit.nas.DeviceProfile", f(nas.DeviceProfile), name=TXT("dev", over={"empty-str": "either", "nul": "either"}),
          peak_gops=M({"f32": 10.0, "int8": 20.0}, extra=[_c("negative", _const({"f32": -1.0}), "raise"),
                                                          _c("nan", _const({"f32": float("nan")}), "raise"),
                                                          _c("empty", _const({}), "raise"),
                                                          _c("unknown-precision", _const({"f7": 1.0}), "raise")]),
          bandwidth_gbs=FL(5.0, lo=0.0), overhead_us=FL(1.0, lo=0.0), energy_scale=FL(1.0, lo=0.0)),
        E("lowbit.nas.DeviceProfile.from_json", f(nas.DeviceProfile.from_json),
          text=TXT(V(lambda c: nas.DeviceProfile("dev", {"f32": 10.0}, 5.0).to_json()), aliases=("json",),
                   over={"empty-str": "raise", "nul": "raise"})),
        E("lowbit.nas.DeviceProfile.to_json", lambda c: nas.DeviceProfile("dev", {"f32": 10.0}, 5.0).to_json()),
        E("lowbit.nas.DeviceProfile.save", lambda c, **kw: nas.DeviceProfile("dev", {"f32": 1.0}, 5.0).save(**kw),
          path=OP(V(lambda c: c.out("d.json")))),
        E("lowbit.nas.DeviceProfile.load", f(nas.DeviceProfile.load), path=P(V(lambda c: c.device_json))),
        E("lowbit.nas.DeviceProfile.peak", lambda c, **kw: nas.DeviceProfile("dev", {"f32": 1.0}, 5.0).peak(**kw),
          weight_bits=B(8, 1, 32), act_bits=B(8, 1, 32)),
        E("lowbit.nas.devices", lambda c: sorted(nas.devices())),
        E("lowbit.nas.estimate", f(nas.estimate), graph=OBJ(V(lambda c: c.graph)), device=CH("cortex-a76"),
          weight_bits=B(4, 1, 32), act_bits=B(8, 1, 32)),
        E("lowbit.nas.Cost", f(nas.Cost), device=ANY("x"), weight_bits=ANY(8), act_bits=ANY(8), flops=ANY(1), macs=ANY(1),
          params=ANY(1), weight_bytes=ANY(1), peak_activation_bytes=ANY(1), latency_ms=ANY(1.0), energy_mj=ANY(1.0),
          layers=ANY([])),
        E("lowbit.nas.Cost.to_pandas", lambda c: nas.estimate(c.graph).to_pandas().shape, needs=("pandas",)),
        E("lowbit.nas.Cost.metric", lambda c, **kw: nas.estimate(c.graph).metric(**kw), name=CH("latency_ms")),
        E("lowbit.nas.CostModel", f(nas.CostModel), device=CH("cortex-a76"), weight_bits=B(8, 1, 32),
          act_bits=B(8, 1, 32)),
        E("lowbit.nas.CostModel.fit", lambda c, **kw: nas.CostModel.fit(c.graphs, **kw).device.to_json(),
          measured_ms=ANY([0.01, 0.02, 0.05], extra=[
              _c("len-1", _const([0.01, 0.02]), "raise"), _c("nan", _const([float("nan"), 0.02, 0.05]), "raise"),
              _c("negative", _const([-1.0, 0.02, 0.05]), "raise"), _c("zero", _const([0.0, 0.0, 0.0]), "raise"),
              _c("inf", _const([float("inf"), 0.02, 0.05]), "raise"), _c("str", _const("abc"), "raise"),
              _c("None", _const(None), "raise"), _c("empty", _const([]), "raise")]),
          device=CH("cortex-a76"), weight_bits=B(32, 1, 32), act_bits=B(32, 1, 32)),
        E("lowbit.nas.CostModel.fit[graphs]", lambda c, **kw: nas.CostModel.fit(**kw, measured_ms=[0.01, 0.02, 0.05],
                                                                                device="cortex-a76").device.to_json(),
          graphs=ANY(V(lambda c: c.graphs), extra=[_c("None", _const(None), "raise"), _c("str", _const("abc"), "raise"),
                                                   _c("ints", _const([1, 2, 3]), "raise"),
                                                   _c("empty", _const([]), "raise")])),
        E("lowbit.nas.CostModel.estimate", lambda c, **kw: nas.CostModel("cortex-a76").estimate(**kw),
          graph=OBJ(V(lambda c: c.graph))),
        E("lowbit.nas.CostModel.predict", lambda c, **kw: nas.CostModel("cortex-a76").predict(**kw),
          graph=OBJ(V(lambda c: c.graph))),
        E("lowbit.nas.Measurement", f(nas.Measurement), total_ms=ANY(1.0), samples_ms=ANY([1.0]), layers=ANY([])),
        E("lowbit.nas.Measurement.to_pandas", lambda c: nas.Measurement(1.0, [1.0], [{"a": 1}]).to_pandas().shape,
          needs=("pandas",)),
        E("lowbit.nas.ParetoFront", f(nas.ParetoFront), choices=ANY(np.zeros((0, 2))), fitness=ANY(np.zeros(0)),
          metrics=ANY({})),
        E("lowbit.nas.SearchSpace", f(nas.SearchSpace),
          blocks=ANY([[{"latency_ms": 1.0}, {"latency_ms": 2.0}]] * 2, extra=[
              _c("None", _const(None), "raise"), _c("str", _const("abc"), "raise"), _c("empty", _const([]), "raise"),
              _c("empty-block", _const([[]]), "raise"), _c("unknown-metric", _const([[{"x": 1.0}]]), "raise"),
              _c("nan-cost", _const([[{"latency_ms": float("nan")}]]), "raise"),
              _c("negative-cost", _const([[{"latency_ms": -1.0}]]), "raise"),
              _c("str-cost", _const([[{"latency_ms": "x"}]]), "raise"),
              _c("ints", _const([[1, 2]]), "raise")], aliases=("block", "choice")),
          device=CH("cortex-a76"), bits=B(8, 1, 32)),
        E("lowbit.nas.SearchSpace[bits-pair]", f(nas.SearchSpace), blocks=ANY([[{"latency_ms": 1.0}]]),
          bits=ANY((4, 8), extra=[_c("bad-pair", _const((4, 0)), "raise"), _c("triple", _const((4, 8, 8)), "raise"),
                                  _c("str-pair", _const(("4", "8")), "raise")])),
        E("lowbit.nas.SearchSpace.costs", lambda c, **kw: c.space.costs(**kw), metric=CH("params")),
        E("lowbit.nas.SearchSpace.evaluate", lambda c, **kw: c.space.evaluate(**kw),
          choices=IDS(np.array([[0, 1, 1], [1, 0, 0]]), aliases=("choice", "candidates"), over={"huge-id": "raise", "rank3": "raise",
                                                               "empty-last": "raise", "rank0": "raise"})),
        E("lowbit.nas.SearchSpace.expected", lambda c, **kw: c.space.expected(**kw),
          probs=F(np.full((3, 2), 0.5), aliases=("probabilities",), over={"nan": "raise", "inf": "raise", "-inf": "raise", "last-dim+1": "raise",
                                             "rank0": "raise", "rank-1": "raise", "empty-last": "raise",
                                             "3e38": "either", "str-array": "raise"}),
          metric=CH("latency_ms")),
        E("lowbit.nas.SearchSpace.random", lambda c, **kw: c.space.random(**kw), n=Z(5), seed=N(0, optional=True,
                                                                                              over=SEED)),
        E("lowbit.nas.evolve", lambda c, **kw: len(nas.evolve(c.space, lambda x: x.sum(1), progress=False, **kw)),
          constraints=M({"latency_ms": 5.0}, optional=True, extra=[_c("unknown", _const({"x": 1.0}), "raise"),
                                                                   _c("nan", _const({"latency_ms": float("nan")}), "raise")]),
          objective=CH("latency_ms"), population=Z(4, lo=2), generations=Z(2, over=WORK),
          mutation=FL(0.5, lo=0.0, hi=1.0, optional=True), seed=N(0, optional=True, over=SEED)),
        E("lowbit.nas.evolve[args]", lambda c, **kw: len(nas.evolve(progress=False, generations=1, population=2, **kw)),
          space=OBJ(V(lambda c: c.space)),
          fitness=FN(lambda x: x.sum(1), extra=[_c("wrong-shape", _const(lambda x: x.sum()), "raise"),
                                                _c("nan", _const(lambda x: np.full(len(x), np.nan)), "raise"),
                                                _c("strings", _const(lambda x: ["a"] * len(x)), "raise")])),
        E("lowbit.nas.from_torch", lambda c, **kw: nas.from_torch(**kw).to_json(), model=MOD(V(lambda c: c.net)),
          example_inputs=T(torch.randn(2, 8), over={"last-dim+1": "raise", "rank0": "raise", "int32": "raise",
                                                    "int64": "raise", "bool": "raise", "complex64": "raise",
                                                    "float16": "raise", "bfloat16": "raise", "float64": "raise",
                                                    "list": "raise", "numpy": "raise", "None": "raise",
                                                    "requires-grad": "same", "nan": "same", "strided": "either"},
                                  propagate=True)),
        E("lowbit.nas.measure", lambda c, **kw: len(nas.measure(c.net, torch.randn(2, 8), **kw).samples_ms),
          repeats=Z(2, lo=1, over=WORK), warmup=Z(0, over=WORK), per_op=FLAG(False)),
        E("lowbit.nas.measure[model]", lambda c, **kw: type(nas.measure(**kw, repeats=1, per_op=False)).__name__,
          model=MOD(V(lambda c: c.net)), example_inputs=ANY(V(lambda c: torch.randn(2, 8)))),
        # ---- lowbit.runtime
        E("lowbit.runtime.BertEncoder", lambda c, **kw: rt.BertEncoder(**kw).config, core=OBJ(V(lambda c: c.bert._core)),
          path=ANY("x")),
        E("lowbit.runtime.BertEncoder.load", lambda c, **kw: rt.BertEncoder.load(**kw).config,
          path=P(V(lambda c: c.bert_path), aliases=("config.json",)), weights=CH("f32"), act_bits=B(None, 2, 8, optional=True,
                                                                          over={"np.int64": "either"})),
        E("lowbit.runtime.BertEncoder.forward", lambda c, **kw: c.bert.forward(**kw), input_ids=IDS(IDS_),
          attention_mask=IDS(np.ones_like(IDS_), optional=True, over={"huge-id": "raise", "negative": "raise"}),
          token_type_ids=IDS(np.zeros_like(IDS_), optional=True), record=FLAG(False)),
        E("lowbit.runtime.BertEncoder.embed", lambda c, **kw: c.bert.embed(**kw), input_ids=IDS(IDS_),
          attention_mask=IDS(np.ones_like(IDS_), optional=True, over={"huge-id": "raise", "negative": "raise"})),
        E("lowbit.runtime.MultiTaskModel", lambda c, **kw: rt.MultiTaskModel(**kw).logit_scale,
          core=OBJ(V(lambda c: c.vlm._core)), path=ANY("x")),
        E("lowbit.runtime.MultiTaskModel.load", lambda c, **kw: rt.MultiTaskModel.load(**kw).logit_scale,
          path=P(V(lambda c: c.vlm_path)), weights=CH("int8"), act_bits=B(None, 2, 8, optional=True,
                                                                         over={"np.int64": "either"})),
        E("lowbit.runtime.MultiTaskModel.forward", lambda c, **kw: c.vlm.forward(**kw),
          images=F(IMG, over={"last-dim+1": "raise", "rank0": "raise", "rank+1": "raise", "rank-1": "raise",
                              "empty-last": "raise"}),
          task=CH("vqa"), ids=IDS(IDS_[:1], **VLM_IDS), mask=IDS(np.ones_like(IDS_[:1]), **VLM_MASK),
          record=FLAG(False)),
        E("lowbit.runtime.MultiTaskModel.forward[text]", lambda c, **kw: c.vlm.forward(task="text", **kw),
          ids=IDS(IDS_, **VLM_IDS)),
        E("lowbit.runtime.MultiTaskModel.caption", lambda c, **kw: c.vlm.caption(IMG, **kw),
          max_len=Z(3, lo=1, optional=True), beam=Z(2, lo=1, over={"huge": "either"})),
        E("lowbit.runtime.MultiTaskModel.ocr", lambda c, **kw: c.vlm.ocr(**kw),
          images=F(IMG, over={"last-dim+1": "raise", "rank0": "raise", "rank+1": "raise", "rank-1": "raise",
                              "empty-last": "raise"})),
        E("lowbit.runtime.MultiTaskModel.vqa", lambda c, **kw: c.vlm.vqa(IMG, **kw),
          questions=SL(["what color is the circle ?"], over={"empty": "raise", "empty-strs": "either"})),
        E("lowbit.runtime.MultiTaskModel.embed_images", lambda c, **kw: c.vlm.embed_images(**kw),
          images=F(IMG, over={"last-dim+1": "raise", "rank0": "raise", "rank+1": "raise", "rank-1": "raise",
                              "empty-last": "raise"})),
        E("lowbit.runtime.MultiTaskModel.embed_texts", lambda c, **kw: c.vlm.embed_texts(**kw),
          ids=IDS(IDS_, aliases=("input_ids",), over={"list-of-str": "either"}),  # strings are texts
          mask=IDS(np.ones_like(IDS_), **VLM_MASK)),
        E("lowbit.runtime.MultiTaskModel.embed_texts[strings]", lambda c, **kw: c.vlm.embed_texts(**kw),
          ids=SL(["a red circle", "two"], aliases=("input_ids",), over={"empty": "raise", "bare-str": "either",
                                                                        "ints": "either"})),
        E("lowbit.runtime.MultiTaskModel.retrieve", lambda c, **kw: c.vlm.retrieve(IMG, **kw),
          texts=SL(["a red circle", "two"], over={"empty": "raise"}),
          k=Z(1, lo=1, over={"huge": "either", "u64-overflow": "either"})),
        E("lowbit.runtime.MultiTaskModel.encode_questions", lambda c, **kw: c.vlm.encode_questions(**kw),
          questions=SL(["what color ?"])),
        E("lowbit.runtime.MultiTaskModel.encode_texts", lambda c, **kw: c.vlm.encode_texts(**kw), texts=SL(["a red circle"])),
        # ---- lowbit.torch
        E("lowbit.torch.fake_quantize_per_tensor_affine", f(lt.fake_quantize_per_tensor_affine), x=T(XT, over={"meta": "either"}), scale=S(0.1),
          zero_point=N(0, aliases=("quant_min",)), **_qrange(-8, 7), return_mask=FLAG(False),
          out=ANY(None, extra=[_c("wrong-shape", _const(torch.empty(3)), "raise"),
                               _c("int32", _const(torch.empty(4, 6, dtype=torch.int32)), "raise"),
                               _c("numpy", _const(np.empty((4, 6), np.float32)), "raise"),
                               _c("str", _const("abc"), "raise"),
                               _c("strided", _const(torch.empty(4, 12)[:, ::2]), "raise"),
                               _c("fresh", _const(torch.empty(4, 6)), "same")])),
        E("lowbit.torch.fake_quantize_per_channel_affine", f(lt.fake_quantize_per_channel_affine),
          x=T(XT, over={"rank0": "raise", "empty": "raise", "meta": "either"}, aliases=("axis",)), scale=FV([0.1, 0.2, 0.3, 0.4]),
          zero_point=IV([0, 1, -1, 0]), **ch, **_qrange(-8, 7), return_mask=FLAG(True)),
        E("lowbit.torch.quantize_per_tensor", f(lt.quantize_per_tensor), x=T(XT, over={"meta": "either"}), scale=S(0.1), zero_point=N(0),
          **_qrange(-8, 7)),
        E("lowbit.torch.quantize_per_channel", f(lt.quantize_per_channel),
          x=T(XT, over={"rank0": "raise", "empty": "raise", "meta": "either"}, aliases=("axis",)),
          scales=FV([0.1, 0.2, 0.3, 0.4]), zero_points=IV([0, 1, -1, 0]), **ch, **_qrange(-8, 7)),
        E("lowbit.torch.dequantize_per_tensor", f(lt.dequantize_per_tensor), q=ANY(torch.from_numpy(Q8.copy()), extra=[
            _c("float", _const(torch.ones(3)), "raise"), _c("numpy", _const(Q8.copy()), "raise"),
            _c("None", _const(None), "raise"), _c("str", _const("abc"), "raise"),
            _c("strided", _const(torch.from_numpy(Q8.copy()).T.contiguous().T), "same")]),
          scale=S(0.1), zero_point=N(0)),
        E("lowbit.torch.dequantize_per_channel", f(lt.dequantize_per_channel), q=ANY(torch.from_numpy(Q8.copy())),
          scales=FV([0.125, 0.25, 0.375, 0.5]), zero_points=IV([0, 1, -1, 0]), **ch),
        E("lowbit.torch.FakeQuantize", lambda c, **kw: lt.FakeQuantize(**kw)(XT), **_qrange(-8, 7),
          scale=S(0.1, over={"numpy-vector": "raise", "0-d array": "same"}), zero_point=N(0, aliases=("quant_min",)),
          axis=N(None, optional=True, over=AXIS), enabled=FLAG(True)),
        E("lowbit.torch.FakeQuantize[per_channel]", lambda c, **kw: lt.FakeQuantize(axis=0, **kw)(XT),
          scale=FV([0.1, 0.2, 0.3, 0.4]), zero_point=IV([0, 1, -1, 0])),
        E("lowbit.torch.FakeQuantize.from_tensor", lambda c, **kw: lt.FakeQuantize.from_tensor(**kw).state_dict(),
          x=T(XT, over={"rank0": "either"}), bits=B(4, 2, 8), symmetric=FLAG(True), axis=N(0, optional=True)),
        E("lowbit.torch.FakeQuantize.forward", lambda c, **kw: lt.FakeQuantize(scale=0.1).forward(**kw), x=T(XT, over={"meta": "either"})),
        E("lowbit.torch.FakeQuantize.extra_repr", lambda c: lt.FakeQuantize().extra_repr()),
        E("lowbit.torch.fake_quantize_learnable_per_tensor_affine", f(lt.fake_quantize_learnable_per_tensor_affine),
          x=T(XT, over={"meta": "raise", "float64": "either", "float16": "either", "bfloat16": "either"}),
          scale=ANY(torch.tensor([0.1])), zero_point=ANY(torch.tensor([0.0])), **_qrange(-8, 7)),
        E("lowbit.torch.fake_quantize_learnable_per_channel_affine", f(lt.fake_quantize_learnable_per_channel_affine),
          x=T(XT, over={"meta": "raise", "rank0": "raise", "empty": "raise"}, aliases=("axis",)),
          scale=ANY(torch.full((4,), 0.1)), zero_point=ANY(torch.zeros(4)), **ch, **_qrange(-8, 7)),
        E("lowbit.torch.LearnableFakeQuantize", lambda c, **kw: lt.LearnableFakeQuantize(**kw)(XT), **_qrange(-8, 7),
          scale=S(0.1, over={"numpy-vector": "raise", "0-d array": "same"}), zero_point=ANY(0.0)),
        E("lowbit.torch.LearnableFakeQuantize.from_tensor", lambda c, **kw: lt.LearnableFakeQuantize.from_tensor(**kw).state_dict(),
          x=T(XT, over={"rank0": "either"}), bits=B(4, 2, 8), symmetric=FLAG(True), axis=N(0, optional=True)),
        E("lowbit.torch.LearnableFakeQuantize.forward", lambda c, **kw: lt.LearnableFakeQuantize(scale=0.1).forward(**kw), x=T(XT)),
        E("lowbit.torch.LearnableFakeQuantize.extra_repr", lambda c: lt.LearnableFakeQuantize().extra_repr()),
        E("lowbit.torch.BitLinear", lambda c, **kw: tuple(lt.BitLinear(**kw).weight.shape), in_features=Z(8),
          out_features=Z(4), bias=FLAG(True)),
        E("lowbit.torch.BitLinear.from_linear", lambda c, **kw: lt.BitLinear.from_linear(**kw).in_features,
          linear=MOD(V(lambda c: torch.nn.Linear(8, 4)))),
        E("lowbit.torch.BitLinear.forward", lambda c, **kw: _bitlinear().forward(**kw),
          x=T(torch.randn(3, 8), over={"last-dim+1": "raise", "rank0": "raise", "int32": "raise", "int64": "raise",
                                       "bool": "raise", "complex64": "raise", "list": "raise", "numpy": "raise",
                                       "None": "raise"})),
        E("lowbit.torch.Calibration", f(lt.Calibration)),
        E("lowbit.torch.calibrate", lambda c, **kw: sorted(lt.calibrate(c.net, progress=False, **kw)),
          data=ANY([torch.randn(4, 8)] * 2, extra=[_c("None", _const(None), "raise"), _c("int", _const(3), "raise"),
                                                  _c("wrong-shape", _const([torch.randn(4, 9)]), "propagates"),
                                                  _c("nan", _const([torch.full((4, 8), float("nan"))]), "raise")],
                   aliases=("input",)),
          spec=OBJ(None, optional=True), method=CH("mse"), weight_spec=OBJ(None, optional=True)),
        E("lowbit.torch.calibrate[model]", lambda c, **kw: sorted(lt.calibrate(data=[torch.randn(2, 8)], progress=False,
                                                                                **kw)),
          model=MOD(V(lambda c: c.net))),
        E("lowbit.torch.Calibration.attach", lambda c, **kw: _attached_output(c, **kw),
          model=MOD(V(lambda c: c.net)), weights=FLAG(True)),
        E("lowbit.torch.AttachedQuantization", lambda c: repr(lt.AttachedQuantization([]))),
        E("lowbit.torch.AttachedQuantization.remove", lambda c: lt.AttachedQuantization([]).remove()),
        E("lowbit.torch.sync_observers", f(lt.sync_observers), observers=ANY(V(lambda c: {"a": lc.MinMaxObserver()}),
                                                                             extra=[_c("None", _const(None), "raise"),
                                                                                    _c("str", _const("abc"), "raise"),
                                                                                    _c("ints", _const([1]), "raise")])),
        E("lowbit.torch.expected_latency", lambda c, **kw: lt.expected_latency(space=c.space, **kw),
          logits=T(torch.zeros(3, 2), over={"last-dim+1": "raise", "rank0": "raise", "rank+1": "either", "int32": "raise",
                                            "int64": "raise", "bool": "raise", "list": "raise", "numpy": "raise",
                                            "None": "raise", "empty": "raise"}),
          tau=FL(1.0, lo=0.0), gumbel=FLAG(False), hard=FLAG(False), metric=CH("latency_ms")),
        E("lowbit.torch.expected_latency[space]", lambda c, **kw: lt.expected_latency(torch.zeros(3, 2), **kw),
          space=OBJ(V(lambda c: c.space))),
        # ---- lowbit.data
        E("lowbit.data.Tokenizer", lambda c: len(ld.Tokenizer())),
        E("lowbit.data.english_sentences", lambda c, **kw: len(ld.english_sentences(**kw)), limit=Z(5)),
        E("lowbit.data.Tokenizer.split", lambda c, **kw: ld.Tokenizer().split(**kw), text=TXT("a red circle?")),
        E("lowbit.data.Tokenizer.encode", lambda c, **kw: ld.Tokenizer().encode(**kw), text=TXT("a red circle?"),
          bos=FLAG(True), eos=FLAG(True)),
        E("lowbit.data.Tokenizer.decode", lambda c, **kw: ld.Tokenizer().decode(**kw),
          ids=IDS(np.array([2, 6, 30, 3]), over={"rank3": "raise", "rank0": "raise", "negative": "either",
                                                  "huge-id": "either", "int64-max": "either"})),
        E("lowbit.data.Tokenizer.batch", lambda c, **kw: ld.Tokenizer().batch(**kw), texts=SL(["a red circle", "two"]),
          max_len=Z(6, lo=1), bos=FLAG(True), eos=FLAG(False), cls=FLAG(True)),
        E("lowbit.data.SyntheticScenes", lambda c, **kw: _first_scene(ld.SyntheticScenes(**kw)), seed=N(0, over=SEED),
          n=Z(3, over={"huge": "either"}), image_size=Z(32, lo=32), max_shapes=Z(2, lo=1),
          text_len=ANY((2, 3), extra=[_c("reversed", _const((3, 2)), "raise"), _c("huge", _const((1, BIG)), "raise"),
                                      _c("None", _const(None), "raise"), _c("str", _const("ab"), "raise"),
                                      _c("floats", _const((1.5, 2.5)), "raise")])),
        E("lowbit.data.ShapeSpec", f(ld.ShapeSpec), kind=ANY("circle"), color=ANY("red"), slot=ANY(0), cx=ANY(1),
          cy=ANY(1), r=ANY(1)),
    ]
    return entries


def _first_scene(ds: ld.SyntheticScenes) -> Any:
    return ds[0] if len(ds) else len(ds)


def _bitlinear() -> lt.BitLinear:
    torch.manual_seed(0)
    return lt.BitLinear(8, 4).eval()


ENTRIES = _entries()

# ---------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    entry: Entry
    arg: str | None
    label: str
    expect: str
    corrupt: Callable[[dict, Any], dict]
    names: tuple[str, ...]
    is_path: bool = False  # a file argument: naming the file counts as naming the argument

    @property
    def id(self) -> str:
        return f"{self.entry.id}|{self.arg or '*'}|{self.label}"


def _arg_case(e: Entry, a: Arg, c: Corruption) -> Case | None:
    expect = a.over.get(c.label, c.expect)
    if expect == "skip" or (a.value is None and c.label.startswith("np.")):
        return None
    if a.propagate and expect in ("raise", "either"):
        expect = "propagates"
    if a.optional and c.label == "None":
        expect = "same" if a.value is None else "either"

    def corrupt(kw: dict, ctx: Any, a: Arg = a, c: Corruption = c) -> dict:
        return dict(kw, **{a.name: c.fn(kw[a.name], ctx)})

    return Case(e, a.name, c.label, expect, corrupt, (a.name,) + a.aliases + ROWS.get(a.name, ()),
                a.kind in ("path", "outpath"))


def _cases() -> list[Case]:
    out = []
    for e in ENTRIES:
        out.append(Case(e, None, "valid", e.valid, lambda kw, ctx: kw, ()))
        if e.valid == "raise":
            continue
        for a in e.args.values():
            for c in KINDS[a.kind](a) + a.extra:
                case = _arg_case(e, a, c)
                if case is not None:
                    out.append(case)
        for x in e.extras:
            out.append(Case(e, None, x.label, x.expect, x.fn, x.names))
    return out


CASES = _cases()
IDS_SEEN = [c.id for c in CASES]
assert len(set(IDS_SEEN)) == len(IDS_SEEN), "duplicate case ids"


def _materialize(v: Any, ctx: Ctx) -> Any:
    if isinstance(v, V):
        return v.fn(ctx)
    if isinstance(v, np.ndarray):
        return v.copy()
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, (list, dict, tuple)):
        return copy.deepcopy(v)
    return v


def canon(r: Any) -> Any:
    """A comparable, bit-exact summary of a result."""
    if isinstance(r, np.ndarray):
        return ("nd", r.dtype.str, r.shape, np.ascontiguousarray(r).tobytes() if r.dtype != object else repr(r))
    if isinstance(r, torch.Tensor):
        t = r.detach()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        return ("tensor", str(r.dtype), tuple(t.shape), canon(t.contiguous().numpy()))
    if isinstance(r, np.generic):
        return canon(np.asarray(r))
    if isinstance(r, float):
        return ("f", struct.pack("<d", r))
    if isinstance(r, (bool, int, str, bytes, type(None))):
        return r
    if isinstance(r, (list, tuple)):
        return (type(r).__name__, tuple(canon(x) for x in r))
    if isinstance(r, dict):
        return ("dict", tuple(sorted((str(k), canon(v)) for k, v in r.items())))
    if isinstance(r, lowbit.QuantizedTensor):
        return ("qt", tuple(r.shape), canon(r.codes), canon(r.scales), canon(r.zero_points), repr(r.spec))
    if isinstance(r, bn.PackedSigns):
        return ("signs", r.shape, canon(bn.binary_matmul(r, r)))
    if isinstance(r, lc.Observer):
        return ("observer", r._core.to_json())
    if isinstance(r, bn.TernaryLinear):
        return ("ternary", canon(r.codes), canon(r.scale), canon(r.bias))
    if isinstance(r, bn.BinaryLinear):
        return ("binary", canon(r.scales), canon(r.bias), r.nbytes, r.in_features)
    if isinstance(r, torch.nn.Module):
        return ("module", canon(dict(r.state_dict())))
    if isinstance(r, lowbit.GGUFFile):
        return ("gguf", canon(r.tensors), canon(r.types), canon(r.exact), canon(r.metadata), canon(r.metadata_types),
                r.version)
    if dataclasses.is_dataclass(r):
        return ("dataclass", type(r).__name__, canon(dataclasses.asdict(r)))
    if hasattr(r, "to_json"):
        return ("json", r.to_json())
    return ("object", type(r).__name__)


def _accepted(e: BaseException) -> bool:
    if isinstance(e, lowbit.LowbitError):
        return True
    return isinstance(e, (ValueError, TypeError)) and not isinstance(e, OSError)


def _names(text: str, names: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", text, re.IGNORECASE) for n in names)


def _run(case: Case, ctx: Ctx) -> None:
    e = case.entry
    for module in e.needs:
        pytest.importorskip(module)
    fresh = lambda: {k: _materialize(a.value, ctx) for k, a in e.args.items()}  # noqa: E731
    ref = None
    if case.expect in ("same", "same_or_raise"):
        ref = canon(e.call(ctx, **fresh()))
    kw = case.corrupt(fresh(), ctx)
    names = case.names
    if case.is_path and isinstance(kw[case.arg], (str, os.PathLike)):
        names += (os.fspath(kw[case.arg]),)
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    t0 = time.perf_counter()
    err: BaseException | None = None
    try:
        result = e.call(ctx, **kw)
        got = canon(result)
    except BaseException as ex:  # noqa: BLE001 - PanicException derives from BaseException
        err = ex
    finally:
        faulthandler.cancel_dump_traceback_later()
    elapsed = time.perf_counter() - t0
    where = f"{case.id}: "
    if "huge" in case.label or "overflow" in case.label:
        assert elapsed < HUGE_S, f"{where}took {elapsed:.1f} s: a huge request must be refused before any work"
    if err is not None:
        text = "\n".join([str(err), *getattr(err, "__notes__", [])])
        msg = f"{type(err).__module__}.{type(err).__qualname__}: {text}"
        assert type(err).__name__ != "PanicException", where + msg
        assert "please report" not in str(err), where + "a Rust panic (a lowbit bug): " + msg
        assert case.expect == "propagates" or _accepted(err), where + "not a LowbitError / ValueError / TypeError: " + msg
        assert isinstance(err, Exception), where + msg
        assert case.expect not in ("same", "works"), where + "should have worked: " + msg
        if case.expect == "raise" and names:
            assert _names(text, names), where + f"message does not name {names}: {msg}"
        return
    assert case.expect != "raise", f"{where}returned {str(result)[:200]!r} instead of raising"
    if ref is not None:
        assert got == ref, f"{where}result differs from the valid call's"


@pytest.mark.parametrize("case", CASES, ids=IDS_SEEN)
def test_bad_input(case: Case, ctx: Ctx) -> None:
    _run(case, ctx)


# ---------------------------------------------------------------------------------------------
# The table covers the public API


def _public_callables(modules: list[str] = MODULES) -> dict[int, tuple[Any, list[str]]]:
    """id(object) -> (object, public paths) for every public function, class and method."""
    found: dict[int, tuple[Any, list[str]]] = {}

    def add(obj: Any, path: str) -> None:
        found.setdefault(id(obj), (obj, []))[1].append(path)

    for modname in modules:
        mod = importlib.import_module(modname)
        names = getattr(mod, "__all__", None)
        assert names is not None, f"{modname} has no __all__"
        for name in names:
            obj = getattr(mod, name)
            path = f"{modname}.{name}"
            if inspect.ismodule(obj) or not callable(obj):
                continue
            if inspect.isclass(obj) and issubclass(obj, BaseException):
                continue
            add(obj, path)
            if inspect.isclass(obj):
                for attr in dir(obj):
                    if attr.startswith("_") and attr != "__call__":
                        continue
                    owner = next((k for k in obj.__mro__ if attr in vars(k)), None)
                    if owner is None or not (owner.__module__ or "").startswith("lowbit"):
                        continue
                    raw = vars(owner)[attr]
                    fn = getattr(raw, "__func__", raw)
                    if isinstance(raw, property) or not callable(fn):
                        continue
                    add(fn, f"{path}.{attr}")
    return found


def _resolve(path: str) -> Any:
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for j, p in enumerate(parts[i:]):
            if inspect.isclass(obj):
                owner = next(k for k in obj.__mro__ if p in vars(k))
                raw = vars(owner)[p]
                obj = getattr(raw, "__func__", raw)
            else:
                obj = getattr(obj, p)
        return obj
    raise LookupError(path)


def test_every_public_callable_is_in_the_table() -> None:
    covered = {id(_resolve(e.target)) for e in ENTRIES}
    missing = sorted(paths[0] for key, (_, paths) in _public_callables().items() if key not in covered)
    assert not missing, f"public callables with no entry in test_bad_input.ENTRIES: {missing}"


def test_every_entry_is_public() -> None:
    public = _public_callables()
    stray = [e.id for e in ENTRIES if id(_resolve(e.target)) not in public]
    assert not stray, f"entries for non-public callables: {stray}"


N_CASES = len(CASES)


def test_case_count() -> None:
    by_expect: dict[str, int] = {}
    for c in CASES:
        by_expect[c.expect] = by_expect.get(c.expect, 0) + 1
    print(f"\nbad-input matrix: {N_CASES} cases over {len(ENTRIES)} entries: {by_expect}", file=sys.stderr)
    assert len(ENTRIES) >= 100
    assert N_CASES >= 2000
