"""A folder of your own images as a dataset (``folder:PATH``, glowfast.image_folder): layouts, labels, splits,
decoding, errors, and the train / evaluate CLIs on it.

The images are scikit-learn's 8x8 digits written as PNG files (lossless: read back, they must equal the source)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from glowfast.data import DatasetNotFoundError, dataset_info, get_dataset


def _digits(n: int, start: int = 0) -> np.ndarray:
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.rint(d.images[start:start + n] * (255.0 / 16.0)).astype(np.uint8)


def _write(path, array: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def test_train_and_test_folders_with_classes_read_back_exactly(tmp_path):
    """PATH/train and PATH/test in the ImageFolder layout: classes numbered in sorted name order, every image the
    PNG's pixels, the dataset's name the absolute path."""
    images = iter(_digits(20))
    expected = {"train": {}, "test": {}}  # file -> (pixels, label)
    for split, per_class in (("train", 4), ("test", 2)):
        for cls in ("zero", "one", "two"):  # sorted: one = 0, two = 1, zero = 2
            for i in range(per_class):
                path = tmp_path / "set" / split / cls / f"{i:02d}.png"
                expected[split][path.resolve()] = (_write(path, next(images)), ["one", "two", "zero"].index(cls))
    name = "folder:" + str(tmp_path / "set")
    info = dataset_info(name)
    assert info.name == "folder:" + str((tmp_path / "set").resolve())
    assert info.image_shape == (1, 8, 8) and info.n_classes == 3
    for split in ("train", "test"):
        ds = get_dataset(name, split)
        assert sorted(f for f, _ in ds.files) == sorted(expected[split])
        for i in range(len(ds)):
            image, label = ds[i]
            arr, cls = expected[split][ds.files[i][0]]
            assert image.dtype == torch.uint8 and image.shape == (1, 8, 8)
            assert torch.equal(image[0], torch.from_numpy(arr)) and label == cls


def test_a_flat_folder_holds_out_every_tenth_image(tmp_path):
    """No train/ and test/: unlabelled (images at the top level too), found recursively, and the test split is
    the 1st, 11th, 21st, ... file in sorted path order -- disjoint from the training split, together all of them."""
    sources = {}
    for i, arr in enumerate(_digits(25)):
        rel = f"{'ab'[i % 2]}/{i:02d}.png" if i % 3 else f"{i:02d}.png"
        sources[str((tmp_path / rel).resolve())] = _write(tmp_path / rel, arr)
    (tmp_path / "notes.txt").write_text("not an image")
    _write(tmp_path / ".hidden" / "x.png", _digits(1, 100)[0])  # hidden folders are skipped
    name = f"folder:{tmp_path}"
    assert dataset_info(name).n_classes == 0
    order = sorted(sources)
    splits = {s: get_dataset(name, s) for s in ("train", "test")}
    assert [str(f) for f, _ in splits["test"].files] == order[::10]
    assert sorted(str(f) for f, _ in splits["train"].files) == [p for i, p in enumerate(order) if i % 10]
    for ds in splits.values():
        for i in range(len(ds)):
            image, label = ds[i]
            assert label == 0 and torch.equal(image[0], torch.from_numpy(sources[str(ds.files[i][0])]))


def test_one_class_folder_is_unlabelled_and_a_flat_labelled_folder_is_split_per_file(tmp_path):
    for i, arr in enumerate(_digits(5)):
        _write(tmp_path / "one" / "images" / f"{i}.png", arr)
    assert dataset_info(f"folder:{tmp_path / 'one'}").n_classes == 0  # one class is no label
    for i, arr in enumerate(_digits(12)):
        _write(tmp_path / "two" / ("cats" if i < 6 else "dogs") / f"{i:02d}.png", arr)
    name = f"folder:{tmp_path / 'two'}"
    assert dataset_info(name).n_classes == 2
    test = get_dataset(name, "test")
    assert [(f.name, label) for f, label in test.files] == [("00.png", 0), ("10.png", 1)]


def test_centre_crop_resize_and_channels(tmp_path):
    """A non-square image is centre-cropped to its shorter side, then resized; colour images give 3 channels and
    a folder whose first image is greyscale gives 1, converting colour files (grey RGB pixels keep their value)."""
    digits = _digits(3)
    tall = np.concatenate([np.full((2, 8, 3), 255, np.uint8), np.stack([digits[0]] * 3, -1),
                           np.zeros((2, 8, 3), np.uint8)])  # 12 high, 8 wide: the crop keeps rows 2..9
    colour = np.stack([digits[0], digits[1], digits[2]], -1)
    _write(tmp_path / "rgb" / "a.png", colour)
    _write(tmp_path / "rgb" / "b.png", tall)
    name = f"folder:{tmp_path / 'rgb'}"
    assert dataset_info(name).image_shape == (3, 8, 8)
    ds = get_dataset(name, "train")  # 2 images: the first is the test split's
    assert len(ds) == 1 and ds.files[0][0].name == "b.png"
    image, _ = ds[0]
    assert torch.equal(image, torch.from_numpy(tall[2:10]).permute(2, 0, 1))
    assert torch.equal(get_dataset(name, "test")[0][0], torch.from_numpy(colour).permute(2, 0, 1))

    small = get_dataset(name, "test", size=4)
    assert small[0][0].shape == (3, 4, 4) and dataset_info(name, 4).image_shape == (3, 4, 4)
    _write(tmp_path / "flat" / "a.png", np.full((6, 10), 77, np.uint8))
    _write(tmp_path / "flat" / "b.png", digits[0])
    assert torch.equal(get_dataset(f"folder:{tmp_path / 'flat'}", "test", size=3)[0][0],
                       torch.full((1, 3, 3), 77, dtype=torch.uint8))  # a resize keeps a constant image constant

    _write(tmp_path / "grey" / "a.png", np.full((8, 8, 3), 9, np.uint8))  # the test split's: not the first
    _write(tmp_path / "grey" / "b.png", digits[0])  # the first training image decides: greyscale
    _write(tmp_path / "grey" / "c.png", np.full((8, 8, 3), 200, np.uint8))
    grey = f"folder:{tmp_path / 'grey'}"
    assert dataset_info(grey).image_shape == (1, 8, 8)
    assert torch.equal(get_dataset(grey, "train")[1][0], torch.full((1, 8, 8), 200, dtype=torch.uint8))


def test_bad_folders_and_files_are_named(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="no such folder"):
        dataset_info(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("x")
    with pytest.raises(DatasetNotFoundError, match=r"no image files \(\.png.*for the train split"):
        get_dataset(f"folder:{tmp_path / 'empty'}", "train")
    _write(tmp_path / "single" / "a.png", _digits(1)[0])  # one image: all of it would be the test split
    with pytest.raises(ValueError, match="only 1 image; with every 10th held out for the test split, the training "
                                         "split needs at least 2"):
        dataset_info(f"folder:{tmp_path / 'single'}")
    (tmp_path / "splits" / "train").mkdir(parents=True)
    _write(tmp_path / "splits" / "test" / "a.png", _digits(1)[0])
    with pytest.raises(DatasetNotFoundError, match=f"for the train split under {tmp_path / 'splits' / 'train'}"):
        dataset_info(f"folder:{tmp_path / 'splits'}")
    with pytest.raises(ValueError, match="no folder given; write folder:PATH"):
        dataset_info("folder:")
    with pytest.raises(ValueError, match="split must be one of"):
        get_dataset(f"folder:{tmp_path / 'splits'}", "valid")

    for i, arr in enumerate(_digits(3)):
        _write(tmp_path / "bad" / f"{i}.png", arr)
    (tmp_path / "bad" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = get_dataset(f"folder:{tmp_path / 'bad'}", "train")
    assert ds[0][0].shape == (1, 8, 8)
    with pytest.raises(ValueError, match=f"cannot read image {tmp_path / 'bad' / '3.png'}"):
        ds[len(ds) - 1]

    for split, classes in (("train", ("a", "b")), ("test", ("a", "c"))):
        for cls in classes:
            _write(tmp_path / "classes" / split / cls / "0.png", _digits(1)[0])
    with pytest.raises(ValueError, match=r"test classes \['c'\] are not among the training classes \['a', 'b'\]"):
        dataset_info(f"folder:{tmp_path / 'classes'}")


def test_train_and_evaluate_clis_on_a_folder(tmp_path, monkeypatch, capsys):
    """python -m glowfast.train --dataset folder:PATH (a relative path) records the absolute path; evaluate scores
    both splits of it by name (folder:PATH and folder:PATH:train), with file names it can write."""
    from glowfast.evaluate import main as evaluate_main
    from glowfast.train import main as train_main

    from test_train import TINY

    for i, arr in enumerate(_digits(60)):
        _write(tmp_path / "mine" / ("even" if i % 2 == 0 else "odd") / f"{i:02d}.png", arr)
    monkeypatch.chdir(tmp_path)
    args = list(TINY)
    args[args.index("digits")] = "folder:mine"
    run = tmp_path / "run"
    assert train_main(args + ["--batch-size", "16", "--init-batch-size", "16", "--steps", "3", "--y-condition",
                              "--run-dir", str(run)]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["dataset"] == "folder:" + str((tmp_path / "mine").resolve())
    summary = json.loads((run / "summary.json").read_text())
    assert np.isfinite(summary["test_bpd"])

    out, scores = tmp_path / "eval.json", tmp_path / "scores"
    assert evaluate_main(["--run", str(run), "--datasets", "folder:mine", "folder:./mine:train", "--labels",
                          "--device", "cpu", "--json", str(out), "--save-scores", str(scores)]) == 0
    rows = json.loads(out.read_text())["rows"]
    key = cfg["dataset"]
    assert [r["dataset"] for r in rows] == [f"{key}:test", f"{key}:train"]
    assert [r["n"] for r in rows] == [6, 54] and all(r["score"] == "p(x | label)" for r in rows)
    assert rows[0]["mean_bpd"] == pytest.approx(summary["test_bpd"], rel=1e-5)
    names = sorted(p.name for p in scores.iterdir())  # one stem per set: the key with '/' and ':' as '_'
    assert len(names) == 4 and all(set(n) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
                                   for n in names)
    test_scores = [n for n in names if n.endswith("_test.npy")]
    assert len(test_scores) == 1 and test_scores[0].startswith("folder_") and "mine" in test_scores[0]
    assert np.load(scores / test_scores[0]).shape == (6,)
    assert evaluate_main(["--run", str(run), "--datasets", "folder:missing", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"error: folder:{tmp_path / 'missing'}: no such folder" in err
    assert evaluate_main(["--run", str(run), "--datasets", "folder:", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == "error: folder: no folder given; write folder:PATH\n"
