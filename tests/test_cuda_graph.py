"""glowfast.cuda_graph.GraphedStep and `python -m glowfast.train --cuda-graphs`.

On a GPU: the replayed forward + backward gives the eager gradients (dequantisation off, so both see the same
input), on new batches and after the parameters change; random numbers are fresh per replay; misuse is an
error; a graphed training run completes, skips a non-finite step and resumes. Without a GPU only the clear
errors are checked (the rest skips).
"""

import json
import math

import pytest
import torch

from glowfast.checkpoint import LAST, load_checkpoint
from glowfast.cuda_graph import GraphedStep, check_graphable
from glowfast.model import Glow
from glowfast.train import main

from conftest import requires_cuda
from test_train import TINY, _metrics, inf_injector


def test_cuda_graphs_need_cuda(tmp_path, capsys):
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        check_graphable(torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        GraphedStep(lambda x: x, (torch.zeros(2),), [])
    assert main(TINY + ["--steps", "2", "--cuda-graphs", "--run-dir", str(tmp_path / "r")]) == 2
    assert "CUDA graphs need a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_cuda_graphs_refuse_the_reference_slogdet(tmp_path, capsys):
    """--backend reference with plain W computes log|det W| with torch.linalg.slogdet, which synchronises the GPU
    (it cannot be captured): refused up front, on any device, before anything is written."""
    run = tmp_path / "r"
    args = TINY + ["--steps", "2", "--cuda-graphs", "--backend", "reference", "--no-lu", "--run-dir", str(run)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "torch.linalg.slogdet" in err and "--backend auto/fused" in err
    assert not (run / "checkpoints").exists()


def _model(backend="fused", memory_saving=False, networks=None):
    torch.manual_seed(0)
    model = Glow((1, 8, 8), K=3, L=2, hidden_channels=16, backend=backend, memory_saving=memory_saving).cuda()
    with torch.no_grad():
        model(torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8, device="cuda"))  # ActNorm init
    if networks == "triton":
        from glowfast.amp import enable_triton_networks

        enable_triton_networks(model)
    if networks and networks.startswith("compiled"):
        from glowfast.amp import enable_bf16_networks, enable_channels_last_networks, enable_compiled_networks

        enable_compiled_networks(model)
        if networks == "compiled_bf16_nhwc":
            enable_bf16_networks(model)
            enable_channels_last_networks(model)
    return model


def _loss_and_grads(model):
    def fn(x):
        loss = model(x, dequantize=False).bits_per_dim.mean()
        loss.backward()
        return loss.detach()

    return fn


def _eager_grads(model, x):
    model.zero_grad(set_to_none=True)
    loss = _loss_and_grads(model)(x)
    return loss, [p.grad.clone() for p in model.parameters()]


@requires_cuda
@pytest.mark.parametrize("backend,memory_saving,networks", [("fused", False, None), ("reference", False, None),
                                                            ("fused", True, None), ("fused", False, "triton"),
                                                            ("fused", False, "compiled"),
                                                            ("fused", False, "compiled_bf16_nhwc")])
def test_replay_matches_eager(backend, memory_saving, networks, monkeypatch):
    """memory_saving: the invertible backward (W^-1 from the batched LU op, no host read) is captured too; triton:
    the coupling networks by glowfast's kernels (--triton-networks), whose launches and GEMMs are captured too;
    compiled: the networks' torch.compile'd graphs (--compile-networks; compiled in the capture's warm-up), in
    fp32 and as the fastest configuration runs them (bf16, channels_last)."""
    # replay and eager run the same algorithms only if cuDNN may not pick a non-deterministic one per call
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    model = _model(backend, memory_saving, networks)
    params = list(model.parameters())
    batches = [torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8, device="cuda") for _ in range(3)]
    step = GraphedStep(_loss_and_grads(model), (batches[0],), params)
    graph_grads = [p.grad for p in params]
    opt = torch.optim.Adamax(params, lr=1e-2)
    for i, x in enumerate(batches):
        loss = step(x).clone()
        replayed = [g.clone() for g in graph_grads]
        eager_loss, eager = _eager_grads(model, x)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6, msg=f"batch {i}: loss")
        for p_grad, e_grad in zip(replayed, eager, strict=True):
            torch.testing.assert_close(p_grad, e_grad, rtol=1e-5, atol=1e-6, msg=f"batch {i}: grad")
        for p, g in zip(params, graph_grads, strict=True):  # hand the graph's gradients back, then update
            p.grad = g
        opt.step()  # the next replay must see the new parameters


@requires_cuda
def test_fresh_noise_per_replay_and_misuse_errors():
    model = _model()

    def fn(x):
        loss = model(x).bits_per_dim.mean()  # with dequantisation noise
        loss.backward()
        return loss.detach()

    x = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8, device="cuda")
    step = GraphedStep(fn, (x,), model.parameters())
    a, b = step(x).item(), step(x).item()
    assert math.isfinite(a) and math.isfinite(b) and a != b
    with pytest.raises(ValueError, match="captured with shape"):
        step(x[:8])
    with pytest.raises(ValueError, match="captured with 1 inputs"):
        step(x, x)
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="set to None"):
        step(x)


CUDA_TINY = [a if a not in ("cpu", "reference") else {"cpu": "cuda", "reference": "fused"}[a] for a in TINY]


@requires_cuda
def test_graphed_training_run_skips_nonfinite_and_resumes(tmp_path):
    seen = {}
    run = tmp_path / "graphed"
    assert main(CUDA_TINY + ["--steps", "8", "--eval-interval", "4", "--cuda-graphs", "--run-dir", str(run)],
                callbacks=[inf_injector(seen)]) == 0
    assert seen["unchanged"] and seen["nonfinite_total"] == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["nonfinite_skipped"] == 1
    assert [r["step"] for r in _metrics(run) if r["type"] == "nonfinite"] == [4]
    train = [r for r in _metrics(run) if r["type"] == "train"]
    assert train and all(math.isfinite(r["loss"]) for r in train)
    assert train[-1]["loss"] < train[0]["loss"]
    assert main(["--resume", str(run), "--steps", "12", "--no-progress"]) == 0
    assert json.loads((run / "summary.json").read_text())["step"] == 12


@requires_cuda
def test_class_conditional_model_captures_without_a_sync():
    """The label path (one-hot, class prior, class head) has no host read: capturing it must not fail with
    'operation not permitted when stream is capturing', and the replay gives the eager loss."""
    torch.manual_seed(0)
    model = Glow((1, 8, 8), K=2, L=2, hidden_channels=16, n_classes=3, backend="fused").cuda()
    x = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8, device="cuda")
    y = torch.randint(0, 3, (16,), device="cuda")
    with torch.no_grad():
        model(x, y)  # ActNorm init

    def fn(x, y):
        loss = model(x, y, dequantize=False).bits_per_dim.mean()
        loss.backward()
        return loss.detach()

    step = GraphedStep(fn, (x, y), model.parameters())
    replayed = step(x, y).clone()
    model.zero_grad(set_to_none=False)
    torch.testing.assert_close(replayed, fn(x, y), rtol=1e-6, atol=1e-6)


@requires_cuda
def test_a_failed_capture_leaves_the_random_generator_usable():
    """A capture that raises (here: a host read, not allowed while capturing) reaches the caller as its error; and
    the default CUDA generator still draws afterwards, as the same seed draws without the failed capture.
    Without glowfast.cuda_graph.clear_failed_capture torch left it marked as capturing: every later torch.randn
    on the GPU raised "Offset increment outside graph capture encountered unexpectedly" (22nd session)."""
    x = torch.ones(4, device="cuda")

    def fn(x):
        return x * float(x.sum())  # .item(): a host sync

    torch.manual_seed(5)
    expected = torch.randn(3, device="cuda")
    torch.manual_seed(5)
    with pytest.raises(Exception) as err:  # torch's own error for a sync during capture
        GraphedStep(fn, (x,), [])
    assert "Offset increment" not in str(err.value)
    torch.testing.assert_close(torch.randn(3, device="cuda"), expected, rtol=0, atol=0)


# ------------------------------------------------------------------ gaps found by mutation testing (12th session)
def test_graphed_step_needs_an_input():
    from glowfast.cuda_graph import GraphedStep

    with pytest.raises(ValueError, match="needs at least one input tensor"):
        GraphedStep(lambda: torch.zeros(()), [], [])


@requires_cuda
def test_graphed_training_run_with_compiled_bf16_nhwc_networks(tmp_path):
    """The README's fastest configuration through the training CLI: --cuda-graphs with --amp bf16 --channels-last
    --compile-networks trains (finite, decreasing loss), evaluates and resumes."""
    run = tmp_path / "compiled"
    options = ["--cuda-graphs", "--amp", "bf16", "--channels-last", "--compile-networks"]
    assert main(CUDA_TINY + ["--steps", "8", "--eval-interval", "4", *options, "--run-dir", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    train = [r for r in _metrics(run) if r["type"] == "train"]
    assert train and all(math.isfinite(r["loss"]) for r in train) and train[-1]["loss"] < train[0]["loss"]
    assert main(["--resume", str(run), "--steps", "10", "--no-progress"]) == 0
    assert json.loads((run / "summary.json").read_text())["step"] == 10


@requires_cuda
def test_graphed_training_run_with_the_fused_optimizer(tmp_path):
    """--cuda-graphs with --fused-optimizer: FusedAdamax's kernel updates the graph's gradient tensors after each
    replay (its pointer tables built once and kept), and the run's weights stay those of the same run with torch's
    Adamax (a loose tolerance: eight steps of GPU rounding); it resumes."""
    from glowfast.optim import FusedAdamax

    counts = []

    def count(event, trainer):
        if event == "after_step":
            assert isinstance(trainer.optimizer, FusedAdamax)
            counts.append((trainer.optimizer.kernel_steps, len(trainer.optimizer._tables)))

    plain, fused = tmp_path / "plain", tmp_path / "fused"
    assert main(CUDA_TINY + ["--steps", "8", "--eval-interval", "8", "--cuda-graphs", "--run-dir", str(plain)]) == 0
    assert main(CUDA_TINY + ["--steps", "8", "--eval-interval", "8", "--cuda-graphs", "--fused-optimizer",
                             "--run-dir", str(fused)], callbacks=[count]) == 0
    assert counts == [(k, 1) for k in range(1, 9)]
    a = load_checkpoint(plain / "checkpoints" / LAST)["model"]
    b = load_checkpoint(fused / "checkpoints" / LAST)["model"]
    for name in a:
        # atol: eight updates of up to lr = 3e-3 each, from gradients that cuDNN's autotuned (TF32) algorithms may
        # round differently in the two runs; a wrong update (a missing bias correction: 10x the first step) errs more
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-3, msg=lambda m, n=name: f"{n}: {m}")
    assert main(["--resume", str(fused), "--steps", "10", "--no-progress"]) == 0
    assert json.loads((fused / "summary.json").read_text())["step"] == 10
