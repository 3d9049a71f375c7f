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

Writing goes through :func:`functional_meta.files.atomic_write`: a temporary file in the
target's directory, flushed, ``fsync``-ed and renamed over the target with ``os.replace``
(atomic on POSIX and Windows), then the directory ``fsync``-ed: a crash mid-write leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import collections
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from functional_meta.files import atomic_write
from functional_meta.steps import TrainState

__all__ = [
    "FORMAT",
    "VERSION",
    "Checkpoint",
    "CheckpointError",
    "atomic_write",
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


# What torch.load(weights_only=True) reads back (besides tensors and these containers).
_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _check_storable(value: Any, where: str) -> None:
    """Refuse, before anything is written, a value that ``torch.save`` would store but
    ``load_checkpoint`` (``weights_only=True``) could not read back: a ``Path``, a NumPy
    number, any other object. Such a checkpoint would only fail when it is needed."""
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN:  # exact: not np.float64
        return
    if type(value) in (dict, collections.OrderedDict):
        for key, item in value.items():
            _check_storable(key, f"{where} key {key!r}")
            _check_storable(item, f"{where}[{key!r}]")
    elif type(value) in (list, tuple, set, frozenset):
        for index, item in enumerate(value):
            _check_storable(item, f"{where}[{index}]")
    else:
        raise TypeError(
            f"{where}: a {type(value).__module__}.{type(value).__qualname__} cannot be stored in "
            "a checkpoint (it would not load back with weights_only=True); use a str, number, "
            "bool, None, tensor, list or dict"
        )


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
    for name in ("config", "extra"):
        _check_storable(payload[name], name)
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
