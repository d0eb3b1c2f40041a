"""Image data sets for the ViT task: shapes, scaling, stratified deterministic splits and caps, IDX parsing, errors."""

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from rankbench_plugins.tasks import _vision_data as vd
from rankbench_plugins.tasks._vision_data import (
    DATASETS,
    DatasetUnavailableError,
    IDXFormatError,
    ImageDataset,
    load_dataset,
    read_idx,
)

# The user's cache, read at import time (conftest's autouse fixture points RANKBENCH_CACHE at a temp folder per test).
REAL_CACHE = Path(os.environ.get("RANKBENCH_CACHE", Path.home() / ".cache" / "rankbench"))
EXPECTED = {  # name: (train size, test size, image size)
    "digits": (1438, 359, 8),
    "mnist": (4000, 1000, 28),
    "fashion-mnist": (60000, 10000, 28),
}


def _fashion_unavailable_reason():
    try:
        vd.fashion_mnist_dir(REAL_CACHE)
    except DatasetUnavailableError as exc:
        return f"Fashion-MNIST files not installed on this machine (run `make datasets`): {exc}"
    return None


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def get(name, **kw):
        key = (name, tuple(sorted(kw.items())))
        if key not in cache:
            if name == "fashion-mnist":
                reason = _fashion_unavailable_reason()
                if reason:
                    pytest.skip(reason)
            cache[key] = load_dataset(name, cache_dir=REAL_CACHE, **kw)
        return cache[key]

    return get


def _counts(y: torch.Tensor) -> list[int]:
    return torch.bincount(y, minlength=10).tolist()


@pytest.mark.parametrize("name", DATASETS)
def test_shapes_dtypes_and_range(loaded, name):
    d = loaded(name)
    n_train, n_test, size = EXPECTED[name]
    assert isinstance(d, ImageDataset) and d.name == name
    assert d.num_classes == 10 and d.image_size == size
    assert d.train_x.shape == (n_train, 1, size, size) and d.test_x.shape == (n_test, 1, size, size)
    assert d.train_y.shape == (n_train,) and d.test_y.shape == (n_test,)
    assert d.train_x.dtype == d.test_x.dtype == torch.float32
    assert d.train_y.dtype == d.test_y.dtype == torch.int64
    for x in (d.train_x, d.test_x):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    for y in (d.train_y, d.test_y):
        assert int(y.min()) == 0 and int(y.max()) == 9
    # the tensors are ordinary writable tensors, not views of the cached source
    d2 = load_dataset(name, cache_dir=REAL_CACHE)
    d2.train_x[0].zero_()
    d2.train_y[0] = 0
    assert torch.equal(loaded(name).train_x, load_dataset(name, cache_dir=REAL_CACHE).train_x)


def test_scaling_is_exact(loaded):
    digits = loaded("digits").train_x * 16  # 0..16 / 16 is exact in float32
    assert torch.equal(digits, digits.round())
    mnist = loaded("mnist").train_x * 255
    assert torch.allclose(mnist, mnist.round(), atol=1e-4)


def test_digits_split_is_stratified():
    from sklearn.datasets import load_digits

    source = np.bincount(load_digits().target)
    d = load_dataset("digits")
    test = np.floor(0.2 * source + 0.5).astype(int)
    assert _counts(d.test_y) == test.tolist()
    assert _counts(d.train_y) == (source - test).tolist()


def test_mnist_split_exactly_400_100_per_class_and_mixed(loaded):
    d = loaded("mnist")
    assert _counts(d.train_y) == [400] * 10 and _counts(d.test_y) == [100] * 10
    # the source is sorted by label; the split must not be
    assert len(set(d.train_y[:50].tolist())) >= 5 and len(set(d.test_y[:50].tolist())) >= 5


def test_fashion_mnist_official_split(loaded):
    d = loaded("fashion-mnist")
    assert _counts(d.train_y) == [6000] * 10 and _counts(d.test_y) == [1000] * 10
    # the official files' first labels (file order is kept)
    assert d.train_y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert d.test_y[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]


def test_split_indices_partition_and_are_fixed():
    y = np.repeat(np.arange(10), 50)
    train, test = vd.stratified_split(y, 0.2, salt="t:split")
    assert len(np.intersect1d(train, test)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(y)))
    assert np.bincount(y[test]).tolist() == [10] * 10
    again = vd.stratified_split(y, 0.2, salt="t:split")
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])


@pytest.mark.parametrize("name", ["digits", "mnist"])
def test_split_is_deterministic_and_independent_of_seed(loaded, name):
    a = loaded(name)
    for b in (load_dataset(name), load_dataset(name, seed=7)):
        assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
        assert torch.equal(a.test_x, b.test_x) and torch.equal(a.test_y, b.test_y)


def _rows(x: torch.Tensor) -> set[int]:
    return {hash(row.tobytes()) for row in x.reshape(len(x), -1).numpy()}


@pytest.mark.parametrize(
    "name, max_train, max_test, train_per_class, test_per_class",
    [("mnist", 1000, 250, 100, 25), ("fashion-mnist", 10000, 2000, 1000, 200)],
)
def test_caps_keep_class_balance_and_are_seeded(loaded, name, max_train, max_test, train_per_class, test_per_class):
    a = loaded(name, max_train=max_train, max_test=max_test, seed=0)
    assert _counts(a.train_y) == [train_per_class] * 10 and _counts(a.test_y) == [test_per_class] * 10
    same = load_dataset(name, cache_dir=REAL_CACHE, max_train=max_train, max_test=max_test, seed=0)
    assert torch.equal(a.train_x, same.train_x) and torch.equal(a.train_y, same.train_y)
    assert torch.equal(a.test_x, same.test_x) and torch.equal(a.test_y, same.test_y)
    other = load_dataset(name, cache_dir=REAL_CACHE, max_train=max_train, max_test=max_test, seed=1)
    assert not torch.equal(a.train_x, other.train_x) and not torch.equal(a.test_x, other.test_x)
    assert _counts(other.train_y) == [train_per_class] * 10
    # the subsets come from the split they cap
    full = loaded(name)
    assert _rows(a.train_x) <= _rows(full.train_x) and _rows(a.test_x) <= _rows(full.test_x)


def test_digits_cap_is_proportional(loaded):
    full, capped = loaded("digits"), loaded("digits", max_train=500, max_test=100)
    assert len(capped.train_y) == 500 and len(capped.test_y) == 100
    for part_full, part_cap, n in ((full.train_y, capped.train_y, 500), (full.test_y, capped.test_y, 100)):
        share = np.array(_counts(part_full)) * n / len(part_full)
        assert np.all(np.abs(np.array(_counts(part_cap)) - share) < 1)


def test_cap_at_or_above_size_changes_nothing_and_bad_caps_fail(loaded):
    full = loaded("digits")
    d = load_dataset("digits", max_train=10_000, max_test=359)
    assert torch.equal(d.train_x, full.train_x) and torch.equal(d.test_y, full.test_y)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_train"):
            load_dataset("digits", max_train=bad)


def test_class_quotas_sum_and_bounds():
    counts = np.array([5, 1, 7, 3])
    for total in range(1, 17):
        q = vd.class_quotas(counts, total)
        assert q.sum() == min(total, counts.sum()) and np.all(q <= counts) and np.all(q >= 0)


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="cifar10") as info:
        load_dataset("cifar10")
    for name in DATASETS:
        assert name in str(info.value)


def test_missing_fashion_files_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(vd, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "system")
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("fashion-mnist", cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for needle in ("train-images-idx3-ubyte.gz", str(tmp_path / "system"),
                   str(tmp_path / "cache" / "datasets" / "fashion-mnist"), "make datasets",
                   "apt-get download dataset-fashion-mnist", "apt-get install dataset-fashion-mnist"):
        assert needle in msg


def test_fashion_read_from_the_rankbench_cache(tmp_path, monkeypatch):
    reason = _fashion_unavailable_reason()
    if reason:
        pytest.skip(reason)
    source = vd.fashion_mnist_dir(REAL_CACHE)
    folder = tmp_path / "cache" / "datasets" / "fashion-mnist"  # conftest sets RANKBENCH_CACHE=tmp_path/cache
    folder.mkdir(parents=True)
    for f in vd.FASHION_MNIST_FILES.values():
        (folder / f).symlink_to(source / f)
    monkeypatch.setattr(vd, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "system")
    assert vd.fashion_mnist_dir() == folder
    d = load_dataset("fashion-mnist", max_train=100, max_test=50)
    assert d.train_x.shape == (100, 1, 28, 28) and _counts(d.test_y) == [5] * 10


# ---------------------------------------------------------------------------------------------------------------------
# IDX parser


def _idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(vd.IDX_DTYPES[type_code]).tobytes()


def test_read_idx_round_trip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    plain = tmp_path / "imgs-idx3-ubyte"
    plain.write_bytes(_idx_bytes(images))
    assert np.array_equal(read_idx(plain, expect_magic=vd.IDX_IMAGES_MAGIC), images)
    packed = tmp_path / "imgs-idx3-ubyte.gz"
    packed.write_bytes(gzip.compress(_idx_bytes(images)))
    assert np.array_equal(read_idx(packed), images)
    ints = np.array([[1, -2], [300000, 4]], dtype=np.int32)  # multi-byte types are big-endian
    (tmp_path / "ints").write_bytes(_idx_bytes(ints, 0x0C))
    assert np.array_equal(read_idx(tmp_path / "ints"), ints)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b: b"\x01" + b[1:], "bad IDX magic"),  # first bytes must be zero
        (lambda b: b[:2] + b"\x07" + b[3:], "bad IDX magic"),  # unknown type byte
        (lambda b: b[:3] + b"\x00" + b[4:], "bad IDX magic"),  # zero dimensions
        (lambda b: b[:3] + b"\x01" + b[4:], "expected 0x00000803"),  # a labels header where images are expected
        (lambda b: b[:-1], "payload"),  # truncated data
        (lambda b: b + b"\x00", "payload"),  # trailing data
        (lambda b: b[:4] + (999).to_bytes(4, "big") + b[8:], "payload"),  # a dimension that does not match the data
        (lambda b: b[:10], "truncated header"),
        (lambda b: b[:3], "too short"),
    ],
)
def test_read_idx_rejects_corrupted_files(tmp_path, mutate, match):
    good = _idx_bytes(np.zeros((2, 3, 4), dtype=np.uint8))
    bad = tmp_path / "bad-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(mutate(good)))
    with pytest.raises(IDXFormatError, match=match) as info:
        read_idx(bad, expect_magic=vd.IDX_IMAGES_MAGIC)
    assert str(bad) in str(info.value)


def test_read_idx_rejects_bad_gzip(tmp_path):
    bad = tmp_path / "broken.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(IDXFormatError, match="gzip"):
        read_idx(bad)
