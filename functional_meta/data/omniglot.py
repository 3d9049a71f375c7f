"""Omniglot (Lake et al. 2015) from the official release zips, as tensors.

Reads ``images_background.zip`` (964 characters, 30 alphabets) and
``images_evaluation.zip`` (659 characters, 20 alphabets), decodes the 105×105 one-bit PNGs
once (Pillow: ``pip install 'functional-meta[images]'``), resizes them (default 28×28,
grayscale + Lanczos, so edges are anti-aliased), inverts them so that **ink is 1.0 and
background 0.0**, and caches all 1623 × 20 images as one uint8 tensor file. Later calls load
the cache (well under a second); a cache whose key (format version, image size, the zips'
names, sizes and modification times) does not match, or that cannot be read, is rebuilt.

Characters are ordered background first, then evaluation, each sorted by alphabet then
character folder name; drawings by file name. Splits (all deterministic, no RNG):

- ``"train"``: the first 1200 characters of that order (the standard 1200 / 423
  protocol of Vinyals et al. 2016 and Finn et al. 2017), minus ``val_characters``;
- ``"val"``: the last ``val_characters`` of those 1200;
- ``"test"``: the remaining 423 characters;
- ``"background"`` / ``"evaluation"``: the release's own 964 / 659 characters.

We take the first 1200 rather than a seeded shuffle: it needs no RNG whose algorithm could
change between library versions, anyone can reproduce it from this paragraph, and the
test characters then come from evaluation alphabets the background set never shows
(all but 4 Gurmukhi characters: the 1200 boundary falls inside that alphabet), which is
the harder, alphabet-level generalisation Omniglot was designed for. Finn et al.'s MAML
code shuffles characters instead (tests share alphabets with training), so accuracies
are not directly comparable to numbers from that split.

Each image keeps its drawer (the ``<drawer>`` of its file name ``<character id>_<drawer>.png``,
1..20) and each class its alphabet, for protocols that need them: Lake et al.'s
within-alphabet one-shot classification with support and query by different drawers
(:mod:`functional_meta.data.within_alphabet`).

With ``rotations=True`` each character becomes 4 classes, rotated by 0, 90, 180, 270°
counter-clockwise (class ``4c + k`` is character ``c`` rotated ``k`` times). That copies the
data 4 times; the cheap equivalent is ``FewShotSampler(..., augment=ROT90)`` on the
unrotated split, which rotates only the drawn classes.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import urllib.request
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from functional_meta.data.fewshot import rotate90

__all__ = [
    "ENV_VAR",
    "OMNIGLOT_URLS",
    "Omniglot",
    "download_omniglot",
    "find_omniglot",
    "load_omniglot",
]

ENV_VAR = "FUNCTIONAL_META_DATA"
ZIPS = ("images_background", "images_evaluation")
OMNIGLOT_URLS = {
    name: f"https://github.com/brendenlake/omniglot/raw/master/python/{name}.zip" for name in ZIPS
}
SPLITS = ("train", "val", "test", "background", "evaluation")
NUM_TRAIN_CHARACTERS = 1200
CACHE_VERSION = 2  # 2: the cache also holds each drawing's drawer index


@dataclass(frozen=True)
class Omniglot:
    """One split of Omniglot as tensors.

    ``images [num_images, 1, S, S]`` float32 in ``[0, 1]`` (ink = 1), ``labels [num_images]``
    long in ``0..num_classes-1``, grouped by class (``per_class`` consecutive images each);
    ``characters``: the ``"alphabet/characterNN"`` name of each character of the split
    (class ``c`` is ``characters[c]``, or ``characters[c // 4]`` rotated ``c % 4`` times
    when ``rotations`` is true).

    ``alphabets [num_classes]`` long: the alphabet of each class, an index into
    ``alphabet_names`` (the split's alphabets, sorted). ``drawers [num_classes, per_class]``
    long: who drew each image, the drawer index ``1..20`` from the release's file names
    ``<character id>_<drawer>.png``; image ``j`` of class ``c`` (``by_class()[c, j]``) was
    drawn by drawer ``drawers[c, j]``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    characters: tuple[str, ...]
    split: str
    rotations: bool
    alphabets: torch.Tensor
    alphabet_names: tuple[str, ...]
    drawers: torch.Tensor

    @property
    def num_classes(self) -> int:
        return len(self.characters) * (4 if self.rotations else 1)

    @property
    def per_class(self) -> int:
        return self.images.shape[0] // max(self.num_classes, 1)

    def by_class(self) -> torch.Tensor:
        """The images as a class-indexed view ``[num_classes, per_class, 1, S, S]``."""
        return self.images.view(self.num_classes, self.per_class, *self.images.shape[1:])


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
            f"Omniglot: ignoring unreadable cache {path} ({error}); rebuilding it", stacklevel=3
        )
        return None


def _save_cache(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(data, handle)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as error:
        warnings.warn(
            f"Omniglot: could not write the cache {path} ({error}); the images will be decoded "
            "again next time. Pass cache_dir= a writable directory.",
            stacklevel=3,
        )


def load_omniglot(
    root: str | os.PathLike[str] | None = None,
    split: str = "train",
    *,
    image_size: int = 28,
    rotations: bool = False,
    val_characters: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
) -> Omniglot:
    """Load one split of Omniglot as tensors (see the module docstring for the splits).

    Args:
        root: directory with ``images_background.zip`` and ``images_evaluation.zip``, or its
            parent with an ``omniglot/`` folder; ``None`` reads ``$FUNCTIONAL_META_DATA``.
        split: ``"train"``, ``"val"``, ``"test"``, ``"background"`` or ``"evaluation"``.
        image_size: side ``S`` of the square output images (105 keeps the originals).
        rotations: make 4 classes per character (0/90/180/270°), as the standard protocol.
        val_characters: how many of the 1200 meta-training characters to hold out as
            ``"val"`` (the last ones); ``"train"`` then excludes them. Pass the same value
            for both splits. Must be > 0 for ``split="val"``.
        cache_dir: where the decoded tensor file goes; default ``<zip directory>/cache``.
            A cache that cannot be written only warns (decoding then repeats each call).
        progress: show a tqdm bar while decoding; ``None``: only if stderr is a terminal.

    Returns:
        :class:`Omniglot` with ``images [C*20, 1, S, S]`` float32 in [0, 1] (ink 1),
        ``labels [C*20]`` long (``C`` classes: characters, ×4 with ``rotations``), each
        class's alphabet ``alphabets [C]`` (indices into ``alphabet_names``) and each image's
        drawer ``drawers [C, 20]`` (1..20, from the file names).
    """
    where = "load_omniglot"
    if split not in SPLITS:
        raise ValueError(f"{where}: split must be one of {SPLITS}, got {split!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"{where}: image_size must be a positive int, got {image_size!r}")
    if isinstance(val_characters, bool) or not isinstance(val_characters, int):
        raise TypeError(
            f"{where}: val_characters must be an int, got {type(val_characters).__name__}"
        )
    if not 0 <= val_characters < NUM_TRAIN_CHARACTERS:
        raise ValueError(
            f"{where}: val_characters must be in [0, {NUM_TRAIN_CHARACTERS}), got {val_characters}"
        )
    if split == "val" and val_characters == 0:
        raise ValueError(
            f"{where}: split='val' needs val_characters > 0 (e.g. 100); pass the same value when "
            "loading 'train' so that the two do not overlap"
        )
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"{where}: progress must be a bool or None, got {type(progress).__name__}")

    directory = find_omniglot(root)
    cache_path = Path(cache_dir).expanduser() if cache_dir is not None else directory / "cache"
    cache_path = cache_path / f"omniglot_{image_size}.pt"
    key = _cache_key(directory, image_size)
    data = _load_cache(cache_path, key)
    if data is None:
        data = _decode_all(directory, image_size, progress)
        data["key"] = key
        _save_cache(cache_path, data)

    images, characters = data["images"], list(data["characters"])
    background, evaluation = data["counts"]
    total = background + evaluation
    if split in ("train", "val", "test") and total <= NUM_TRAIN_CHARACTERS:
        raise ValueError(
            f"{where}: split={split!r} needs the full release (1623 characters, 1200 for training); "
            f"{directory} holds {total}"
        )
    train_end = NUM_TRAIN_CHARACTERS - val_characters
    selection = {
        "train": slice(0, train_end),
        "val": slice(train_end, NUM_TRAIN_CHARACTERS),
        "test": slice(NUM_TRAIN_CHARACTERS, total),
        "background": slice(0, background),
        "evaluation": slice(background, total),
    }[split]
    chosen = images[selection]  # [C, 20, S, S] uint8
    drawers = data["drawers"][selection]  # [C, 20]
    alphabet_of = [name.split("/")[0] for name in characters[selection]]
    alphabet_names = tuple(sorted(set(alphabet_of)))
    alphabets = torch.tensor([alphabet_names.index(a) for a in alphabet_of], dtype=torch.long)
    if rotations:
        turns = torch.arange(4).repeat(chosen.shape[0])
        chosen = rotate90(chosen.repeat_interleave(4, dim=0), turns)  # [4C, 20, S, S]
        drawers = drawers.repeat_interleave(4, dim=0)
        alphabets = alphabets.repeat_interleave(4)
    num_classes, per_class = chosen.shape[:2]
    out = chosen.reshape(-1, 1, image_size, image_size).to(torch.float32).div_(255.0)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return Omniglot(
        out,
        labels,
        tuple(characters[selection]),
        split,
        rotations,
        alphabets=alphabets,
        alphabet_names=alphabet_names,
        drawers=drawers.clone(),
    )


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
