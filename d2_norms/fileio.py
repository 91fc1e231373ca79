"""Atomic file writes shared by checkpoints, results.json, run_status.json and configs.

A reader (or a run resumed after a kill) sees either the old file or the whole new one, never
a half-written one: the bytes go to a hidden temporary file next to the target, are fsynced,
and replace the target by one rename.
"""
import os
from typing import IO, Callable

__all__ = ["atomic_write_bytes", "atomic_write_text", "temp_name"]


def temp_name(path: str) -> str:
    """``.<basename>.tmp-<pid>`` next to ``path``: hidden, and matched by no ``*.pth`` /
    ``*.json`` listing (``engine.checkpoint.remove_stale_temp_files`` cleans leftovers)."""
    directory = os.path.dirname(os.path.abspath(path))
    return os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. a platform without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(fileobj)`` on a temporary file next to ``path``, fsync, rename to ``path``.

    On any error (also KeyboardInterrupt) the temporary file is removed and ``path`` is left
    as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def atomic_write_text(path: str, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    data = text.encode("utf-8")
    atomic_write_bytes(path, lambda f: f.write(data))
