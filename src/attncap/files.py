"""How attncap changes files on disk: crash-consistent, so nothing is ever lost or half-written.

Every file and folder attncap writes goes through this module:

* :func:`atomic_path` / :func:`write_json`: a file is written beside its final name, fsynced,
  renamed onto it and its folder fsynced, so a reader (or the next run after a kill) finds the old
  file or the complete new one, never a mix, and the rename survives a power loss.
* :func:`atomic_folder`: a folder (a checkpoint, an export, a stage's outputs) is built beside its
  final name and swapped in. On Linux the swap is one ``renameat2(RENAME_EXCHANGE)``: at no moment
  does the path lack either the old or the new folder. Where the file system cannot exchange
  (some network file systems), the old folder is renamed aside first; :func:`recover_folder`, which
  every reader of such a folder calls, puts it back if a kill came between the two renames.
* :func:`append_line` / :func:`read_jsonl`: an append-only log whose records are fsynced one by
  one; a torn last line (a kill during a write) is ignored by readers and cut by the next writer.

:func:`fault_point` marks every step of the above. Tests set ``ATTNCAP_FAULT_AT=N`` to have the
process kill itself with SIGKILL at the Nth point, and ``ATTNCAP_FAULT_TRACE=FILE`` to list the
points a run passes (see ``tests/test_fault_injection.py`` and ``docs/reliability.md``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import AttncapError

FAULT_AT_ENV = "ATTNCAP_FAULT_AT"        # kill this process at the Nth fault point (1-based)
FAULT_TRACE_ENV = "ATTNCAP_FAULT_TRACE"  # append "label" of every fault point to this file
FAULT_RANK_ENV = "ATTNCAP_FAULT_RANK"    # only in the process whose RANK is this (torchrun)
FAULT_PID_ENV = "ATTNCAP_FAULT_PID"      # only in this process (default: a process no multiprocessing
                                         # parent started, i.e. not a pool or DataLoader worker)
FAULT_LABEL_ENV = "ATTNCAP_FAULT_LABEL"  # count only the points whose label starts with this
FAULT_SIGNAL_ENV = "ATTNCAP_FAULT_SIGNAL"  # send this signal (e.g. SIGTERM) instead of SIGKILL
TMP_TAG = ".attncap-tmp-"                # in the names of files and folders being written


class _FaultHook:
    """Counts fault points in the process that read the environment (not in forked workers)."""

    def __init__(self):
        rank, pid = os.environ.get(FAULT_RANK_ENV), os.environ.get(FAULT_PID_ENV)
        main = int(pid) == os.getpid() if pid else multiprocessing.parent_process() is None
        active = main and (rank is None or os.environ.get("RANK", "0") == rank)
        self.kill_at = int(os.environ.get(FAULT_AT_ENV, "0") or 0) if active else 0
        self.trace = os.environ.get(FAULT_TRACE_ENV, "") if active else ""
        self.label = os.environ.get(FAULT_LABEL_ENV, "")
        self.signal = getattr(signal, os.environ.get(FAULT_SIGNAL_ENV, "") or "SIGKILL")
        self.pid, self.count = os.getpid(), 0

    def hit(self, label: str) -> None:
        if os.getpid() != self.pid or not label.startswith(self.label):  # a worker, or another label
            return
        self.count += 1
        if self.trace:
            with open(self.trace, "a", encoding="utf-8") as f:
                f.write(f"{self.count} {label}\n")
        if self.count == self.kill_at:
            os.kill(os.getpid(), self.signal)


_hook: _FaultHook | None = None  # created on first use, so tests can set the environment first


def fault_point(label: str) -> None:
    """A place where a kill must leave a state the next run recovers from (a test hook; see above)."""
    global _hook
    if _hook is None:
        if not (os.environ.get(FAULT_AT_ENV) or os.environ.get(FAULT_TRACE_ENV)):
            return
        _hook = _FaultHook()
    _hook.hit(label)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or deletion inside folder ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # e.g. a file system that does not open folders; the rename itself still happened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder below ``folder`` (before it is renamed into place)."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            fsync_file(Path(dirpath) / name)
        fsync_dir(dirpath)


def _temp_prefix(path: Path) -> str:
    """Temporary names say who writes them (host and process), so a later run can tell the ones a
    killed process left (same host, process gone) from those of a writer still at work."""
    return f".{path.name}{TMP_TAG}{socket.gethostname()}-{os.getpid()}-"


def _remove_dead_temps(path: Path) -> None:
    """Delete what killed processes of this host left while writing ``path``."""
    _remove_if_dead(path.parent.glob(f".{glob.escape(path.name)}{TMP_TAG}*"))


def remove_dead_temps(folder: str | os.PathLike) -> None:
    """Delete what killed processes of this host left while writing any file in ``folder``: one
    look at the folder for a stage that writes many files with ``atomic_path(durable=False)``."""
    _remove_if_dead(Path(folder).glob(f".*{TMP_TAG}*"))


def _remove_if_dead(temporaries: Iterator[Path]) -> None:
    host = socket.gethostname()
    for stale in temporaries:
        owner = stale.name.rsplit(TMP_TAG, 1)[-1].rsplit("-", 2)
        if len(owner) == 3 and owner[0] == host and owner[1].isdigit() and not _alive(int(owner[1])):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def sync_folder(folder: str | os.PathLike) -> None:
    """Make every file written in ``folder`` durable at once: one ``sync`` of the system's
    buffers, where a stage of many small files would otherwise fsync each (its commit follows)."""
    if hasattr(os, "sync"):
        os.sync()
        fsync_dir(folder)
    else:  # pragma: no cover - not POSIX
        _fsync_tree(Path(folder))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != 0


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` (durably) only if the block succeeds.

    Readers see either the old file or the complete new one, never a partial write. Temporary
    files that killed writers left for ``path`` are removed first.

    ``durable=False`` is for one of many files that a stage commits together (the shapes world's
    images, committed by its manifest): the rename still makes each file whole or absent, but it
    is not fsynced on its own and no dead writer's temporaries are looked for beside it (a look at
    the folder per file, which grows with the folder); the stage calls :func:`remove_dead_temps`
    once before and :func:`sync_folder` once before its commit.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if durable:
        _remove_dead_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes the file private; results are ordinary files
    try:
        yield Path(tmp)
        if durable:
            fsync_file(tmp)
        fault_point(f"write {path.name}")
        os.replace(tmp, path)
        fault_point(f"rename {path.name}")
        if durable:
            fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover_folder(path: str | os.PathLike) -> Path:
    """Finish or undo an interrupted :func:`atomic_folder` swap of ``path``; returns ``path``.

    Only the fallback swap (no atomic exchange) has a moment without ``path``: the old folder is
    then at ``.NAME.old`` and is put back. What killed writers of ``path`` left is removed.
    """
    path = Path(path)
    old = _aside(path)
    if old.is_dir() and not path.exists():
        os.replace(old, path)
        fsync_dir(path.parent)
    if path.parent.is_dir():
        _remove_dead_temps(path)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
    return path


def _swap_in(tmp: Path, path: Path, exchange: bool = True) -> None:
    """Put the finished folder ``tmp`` at ``path``; whatever was there is deleted afterwards."""
    if not path.exists():
        os.replace(tmp, path)
        fault_point(f"rename {path.name}")
    elif exchange and _exchange(tmp, path):
        fault_point(f"exchange {path.name}")
        fsync_dir(path.parent)
        shutil.rmtree(tmp)  # now the old folder
        return
    else:
        old = _aside(path)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        fault_point(f"aside {path.name}")
        os.replace(tmp, path)
        fault_point(f"rename {path.name}")
        fsync_dir(path.parent)
        shutil.rmtree(old)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder beside ``path``; swap it in for ``path`` only if the block succeeds.

    Its files are fsynced before the swap. A crash leaves the previous folder (or none) in place,
    never a partly written one. Callers decide whether ``path`` may be replaced (see
    :mod:`attncap.export` for a folder that may belong to the user).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes the folder private; checkpoints and exports are shared
    try:
        yield tmp
        _fsync_tree(tmp)
        fault_point(f"write {path.name}/")
        _swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, ensure_ascii=False), encoding="utf-8")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read JSON, turning a missing or corrupt file into a one-line :class:`AttncapError`."""
    path = Path(path)
    if not path.is_file():
        raise AttncapError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AttncapError(f"{what} {path} is not valid JSON ({exc}); re-create it") from None


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one record (a line without newline) to a log durably; a torn last line is cut first."""
    path = Path(path)
    with open(path, "ab+") as f:
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a kill during the previous append left half a line
                _cut_torn_tail(f)
        f.write(line.encode("utf-8") + b"\n")
        f.flush()
        os.fsync(f.fileno())
    fault_point(f"append {path.name}")


def _cut_torn_tail(f) -> None:
    f.seek(0)
    data = f.read()
    f.truncate(data.rfind(b"\n") + 1)
    f.seek(0, os.SEEK_END)


def read_jsonl(path: str | os.PathLike, what: str = "log") -> list[dict]:
    """The records of a JSON-lines log; a torn last line (no newline, not JSON) is skipped.

    Any other line that is not a JSON object is an :class:`AttncapError` naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the last line has no newline: a write was cut short
                break
            raise AttncapError(f"{what} {path} line {number} is not JSON; delete that line or the file") from None
        if not isinstance(record, dict):
            raise AttncapError(f"{what} {path} line {number} is not a JSON object; delete that line")
        records.append(record)
    return records
