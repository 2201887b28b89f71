"""Your own images as a dataset: ``folder:PATH`` wherever glowfast takes a dataset name.

    python -m glowfast.train --dataset folder:/data/ffhq --size 256 -L 6 ...
    python -m glowfast.evaluate --run runs/ffhq --datasets folder:/data/ffhq folder:/data/other

Layout (the first rule that applies):
- ``PATH/train/`` and ``PATH/test/`` both exist: they are the two splits.
- Otherwise every image under ``PATH`` is used, and the test split is every 10th file in sorted path order (the
  1st, 11th, 21st, ...: 10 %, the same on every machine and run), the rest the training split.
Within a split folder, images are labelled by class when the folder holds no image itself and at least two of
its subfolders hold images (torchvision's ImageFolder layout): the class of an image is its first-level
subfolder, classes numbered in sorted name order of the training split (a test class the training split lacks is
an error; with train/ and test/, both must have that layout). Otherwise the images are unlabelled (label 0,
``n_classes == 0``), found recursively.

Images: files ending in .png, .jpg, .jpeg, .bmp, .gif, .webp, .tif or .tiff (any case; hidden files and folders
skipped), decoded lazily per item. Each is centre-cropped to a square (its shorter side) and resized to ``size``
(bilinear, antialiased; PIL's) -- by default the first training image's shorter side. Channels: 1 when the first
training image is greyscale (PIL modes 1, L, LA, I, I;16, F), else 3 (RGB); every image is converted to that.

``PATH`` is resolved to an absolute path (``~`` expanded): the dataset's name, as a run's config records it, is
``folder:/absolute/path``, so ``--resume`` and ``glowfast.evaluate`` find the images from any directory. A missing
folder or one without images raises DatasetNotFoundError; a file that cannot be decoded raises ValueError naming it
when it is read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .data import SPLITS, DatasetInfo, DatasetNotFoundError

PREFIX = "folder:"
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
GREYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")
TEST_EVERY = 10  # without train/ and test/ folders: every 10th image (sorted paths) is a test image


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


def _images_under(folder: Path) -> list[Path]:
    """Every image file under `folder` (recursively, hidden entries skipped), in sorted path order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames if _is_image(f))
    return sorted(found)


def _labelled(folder: Path) -> dict[str, list[Path]] | None:
    """{class name: its images} when `folder` has the ImageFolder layout (no image of its own, >= 2 subfolders with
    images), else None."""
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    if any(e.is_file() and _is_image(e.name) for e in entries):
        return None
    classes = {e.name: _images_under(Path(e.path)) for e in entries if e.is_dir() and not e.name.startswith(".")}
    classes = {c: files for c, files in classes.items() if files}
    return classes if len(classes) >= 2 else None


def _scan(name: str) -> tuple[dict[str, list[tuple[Path, int]]], list[str]]:
    """({split: [(file, label)]}, class names) of a folder dataset."""
    root = _root(name)
    if not root.is_dir():
        raise DatasetNotFoundError(f"{PREFIX}{root}: no such folder")
    split_dirs = {s: root / s for s in SPLITS}
    if all(d.is_dir() for d in split_dirs.values()):
        labelled = {s: _labelled(d) for s, d in split_dirs.items()}
        if labelled["train"] is not None and labelled["test"] is not None:
            classes = sorted(labelled["train"])
            extra = sorted(set(labelled["test"]) - set(classes))
            if extra:
                raise ValueError(f"{PREFIX}{root}: test classes {extra} are not among the training classes {classes}")
            splits = {s: [(f, classes.index(c)) for c in sorted(labelled[s]) for f in labelled[s][c]] for s in SPLITS}
        else:
            classes = []
            splits = {s: [(f, 0) for f in _images_under(d)] for s, d in split_dirs.items()}
    else:
        labelled = _labelled(root)
        classes = sorted(labelled) if labelled else []
        files = ([(f, i) for i, c in enumerate(classes) for f in labelled[c]] if labelled
                 else [(f, 0) for f in _images_under(root)])
        files.sort(key=lambda pair: pair[0])
        if len(files) == 1:
            raise ValueError(f"{PREFIX}{root}: only 1 image; with every {TEST_EVERY}th held out for the test split, "
                             "the training split needs at least 2")
        splits = {"train": [p for i, p in enumerate(files) if i % TEST_EVERY != 0],
                  "test": [p for i, p in enumerate(files) if i % TEST_EVERY == 0]}
    for s in SPLITS:
        if not splits[s]:
            where = split_dirs[s] if split_dirs[s].is_dir() else root
            raise DatasetNotFoundError(f"{PREFIX}{root}: no image files ({', '.join(EXTENSIONS)}) for the {s} split "
                                       f"under {where}")
    return splits, classes


def _open(path: Path, name: str):
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(path)
        im.load()
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ValueError(f"{name}: cannot read image {path}: {e}") from None
    return im


def _load(name: str, size: int | None) -> tuple[DatasetInfo, dict[str, list[tuple[Path, int]]]]:
    """(info, {split: [(file, label)]}); the channels and the default size come from the first training image."""
    splits, classes = _scan(name)
    with _open(splits["train"][0][0], name) as im:
        channels, side = (1 if im.mode in GREYSCALE_MODES else 3), min(im.size)
    hw = side if size is None else int(size)
    if hw <= 0:
        raise ValueError(f"size must be positive, got {size}")
    return DatasetInfo(canonical_name(name), (channels, hw, hw), len(classes)), splits


def folder_info(name: str, size: int | None = None) -> DatasetInfo:
    return _load(name, size)[0]


class ImageFolderDataset(Dataset):
    """A split of a ``folder:PATH`` dataset: (uint8 (C, size, size) image, int label), decoded per item."""

    def __init__(self, files: list[tuple[Path, int]], info: DatasetInfo):
        self.files, self.info = files, info
        self.mode = "L" if info.image_shape[0] == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.files[index]
        with _open(path, self.info.name) as im:
            im = im.convert(self.mode)
            w, h = im.size
            c = min(w, h)
            left, top = (w - c) // 2, (h - c) // 2
            im = im.crop((left, top, left + c, top + c))
            size = self.info.image_shape[-1]
            if c != size:
                im = im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
            arr = np.asarray(im, dtype=np.uint8)
        image = torch.from_numpy(arr.copy())
        image = image[None] if image.dim() == 2 else image.permute(2, 0, 1)
        return image.contiguous(), label

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.info.name}, n={len(self)}, shape={self.info.image_shape})"


def folder_dataset(name: str, split: str, size: int | None = None) -> ImageFolderDataset:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} for {name}, got {split!r}")
    info, splits = _load(name, size)
    return ImageFolderDataset(splits[split], info)
