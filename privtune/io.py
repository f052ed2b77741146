"""Atomic file writes: a temp file in the same folder, then os.replace, so a crash never leaves half a file.

Temp files (tempfile.mkstemp / mkdtemp, and safetensors' own writer) are created owner-only (0600 /
0700); a file renamed into place keeps that mode. Everything that lands in a run folder is therefore
given the mode an ordinary `open(path, "w")` / `mkdir` would have given it under the user's umask,
so a run folder shared with a group stays readable by that group.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status).

    The fallback sets and restores it (`os.umask` has no read-only form). The value set meanwhile is
    0o077, so a thread creating a file in that instant gets a more private file, never a more open one.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The permission bits a newly created regular file gets: 0o666 & ~umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The permission bits a newly created folder gets: 0o777 & ~umask."""
    return 0o777 & ~current_umask()


def apply_umask(path: str | os.PathLike) -> None:
    """Give `path` (a file or folder written owner-only by a temp-file writer) the umask's default mode."""
    os.chmod(path, dir_mode() if os.path.isdir(path) else file_mode())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    The result has the umask's mode (as a plain `open(path, "w")` would give a new file), not
    mkstemp's 0600, whatever wrote the temp path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        apply_umask(tmp_path)  # after the write: a writer may have replaced the temp file with its own
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
