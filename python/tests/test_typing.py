"""The stubs match the extension and the package type-checks.

``mypy.stubtest`` imports ``lowbit._lowbit`` and compares every name, signature, ``@final``
and ``__new__`` with ``_lowbit.pyi``; ``mypy -p lowbit`` checks the Python package against
those stubs (settings in ``pyproject.toml``). Both must report zero errors.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("mypy")


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MYPY_CACHE_DIR": str(tmp_path / "cache")},
    )


def test_stubs_match_the_extension(tmp_path: Path) -> None:
    r = _run(["mypy.stubtest", "lowbit._lowbit"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_package_type_checks(tmp_path: Path) -> None:
    r = _run(["mypy", "-p", "lowbit"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
