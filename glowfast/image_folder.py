"""Your own images as a dataset: ``folder:PATH`` wherever glowfast takes a dataset name.

    python -m glowfast.train --dataset folder:/data/ffhq --size 256 -L 6 ...
    python -m glowfast.evaluate --run runs/ffhq --datasets folder:/data/ffhq folder:/data/other

Layout:
- ``PATH/train/`` beside ``PATH/test/`` (or ``val/``, ``valid/``, ``validation/``, the first that exists): they are
  the two splits. One without the other is an error (name ``folder:PATH/train`` to split that folder instead).
- Otherwise every image under ``PATH`` is used, and the test split is the tenth of the files whose relative path
  has a CRC-32 of 0 modulo 10: a file's split depends on its own path only, so adding or removing other files
  never moves an image between the splits (an evaluation after adding images still scores only held-out ones).
Labels: torchvision's ImageFolder layout -- a folder that holds no image of its own and at least two subfolders
with images; the class of an image is its first-level subfolder, numbered in sorted name order. With train/ and
test/, train/ decides: if it is labelled, test/ must hold class folders only, each a training class (it may lack
some). Otherwise the images are unlabelled (label 0, ``n_classes == 0``), found recursively.

Images: files ending in .png, .jpg, .jpeg, .bmp, .gif, .webp, .tif or .tiff (any case), found recursively,
following symbolic links (each folder once); hidden files and folders, and glowfast run folders (a config.json
beside checkpoints/: a run started inside the image folder) are skipped. Decoded lazily per item, centre-cropped
to a square (its shorter side) and resized to ``size`` (bilinear, antialiased; PIL's) -- by default the first
training image's shorter side. Channels: ``channels`` (1 or 3), by default 1 when the first training image is
greyscale (PIL modes 1, L, LA, 16-bit), else 3 (RGB); every image is converted to that. 16-bit greyscale keeps
its high byte; 32-bit integer and float images are refused (their range is unknown). ``python -m glowfast.train``
records the size and channels it used, so later files cannot change them.

``PATH`` is resolved to an absolute path (``~`` expanded): the dataset's name, as a run's config records it, is
``folder:/absolute/path``, so ``--resume`` and ``glowfast.evaluate`` find the images from any directory (and
``--resume RUN --dataset folder:NEW`` re-points a run whose images moved). A missing folder or one without images
raises DatasetNotFoundError; a file that cannot be decoded raises ImageReadError (a ValueError) naming it when it is
read.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .data import SPLITS, DatasetInfo, DatasetNotFoundError, centre_crop_resize

PREFIX = "folder:"
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TEST_FOLDERS = ("test", "val", "valid", "validation")  # beside train/: the first that exists is the test split
HOLD_OUT = 10  # without them: a file is a test image when the CRC-32 of its relative path is 0 modulo 10


def _root(name: str) -> Path:
    path = name[len(PREFIX):]
    if not path:
        raise ValueError("folder: no folder given; write folder:PATH")
    return Path(path).expanduser().resolve()


def canonical_name(name: str) -> str:
    """``folder:`` + the absolute path: the name a run's config records."""
    return PREFIX + str(_root(name))


def _is_image(name: str) -> bool:
    return name.lower().endswith(EXTENSIONS) and not name.startswith(".")


def _is_run_folder(names) -> bool:
    """A glowfast run folder (python -m glowfast.train's output): its sample grids and curves are not data."""
    return "config.json" in names and "checkpoints" in names


def _images_under(folder: Path) -> list[Path]:
    """Every image file under `folder` (recursively, symbolic links followed once; hidden entries and glowfast run
    folders skipped), in sorted path order."""
    found, seen, top = [], set(), os.path.realpath(folder)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        # a link back to this folder or above it would list its images again
        above = real != top and (top + os.sep).startswith(real + os.sep)
        if real in seen or above or _is_run_folder(set(dirnames) | set(filenames)):
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames if _is_image(f))
    return sorted(found)


def _class_folders(folder: Path) -> tuple[bool, dict[str, list[Path]]]:
    """(whether `folder` holds images of its own, {subfolder: its images} for the subfolders that hold any)."""
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    if _is_run_folder({e.name for e in entries}):
        return False, {}
    own = any(e.is_file() and _is_image(e.name) for e in entries)
    subs = {e.name: _images_under(Path(e.path)) for e in entries if e.is_dir() and not e.name.startswith(".")}
    return own, {c: files for c, files in subs.items() if files}


def _labelled(folder: Path) -> dict[str, list[Path]] | None:
    """{class name: its images} when `folder` has the ImageFolder layout (no image of its own, >= 2 subfolders with
    images), else None."""
    own, classes = _class_folders(folder)
    return classes if not own and len(classes) >= 2 else None


def _held_out(path: Path, root: Path) -> bool:
    return zlib.crc32(path.relative_to(root).as_posix().encode()) % HOLD_OUT == 0


def _scan(name: str) -> tuple[dict[str, list[tuple[Path, int]]], list[str]]:
    """({split: [(file, label)]}, class names) of a folder dataset."""
    root = _root(name)
    if not root.is_dir():
        raise DatasetNotFoundError(f"{PREFIX}{root}: no such folder")
    train_dir = root / "train"
    test_dir = next((root / t for t in TEST_FOLDERS if (root / t).is_dir()), None)
    if train_dir.is_dir() and test_dir is None:
        raise ValueError(f"{PREFIX}{root}: has train/ but no {'/, '.join(TEST_FOLDERS)}/ beside it; add one, or name "
                         f"{PREFIX}{train_dir} to hold out a tenth of its images as the test split")
    if test_dir is not None and not train_dir.is_dir():
        raise ValueError(f"{PREFIX}{root}: has {test_dir.name}/ but no train/ beside it")
    if test_dir is not None:
        train_classes = _labelled(train_dir)
        classes = sorted(train_classes or {})
        if classes:  # the test split is labelled by the training classes (it may lack some of them)
            own, test_classes = _class_folders(test_dir)
            extra = sorted(set(test_classes) - set(classes))
            if own or extra:
                what = "images outside class folders" if own else f"classes {extra}"
                raise ValueError(f"{PREFIX}{root}: {test_dir.name}/ holds {what}, but train/ is labelled by its "
                                 f"class folders {classes}")
            by_class = {"train": train_classes, "test": test_classes}
            splits = {s: [(f, classes.index(c)) for c in sorted(by_class[s]) for f in by_class[s][c]]
                      for s in SPLITS}
        else:
            splits = {"train": [(f, 0) for f in _images_under(train_dir)],
                      "test": [(f, 0) for f in _images_under(test_dir)]}
        where = {"train": train_dir, "test": test_dir}
    else:
        labelled = _labelled(root)
        classes = sorted(labelled) if labelled else []
        files = ([(f, i) for i, c in enumerate(classes) for f in labelled[c]] if labelled
                 else [(f, 0) for f in _images_under(root)])
        files.sort(key=lambda pair: pair[0])
        splits = {"train": [p for p in files if not _held_out(p[0], root)],
                  "test": [p for p in files if _held_out(p[0], root)]}
        where = {"train": root, "test": root}
        if files and not all(splits.values()):
            empty = "test" if not splits["test"] else "train"
            raise ValueError(f"{PREFIX}{root}: the hold-out (a tenth of the files, chosen by their paths) leaves the "
                             f"{empty} split of these {len(files)} images empty; add images, or give train/ and test/ "
                             "folders")
    for s in SPLITS:
        if not splits[s]:
            raise DatasetNotFoundError(f"{PREFIX}{root}: no image files ({', '.join(EXTENSIONS)}) for the {s} split "
                                       f"under {where[s]}")
    return splits, classes


class ImageReadError(ValueError):
    """An image file of a folder dataset that cannot be decoded, or whose pixels glowfast cannot map to 8 bits."""


def _open(path: Path, name: str):
    """The image at `path`, loaded, with 16-bit greyscale reduced to 8 bits (the high byte); ImageReadError names a
    file that cannot be decoded, and 32-bit integer or float pixels (their range is unknown)."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(path)
        im.load()
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ImageReadError(f"{name}: cannot read image {path}: {e}") from None
    if im.mode.startswith("I;16"):
        high = (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)
        im.close()
        return Image.fromarray(high, "L")
    if im.mode in ("I", "F"):
        im.close()
        raise ImageReadError(f"{name}: {path} has {'32-bit integer' if im.mode == 'I' else 'floating-point'} pixels "
                             "(PIL mode " + im.mode + "), whose range is unknown; save the images with 8 or 16 bits")
    return im


GREYSCALE_MODES = ("1", "L", "LA")  # after _open: 16-bit greyscale arrives as L


def _load(name: str, size: int | None, channels: int | None) -> tuple[DatasetInfo, dict[str, list[tuple[Path, int]]]]:
    """(info, {split: [(file, label)]}). The channels and the size default to the first training image's (greyscale:
    1, else 3; its shorter side)."""
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels!r}")
    splits, classes = _scan(name)
    with _open(splits["train"][0][0], name) as im:
        first_channels, side = (1 if im.mode in GREYSCALE_MODES else 3), min(im.size)
    hw = side if size is None else int(size)
    if hw <= 0:
        raise ValueError(f"size must be positive, got {size}")
    return DatasetInfo(canonical_name(name), (channels or first_channels, hw, hw), len(classes)), splits


def folder_info(name: str, size: int | None = None, channels: int | None = None) -> DatasetInfo:
    return _load(name, size, channels)[0]


class ImageFolderDataset(Dataset):
    """A split of a ``folder:PATH`` dataset: (uint8 (C, size, size) image, int label), decoded per item."""

    def __init__(self, files: list[tuple[Path, int]], info: DatasetInfo):
        self.files, self.info = files, info
        self.mode = "L" if info.image_shape[0] == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[index]
        with _open(path, self.info.name) as im:
            return centre_crop_resize(im.convert(self.mode), None, self.info.image_shape[-1]), label

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.info.name}, n={len(self)}, shape={self.info.image_shape})"


def folder_dataset(name: str, split: str, size: int | None = None, channels: int | None = None
                   ) -> ImageFolderDataset:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} for {name}, got {split!r}")
    info, splits = _load(name, size, channels)
    return ImageFolderDataset(splits[split], info)
