"""python -m glowfast.train under interruption and damage: Ctrl-C at any point, unreadable checkpoints, and
state that must survive a resume (the non-finite streak, a partial log window). The property each test checks is
the same: the resumed run is the uninterrupted run, and no good checkpoint is lost.

Tiny real runs (digits 1x8x8, K=2, L=1), as in test_train.py.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from glowfast.checkpoint import LAST, PREV, load_checkpoint
from glowfast.train import main

from test_train import TINY, _metrics

COMMON = TINY + ["--eval-interval", "4", "--ckpt-interval", "4"]


@contextlib.contextmanager
def python_sigint():
    """Python's own SIGINT handler for the duration (pytest installs its own; fit() defers only Python's)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _assert_same_weights(run_a, run_b):
    sa = load_checkpoint(run_a / "checkpoints" / LAST)["model"]
    sb = load_checkpoint(run_b / "checkpoints" / LAST)["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# one pytest-xdist worker for this module (gpu_check.sh runs the suite with --dist loadgroup): its module-scoped fixture
# is expensive and would otherwise be rebuilt by every worker that gets one of its tests
pytestmark = pytest.mark.xdist_group("train_resume")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(COMMON + ["--steps", "9", "--run-dir", str(run)]) == 0
    return run


def _interrupt_at_step(where: str, step: int):
    """A callback that raises KeyboardInterrupt in the middle of step `step` (1-based): in the forward (after the
    dequantisation noise was drawn) or right after the optimiser applied the update."""
    def install(event, trainer):
        if event != "start":
            return
        if where == "forward":
            def hook(module, inputs):
                if trainer.step == step - 1 and module.training:
                    raise KeyboardInterrupt
            trainer.model.levels[0].steps[0].actnorm.register_forward_pre_hook(hook)
        else:
            def hook(optimizer, args, kwargs):
                if trainer.step == step - 1:
                    raise KeyboardInterrupt
            trainer.optimizer.register_step_post_hook(hook)
    return install


@pytest.mark.parametrize("where", ["forward", "after_optimizer_step"])
def test_interrupt_mid_step_keeps_the_last_consistent_checkpoint(tmp_path, capsys, uninterrupted, where):
    """A KeyboardInterrupt inside step 7 must not be checkpointed as step 6 (the step's noise was drawn, or its
    update applied): the step-4 checkpoint stays newest, and resuming reproduces the uninterrupted run."""
    run = tmp_path / "run"
    assert main(COMMON + ["--steps", "9", "--run-dir", str(run)], callbacks=[_interrupt_at_step(where, 7)]) == 130
    assert "interrupted mid-step" in capsys.readouterr().err
    assert load_checkpoint(run / "checkpoints" / LAST)["step"] == 4
    assert main(["--resume", str(run), "--no-progress"]) == 0
    _assert_same_weights(uninterrupted, run)


def test_ctrl_c_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, capfd, uninterrupted):
    """A real SIGINT during step 7: the step completes, a checkpoint at step 7 is written, exit 130; the resumed
    run equals the uninterrupted one. The Python SIGINT handler is restored afterwards."""
    with python_sigint():
        run = tmp_path / "run"
        assert main(COMMON + ["--steps", "9", "--run-dir", str(run)], callbacks=[_ctrl_c_before_step(7)]) == 130
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    err = capfd.readouterr().err
    assert "stopping after step 7" in err and "the checkpoint holds it" in err
    assert load_checkpoint(run / "checkpoints" / LAST)["step"] == 7
    assert load_checkpoint(run / "checkpoints" / PREV)["step"] == 4
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    assert main(["--resume", str(run), "--no-progress"]) == 0
    _assert_same_weights(uninterrupted, run)


def _damage(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_resume_with_no_loadable_checkpoint_is_an_error_that_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(COMMON + ["--steps", "8", "--run-dir", str(run)]) == 0
    for name in (LAST, PREV):
        _damage(run / "checkpoints" / name)
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    metrics, config = (run / "metrics.jsonl").read_text(), (run / "config.json").read_text()
    with pytest.warns(UserWarning, match="trying the previous checkpoint") as record:
        assert main(["--resume", str(run), "--steps", "12", "--no-progress"]) == 2
    # one "trying the previous" for last.pt; prev.pt, the last one there is, gets none (its error ends the line below)
    tried = [str(w.message) for w in record if "trying the previous" in str(w.message)]
    assert len(tried) == 1 and LAST in tried[0], tried
    assert "cannot resume" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before
    assert (run / "metrics.jsonl").read_text() == metrics
    assert (run / "config.json").read_text() == config  # it took the failed resume's --steps 12


def test_resume_with_fewer_steps_than_done_is_an_error_that_changes_nothing(tmp_path, capsys):
    """--resume RUN --steps N below the run's step rewrote config.json to N (and every later plain --resume
    inherited it) while training nothing (found by a user-study audit). Equal to the step: nothing to do, rc 0."""
    run = tmp_path / "run"
    assert main(COMMON + ["--steps", "8", "--run-dir", str(run)]) == 0
    files = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    metrics, config = (run / "metrics.jsonl").read_text(), (run / "config.json").read_text()
    capsys.readouterr()
    assert main(["--resume", str(run), "--steps", "4", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --resume {run}: the run is already at step 8, past the --steps given (4 steps); give more to train "
        "further. The run was left as it is.")
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == files
    assert (run / "metrics.jsonl").read_text() == metrics and (run / "config.json").read_text() == config
    assert main(["--resume", str(run), "--steps", "8", "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text())["steps"] == 8


def test_resume_from_prev_when_last_is_damaged_keeps_prev(tmp_path, uninterrupted):
    """last.pt unreadable: resume from prev.pt (step 4), move last.pt aside, and the next save must not turn the
    damaged file into prev.pt. The run then ends as the uninterrupted one."""
    run = tmp_path / "run"
    assert main(COMMON + ["--steps", "8", "--run-dir", str(run)]) == 0
    _damage(run / "checkpoints" / LAST)
    with pytest.warns(UserWarning, match="trying the previous checkpoint"):
        assert main(["--resume", str(run), "--steps", "9", "--no-progress"]) == 0
    assert (run / "checkpoints" / f"{LAST}.unreadable").exists()
    assert load_checkpoint(run / "checkpoints" / LAST)["step"] == 9
    assert load_checkpoint(run / "checkpoints" / PREV)["step"] == 8  # the step-8 save, re-made after the resume
    _assert_same_weights(uninterrupted, run)


def test_nonfinite_streak_survives_a_resume(tmp_path, capsys):
    """Non-finite losses at steps 3 and 4, a checkpoint at 4, another at 5 after resuming: with --max-nonfinite 3
    the run must stop at step 5, as an uninterrupted one does."""
    def poison(steps):
        saved = {}

        def cb(event, trainer):
            top = trainer.model.prior.top
            if event == "before_step" and trainer.step + 1 in steps:
                saved["v"] = top.data[0].item()
                top.data[0] = float("inf")
            elif event == "after_step" and "v" in saved:
                top.data[0] = saved.pop("v")  # finite again before any checkpoint
        return cb

    opts = TINY + ["--max-nonfinite", "3", "--eval-interval", "100", "--ckpt-interval", "4"]
    whole = tmp_path / "whole"
    assert main(opts + ["--steps", "8", "--run-dir", str(whole)], callbacks=[poison({3, 4, 5})]) == 3
    assert json.loads((whole / "summary.json").read_text())["step"] == 5
    split = tmp_path / "split"
    assert main(opts + ["--steps", "4", "--run-dir", str(split)], callbacks=[poison({3, 4})]) == 0
    assert load_checkpoint(split / "checkpoints" / LAST)["nonfinite_streak"] == 2
    assert main(["--resume", str(split), "--steps", "8", "--no-progress"], callbacks=[poison({5})]) == 3
    assert json.loads((split / "summary.json").read_text())["step"] == 5
    assert "3 non-finite losses in a row" in capsys.readouterr().err


def test_train_records_across_a_resume_off_the_log_grid(tmp_path):
    """Checkpoint every 3 steps, log every 2, interrupted in step 4: the resumed run's record at step 4 still
    averages steps 3 and 4 (the partial log window is checkpointed), so its metrics equal the uninterrupted run's."""
    opts = TINY + ["--eval-interval", "100", "--ckpt-interval", "3", "--steps", "8"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(opts + ["--run-dir", str(a)]) == 0
    assert main(opts + ["--run-dir", str(b)], callbacks=[_interrupt_at_step("forward", 4)]) == 130
    assert load_checkpoint(b / "checkpoints" / LAST)["step"] == 3
    assert main(["--resume", str(b), "--no-progress"]) == 0
    train_a = [(r["step"], r["loss"], r["bpd"]) for r in _metrics(a) if r["type"] == "train"]
    train_b = [(r["step"], r["loss"], r["bpd"]) for r in _metrics(b) if r["type"] == "train"]
    assert [r[0] for r in train_a] == [2, 4, 6, 8]
    assert train_a == train_b


def test_hidden_channels_zero_names_the_option(tmp_path, capsys):
    assert main(TINY + ["--steps", "2", "--hidden-channels", "0", "--run-dir", str(tmp_path / "x")]) == 2
    assert "--hidden-channels must be >= 1" in capsys.readouterr().err


def _ctrl_c_before_step(step: int):
    def cb(event, trainer):
        if event == "before_step" and trainer.step == step - 1:
            os.kill(os.getpid(), signal.SIGINT)
    return cb


def test_ctrl_c_in_the_last_step_completes_the_run(tmp_path):
    """Every step, the final evaluation and the final checkpoint happen anyway: the run is complete, not
    interrupted."""
    with python_sigint():
        run = tmp_path / "run"
        assert main(COMMON + ["--steps", "4", "--run-dir", str(run)], callbacks=[_ctrl_c_before_step(4)]) == 0
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert load_checkpoint(run / "checkpoints" / LAST)["step"] == 4


def test_a_new_fit_after_an_interrupted_one_is_not_stopped_by_the_old_request(tmp_path):
    """Trainer.fit() called again (a notebook, an API user) after a Ctrl-C-stopped fit() trains on."""
    import glowfast.train as train_module

    trainers = []

    def keep(event, trainer):
        if event == "start":
            trainers.append(trainer)

    with python_sigint():
        run = tmp_path / "run"
        rc = train_module.main(COMMON + ["--steps", "8", "--run-dir", str(run)],
                               callbacks=[keep, _ctrl_c_before_step(3)])
        assert rc == 130 and trainers[0].step == 3
        trainers[0].callbacks = []
        summary = trainers[0].fit()
    assert summary["status"] == "completed" and summary["step"] == 8


# ------------------------------------------------------------------ found by a crash-safety audit (12th session)
def test_a_run_resumed_at_its_last_step_runs_its_final_evaluation(tmp_path, capfd, uninterrupted):
    """A run stopped at step 3 (Ctrl-C; no evaluation at 3) resumed with --steps 3 has no step left to train: it
    used to skip the final evaluation, write test_bpd null and crash printing it. It evaluates and checkpoints,
    and the run can still be continued to the uninterrupted run's end, bit for bit."""
    with python_sigint():
        run = tmp_path / "run"
        assert main(COMMON + ["--steps", "9", "--run-dir", str(run)], callbacks=[_ctrl_c_before_step(3)]) == 130
    assert not [m for m in _metrics(run) if m["type"] == "eval"]
    capfd.readouterr()
    assert main(["--resume", str(run), "--steps", "3", "--no-progress"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 3
    evals = [m for m in _metrics(run) if m["type"] == "eval"]
    assert [m["step"] for m in evals] == [3] and evals[0]["test_bpd"] == summary["test_bpd"]
    assert f"test bits/dim {summary['test_bpd']:.4f}" in capfd.readouterr().err
    ckpt = load_checkpoint(run / "checkpoints" / LAST)
    assert ckpt["step"] == 3 and ckpt["last_eval_step"] == 3 and ckpt["last_test_bpd"] == summary["test_bpd"]
    # a second resume at the end evaluates nothing more (the checkpoint says step 3 was evaluated)
    assert main(["--resume", str(run), "--steps", "3", "--no-progress"]) == 0
    assert [m["step"] for m in _metrics(run) if m["type"] == "eval"] == [3]
    assert main(["--resume", str(run), "--steps", "9", "--no-progress"]) == 0
    _assert_same_weights(uninterrupted, run)


def _another_model(tmp_path):
    other = tmp_path / "other"
    assert main(COMMON + ["--steps", "1", "--hidden-channels", "8", "--run-dir", str(other)]) == 0
    return load_checkpoint(other / "checkpoints" / LAST)


@pytest.mark.parametrize("damage, reason", [
    ("another model", "a checkpoint of another model (hidden_channels 8 there, 16 here)"),
    ("no model", "incomplete checkpoint: no model"),
    ("not a training checkpoint", "not a python -m glowfast.train checkpoint"),
    ("NaN weights", "is damaged: model.levels"),
])
def test_an_unusable_last_checkpoint_falls_back_to_prev(tmp_path, uninterrupted, damage, reason):
    """last.pt loads but cannot continue this run -- another model's, a dict without weights, something else's,
    NaN weights: resume used to crash with a traceback (or train on and blame the learning rate), ignoring a good
    prev.pt. Now it is skipped like an unreadable file (a warning naming why), moved aside, and the run resumes
    from prev.pt to the uninterrupted run's weights."""
    run = tmp_path / "run"
    assert main(COMMON + ["--steps", "8", "--run-dir", str(run)]) == 0
    state = load_checkpoint(run / "checkpoints" / LAST)
    if damage == "another model":
        state = _another_model(tmp_path)
    elif damage == "no model":
        del state["model"]
    elif damage == "not a training checkpoint":
        state = {"model": state["model"]}
    else:
        next(iter(state["model"].values())).fill_(float("nan"))
    os.unlink(run / "checkpoints" / LAST)  # prev.pt is a hard link to the old last.pt: keep it intact
    torch.save(state, run / "checkpoints" / LAST)
    with pytest.warns(UserWarning, match="trying the previous checkpoint") as record:
        assert main(["--resume", str(run), "--steps", "9", "--no-progress"]) == 0
    assert any(reason in str(w.message) for w in record), [str(w.message) for w in record]
    assert (run / "checkpoints" / f"{LAST}.unreadable").exists()
    assert load_checkpoint(run / "checkpoints" / LAST)["step"] == 9
    _assert_same_weights(uninterrupted, run)


def test_a_checkpoint_of_another_model_alone_is_a_one_line_error_that_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(COMMON + ["--steps", "4", "--run-dir", str(run)]) == 0
    torch.save(_another_model(tmp_path), run / "checkpoints" / LAST)  # the only checkpoint (prev.pt: none at 4)
    assert not (run / "checkpoints" / PREV).exists()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["--resume", str(run), "--steps", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"error: cannot resume {run}: no usable checkpoint in {run}: {run / 'checkpoints' / LAST}: a checkpoint of "
        "another model (hidden_channels 8 there, 16 here). The files were left as they are.")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("content", ["", "{\"steps\": 8", "[]"])
def test_a_damaged_config_json_resumes_from_the_checkpoints_copy(tmp_path, capsys, uninterrupted, content):
    """config.json empty, truncated or not a config: the error used to be a bare JSON message or a KeyError
    traceback. Every checkpoint holds the run's config, so --resume uses it (with a note) and rewrites the file."""
    run = tmp_path / "run"
    assert main(COMMON + ["--steps", "4", "--run-dir", str(run)]) == 0
    good = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(content)
    capsys.readouterr()
    assert main(["--resume", str(run), "--steps", "9", "--no-progress"]) == 0
    assert "using the config saved in" in capsys.readouterr().err
    again = json.loads((run / "config.json").read_text())
    assert {k: again[k] for k in ("K", "L", "hidden_channels", "seed", "batch_size", "lr")} == \
        {k: good[k] for k in ("K", "L", "hidden_channels", "seed", "batch_size", "lr")}
    _assert_same_weights(uninterrupted, run)


def test_a_damaged_config_json_without_checkpoints_is_a_one_line_error(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{")
    assert main(["--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json does not load" in err[0] and "no checkpoint there holds a copy" in err[0]
    (run / "config.json").unlink()
    assert main(["--resume", str(run), "--no-progress"]) == 2
    assert "no config.json there" in capsys.readouterr().err


@pytest.mark.parametrize("replace", [False, True], ids=["removed", "replaced"])
def test_a_run_folder_removed_while_training_is_not_recreated(tmp_path, capsys, replace):
    """The run folder deleted (or deleted and made again) mid-run: training used to recreate it without its
    config, lock or older checkpoints, report success, and leave a folder --resume refused. It stops at its next
    write with a one-line error (exit 1) and writes nothing more."""
    import shutil

    run = tmp_path / "run"

    def remove(event, trainer):
        if event == "after_step" and trainer.step == 3:
            shutil.rmtree(run)
            if replace:
                run.mkdir()

    assert main(COMMON + ["--steps", "8", "--ckpt-interval", "2", "--run-dir", str(run)], callbacks=[remove]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: the run folder {run} was removed or replaced while training (at step 4); nothing more "
                       "was written")
    assert (sorted(run.iterdir()) == []) if replace else not run.exists()


def test_an_unusable_run_folder_is_a_one_line_error(tmp_path, capsys):
    """--run-dir under a file (and, as root can write anywhere, the stand-in for an unwritable parent): the
    mkdir's OSError used to be a traceback."""
    (tmp_path / "file").write_text("x")
    assert main(COMMON + ["--steps", "2", "--run-dir", str(tmp_path / "file" / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot use the run folder {tmp_path / 'file' / 'run'}: ")


def test_a_failed_config_write_is_a_one_line_error_that_leaves_no_temporary(tmp_path, capsys):
    """Writing config.json fails (here: a folder in its place; in life a full disk): one line, exit 1, and no
    half-written temporary left in the run folder."""
    run = tmp_path / "run"
    (run / "config.json").mkdir(parents=True)
    assert main(COMMON + ["--steps", "2", "--run-dir", str(run)]) == 1
    assert "error: stopped at step 0:" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == [".lock", "config.json"]


def test_a_second_ctrl_c_stops_without_the_checkpoint(tmp_path, capfd):
    """Ctrl-C, then Ctrl-C again before the stop's checkpoint: "again to stop now without one" -- the interrupt
    handler used to write it anyway."""
    def second(event, trainer):
        if event == "after_step" and trainer.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with python_sigint():
        run = tmp_path / "run"
        assert main(COMMON + ["--steps", "9", "--ckpt-interval", "2", "--run-dir", str(run)],
                    callbacks=[_ctrl_c_before_step(3), second]) == 130
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: interrupted at step 3 (stopped before its checkpoint: the newest checkpoint (step 2) "
                       f"was left as it is); resume with --resume {run}")
    assert load_checkpoint(run / "checkpoints" / LAST)["step"] == 2


_SIGTERM_RUN = """
import os, signal, sys
from glowfast.train import main
def term(event, trainer):
    if event == "before_step" and trainer.step == 6:
        os.kill(os.getpid(), signal.SIGTERM)
rc = main(sys.argv[1:], callbacks=[term])
assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "SIGTERM's default handler was not restored"
sys.exit(rc)
"""


def test_sigterm_stops_like_ctrl_c_with_a_checkpoint(tmp_path, uninterrupted):
    """SIGTERM (a scheduler's pre-emption, docker stop) used to kill the run on the spot, losing every step since
    the last checkpoint. It now finishes the step, checkpoints it and exits 143; the resumed run is the
    uninterrupted one. In a subprocess: a missing handler would kill the process that gets the signal."""
    from test_train import _env

    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-c", _SIGTERM_RUN, *COMMON, "--steps", "9", "--run-dir", str(run)],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert out.returncode == 143, out.stderr[-2000:]
    assert "SIGTERM: stopping after step 7 with a checkpoint" in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: terminated (SIGTERM) at step 7 (the checkpoint holds it); resume with --resume {run}")
    assert load_checkpoint(run / "checkpoints" / LAST)["step"] == 7
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    assert main(["--resume", str(run), "--no-progress"]) == 0
    _assert_same_weights(uninterrupted, run)


def test_hflip_run_resumed_mid_epoch_is_the_uninterrupted_run(tmp_path):
    """--hflip's flips depend on (seed, epoch, image) only: stopped at step 7 (part-way through the second epoch of
    5 batches) and resumed, the run reaches the uninterrupted run's weights bit for bit."""
    args = COMMON + ["--steps", "9", "--hflip"]
    whole = tmp_path / "whole"
    assert main(args + ["--run-dir", str(whole)]) == 0
    with python_sigint():
        run = tmp_path / "run"
        assert main(args + ["--run-dir", str(run)], callbacks=[_ctrl_c_before_step(7)]) == 130
    assert load_checkpoint(run / "checkpoints" / LAST)["step"] == 7
    assert main(["--resume", str(run), "--no-progress"]) == 0
    _assert_same_weights(whole, run)
