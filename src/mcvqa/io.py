"""Atomic file writes: a reader (or a crash) never sees a half-written output under its final name."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    # The process umask can only be read by setting it; set it straight back (one thread at start-up).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _umask()
FILE_MODE = 0o666 & ~UMASK
"""Mode of every file mcvqa writes: what ``open()`` would give (0644 under the usual umask 022).
``mkstemp`` creates its temp files 0600, which would leave outputs unreadable to teammates."""


def _atomic(path: str | Path, write: Callable[[IO[Any]], None], mode: str = "w") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the target so os.replace is a rename on one filesystem (atomic on POSIX).
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        kwargs: dict[str, Any] = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, mode, **kwargs) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return _atomic(path, lambda fh: fh.write(text))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return _atomic(path, lambda fh: fh.write(data), mode="wb")


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def atomic_write_csv(path: str | Path, df: Any, float_format: str | None = None) -> Path:
    """Write a pandas DataFrame as UTF-8 CSV with ``\\n`` line endings, atomically."""
    return _atomic(path, lambda fh: df.to_csv(fh, index=False, lineterminator="\n", float_format=float_format))


def share_files(folder: str | Path) -> None:
    """Give every file under ``folder`` the mode ``open()`` would have: safetensors writes its files 0600."""
    for f in Path(folder).rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, FILE_MODE)


def replace_dir(tmp: str | Path, path: str | Path) -> Path:
    """Put the finished folder ``tmp`` at ``path`` without a moment where neither old nor new exists.

    POSIX can't rename a folder onto a non-empty one, so: path -> path.old, tmp -> path, drop path.old. A
    kill between the two renames leaves ``path.old``, which :func:`recover_dir` puts back.
    """
    tmp, path = Path(tmp), Path(path)
    share_files(tmp)
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def recover_dir(path: str | Path) -> None:
    """Undo a :func:`replace_dir` interrupted between its two renames."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.exists():
        os.replace(old, path)
