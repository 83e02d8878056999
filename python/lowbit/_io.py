"""The one way lowbit's Python code writes a file: atomically (the Rust core's
``checkpoint::write_atomic`` does the same for checkpoints and device profiles)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Callable


def write_atomic(path: str | os.PathLike[str], data: bytes | str | Callable[[IO[bytes]], object]) -> None:
    """Write ``data`` (bytes, text as UTF-8, or a function that writes into the binary file it is
    given) to a temporary file beside ``path``, sync it and rename it over ``path``: a write that
    fails or is interrupted leaves any previous file intact and no temporary file behind."""
    path = os.fspath(path)
    mode = _mode(path)
    fd, tmp = tempfile.mkstemp(prefix=".lowbit-", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        os.chmod(tmp, mode)  # mkstemp's file is private (0600)
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _mode(path: str) -> int:
    """The mode of the file ``path`` replaces, or 0666 less the umask for a new one (read from the
    process status where the kernel has it: setting the umask to learn it would race threads)."""
    with contextlib.suppress(OSError):
        return os.stat(path).st_mode & 0o7777
    umask = 0o022
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
    return 0o666 & ~umask
