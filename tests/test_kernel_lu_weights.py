"""The level's parameter side by glowfast.kernels.lu_weights vs the reference layers (InvConv1x1(lu=True)
.weight_matrix(), log_abs_det(), ActNorm's log_scale), in float64: values and gradients.

Runs under the Triton interpreter on CPU (CI) and on a GPU when there is one (the kernels' products are exact fp32
there too). Tolerances: tests/tolerances.py (EXACT).
"""

import pytest
import torch

from glowfast import fused
from glowfast.kernels.lu_weights import LUWeightsFunction, lu_level_weights, lu_weights_run_on
from glowfast.reference import InvConv1x1

from helpers import OpLog, make_steps
from tolerances import assert_exact, assert_grads_exact


def _layers(K, C, device, scale=0.5):
    """K random LU 1x1 convs and ActNorm log-scales: every factor entry random, including the masked ones (the masks
    must remove them) and log_s (so exp and the signs matter)."""
    perms, log_scales = [], []
    for _ in range(K):
        perm = InvConv1x1(C, lu=True)
        with torch.no_grad():
            for t in (perm.lower, perm.upper, perm.log_s):
                t.copy_(scale * torch.randn_like(t))
        perms.append(perm.to(device))
        log_scales.append((scale * torch.randn(C)).to(device).requires_grad_())
    return perms, log_scales


def _reference(perms, log_scales):
    """(W (K, C, C), sum_k sum(log_scale_k) + log|det W_k|) by the reference layers, in float64, and their leaves."""
    doubles, leaves = [], []
    for perm, log_scale in zip(perms, log_scales, strict=True):
        twin = InvConv1x1(perm.lower.shape[0], lu=True).double()
        twin.load_state_dict({k: v.detach().cpu().double() for k, v in perm.state_dict().items()})
        ls = log_scale.detach().cpu().double().requires_grad_()
        doubles.append((twin, ls))
        leaves += [twin.lower, twin.upper, twin.log_s, ls]
    w = torch.stack([twin.weight_matrix() for twin, _ in doubles])
    ld = sum(ls.sum() + twin.log_abs_det() for twin, ls in doubles)
    return w, ld, leaves


def _leaves(perms, log_scales):
    return [t for perm, ls in zip(perms, log_scales, strict=True) for t in (perm.lower, perm.upper, perm.log_s, ls)]


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("C", [2, 5, 12, 16, 17, 48, 100])
def test_values_and_gradients_match_the_reference(K, C, kernel_device):
    perms, log_scales = _layers(K, C, kernel_device)
    w, ld = lu_level_weights(perms, log_scales)
    w_ref, ld_ref, leaves_ref = _reference(perms, log_scales)
    assert w.shape == (K, C, C) and w.dtype == torch.float32 and ld.shape == ()
    assert_exact(w.cpu(), w_ref, "out", "W")
    assert_exact(ld.cpu(), ld_ref, "logdet", "param_ld")

    g_w, g_ld = torch.randn(K, C, C, dtype=torch.float64), 1.7
    grads = torch.autograd.grad((w * g_w.to(w)).sum() + g_ld * ld, _leaves(perms, log_scales))
    expected = torch.autograd.grad((w_ref * g_w).sum() + g_ld * ld_ref, leaves_ref)
    names = [f"{n}[{k}]" for k in range(K) for n in ("lower", "upper", "log_s", "log_scale")]
    assert_grads_exact([g.cpu() for g in grads], expected, names)


def test_frozen_tensors_get_no_gradient_and_the_others_theirs(kernel_device):
    perms, log_scales = _layers(3, 6, kernel_device)
    perms[1].requires_grad_(False)
    log_scales[2].requires_grad_(False)
    w, ld = lu_level_weights(perms, log_scales)
    leaves = _leaves(perms, log_scales)
    grads = torch.autograd.grad(w.square().sum() + ld, [t for t in leaves if t.requires_grad])
    w_ref, ld_ref, leaves_ref = _reference(perms, log_scales)
    trained = [ref for t, ref in zip(leaves, leaves_ref, strict=True) if t.requires_grad]
    expected = torch.autograd.grad(w_ref.square().sum() + ld_ref, trained)
    assert_grads_exact([g.cpu() for g in grads], expected, [str(i) for i in range(len(grads))])
    loss = lu_level_weights(perms, log_scales)[0].sum()
    loss.backward()
    assert perms[1].lower.grad is None and perms[1].log_s.grad is None and log_scales[2].grad is None
    assert perms[0].lower.grad is not None and log_scales[1].grad is not None


def test_level_weights_runs_one_copy_and_one_kernel_each_way(kernel_device):
    """glowfast.fused.level_weights on LU steps where the kernels run: the forward's only torch op with data is one
    cat (no stack, exp, diag_embed or matmul: they were ~18 small kernels; the P's were checked by the first call
    and are not again), the backward has no matmul, and the W's and log-determinant come from LUWeightsFunction."""
    steps = make_steps(4, 6, "affine", "invconv", True, kernel_device)
    fused.level_weights(steps)  # the first call checks each P once (permutation_matrices); not again after
    with OpLog() as forward:
        weights, param_ld = fused.level_weights(steps)
    names = [name for name, _, _ in forward.calls]
    assert names.count("aten.cat") == 1
    assert not {"aten.stack", "aten.exp", "aten.diag_embed", "aten.bmm", "aten.mm", "aten.matmul", "aten.eq"} & \
        set(names)
    assert param_ld.grad_fn.name() == "LUWeightsFunctionBackward"
    with OpLog() as backward:
        (torch.stack(weights).sum() + param_ld).backward()
    assert not {"aten.bmm", "aten.mm", "aten.matmul"} & backward.ops
    assert all(p.grad is not None for s in steps for p in (s.permute.lower, s.permute.upper, s.permute.log_s))


def test_level_weights_keeps_torch_ops_where_the_kernels_do_not_apply(kernel_device):
    """float64 steps, and steps wider than the kernels' 128 channels: the batched torch ops
    (fused.lu_level_weights_torch), same values."""
    doubles = make_steps(2, 6, "affine", "invconv", True, kernel_device).double()
    assert not lu_weights_run_on([s.permute for s in doubles], [s.actnorm.log_scale for s in doubles])
    weights, param_ld = fused.level_weights(doubles)
    assert param_ld.grad_fn.name() != "LUWeightsFunctionBackward" and weights[0].dtype == torch.float64

    wide = make_steps(1, 130, "additive", "invconv", True, kernel_device, hidden=2, scale=0.05)
    perms, log_scales = [wide[0].permute], [wide[0].actnorm.log_scale]
    assert not lu_weights_run_on(perms, log_scales)
    weights, param_ld = fused.level_weights(wide)
    assert param_ld.grad_fn.name() != "LUWeightsFunctionBackward"
    w_ref, ld_ref, _ = _reference(perms, log_scales)
    assert_exact(weights[0].cpu(), w_ref[0], "out", "W (130 channels)")
    assert_exact(param_ld.cpu(), ld_ref, "logdet", "param_ld (130 channels)")


def test_a_p_that_is_no_permutation_takes_the_torch_ops(kernel_device):
    """The kernels gather rows where the reference multiplies by P. A P that is no permutation matrix (edited, or
    loaded from elsewhere) is found once per tensor version and level_weights then computes the reference's product;
    restored in place (a new version), P is checked again and the kernels take it back."""
    steps = make_steps(2, 5, "affine", "invconv", True, kernel_device)
    perms, log_scales = [s.permute for s in steps], [s.actnorm.log_scale for s in steps]
    assert lu_weights_run_on(perms, log_scales)
    original = perms[1].p.clone()
    for bad in (2 * original, original[[0, 0, 2, 3, 4]], original + 0.5 * torch.eye(5)):
        with torch.no_grad():
            perms[1].p.copy_(bad)
        assert not lu_weights_run_on(perms, log_scales)
        weights, param_ld = fused.level_weights(steps)
        assert param_ld.grad_fn.name() != "LUWeightsFunctionBackward"
        w_ref, _, _ = _reference(perms, log_scales)
        assert_exact(weights[1].cpu(), w_ref[1], "out", "W with that P")
        with pytest.raises(ValueError, match="must be a permutation matrix"):
            lu_level_weights(perms, log_scales)
    with torch.no_grad():
        perms[1].p.copy_(original)
    assert lu_weights_run_on(perms, log_scales)
    assert fused.level_weights(steps)[1].grad_fn.name() == "LUWeightsFunctionBackward"


def test_an_inference_mode_p_is_checked_every_time(kernel_device):
    """A P made under torch.inference_mode has no version counter: it is checked on every call, never cached."""
    from glowfast.kernels.lu_weights import permutation_matrices

    with torch.inference_mode():
        good, bad = torch.eye(4)[[1, 0, 3, 2]], torch.eye(4)[[1, 1, 3, 2]]
    assert permutation_matrices([good]) and permutation_matrices([good])
    assert not permutation_matrices([bad]) and not permutation_matrices([good, bad])
    with torch.inference_mode():
        good[0, 0] = 1.0  # two 1s in row 0 now, in place: no cached answer may survive it
    assert not permutation_matrices([good])


def test_kernels_and_torch_ops_agree_on_a_deep_level(kernel_device):
    """40 steps (the log-determinant's sum runs over the steps in blocks of 16): the kernels and
    fused.lu_level_weights_torch, values and gradients, within the fp32 tolerances."""
    perms, log_scales = _layers(40, 3, kernel_device)
    leaves = _leaves(perms, log_scales)
    results = []
    for fn in (lu_level_weights, fused.lu_level_weights_torch):
        w, ld = fn(perms, log_scales)
        results.append((w, ld, torch.autograd.grad(w.sin().sum() + 2 * ld, leaves)))
    (w, ld, grads), (w_t, ld_t, grads_t) = results
    assert_exact(w, w_t, "out", "W")
    assert_exact(ld, ld_t, "logdet", "param_ld")
    assert_grads_exact(list(grads), list(grads_t), [str(i) for i in range(len(leaves))])
    w_ref, ld_ref, _ = _reference(perms, log_scales)
    assert_exact(ld.cpu(), ld_ref, "logdet", "param_ld against float64")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf * 0
def test_nonfinite_factors_give_nonfinite_weights(kernel_device):
    """A step with an inf factor gets a non-finite W (an inf the mask removes becomes NaN, as the reference's mask
    product makes it; an inf log_s an inf diagonal), and the level's log-determinant is inf: nothing hidden. Where
    the reference's W is finite, the kernel's is the same. (The reference's product with P spreads a NaN over a whole
    column, the kernel's row gather only over the rows that read it: fewer NaN entries, never a finite one for a
    NaN.) A step with finite factors is untouched by another step's."""
    perms, log_scales = _layers(3, 5, kernel_device)
    with torch.no_grad():
        perms[0].lower[1, 3] = float("inf")  # above the diagonal: masked out
        perms[1].log_s[2] = float("inf")
    w, ld = lu_level_weights(perms, log_scales)
    w_ref, ld_ref, _ = _reference(perms, log_scales)
    w = w.cpu()
    assert not w[0].isfinite().all() and not w[1].isfinite().all() and w[2].isfinite().all()
    assert ld.isinf() and ld_ref.isinf()
    finite = w_ref.isfinite()
    assert w[finite].isfinite().all()
    assert_exact(w[finite], w_ref[finite], "out", "W where the reference's is finite")


def test_double_backward_is_refused(kernel_device):
    perms, log_scales = _layers(2, 4, kernel_device)
    w, ld = lu_level_weights(perms, log_scales)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(w.sum() + ld, _leaves(perms, log_scales), create_graph=True)


def test_the_function_takes_flat_tensors_in_the_documented_order(kernel_device):
    """LUWeightsFunction's inputs are (K, C, then per step p, lower, upper, sign_s, log_s, log_scale): a permutation
    matrix P that is not the identity must reach the product as P, not as one of the factors."""
    perms, log_scales = _layers(1, 4, kernel_device)
    perm = perms[0]
    with torch.no_grad():
        perm.p.copy_(torch.eye(4)[[2, 0, 3, 1]])
    flat = [t.reshape(-1) for t in (perm.p, perm.lower, perm.upper, perm.sign_s, perm.log_s, log_scales[0])]
    w, _ = LUWeightsFunction.apply(1, 4, *flat)
    w_ref, _, _ = _reference(perms, log_scales)
    assert_exact(w.cpu(), w_ref, "out", "W with a permutation")
