"""Checkpoints: everything needed to resume, written atomically.

A checkpoint is one ``torch.save`` file holding a dict of tensors and plain values (loaded
back with ``weights_only=True``: no code is unpickled):

- ``state``: the :class:`TrainState` (meta-parameters, optimizer state, buffers),
- ``step``, ``epoch``: how far training got,
- ``generators``: ``{name: torch.Generator state}`` (e.g. the task source's generator),
- ``config``: the run's configuration (JSON-like: numbers, strings, lists, dicts),
- ``extra``: anything else of those types (``fit`` keeps its loop state and the best
  parameters there).

and, since format version 2, ``sha256``: a SHA-256 digest of all the other entries (every
tensor's dtype, shape and bytes and every plain value, in the order they are stored),
checked by :func:`load_checkpoint`, so a flipped bit anywhere in the data is an error rather
than silently different weights. Version-1 files (written before the digest existed) still
load, unverified.

Writing goes to a temporary file in the target's directory, which is flushed, ``fsync``-ed
and then renamed over the target with ``os.replace`` (atomic on POSIX and Windows), and
the directory is ``fsync``-ed: a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from functional_meta.steps import TrainState

__all__ = [
    "FORMAT",
    "VERSION",
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "save_checkpoint",
]

FORMAT = "functional_meta.checkpoint"
VERSION = 2  # 2: the payload carries a SHA-256 digest ("sha256"); 1: no digest
_READABLE_VERSIONS = (1, 2)
_DIGEST_KEY = "sha256"


class CheckpointError(ValueError):
    """A file is not a readable functional_meta checkpoint (truncated, corrupt or foreign)."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns (see the module docstring for the fields)."""

    state: TrainState
    step: int = 0
    epoch: int = 0
    generators: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def restore_generator(self, generator: torch.Generator, name: str = "tasks") -> torch.Generator:
        """Set ``generator`` to the saved state ``name`` and return it."""
        if name not in self.generators:
            raise KeyError(
                f"name: the checkpoint has no generator {name!r}; it has {sorted(self.generators)}"
            )
        generator.set_state(self.generators[name])
        return generator


def _state_dict(state: TrainState) -> dict[str, Any]:
    if not isinstance(state, TrainState):
        raise TypeError(f"state: expected a TrainState, got {type(state).__name__}")
    return {
        "meta_params": state.meta_params,
        "opt_state": state.opt_state,
        "buffers": state.buffers,
    }


def _train_state(saved: dict[str, Any]) -> TrainState:
    return TrainState(saved["meta_params"], saved["opt_state"], saved["buffers"])


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, TrainState):
        return {"__train_state__": _to_cpu(_state_dict(value))}
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _from_saved(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__train_state__"}:
            return _train_state(_from_saved(value["__train_state__"]))
        return {k: _from_saved(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_saved(v) for v in value]
    return value


def _digest(payload: dict[str, Any]) -> str:
    """The SHA-256 (hex) of ``payload``: every tensor's dtype, shape and bytes and every plain
    value, walked in stored order, each item tagged with its type and length so that no two
    different payloads feed the same byte stream."""
    hasher = hashlib.sha256()

    def token(tag: str, text: str) -> None:
        data = text.encode()
        hasher.update(f"{tag}{len(data)}:".encode())
        hasher.update(data)

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided or value.is_quantized:
                raise TypeError(f"cannot checksum a {value.layout} {value.dtype} tensor")
            tensor = value.detach().cpu().resolve_conj().resolve_neg().contiguous()
            data = tensor.reshape(-1).view(torch.uint8).numpy()
            token("T", f"{tensor.dtype}{tuple(tensor.shape)}{data.nbytes}")
            hasher.update(data)
        elif isinstance(value, dict):
            token("D", f"{type(value).__qualname__}{len(value)}")
            for key, item in value.items():
                feed(key)
                feed(item)
        elif isinstance(value, list | tuple):
            token("L", f"{type(value).__qualname__}{len(value)}")
            for item in value:
                feed(item)
        elif isinstance(value, set | frozenset):  # iteration order varies between processes
            token("S", f"{type(value).__qualname__}{len(value)}")
            for item in sorted(_digest({"item": item}) for item in value):
                token("s", item)
        elif isinstance(value, str):
            token("U", value)
        else:  # numbers, None, torch.dtype, ...: their repr is exact and stable
            token("V", f"{type(value).__qualname__}:{value!r}")

    feed(payload)
    return hasher.hexdigest()


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


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32]


def _process_exists(pid: int) -> bool:
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
    host, now = _host(), time.time()
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
                    stale = age >= _STALE_SECONDS and not _process_exists(int(match["pid"]))
                else:
                    stale = age >= _UNCHECKED_STALE_SECONDS
                if stale:
                    os.unlink(entry.path)


def _create_temporary(path: Path) -> tuple[int, Path]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for flag in ("O_NOFOLLOW", "O_CLOEXEC", "O_BINARY"):
        flags |= getattr(os, flag, 0)
    tag = f"{_host()}-{os.getpid()}"
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


def save_checkpoint(
    path: str | os.PathLike[str],
    state: TrainState,
    *,
    step: int = 0,
    epoch: int = 0,
    generators: dict[str, torch.Generator] | None = None,
    config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically to ``path`` (parent directories are created).

    Args:
        path: the file to write (e.g. ``run/checkpoints/last.pt``).
        state: the :class:`TrainState` to save (tensors are copied to the CPU).
        step, epoch: training progress (integers >= 0).
        generators: ``{name: torch.Generator}`` whose states are saved.
        config, extra: JSON-like values (numbers, strings, lists, dicts, tensors,
            TrainStates).

    Returns the path written.
    """
    for name, value in (("step", step), ("epoch", epoch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
    generators = generators or {}
    for name, generator in generators.items():
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generators[{name!r}]: expected a torch.Generator, got {type(generator).__name__}"
            )
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "torch": str(torch.__version__),
        "state": _to_cpu(_state_dict(state)),
        "step": step,
        "epoch": epoch,
        "generators": {name: g.get_state() for name, g in generators.items()},
        "config": _to_cpu(dict(config or {})),
        "extra": _to_cpu(dict(extra or {})),
    }
    payload[_DIGEST_KEY] = _digest(payload)
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def _verify(path: Path, payload: dict[str, Any]) -> None:
    stored = payload.get(_DIGEST_KEY)
    if not isinstance(stored, str):
        raise CheckpointError(
            f"checkpoint {path} has no checksum (format version {payload.get('version')} "
            f"stores one in {_DIGEST_KEY!r}): it is corrupt or was altered"
        )
    try:
        actual = _digest({k: v for k, v in payload.items() if k != _DIGEST_KEY})
    except (TypeError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint {path} cannot be checksummed: {error}") from error
    if actual != stored:
        raise CheckpointError(
            f"checkpoint {path}: checksum mismatch, the file is corrupt (its contents hash to "
            f"sha256 {actual[:16]}..., the file records {stored[:16]}...); "
            "use an earlier checkpoint or a copy"
        )


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device | None = "cpu"
) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    The SHA-256 digest stored in the file is recomputed from what was read (every tensor's
    bytes, dtype and shape and every plain value) and must match. Version-1 files, written
    before checkpoints carried a digest, are loaded without this check.

    Raises ``FileNotFoundError`` when ``path`` does not exist and :class:`CheckpointError`
    (a ``ValueError``) naming the file when it is truncated, corrupt (checksum mismatch or
    no checksum), from another program or from a newer format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (or is not a file)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zips fail anywhere in the unpickler (KeyError, ...)
        raise CheckpointError(
            f"checkpoint {path} cannot be read: it is truncated, corrupt or not a torch.save file "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} was not written by functional_meta.save_checkpoint "
            f"(no {FORMAT!r} marker; got a {type(payload).__name__})"
        )
    version = payload.get("version")
    if type(version) is not int or version not in _READABLE_VERSIONS:
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r}; this functional_meta reads "
            f"versions {', '.join(map(str, _READABLE_VERSIONS))}"
        )
    if version >= 2:
        _verify(path, payload)
    try:
        return Checkpoint(
            state=_train_state(payload["state"]),
            step=int(payload["step"]),
            epoch=int(payload["epoch"]),
            generators=dict(payload["generators"]),
            config=_from_saved(payload["config"]),
            extra=_from_saved(payload["extra"]),
            path=path,
        )
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {path} is missing a field: {error}") from error
