"""The Omniglot release files (Lake et al. 2015): finding and downloading the two zips,
decoding their PNGs into one uint8 tensor, and the cache of that tensor.

The decoded images are cached as one file per image size and release,
``omniglot_<size>_<key digest>.pt``, in ``cache_dir``: by default one directory shared by
every run, :func:`default_cache_dir` (``$FUNCTIONAL_META_CACHE``, else
``$XDG_CACHE_HOME/functional_meta``, else ``~/.cache/functional_meta``). The key (format
version, image size and resize method, each zip's size and modification time) is stored in
the file and checked on load; a cache that does not match it or cannot be read is rebuilt.
Files are written atomically (a temporary file renamed into place), so runs that decode at
the same time each leave a complete file and a reader never sees a partial one.
:mod:`functional_meta.data.omniglot` turns the decoded release into splits.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
import urllib.request
import warnings
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CACHE_ENV_VAR",
    "ENV_VAR",
    "OMNIGLOT_URLS",
    "decoded_release",
    "default_cache_dir",
    "download_omniglot",
    "find_omniglot",
]

ENV_VAR = "FUNCTIONAL_META_DATA"
CACHE_ENV_VAR = "FUNCTIONAL_META_CACHE"
ZIPS = ("images_background", "images_evaluation")
OMNIGLOT_URLS = {
    name: f"https://github.com/brendenlake/omniglot/raw/master/python/{name}.zip" for name in ZIPS
}
CACHE_VERSION = 2  # 2: the cache also holds each drawing's drawer index


def default_cache_dir() -> Path:
    """The cache directory shared by every run: ``$FUNCTIONAL_META_CACHE``, else
    ``$XDG_CACHE_HOME/functional_meta`` (an absolute ``XDG_CACHE_HOME`` only, as the XDG
    specification says), else ``~/.cache/functional_meta``."""
    chosen = os.environ.get(CACHE_ENV_VAR)
    if chosen:
        return Path(chosen).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "functional_meta"


def find_omniglot(root: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding the two Omniglot zips.

    ``root`` (or, when ``None``, the environment variable ``FUNCTIONAL_META_DATA``) may be
    that directory itself or its parent with an ``omniglot/`` folder; checked in that
    order. Raises ``FileNotFoundError`` naming the paths tried.
    """
    if root is None:
        env = os.environ.get(ENV_VAR)
        if not env:
            raise FileNotFoundError(
                f"Omniglot: no data directory given; pass root=... or set {ENV_VAR} to a directory "
                f"holding {ZIPS[0]}.zip and {ZIPS[1]}.zip (or an omniglot/ folder with them)"
            )
        root = env
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"Omniglot: root must be a path, got {type(root).__name__}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"Omniglot: data directory {root} does not exist (or is not a directory)"
        )
    for candidate in (root, root / "omniglot"):
        if any((candidate / f"{name}.zip").is_file() for name in ZIPS):
            for name in ZIPS:
                if not (candidate / f"{name}.zip").is_file():
                    raise FileNotFoundError(
                        f"Omniglot: {candidate / f'{name}.zip'} is missing; expected both {ZIPS[0]}.zip "
                        f"and {ZIPS[1]}.zip in {candidate} (download_omniglot() fetches them)"
                    )
            return candidate
    raise FileNotFoundError(
        f"Omniglot: neither {root} nor {root / 'omniglot'} holds {ZIPS[0]}.zip / {ZIPS[1]}.zip "
        "(download_omniglot(root) fetches them)"
    )


def _cache_key(directory: Path, image_size: int) -> dict:
    files = {}
    for name in ZIPS:
        stat = (directory / f"{name}.zip").stat()
        files[name] = [stat.st_size, stat.st_mtime_ns]
    return {
        "version": CACHE_VERSION,
        "image_size": image_size,
        "resample": "L+lanczos+invert",
        "zips": files,
    }


def _drawer(filename: str, path: Path, entry: str) -> int:
    """The drawer index of a drawing file ``<character id>_<drawer>.png``."""
    _, sep, drawer = filename[: -len(".png")].rpartition("_")
    if not sep or not drawer.isdigit():
        raise ValueError(
            f"Omniglot: cannot read the drawer of {entry!r} in {path}; expected drawings named "
            "<character id>_<drawer>.png, as in the official release (e.g. 0965_01.png)"
        )
    return int(drawer)


def _read_zip(path: Path, top: str) -> tuple[list[str], list[list[bytes]], list[list[int]]]:
    """``(["alphabet/characterNN", ...], [[png bytes per drawing], ...], [[drawer per
    drawing], ...])``, characters and drawings in sorted order."""
    characters: dict[str, dict[str, bytes]] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.is_dir():
                    continue
                parts = info.filename.split("/")
                if parts[-1].startswith(".") or parts[0] == "__MACOSX":
                    continue
                if len(parts) != 4 or parts[0] != top or not parts[3].lower().endswith(".png"):
                    raise ValueError(
                        f"Omniglot: unexpected entry {info.filename!r} in {path}; expected "
                        f"{top}/<alphabet>/<character>/<drawing>.png"
                    )
                characters.setdefault(f"{parts[1]}/{parts[2]}", {})[parts[3]] = archive.read(info)
    except zipfile.BadZipFile as error:
        raise ValueError(
            f"Omniglot: {path} is not a readable zip file ({error}); re-download it"
        ) from error
    if not characters:
        raise ValueError(
            f"Omniglot: {path} holds no {top}/<alphabet>/<character>/<drawing>.png files"
        )
    names = sorted(characters)
    drawers = []
    for name in names:
        files = sorted(characters[name])
        row = [_drawer(f, path, f"{top}/{name}/{f}") for f in files]
        if len(set(row)) != len(row):
            repeated = sorted({d for d in row if row.count(d) > 1})
            raise ValueError(
                f"Omniglot: character {name} in {path} has several drawings by drawer(s) "
                f"{repeated}; expected one drawing per drawer"
            )
        drawers.append(row)
    return names, [[characters[n][f] for f in sorted(characters[n])] for n in names], drawers


def _decode_all(directory: Path, image_size: int, progress: bool | None) -> dict:
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(
            "Omniglot: decoding the PNGs needs Pillow; install it with "
            "pip install 'functional-meta[images]' (or pip install pillow)"
        ) from error
    characters: list[str] = []
    drawings: list[list[bytes]] = []
    drawers: list[list[int]] = []
    counts = []
    for name in ZIPS:
        names, pngs, who = _read_zip(directory / f"{name}.zip", name)
        characters += names
        drawings += pngs
        drawers += who
        counts.append(len(names))
    per_character = Counter(len(pngs) for pngs in drawings).most_common(1)[0][0]
    for name, pngs in zip(characters, drawings, strict=True):
        if len(pngs) != per_character:
            raise ValueError(
                f"Omniglot: character {name} in {directory} has {len(pngs)} drawings; expected "
                f"{per_character} like the others (20 in the official release)"
            )
    if progress is None:
        progress = sys.stderr.isatty()
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(characters) * per_character, desc="decoding Omniglot", unit="img")
        except ImportError:
            bar = None
    pixels = image_size * image_size
    buffer = bytearray(len(characters) * per_character * pixels)
    resample = Image.Resampling.LANCZOS
    try:
        i = 0
        for name, pngs in zip(characters, drawings, strict=True):
            for png in pngs:
                try:
                    with Image.open(io.BytesIO(png)) as image:
                        gray = image.convert("L")
                except Exception as error:
                    raise ValueError(
                        f"Omniglot: cannot decode a drawing of {name} in {directory}: {error}"
                    ) from error
                if gray.size != (image_size, image_size):
                    gray = gray.resize((image_size, image_size), resample=resample)
                buffer[i * pixels : (i + 1) * pixels] = gray.tobytes()
                i += 1
            if bar is not None:
                bar.update(len(pngs))
    finally:
        if bar is not None:
            bar.close()
    out = torch.frombuffer(buffer, dtype=torch.uint8).view(
        len(characters), per_character, image_size, image_size
    )
    out = 255 - out  # ink (black, 0 in the PNGs) becomes 255
    return {
        "images": out,
        "characters": characters,
        "counts": counts,
        "drawers": torch.tensor(drawers, dtype=torch.long),
    }


def _load_cache(path: Path, key: dict) -> dict | None:
    try:
        cached = torch.load(path, weights_only=True)
        if cached["key"] != key:
            return None
        images, characters, counts = cached["images"], cached["characters"], cached["counts"]
        drawers = cached["drawers"]
        if (
            not isinstance(images, torch.Tensor)
            or images.dtype != torch.uint8
            or images.dim() != 4
            or images.shape[0] != len(characters)
            or sum(counts) != len(characters)
            or not isinstance(drawers, torch.Tensor)
            or drawers.dtype != torch.long
            or drawers.shape != images.shape[:2]
        ):
            return None
        return cached
    except (FileNotFoundError, NotADirectoryError):
        return None
    except Exception as error:  # corrupt, truncated, or from another format: rebuild
        warnings.warn(
            f"Omniglot: ignoring unreadable cache {path} ({error}); rebuilding it", stacklevel=4
        )
        return None


def _save_cache(path: Path, data: dict) -> None:
    from functional_meta.checkpoint import atomic_write

    try:
        atomic_write(path, lambda handle: torch.save(data, handle))
    except OSError as error:
        warnings.warn(
            f"Omniglot: could not write the cache {path} ({error}); the images will be decoded "
            f"again next time. Pass cache_dir= a writable directory (or set {CACHE_ENV_VAR}).",
            stacklevel=4,
        )


def decoded_release(
    root: str | os.PathLike[str] | None,
    image_size: int,
    cache_dir: str | os.PathLike[str] | None,
    progress: bool | None,
) -> tuple[Path, dict[str, Any]]:
    """``(zip directory, decoded)``: the release found from ``root`` (:func:`find_omniglot`),
    decoded at ``image_size`` or loaded from the cache in ``cache_dir`` (``None``:
    :func:`default_cache_dir`). ``decoded``: ``images [characters, drawings, S, S]`` uint8
    (ink 255), ``characters`` (``"alphabet/characterNN"``, background then evaluation),
    ``counts`` (characters per zip), ``drawers [characters, drawings]`` long, ``key``."""
    directory = find_omniglot(root)
    key = _cache_key(directory, image_size)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_path = folder / f"omniglot_{image_size}_{digest}.pt"
    data = _load_cache(cache_path, key)
    if data is None:
        data = _decode_all(directory, image_size, progress)
        data["key"] = key
        _save_cache(cache_path, data)
    return directory, data


def download_omniglot(root: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Download the two official zips into ``root`` (created if needed) and return it.

    Fetches :data:`OMNIGLOT_URLS` (about 14 MB); each file is written to a temporary name
    and renamed when complete. Existing files are kept unless ``overwrite``. Needs internet
    access; pass the returned directory to :func:`load_omniglot`.
    """
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"download_omniglot: root must be a path, got {type(root).__name__}")
    directory = Path(root).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    for name, url in OMNIGLOT_URLS.items():
        target = directory / f"{name}.zip"
        if target.exists() and not overwrite:
            continue
        fd, tmp = tempfile.mkstemp(prefix=target.name, suffix=".part", dir=directory)
        try:
            with os.fdopen(fd, "wb") as handle, urllib.request.urlopen(url, timeout=60) as response:
                while chunk := response.read(1 << 20):
                    handle.write(chunk)
            with zipfile.ZipFile(tmp) as archive:
                if archive.testzip() is not None:
                    raise ValueError(f"download_omniglot: {url} downloaded corrupt; try again")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return directory
