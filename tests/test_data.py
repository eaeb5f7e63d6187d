"""Tests for gevit_lib.data: splits, sources, checksums, the regenerated rotated-MNIST recipe, PCam h5 reading.

Everything runs on generated files (synthetic MNIST idx, a fake MNIST-rot zip, fake PCam h5); the tests that use
the ``shared_mnist_dir`` fixture also check the genuine MNIST in ../shared/data and skip without it.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import math
import os
import pickle
import shutil
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from gevit_lib import data as D
from gevit_lib import files
from gevit_lib.files import ChecksumError, MissingFileError, RemoteFile
from gevit_lib.testing import make_synthetic_mnist, write_fake_pcam, write_idx

# synthetic MNIST is smaller than the official files by design; the warning itself is tested below
pytestmark = pytest.mark.filterwarnings("ignore::gevit_lib.data.UnverifiedDataWarning")

# the modules behind the package (importlib: the attributes gevit_lib.data.mnist etc. are the loader functions)
M = importlib.import_module("gevit_lib.data.mnist")
R = importlib.import_module("gevit_lib.data.rotated_mnist")

# sha256 (gevit_lib.data.array_checksum) of the regenerated rotated MNIST, recipe v1, seed 0, built from the
# genuine MNIST; "sources" hashes (labels, source_index, source_split).
PINNED_REGENERATED = {
    "train": {"images": "8a83ab9d49289d6fa9dcfade16a7570ca1599f23f012bd10140bba352a04c8da",
              "sources": "44e0f5c2fc56a3d697ad4151902555eae87ebcc9e3618c89fbb9dd76daa4de47",
              "angles": "787b997153fd3afcb4925ba0391de9e5c22a1d1a6375916bbc311411332e05e8"},
    "validation": {"images": "c836b00aa57d9f1521cc633e58aa60a17e8b5799d1b2d27e3180aa15cda8eb7c",
                   "sources": "7ee17d75bf06bb31d7cdf7ede56d55c8cd4b18793fd743a72be17ec2a9f3e1ee",
                   "angles": "b9dd4381c75d80c87e7aa6eec37531b215cbc5f793974c1b59d68038f81fe307"},
    "test": {"images": "73f4a7d0f5b94660709a41fa1aac72ebd7348c7896af7e8897a271ddc70adf4f",
             "sources": "7ac905bf445ae5a2868219ff8a47d60767fa532322082cd74ca9e6828dc52aea",
             "angles": "aefc660f78e983e30814ee51e994ef1070fee476342245095582e3f5e2caeb69"},
}


@pytest.fixture(autouse=True)
def _fresh_caches(monkeypatch: pytest.MonkeyPatch):
    """Each test starts with empty per-process caches and no data / cache dir from the environment."""
    monkeypatch.delenv("GEVIT_DATA_DIR", raising=False)
    monkeypatch.delenv("GEVIT_CACHE_DIR", raising=False)
    D.clear_caches()
    yield
    D.clear_caches()


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    make_synthetic_mnist(root, n_train=600, n_test=100, seed=0)
    return root


@pytest.fixture(scope="module")
def regen_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("regen_cache")


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def rotate_reference(img: np.ndarray, angle: float) -> np.ndarray:
    """Plain per-pixel bilinear rotation (counter-clockwise, centre ((H-1)/2, (W-1)/2), zero fill)."""
    h, w = img.shape
    cy, cx = (h - 1) / 2, (w - 1) / 2
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    out = np.zeros((h, w))
    for r in range(h):
        for q in range(w):
            x, y = cx + c * (q - cx) - s * (r - cy), cy + s * (q - cx) + c * (r - cy)
            x0, y0 = math.floor(x), math.floor(y)
            for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                    if 0 <= yy < h and 0 <= xx < w:
                        out[r, q] += wy * wx * img[yy, xx]
    return out


# ------------------------------------------------------------------------------------------------ splits / mnist


@pytest.mark.parametrize("loader", [D.mnist, D.rotated_mnist, D.pcam])
@pytest.mark.parametrize("split", ["val", "valid", "training", "Test"])
def test_unknown_split_is_rejected(loader, split: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="validation"):
        loader(split, root=tmp_path)


def test_mnist_from_gz_only_folder(synth_root: Path) -> None:
    assert sorted(p.name for p in (synth_root / "mnist").iterdir()) == sorted(f"{n}.gz" for n in D.MNIST_FILES)
    train, val, test = (D.mnist(s, root=synth_root, download=False) for s in D.SPLITS)
    assert (len(train), len(val), len(test)) == (580, 20, 100)  # validation = 600 // 30
    assert train.source == "unverified"  # small files have no official md5
    assert not set(train.indices) & set(val.indices)
    assert sorted([*train.indices, *val.indices]) == list(range(600))
    np.testing.assert_array_equal(val.indices, D.mnist_validation_rows(600))
    x, y = train[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert train.images.dtype == np.uint8 and train.images.shape == (580, 28, 28)
    raw = D.load_mnist_arrays(synth_root, download=False).train_images
    np.testing.assert_array_equal(train.images[3], raw[train.indices[3]])
    # same float32 ops as torchvision ToTensor + Normalize
    from PIL import Image
    from torchvision.transforms import functional as F
    expected = F.normalize(F.to_tensor(Image.fromarray(train.images[3])), [0.1307], [0.3081])
    assert torch.equal(x, expected)
    xs, ys = train.tensors()
    assert torch.equal(xs[3], x) and int(ys[3]) == int(y)
    plain = D.mnist("train", root=synth_root, download=False, normalize=False)
    assert torch.equal(plain[3][0], torch.from_numpy(train.images[3]).float()[None] / 255)
    desc = train.describe()
    assert desc["source"] == "unverified" and desc["split_sizes"] == {"train": 580, "validation": 20, "test": 100}
    assert desc["checksum"] == D.array_checksum(train.images, train.labels)


def test_mnist_digits_and_fraction(synth_root: Path) -> None:
    full = D.mnist("train", root=synth_root, download=False)
    sub = D.mnist("train", root=synth_root, download=False, digits=(8, 3), fraction=0.5)
    mask = np.isin(full.labels, [8, 3])
    assert len(sub) == int(mask.sum() * 0.5) and sub.num_classes == 2
    originals = dict(zip(full.indices, full.labels))
    assert all((8, 3)[lab] == originals[i] for i, lab in zip(sub.indices, sub.labels))


def test_mnist_missing_files_message(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError) as err:
        D.mnist("train", root=tmp_path, download=False)
    msg = str(err.value)
    for name, spec in D.MNIST_FILES.items():
        assert name in msg and spec.md5 in msg
    assert "https://" in msg and str(tmp_path / "mnist") in msg and str(tmp_path / "MNIST" / "raw") in msg


def test_mnist_download_path(synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(root: Path, names: list[str]) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(M, "_download_mnist", offline)
    with pytest.raises(MissingFileError, match="download failed: network unreachable"):
        D.mnist("test", root=tmp_path / "a")

    def fake_download(root: Path, names: list[str]) -> None:  # the four .gz files into <root>/mnist
        assert sorted(names) == sorted(D.MNIST_FILES)
        shutil.copytree(synth_root / "mnist", root / "mnist")

    monkeypatch.setattr(M, "_download_mnist", fake_download)
    got = D.mnist("test", root=tmp_path / "b")
    np.testing.assert_array_equal(got.images, D.mnist("test", root=synth_root, download=False).images)


def test_mnist_truncated_and_corrupt_files(synth_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "bad"
    shutil.copytree(synth_root / "mnist", root / "mnist")
    images = D.load_mnist_arrays(root, download=False).train_images
    # header says 600 images, content holds 599
    write_idx(root / "mnist" / "train-images-idx3-ubyte.gz", images[:-1], header_dims=images.shape)
    with pytest.raises(ChecksumError, match="truncated"):
        D.mnist("train", root=root, download=False)
    # a gzip stream cut short
    blob = gzip.compress(b"\x00\x00\x08\x03" + struct.pack(">3I", *images.shape) + images.tobytes())
    (root / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ChecksumError, match="corrupt or truncated"):
        D.mnist("train", root=root, download=False)


def test_mnist_full_size_file_must_have_official_md5(synth_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "fake_full"
    shutil.copytree(synth_root / "mnist", root / "MNIST" / "raw")
    labels = np.random.default_rng(0).integers(0, 10, 10000).astype(np.uint8)
    (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    raw = b"\x00\x00\x08\x01" + struct.pack(">I", 10000) + labels.tobytes()
    (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").write_bytes(raw)  # uncompressed works too
    with pytest.raises(ChecksumError, match=D.MNIST_FILES["t10k-labels-idx1-ubyte"].md5):
        D.load_mnist_arrays(root, download=False)


def test_mnist_files_are_parsed_once_per_process(synth_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    D.load_mnist_arrays(synth_root, download=False)
    calls = []
    original = M._load_mnist_file
    monkeypatch.setattr(M, "_load_mnist_file", lambda *a: calls.append(a) or original(*a))
    D.mnist("validation", root=synth_root, download=False)
    assert calls == []


def test_mnist_smaller_than_official_warns(synth_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "subset"
    shutil.copytree(synth_root / "mnist", root / "mnist")
    labels = D.load_mnist_arrays(synth_root, download=False).test_labels
    write_idx(root / "mnist" / "t10k-labels-idx1-ubyte.gz", labels[:-1])  # a consistent file, one label short
    with pytest.warns(D.UnverifiedDataWarning) as record:
        with pytest.raises(ChecksumError, match="99 labels"):  # and the images no longer match
            D.mnist("test", root=root, download=False)
    (message,) = [str(w.message) for w in record if w.category is D.UnverifiedDataWarning]
    assert "t10k-labels-idx1-ubyte.gz holds 99 entries, the official t10k-labels-idx1-ubyte 10,000" in message
    assert D.MNIST_FILES["t10k-labels-idx1-ubyte"].md5 in message and "unverified" in message
    D.clear_caches()
    with pytest.warns(D.UnverifiedDataWarning, match="train-images-idx3-ubyte.gz holds 600 entries.*60,000"):
        assert D.mnist("test", root=synth_root, download=False).source == "unverified"


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "TIMEOUT_S", 0.5)
    monkeypatch.setattr(files, "BACKOFF_S", 0.01)
    monkeypatch.setattr(files, "TRIES", 2)


def test_mnist_download_from_a_stalled_server_fails_in_bounded_time(
        stalled_server: str, fast_retries: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mirror that accepts the connection and never answers (a dropping firewall) must not hang the loader."""
    monkeypatch.setattr(M, "MNIST_MIRRORS", (f"{stalled_server}/a/", f"{stalled_server}/b/"))
    start = time.monotonic()
    with pytest.raises(MissingFileError) as err:
        D.mnist("test", root=tmp_path)
    assert time.monotonic() - start < 2 * 2 * 0.5 + 5  # 2 mirrors x 2 tries x 0.5 s, plus slack
    msg = str(err.value)
    assert "download failed" in msg and "timed out" in msg
    for name, spec in D.MNIST_FILES.items():
        assert name in msg and spec.md5 in msg and f"{stalled_server}/a/{name}.gz" in msg
    assert str(tmp_path / "mnist") in msg
    assert not list(tmp_path.rglob("*.gz")) and not list(tmp_path.rglob("*.tmp"))


def test_genuine_mnist_is_verified(shared_mnist_dir: Path) -> None:
    root = shared_mnist_dir.parent
    arrays = D.load_mnist_arrays(root, download=False)
    assert arrays.verified and arrays.source == "official"
    sizes = [len(D.mnist(s, root=root, download=False)) for s in D.SPLITS]
    assert sizes == [58000, 2000, 10000]


# ------------------------------------------------------------------------------------------------ rotation


def test_rotation_matches_rot90_and_identity() -> None:
    img = np.random.default_rng(1).uniform(0, 255, size=(3, 28, 28))
    np.testing.assert_array_equal(D.rotate_images(img, np.zeros(3)), img)
    for k in (1, 2, 3):
        rotated = D.rotate_images(img, np.full(3, 90.0 * k))
        expected = torch.rot90(torch.from_numpy(img), k, dims=(-2, -1)).numpy()  # counter-clockwise for k > 0
        np.testing.assert_allclose(rotated, expected, atol=1e-9)


def test_rotation_fast_path_matches_plain_reference() -> None:
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, size=(3, 28, 28)).astype(np.uint8)
    angles = np.array([17.3, 201.9, 333.0])
    fast = D.rotate_images(img, angles)
    for i in range(3):
        np.testing.assert_allclose(fast[i], rotate_reference(img[i].astype(np.float64), angles[i]), atol=1e-9)
    odd = rng.uniform(0, 1, size=(2, 9, 12))  # non-square images use the same centre rule
    np.testing.assert_allclose(D.rotate_images(odd, np.array([40.0, 300.0]))[1], rotate_reference(odd[1], 300.0),
                               atol=1e-12)


def test_rotation_agrees_with_scipy() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    img = np.random.default_rng(3).uniform(0, 255, size=(28, 28))
    # "grid-constant" = zero padding that is interpolated with, like ours ("constant" zeroes partial border pixels)
    expected = ndimage.rotate(img, 30.0, reshape=False, order=1, mode="grid-constant", cval=0.0)
    np.testing.assert_allclose(D.rotate_images(img[None], np.array([30.0]))[0], expected, atol=1e-8)


# ------------------------------------------------------------------------------------------------ regenerated


def test_regenerated_recipe_on_synthetic_mnist(synth_root: Path) -> None:
    m = D.load_mnist_arrays(synth_root, download=False)
    args = (m.train_images, m.train_labels, m.test_images, m.test_labels)
    a = D.regenerate_rotated_mnist(*args)
    assert tuple(len(a[f"{s}_images"]) for s in D.SPLITS) == (100, 20, 500)
    from_train = [set(a[f"{s}_source_index"][a[f"{s}_source_split"] == 0]) for s in D.SPLITS]
    assert sum(map(len, from_train)) == 100 + 20 + 400  # no digit used twice
    assert not (from_train[0] & from_train[1] or from_train[0] & from_train[2] or from_train[1] & from_train[2])
    test_from_test = a["test_source_index"][a["test_source_split"] == 1]
    assert sorted(test_from_test) == list(range(100))  # every MNIST test digit, once
    for s in D.SPLITS:
        idx, from_test = a[f"{s}_source_index"], a[f"{s}_source_split"] == 1
        np.testing.assert_array_equal(a[f"{s}_labels"], np.where(from_test, m.test_labels[np.minimum(idx, 99)],
                                                                 m.train_labels[idx]))
        assert a[f"{s}_angles"].min() >= 0 and a[f"{s}_angles"].max() < 360
    again = D.regenerate_rotated_mnist(*args)
    assert all(np.array_equal(a[k], again[k]) for k in a)
    other = D.regenerate_rotated_mnist(*args, seed=1)
    assert not np.array_equal(a["train_source_index"], other["train_source_index"])


def _check_transposed_then_rotated(images, angles, source_digits) -> None:
    expected = np.clip(np.rint(D.rotate_images(source_digits.transpose(0, 2, 1), angles)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(images, expected)
    untransposed = np.clip(np.rint(D.rotate_images(source_digits, angles)), 0, 255).astype(np.uint8)
    assert not np.array_equal(images, untransposed)  # the convention matters on these digits


def test_regenerated_digits_are_transposed_then_rotated(synth_root: Path) -> None:
    m = D.load_mnist_arrays(synth_root, download=False)
    a = D.regenerate_rotated_mnist(m.train_images, m.train_labels, m.test_images, m.test_labels)
    idx = a["train_source_index"][:20]
    _check_transposed_then_rotated(a["train_images"][:20], a["train_angles"][:20], m.train_images[idx])
    # at angle 0 a regenerated digit is the transposed MNIST digit; at 90 it is torch.rot90 of it
    digit = m.train_images[idx[0]]
    zero = np.rint(D.rotate_images(digit.T[None], np.zeros(1)))[0]
    np.testing.assert_array_equal(zero, digit.T)
    quarter = np.rint(D.rotate_images(digit.T[None], np.full(1, 90.0)))[0]
    rot90 = torch.rot90(torch.from_numpy(np.ascontiguousarray(digit.T)), 1, dims=(0, 1)).numpy()
    assert np.abs(quarter - rot90).max() <= 1


def test_rotated_mnist_regenerated_dataset_and_cache(synth_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    before = listing(synth_root)
    train = D.rotated_mnist("train", root=synth_root, cache_dir=cache, download=False)
    assert train.source == "regenerated" and len(train) == 100
    assert listing(synth_root) == before  # nothing written into the data dir
    (npz,) = cache.glob("rotated_mnist_regenerated_v1_seed0_*.npz")
    info = train.describe()
    assert info["recipe_version"] == D.REGEN_VERSION and info["mnist_source"] == "unverified"
    assert info["split_sizes"] == {"train": 100, "validation": 20, "test": 500}
    assert train.angles is not None and train.source_indices is not None and len(train.angles) == 100
    D.clear_caches()
    again = D.rotated_mnist("train", root=synth_root, cache_dir=cache, download=False)
    np.testing.assert_array_equal(again.images, train.images)
    # a damaged cache is detected by its checksums and rebuilt
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["train_images"] = arrays["train_images"].copy()
    arrays["train_images"][0, 0, 0] ^= 1
    with open(npz, "wb") as f:
        np.savez(f, **arrays)
    D.clear_caches()
    with pytest.warns(UserWarning, match="checksums"):
        rebuilt = D.rotated_mnist("train", root=synth_root, cache_dir=cache, download=False)
    np.testing.assert_array_equal(rebuilt.images, train.images)


def test_rotated_mnist_digits_and_fraction(synth_root: Path, tmp_path: Path) -> None:
    kw = dict(root=synth_root, cache_dir=tmp_path, download=False)
    full = D.rotated_mnist("train", **kw)
    only = D.rotated_mnist("train", digits=np.array([3, 8]), **kw)
    assert set(only.labels) == {0, 1} and only.num_classes == 2
    np.testing.assert_array_equal(np.array([3, 8])[only.labels], full.labels[only.indices])
    for split in ("validation", "test"):
        assert set(D.rotated_mnist(split, digits=(3, 8), **kw).labels) == {0, 1}
    part = D.rotated_mnist("train", fraction=0.1, **kw)
    with torch.random.fork_rng():  # the original: torch.manual_seed(0); torch.randperm(n)[:int(n * fraction)]
        torch.manual_seed(0)
        expected = torch.randperm(len(full))[: int(len(full) * 0.1)].numpy()
    np.testing.assert_array_equal(part.indices, expected)
    np.testing.assert_array_equal(part.images, full.images[expected])
    assert len(D.rotated_mnist("validation", fraction=0.1, **kw)) == 20  # train split only
    both = D.rotated_mnist("train", digits=(3, 8), fraction=0.5, **kw)  # digits first, then fraction
    assert len(both) == int(len(only) * 0.5) and set(both.indices) <= set(only.indices)
    with pytest.raises(ValueError, match="fraction"):
        D.rotated_mnist("train", fraction=0.0, **kw)
    with pytest.raises(ValueError, match="digits"):
        D.rotated_mnist("train", digits=(3, 3), **kw)
    with pytest.raises(ValueError, match="source"):
        D.rotated_mnist("train", source="lisa", **kw)


def test_read_only_data_dir_is_never_written(synth_root: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "ro"
    shutil.copytree(synth_root / "mnist", root / "mnist")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("GEVIT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(work / "xdg"))
    os.chmod(root / "mnist", 0o555)
    os.chmod(root, 0o555)
    try:
        before = listing(root)
        assert D.resolve_cache_dir() == work / "xdg" / "gevit_companion"
        D.rotated_mnist("test", root=root, download=False)
        assert listing(root) == before
        assert list((work / "xdg" / "gevit_companion").glob("rotated_mnist_regenerated_*.npz"))
        with pytest.raises(MissingFileError, match="read-only"):
            D.rotated_mnist("test", source="official", root=root, download=True)
    finally:
        os.chmod(root, 0o755)
        os.chmod(root / "mnist", 0o755)
    assert D.resolve_cache_dir() == work / "xdg" / "gevit_companion"  # never the data dir
    monkeypatch.setenv("GEVIT_CACHE_DIR", str(tmp_path / "env_cache"))
    assert D.resolve_cache_dir() == tmp_path / "env_cache"
    assert D.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_regenerated_pinned_checksums(shared_mnist_dir: Path, regen_cache: Path) -> None:
    arrays, source = D.regenerated_rotated_mnist_arrays(shared_mnist_dir.parent, regen_cache, download=False)
    assert source.verified
    assert tuple(len(arrays[f"{s}_images"]) for s in D.SPLITS) == (10000, 2000, 50000)
    from_train = [set(arrays[f"{s}_source_index"][arrays[f"{s}_source_split"] == 0]) for s in D.SPLITS]
    assert sum(map(len, from_train)) == len(set().union(*from_train)) == 52000  # disjoint
    assert sorted(arrays["test_source_index"][arrays["test_source_split"] == 1]) == list(range(10000))
    got = {s: {"images": D.array_checksum(arrays[f"{s}_images"]),
               "sources": D.array_checksum(arrays[f"{s}_labels"], arrays[f"{s}_source_index"],
                                           arrays[f"{s}_source_split"]),
               "angles": D.array_checksum(arrays[f"{s}_angles"])} for s in D.SPLITS}
    assert got == PINNED_REGENERATED
    idx = arrays["test_source_index"][:50]
    from_test = arrays["test_source_split"][:50] == 1
    digits = np.where(from_test[:, None, None], source.test_images[np.minimum(idx, 9999)],
                      source.train_images[idx])
    _check_transposed_then_rotated(arrays["test_images"][:50], arrays["test_angles"][:50], digits)


def test_rotated_mnist_offline_from_shared_data_dir(shared_mnist_dir: Path, regen_cache: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEVIT_DATA_DIR", str(shared_mnist_dir.parent))
    monkeypatch.setenv("GEVIT_CACHE_DIR", str(regen_cache))

    def no_network(root: Path, names: list[str]) -> None:
        raise AssertionError("tried to download MNIST")

    monkeypatch.setattr(M, "_download_mnist", no_network)
    before = listing(shared_mnist_dir.parent)
    test = D.rotated_mnist("test")
    assert len(test) == 50000 and test.source == "regenerated"
    assert test.describe()["mnist_source"] == "official"
    assert listing(shared_mnist_dir.parent) == before
    x, y = test[0]
    assert x.shape == (1, 28, 28) and 0 <= int(y) <= 9


# ------------------------------------------------------------------------------------------------ official archive


def make_fake_rot_archive(folder: Path, n_train_valid: int = 12, n_test: int = 8, seed: int = 0):
    """A small mnist_rotation_new.zip in the genuine format: rows of 784 floats in [0, 1] then the label."""
    rng = np.random.default_rng(seed)
    pixels = {"train_valid": rng.integers(0, 256, (n_train_valid, 28, 28)),
              "test": rng.integers(0, 256, (n_test, 28, 28))}
    labels = {"train_valid": rng.integers(0, 10, n_train_valid), "test": rng.integers(0, 10, n_test)}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / D.MNIST_ROT_ARCHIVE.filename
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for part, member in D.MNIST_ROT_MEMBERS.items():
            rows = np.concatenate([pixels[part].reshape(-1, 784) / 255.0, labels[part][:, None]], axis=1)
            lines = ["   ".join(f"{v:.18e}" for v in row) for row in rows]
            zf.writestr(member, "\n".join(lines) + "\n")
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    return path, md5, pixels, labels


def test_official_loader_parses_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    path, md5, pixels, labels = make_fake_rot_archive(root / "rotated_mnist")
    monkeypatch.setattr(R, "MNIST_ROT_ARCHIVE", RemoteFile(path.name, "file://fake", md5, "md5"))
    before = listing(root)
    kw = dict(root=root, cache_dir=tmp_path / "cache")
    train, val, test = (D.rotated_mnist(s, **kw) for s in D.SPLITS)  # "auto" finds the archive
    assert (train.source, len(train), len(val), len(test)) == ("official", 10, 2, 8)
    np.testing.assert_array_equal(train.images, pixels["train_valid"][:10])  # row-major, not transposed, x255
    np.testing.assert_array_equal(val.images, pixels["train_valid"][10:])
    np.testing.assert_array_equal(test.images, pixels["test"])
    np.testing.assert_array_equal(val.labels, labels["train_valid"][10:])
    np.testing.assert_array_equal(val.indices, [0, 1])
    np.testing.assert_array_equal(val.source_indices, [10, 11])  # rows of the train_valid amat file
    assert train.angles is None and train.describe()["label"].startswith("MNIST-rot (")
    assert listing(root) == before
    assert list((tmp_path / "cache").glob(f"rotated_mnist_official_{md5[:16]}.npz"))
    D.clear_caches()  # the second load comes from the npz cache, not the archive
    monkeypatch.setattr(R, "_parse_rot_archive", lambda p: pytest.fail("re-parsed the archive"))
    np.testing.assert_array_equal(D.rotated_mnist("test", source="official", **kw).images, pixels["test"])


def test_official_archive_bad_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, md5, _, _ = make_fake_rot_archive(tmp_path)
    monkeypatch.setattr(R, "MNIST_ROT_ARCHIVE", RemoteFile(path.name, "file://fake", "0" * 32, "md5"))
    with pytest.raises(ChecksumError, match=f"md5 is {md5}, expected {'0' * 32}"):
        D.rotated_mnist("train", source="official", root=tmp_path, cache_dir=tmp_path / "cache")


def test_official_archive_missing(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError) as err:
        D.rotated_mnist("train", source="official", root=tmp_path, download=False)
    msg = str(err.value)
    assert "mnist_rotation_new.zip" in msg and D.MNIST_ROT_ARCHIVE.checksum in msg
    assert D.MNIST_ROT_ARCHIVE.url in msg and "regenerated" in msg


def test_rotated_mnist_missing_names_the_archive_and_mnist(tmp_path: Path) -> None:
    """Neither the archive nor MNIST: the error says how to get either (official archive first-class)."""
    with pytest.raises(MissingFileError) as err:
        D.rotated_mnist("train", root=tmp_path, download=False)
    msg = str(err.value)
    archive = D.MNIST_ROT_ARCHIVE
    assert archive.filename in msg and archive.checksum in msg and archive.url in msg
    assert str(tmp_path / "rotated_mnist") in msg and "regenerated" in msg
    assert all(name in msg and spec.md5 in msg for name, spec in D.MNIST_FILES.items())


# ------------------------------------------------------------------------------------------------ pcam


def test_pcam_fake_files(tmp_path: Path) -> None:
    import h5py

    folder = write_fake_pcam(tmp_path, n_per_split=10)
    x_name, y_name = D.PCAM_FILES["validation"]
    with h5py.File(folder / x_name) as fx, h5py.File(folder / y_name) as fy:
        assert fx["x"].shape == (10, 96, 96, 3) and fx["x"].dtype == np.uint8 and fy["y"].shape == (10, 1, 1, 1)
        raw, raw_labels = fx["x"][:], fy["y"][:, 0, 0, 0]
    val = D.pcam("validation", root=tmp_path, normalize=False)
    assert len(val) == 10 and val.num_classes == 2
    x, y = val[4]
    assert x.shape == (3, 96, 96) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, torch.from_numpy(raw[4]).permute(2, 0, 1).float() / 255) and int(y) == raw_labels[4]
    normed = D.pcam("validation", root=tmp_path)[4][0]
    mean, std = torch.tensor(D.PCAM_MEAN).view(3, 1, 1), torch.tensor(D.PCAM_STD).view(3, 1, 1)
    torch.testing.assert_close(normed, (x - mean) / std)
    half = D.pcam("train", root=tmp_path, fraction=0.5)
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(0))[:5].numpy()
    np.testing.assert_array_equal(half.indices, expected)
    clone = pickle.loads(pickle.dumps(half))  # what DataLoader workers receive; each opens its own handle
    assert torch.equal(clone[2][0], half[2][0])
    batch_x, batch_y = next(iter(torch.utils.data.DataLoader(half, batch_size=5)))
    assert batch_x.shape == (5, 3, 96, 96) and batch_y.dtype == torch.int64


def test_pcam_missing_and_malformed(tmp_path: Path) -> None:
    import h5py

    with pytest.raises(MissingFileError) as err:
        D.pcam("test", root=tmp_path)
    msg = str(err.value)
    assert all(name in msg for pair in D.PCAM_FILES.values() for name in pair)
    assert "zenodo" in msg and "torchvision" in msg
    folder = write_fake_pcam(tmp_path, n_per_split=4)
    with h5py.File(folder / D.PCAM_FILES["test"][0], "w") as f:
        f.create_dataset("x", data=np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(ChecksumError, match="96, 96, 3"):
        D.pcam("test", root=tmp_path)
