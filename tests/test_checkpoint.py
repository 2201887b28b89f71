"""Atomic checkpointing: interrupted writes keep the previous checkpoint; weights_only loading; RNG state."""

import os
import random

import numpy as np
import pytest
import torch

from glowfast.checkpoint import (
    LAST,
    PREV,
    CheckpointError,
    NonFiniteStateError,
    assert_finite_state,
    atomic_save,
    find_checkpoint,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)


def _state(v: float) -> dict:
    return {"model": {"w": torch.full((4,), v)}, "optimizer": {"state": {}, "param_groups": []}, "step": int(v),
            "config": {"K": 2, "name": "x", "shape": [1, 8, 8]}}


class Boom(RuntimeError):
    pass


def half_writer_then_crash(obj, f):
    """A writer interrupted mid-write: half of the real bytes reach the file, then it fails."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    raise Boom("simulated crash during save")


def test_save_load_roundtrip_keeps_previous(tmp_path):
    save_checkpoint(_state(1.0), tmp_path)
    assert (tmp_path / LAST).exists() and not (tmp_path / PREV).exists()
    save_checkpoint(_state(2.0), tmp_path)
    assert load_checkpoint(tmp_path / LAST)["step"] == 2
    assert load_checkpoint(tmp_path / PREV)["step"] == 1
    path, state = find_checkpoint(tmp_path)
    assert path.name == LAST and state["step"] == 2 and torch.equal(state["model"]["w"], torch.full((4,), 2.0))
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_crash_during_save_leaves_previous_checkpoint_intact(tmp_path):
    save_checkpoint(_state(1.0), tmp_path)
    save_checkpoint(_state(2.0), tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in (LAST, PREV)}
    with pytest.raises(Boom):
        save_checkpoint(_state(3.0), tmp_path, writer=half_writer_then_crash)
    after = {n: (tmp_path / n).read_bytes() for n in (LAST, PREV)}
    assert before == after
    assert find_checkpoint(tmp_path)[1]["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST, PREV]  # no temp file left behind


def test_next_save_removes_a_killed_writers_temporary(tmp_path):
    """SIGKILL mid-write leaves a half-written `.last.pt.*.tmp` (no except clause runs); the next save of the
    run (e.g. after --resume) deletes it, and touches nothing else in the folder."""
    save_checkpoint(_state(1.0), tmp_path)
    stale = tmp_path / f".{LAST}.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    other = tmp_path / "notes.txt"
    other.write_text("keep me")
    assert find_checkpoint(tmp_path)[1]["step"] == 1  # the stale file never shadows a real checkpoint
    save_checkpoint(_state(2.0), tmp_path)
    assert not stale.exists() and other.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LAST, PREV, "notes.txt"])


def test_atomic_save_crash_keeps_old_file(tmp_path):
    target = tmp_path / "x.pt"
    atomic_save({"a": torch.ones(3)}, target)
    with pytest.raises(Boom):
        atomic_save({"a": torch.zeros(3)}, target, writer=half_writer_then_crash)
    assert torch.equal(load_checkpoint(target)["a"], torch.ones(3))


def test_unwritable_target_is_a_real_failure_that_keeps_old(tmp_path):
    """A real OS failure: the target name is a non-empty directory, so os.replace fails."""
    save_checkpoint(_state(1.0), tmp_path)
    os.replace(tmp_path / LAST, tmp_path / "keep.pt")
    (tmp_path / LAST).mkdir()
    (tmp_path / LAST / "blocker").write_text("x")
    with pytest.raises(OSError):
        save_checkpoint(_state(2.0), tmp_path)
    assert load_checkpoint(tmp_path / "keep.pt")["step"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_corrupt_last_falls_back_to_prev(tmp_path):
    save_checkpoint(_state(1.0), tmp_path)
    save_checkpoint(_state(2.0), tmp_path)
    data = (tmp_path / LAST).read_bytes()
    # break the hard link first so prev.pt is not damaged with it
    os.unlink(tmp_path / LAST)
    (tmp_path / LAST).write_bytes(data[: len(data) // 3])
    with pytest.warns(UserWarning, match="cannot load"):
        path, state = find_checkpoint(tmp_path)
    assert path.name == PREV and state["step"] == 1


def test_no_checkpoint_raises(tmp_path):
    with pytest.raises(CheckpointError):
        find_checkpoint(tmp_path)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "missing.pt")


def test_non_finite_weights_are_refused(tmp_path):
    save_checkpoint(_state(1.0), tmp_path)
    bad = _state(2.0)
    bad["model"]["w"][1] = float("nan")
    with pytest.raises(NonFiniteStateError, match="model.w"):
        save_checkpoint(bad, tmp_path)
    bad["model"]["w"][1] = float("inf")
    with pytest.raises(NonFiniteStateError):
        save_checkpoint(bad, tmp_path)
    assert load_checkpoint(tmp_path / LAST)["step"] == 1


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_weights_only_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": _Evil()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_rng_state_roundtrip_through_weights_only(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    np.random.randn()  # has_gauss state
    state = get_rng_state()
    save_checkpoint({"rng": [state]}, tmp_path)
    expected = (torch.rand(3), random.random(), np.random.rand(2), np.random.randn())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    set_rng_state(load_checkpoint(tmp_path / LAST)["rng"][0])
    got = (torch.rand(3), random.random(), np.random.rand(2), np.random.randn())
    assert torch.equal(expected[0], got[0]) and expected[1] == got[1]
    assert np.array_equal(expected[2], got[2]) and expected[3] == got[3]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o007, 0o660)])
def test_checkpoint_file_mode_follows_the_umask(tmp_path, umask, mode):
    """Like any file the user writes (they were owner-only 0600, mkstemp's mode: colleagues sharing a project
    folder could not load them). A fresh process, because the umask is read once at import."""
    import stat
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import sys; from glowfast.checkpoint import save_checkpoint; "
            "save_checkpoint({'step': 1}, sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "ckpt")], check=True, cwd=root,
                   preexec_fn=lambda: os.umask(umask), timeout=120)
    assert stat.S_IMODE((tmp_path / "ckpt" / LAST).stat().st_mode) == mode


def _adam_step(net, opt):
    opt.zero_grad()
    net(torch.randn(8, 3)).pow(2).mean().backward()
    opt.step()


def test_non_finite_optimizer_state_is_refused_and_the_previous_checkpoint_kept(tmp_path):
    """A NaN in Adam's moment (the weights themselves finite) would poison every update after a resume: saving
    it is refused (NonFiniteStateError naming the tensor) and the checkpoints on disk stay as they were."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    _adam_step(net, opt)
    save_checkpoint({"model": net.state_dict(), "optimizer": opt.state_dict(), "step": 1}, tmp_path)
    before = (tmp_path / LAST).read_bytes()
    _adam_step(net, opt)
    for key, value in (("exp_avg", float("nan")), ("exp_avg_sq", float("inf"))):
        moment = opt.state[net.weight][key]
        good = moment[0, 1].item()
        moment[0, 1] = value
        with pytest.raises(NonFiniteStateError, match=key):
            save_checkpoint({"model": net.state_dict(), "optimizer": opt.state_dict(), "step": 2}, tmp_path)
        moment[0, 1] = good
    assert (tmp_path / LAST).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST]  # no prev.pt rotated in, no temporary left
    assert load_checkpoint(tmp_path / LAST)["step"] == 1
    # the same state, finite again, saves
    save_checkpoint({"model": net.state_dict(), "optimizer": opt.state_dict(), "step": 2}, tmp_path)
    assert load_checkpoint(tmp_path / LAST)["step"] == 2 and load_checkpoint(tmp_path / PREV)["step"] == 1


def test_the_temporary_is_fsynced_before_it_replaces_the_checkpoint(tmp_path, monkeypatch):
    """Atomicity needs the new content on disk before the rename (else a power cut can leave a renamed but empty
    last.pt), the old last.pt kept as prev.pt before it is replaced, and the folder fsync'ed after the rename.
    os.fsync / os.replace are wrapped only to record the order of the real calls (files named by inode)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", (st.st_dev, st.st_ino)))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        st = os.stat(src)
        events.append(("replace", (st.st_dev, st.st_ino), os.path.basename(dst)))
        return real_replace(src, dst, *args, **kwargs)

    save_checkpoint(_state(1.0), tmp_path)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(_state(2.0), tmp_path)
    monkeypatch.undo()
    replaces = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == LAST]
    assert len(replaces) == 1
    i = replaces[0]
    new_file = events[i][1]
    st = (tmp_path / LAST).stat()
    assert (st.st_dev, st.st_ino) == new_file and load_checkpoint(tmp_path / LAST)["step"] == 2
    assert ("fsync", new_file) in events[:i], events
    assert any(e[0] == "replace" and e[2] == PREV for e in events[:i]), events
    d = tmp_path.stat()
    assert ("fsync", (d.st_dev, d.st_ino)) in events[i + 1:], events


def test_a_save_removes_only_its_own_stale_temporaries(tmp_path):
    """The clean-up after a save deletes a killed writer's `.last.pt.*.tmp` and no other `.tmp` in the folder
    (a user's file, or the in-flight temporary of another file written there)."""
    save_checkpoint(_state(1.0), tmp_path)
    stale = tmp_path / f".{LAST}.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    foreign = {tmp_path / "notes.tmp": b"keep me", tmp_path / ".best.pt.x7y8z9.tmp": b"someone else's write"}
    for path, data in foreign.items():
        path.write_bytes(data)
    save_checkpoint(_state(2.0), tmp_path)
    assert not stale.exists()
    for path, data in foreign.items():
        assert path.exists() and path.read_bytes() == data, path.name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LAST, PREV, *(p.name for p in foreign)])


@pytest.mark.parametrize("content,cause", [
    (bytes(range(256)) * 8, "UnpicklingError: Unsupported operand"),  # not a zip, not a pickle
    (None, "RuntimeError: PytorchStreamReader failed reading zip archive"),  # a real checkpoint cut in half
    (b"", "(empty or truncated file)"),
])
def test_an_unreadable_checkpoint_is_one_short_line_naming_the_cause(tmp_path, content, cause):
    """torch.load's weights-only refusal is a paragraph advising weights_only=False (wrong for a corrupt file, unsafe
    for an unknown one); the CheckpointError keeps the path and the cause on one line."""
    save_checkpoint(_state(1.0), tmp_path)
    path = tmp_path / LAST
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2] if content is None else content)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    message = str(e.value)
    assert message.startswith(f"cannot load checkpoint {path}: ") and cause in message, message
    assert "weights_only" not in message and "\n" not in message and len(message) < 200 + len(str(path)) + 60
    with pytest.raises(CheckpointError, match=f"^checkpoint not found: {tmp_path / 'nowhere'}$"):
        find_checkpoint(tmp_path / "nowhere")


def _overwrite_last(directory, state):
    """Put `state` in last.pt without save_checkpoint's checks (a damaged or foreign file); prev.pt is untouched
    (the hard link to it is broken first)."""
    os.unlink(directory / LAST)
    torch.save(state, directory / LAST)


@pytest.mark.parametrize("where", ["model", "optimizer", "ema"])
def test_a_checkpoint_holding_non_finite_state_is_unusable(tmp_path, where):
    """save_checkpoint never writes NaN/Inf, so a file that holds some is damaged: find_checkpoint skips it for prev.pt
    (with a warning naming the tensor) and refuses it when it is the only one (a loaded NaN model would be silent)."""
    save_checkpoint(_state(1.0), tmp_path)
    save_checkpoint(_state(2.0), tmp_path)
    bad = _state(3.0)
    bad["ema"] = {"shadow": [torch.ones(2)]}
    nan_holder = {"model": bad["model"]["w"], "optimizer": None, "ema": bad["ema"]["shadow"][0]}[where]
    if nan_holder is None:
        bad["optimizer"]["state"] = {0: {"exp_avg": torch.tensor([0.0, float("inf")])}}
    else:
        nan_holder[0] = float("nan")
    _overwrite_last(tmp_path, bad)
    with pytest.warns(UserWarning, match=f"damaged: {where}.*non-finite.*trying the previous"):
        path, state = find_checkpoint(tmp_path)
    assert path.name == PREV and state["step"] == 1
    with pytest.raises(CheckpointError, match=f"{LAST} is damaged: {where}"):
        find_checkpoint(tmp_path / LAST)


def test_the_callers_check_makes_a_checkpoint_unusable(tmp_path):
    """find_checkpoint(check=...): a checkpoint that loads but fails the caller's check (the trainer's: another
    model, an incomplete dict) is skipped for prev.pt, and with neither usable the error names both reasons."""
    save_checkpoint(_state(1.0), tmp_path)
    save_checkpoint(_state(2.0), tmp_path)

    def only_step_1(state):
        if state["step"] != 1:
            raise CheckpointError(f"step {state['step']} is not step 1")

    with pytest.warns(UserWarning, match="step 2 is not step 1"):
        path, state = find_checkpoint(tmp_path, check=only_step_1)
    assert path.name == PREV and state["step"] == 1

    def none(state):
        raise CheckpointError(f"not this one (step {state['step']})")

    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=r"step 2\).*step 1\)"):
        find_checkpoint(tmp_path, check=none)


# ------------------------------------------------------------------ gaps found by mutation testing (12th session)
def test_non_finite_values_inside_lists_and_tuples_are_found_and_named():
    """assert_finite_state walks a NESTED state (its docstring), lists and tuples included -- e.g. a moving
    average's list of shadow tensors -- and names where the value sits."""
    assert_finite_state({"a": [torch.ones(2), (torch.zeros(1), 3, "x")], "b": torch.arange(3)})  # all finite
    nan, inf = torch.tensor([1.0, float("nan")]), torch.tensor([float("-inf")])
    with pytest.raises(NonFiniteStateError, match=r"state\.ema\.shadow\[1\]"):
        assert_finite_state({"ema": {"shadow": [torch.ones(2), nan]}})
    with pytest.raises(NonFiniteStateError, match=r"state\[0\]\[1\]"):
        assert_finite_state([(torch.ones(1), inf)])
