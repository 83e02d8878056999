"""The one way lowbit's Python code writes a file: atomically (the Rust core's
``checkpoint::write_atomic`` does the same for checkpoints and device profiles)."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from typing import IO, Callable

from lowbit._lowbit import LowbitIOError

_PREFIX, _SUFFIX = ".lowbit-", ".tmp"


def write_atomic(path: str | os.PathLike[str], data: bytes | str | Callable[[IO[bytes]], object]) -> None:
    """Write ``data`` (bytes, text as UTF-8, or a function that writes into the binary file it is
    given) to a temporary file beside ``path``, sync it and rename it over ``path``: a write that
    fails, raises or is interrupted leaves any previous file intact and no temporary file behind.

    On Linux the temporary file is unnamed (``O_TMPFILE``, on the file systems that have it:
    ext4, XFS, Btrfs, tmpfs, ...) until it is complete and synced, so even a writer killed by
    SIGKILL leaves nothing behind. Elsewhere it is a named ``.lowbit-*.tmp`` file from the start,
    which only a killed process (no exception, no ``finally``) can leave.
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    if os.path.isdir(path):
        raise LowbitIOError(f"cannot write {path!r}: it is a directory")
    mode = _mode(path)
    fd = _unnamed(folder)
    if fd is None:
        try:
            fd, tmp = tempfile.mkstemp(prefix=_PREFIX, suffix=_SUFFIX, dir=folder)
        except OSError as e:
            raise LowbitIOError(f"cannot write {path!r}: {e.strerror or e}") from None
    else:
        tmp = None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # a temporary file is private (0600)
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
            if tmp is None:
                tmp = _link(f.fileno(), folder)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def _unnamed(folder: str) -> int | None:
    """A write-only descriptor of an unnamed file in ``folder``, or None where the OS or the file
    system has none (or ``/proc/self/fd``, through which :func:`_link` names it, is missing)."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(folder, flag | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError:
        return None


def _link(fd: int, folder: str) -> str:
    """Give the unnamed file ``fd`` a fresh ``.lowbit-*.tmp`` name in ``folder`` and return it:
    ``linkat`` of its ``/proc/self/fd`` entry, following that link (a directory descriptor makes
    ``os.link`` call ``linkat`` with ``AT_SYMLINK_FOLLOW``; without one it calls ``link``, which
    does not follow it)."""
    procfd = os.open("/proc/self/fd", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        while True:
            name = os.path.join(folder, f"{_PREFIX}{secrets.token_hex(6)}{_SUFFIX}")
            try:
                os.link(str(fd), name, src_dir_fd=procfd, follow_symlinks=True)
                return name
            except FileExistsError:
                continue
    finally:
        os.close(procfd)


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
