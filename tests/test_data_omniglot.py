"""Omniglot loader: the real release files (decoded once per session into a tmp cache) and
small synthetic zips for the cache logic and the error messages."""

import io
import os
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from functional_meta.data import (
    FewShotSampler,
    Omniglot,
    find_omniglot,
    load_omniglot,
    omniglot_files,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data" / "omniglot"
HAVE_DATA = all((DATA / f"images_{n}.zip").is_file() for n in ("background", "evaluation"))
needs_data = pytest.mark.skipif(
    not HAVE_DATA, reason=f"Omniglot zips not found in {DATA.resolve()} (see docs/data.md)"
)
Image = pytest.importorskip("PIL.Image", reason="Pillow (the 'images' extra) decodes the PNGs")


@pytest.fixture(scope="session")
def omniglot_cache(tmp_path_factory):
    """Decode the real release once per session, into a temporary cache directory."""
    cache = tmp_path_factory.mktemp("omniglot_cache")
    load_omniglot(DATA, "background", cache_dir=cache, progress=False)
    return cache


def cache_file(cache, size):
    """The newest cache file of that image size (one per size and release)."""
    return max(cache.glob(f"omniglot_{size}_*.pt"), key=lambda p: p.stat().st_mtime_ns)


def load(cache, split, **kwargs):
    return load_omniglot(DATA, split, cache_dir=cache, progress=False, **kwargs)


@needs_data
def test_background_and_evaluation_sets(omniglot_cache):
    sizes = {}
    for split, characters in (("background", 964), ("evaluation", 659)):
        data = load(omniglot_cache, split)
        assert isinstance(data, Omniglot)
        assert len(data.characters) == data.num_classes == characters
        assert data.images.shape == (characters * 20, 1, 28, 28)
        assert data.images.dtype == torch.float32 and data.labels.dtype == torch.long
        assert torch.equal(torch.bincount(data.labels), torch.full((characters,), 20))
        assert torch.equal(data.labels, torch.arange(characters).repeat_interleave(20))
        assert data.images.min() == 0.0 and data.images.max() == 1.0
        assert 0.03 < float(data.images.mean()) < 0.25  # ink = 1 is the minority
        assert data.by_class().shape == (characters, 20, 1, 28, 28)
        sizes[split] = len({c.split("/")[0] for c in data.characters})
    assert sizes == {"background": 30, "evaluation": 20}


@needs_data
def test_pixels_match_a_direct_decode(omniglot_cache):
    data = load(omniglot_cache, "evaluation")
    with zipfile.ZipFile(DATA / "images_evaluation.zip") as archive:
        names = sorted(
            n
            for n in archive.namelist()
            if n.startswith(f"images_evaluation/{data.characters[7]}/")
        )
        png = archive.read(names[3])
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (105, 105)
        expected = image.convert("L").resize((28, 28), Image.Resampling.LANCZOS)
    torch.testing.assert_close(data.images[7 * 20 + 3], to_ink(expected))


def to_ink(image):
    """A Pillow 'L' image as ``[1, H, W]`` float with ink = 1."""
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).to(torch.float32)
    return 1.0 - pixels.view(1, image.size[1], image.size[0]) / 255.0


@needs_data
def test_standard_split_is_1200_and_423_disjoint_characters(omniglot_cache):
    train, test = load(omniglot_cache, "train"), load(omniglot_cache, "test")
    background, evaluation = load(omniglot_cache, "background"), load(omniglot_cache, "evaluation")
    assert len(train.characters) == 1200 and len(test.characters) == 423
    assert not set(train.characters) & set(test.characters)
    assert train.characters + test.characters == background.characters + evaluation.characters
    assert train.characters[:964] == background.characters  # background first, then evaluation
    assert train.characters == tuple(sorted(train.characters[:964])) + tuple(
        sorted(train.characters[964:])
    )
    assert torch.equal(train.images[: 964 * 20], background.images)
    val = load(omniglot_cache, "val", val_characters=100)
    small_train = load(omniglot_cache, "train", val_characters=100)
    assert len(val.characters) == 100 and len(small_train.characters) == 1100
    assert small_train.characters + val.characters == train.characters
    assert again_equal(load(omniglot_cache, "test"), test)


def again_equal(a, b):
    return (
        a.characters == b.characters
        and torch.equal(a.images, b.images)
        and torch.equal(a.labels, b.labels)
    )


@needs_data
def test_rotation_classes_are_real_rotations(omniglot_cache):
    plain = load(omniglot_cache, "test")
    rotated = load(omniglot_cache, "test", rotations=True)
    assert rotated.num_classes == 4 * 423 and rotated.images.shape == (4 * 423 * 20, 1, 28, 28)
    by_class = rotated.by_class()
    assert torch.equal(by_class[0::4], plain.by_class())
    for k in (1, 2, 3):
        assert torch.equal(by_class[k::4], torch.rot90(plain.by_class(), k, dims=(-2, -1)))
        assert not torch.equal(by_class[k::4], by_class[0::4])
    # Independent of our code: rotate the 105x105 PNG with Pillow (counter-clockwise),
    # then resize; resampling order makes only rounding-level differences.
    with zipfile.ZipFile(DATA / "images_evaluation.zip") as archive:
        character = plain.characters[10]
        name = sorted(n for n in archive.namelist() if f"/{character}/" in n)[0]
        png = archive.read(name)
    with Image.open(io.BytesIO(png)) as image:
        pil = image.convert("L").rotate(90).resize((28, 28), Image.Resampling.LANCZOS)
    pil = to_ink(pil)
    # Pillow resizes in two uint8 passes (rows, then columns), so rotating before or after
    # the resize differs by rounding and clipping: small on average, a few levels at most.
    close = (by_class[10 * 4 + 1, 0] - pil).abs()
    assert close.mean() < 0.005 and close.max() < 0.15
    assert (by_class[10 * 4 + 3, 0] - pil).abs().mean() > 10 * close.mean()  # direction matters


@needs_data
def test_alphabets_and_drawers_match_the_zip_names(omniglot_cache):
    for split, alphabets in (("background", 30), ("evaluation", 20)):
        data = load(omniglot_cache, split)
        assert len(data.alphabet_names) == alphabets
        assert data.alphabet_names == tuple(sorted({c.split("/")[0] for c in data.characters}))
        assert data.alphabets.shape == (len(data.characters),)
        assert data.alphabets.dtype == data.drawers.dtype == torch.long
        for c in (0, 5, len(data.characters) - 1):
            alphabet = data.alphabet_names[int(data.alphabets[c])]
            assert data.characters[c].split("/")[0] == alphabet
        # Every character: one drawing by each of the 20 drawers, in file-name order.
        assert data.drawers.shape == (len(data.characters), 20)
        assert torch.equal(data.drawers, torch.arange(1, 21).expand_as(data.drawers))
    with zipfile.ZipFile(DATA / "images_evaluation.zip") as archive:
        names = sorted(n for n in archive.namelist() if f"/{data.characters[3]}/" in n)
    assert [int(n[-6:-4]) for n in names] == data.drawers[3].tolist()
    rotated = load(omniglot_cache, "evaluation", rotations=True)
    assert torch.equal(rotated.alphabets, data.alphabets.repeat_interleave(4))
    assert torch.equal(rotated.drawers, data.drawers.repeat_interleave(4, dim=0))
    assert rotated.alphabet_names == data.alphabet_names


@needs_data
def test_sampler_on_the_real_split(omniglot_cache):
    from functional_meta.data import ROT90

    train = load(omniglot_cache, "train")
    sampler = FewShotSampler(train.images, train.labels, ways=5, shots=1, queries=15, augment=ROT90)
    assert sampler.num_classes == 4800
    batch = sampler.sample(32, 0)
    assert batch.support_x.shape == (32, 5, 1, 28, 28) and batch.query_y.shape == (32, 75)


@needs_data
def test_lake_protocol_on_the_real_sets(omniglot_cache):
    from functional_meta.data import WithinAlphabetSampler, within_alphabet_tasks

    evaluation = load(omniglot_cache, "evaluation")
    sampler = WithinAlphabetSampler.from_omniglot(evaluation, ways=20, shots=1, queries=1)
    with zipfile.ZipFile(DATA / "images_evaluation.zip") as archive:
        in_zip = {n.split("/")[1] for n in archive.namelist() if n.endswith(".png")}
    names = {sampler.alphabet_names[a] for a in sampler.alphabets}
    assert len(in_zip) == 20 and names == in_zip and sampler.skipped_alphabets == ()
    assert sampler.drawers == tuple(range(1, 21))
    assert (sampler.support_drawers, sampler.query_drawers) == (1, 19)

    tasks = within_alphabet_tasks(sampler, tasks_per_alphabet=2, seed=0, batch_size=16)
    assert tasks.num_tasks == 40 and len(tasks) == 3
    batch = tasks[0]
    assert batch.support_x.shape == (16, 20, 1, 28, 28) and batch.query_x.shape == (
        16,
        20,
        1,
        28,
        28,
    )
    assert batch.support_y.shape == batch.query_y.shape == (16, 20)
    alphabets = sampler.task_alphabets(tasks.classes)
    assert torch.all(alphabets == alphabets[:, :1])
    assert alphabets[:, 0].tolist() == [a for a in sampler.alphabets for _ in range(2)]
    drawers = sampler.example_drawers(tasks.examples)  # [40, 20, 2]: support, query
    assert torch.equal(drawers, evaluation.drawers.reshape(-1)[tasks.examples])
    for t in range(40):
        assert len(set(drawers[t, :, 0].tolist())) == 1  # the support set: one drawer
        assert not set(drawers[t, :, 0].tolist()) & set(drawers[t, :, 1].tolist())
    # The images are the drawings of those characters by those drawers.
    assert torch.equal(batch.support_x, evaluation.images[tasks.examples[:16, :, 0]])
    assert torch.equal(batch.query_x, evaluation.images[tasks.examples[:16, :, 1]])
    assert torch.equal(tasks.examples // 20, tasks.classes[..., None].expand(-1, -1, 2))
    again = within_alphabet_tasks(sampler, tasks_per_alphabet=2, seed=0, batch_size=40)[0]
    assert torch.equal(again.query_x[:16], batch.query_x)

    background = load(omniglot_cache, "background")
    train = WithinAlphabetSampler.from_omniglot(background, ways=20, shots=1, queries=5)
    assert len(train.alphabets) == 26
    assert {background.alphabet_names[a] for a in train.skipped_alphabets} == {
        "Blackfoot_(Canadian_Aboriginal_Syllabics)",
        "Inuktitut_(Canadian_Aboriginal_Syllabics)",
        "Ojibwe_(Canadian_Aboriginal_Syllabics)",
        "Tagalog",
    }  # 14, 16, 14 and 17 characters
    assert train.sample(4, 0).query_x.shape == (4, 100, 1, 28, 28)


@needs_data
def test_environment_variable_and_parent_directory(monkeypatch):
    monkeypatch.setenv("FUNCTIONAL_META_DATA", str(DATA.parent))
    assert find_omniglot().resolve() == DATA.resolve()
    assert find_omniglot(DATA).resolve() == DATA.resolve()
    monkeypatch.delenv("FUNCTIONAL_META_DATA")
    with pytest.raises(FileNotFoundError, match="FUNCTIONAL_META_DATA"):
        find_omniglot()


# --- small synthetic release: cache logic and errors -------------------------------------


def png_bytes(seed, size=12):
    g = torch.Generator().manual_seed(seed)
    bits = (torch.rand(size, size, generator=g) > 0.2).to(torch.uint8) * 255
    image = Image.frombytes("L", (size, size), bytes(bits.flatten().tolist())).convert("1")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_release(directory, alphabets=("Beta", "Alpha"), characters=2, drawings=3, extra=None):
    directory.mkdir(parents=True, exist_ok=True)
    seed = 0
    for top in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(directory / f"{top}.zip", "w") as archive:
            for alphabet in alphabets:
                for c in range(characters, 0, -1):
                    for d in range(1, drawings + 1):
                        seed += 1
                        archive.writestr(
                            f"{top}/{alphabet}/character{c:02d}/{seed:04d}_{d:02d}.png",
                            png_bytes(seed),
                        )
            if extra and top == "images_background":
                archive.writestr(extra, b"x")
    return directory


def test_synthetic_release_order_cache_reuse_and_rebuild(tmp_path, monkeypatch):
    data_dir = write_release(tmp_path / "omniglot")
    cache = tmp_path / "cache"
    first = load_omniglot(tmp_path, "background", image_size=8, cache_dir=cache, progress=False)
    assert first.characters == (
        "Alpha/character01",
        "Alpha/character02",
        "Beta/character01",
        "Beta/character02",
    )
    assert first.images.shape == (12, 1, 8, 8)
    assert [p.name for p in cache.iterdir()] == [cache_file(cache, 8).name]
    assert not [
        p for p in cache.iterdir() if p.suffix == ".tmp"
    ]  # atomic write left no temporaries
    assert load_omniglot(data_dir, "evaluation", image_size=8, cache_dir=cache).num_classes == 4

    calls = []
    real_decode = omniglot_files._decode_all
    monkeypatch.setattr(
        omniglot_files, "_decode_all", lambda *a: calls.append(a) or real_decode(*a)
    )
    again = load_omniglot(tmp_path, "background", image_size=8, cache_dir=cache)
    assert calls == [] and again_equal(again, first)  # reused

    stat = (data_dir / "images_background.zip").stat()
    os.utime(data_dir / "images_background.zip", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_omniglot(tmp_path, "background", image_size=8, cache_dir=cache)
    assert len(calls) == 1  # stale (source changed): rebuilt
    load_omniglot(tmp_path, "background", image_size=6, cache_dir=cache)
    assert len(calls) == 2  # other size: its own cache file
    load_omniglot(tmp_path, "background", image_size=8, cache_dir=cache)
    assert len(calls) == 2

    cache_file(cache, 8).write_bytes(b"not a tensor file")
    with pytest.warns(UserWarning, match="unreadable cache"):
        rebuilt = load_omniglot(tmp_path, "background", image_size=8, cache_dir=cache)
    assert len(calls) == 3 and again_equal(rebuilt, first)
    load_omniglot(tmp_path, "background", image_size=8, cache_dir=cache)
    assert len(calls) == 3


def test_synthetic_release_drawers_and_alphabets(tmp_path):
    data_dir = write_release(tmp_path, alphabets=("Beta", "Alpha"), characters=2, drawings=3)
    data = load_omniglot(data_dir, "background", image_size=4, cache_dir=tmp_path / "c")
    assert data.alphabet_names == ("Alpha", "Beta")
    assert data.alphabets.tolist() == [0, 0, 1, 1]
    assert data.drawers.tolist() == [[1, 2, 3]] * 4
    assert data.by_class().shape[:2] == data.drawers.shape


def test_old_cache_format_is_rebuilt(tmp_path, monkeypatch):
    data_dir = write_release(tmp_path, alphabets=("A",), characters=1, drawings=2)
    cache = tmp_path / "c"
    first = load_omniglot(data_dir, "background", image_size=4, cache_dir=cache)
    path = cache_file(cache, 4)
    old = torch.load(path, weights_only=True)
    del old["drawers"]
    old["key"]["version"] = 1  # a cache written before drawers were stored
    torch.save(old, path)
    calls = []
    real_decode = omniglot_files._decode_all
    monkeypatch.setattr(
        omniglot_files, "_decode_all", lambda *a: calls.append(a) or real_decode(*a)
    )
    again = load_omniglot(data_dir, "background", image_size=4, cache_dir=cache)
    assert len(calls) == 1 and torch.equal(again.drawers, first.drawers)
    assert "drawers" in torch.load(path, weights_only=True)


def test_one_cache_shared_by_every_run_by_default(tmp_path, monkeypatch):
    """No cache_dir: $FUNCTIONAL_META_CACHE, else $XDG_CACHE_HOME/functional_meta, else
    ~/.cache/functional_meta; a second load (another run) reuses the first one's file."""
    data_dir = write_release(tmp_path / "data", alphabets=("A",), characters=1, drawings=2)
    monkeypatch.delenv("FUNCTIONAL_META_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    first = load_omniglot(data_dir, "evaluation", image_size=4, progress=True)  # tqdm bar, if any
    home_cache = tmp_path / "home" / ".cache" / "functional_meta"
    assert cache_file(home_cache, 4).is_file() and not (data_dir / "cache").exists()
    calls = []
    real_decode = omniglot_files._decode_all
    monkeypatch.setattr(
        omniglot_files, "_decode_all", lambda *a: calls.append(a) or real_decode(*a)
    )
    assert again_equal(load_omniglot(data_dir, "evaluation", image_size=4), first)
    assert calls == []  # decoded once, whatever the run directory

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_omniglot(data_dir, "evaluation", image_size=4)
    assert cache_file(tmp_path / "xdg" / "functional_meta", 4).is_file()
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG rule: absolute only
    assert omniglot_files.default_cache_dir() == home_cache
    monkeypatch.setenv("FUNCTIONAL_META_CACHE", str(tmp_path / "mine"))
    load_omniglot(data_dir, "evaluation", image_size=4)
    assert cache_file(tmp_path / "mine", 4).is_file() and len(calls) == 2


def test_an_interrupted_cache_write_leaves_no_file(tmp_path, monkeypatch):
    """The cache is written to a temporary file and renamed: a write that fails half-way (a
    full disk, a killed run) leaves nothing another run could load half-written."""
    data_dir = write_release(tmp_path / "data", alphabets=("A",), characters=1, drawings=2)
    cache = tmp_path / "cache"

    def half_then_fail(data, handle):
        handle.write(b"PK\x03\x04 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(omniglot_files.torch, "save", half_then_fail)
    with pytest.warns(UserWarning, match="could not write the cache"):
        data = load_omniglot(data_dir, "background", image_size=4, cache_dir=cache)
    assert data.images.shape == (2, 1, 4, 4)
    assert list(cache.iterdir()) == []  # neither a partial cache nor a temporary file
    monkeypatch.undo()
    assert again_equal(load_omniglot(data_dir, "background", image_size=4, cache_dir=cache), data)
    assert len(list(cache.iterdir())) == 1


def test_unwritable_cache_only_warns(tmp_path):
    data_dir = write_release(tmp_path / "d", alphabets=("A",), characters=1, drawings=2)
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should go")
    with pytest.warns(UserWarning, match="could not write the cache"):
        data = load_omniglot(data_dir, "background", image_size=4, cache_dir=blocker)
    assert data.images.shape == (2, 1, 4, 4)


def test_errors_name_the_path_and_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_omniglot(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="images_background.zip"):
        load_omniglot(tmp_path / "empty")

    one = write_release(tmp_path / "one")
    (one / "images_evaluation.zip").unlink()
    with pytest.raises(FileNotFoundError, match=r"images_evaluation\.zip is missing"):
        load_omniglot(one, cache_dir=tmp_path / "c1")

    corrupt = write_release(tmp_path / "corrupt")
    (corrupt / "images_evaluation.zip").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(ValueError, match=r"images_evaluation\.zip is not a readable zip"):
        load_omniglot(corrupt, "background", cache_dir=tmp_path / "c2")

    odd = write_release(tmp_path / "odd", extra="images_background/Alpha/stray.png")
    with pytest.raises(
        ValueError, match=r"unexpected entry 'images_background/Alpha/stray.png'.*<alphabet>"
    ):
        load_omniglot(odd, "background", cache_dir=tmp_path / "c3")

    small = write_release(tmp_path / "small")
    with pytest.raises(ValueError, match="needs the full release"):
        load_omniglot(small, "train", cache_dir=tmp_path / "c4")

    uneven = write_release(tmp_path / "uneven")
    with zipfile.ZipFile(uneven / "images_background.zip", "a") as archive:
        archive.writestr("images_background/Alpha/character01/9999_04.png", png_bytes(99))
    with pytest.raises(ValueError, match="Alpha/character01 .* has 4 drawings; expected 3"):
        load_omniglot(uneven, "background", cache_dir=tmp_path / "c5")

    unnamed = write_release(tmp_path / "unnamed")
    with zipfile.ZipFile(unnamed / "images_background.zip", "a") as archive:
        archive.writestr("images_background/Alpha/character01/extra.png", png_bytes(98))
    with pytest.raises(ValueError, match=r"drawer of .*extra\.png.*<character id>_<drawer>\.png"):
        load_omniglot(unnamed, "background", cache_dir=tmp_path / "c6")

    twice = write_release(tmp_path / "twice")
    with zipfile.ZipFile(twice / "images_background.zip", "a") as archive:
        archive.writestr("images_background/Alpha/character01/9999_01.png", png_bytes(97))
    with pytest.raises(ValueError, match=r"Alpha/character01 .* drawer\(s\) \[1\]"):
        load_omniglot(twice, "background", cache_dir=tmp_path / "c7")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(split="meta-train"), ValueError, "split must be one of"),
        (dict(image_size=0), ValueError, "image_size must be a positive int"),
        (dict(split="val"), ValueError, "needs val_characters > 0"),
        (dict(val_characters=1200), ValueError, r"val_characters must be in \[0, 1200\)"),
        (dict(val_characters="10"), TypeError, "val_characters must be an int"),
        (dict(progress="yes"), TypeError, "progress must be a bool"),
        (dict(root=3), TypeError, "root must be a path"),
    ],
)
def test_argument_checks(tmp_path, kwargs, error, match):
    args = dict(root=tmp_path) | kwargs
    with pytest.raises(error, match=match):
        load_omniglot(**args)


def test_missing_pillow_gives_install_hint(tmp_path, monkeypatch):
    data_dir = write_release(tmp_path, alphabets=("A",), characters=1, drawings=2)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r"functional-meta\[images\]"):
        load_omniglot(data_dir, "background", image_size=4, cache_dir=tmp_path / "c")


@needs_data
def test_lake_protocol_recipe_keeps_splits_alphabets_and_drawers_apart(omniglot_cache):
    """The ``lake`` protocol: training on background alphabets only, validation on held-out
    background alphabets, test 20-way within one evaluation alphabet, one support and one
    query drawing per class, support and query by two different drawers."""
    from functional_meta import recipes

    config = dict(
        ways=20, shots=1, queries=2, meta_batch_size=4, val_tasks=6, data_dir=str(DATA),
        cache_dir=str(omniglot_cache), output_dir="unused",
    )  # fmt: skip
    sample, val, test = recipes.omniglot_lake(config, need_training=True)
    background, evaluation = load(omniglot_cache, "background"), load(omniglot_cache, "evaluation")
    held_out = sorted(background.alphabet_names)[-recipes.LAKE_VAL_ALPHABETS :]

    batch = sample(torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (4, 20, 1, 28, 28) and batch.query_x.shape == (4, 40, 1, 28, 28)
    val_alphabets = {
        background.alphabet_names[a]
        for a in val.sampler.task_alphabets(val.classes).flatten().tolist()
    }
    assert val_alphabets and val_alphabets <= set(held_out)
    tasks = test(45)  # 20 evaluation alphabets: 2 tasks in each
    assert tasks.num_tasks == 40
    alphabets = tasks.sampler.task_alphabets(tasks.classes)  # [40, 20]
    assert (alphabets == alphabets[:, :1]).all()
    names = {evaluation.alphabet_names[a] for a in alphabets[:, 0].tolist()}
    assert len(names) == 20 and not names & set(background.alphabet_names)
    drawers = tasks.sampler.example_drawers(tasks.examples)  # [40, 20, 2]: support, query
    assert (drawers[:, :, 0] == drawers[:, :1, 0]).all()  # one support drawer per task
    assert (drawers[:, :, 1] == drawers[:, :1, 1]).all()  # one query drawer per task
    assert (drawers[:, 0, 0] != drawers[:, 0, 1]).all()
    first = next(iter(tasks))
    assert first.support_x.shape[1] == 20 and first.query_x.shape[1] == 20
