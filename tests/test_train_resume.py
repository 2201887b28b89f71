"""python -m glowfast.train under interruption and damage: Ctrl-C at any point, unreadable checkpoints, and
state that must survive a resume (the non-finite streak, a partial log window). The property each test checks is
the same: the resumed run is the uninterrupted run, and no good checkpoint is lost.

Tiny real runs (digits 1x8x8, K=2, L=1), as in test_train.py.
"""

import json
import os
import signal

import pytest
import torch

from glowfast.checkpoint import LAST, PREV, load_checkpoint
from glowfast.train import main

from test_train import TINY, _metrics

COMMON = TINY + ["--eval-interval", "4", "--ckpt-interval", "4"]


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
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        def ctrl_c(event, trainer):
            if event == "before_step" and trainer.step == 6:
                os.kill(os.getpid(), signal.SIGINT)

        run = tmp_path / "run"
        assert main(COMMON + ["--steps", "9", "--run-dir", str(run)], callbacks=[ctrl_c]) == 130
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
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
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run = tmp_path / "run"
        assert main(COMMON + ["--steps", "4", "--run-dir", str(run)], callbacks=[_ctrl_c_before_step(4)]) == 0
    finally:
        signal.signal(signal.SIGINT, previous)
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert load_checkpoint(run / "checkpoints" / LAST)["step"] == 4


def test_a_new_fit_after_an_interrupted_one_is_not_stopped_by_the_old_request(tmp_path):
    """Trainer.fit() called again (a notebook, an API user) after a Ctrl-C-stopped fit() trains on."""
    import glowfast.train as train_module

    trainers = []

    def keep(event, trainer):
        if event == "start":
            trainers.append(trainer)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run = tmp_path / "run"
        rc = train_module.main(COMMON + ["--steps", "8", "--run-dir", str(run)],
                               callbacks=[keep, _ctrl_c_before_step(3)])
        assert rc == 130 and trainers[0].step == 3
        trainers[0].callbacks = []
        summary = trainers[0].fit()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert summary["status"] == "completed" and summary["step"] == 8
