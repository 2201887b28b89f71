"""FusedAdamax (glowfast.optim, kernel glowfast.kernels.adamax) against torch.optim.Adamax: the same parameters and
optimiser state after several steps (EXACT["optim"] tolerances), for every branch of the kernel (weight decay,
maximize, torch.lerp's two formulas), tensors that end inside a block or span several, parameters stepped different
numbers of times, state dicts moved between the two classes, and the cases that run torch's own step."""

import copy

import pytest
import torch

from glowfast.optim import FusedAdamax

from conftest import kernel_devices, requires_cuda
from tolerances import assert_exact

# sizes around the kernel's block (BLOCK = 1024 elements per program): inside one, one short, one over, two full,
# and shapes
SIZES = [(1,), (1023,), (1025,), (2048,), (3, 5, 7), (64, 6, 3, 3)]


def _params(device, sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device).requires_grad_(True) for s in sizes]


def _twin(params):
    return [p.detach().clone().requires_grad_(True) for p in params]


def _set_grads(step, *param_lists, skip=()):
    """Fresh gradient tensors each step (as zero_grad(set_to_none=True) and a backward make): new pointers."""
    g = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for p in param_lists[0]]
    for params in param_lists:
        for i, (p, gr) in enumerate(zip(params, grads, strict=True)):
            p.grad = None if i in skip else gr.clone()


def _assert_same(fused_opt, torch_opt, fused_params, torch_params):
    for i, (a, e) in enumerate(zip(fused_params, torch_params, strict=True)):
        assert_exact(a, e, "optim", f"parameter {i}")
        sa, se = fused_opt.state[a], torch_opt.state[e]
        assert set(sa) == set(se) == {"step", "exp_avg", "exp_inf"}
        assert float(sa["step"]) == float(se["step"])
        assert_exact(sa["exp_avg"], se["exp_avg"], "optim", f"exp_avg {i}")
        assert_exact(sa["exp_inf"], se["exp_inf"], "optim", f"exp_inf {i}")


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("weight_decay,maximize,betas", [
    (0.0, False, (0.9, 0.999)),    # Glow's (openai/glow: Adamax, no weight decay)
    (0.05, False, (0.9, 0.999)),   # the weight-decay branch
    (0.0, True, (0.9, 0.999)),     # maximize
    (0.05, True, (0.3, 0.99)),     # both, and lerp weight 1 - beta1 >= 0.5: torch.lerp's other formula
])
def test_fused_adamax_steps_as_torch_adamax(device, weight_decay, maximize, betas):
    ours = _params(device)
    theirs = _twin(ours)
    kw = dict(lr=3e-3, betas=betas, eps=1e-8, weight_decay=weight_decay, maximize=maximize)
    fused, ref = FusedAdamax(ours, **kw), torch.optim.Adamax(theirs, **kw)
    for step in range(4):
        _set_grads(step, ours, theirs)
        fused.step()
        ref.step()
    assert fused.kernel_steps == 4  # the kernel ran (not torch's step)
    _assert_same(fused, ref, ours, theirs)
    # the update moved every parameter (a no-op kernel would pass the comparisons above only if torch's did too)
    assert all(not torch.equal(p, q) for p, q in zip(ours, _params(device), strict=True))


@pytest.mark.parametrize("device", kernel_devices())
def test_parameters_without_gradients_keep_their_own_step_counts(device):
    """A parameter without a gradient at a step is not updated and its step count lags (torch's rule): later steps
    update the group's tensors in two subsets with their own bias corrections."""
    ours = _params(device)
    theirs = _twin(ours)
    fused, ref = FusedAdamax(ours, lr=1e-2), torch.optim.Adamax(theirs, lr=1e-2)
    for step, skip in enumerate([(), (1, 4), (), (), (4,)]):
        _set_grads(step, ours, theirs, skip=skip)
        fused.step()
        ref.step()
    assert [float(fused.state[p]["step"]) for p in ours] == [5, 4, 5, 5, 3, 5]
    _assert_same(fused, ref, ours, theirs)


@pytest.mark.parametrize("device", kernel_devices())
def test_state_dicts_move_between_fused_and_torch_adamax(device):
    """Two steps with one class, its state dict loaded into the other, two more: as four steps with torch's alone;
    both directions (the fused one's tables are rebuilt for the loaded state's tensors)."""
    for first, second in ((FusedAdamax, torch.optim.Adamax), (torch.optim.Adamax, FusedAdamax)):
        a = _params(device)
        ref_params = _twin(a)
        opt_a, ref = first(a, lr=2e-3), torch.optim.Adamax(ref_params, lr=2e-3)
        for step in range(2):
            _set_grads(step, a, ref_params)
            opt_a.step()
            ref.step()
        b = _twin(a)
        opt_b = second(b, lr=2e-3)
        opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
        for step in range(2, 4):
            _set_grads(step, b, ref_params)
            opt_b.step()
            ref.step()
        _assert_same(opt_b, ref, b, ref_params)


@pytest.mark.parametrize("device", kernel_devices())
def test_tables_follow_the_tensors_after_a_loaded_state(device):
    """Load a state dict into a fused optimiser that has stepped already: its cached pointers are of the old state
    tensors, so the next step must build new tables (a stale table would update the freed tensors and leave the
    loaded state untouched)."""
    ours = _params(device, sizes=[(3000,)])
    theirs = _twin(ours)
    fused, ref = FusedAdamax(ours, lr=1e-2), torch.optim.Adamax(theirs, lr=1e-2)
    _set_grads(0, ours, theirs)
    fused.step()
    ref.step()
    fused.load_state_dict(copy.deepcopy(ref.state_dict()))
    for step in (1, 2):
        _set_grads(step, ours, theirs)
        fused.step()
        ref.step()
    assert fused.kernel_steps == 3
    _assert_same(fused, ref, ours, theirs)


def test_unfusable_groups_run_torch_adamax():
    """float64 parameters, a non-contiguous one, and CPU tensors outside the interpreter: torch's own step, the same
    values bit for bit, and the kernel never runs; differentiable=True is refused."""
    import os

    for p in (torch.randn(5, 4, dtype=torch.float64), torch.randn(6, 4).t()):
        ours, theirs = [p.clone().requires_grad_(True)], [p.clone().requires_grad_(True)]  # clone keeps the strides
        fused, ref = FusedAdamax(ours, lr=1e-2), torch.optim.Adamax(theirs, lr=1e-2)
        for step in range(2):
            _set_grads(step, ours, theirs)
            fused.step()
            ref.step()
        assert fused.kernel_steps == 0
        assert torch.equal(ours[0], theirs[0]) and not torch.equal(ours[0], p)
    with pytest.raises(ValueError, match="differentiable"):
        FusedAdamax(_params("cpu"), differentiable=True)
    if os.environ.get("TRITON_INTERPRET") != "1":
        cpu = [torch.randn(10, requires_grad=True)]
        opt = FusedAdamax(cpu)
        cpu[0].grad = torch.randn(10)
        opt.step()
        assert opt.kernel_steps == 0


@pytest.mark.parametrize("device", kernel_devices())
def test_tables_refuse_tensors_the_kernel_cannot_take(device):
    """The table builder names the problem (the optimiser itself routes such groups to torch's step)."""
    from glowfast.kernels.adamax import AdamaxTables

    p = torch.zeros(8, device=device)
    ok = [p], [torch.zeros(8, device=device)], [torch.zeros(8, device=device)], [torch.ones(8, device=device)]
    AdamaxTables.for_tensors(*ok)
    bad_cases = {
        "float64": ([p], [torch.zeros(8, device=device, dtype=torch.float64)], ok[2], ok[3]),
        "contiguous": ([p], [torch.zeros(8, 2, device=device).t()[0]], ok[2], ok[3]),
        "elements": ([p], [torch.zeros(9, device=device)], ok[2], ok[3]),
    }
    for words, case in bad_cases.items():
        with pytest.raises(ValueError, match=words):
            AdamaxTables.for_tensors(*case)


@pytest.mark.parametrize("device", kernel_devices())
def test_fused_adamax_trains_a_glow_model_as_torch_adamax(device):
    """A small fused Glow, three training steps with each optimiser from the same start: the same weights (the
    optimiser is the only difference)."""
    from glowfast.model import Glow

    torch.manual_seed(0)
    model = Glow((3, 8, 8), K=2, L=2, hidden_channels=8, backend="reference").to(device)
    twin = copy.deepcopy(model)
    x = torch.rand(2, 3, 8, 8, device=device)
    for m in (model, twin):  # ActNorm's data-dependent init, with the same dequantisation noise
        torch.manual_seed(10)
        with torch.no_grad():
            m(x)
    fused = FusedAdamax(model.parameters(), lr=1e-3)
    ref = torch.optim.Adamax(twin.parameters(), lr=1e-3)
    for step in range(3):
        for m, opt in ((model, fused), (twin, ref)):
            torch.manual_seed(step)  # the same dequantisation noise for both
            opt.zero_grad(set_to_none=True)
            m(x).bits_per_dim.mean().backward()
            opt.step()
    assert fused.kernel_steps == 3
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert_exact(a, b, "grad", name)  # three steps of training: the gradients' summation-order tolerance


@requires_cuda
def test_capturable_groups_run_torch_adamax():
    """capturable=True (torch's option for steps inside CUDA graphs; CUDA only): torch's own step, bit for bit."""
    ours = _params("cuda", sizes=[(3000,)])
    theirs = _twin(ours)
    fused, ref = FusedAdamax(ours, lr=1e-2, capturable=True), torch.optim.Adamax(theirs, lr=1e-2, capturable=True)
    for step in range(2):
        _set_grads(step, ours, theirs)
        fused.step()
        ref.step()
    assert fused.kernel_steps == 0 and torch.equal(ours[0], theirs[0])
