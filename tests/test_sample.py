"""python -m glowfast.sample: grids per temperature (and class), latent interpolation, from a real tiny run."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glowfast.checkpoint import find_checkpoint
from glowfast.data import get_dataset
from glowfast.sample import interpolate, load_model
from glowfast.sample import main as sample_main
from glowfast.train import main as train_main

from conftest import cuda_devices
from helpers import BEYOND, BEYOND_MESSAGE

# Grid cell: 8x8 digits are saved enlarged 4x (nearest) to 32x32, plus 1 px of padding.
CELL = 33

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "-K", "2", "-L", "2", "--hidden-channels", "16", "--batch-size", "128",
        "--init-batch-size", "64", "--steps", "3", "--eval-interval", "3", "--temperatures", "0.7", "--threads", "1",
        "--no-progress", "--device", "cpu", "--backend", "reference"]


# one pytest-xdist worker for this module (gpu_check.sh runs the suite with --dist loadgroup): its module-scoped fixture
# is expensive and would otherwise be rebuilt by every worker that gets one of its tests
pytestmark = pytest.mark.xdist_group("sample")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert train_main(TINY + ["--run-dir", str(root / "plain")]) == 0
    assert train_main(TINY + ["--y-condition", "--run-dir", str(root / "cond")]) == 0
    return root


def _size(p: Path) -> tuple[int, int]:
    with Image.open(p) as im:
        return im.size


def _cells(p: Path, rows: int, cols: int) -> np.ndarray:
    """The (rows, cols, 32, 32) grey levels of a sample grid's cells (glowfast.images.save_grid's layout: 1 px of
    padding before every row and column, 8x8 images enlarged to 32x32)."""
    with Image.open(p) as im:
        a = np.asarray(im.convert("RGB"))[..., 0]
    assert a.shape == (rows * CELL + 1, cols * CELL + 1)
    return np.stack([np.stack([a[1 + r * CELL: r * CELL + CELL, 1 + k * CELL: k * CELL + CELL] for k in range(cols)])
                     for r in range(rows)])


def test_sample_grids_and_interpolation(runs, tmp_path):
    out = tmp_path / "out"
    rc = sample_main(["--run", str(runs / "plain"), "--temperatures", "0", "0.5", "1.0", "--n", "16",
                      "--interpolate-pairs", "3", "--steps", "5", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    for t in ("0", "0.5", "1"):
        assert _size(out / f"samples_t{t}.png") == (4 * CELL + 1, 4 * CELL + 1)
    assert _size(out / "interpolation.png") == (5 * CELL + 1, 3 * CELL + 1)  # rows = pairs, columns = steps
    # T = 0 draws every latent at its prior's mean (the top prior's is fixed, each split prior's a function of the
    # levels decoded before it): all 16 samples are the same image. T = 1 draws differ from it and from each other
    # (the grids were sampled at the temperatures asked for, not all at one).
    grids = {t: _cells(out / f"samples_t{t}.png", 4, 4).reshape(16, 32, 32) for t in ("0", "0.5", "1")}
    assert (grids["0"] == grids["0"][0]).all(), "the T = 0 samples differ"
    for t in ("0.5", "1"):
        assert len({cell.tobytes() for cell in grids[t]}) == 16, t
        assert not any((cell == grids["0"][0]).all() for cell in grids[t]), t


def test_class_conditional_grids(runs, tmp_path):
    out = tmp_path / "cond"
    rc = sample_main(["--checkpoint", str(runs / "cond" / "checkpoints" / "last.pt"), "--temperatures", "0.7",
                      "--n", "4", "--per-class", "2", "--interpolate-pairs", "0", "--out", str(out)])
    assert rc == 0
    assert _size(out / "samples_t0.7.png") == (2 * CELL + 1, 10 * CELL + 1)
    for c in range(10):
        assert _size(out / f"class{c}_t0.7.png") == (2 * CELL + 1, 2 * CELL + 1)
    assert not (out / "interpolation.png").exists()


def test_class_conditional_rows_are_their_classes_at_t0(runs, tmp_path):
    """samples_t{T}.png of a class-conditional model has one row per class: at T = 0 a class's samples are one
    image (its prior means), so each row's cells are equal, equal to the cells of class{C}_t0.png, and rows of
    different classes differ. The tiny run's class priors are still nearly equal, so the checkpoint's
    class-conditional prior gets distinct (seeded random) class means first."""
    _, state = find_checkpoint(runs / "cond")
    w = state["model"]["prior.class_embed.weight"]
    state["model"]["prior.class_embed.weight"] = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    ckpt = tmp_path / "distinct_classes.pt"
    torch.save(state, ckpt)
    out = tmp_path / "out"
    assert sample_main(["--checkpoint", str(ckpt), "--temperatures", "0", "--n", "4", "--per-class", "3",
                        "--interpolate-pairs", "0", "--out", str(out), "--device", "cpu"]) == 0
    rows = _cells(out / "samples_t0.png", 10, 3)
    for c in range(10):
        assert (rows[c] == rows[c, 0]).all(), f"row {c} mixes images"
        own = _cells(out / f"class{c}_t0.png", 2, 2).reshape(4, 32, 32)
        assert (own == rows[c, 0]).all(), f"row {c} is not class {c}"
    assert len({rows[c, 0].tobytes() for c in range(10)}) == 10  # ten classes, ten different images


@pytest.mark.parametrize("device", cuda_devices())
def test_interpolation_end_points_reconstruct_the_images(runs, monkeypatch, device):
    """Exactly, also on a GPU (through the fused kernels there: backend auto): the round trip runs without TF32
    (every coupling network call sees it off)."""
    from glowfast.amp import coupling_networks
    from glowfast.kernels import dot_precision

    _, state = find_checkpoint(runs / "plain")
    model = load_model(state, torch.device(device), "auto")
    assert model.resolve_backend(torch.device(device)) == ("fused" if device == "cuda" else "reference")
    test = get_dataset("digits", "test")
    x = torch.stack([test[i][0] for i in range(4)]).to(device)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # PyTorch's default, which a GPU trains with
    seen = []
    for net in coupling_networks(model):
        net.register_forward_pre_hook(lambda *_: seen.append((torch.backends.cudnn.allow_tf32, dot_precision())))
    path = interpolate(model, x[:2], x[2:], 4)
    assert seen and set(seen) == {(False, "ieee")}
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
        (["--device", BEYOND], f"error: --device {BEYOND}: {BEYOND_MESSAGE}"),
        (["--device", "meta"], "error: --device meta: meta is not a compute device (its tensors hold no data): use "
                               "cpu or cuda"),
        (["--temperatures", "0.5", "-1"], "error: --temperatures must be finite and >= 0, got -1.0"),
        (["--out", str(a_file)], f"error: --out {a_file} is a file, not a folder"),
        # silently none; then an error after the sample grids were written (found by a user-study audit)
        (["--interpolate-pairs", "-3"], "error: --interpolate-pairs must be >= 0 (0: none), got -3"),
        (["--interpolate-pairs", "1000"], "error: --interpolate-pairs 1000: the test split has 297 images, fewer "
                                          "than 2 x 1000"),
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


def _params(model) -> list[torch.Tensor]:
    return [p.detach() for p in model.parameters()]


def _holds(model, saved: dict) -> bool:
    """Whether the model's parameters and buffers equal a saved state_dict's, name by name."""
    mine = model.state_dict()
    return mine.keys() == saved.keys() and all(torch.equal(mine[k], v) for k, v in saved.items())


def test_load_glow_takes_a_run_its_checkpoints_folder_or_a_file(runs):
    """glowfast.load_glow: the same model from each way of naming a run's checkpoint, in eval mode, with the weights
    the checkpoint holds (no moving average kept by this run), and the same log-likelihoods from each."""
    import glowfast

    run = runs / "cond"
    path, state = find_checkpoint(run)
    models = [glowfast.load_glow(src) for src in (run, run / "checkpoints", path, str(path))]
    for model in models:
        assert isinstance(model, glowfast.Glow) and not model.training
        assert model.resolve_backend(torch.device("cpu")) == "reference"  # "auto" on a CPU
        assert _holds(model, state["model"])
    x = get_dataset("digits", "test").images[:8]
    lp = []
    for m in models:
        torch.manual_seed(0)  # the same dequantisation noise for each
        with torch.no_grad():
            lp.append(m(x, y=torch.arange(8) % 10).log_prob)
    assert torch.isfinite(lp[0]).all() and all(torch.equal(lp[0], other) for other in lp[1:])


def test_load_glow_gives_the_moving_average_unless_asked_for_the_raw_weights(tmp_path):
    run = tmp_path / "ema"
    assert train_main(TINY + ["--ema-decay", "0.9", "--run-dir", str(run)]) == 0
    from glowfast import load_glow

    _, state = find_checkpoint(run)
    average, raw = load_glow(run), load_glow(run, raw_weights=True)
    assert all(torch.equal(p, s) for p, s in zip(_params(average), state["ema"]["shadow"]))
    assert _holds(raw, state["model"])
    assert any(not torch.equal(p, q) for p, q in zip(_params(average), _params(raw)))  # 3 steps: they differ


def test_load_glow_bad_sources_name_the_problem(runs, tmp_path):
    from glowfast import load_glow
    from glowfast.checkpoint import CheckpointError, save_checkpoint

    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {missing}"):
        load_glow(missing)
    with pytest.raises(CheckpointError, match=f"no usable checkpoint in {tmp_path}: no last.pt or prev.pt"):
        load_glow(tmp_path)
    save_checkpoint({"step": 1}, tmp_path / "bare")
    with pytest.raises(ValueError, match="has no model config"):
        load_glow(tmp_path / "bare")
    with pytest.raises(RuntimeError, match=BEYOND_MESSAGE.split(":")[0]):
        load_glow(runs / "plain", device=BEYOND)


def test_a_backend_that_cannot_run_is_one_clear_error(tmp_path, capsys):
    """A model wider than the fused kernels (160 channels after the squeeze; they take 128): backend="fused" is
    refused with the reason, by load_glow and by the sample CLI (one line, exit 2); "auto" falls back."""
    from glowfast import Glow, load_glow
    from glowfast.checkpoint import save_checkpoint

    from conftest import KERNEL_DEVICE  # where the kernels run here: the interpreter's CPU, or the GPU

    wide = Glow((40, 4, 4), K=1, L=1, hidden_channels=8)
    save_checkpoint({"model": wide.state_dict(), "model_config": {**wide.config, "image_shape": [40, 4, 4]}},
                    tmp_path / "wide")
    reason = "a flow step has 160 channels, the kernels support at most 128"
    with pytest.raises(ValueError, match=f"backend='fused' cannot run on {KERNEL_DEVICE}(:0)?: {reason}"):
        load_glow(tmp_path / "wide", backend="fused", device=KERNEL_DEVICE)
    assert load_glow(tmp_path / "wide", device=KERNEL_DEVICE).resolve_backend(torch.device(KERNEL_DEVICE)) == \
        "reference"
    assert sample_main(["--checkpoint", str(tmp_path / "wide"), "--backend", "fused", "--device", KERNEL_DEVICE,
                        "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert re.match(f"error: --backend fused: backend='fused' cannot run on {KERNEL_DEVICE}(:0)?: {reason}", err)
    assert "\n" not in err


def test_load_glow_and_the_sample_cli_read_an_experiments_model(tmp_path, capsys):
    """glowfast.experiments caches its models as checkpoints with a spec (and the Glow's config under "config"):
    load_glow rebuilds the weights the experiment kept, and python -m glowfast.sample finds the spec's dataset for
    its interpolation (a train-CLI option before)."""
    from glowfast import load_glow
    from glowfast.experiments.common import ModelSpec, train

    spec = ModelSpec("digits", 8, K=2, L=2, hidden=16, batch=64, steps=3, warmup=1, eval_n=64, holdout=100, ema=0.9)
    trained = train(spec, tmp_path / "data", torch.device("cpu"), "reference", tmp_path / "cache")
    model = load_glow(tmp_path / "cache" / spec.key())
    assert _holds(model, trained.model.state_dict()) and model.n_classes == 10
    out = tmp_path / "out"
    assert sample_main(["--checkpoint", str(tmp_path / "cache" / spec.key()), "--temperatures", "0.5",
                        "--per-class", "1", "--interpolate-pairs", "2", "--steps", "3", "--out", str(out)]) == 0
    assert _size(out / "interpolation.png") == (3 * CELL + 1, 2 * CELL + 1)
    assert f"{spec.key()}/checkpoints/last.pt (step 3); wrote " in capsys.readouterr().err  # was "(step None)"


def test_cli_warnings_are_one_plain_line(runs, tmp_path):
    """A run whose last.pt does not load falls back to prev.pt with a warning: the CLI prints it as one "warning:"
    line, like its errors and notes (it was Python's "path:line: UserWarning: ..." plus the source line)."""
    import shutil

    from glowfast.checkpoint import LAST, PREV

    run = tmp_path / "run"
    shutil.copytree(runs / "plain", run)
    shutil.copy(run / "checkpoints" / LAST, run / "checkpoints" / PREV)
    (run / "checkpoints" / LAST).write_text("junk")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "glowfast.sample", "--run", str(run), "--interpolate-pairs", "0",
                          "--temperatures", "1", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    warning = [line for line in out.stderr.splitlines() if "trying the previous checkpoint" in line]
    assert len(warning) == 1 and warning[0].startswith(f"warning: cannot load checkpoint {run / 'checkpoints' / LAST}")
    assert "UserWarning" not in out.stderr and "find_checkpoint(" not in out.stderr


# ------------------------------------------------------------------ gaps found by mutation testing (12th session)
@pytest.mark.parametrize("option", ["--n", "--per-class", "--steps"])
def test_zero_counts_are_one_line_errors(runs, tmp_path, capsys, option):  # noqa: F811
    out = tmp_path / "out"
    assert sample_main(["--run", str(runs / "plain"), "--out", str(out), "--interpolate-pairs", "0",
                        option, "0"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {option} must be >= 1"
    assert not out.exists()


def test_default_output_folder_is_the_runs_generated_folder(runs, tmp_path):  # noqa: F811
    """With --run and no --out: RUN/generated/ (module docstring), not beside the checkpoint file."""
    run = tmp_path / "plain"
    shutil.copytree(runs / "plain", run)
    assert sample_main(["--run", str(run), "--temperatures", "1", "--n", "4", "--interpolate-pairs", "0"]) == 0
    assert (run / "generated" / "samples_t1.png").is_file()
    assert not (run / "checkpoints" / "generated").exists()


def test_interpolation_needs_two_test_images_per_pair(runs, tmp_path, capsys):  # noqa: F811
    """The digits test split has 297 images: 148 pairs fit (296 images), 149 do not (298); refused before any grid
    is written."""
    out = tmp_path / "out"
    assert sample_main(["--run", str(runs / "plain"), "--out", str(out), "--interpolate-pairs", "149"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --interpolate-pairs 149: the test split has 297 images, fewer "
                                               "than 2 x 149")
    assert not out.exists()


def test_an_explicit_checkpoint_file_wins_over_the_run(runs, tmp_path):  # noqa: F811
    """--run A --checkpoint FILE samples FILE's model (class-conditional here: one row per class), writing to
    A/generated by default."""
    run = tmp_path / "plain"
    shutil.copytree(runs / "plain", run)
    cond = runs / "cond" / "checkpoints" / "last.pt"
    assert sample_main(["--run", str(run), "--checkpoint", str(cond), "--temperatures", "1", "--n", "4",
                        "--per-class", "2", "--interpolate-pairs", "0"]) == 0
    assert (run / "generated" / "class9_t1.png").is_file()  # only a class-conditional model writes class grids
    assert _size(run / "generated" / "samples_t1.png") == (2 * CELL + 1, 10 * CELL + 1)
