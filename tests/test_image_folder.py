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


def _split_files(name):
    return {s: [str(f) for f, _ in get_dataset(name, s).files] for s in ("train", "test")}


def test_a_flat_folder_holds_out_a_tenth_chosen_by_path(tmp_path):
    """No train/ and test/: unlabelled (images at the top level too), found recursively, about a tenth held out,
    disjoint from the training split, together all of them -- and a file's split never changes when other files are
    added (before or after it in sorted order), so a model evaluated after new images arrive scores no training
    image as a test image."""
    sources = {}
    for i, arr in enumerate(_digits(200)):
        rel = f"{'ab'[i % 2]}/{i:03d}.png" if i % 3 else f"{i:03d}.png"
        sources[str((tmp_path / rel).resolve())] = _write(tmp_path / rel, arr)
    (tmp_path / "notes.txt").write_text("not an image")
    _write(tmp_path / ".hidden" / "x.png", _digits(1, 300)[0])  # hidden folders are skipped
    name = f"folder:{tmp_path}"
    assert dataset_info(name).n_classes == 0
    before = _split_files(name)
    assert not set(before["train"]) & set(before["test"])
    assert sorted(before["train"] + before["test"]) == sorted(sources)
    assert 10 <= len(before["test"]) <= 30
    for s in ("train", "test"):
        ds = get_dataset(name, s)
        for i in range(len(ds)):
            image, label = ds[i]
            assert label == 0 and torch.equal(image[0], torch.from_numpy(sources[str(ds.files[i][0])]))
    for i, arr in enumerate(_digits(40, 400)):  # new files sorting first, in between and last
        _write(tmp_path / f"{'0a'[i % 2]}{i:03d}.png", arr)
    after = _split_files(name)
    for s in ("train", "test"):
        assert set(before[s]) <= set(after[s])


def test_one_class_folder_is_unlabelled_and_a_flat_labelled_folder_keeps_its_labels(tmp_path):
    for i, arr in enumerate(_digits(40)):
        _write(tmp_path / "one" / "images" / f"{i:02d}.png", arr)
    assert dataset_info(f"folder:{tmp_path / 'one'}").n_classes == 0  # one class is no label
    for i, arr in enumerate(_digits(60)):
        _write(tmp_path / "two" / ("cats" if i < 30 else "dogs") / f"{i:02d}.png", arr)
    name = f"folder:{tmp_path / 'two'}"
    assert dataset_info(name).n_classes == 2
    for s in ("train", "test"):
        files = get_dataset(name, s).files
        assert files and all(label == (0 if f.parent.name == "cats" else 1) for f, label in files)


def _write_split(root, split: str, cls: str | None, arrays):
    for i, arr in enumerate(arrays):
        _write(root / split / (cls or "") / f"{i:02d}.png", arr)


def test_split_folders_val_partial_test_classes_and_lone_folders(tmp_path):
    """val/ (or valid/, validation/) serves as the test split beside train/; a labelled train/ labels test/ by its
    classes even where test/ has only some of them; train/ or test/ alone is an error, not a silent relabelling."""
    d = _digits(12)
    for cls in ("c0", "c1", "c2"):
        _write_split(tmp_path / "tv", "train", cls, d[:3])
        _write_split(tmp_path / "tv", "val", cls, d[3:4])
    info = dataset_info(f"folder:{tmp_path / 'tv'}")
    assert info.n_classes == 3
    assert [label for _, label in get_dataset(f"folder:{tmp_path / 'tv'}", "test").files] == [0, 1, 2]

    for cls in ("a", "b"):
        _write_split(tmp_path / "partial", "train", cls, d[:3])
    _write_split(tmp_path / "partial", "test", "b", d[3:5])
    partial = f"folder:{tmp_path / 'partial'}"
    assert dataset_info(partial).n_classes == 2
    assert [label for _, label in get_dataset(partial, "test").files] == [1, 1]

    _write_split(tmp_path / "loose", "train", "a", d[:3])
    _write_split(tmp_path / "loose", "train", "b", d[:3])
    _write_split(tmp_path / "loose", "test", None, d[3:5])
    with pytest.raises(ValueError, match=r"test/ holds images outside class folders, but train/ is labelled by its "
                                         r"class folders \['a', 'b'\]"):
        dataset_info(f"folder:{tmp_path / 'loose'}")

    _write_split(tmp_path / "trainonly", "train", "a", d[:3])
    with pytest.raises(ValueError, match=r"has train/ but no test/, val/, valid/, validation/ beside it; add one, or "
                                         r"name folder:\S+trainonly/train to hold out"):
        dataset_info(f"folder:{tmp_path / 'trainonly'}")
    _write_split(tmp_path / "testonly", "test", None, d[:3])
    with pytest.raises(ValueError, match="has test/ but no train/ beside it"):
        dataset_info(f"folder:{tmp_path / 'testonly'}")


def test_run_folders_are_skipped_and_symbolic_links_followed_once(tmp_path):
    """A glowfast run started inside the image folder (config.json beside checkpoints/) is not data; a symbolic link
    to a folder of images is followed, and a link cycle does not loop."""
    d = _digits(45)
    root = tmp_path / "imgs"
    _write_split(root, "real", None, d[:20])
    _write_split(root, ".", None, d[40:45])  # images of its own: unlabelled, every image found once
    _write_split(tmp_path, "elsewhere", None, d[20:40])
    (root / "linked").symlink_to(tmp_path / "elsewhere")
    (root / "real" / "loop").symlink_to(root)
    run = root / "runs" / "r1"
    _write_split(run, "samples", None, d[:5])
    (run / "checkpoints").mkdir()
    (run / "config.json").write_text("{}")
    files = _split_files(f"folder:{root}")
    found = files["train"] + files["test"]
    assert len(found) == 45 and not any("runs" in f for f in found)
    assert sum("linked" in f for f in found) == 20


def test_sixteen_bit_greyscale_keeps_its_high_byte_and_float_pixels_are_refused(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    for split in ("train", "test"):
        _write(tmp_path / "i16" / split / "a.png", ramp)  # PIL saves uint16 arrays as 16-bit greyscale
        Image.frombytes("I;16B", (8, 8), ramp.astype(">u2").tobytes()).save(tmp_path / "i16b" / split / "a.tif") \
            if (tmp_path / "i16b" / split).mkdir(parents=True) is None else None
    for folder in ("i16", "i16b"):
        name = f"folder:{tmp_path / folder}"
        assert dataset_info(name).image_shape == (1, 8, 8)
        assert torch.equal(get_dataset(name, "train")[0][0][0], torch.from_numpy((ramp >> 8).astype(np.uint8)))
    for split in ("train", "test"):
        (tmp_path / "float" / split).mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 0.5, np.float32), "F").save(tmp_path / "float" / split / "a.tif")
    with pytest.raises(ValueError, match=r"a.tif has floating-point pixels \(PIL mode F\), whose range is unknown"):
        dataset_info(f"folder:{tmp_path / 'float'}")


def test_centre_crop_resize_and_channels(tmp_path):
    """A non-square image is centre-cropped to its shorter side, then resized; colour images give 3 channels and
    a folder whose first training image is greyscale gives 1, converting colour files (grey RGB pixels keep their
    value); channels=1 or 3 converts every image."""
    digits = _digits(3)
    tall = np.concatenate([np.full((2, 8, 3), 255, np.uint8), np.stack([digits[0]] * 3, -1),
                           np.zeros((2, 8, 3), np.uint8)])  # 12 high, 8 wide: the crop keeps rows 2..9
    colour = np.stack([digits[0], digits[1], digits[2]], -1)
    _write(tmp_path / "rgb" / "train" / "a.png", tall)
    _write(tmp_path / "rgb" / "test" / "a.png", colour)
    name = f"folder:{tmp_path / 'rgb'}"
    assert dataset_info(name).image_shape == (3, 8, 8)
    assert torch.equal(get_dataset(name, "train")[0][0], torch.from_numpy(tall[2:10]).permute(2, 0, 1))
    assert torch.equal(get_dataset(name, "test")[0][0], torch.from_numpy(colour).permute(2, 0, 1))
    small = get_dataset(name, "test", size=4)
    assert small[0][0].shape == (3, 4, 4) and dataset_info(name, 4).image_shape == (3, 4, 4)
    grey_of_colour = get_dataset(name, "test", channels=1)[0][0]
    assert grey_of_colour.shape == (1, 8, 8) and dataset_info(name, channels=1).image_shape == (1, 8, 8)
    with pytest.raises(ValueError, match="channels must be 1 \\(greyscale\\) or 3 \\(RGB\\), got 2"):
        dataset_info(name, channels=2)
    with pytest.raises(ValueError, match="channels applies only to folder:PATH datasets"):
        dataset_info("digits", channels=1)

    _write(tmp_path / "flat" / "train" / "a.png", np.full((6, 10), 77, np.uint8))
    _write(tmp_path / "flat" / "test" / "a.png", digits[0])
    assert torch.equal(get_dataset(f"folder:{tmp_path / 'flat'}", "train", size=3)[0][0],
                       torch.full((1, 3, 3), 77, dtype=torch.uint8))  # a resize keeps a constant image constant

    _write(tmp_path / "grey" / "train" / "b.png", digits[0])  # the first training image decides: greyscale
    _write(tmp_path / "grey" / "train" / "c.png", np.full((8, 8, 3), 200, np.uint8))
    _write(tmp_path / "grey" / "test" / "a.png", np.full((8, 8, 3), 9, np.uint8))  # the test split's: not it
    grey = f"folder:{tmp_path / 'grey'}"
    assert dataset_info(grey).image_shape == (1, 8, 8)
    assert torch.equal(get_dataset(grey, "train")[1][0], torch.full((1, 8, 8), 200, dtype=torch.uint8))
    assert get_dataset(grey, "train", channels=3)[0][0].shape == (3, 8, 8)


def test_bad_folders_and_files_are_named(tmp_path):
    from glowfast.image_folder import ImageReadError

    with pytest.raises(DatasetNotFoundError, match="no such folder"):
        dataset_info(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("x")
    with pytest.raises(DatasetNotFoundError, match=r"no image files \(\.png.*for the train split"):
        get_dataset(f"folder:{tmp_path / 'empty'}", "train")
    _write(tmp_path / "single" / "a.png", _digits(1)[0])
    with pytest.raises(ValueError, match=r"the hold-out \(a tenth of the files, chosen by their paths\) leaves the "
                                         r"(train|test) split of these 1 images empty; add images, or give train/"):
        dataset_info(f"folder:{tmp_path / 'single'}")
    (tmp_path / "splits" / "train").mkdir(parents=True)
    _write(tmp_path / "splits" / "test" / "a.png", _digits(1)[0])
    with pytest.raises(DatasetNotFoundError, match=f"for the train split under {tmp_path / 'splits' / 'train'}"):
        dataset_info(f"folder:{tmp_path / 'splits'}")
    with pytest.raises(ValueError, match="no folder given; write folder:PATH"):
        dataset_info("folder:")
    with pytest.raises(ValueError, match="split must be one of"):
        get_dataset(f"folder:{tmp_path / 'splits'}", "valid")

    for split in ("train", "test"):
        _write_split(tmp_path / "bad", split, None, _digits(3))
    (tmp_path / "bad" / "train" / "03.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = get_dataset(f"folder:{tmp_path / 'bad'}", "train")
    assert ds[0][0].shape == (1, 8, 8)
    with pytest.raises(ImageReadError, match=f"cannot read image {tmp_path / 'bad' / 'train' / '03.png'}"):
        ds[len(ds) - 1]

    for split, classes in (("train", ("a", "b")), ("test", ("a", "c"))):
        for cls in classes:
            _write(tmp_path / "classes" / split / cls / "0.png", _digits(1)[0])
    with pytest.raises(ValueError, match=r"test/ holds classes \['c'\], but train/ is labelled by its class folders "
                                         r"\['a', 'b'\]"):
        dataset_info(f"folder:{tmp_path / 'classes'}")


def test_train_and_evaluate_clis_on_a_folder(tmp_path, monkeypatch, capsys):
    """python -m glowfast.train --dataset folder:PATH (a relative path) records the absolute path, the size and the
    channels (so images added later cannot change them); evaluate scores both splits of it by name (folder:PATH and
    folder:PATH:train, also inverted-folder:PATH), with file names it can write and that never collide."""
    import re

    from glowfast.evaluate import main as evaluate_main
    from glowfast.train import main as train_main

    from test_train import TINY

    for i, arr in enumerate(_digits(120)):
        _write(tmp_path / "mine" / ("even" if i % 2 == 0 else "odd") / f"{i:03d}.png", arr)
    monkeypatch.chdir(tmp_path)
    n_test = len(get_dataset("folder:mine", "test"))
    args = list(TINY)
    args[args.index("digits")] = "folder:mine"
    run = tmp_path / "run"
    assert train_main(args + ["--batch-size", "16", "--init-batch-size", "16", "--steps", "3", "--y-condition",
                              "--run-dir", str(run)]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["dataset"] == "folder:" + str((tmp_path / "mine").resolve())
    assert (cfg["size"], cfg["channels"]) == (8, 1)
    summary = json.loads((run / "summary.json").read_text())
    assert np.isfinite(summary["test_bpd"])

    _write(tmp_path / "mine" / "even" / "000a.png", np.zeros((16, 16, 3), np.uint8))  # a larger colour image first
    out, scores = tmp_path / "eval.json", tmp_path / "scores"
    assert evaluate_main(["--run", str(run), "--datasets", "folder:mine", "folder:./mine:train", "--labels",
                          "--device", "cpu", "--json", str(out), "--save-scores", str(scores)]) == 0
    rows = json.loads(out.read_text())["rows"]
    key = cfg["dataset"]
    assert [r["dataset"] for r in rows] == [f"{key}:test", f"{key}:train"]
    assert sum(r["n"] for r in rows) == 121 and all(r["score"] == "p(x | label)" for r in rows)
    assert rows[0]["n"] == n_test  # the new file's path puts it in the training split: the test split is the run's
    assert rows[0]["mean_bpd"] == pytest.approx(summary["test_bpd"], rel=1e-5)
    names = sorted(p.name for p in scores.iterdir())
    assert len(names) == 4 and all(re.fullmatch(r"folder_[A-Za-z0-9._-]*mine_(test|train)_[0-9a-f]{8}(_index)?\.npy",
                                                n) for n in names)
    assert evaluate_main(["--run", str(run), "--datasets", "inverted-folder:mine", "--device", "cpu",
                          "--json", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][0]["dataset"] == f"inverted-{key}:test"

    _write_split(tmp_path / "x", "y", None, _digits(40))  # folder:x/y and folder:x_y share the readable stem
    _write_split(tmp_path, "x_y", None, _digits(40))
    sc2 = tmp_path / "sc2"
    assert evaluate_main(["--run", str(run), "--datasets", "folder:x/y", "folder:x_y", "--device", "cpu",
                          "--save-scores", str(sc2)]) == 0
    assert len(list(sc2.iterdir())) == 4

    assert evaluate_main(["--run", str(run), "--datasets", "folder:missing", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"error: folder:{tmp_path / 'missing'}: no such folder" in err
    assert evaluate_main(["--run", str(run), "--datasets", "folder:", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == "error: folder: no folder given; write folder:PATH\n"


def test_resume_repoints_a_moved_folder_and_a_bad_image_stops_in_one_line(tmp_path, monkeypatch, capsys):
    """--resume RUN --dataset folder:NEW continues a run whose images moved (same files: the run is exact); an image
    that cannot be decoded mid-run stops it with one line naming the file, exit 1, its checkpoints kept."""
    from test_train_resume import _assert_same_weights

    from glowfast.checkpoint import LAST, load_checkpoint
    from glowfast.train import main as train_main

    from test_train import TINY

    for i, arr in enumerate(_digits(100)):
        _write(tmp_path / "imgs" / f"{i:03d}.png", arr)
    args = list(TINY)
    args[args.index("digits")] = f"folder:{tmp_path / 'imgs'}"
    args += ["--batch-size", "16", "--init-batch-size", "16", "--eval-interval", "4", "--ckpt-interval", "4"]
    whole, run = tmp_path / "whole", tmp_path / "run"
    assert train_main(args + ["--steps", "8", "--run-dir", str(whole)]) == 0
    assert train_main(args + ["--steps", "4", "--run-dir", str(run)]) == 0
    (tmp_path / "imgs").rename(tmp_path / "moved")
    capsys.readouterr()
    assert train_main(["--resume", str(run), "--steps", "8", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == f"error: folder:{tmp_path / 'imgs'}: no such folder"
    monkeypatch.chdir(tmp_path)
    assert train_main(["--resume", str(run), "--steps", "8", "--no-progress", "--dataset", "folder:moved"]) == 0
    assert f"note: the run's images are now read from folder:{tmp_path / 'moved'}" in capsys.readouterr().err
    _assert_same_weights(whole, run)
    assert json.loads((run / "config.json").read_text())["dataset"] == f"folder:{tmp_path / 'moved'}"

    train = get_dataset(f"folder:{tmp_path / 'moved'}", "train").files
    train[5][0].write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # read in the first epoch of 5 batches
    bad = tmp_path / "bad"
    assert train_main(args[:args.index("folder:" + str(tmp_path / "imgs"))] + [f"folder:{tmp_path / 'moved'}"]
                      + args[args.index("folder:" + str(tmp_path / "imgs")) + 1:]
                      + ["--steps", "8", "--run-dir", str(bad), "--init-batch-size", "4"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: stopped at step ") and f"cannot read image {train[5][0]}" in err[-1]
    assert not any("Traceback" in line for line in err)
    step = int(err[-1].split("stopped at step ")[1].split(":")[0])
    assert step < 8 and err[-1].endswith(f"; resume with --resume {bad}")
    if (bad / "checkpoints" / LAST).exists():  # what was checkpointed before the bad image stands
        assert load_checkpoint(bad / "checkpoints" / LAST)["step"] <= step


# Python >= 3.12 warns that forking a multi-threaded process (torch has threads) may deadlock: why 3.14 moved
# Linux off fork; the fork case is what 3.11-3.13 users get by default
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")
@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_loader_workers_start_once_and_train_the_same_run(tmp_path, start_method):
    """--num-workers 2 decodes a folder's images in two worker processes, started by Python's default method (fork on
    Linux up to 3.13; forkserver from 3.14, which pickles the dataset and re-imports torch in each worker). The same
    two workers serve every epoch, and the run (three epochs, --hflip) trains the weights of reading in the main
    process."""
    import multiprocessing

    from test_train_resume import _assert_same_weights

    from glowfast.train import main as train_main

    from test_train import TINY

    for i, arr in enumerate(_digits(60)):
        _write(tmp_path / "imgs" / f"{i:03d}.png", arr)
    args = list(TINY)
    args[args.index("digits")] = f"folder:{tmp_path / 'imgs'}"
    args += ["--batch-size", "16", "--init-batch-size", "16", "--steps", "7", "--hflip"]
    assert train_main(args + ["--run-dir", str(tmp_path / "main")]) == 0

    workers_by_epoch: dict[int, set] = {}
    others = {p.pid for p in multiprocessing.active_children()}  # children this process had before (none, usually)

    def record(event, trainer):
        if event == "before_step":  # the step's batch has been read
            pids = {p.pid for p in multiprocessing.active_children()} - others
            workers_by_epoch.setdefault(trainer.epoch, set()).add(frozenset(pids))

    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method(start_method, force=True)
    try:
        assert train_main(args + ["--num-workers", "2", "--run-dir", str(tmp_path / "workers")],
                          callbacks=[record]) == 0
    finally:
        multiprocessing.set_start_method(before, force=True)
    assert sorted(workers_by_epoch) == [0, 1, 2]  # 53 training images: 3 batches of 16 an epoch
    seen = set().union(*workers_by_epoch.values())
    assert len(seen) == 1 and len(next(iter(seen))) == 2, workers_by_epoch
    assert not {p.pid for p in multiprocessing.active_children()} - others  # the run's end stopped them
    _assert_same_weights(tmp_path / "main", tmp_path / "workers")
