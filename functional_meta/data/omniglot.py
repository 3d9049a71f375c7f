"""Omniglot (Lake et al. 2015) from the official release zips, as tensors: the splits.

Reads ``images_background.zip`` (964 characters, 30 alphabets) and
``images_evaluation.zip`` (659 characters, 20 alphabets), decodes the 105×105 one-bit PNGs
once (Pillow: ``pip install 'functional-meta[images]'``), resizes them (default 28×28,
grayscale + Lanczos, so edges are anti-aliased), inverts them so that **ink is 1.0 and
background 0.0**, and caches all 1623 × 20 images as one uint8 tensor file in a cache
directory shared by every run (:mod:`functional_meta.data.omniglot_files`: the zips, the
decoding and the cache). Later calls load the cache (well under a second); a cache whose
key (format version, image size, the zips' sizes and modification times) does not match, or
that cannot be read, is rebuilt.

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

import os
from dataclasses import dataclass

import torch

from functional_meta.data.fewshot import rotate90
from functional_meta.data.omniglot_files import (
    CACHE_ENV_VAR,
    ENV_VAR,
    OMNIGLOT_URLS,
    decoded_release,
    default_cache_dir,
    download_omniglot,
    find_omniglot,
)

__all__ = [
    "CACHE_ENV_VAR",
    "ENV_VAR",
    "OMNIGLOT_URLS",
    "Omniglot",
    "default_cache_dir",
    "download_omniglot",
    "find_omniglot",
    "load_omniglot",
]

SPLITS = ("train", "val", "test", "background", "evaluation")
NUM_TRAIN_CHARACTERS = 1200


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
        cache_dir: where the decoded tensor file goes; default :func:`default_cache_dir`
            (``$FUNCTIONAL_META_CACHE``, else ``$XDG_CACHE_HOME/functional_meta``, else
            ``~/.cache/functional_meta``), shared by every run. A cache that cannot be
            written only warns (decoding then repeats each call).
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

    directory, data = decoded_release(root, image_size, cache_dir, progress)
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
