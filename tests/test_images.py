"""Image grids and PNGs (glowfast.images): layout, exact pixel values, atomic write, no torchvision needed."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from glowfast.images import image_grid, save_grid


def test_grid_places_each_image_row_major_with_padding():
    x = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 1, 2, 3) / 10
    g = image_grid(x, nrow=3, pad=1, pad_value=1.0)
    assert g.shape == (2 * 3 + 1, 3 * 4 + 1)
    for i in range(5):
        r, k = divmod(i, 3)
        cell = g[1 + 3 * r: 3 + 3 * r, 1 + 4 * k: 4 + 4 * k]
        assert np.all(cell == np.float32(i / 10))
    assert np.all(g[4:6, 9:12] == 1.0)  # the sixth slot is empty: padding value
    assert np.all(g[0] == 1.0) and np.all(g[:, 0] == 1.0)


def test_grid_of_uint8_rgb_is_hwc_in_unit_range():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    g = image_grid(x, nrow=2, pad=0)
    assert g.shape == (4, 8, 3) and g.max() == 1.0 and g.min() == 1.0


@pytest.mark.parametrize("shape", [(4, 2, 8, 8), (4, 8, 8)])
def test_grid_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match="image_grid needs"):
        image_grid(torch.zeros(shape), nrow=2)


def test_save_grid_writes_the_exact_grayscale_values(tmp_path):
    x = torch.tensor([0, 64, 128, 255], dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 1, 32, 32)
    path = tmp_path / "sub" / "g.png"
    save_grid(x, path, nrow=2)
    img = imread(path)  # float in [0, 1], RGBA
    assert img.shape[:2] == (2 * 33 + 1, 2 * 33 + 1)
    for i, v in enumerate((0, 64, 128, 255)):
        r, k = divmod(i, 2)
        cell = img[1 + 33 * r: 33 + 33 * r, 1 + 33 * k: 33 + 33 * k, :3]
        assert np.allclose(cell, v / 255, atol=0.5 / 255)
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_save_grid_enlarges_small_images(tmp_path):
    path = tmp_path / "d.png"
    save_grid(torch.rand(4, 1, 8, 8), path, nrow=2, min_side=32)
    assert imread(path).shape[:2] == (2 * 33 + 1, 2 * 33 + 1)


def test_save_grid_works_without_torchvision(tmp_path):
    """torchvision is optional (the `vision` extra): the trainer's sample grids must not need it."""
    code = ("import sys; sys.modules['torchvision'] = None\n"
            "import torch, glowfast.trainer as t\n"
            f"t.save_grid(torch.rand(4, 3, 8, 8), __import__('pathlib').Path({str(tmp_path / 'x.png')!r}), 2)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert imread(tmp_path / "x.png").shape[:2] == (2 * 33 + 1, 2 * 33 + 1)


def test_grid_clamps_out_of_range_values_to_the_unit_interval():
    """Model samples can stray outside [0, 1]: the grid clips them to 0 and 1 and leaves in-range pixels as
    they are."""
    x = torch.tensor([[-0.2, 0.25], [0.75, 1.3]]).view(1, 1, 2, 2)
    g = image_grid(x, nrow=1, pad=0)
    assert g.min() == 0.0 and g.max() == 1.0
    np.testing.assert_array_equal(g, np.array([[0.0, 0.25], [0.75, 1.0]], dtype=np.float32))
    rgb = image_grid(torch.stack([x[0, 0]] * 3).unsqueeze(0), nrow=1, pad=0)
    np.testing.assert_array_equal(rgb[..., 1], g)


@pytest.mark.parametrize("side,scale", [(28, 2), (8, 4), (32, 1), (33, 1), (11, 3)])
def test_save_grid_enlarges_by_the_smallest_integer_factor_reaching_min_side(tmp_path, side, scale):
    """Images smaller than min_side are enlarged (nearest) by a whole factor so every cell is at least
    min_side pixels: the smallest such factor, ceil(min_side / side) (28 -> 56, 8 -> 32, 11 -> 33); images
    already min_side or larger stay as they are. Each pixel becomes a scale x scale block of its value."""
    # neighbouring pixels differ by many 8-bit levels (37 per step along a row), so a shifted block shows
    img = (torch.arange(side * side, dtype=torch.int64) * 37).remainder(256).to(torch.uint8).view(1, 1, side, side)
    path = tmp_path / "g.png"
    save_grid(img, path, nrow=1, min_side=32)
    out = imread(path)
    cell = side * scale
    assert cell >= 32 and (scale == 1 or (scale - 1) * side < 32)  # the factors above, checked by hand
    assert out.shape[:2] == (cell + 2, cell + 2)
    expected = np.kron(img[0, 0].numpy() / 255, np.ones((scale, scale)))
    np.testing.assert_allclose(out[1:-1, 1:-1, 0], expected, atol=1.5 / 255)  # the gray colormap may round a level


def test_grid_is_built_on_the_cpu_under_another_default_device(tmp_path):
    """A caller may have set torch's default device (a GPU user: torch.set_default_device("cuda")); the grid is
    still a CPU array. The meta device stands in for the GPU here: any non-CPU default failed the same way."""
    x = torch.rand(3, 1, 4, 5)
    with torch.device("meta"):
        g = image_grid(x, nrow=2, pad=1, pad_value=0.5)
    np.testing.assert_array_equal(g, image_grid(x, nrow=2, pad=1, pad_value=0.5))
    assert g.shape == (2 * 5 + 1, 2 * 6 + 1)
    with torch.device("meta"):
        save_grid(x, tmp_path / "grid.png", nrow=2, min_side=4)
    assert imread(tmp_path / "grid.png").shape[:2] == g.shape
