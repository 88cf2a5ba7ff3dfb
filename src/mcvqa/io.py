"""Files: atomic writes (a reader, a crash or a full disk never sees a half-written output under its final name), and
reading a checkpoint's files ahead of the loader (:class:`ReadAhead`)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from mcvqa.errors import McvqaError


def _umask() -> int:
    # The process umask can only be read by setting it; set it straight back (one thread at start-up).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _umask()
FILE_MODE = 0o666 & ~UMASK
"""Mode of every file mcvqa writes: what ``open()`` would give (0644 under the usual umask 022).
``mkstemp`` creates its temp files 0600, which would leave outputs unreadable to teammates."""


DISK_ERRNOS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system"}
_DISK_TEXT = {"no space left": "no space left", "storagefull": "no space left", "os error 28": "no space left",
              "database or disk is full": "no space left", "disk quota exceeded": "disk quota exceeded", "read-only file system": "read-only file system"}


def disk_problem(exc: BaseException) -> str | None:
    """Why a write failed when the device is full, over quota or read-only; None for any other failure.

    Reads the errno of an OSError, and the text of what libraries wrap it in (safetensors, ``torch.save``, SQLite).
    """
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        return DISK_ERRNOS[exc.errno]
    text = str(exc).lower()
    return next((why for marker, why in _DISK_TEXT.items() if marker in text), None)


def disk_error(exc: BaseException, path: str | Path) -> McvqaError:
    """One line a person can act on: which device, which file, what to do; the work already done is kept."""
    path = Path(path)
    return McvqaError(
        f"{disk_problem(exc) or 'cannot write'} on the device holding {path.parent}: {path.name} was not written; "
        "free some space (or choose another --out) and run the same command again "
        "(predict and train: with --resume, which keeps the work already done)"
    )


def _stage(path: Path, write: Callable[[IO[Any]], None], mode: str = "w") -> Path:
    """Write a temp file beside ``path`` (same filesystem, so renaming it is atomic), flushed to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        kwargs: dict[str, Any] = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, mode, **kwargs) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, Exception) and disk_problem(e):
            raise disk_error(e, path) from None
        raise
    return Path(tmp)


def _atomic(path: str | Path, write: Callable[[IO[Any]], None], mode: str = "w") -> Path:
    path = Path(path)
    tmp = _stage(path, write, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return _atomic(path, lambda fh: fh.write(text))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, _json(obj))


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n"


def atomic_write_csv(path: str | Path, df: Any, float_format: str | None = None) -> Path:
    """Write a pandas DataFrame as UTF-8 CSV with ``\\n`` line endings, atomically."""
    return _atomic(path, _csv_writer(df, float_format))


def _csv_writer(df: Any, float_format: str | None) -> Callable[[IO[Any]], None]:
    return lambda fh: df.to_csv(fh, index=False, lineterminator="\n", float_format=float_format)


class Staged:
    """The outputs of one run, all written to temp files first and renamed into place together at the end.

    A run that fails half-way (a full disk while writing its outputs) leaves none of them under a final name:
    nobody can mistake a half-written folder for a finished run. Renames need no space, so once every temp
    file is written the commit cannot fail for lack of it.
    """

    def __init__(self) -> None:
        self.files: list[tuple[Path, Path]] = []

    def text(self, path: str | Path, text: str) -> Path:
        return self._add(Path(path), lambda fh: fh.write(text))

    def json(self, path: str | Path, obj: Any) -> Path:
        return self.text(path, _json(obj))

    def csv(self, path: str | Path, df: Any, float_format: str | None = None) -> Path:
        return self._add(Path(path), _csv_writer(df, float_format))

    def file(self, path: str | Path, write: Callable[[Path], None]) -> Path:
        """Stage a file written by a library that wants a path (matplotlib's savefig, say)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
        try:
            write(tmp)
            os.chmod(tmp, FILE_MODE)
        except Exception as e:
            tmp.unlink(missing_ok=True)
            if disk_problem(e):
                raise disk_error(e, path) from None
            raise
        self.files.append((tmp, path))
        return path

    def _add(self, path: Path, write: Callable[[IO[Any]], None]) -> Path:
        self.files.append((_stage(path, write), path))
        return path

    def commit(self) -> None:
        try:
            for tmp, path in self.files:
                os.replace(tmp, path)
        finally:
            self.discard()  # whatever was not renamed (only if a rename failed)

    def discard(self) -> None:
        for tmp, _ in self.files:
            tmp.unlink(missing_ok=True)
        self.files = []

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


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


def check_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """An output folder that can be written, checked before any work (minutes of model loading) starts: not an
    existing file, and the folder itself or its nearest existing parent writable (a read-only filesystem or a folder
    without write permission is named here in one line, not in a traceback after the model loaded). Creates nothing:
    a command refused later for another reason leaves no empty folder behind."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise McvqaError(f"{flag} {path}: is a file, not a folder; pass a folder (it is created if missing)")
    probe_in = path
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise McvqaError(f"{flag} {path}: {probe_in} is a file, so the folder cannot be created; choose another folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".mcvqa-write-check.", dir=probe_in)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise McvqaError(f"{flag} {path}: cannot write there ({_why(e)}); choose another folder") from None
    return path


def check_out_file(path: str | Path, flag: str = "--out") -> Path:
    """An output file that can be written: not a folder, its folder creatable and writable."""
    path = Path(path)
    if path.is_dir():
        raise McvqaError(f"{flag} {path}: is a folder; pass a file name, e.g. {path / 'metrics.json'}")
    check_out_dir(path.parent if str(path.parent) else Path("."), flag=f"{flag} {path}: its folder")
    return path


def _why(e: OSError) -> str:
    if e.errno in DISK_ERRNOS:
        return DISK_ERRNOS[e.errno]
    return {errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.ENOTDIR: "a part of the path is a file"}.get(
        e.errno or 0, e.strerror or type(e).__name__)


INDEX = "model.safetensors.index.json"


def index_shards(folder: Path) -> list[str] | None:
    """The shard files a sharded checkpoint's index lists, sorted and each once (transformers reads them in this
    order); None for a checkpoint without an index. Raises OSError or ValueError for an unreadable index."""
    index = folder / INDEX
    if not index.exists():
        return None
    weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
    return sorted({s for s in weight_map.values() if isinstance(s, str)})


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, in the order the loader reads them: the index's shards, else every
    ``*.safetensors`` file, by name."""
    try:
        shards = index_shards(folder)
    except (OSError, ValueError, AttributeError):
        shards = None
    return [folder / s for s in shards] if shards is not None else sorted(folder.glob("*.safetensors"))


READ_CHUNK = 16 << 20
"""Bytes per read of :class:`ReadAhead`: large enough that each read is one long sequential request, small enough
that a stop is seen within a few milliseconds."""


def available_memory() -> int | None:
    """Bytes that can be taken without swapping or hitting this process's memory limit: the kernel's ``MemAvailable``
    (which counts reclaimable page cache), lowered to what is left under a container's cgroup limit (v2 ``memory.max``
    less ``memory.current``, v1 ``memory.limit_in_bytes`` less ``memory.usage_in_bytes``): inside Docker, Kubernetes
    or Slurm, ``MemAvailable`` is the host's. None where neither is known (no Linux ``/proc``)."""
    free = None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    left = _cgroup_memory_left()
    if left is not None:
        free = left if free is None else min(free, left)
    return free


def _cgroup_memory_left(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under this process's cgroup memory limit; None without a limit (``max``, or v1's huge sentinel)."""
    for limit_file, usage_file in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = (root / limit_file).read_text(encoding="ascii").strip()
            usage = int((root / usage_file).read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
            return None
        return max(0, int(limit) - usage)
    return None


_READ_AHEAD_DONE: set[tuple[str, int, int]] = set()
"""(path, size, mtime) of the files a :class:`ReadAhead` read whole in this process: a second load of the same
checkpoint (each fold of a k-fold run, each trial of a study) finds them cached and does not copy them again."""


class ReadAhead:
    """Read ``files`` in order in a background thread, at most ``budget`` bytes in all, so that the operating system has
    them in its page cache when the loader asks; a ``with`` block stops the reading when it ends.

    A model's command spends its first seconds in Python (imports, the processor) while the disk is idle; the weights
    are read after that. Reading them here in the meantime overlaps the two: a file read releases the GIL, so the
    imports go on beside it. Only a cold file gains (a checkpoint not read since the machine started, a network or
    dataset mount); a file already cached costs one memory copy in this thread. ``posix_fadvise(WILLNEED)`` and
    ``readahead(2)`` would spare that copy, but on the virtualised disks measured here they left the pages unread.
    The budget keeps the read from evicting pages the process needs when the files are larger than the free
    memory (the loader then reads the rest itself). Nothing here raises: a file that cannot be read is skipped,
    since the loader will name it in its own error."""

    def __init__(self, files: Sequence[str | Path], budget: int | None):
        self.files = [Path(f) for f in files]
        self.budget = max(0, budget or 0)
        self.bytes_read = 0
        self._started = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mcvqa-read-ahead", daemon=True)

    def _run(self) -> None:
        buf = bytearray(READ_CHUNK)
        view = memoryview(buf)
        for path in self.files:
            try:
                stat = os.stat(path)
                key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
                if key in _READ_AHEAD_DONE:
                    continue
                with open(path, "rb", buffering=0) as fh:
                    while not self._stop.is_set() and self.bytes_read < self.budget:
                        n = fh.readinto(view[: min(READ_CHUNK, self.budget - self.bytes_read)])
                        if not n:
                            _READ_AHEAD_DONE.add(key)
                            break
                        self.bytes_read += n
            except OSError:
                continue
            if self._stop.is_set() or self.bytes_read >= self.budget:
                return

    @classmethod
    def for_files(cls, files: Sequence[str | Path]) -> ReadAhead:
        """A read-ahead of ``files`` within half the memory free now; the one :func:`read_ahead_early` started, if it
        reads the same files (it goes on, and this block's end stops it)."""
        global _EARLY
        early, _EARLY = _EARLY, None
        # resolved: a recipe's relative model path, which training resolves before it loads, names the same files
        if early is not None and [f.resolve() for f in early.files] == [Path(f).resolve() for f in files]:
            return early
        if early is not None:  # started for other files (the command loads another model): no longer wanted
            early.stop(wait=0)
        free = available_memory()
        return cls(files, free // 2 if free else 0)

    def start(self) -> ReadAhead:
        if self.files and self.budget and not self._started:  # an adopted early reader is already going
            self._started = True
            self._thread.start()
        return self

    def stop(self, wait: float = 1.0) -> None:
        """Stop reading; wait up to ``wait`` seconds for the thread's current read to return."""
        self._stop.set()
        if wait and self._thread.is_alive():
            self._thread.join(wait)
            if self._thread.is_alive():  # one read still under way on a slow mount: it ends on its own, after this load
                logging.getLogger(__name__).debug("read-ahead: a read outlives the load (%d bytes read so far)", self.bytes_read)

    def join(self) -> None:
        """Wait until every file (or the budget) has been read."""
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> ReadAhead:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


_EARLY: ReadAhead | None = None
"""The read-ahead a command line started before its heavy imports, until the model's load adopts it."""


def read_ahead_early(name_or_path: str) -> None:
    """Start reading a local checkpoint's weight files now, before the command imports torch and transformers (seconds
    of Python with the disk idle); the model's load adopts this reader (:meth:`ReadAhead.for_files`) and stops it when
    the weights are in. A Hub id is left to the load, which first learns whether its files are cached."""
    global _EARLY
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():  # an earlier command's reader in this process, never adopted, is taken over or stopped here
        _EARLY = ReadAhead.for_files(weight_files(folder)).start()


def stop_early() -> None:
    """Stop a reader :func:`read_ahead_early` started that no load took over (the command ended before its load: a bad
    CSV, an output that exists, a finished run): in a process that goes on (a notebook, tests), it would read on."""
    global _EARLY
    early, _EARLY = _EARLY, None
    if early is not None:
        early.stop(wait=0)
