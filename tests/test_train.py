"""python -m glowfast.train: smoke runs, exact resume, SIGKILL + resume, non-finite handling, CLI errors.

All runs are tiny (digits 1x8x8, K=2, L=1, width 16) and real: no mocks of torch or of the data.
"""

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from glowfast.checkpoint import LAST, PREV, find_checkpoint, load_checkpoint
from glowfast.data import get_dataset
from glowfast.train import main

from conftest import requires_cuda
from helpers import BEYOND, BEYOND_MESSAGE

# Grid cell: 8x8 digits are saved enlarged 4x (nearest) to 32x32, plus 1 px of padding.
CELL = 33

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "-K", "2", "-L", "1", "--hidden-channels", "16", "--batch-size", "256",
        "--init-batch-size", "64", "--eval-batch-size", "512", "--warmup-steps", "3", "--log-interval", "2",
        "--n-samples", "16", "--threads", "1", "--no-progress", "--device", "cpu", "--backend", "reference"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _model_state(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / LAST)["model"]


def test_smoke_run_folder(tmp_path):
    run = tmp_path / "run"
    assert main(TINY + ["--steps", "6", "--eval-interval", "3", "--run-dir", str(run)]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["K"] == 2 and cfg["dataset"] == "digits" and cfg["model_config"]["image_shape"] == [1, 8, 8]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 6
    assert math.isfinite(summary["test_bpd"]) and summary["test_images"] == 297
    assert (run / "curves.png").stat().st_size > 0
    for step in (3, 6):
        for t in ("0", "0.5", "0.7", "0.8", "1"):
            assert (run / "samples" / f"step{step:07d}_t{t}.png").exists()
    recs = _metrics(run)
    evals = [r for r in recs if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6] and all(math.isfinite(r["test_bpd"]) for r in evals)
    train = [r for r in recs if r["type"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6] and all("images_per_s" in r for r in train)
    ckpt = load_checkpoint(run / "checkpoints" / LAST)
    assert ckpt["step"] == 6 and ckpt["config"]["hidden_channels"] == 16
    assert load_checkpoint(run / "checkpoints" / PREV)["step"] == 3
    # the run folder refuses to be overwritten by a fresh run
    assert main(TINY + ["--steps", "2", "--run-dir", str(run)]) == 2


def test_help_documents_options():
    out = subprocess.run([sys.executable, "-m", "glowfast.train", "--help"], capture_output=True, text=True,
                         env=_env(), cwd=ROOT, timeout=120)
    assert out.returncode == 0
    for opt in ("--dataset", "--data-dir", "-K", "-L", "--hidden-channels", "--coupling", "--permutation", "--lu",
                "--n-bits", "--batch-size", "--lr", "--warmup-steps", "--optimizer", "--grad-clip", "--epochs",
                "--steps", "--eval-interval", "--seed", "--backend", "--device", "--amp", "--y-condition",
                "--resume", "--max-nonfinite", "--run-dir", "--name"):
        assert opt in out.stdout, opt


def test_resume_is_exact(tmp_path):
    """Stopping at step 4 and resuming to 9 gives bit-identical weights to an uninterrupted 9-step run.

    1500 digits / batch 256 = 5 batches per epoch, so the split is mid-epoch and the runs cross epochs.
    """
    common = TINY + ["--eval-interval", "4", "--ckpt-interval", "4"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(common + ["--steps", "9", "--run-dir", str(a)]) == 0
    assert main(common + ["--steps", "4", "--run-dir", str(b)]) == 0
    assert main(["--resume", str(b), "--steps", "9", "--no-progress"]) == 0
    sa, sb = _model_state(a), _model_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ca, cb = load_checkpoint(a / "checkpoints" / LAST), load_checkpoint(b / "checkpoints" / LAST)
    assert ca["step"] == cb["step"] == 9 and (ca["epoch"], ca["epoch_pos"]) == (cb["epoch"], cb["epoch_pos"])
    for ka, kb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        assert all(torch.equal(ka[n], kb[n]) for n in ka)
    mb = _metrics(b)
    assert [r["type"] for r in mb].count("resume") == 1
    train_a = [(r["step"], r["loss"]) for r in _metrics(a) if r["type"] == "train"]
    train_b = [(r["step"], r["loss"]) for r in mb if r["type"] == "train"]
    assert train_a == train_b


def test_resume_refuses_changed_model_options(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(TINY + ["--steps", "2", "--eval-interval", "2", "--run-dir", str(run)]) == 0
    assert main(["--resume", str(run), "-K", "4"]) == 2
    assert "cannot change" in capsys.readouterr().err


def test_sigkill_mid_training_then_resume(tmp_path):
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "glowfast.train", *TINY, "--batch-size", "32", "--steps", "100000",
           "--eval-interval", "100000", "--ckpt-interval", "7", "--run-dir", str(run)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / PREV).exists():  # at least two checkpoints written
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        time.sleep(0.3)  # kill somewhere in the middle of later steps / saves
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    # both checkpoints load (no corrupt or missing file), and last is the newer one — or the same one, when the
    # kill lands between save_checkpoint's "link last.pt to prev.pt" and "rename the new file to last.pt"
    last, prev = load_checkpoint(run / "checkpoints" / LAST), load_checkpoint(run / "checkpoints" / PREV)
    assert last["step"] >= prev["step"] and last["step"] % 7 == 0 and prev["step"] % 7 == 0
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    path, _ = find_checkpoint(run)
    assert path.name == LAST
    target = last["step"] + 10
    assert main(["--resume", str(run), "--steps", str(target), "--no-progress"]) == 0
    final = load_checkpoint(run / "checkpoints" / LAST)
    assert final["step"] == target
    recs = _metrics(run)
    steps = [r["step"] for r in recs if r["type"] == "train"]
    assert steps == sorted(set(steps)), "metrics continue without duplicated or lost steps"
    assert steps[-1] == target and set(range(2, target + 1, 2)) <= set(steps)
    assert json.loads((run / "summary.json").read_text())["step"] == target
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_nonfinite_losses_stop_the_run(tmp_path, capsys):
    """A huge learning rate sends the weights to +-1e30 after one update: every later loss is inf/nan."""
    run = tmp_path / "nan"
    rc = main(TINY + ["--steps", "50", "--lr", "1e30", "--warmup-steps", "0", "--grad-clip", "0",
                      "--max-nonfinite", "4", "--eval-interval", "1000", "--ckpt-interval", "1", "--run-dir", str(run)])
    err = capsys.readouterr().err
    assert rc == 3
    assert "non-finite" in err and "4" in err and "Traceback" not in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped_nonfinite" and summary["nonfinite_skipped"] == 4 and summary["step"] == 5
    nonfinite = [r for r in _metrics(run) if r["type"] == "nonfinite"]
    assert [r["streak"] for r in nonfinite] == [1, 2, 3, 4]
    for name in (LAST, PREV):
        state = load_checkpoint(run / "checkpoints" / name)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def inf_injector(seen: dict):
    """A trainer callback that puts an inf into the top prior for the 4th step only, and records in `seen`
    whether that step left the weights unchanged (it must be skipped) and the non-finite count after it."""
    def inject(event, trainer):
        top = trainer.model.prior.top
        if event == "before_step" and trainer.step == 3:
            seen["before"] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
            seen["value"] = top.data[0].item()
            top.data[0] = float("inf")
        elif event == "after_step" and trainer.step == 4:
            top.data[0] = seen["value"]
            after = trainer.model.state_dict()
            seen["unchanged"] = all(torch.equal(seen["before"][k], after[k]) for k in after)
            seen["nonfinite_total"] = trainer.nonfinite_total

    return inject


def test_transient_nonfinite_step_is_skipped(tmp_path):
    """An inf injected into one parameter for one step (via the documented callback hook) skips that update."""
    seen = {}
    inject = inf_injector(seen)
    run = tmp_path / "transient"
    assert main(TINY + ["--steps", "6", "--eval-interval", "6", "--run-dir", str(run)], callbacks=[inject]) == 0
    assert seen["unchanged"] and seen["nonfinite_total"] == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 6 and summary["nonfinite_skipped"] == 1
    assert [r["step"] for r in _metrics(run) if r["type"] == "nonfinite"] == [4]


def test_checkpoint_never_holds_nan_weights(tmp_path, capsys):
    def corrupt(event, trainer):
        if event == "after_step" and trainer.step == 3:
            trainer.model.levels[0].steps[0].actnorm.bias.data[0] = float("nan")

    run = tmp_path / "nanw"
    rc = main(TINY + ["--steps", "8", "--eval-interval", "100", "--ckpt-interval", "2", "--run-dir", str(run)],
              callbacks=[corrupt])
    assert rc == 3 and "non-finite" in capsys.readouterr().err
    state = load_checkpoint(run / "checkpoints" / LAST)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_conditional_bf16_channels_last_adam_cosine(tmp_path):
    from glowfast.amp import bf16_networks_enabled, channels_last_networks_enabled
    from glowfast.sample import load_model

    seen = {}

    def check(event, trainer):
        if event == "start":
            seen["options"] = bf16_networks_enabled(trainer.model), channels_last_networks_enabled(trainer.model)

    run = tmp_path / "cond"
    assert main(TINY + ["--steps", "4", "--eval-interval", "4", "--y-condition", "--amp", "bf16", "--optimizer",
                        "adam", "--lr-schedule", "cosine", "--coupling", "additive", "--permutation", "shuffle",
                        "--samples-per-class", "3", "--temperatures", "0.7", "--channels-last", "--y-weight", "0.5",
                        "--run-dir", str(run)], callbacks=[check]) == 0
    assert seen["options"] == (True, True)
    from PIL import Image

    with Image.open(run / "samples" / "step0000004_t0.7.png") as im:
        w, h = im.size
    assert (w, h) == (3 * CELL + 1, 10 * CELL + 1)  # 10 class rows x 3 samples
    recs = _metrics(run)
    assert all("class_ce" in r for r in recs if r["type"] == "train")
    for r in (r for r in recs if r["type"] == "train"):  # openai/glow's loss: bits/dim + weight_y * CE in bits
        assert r["loss"] == pytest.approx(r["bpd"] + 0.5 * r["class_ce"] / math.log(2), rel=1e-6)
    assert recs[-1]["type"] == "eval" and math.isfinite(recs[-1]["test_bpd"])
    ckpt = load_checkpoint(run / "checkpoints" / LAST)
    assert ckpt["model_config"]["n_classes"] == 10 and ckpt["config"]["amp"] == "bf16"
    assert ckpt["config"]["channels_last"] and ckpt["scheduler"]["last_epoch"] == 4
    loaded = load_model(ckpt, torch.device("cpu"), "reference")  # sampling runs the networks as trained
    assert bf16_networks_enabled(loaded) and channels_last_networks_enabled(loaded)


def test_epochs_option(tmp_path):
    run = tmp_path / "ep"
    assert main(TINY + ["--epochs", "2", "--eval-interval", "100", "--run-dir", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["step"] == 2 * (1500 // 256)


def test_missing_dataset_is_a_clean_error(tmp_path, capsys):
    rc = main(TINY + ["--dataset", "mnist", "--data-dir", str(tmp_path / "nothing"), "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "mnist" in err.lower()
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
def test_fused_on_cpu_is_a_one_line_error(tmp_path):
    args = [a for a in TINY if a not in ("reference",)]
    args[args.index("--backend") + 1: args.index("--backend") + 1] = ["fused"]
    env = _env()
    env.pop("TRITON_INTERPRET", None)  # set by conftest for the kernel tests; a user's CPU has no interpreter
    out = subprocess.run([sys.executable, "-m", "glowfast.train", *args, "--steps", "2", "--run-dir",
                          str(tmp_path / "f")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "fused" in out.stderr
    assert out.stderr.strip().count("\n") == 0
    assert not (tmp_path / "f").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
def test_cuda_device_without_cuda_is_a_clean_error(tmp_path, capsys):
    rc = main(TINY + ["--device", "cuda", "--run-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == "error: --device cuda: CUDA is not available on this machine"
    assert not (tmp_path / "c").exists()


def test_a_cuda_device_this_machine_lacks_is_a_clean_error(tmp_path, capsys):
    """cuda:N past the last GPU (or any CUDA device without a GPU): one line, exit 2, nothing written."""
    rc = main(TINY + ["--device", BEYOND, "--run-dir", str(tmp_path / "c")])
    assert rc == 2 and capsys.readouterr().err.strip() == f"error: --device {BEYOND}: {BEYOND_MESSAGE}"
    assert not (tmp_path / "c").exists()


def _torch_has(device_type: str) -> bool:
    backend = getattr(torch.backends, device_type, None) if device_type == "mps" else getattr(torch, device_type, None)
    return bool(backend and backend.is_available())


@pytest.mark.parametrize("device, message", [
    ("meta", "meta is not a compute device (its tensors hold no data): use cpu or cuda"),
    ("xpu", "xpu is not available on this machine or in this PyTorch build ("),
    ("mps", "mps is not available on this machine or in this PyTorch build ("),
])
def test_a_device_type_torch_cannot_use_here_is_a_clean_error(tmp_path, capsys, device, message):
    """--device mps / xpu where this torch has none, and meta: one line, exit 2 (each was a traceback from deep
    inside torch: an AssertionError, a missing MPS backend, .item() on a meta tensor)."""
    if device != "meta" and _torch_has(device):
        pytest.skip(f"this machine has a working {device} device")
    rc = main(TINY + ["--device", device, "--run-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith(f"error: --device {device}: {message}") and "\n" not in err, err
    assert not (tmp_path / "c").exists()


def test_bad_options_exit_2(tmp_path, capsys):
    assert main(TINY + ["--steps", "0", "--run-dir", str(tmp_path / "x")]) == 2
    assert main(TINY + ["--dataset", "noise", "--y-condition", "--run-dir", str(tmp_path / "y")]) == 2
    with pytest.raises(SystemExit) as e:
        main(["--coupling", "nonsense"])
    assert e.value.code == 2


def test_gemm_networks_option(tmp_path, capsys):
    from glowfast.amp import gemm_networks_enabled
    from glowfast.sample import load_model

    run = tmp_path / "gemm"
    assert main(TINY + ["--steps", "2", "--eval-interval", "2", "--gemm-networks", "--run-dir", str(run)]) == 0
    assert gemm_networks_enabled(load_model(load_checkpoint(run / "checkpoints" / LAST), torch.device("cpu"),
                                            "reference"))
    assert main(TINY + ["--steps", "2", "--gemm-networks", "--channels-last", "--run-dir", str(tmp_path / "x")]) == 2
    assert "choose one" in capsys.readouterr().err


def test_triton_networks_option(tmp_path, capsys):
    """--triton-networks trains (the interpreter runs the kernels on CPU here), also with --amp bf16, is kept in the
    checkpoint's config so the model reloads with it, and refuses the other network layouts."""
    from glowfast.amp import bf16_networks_enabled, triton_networks_enabled
    from glowfast.sample import load_model

    run = tmp_path / "triton"
    assert main(TINY + ["--steps", "2", "--eval-interval", "2", "--triton-networks", "--run-dir", str(run)]) == 0
    assert triton_networks_enabled(load_model(load_checkpoint(run / "checkpoints" / LAST), torch.device("cpu"),
                                              "reference"))
    for other in (["--gemm-networks"], ["--channels-last"]):
        assert main(TINY + ["--steps", "2", "--triton-networks", *other, "--run-dir", str(tmp_path / "x")]) == 2
        assert "choose one" in capsys.readouterr().err
    run = tmp_path / "bf16"
    assert main(TINY + ["--steps", "2", "--triton-networks", "--amp", "bf16", "--run-dir", str(run)]) == 0
    model = load_model(load_checkpoint(run / "checkpoints" / LAST), torch.device("cpu"), "reference")
    assert triton_networks_enabled(model) and bf16_networks_enabled(model)


def test_compile_networks_option(tmp_path, capsys):
    """--compile-networks trains with --amp bf16 and --channels-last, is kept in the checkpoint's config so the model
    reloads with all three, and refuses the networks that replace the standard forward."""
    from glowfast.amp import bf16_networks_enabled, channels_last_networks_enabled, compiled_networks_enabled
    from glowfast.sample import load_model

    run = tmp_path / "compiled"
    assert main(TINY + ["--steps", "2", "--eval-interval", "2", "--compile-networks", "--amp", "bf16",
                        "--channels-last", "--run-dir", str(run)]) == 0
    model = load_model(load_checkpoint(run / "checkpoints" / LAST), torch.device("cpu"), "reference")
    assert compiled_networks_enabled(model) and bf16_networks_enabled(model) and channels_last_networks_enabled(model)
    for other in (["--gemm-networks"], ["--triton-networks"]):
        assert main(TINY + ["--steps", "2", "--compile-networks", *other, "--run-dir", str(tmp_path / "x")]) == 2
        assert "choose one" in capsys.readouterr().err


def test_fused_optimizer_option_trains_as_adamax_and_may_change_on_resume(tmp_path, capsys):
    """--fused-optimizer: FusedAdamax's kernel makes the updates (here under the interpreter, CI's kernel device), and
    the run's weights equal torch's Adamax run's after the same steps (the optimiser tolerance); its checkpoint
    resumes without the flag and goes on as the plain run does; with --optimizer adam it is refused."""
    from glowfast.optim import FusedAdamax

    plain, fused = tmp_path / "plain", tmp_path / "fused"
    kernel_steps = []

    def count(event, trainer):
        if event == "after_step":
            assert isinstance(trainer.optimizer, FusedAdamax)
            kernel_steps.append(trainer.optimizer.kernel_steps)

    assert main(TINY + ["--steps", "3", "--eval-interval", "3", "--run-dir", str(plain)]) == 0
    assert main(TINY + ["--steps", "3", "--eval-interval", "3", "--fused-optimizer", "--run-dir", str(fused)],
                callbacks=[count]) == 0
    assert kernel_steps == [1, 2, 3]
    assert json.loads((fused / "config.json").read_text())["fused_optimizer"] is True
    for step in (3, 5):
        a, b = _model_state(plain), _model_state(fused)
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        if step == 3:
            assert main(["--resume", str(plain), "--steps", "5", "--no-progress"]) == 0
            assert main(["--resume", str(fused), "--steps", "5", "--no-fused-optimizer", "--no-progress"]) == 0
    assert load_checkpoint(fused / "checkpoints" / LAST)["step"] == 5
    assert main(TINY + ["--steps", "2", "--optimizer", "adam", "--fused-optimizer", "--run-dir",
                        str(tmp_path / "x")]) == 2
    assert "--fused-optimizer fuses Adamax's update" in capsys.readouterr().err


def test_one_process_per_run_folder(tmp_path):
    """While a run trains, a second process on its folder (the same --run-dir, or --resume of it) exits 2 with a
    clear error and changes nothing; the run then completes as if alone."""
    run = tmp_path / "run"
    seen = {}

    def second_process(event, trainer):
        # a fresh run before the first checkpoint (no checkpoint to refuse it by), a resume after it
        extra = {1: TINY + ["--steps", "4", "--run-dir", str(run)], 3: ["--resume", str(run), "--no-progress"]}
        if event != "after_step" or trainer.step not in extra:
            return
        files = sorted(run.rglob("*"))
        before = {p: p.read_bytes() for p in files if p.is_file() and p.name != ".lock"}
        r = subprocess.run([sys.executable, "-m", "glowfast.train", *extra[trainer.step]], capture_output=True,
                           text=True, env=_env(), cwd=ROOT, timeout=120)
        seen[trainer.step] = (r.returncode, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "")
        seen[f"unchanged {trainer.step}"] = sorted(run.rglob("*")) == files and all(
            p.read_bytes() == b for p, b in before.items())

    assert main(TINY + ["--steps", "4", "--eval-interval", "2", "--ckpt-interval", "2", "--run-dir", str(run)],
                callbacks=[second_process]) == 0
    for step in (1, 3):
        rc, last_line = seen[step]
        assert rc == 2 and last_line == (f"error: {run} is in use by another python -m glowfast.train process; "
                                         "wait for it to finish, or give this run another --name/--run-dir"), step
        assert seen[f"unchanged {step}"], step
    assert load_checkpoint(run / "checkpoints" / LAST)["step"] == 4
    assert [r["step"] for r in _metrics(run) if r["type"] == "eval"] == [2, 4]  # one run's records only


def test_runs_started_together_without_a_name_get_folders_of_their_own(tmp_path):
    """The default run name was the start time to the second: a sweep launched from a shell loop wrote every run
    into one folder. Two runs started at once now each keep their own config and checkpoints."""
    root = tmp_path / "runs"
    procs = [subprocess.Popen([sys.executable, "-m", "glowfast.train", *TINY, "--steps", "2", "--eval-interval", "2",
                               "--lr", lr, "--runs-root", str(root)], cwd=ROOT, env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for lr in ("1e-3", "2e-3")]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
    runs = sorted(root.iterdir())
    assert len(runs) == 2
    lrs = {json.loads((r / "config.json").read_text())["lr"] for r in runs}
    assert lrs == {1e-3, 2e-3}
    for r in runs:
        cfg = json.loads((r / "config.json").read_text())
        assert load_checkpoint(r / "checkpoints" / LAST)["config"]["lr"] == cfg["lr"]


@pytest.mark.parametrize("option, value, message", [
    ("--lr", "inf", "--lr must be finite and > 0, got inf"),
    ("--lr", "nan", "--lr must be finite and > 0, got nan"),
    ("--grad-clip", "-1", "--grad-clip must be finite and >= 0 (0: off), got -1.0"),
    ("--grad-clip", "nan", "--grad-clip must be finite and >= 0 (0: off), got nan"),
])
def test_non_finite_lr_and_negative_grad_clip_are_refused_before_training(tmp_path, capsys, option, value, message):
    """--lr inf trained until the weights overflowed (exit 3 at step 11) and --grad-clip -1 silently meant "off"
    (found by a user-study audit): one line, exit 2, nothing written."""
    assert main(TINY + [option, value, "--run-dir", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not (tmp_path / "t").exists()


def test_bad_temperatures_are_refused_before_training(tmp_path, capsys):
    for bad in ("-1", "nan"):
        assert main(TINY + ["--temperatures", "0.7", bad, "--run-dir", str(tmp_path / "t")]) == 2
        assert "--temperatures must be finite and >= 0" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_a_failed_save_is_a_one_line_error_the_run_marked_failed_and_resumable(tmp_path, capsys):
    """A checkpoint that cannot be written (here: its folder replaced by a file, a real OSError even as root)
    stops the run with one line, summary.json says "failed" (it said "completed"), and once the folder is back
    the run resumes from the last good checkpoint."""
    run = tmp_path / "run"
    ckpt, aside = run / "checkpoints", tmp_path / "aside"

    def break_the_checkpoint_folder(event, trainer):
        if event == "after_step" and trainer.step == 3:
            ckpt.rename(aside)
            ckpt.write_text("not a folder")

    assert main(TINY + ["--steps", "6", "--eval-interval", "2", "--ckpt-interval", "2", "--run-dir", str(run)],
                callbacks=[break_the_checkpoint_folder]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: stopped at step 4: ") and "the newest checkpoint is step 2" in err[-1]
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"
    ckpt.unlink()
    aside.rename(ckpt)
    assert main(["--resume", str(run), "--no-progress"]) == 0
    assert load_checkpoint(ckpt / LAST)["step"] == 6
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def test_cosine_without_warmup_and_resumed_to_a_longer_run(tmp_path):
    """--warmup-steps 0 with the cosine schedule crashed before training (the schedule read the run's length
    before it was known); a resume that lengthens the run used the old schedule's rate for its first step (lr 0
    here). Each step's rate is now the new run's: equal to an uninterrupted 8-step run's from step 5 on."""
    opts = ["--warmup-steps", "0", "--lr-schedule", "cosine", "--log-interval", "1", "--eval-interval", "4"]
    short, whole = tmp_path / "short", tmp_path / "whole"
    assert main(TINY + opts + ["--steps", "4", "--run-dir", str(short)]) == 0
    assert main(["--resume", str(short), "--steps", "8", "--no-progress"]) == 0
    assert main(TINY + opts + ["--steps", "8", "--run-dir", str(whole)]) == 0

    def rates(run):
        return {r["step"]: r["lr"] for r in _metrics(run) if r["type"] == "train"}

    lr = json.loads((whole / "config.json").read_text())["lr"]
    expected_whole = {k: lr * 0.5 * (1 + math.cos(math.pi * (k - 1) / 8)) for k in range(1, 9)}
    assert rates(whole) == pytest.approx(expected_whole, rel=1e-12)
    resumed = rates(short)
    assert {k: resumed[k] for k in range(5, 9)} == pytest.approx({k: expected_whole[k] for k in range(5, 9)},
                                                                  rel=1e-12)


def test_a_reused_folder_is_refused_before_the_model_is_built(tmp_path, capsys):
    """The occupied-folder refusal comes first (on a GPU the model and backend check cost seconds of kernel
    compilation): here before the Trainer's own batch-size error."""
    run = tmp_path / "run"
    assert main(TINY + ["--steps", "2", "--eval-interval", "2", "--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(TINY + ["--steps", "2", "--batch-size", "100000", "--run-dir", str(run)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{run} already holds a run; use --resume {run} or another "
                                                    "--name/--run-dir")


def _first_step(run: Path, clip: str) -> dict:
    """One training step with --grad-clip `clip`: the gradients it applied (still in .grad after the step), the
    weights after it and the logged gradient norm."""
    seen = {}

    def grab(event, trainer):
        if event == "after_step" and trainer.step == 1:
            params = list(trainer.model.parameters())
            seen["grads"] = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
            seen["weights"] = [p.detach().clone() for p in params]

    assert main(TINY + ["--steps", "1", "--log-interval", "1", "--eval-interval", "100", "--temperatures", "0.7",
                        "--grad-clip", clip, "--run-dir", str(run)], callbacks=[grab]) == 0
    seen["logged_norm"] = [r["grad_norm"] for r in _metrics(run) if r["type"] == "train"][0]
    return seen


def _global_norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def test_grad_clip_scales_the_applied_gradient_to_the_clip_norm(tmp_path):
    """--grad-clip C ("clip the global gradient norm to this (0: off)"): the gradients the optimiser applies have
    global norm C and the unclipped direction; the logged grad_norm is the norm before clipping. 0 is off, and a
    clip far above the norm changes nothing (bit-identical weights)."""
    off = _first_step(tmp_path / "off", "0")
    tiny = _first_step(tmp_path / "tiny", "1e-6")
    huge = _first_step(tmp_path / "huge", "1e9")
    norm = _global_norm(off["grads"])
    assert norm > 1e-3, "the raw gradient must be far above the tiny clip for the test to mean anything"
    assert off["logged_norm"] == pytest.approx(norm, rel=1e-5)
    assert tiny["logged_norm"] == pytest.approx(norm, rel=1e-5)  # same step, same data: the pre-clip norm
    assert _global_norm(tiny["grads"]) == pytest.approx(1e-6, rel=1e-3)
    for g_tiny, g_off in zip(tiny["grads"], off["grads"], strict=True):
        torch.testing.assert_close(g_tiny, g_off * (1e-6 / norm), rtol=1e-4, atol=1e-14)
    assert any(not torch.equal(a, b) for a, b in zip(tiny["weights"], off["weights"]))
    assert all(torch.equal(a, b) for a, b in zip(huge["grads"], off["grads"], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(huge["weights"], off["weights"], strict=True))


def _logged_rates(run: Path) -> dict:
    return {r["step"]: r["lr"] for r in _metrics(run) if r["type"] == "train"}


def test_warmup_is_linear_from_lr_over_warmup_to_lr(tmp_path):
    """--warmup-steps W ("linear learning-rate warm-up from lr/warmup to lr"): step k <= W trains with lr * k / W
    (the first step lr / W, not 0; step W the full lr), and with the constant schedule every later step with lr."""
    run = tmp_path / "warm"
    lr = 2e-3
    assert main(TINY + ["--steps", "6", "--warmup-steps", "4", "--lr", str(lr), "--log-interval", "1",
                        "--eval-interval", "100", "--temperatures", "0.7", "--run-dir", str(run)]) == 0
    assert _logged_rates(run) == pytest.approx({1: lr / 4, 2: lr / 2, 3: 3 * lr / 4, 4: lr, 5: lr, 6: lr},
                                               rel=1e-12)


def test_cosine_after_warmup_spans_the_remaining_steps_and_ends_at_zero(tmp_path):
    """--lr-schedule cosine with --warmup-steps W over T steps: the linear warm-up (lr * k / W), then the cosine
    ("decay from lr over the remaining steps") over the T - W steps left -- step W + j trains with
    lr * (1 + cos(pi * (j - 1) / (T - W))) / 2, as in the warm-up-free case (test_cosine_without_warmup_...) --
    and the rate the schedule holds after the last step is 0."""
    run = tmp_path / "cos"
    lr, warm, total = 2e-3, 2, 6
    assert main(TINY + ["--steps", str(total), "--warmup-steps", str(warm), "--lr", str(lr), "--lr-schedule",
                        "cosine", "--log-interval", "1", "--eval-interval", "100", "--temperatures", "0.7",
                        "--run-dir", str(run)]) == 0
    expected = {k: lr * k / warm for k in range(1, warm + 1)}
    expected.update({warm + j: lr * 0.5 * (1 + math.cos(math.pi * (j - 1) / (total - warm)))
                     for j in range(1, total - warm + 1)})
    assert _logged_rates(run) == pytest.approx(expected, rel=1e-12)
    ckpt = load_checkpoint(run / "checkpoints" / LAST)
    assert ckpt["step"] == total and ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-15)


# ------------------------------------------------------------------ gaps found by mutation testing (12th session)
def test_logged_train_bits_per_dim_is_the_batch_mean(tmp_path):
    """The loss is the batch MEAN of the per-image bits/dim (Adam/Adamax would train almost the same on the sum,
    so only the logged value shows it): recomputed for the first step from a copy of the model taken just before it,
    with the same dequantisation noise (the global RNG state at that point)."""
    seen = {}

    def grab(event, trainer):
        if event == "before_step" and trainer.step == 0:
            seen["model"] = copy.deepcopy(trainer.model)
            seen["rng"] = torch.get_rng_state()
            seen["batch"] = trainer.batch

    run = tmp_path / "run"
    assert main(TINY + ["--steps", "1", "--log-interval", "1", "--eval-interval", "100", "--temperatures", "0.7",
                        "--run-dir", str(run)], callbacks=[grab]) == 0
    (rec,) = [r for r in _metrics(run) if r["type"] == "train"]
    x, _ = seen["batch"]
    torch.set_rng_state(seen["rng"])
    with torch.no_grad():
        per_image = seen["model"].train()(x).bits_per_dim.double()
    assert per_image.numel() == 256
    assert rec["bpd"] == pytest.approx(float(per_image.mean()), rel=1e-6)
    assert rec["loss"] == pytest.approx(rec["bpd"], rel=1e-12)  # unconditional: the loss is the bits/dim


def test_conditional_training_batches_keep_each_image_with_its_own_label(tmp_path):
    """The shuffled batches pair every image with ITS label (a misaligned label trains the class prior on noise);
    over 7 steps (5 batches per epoch: an epoch boundary is crossed)."""
    train = get_dataset("digits", "train")
    label_of = {}
    for img, lab in zip(train.images, train.labels.tolist()):
        label_of.setdefault(img.numpy().tobytes(), set()).add(lab)
    checked = []

    def check(event, trainer):
        if event == "before_step":
            x, y = trainer.batch
            checked.append(all(int(lab) in label_of[img.numpy().tobytes()] for img, lab in zip(x, y)))

    assert main(TINY + ["--steps", "7", "--y-condition", "--eval-interval", "100", "--temperatures", "0.7",
                        "--run-dir", str(tmp_path / "run")], callbacks=[check]) == 0
    assert checked == [True] * 7


def _top_prior_changed_for_the_evaluation_at(step: int, change):
    """A callback that applies change(top prior tensor) after step `step` and undoes it at that step's "eval" event,
    before the checkpoint: that one evaluation sees other (finite) weights, nothing else does."""
    saved = {}

    def cb(event, trainer):
        top = trainer.model.prior.top
        if event == "after_step" and trainer.step == step:
            saved["top"] = top.detach().clone()
            with torch.no_grad():
                change(top)
        elif event == "eval" and trainer.step == step:
            with torch.no_grad():
                top.copy_(saved["top"])
    return cb


def test_best_test_bpd_is_the_lowest_evaluation_not_the_last(tmp_path):
    """summary.json's best_test_bpd is the minimum over the evaluations. The weights are made worse (top prior's
    mean and log-std shifted) for the step-2 evaluation only, so the last evaluation is not the best."""
    run = tmp_path / "run"
    assert main(TINY + ["--steps", "2", "--eval-interval", "1", "--temperatures", "0.7", "--run-dir", str(run)],
                callbacks=[_top_prior_changed_for_the_evaluation_at(2, lambda top: top.add_(3.0))]) == 0
    evals = [r["test_bpd"] for r in _metrics(run) if r["type"] == "eval"]
    assert len(evals) == 2 and evals[1] > evals[0] + 0.1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_test_bpd"] == pytest.approx(evals[0], rel=1e-12)
    assert summary["test_bpd"] == pytest.approx(evals[1], rel=1e-12)


def test_a_non_finite_gradient_norm_with_a_finite_loss_skips_the_update(tmp_path):
    """train_step skips a step when the loss OR the gradient norm is non-finite. A gradient hook makes step 4's
    gradient infinite while its loss stays finite: the weights are unchanged and the skip is logged as
    'grad_norm'."""
    seen = {}

    def inject(event, trainer):
        top = trainer.model.prior.top
        if event == "before_step" and trainer.step == 3:
            seen["before"] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
            seen["hook"] = top.register_hook(lambda g: torch.full_like(g, float("inf")))
        elif event == "after_step" and trainer.step == 4:
            seen["hook"].remove()
            after = trainer.model.state_dict()
            seen["unchanged"] = all(torch.equal(seen["before"][k], after[k]) for k in after)

    run = tmp_path / "run"
    assert main(TINY + ["--steps", "6", "--eval-interval", "6", "--temperatures", "0.7", "--run-dir", str(run)],
                callbacks=[inject]) == 0
    assert seen["unchanged"]
    (rec,) = [r for r in _metrics(run) if r["type"] == "nonfinite"]
    assert rec["step"] == 4 and rec["what"] == "grad_norm" and math.isfinite(rec["loss"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["nonfinite_skipped"] == 1


def test_a_skipped_step_still_advances_the_learning_rate_schedule(tmp_path):
    """The schedule is indexed by the training step: step k trains with lr·k/W during the warm-up whether or not an
    earlier step was skipped (else a run with skipped steps would end its cosine above 0). Step 2 is made non-finite
    (an inf in the top prior for that step only, through the callback hooks) and skipped; the rates logged for the
    applied steps 1, 3, 4, 5 are those of their step numbers."""
    saved = {}

    def inject(event, trainer):
        top = trainer.model.prior.top
        if event == "before_step" and trainer.step == 1:
            saved["value"] = top.data[0].item()
            top.data[0] = float("inf")
        elif event == "after_step" and trainer.step == 2:
            top.data[0] = saved["value"]

    run = tmp_path / "run"
    lr = 2e-3
    assert main(TINY + ["--steps", "5", "--warmup-steps", "4", "--lr", str(lr), "--log-interval", "1",
                        "--eval-interval", "100", "--temperatures", "0.7", "--run-dir", str(run)],
                callbacks=[inject]) == 0
    assert [r["step"] for r in _metrics(run) if r["type"] == "nonfinite"] == [2]
    rates = {r["step"]: r["lr"] for r in _metrics(run) if r["type"] == "train"}
    assert rates == pytest.approx({1: lr / 4, 3: 3 * lr / 4, 4: lr, 5: lr}, rel=1e-12)


def test_a_non_finite_final_evaluation_is_reported_not_a_crash(tmp_path, capsys):
    """The last evaluation gives an infinite bits/dim with finite weights (the top prior's log-std set to -400 for
    that evaluation only): summary.json says null, and the closing line says so -- it used to be a TypeError
    formatting None (found by mutation testing)."""
    def log_std_minus_400(top):
        top.view(-1)[top.numel() // 2:] = -400.0

    cb = _top_prior_changed_for_the_evaluation_at(2, log_std_minus_400)
    run = tmp_path / "run"
    assert main(TINY + ["--steps", "2", "--eval-interval", "2", "--temperatures", "0.7", "--run-dir", str(run)],
                callbacks=[cb]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["test_bpd"] is None
    assert "done: step 2, test bits/dim non-finite" in capsys.readouterr().err


def test_hflip_mask_is_a_fair_coin_per_image_and_epoch():
    from glowfast.trainer import hflip_mask

    a = hflip_mask(10000, seed=0, epoch=0)
    assert a.dtype == torch.bool and a.shape == (10000,)
    assert 0.47 < a.float().mean() < 0.53
    assert torch.equal(a, hflip_mask(10000, seed=0, epoch=0))
    for other in (hflip_mask(10000, seed=0, epoch=1), hflip_mask(10000, seed=1, epoch=0)):
        assert 0.47 < (a != other).float().mean() < 0.53  # independent coins, not a shifted copy
    for seed in (10**15, 2**70, -3):  # any seed the run accepts (10**15 * 1_000_003 overflowed 64 bits)
        assert 0.47 < hflip_mask(10000, seed=seed, epoch=2).float().mean() < 0.53


@pytest.mark.parametrize("dataset", ["digits", "folder"])
def test_hflip_feeds_each_training_image_as_is_or_mirrored(tmp_path, dataset):
    """With --hflip, every training image of every batch is the image the same run without it feeds, or its mirror,
    about half of them mirrored -- for in-memory sets and for sets read through a DataLoader (a folder of PNGs)."""
    args = list(TINY)
    if dataset == "folder":
        from test_image_folder import _digits, _write

        for i, arr in enumerate(_digits(60)):
            _write(tmp_path / "pngs" / f"{i:02d}.png", arr)
        args[args.index("digits")] = f"folder:{tmp_path / 'pngs'}"
        args += ["--batch-size", "16", "--init-batch-size", "16"]

    def batches(extra, name):
        seen = []

        def record(event, trainer):
            if event == "before_step":
                seen.append(trainer.batch[0].clone())

        assert main(args + ["--steps", "7", "--run-dir", str(tmp_path / name), *extra], callbacks=[record]) == 0
        return torch.cat(seen)

    plain, flipped = batches([], "plain"), batches(["--hflip"], "hflip")
    assert plain.shape == flipped.shape and plain.shape[0] >= 7 * 16
    same = (flipped == plain).flatten(1).all(1)
    mirrored = (flipped == plain.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 0.3 < float((~same).float().mean()) < 0.7


def test_cudnn_autotune_sets_the_flag_for_cuda_work_only_and_restores_it():
    """The CLIs' cuDNN autotuner switch: on (or off, as asked) for a CUDA device while the work runs, the caller's
    value afterwards, also when the work raises; a CPU run leaves the flag alone. (The flag is a plain setting:
    no GPU is needed to read or write it.)"""
    from glowfast._cli import cudnn_autotune

    before = torch.backends.cudnn.benchmark
    try:
        for caller in (False, True):
            for enabled in (False, True):
                torch.backends.cudnn.benchmark = caller
                with cudnn_autotune(torch.device("cuda", 0), enabled):
                    assert torch.backends.cudnn.benchmark is enabled
                assert torch.backends.cudnn.benchmark is caller
                with cudnn_autotune(torch.device("cpu"), enabled):
                    assert torch.backends.cudnn.benchmark is caller
                with pytest.raises(RuntimeError, match="work failed"), cudnn_autotune(torch.device("cuda"), enabled):
                    raise RuntimeError("work failed")
                assert torch.backends.cudnn.benchmark is caller
    finally:
        torch.backends.cudnn.benchmark = before


def test_cudnn_benchmark_option_is_recorded_and_may_change_on_resume(tmp_path):
    run = tmp_path / "run"
    assert main(TINY + ["--steps", "2", "--eval-interval", "2", "--run-dir", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["cudnn_benchmark"] is True
    # a speed setting, not part of the model: a resumed run may turn it off
    assert main(["--resume", str(run), "--steps", "4", "--no-cudnn-benchmark", "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text())["cudnn_benchmark"] is False
    assert json.loads((run / "summary.json").read_text())["step"] == 4


@requires_cuda
@pytest.mark.parametrize("flag, expected", [([], True), (["--no-cudnn-benchmark"], False)])
def test_training_on_cuda_runs_with_cudnns_autotuner_as_asked(tmp_path, flag, expected):
    seen = []

    def record(event, trainer):
        if event == "before_step":
            seen.append(torch.backends.cudnn.benchmark)

    before = torch.backends.cudnn.benchmark
    args = [a if a != "cpu" else "cuda" for a in TINY]
    assert main(args + ["--steps", "2", "--eval-interval", "2", "--run-dir", str(tmp_path / "run"), *flag],
                callbacks=[record]) == 0
    assert seen == [expected, expected]
    assert torch.backends.cudnn.benchmark is before
