"""glowfast.ema (the weights' moving average) and --ema-decay in training, resume and sampling."""

import json
import math

import pytest
import torch
from torch import nn

from glowfast.checkpoint import LAST, load_checkpoint
from glowfast.ema import ParameterEMA
from glowfast.evaluate import evaluate_bpd
from glowfast.sample import load_model
from glowfast.train import main

from test_train import TINY


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def test_constant_weights_converge_geometrically():
    """With the weights held at v, the average moves from its start e0 as v + decay**k (e0 - v)."""
    net = _net()
    ema = ParameterEMA(net, 0.9)
    start = [s.clone().double() for s in ema.shadow]
    ema.num_updates = 10**6  # past the warm-up: every update uses the full decay
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    target = [p.detach().double() for p in net.parameters()]
    for _ in range(7):
        ema.update()
    for s, e0, v in zip(ema.shadow, start, target):
        torch.testing.assert_close(s.double(), v + 0.9**7 * (e0 - v), rtol=0, atol=1e-6)


def test_warm_up_decay_follows_the_weights_early():
    """Update n uses min(decay, (1+n)/(10+n)): the first update keeps 1/10 of the start, not 999/1000."""
    net = _net()
    ema = ParameterEMA(net, 0.999)
    assert ema.current_decay() == pytest.approx(0.1)
    e0 = [s.clone() for s in ema.shadow]
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(-1.0)
    ema.update()
    for s, a, p in zip(ema.shadow, e0, net.parameters()):
        torch.testing.assert_close(s, 0.1 * a + 0.9 * p.detach(), rtol=0, atol=1e-6)
    ema.num_updates = 100000
    assert ema.current_decay() == 0.999


def test_applied_swaps_in_the_average_and_restores_exactly():
    net = _net()
    ema = ParameterEMA(net, 0.5)
    before = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for s in ema.shadow:
            s.add_(3.0)
    with ema.applied():
        for p, s in zip(net.parameters(), ema.shadow):
            assert torch.equal(p.detach(), s)
    for p, b in zip(net.parameters(), before):
        assert torch.equal(p.detach(), b)
    with pytest.raises(KeyError):  # restored on error too
        with ema.applied():
            raise KeyError("boom")
    for p, b in zip(net.parameters(), before):
        assert torch.equal(p.detach(), b)


def test_state_dict_round_trip_and_bad_state():
    net = _net()
    ema = ParameterEMA(net, 0.99)
    for _ in range(3):
        with torch.no_grad():
            next(net.parameters()).add_(0.5)
        ema.update()
    other = ParameterEMA(_net(), 0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.99 and other.num_updates == 3
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, other.shadow))
    with pytest.raises(ValueError, match="holds 1 tensors"):
        other.load_state_dict({**ema.state_dict(), "shadow": ema.shadow[:1]})
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict({**ema.state_dict(), "shadow": [s.reshape(-1) for s in ema.shadow]})


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1, math.nan, "0.9"])
def test_bad_decay_is_refused(decay):
    with pytest.raises(ValueError, match="decay"):
        ParameterEMA(_net(), decay)


def test_training_evaluates_with_the_average_and_resumes_it_exactly(tmp_path, capsys):
    """--ema-decay: the logged test bits/dim are the averaged weights' (recomputed here from the checkpoint),
    not the last iterate's; a run stopped at step 4 and resumed to 8 has the same average as one run to 8."""
    common = TINY + ["--ema-decay", "0.9", "--eval-interval", "4", "--ckpt-interval", "4", "--lr", "1e-2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(common + ["--steps", "8", "--run-dir", str(a)]) == 0
    assert main(common + ["--steps", "4", "--run-dir", str(b)]) == 0
    assert main(["--resume", str(b), "--steps", "8", "--no-progress"]) == 0
    ca, cb = load_checkpoint(a / "checkpoints" / LAST), load_checkpoint(b / "checkpoints" / LAST)
    assert ca["ema"]["num_updates"] == cb["ema"]["num_updates"] == 8
    assert all(torch.equal(x, y) for x, y in zip(ca["ema"]["shadow"], cb["ema"]["shadow"]))

    from glowfast.data import get_dataset

    test_set = get_dataset("digits", "test")
    cpu = torch.device("cpu")
    averaged = load_model(ca, cpu, "reference")
    raw = load_model(ca, cpu, "reference", raw_weights=True)
    assert any(not torch.equal(p, q) for p, q in zip(averaged.parameters(), raw.parameters()))
    seed = ca["config"]["seed"]
    bpd_avg = evaluate_bpd(averaged, test_set, cpu, batch_size=512, seed=seed)
    bpd_raw = evaluate_bpd(raw, test_set, cpu, batch_size=512, seed=seed)
    summary = json.loads((a / "summary.json").read_text())
    assert summary["eval_weights"] == "ema 0.9"
    assert summary["test_bpd"] == pytest.approx(bpd_avg, rel=1e-6) and bpd_avg != pytest.approx(bpd_raw, rel=1e-6)
    # training itself continued from the last iterate, which the checkpoint's "model" holds
    assert all(torch.equal(p, q) for p, q in zip(raw.state_dict().values(), ca["model"].values()))


def test_bad_ema_decay_option(tmp_path, capsys):
    assert main(TINY + ["--steps", "2", "--ema-decay", "1", "--run-dir", str(tmp_path / "x")]) == 2
    assert "--ema-decay must be in [0, 1)" in capsys.readouterr().err


def test_average_of_low_precision_weights_is_kept_in_float32():
    """The docstring: "kept in float32 (or the parameter's dtype if wider)". With bf16 weights each update's
    move, (1 - decay) * (weight - average), is far below bf16's spacing; in float32 the average after k updates
    is v + decay**k (e0 - v), computed here in float64."""
    net = _net().to(torch.bfloat16)
    ema = ParameterEMA(net, 0.99)
    assert [s.dtype for s in ema.shadow] == [torch.float32] * len(ema.shadow)
    start = [p.detach().double() for p in net.parameters()]
    ema.num_updates = 10**6  # past the warm-up: every update uses the full decay
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.25)
    target = [p.detach().double() for p in net.parameters()]  # the bf16 weights, exactly
    for _ in range(50):
        ema.update()
    for s, e0, v in zip(ema.shadow, start, target, strict=True):
        assert s.dtype == torch.float32
        torch.testing.assert_close(s.double(), v + 0.99**50 * (e0 - v), rtol=0, atol=1e-5)
    with ema.applied():  # the weights used for evaluation: the average rounded once to bf16
        for p, s in zip(net.parameters(), ema.shadow):
            assert p.dtype == torch.bfloat16 and torch.equal(p, s.to(torch.bfloat16))


# ------------------------------------------------------------------ gaps found by mutation testing (12th session)
def test_training_averages_the_weights_after_each_update(tmp_path):
    """--ema-decay: the average starts at the initialised weights w0 (after ActNorm's data-dependent init) and is
    updated after the optimiser's step, so after the first step it is 0.1·w0 + 0.9·w1 (the first update's decay is
    min(decay, 1/10)), w1 being the weights that step produced -- not w0 again (an update before the step)."""
    seen = {}

    def grab(event, trainer):
        params = list(trainer.model.parameters())
        if event == "start":
            seen["w0"] = [p.detach().clone() for p in params]
            seen["shadow0"] = [s.clone() for s in trainer.ema.shadow]
        elif event == "after_step" and trainer.step == 1:
            seen["w1"] = [p.detach().clone() for p in params]
            seen["shadow1"] = [s.clone() for s in trainer.ema.shadow]

    assert main(TINY + ["--steps", "1", "--ema-decay", "0.9", "--lr", "1e-2", "--eval-interval", "100",
                        "--temperatures", "0.7", "--run-dir", str(tmp_path / "run")], callbacks=[grab]) == 0
    assert any(not torch.equal(a, b) for a, b in zip(seen["w0"], seen["w1"]))  # the step moved the weights
    assert any(bool((w != 0).any()) and not torch.equal(w, torch.zeros_like(w)) for w in seen["w0"])
    for s, w0 in zip(seen["shadow0"], seen["w0"], strict=True):
        assert torch.equal(s, w0)
    for s, w0, w1 in zip(seen["shadow1"], seen["w0"], seen["w1"], strict=True):
        torch.testing.assert_close(s.double(), 0.1 * w0.double() + 0.9 * w1.double(), rtol=0, atol=1e-6)


def test_a_skipped_step_leaves_the_average_alone(tmp_path):
    """The average is updated after every APPLIED update, not after skipped ones (module docstring): an inf put
    into the top prior for step 4 only makes that step non-finite, so it is skipped, and the average (its tensors and
    its update count) is the same after it as before it."""
    seen = {}

    def inject(event, trainer):
        top = trainer.model.prior.top
        if event == "before_step" and trainer.step == 3:
            seen["shadow"] = [s.clone() for s in trainer.ema.shadow]
            seen["n"] = trainer.ema.num_updates
            seen["value"] = top.data[0].item()
            top.data[0] = float("inf")
        elif event == "after_step" and trainer.step == 4:
            top.data[0] = seen["value"]
            seen["skipped"] = trainer.nonfinite_total
            seen["same"] = all(torch.equal(a, b) for a, b in zip(seen["shadow"], trainer.ema.shadow, strict=True))
            seen["n_after"] = trainer.ema.num_updates

    assert main(TINY + ["--steps", "5", "--ema-decay", "0.9", "--eval-interval", "100", "--temperatures", "0.7",
                        "--run-dir", str(tmp_path / "run")], callbacks=[inject]) == 0
    assert seen["skipped"] == 1 and seen["n"] == 3
    assert seen["same"] and seen["n_after"] == 3
