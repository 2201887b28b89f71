"""python -m glowfast.sample: grids per temperature (and class), latent interpolation, from a real tiny run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from glowfast.checkpoint import find_checkpoint
from glowfast.data import get_dataset
from glowfast.sample import interpolate, load_model
from glowfast.sample import main as sample_main
from glowfast.train import main as train_main

# Grid cell: 8x8 digits are saved enlarged 4x (nearest) to 32x32, plus 1 px of padding.
CELL = 33

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "-K", "2", "-L", "2", "--hidden-channels", "16", "--batch-size", "128",
        "--init-batch-size", "64", "--steps", "3", "--eval-interval", "3", "--temperatures", "0.7", "--threads", "1",
        "--no-progress", "--device", "cpu", "--backend", "reference"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert train_main(TINY + ["--run-dir", str(root / "plain")]) == 0
    assert train_main(TINY + ["--y-condition", "--run-dir", str(root / "cond")]) == 0
    return root


def _size(p: Path) -> tuple[int, int]:
    with Image.open(p) as im:
        return im.size


def test_sample_grids_and_interpolation(runs, tmp_path):
    out = tmp_path / "out"
    rc = sample_main(["--run", str(runs / "plain"), "--temperatures", "0", "0.5", "1.0", "--n", "16",
                      "--interpolate-pairs", "3", "--steps", "5", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    for t in ("0", "0.5", "1"):
        assert _size(out / f"samples_t{t}.png") == (4 * CELL + 1, 4 * CELL + 1)
    assert _size(out / "interpolation.png") == (5 * CELL + 1, 3 * CELL + 1)  # rows = pairs, columns = steps


def test_class_conditional_grids(runs, tmp_path):
    out = tmp_path / "cond"
    rc = sample_main(["--checkpoint", str(runs / "cond" / "checkpoints" / "last.pt"), "--temperatures", "0.7",
                      "--n", "4", "--per-class", "2", "--interpolate-pairs", "0", "--out", str(out)])
    assert rc == 0
    assert _size(out / "samples_t0.7.png") == (2 * CELL + 1, 10 * CELL + 1)
    for c in range(10):
        assert _size(out / f"class{c}_t0.7.png") == (2 * CELL + 1, 2 * CELL + 1)
    assert not (out / "interpolation.png").exists()


def test_interpolation_end_points_reconstruct_the_images(runs):
    _, state = find_checkpoint(runs / "plain")
    model = load_model(state, torch.device("cpu"), "reference")
    test = get_dataset("digits", "test")
    x = torch.stack([test[i][0] for i in range(4)])
    path = interpolate(model, x[:2], x[2:], 4)
    assert path.shape == (2, 4, 1, 8, 8) and path.min() >= 0 and path.max() <= 1
    assert torch.equal(torch.round(path[:, 0] * 255).to(torch.uint8), x[:2])
    assert torch.equal(torch.round(path[:, -1] * 255).to(torch.uint8), x[2:])


def test_sample_cli_errors(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "glowfast.sample", "--run", str(tmp_path)], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "checkpoint" in out.stderr
    assert sample_main([]) == 2


def test_bad_arguments_are_one_line_errors_before_any_output(runs, tmp_path, capsys):
    """Each was a traceback, some after grids were already written (found by a review)."""
    run = runs / "plain"
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for args, message in (
        (["--device", "gpu"], "error: --device gpu: not a device (auto, cpu, cuda or cuda:N)"),
        (["--temperatures", "0.5", "-1"], "error: --temperatures must be finite and >= 0, got -1.0"),
        (["--out", str(a_file)], f"error: --out {a_file} is a file, not a folder"),
    ):
        out = tmp_path / "out"
        assert sample_main(["--run", str(run), "--out", str(out), "--interpolate-pairs", "0", *args]) == 2, args
        assert capsys.readouterr().err.strip() == message
        assert not out.exists()


def test_checkpoint_named_within_the_run(runs, tmp_path):
    """--run RUN --checkpoint NAME: a checkpoint of that run (the help says so; it was looked up in the working
    directory)."""
    from glowfast.checkpoint import LAST

    run = runs / "plain"
    out = tmp_path / "out"
    assert sample_main(["--run", str(run), "--checkpoint", LAST, "--out", str(out), "--interpolate-pairs", "0",
                        "--temperatures", "1"]) == 0
    assert (out / "samples_t1.png").exists()


def test_a_missing_checkpoint_named_within_the_run_is_one_clear_line(runs, tmp_path, capsys):
    """A run with one checkpoint has no prev.pt: the error says where it looked (it read "no usable checkpoint in
    prev.pt: no last.pt or prev.pt in prev.pt")."""
    run = runs / "plain"
    missing = "never.pt"
    assert sample_main(["--run", str(run), "--checkpoint", missing, "--out", str(tmp_path / "out"),
                        "--interpolate-pairs", "0", "--temperatures", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"--checkpoint {missing}: not found (looked for {missing}, {run / 'checkpoints' / missing} "
                        f"and {run / missing})"), err
    assert "\n" not in err
