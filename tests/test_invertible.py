"""Memory-saving backward (glowfast.invertible, `memory_saving=True` / `--memory-saving`) vs the reference.

Forward values are the ordinary fused path's, bit for bit; gradients of x and every parameter match the
reference layers (which store activations) within the exact-fp32 tolerances; and the autograd graph really
keeps less: the bytes saved for backward are counted with saved_tensors_hooks.
"""

import pytest
import torch

from glowfast import fused
from glowfast.model import Glow

from conftest import kernel_devices
from helpers import OpLog, assert_steps_match_reference, make_steps, randomize_, reference_forward
from tolerances import assert_exact, assert_grads_exact

COMBOS = [(c, p, lu) for c in ("affine", "additive") for p, lu in (("invconv", True), ("invconv", False),
                                                                   ("shuffle", True), ("reverse", True))]
COMBO_IDS = [f"{c}-{p}{'-lu' if lu else ''}" for c, p, lu in COMBOS]


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("coupling,permutation,lu", COMBOS, ids=COMBO_IDS)
def test_memory_saving_gradients_match_the_reference(coupling, permutation, lu, device, exact_precision):
    steps = make_steps(4, 6, coupling, permutation, lu, device)
    x = torch.randn(2, 6, 3, 5, device=device, requires_grad=True)
    y_fused, ld_fused = fused.steps_forward(list(steps), x)
    y, ld = fused.steps_forward(list(steps), x, memory_saving=True)
    assert torch.equal(y, y_fused) and torch.equal(ld, ld_fused)  # same kernels forward
    assert_steps_match_reference(steps, x, y, ld)


def test_reconstruction_and_sampling_invert_w_with_the_batched_lu_op(kernel_device):
    """Every step's W^-1, for the memory-saving backward and for the fused inverse (sampling), comes from one call
    of the batched LU op (one launch, no host read unless checked: capturable in a CUDA graph), not from
    torch.linalg, which a failed import had silently fallen back to."""
    steps = make_steps(3, 4, "affine", "invconv", True, kernel_device)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    y, ld = fused.steps_forward(list(steps), x, memory_saving=True)
    with OpLog() as backward:
        (y.square().sum() + ld.sum()).backward()
    with OpLog() as inverse, torch.no_grad():
        fused.steps_inverse(list(steps), y.detach())
    for log in (backward, inverse):
        assert "glowfast.inverse_packed" in log.ops
        assert not {op for op in log.ops if op.startswith("aten.linalg")}, log.ops


@pytest.mark.parametrize("memory_saving", [False, True])
@pytest.mark.parametrize("coupling", ["affine", "additive"])
def test_odd_channel_counts(coupling, memory_saving, kernel_device):
    """C = 5: coupling halves of 2 and 3 channels (the reference's C // 2) on the fused and memory-saving paths,
    and the fused inverse."""
    steps = make_steps(3, 5, coupling, "invconv", True, kernel_device)
    x = torch.randn(2, 5, 3, 4, requires_grad=True)
    y, ld = fused.steps_forward(list(steps), x, memory_saving=memory_saving)
    y_ref = assert_steps_match_reference(steps, x, y, ld)
    with torch.no_grad():
        x_ref = y_ref
        for step in reversed(steps):
            x_ref = step.inverse(x_ref)
        assert_exact(fused.steps_inverse(list(steps), y_ref), x_ref, "out", "inverse")


@pytest.mark.parametrize("device", kernel_devices())
def test_only_the_logdet_or_only_the_output_reaches_the_loss(device, exact_precision):
    steps = make_steps(3, 4, "affine", "invconv", True, device)
    x = torch.randn(2, 4, 4, 4, device=device, requires_grad=True)
    for pick in (lambda y, ld: ld.sum(), lambda y, ld: y.square().sum()):
        expected = torch.autograd.grad(pick(*reference_forward(steps, x)), [x, *steps.parameters()])
        actual = torch.autograd.grad(pick(*fused.steps_forward(list(steps), x, memory_saving=True)),
                                     [x, *steps.parameters()])
        assert_grads_exact(actual, expected, ["x", *(n for n, _ in steps.named_parameters())])


@pytest.mark.parametrize("device", kernel_devices())
def test_frozen_parameters(device, exact_precision):
    """Frozen parameters (a network layer, or every parameter when only grad x is wanted) get no gradient and
    the others the reference's: the backward differentiates only what requires grad."""
    steps = make_steps(3, 4, "affine", "invconv", True, device)
    x = torch.randn(2, 4, 4, 4, device=device, requires_grad=True)
    steps[1].coupling.net.conv1.requires_grad_(False)
    params = [p for p in steps.parameters() if p.requires_grad]
    names = [n for n, p in steps.named_parameters() if p.requires_grad]
    expected = torch.autograd.grad(reference_forward(steps, x)[0].square().sum(), [x, *params])
    y, _ = fused.steps_forward(list(steps), x, memory_saving=True)
    assert_grads_exact(torch.autograd.grad(y.square().sum(), [x, *params]), expected, ["x", *names])
    steps.requires_grad_(False)
    (expected,) = torch.autograd.grad(reference_forward(steps, x)[0].square().sum(), [x])
    (actual,) = torch.autograd.grad(fused.steps_forward(list(steps), x, memory_saving=True)[0].square().sum(), [x])
    assert_exact(actual, expected, "grad", "x")


def _saved_bytes(fn, params) -> int:
    """Bytes of the non-parameter tensors autograd saves for backward while running fn()."""
    total = 0
    param_ids = {id(p) for p in params}

    def pack(t):
        nonlocal total
        if id(t) not in param_ids:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_memory_saving_keeps_a_fraction_of_the_activations(kernel_device):
    """K=8 steps with a wide (hidden 64) network: the ordinary fused path saves every step's input, network
    output and the network's own activations; the memory-saving one saves the level's output and parameters."""
    steps = make_steps(8, 8, "affine", "invconv", True, kernel_device)
    for s in steps:
        s.coupling.net = randomize_(type(s.coupling.net)(4, 64, 8), scale=0.1).to(kernel_device)
    x = torch.randn(4, 8, 8, 8, requires_grad=True)
    params = list(steps.parameters())
    ordinary = _saved_bytes(lambda: fused.steps_forward(list(steps), x), params)
    saving = _saved_bytes(lambda: fused.steps_forward(list(steps), x, memory_saving=True), params)
    activation = x.numel() * x.element_size()
    # parameter-side tensors (W = P L U built for all steps, and the W's themselves) are saved by both paths
    param_side = _saved_bytes(lambda: fused.level_weights(list(steps)), params) + sum(
        w.numel() * w.element_size() for w in fused.level_weights(list(steps))[0])
    assert saving <= activation + param_side, (saving, activation, param_side)  # just the level's output
    assert ordinary >= 8 * activation and saving * 8 <= ordinary, (ordinary, saving)


@pytest.mark.parametrize("device", kernel_devices())
def test_glow_memory_saving_training_gradients(device, exact_precision):
    """A whole fused Glow with memory_saving: bits/dim and every parameter gradient equal the reference model's
    (same parameters, dequantisation off); the flag changes nothing on the reference backend."""
    torch.manual_seed(0)
    model = Glow((3, 8, 4), K=3, L=2, hidden_channels=8, backend="fused", memory_saving=True).to(device)
    x = torch.randint(0, 256, (2, 3, 8, 4), dtype=torch.uint8, device=device)
    model(x)  # ActNorm init
    randomize_(model.levels, scale=0.1)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    bpd = model(x, dequantize=False).bits_per_dim.mean()
    model.backend = "reference"
    bpd_ref = model(x, dequantize=False).bits_per_dim.mean()
    assert_exact(bpd, bpd_ref, "logdet", "bits/dim")
    assert_grads_exact(torch.autograd.grad(bpd, params), torch.autograd.grad(bpd_ref, params), names)
    assert "memory_saving" not in model.config  # an execution option, not part of the architecture


def test_train_cli_memory_saving(tmp_path, capsys):
    """python -m glowfast.train --memory-saving: the option reaches the model and the run completes; on the reference
    backend, where it cannot apply, the run says so instead of ignoring it silently."""
    from glowfast.train import main

    from conftest import KERNEL_DEVICE
    from test_train import TINY

    args = [a for a in TINY]
    args[args.index("--device") + 1] = KERNEL_DEVICE
    args[args.index("--backend") + 1] = "fused"
    args[args.index("--batch-size") + 1] = "16"
    seen = {}
    run = tmp_path / "ms"
    assert main(args + ["--steps", "3", "--eval-interval", "3", "--eval-batch-size", "100", "--temperatures", "1",
                        "--n-samples", "4", "--memory-saving",
                        "--run-dir", str(run)],
                callbacks=[lambda event, t: seen.setdefault("flag", t.model.memory_saving)]) == 0
    assert seen["flag"] is True
    note = "note: --memory-saving applies to the fused backend"
    assert note not in capsys.readouterr().err
    args[args.index("--backend") + 1] = "reference"
    assert main(args + ["--steps", "1", "--eval-interval", "1", "--eval-batch-size", "100", "--temperatures", "1",
                        "--n-samples", "4", "--memory-saving", "--run-dir", str(tmp_path / "ref")]) == 0
    assert note in capsys.readouterr().err


@pytest.mark.parametrize("device", kernel_devices())
def test_memory_saving_under_functional_call(device, exact_precision):
    """Parameters swapped in by torch.func.functional_call (MAML, ensembles): the backward recomputes each network
    with the tensors forward used, so every gradient equals the reference's (it used the module's own weights,
    giving None network gradients and wrong others)."""
    from torch.func import functional_call

    torch.manual_seed(0)
    model = Glow((3, 8, 4), K=2, L=2, hidden_channels=8, backend="fused", memory_saving=True).to(device)
    x = torch.randint(0, 256, (2, 3, 8, 4), dtype=torch.uint8, device=device)
    model(x)  # ActNorm init
    randomize_(model.levels, scale=0.1)
    names = [n for n, _ in model.named_parameters()]
    swapped = {n: (p.detach() * 1.1).requires_grad_(True) for n, p in model.named_parameters()}
    grads = {}
    for backend in ("fused", "reference"):
        model.backend = backend
        bpd = functional_call(model, swapped, (x,), {"dequantize": False}).bits_per_dim.mean()
        grads[backend] = torch.autograd.grad(bpd, list(swapped.values()), allow_unused=True)
    assert all(g is not None for g in grads["reference"])
    assert_grads_exact(grads["fused"], grads["reference"], names)
