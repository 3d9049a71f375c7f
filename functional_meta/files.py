"""Files written safely: atomically (:func:`atomic_write`, what checkpoints and results use)
and under a lock held by a live process (:func:`process_lock`, what a run directory uses)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["LockedError", "atomic_write", "host_name", "process_exists", "process_lock"]


class LockedError(RuntimeError):
    """The lock is held by another live process (``holder``: its ``"HOST PID"``)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by {holder or 'another process'}")
        self.path, self.holder = path, holder


# A temporary file is ``.NAME.HOST-PID.RANDOM.tmp`` next to the target NAME (HOST: this
# machine's name, letters, digits and dashes only). Before each write, the temporaries of the
# same target that earlier writers left behind (a process killed mid-write) are removed when
# untouched for _STALE_SECONDS and their writer is provably gone: HOST is this machine and no
# process PID exists. Where that cannot be checked (another HOST on a shared file system, a
# system without kill(pid, 0), or the pid-less ``.NAME.XXXXXXXX.tmp`` names of mkstemp used
# before), they go once untouched for _UNCHECKED_STALE_SECONDS: no live write stalls that long.
_STALE_SECONDS = 60
_UNCHECKED_STALE_SECONDS = 3600
# As open(path, "w"): the kernel applies the umask, so a checkpoint gets the same permissions
# as the run's other files (0o644 under the usual umask 022; mkstemp's 0o600 did not).
_TEMPORARY_MODE = 0o666


def host_name() -> str:
    """This machine's name, letters, digits and dashes only (at most 32)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32]


def process_exists(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (``True`` when that cannot be told)."""
    if pid <= 0:  # kill() would signal a process group: treat as unknown, i.e. alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists under another user
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    name = re.escape(path.name)
    ours = re.compile(rf"\.{name}\.(?P<host>[A-Za-z0-9-]*)-(?P<pid>\d+)\.[a-z0-9_]+\.tmp")
    legacy = re.compile(rf"\.{name}\.[a-z0-9_]{{8}}\.tmp")
    host, now = host_name(), time.time()
    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
        for entry in entries:
            match = ours.fullmatch(entry.name)
            if match is None and legacy.fullmatch(entry.name) is None:
                continue
            with contextlib.suppress(OSError):  # gone already, or not ours to remove
                if not entry.is_file(follow_symlinks=False):
                    continue
                age = now - entry.stat(follow_symlinks=False).st_mtime
                checkable = match is not None and match["host"] == host and os.name == "posix"
                if checkable:
                    stale = age >= _STALE_SECONDS and not process_exists(int(match["pid"]))
                else:
                    stale = age >= _UNCHECKED_STALE_SECONDS
                if stale:
                    os.unlink(entry.path)


def _create_temporary(path: Path) -> tuple[int, Path]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for flag in ("O_NOFOLLOW", "O_CLOEXEC", "O_BINARY"):
        flags |= getattr(os, flag, 0)
    tag = f"{host_name()}-{os.getpid()}"
    for _ in range(100):
        temporary = path.parent / f".{path.name}.{tag}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(temporary, flags, _TEMPORARY_MODE), temporary
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: no free temporary file name in {path.parent}")


def _os_error(error: BaseException) -> OSError | None:
    """The ``OSError`` behind a failed write: ``error`` itself, or the one torch.save's zip
    writer turns into ``RuntimeError("... unexpected pos ...")`` (kept as its context)."""
    if isinstance(error, OSError):
        return error
    if isinstance(error, RuntimeError) and isinstance(error.__context__, OSError):
        return error.__context__
    return None


def _write_error(path: Path, error: OSError) -> OSError:
    if error.errno == errno.ENOSPC:
        reason = "the disk is full"
    elif error.errno == getattr(errno, "EDQUOT", None):
        reason = "the disk quota is exceeded"
    else:
        reason = "the write failed"
    detail = (error.strerror or str(error) or type(error).__name__).splitlines()[0]
    message = f"cannot write {path}: {reason} ({detail}); the file there, if any, is unchanged"
    return OSError(error.errno, message) if error.errno is not None else OSError(message)


def atomic_write(path: str | os.PathLike[str], write: Any) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, then
    ``os.replace`` it onto ``path`` and fsync the directory. Returns ``Path(path)``.

    The file gets the permissions ``open(path, "w")`` gives a new file: ``0o666`` less the
    umask (an existing target's permissions are not carried over).

    If writing fails with an ``OSError`` (a full disk: ``ENOSPC`` from a write, the flush or
    the fsync), the temporary file is removed, whatever was at ``path`` is left as it was, and
    an ``OSError`` with the same ``errno`` is raised whose one-line message names ``path`` and
    says what failed ("the disk is full"); the original error is its ``__cause__``. Other
    exceptions from ``write`` propagate unchanged (after the same clean-up).

    The temporary file is ``.NAME.HOST-PID.RANDOM.tmp``. Temporaries of the same target left
    by writers that died mid-write are removed first: those of a process on this machine that
    no longer exists, once untouched for a minute; those whose writer cannot be checked
    (another machine, or names from before the pid was recorded), once untouched for an hour.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        fd, temporary = _create_temporary(path)
    except OSError as error:
        raise _write_error(path, error) from error
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        cause = _os_error(error)
        if cause is None:
            raise
        raise _write_error(path, cause) from error
    with contextlib.suppress(OSError):  # not every platform can open a directory
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    return path


@contextlib.contextmanager
def process_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the lock file ``path`` (created holding ``"HOST PID"``) until the block ends.
    Raises :class:`LockedError` when another live process holds it; a lock left by a
    process of this machine that no longer runs (killed) is taken over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _TEMPORARY_MODE)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                holder = path.read_text().strip()
                host, _, pid = holder.partition(" ")
                if not (host == host_name() and pid.isdigit() and not process_exists(int(pid))):
                    raise LockedError(path, holder) from None
                path.unlink()  # its holder was killed: stale
            continue
        with os.fdopen(handle, "w") as file:
            file.write(f"{host_name()} {os.getpid()}")
        break
    else:
        raise LockedError(path, "")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
