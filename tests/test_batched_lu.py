"""glowfast.ops batched LU (slogdet / inverse) against float64 numpy / torch.linalg; CPU always, CUDA if present."""

import math
import os
import shutil
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from glowfast.ops import MAX_N_CUDA, PackedMatrices, batched_inverse, batched_slogdet
from glowfast.ops import batched_lu as lu

from conftest import cuda_devices, requires_cuda

DEVICES = cuda_devices()
DTYPES = [torch.float32, torch.float64]


def _ref_slogdet(mats):
    """float64 numpy reference of (sign, logabsdet) for the exact values of `mats` (a list)."""
    out = [np.linalg.slogdet(m.detach().cpu().double().numpy()) for m in mats]
    return np.array([s for s, _ in out]), np.array([ld for _, ld in out])


def _ill_conditioned(n, cond, gen, dtype=torch.float64):
    u, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    s = torch.logspace(0, -math.log10(cond), n, dtype=torch.float64)
    return (u * s) @ v.T


def _needs_pivoting(n, gen):
    """Zero diagonal: unpivoted LU fails at the first step."""
    a = torch.randn(n, n, dtype=torch.float64, generator=gen)
    a.fill_diagonal_(0.0)
    return a


def _permutation(n, gen):
    return torch.eye(n, dtype=torch.float64)[torch.randperm(n, generator=gen)]


def _tol(dtype, n=48):
    return 1e-9 if dtype == torch.float64 else 2e-5 * n + 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "pivoting", "permutation", "one_by_one"])
def test_slogdet_matches_float64_reference(device, dtype, kind):
    gen = torch.Generator().manual_seed(1)
    sizes = [1] * 6 if kind == "one_by_one" else [2, 3, 5, 12, 24, 48, 7]
    make = {
        "random": lambda n: torch.randn(n, n, dtype=torch.float64, generator=gen),
        "pivoting": lambda n: _needs_pivoting(n, gen) if n > 1 else torch.ones(1, 1, dtype=torch.float64),
        "permutation": lambda n: _permutation(n, gen),
        "one_by_one": lambda n: torch.randn(n, n, dtype=torch.float64, generator=gen) * 10,
    }[kind]
    mats = [make(n).to(dtype) for n in sizes]
    ref_sign, ref_ld = _ref_slogdet(mats)
    sign, ld = batched_slogdet([m.to(device) for m in mats])
    assert sign.dtype == dtype and ld.dtype == dtype and sign.shape == (len(sizes),)
    assert sign.device.type == ld.device.type == device  # on the inputs' device (the list API packs them there)
    np.testing.assert_array_equal(sign.cpu().double().numpy(), ref_sign)
    np.testing.assert_allclose(ld.cpu().double().numpy(), ref_ld, rtol=0, atol=_tol(dtype))
    if kind == "permutation":
        assert torch.all(ld.cpu() == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_size_1_to_96_in_one_ragged_call(device, dtype):
    gen = torch.Generator().manual_seed(2)
    mats = [torch.randn(n, n, dtype=torch.float64, generator=gen).to(dtype) for n in range(1, 97)]
    ref_sign, ref_ld = _ref_slogdet(mats)
    sign, ld = batched_slogdet([m.to(device) for m in mats])
    np.testing.assert_array_equal(sign.cpu().double().numpy(), ref_sign)
    np.testing.assert_allclose(ld.cpu().double().numpy(), ref_ld, rtol=0, atol=_tol(dtype, 96))
    inv = batched_inverse([m.to(device) for m in mats])
    assert ld.device.type == device and all(x.device.type == device for x in inv)
    for m, x in zip(mats, inv):
        eye = torch.eye(m.shape[0], dtype=torch.float64)
        err = (x.cpu().double() @ m.double() - eye).abs().max().item()
        assert err < (1e-9 if dtype == torch.float64 else 2e-2), (m.shape, err)


@pytest.mark.parametrize("device", DEVICES)
def test_ill_conditioned(device):
    gen = torch.Generator().manual_seed(3)
    mats = [_ill_conditioned(n, 1e6, gen) for n in (12, 24, 48)]
    assert all(1e5 < torch.linalg.cond(m) < 1e7 for m in mats)
    ref_sign, ref_ld = _ref_slogdet(mats)
    sign, ld = batched_slogdet([m.to(device) for m in mats])
    np.testing.assert_array_equal(sign.cpu().numpy(), ref_sign)
    np.testing.assert_allclose(ld.cpu().numpy(), ref_ld, rtol=0, atol=1e-8)
    # float32: same matrices rounded; the error is bounded by the conditioning, not blown up.
    m32 = [m.float() for m in mats]
    _, ref32 = _ref_slogdet(m32)
    _, ld32 = batched_slogdet([m.to(device) for m in m32])
    np.testing.assert_allclose(ld32.cpu().double().numpy(), ref32, rtol=0, atol=0.1)
    inv = batched_inverse([m.to(device) for m in mats])
    for m, x in zip(mats, inv):
        np.testing.assert_allclose(x.cpu().numpy(), np.linalg.inv(m.numpy()), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_float32_logdet_sum_is_accurate(device, dtype):
    # det = prod of 96 diagonal values spread over many magnitudes: a float32 running sum of logs loses digits.
    d = torch.logspace(-3, 3, 96, dtype=torch.float64)
    a = torch.diag(d).to(dtype)
    _, ref = _ref_slogdet([a])
    _, ld = batched_slogdet(a.unsqueeze(0).to(device))
    exact_in_dtype = torch.tensor(ref[0], dtype=dtype).double().item()
    assert abs(ld.item() - exact_in_dtype) <= 1.5 * abs(exact_in_dtype) * torch.finfo(dtype).eps + 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_singular_gives_sign_zero_and_minus_inf(device, dtype):
    ok = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    singular = [
        torch.zeros(3, 3),
        torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 1.0, 5.0]]),  # row 2 = 2 * row 1
        torch.tensor([[0.0, 0.0], [1.0, 2.0]]),  # zero row
        torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]).T,  # rank 2, integer pivots exact
        torch.zeros(1, 1),
    ]
    mats = [ok] + [s for s in singular] + [ok]
    sign, ld = batched_slogdet([m.to(device, dtype) for m in mats])
    sign, ld = sign.cpu(), ld.cpu()
    assert not torch.isnan(sign).any() and not torch.isnan(ld).any()
    assert torch.all(sign[1:-1] == 0) and torch.all(ld[1:-1] == -math.inf)
    assert sign[0] == 1 and sign[-1] == 1
    torch.testing.assert_close(ld[0], torch.tensor(math.log(5.0), dtype=dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_singular_gradient_is_nan_for_that_matrix_only(device):
    ok = torch.randn(4, 4, dtype=torch.float64, device=device, requires_grad=True)
    bad = torch.zeros(3, 3, dtype=torch.float64, device=device, requires_grad=True)
    _, ld = batched_slogdet([ok, bad])
    ld[0].backward(retain_graph=True)  # the singular matrix's logabsdet does not reach the loss: zero grad
    assert torch.all(bad.grad == 0)
    torch.testing.assert_close(ok.grad, torch.linalg.inv(ok.detach()).T)
    ld.sum().backward()  # it does: NaN, documented (W^-T does not exist)
    assert torch.isnan(bad.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_torch_slogdet(device):
    gen = torch.Generator().manual_seed(4)
    mats = [torch.randn(n, n, dtype=torch.float64, generator=gen).to(device) for n in (12, 24, 48, 12, 5, 1)]
    ours = [m.clone().requires_grad_() for m in mats]
    theirs = [m.clone().requires_grad_() for m in mats]
    w = torch.randn(len(mats), dtype=torch.float64, generator=gen).to(device)
    sign, ld = batched_slogdet(ours)
    (ld * w).sum().backward()
    ref = torch.stack([torch.linalg.slogdet(m)[1] for m in theirs])
    (ref * w).sum().backward()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_list_packing_by_runs_of_equal_sizes_keeps_order_and_gradients(device):
    """A list is packed one run of equal sizes at a time (one stack per run): runs of one, runs of several, a
    transposed (non-contiguous) matrix inside a run and a matrix that needs no gradient must all keep their place in
    the packed order, for the values and for each gradient, and for batched_inverse's list output."""
    gen = torch.Generator().manual_seed(11)
    sizes = (3, 3, 2, 5, 5, 5, 1, 3, 3)
    base = [torch.randn(n, n, dtype=torch.float64, generator=gen).to(device) for n in sizes]
    base[4] = base[4].mT  # non-contiguous, in the middle of a run
    needs_grad = [i != 7 for i in range(len(sizes))]
    # the transposed element is a view of a contiguous leaf holding its transpose
    leaves = [(m if m.is_contiguous() else m.mT).clone().requires_grad_(g) for m, g in zip(base, needs_grad)]
    ours = [leaf if m.is_contiguous() else leaf.mT for leaf, m in zip(leaves, base)]
    assert not ours[4].is_contiguous()
    theirs = [m.detach().clone().requires_grad_(g) for m, g in zip(base, needs_grad)]
    w = torch.randn(len(sizes), dtype=torch.float64, generator=gen).to(device)
    _, ld = batched_slogdet(ours)
    inverses = batched_inverse(ours)
    ref_ld = torch.stack([torch.linalg.slogdet(m)[1] for m in theirs])
    ref_inv = [torch.linalg.inv(m) for m in theirs]
    torch.testing.assert_close(ld, ref_ld.detach(), rtol=1e-10, atol=1e-10)
    for a, b in zip(inverses, ref_inv, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-9, atol=1e-9)
    g = [torch.randn(n, n, dtype=torch.float64, generator=gen).to(device) for n in sizes]
    ((ld * w).sum() + sum((x * gi).sum() for x, gi in zip(inverses, g))).backward()
    ((ref_ld * w).sum() + sum((x * gi).sum() for x, gi in zip(ref_inv, g))).backward()
    for i, (a, b) in enumerate(zip(leaves, theirs, strict=True)):
        if not needs_grad[i]:
            assert a.grad is None and b.grad is None
            continue
        torch.testing.assert_close(a.grad, b.grad if ours[i] is a else b.grad.mT, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_tensor_gradients(device, dtype):
    a = torch.randn(16, 9, 9, dtype=torch.float64).to(device, dtype).requires_grad_()
    _, ld = batched_slogdet(a)
    ld.sum().backward()
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(a.grad, torch.linalg.inv(a.detach().double()).mT.to(dtype), rtol=tol, atol=tol)


def test_gradcheck_slogdet_and_inverse():
    gen = torch.Generator().manual_seed(5)
    mats = [torch.randn(n, n, dtype=torch.float64, generator=gen).requires_grad_() for n in (1, 3, 4)]
    assert torch.autograd.gradcheck(lambda *ms: batched_slogdet(list(ms))[1], mats)
    assert torch.autograd.gradcheck(lambda *ms: tuple(batched_inverse(list(ms))), mats)
    batch = torch.randn(3, 4, 4, dtype=torch.float64, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda b: batched_inverse(b), (batch,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["tensor", "list", "packed"])
def test_second_derivatives_of_logabsdet_are_torchs(device, form):
    """Hessian-vector products through batched_slogdet (create_graph=True) equal torch.linalg.slogdet's in float64,
    for each input form; gradgradcheck by central differences. The second-order term was silently dropped (the
    first-order gradient, built from non-differentiable LU factors, carried no graph; found by an API audit)."""
    gen = torch.Generator().manual_seed(8)
    sizes = [4, 4, 4] if form == "tensor" else [1, 3, 5]
    mats = [(torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, dtype=torch.float64, generator=gen))
            .to(device) for n in sizes]
    leaves = {"tensor": lambda: [torch.stack(mats)], "list": lambda: mats,
              "packed": lambda: [PackedMatrices.from_list(mats).data]}[form]()
    leaves = [w.detach().requires_grad_() for w in leaves]

    def as_input(ws):  # the leaves as batched_slogdet takes them in this form
        if form == "packed":
            return PackedMatrices(ws[0], sizes)
        return ws[0] if form == "tensor" else list(ws)

    def as_matrices(ws):
        return {"tensor": lambda: ws[0], "list": lambda: ws, "packed": lambda: as_input(ws).matrices()}[form]()

    def ours(ws):
        return batched_slogdet(as_input(ws))[1]

    def theirs(ws):
        return torch.stack([torch.linalg.slogdet(w)[1] for w in as_matrices(ws)])
    weights = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, device=device)
    directions = [torch.randn(w.shape, dtype=torch.float64, generator=gen).to(device) for w in leaves]

    def hvp(f):
        grads = torch.autograd.grad((f(leaves) * weights).sum(), leaves, create_graph=True)
        assert all(g.requires_grad for g in grads)  # a graph to differentiate, not a constant
        return torch.autograd.grad(sum((g * d).sum() for g, d in zip(grads, directions)), leaves)

    for a, b in zip(hvp(ours), hvp(theirs), strict=True):
        assert float(b.abs().max()) > 0.1
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert torch.autograd.gradgradcheck(lambda *ws: ours(ws), tuple(leaves))


def test_glow_hessian_vector_products_match_the_reference_backend():
    """Glow(lu=False, backend="auto") on a CPU computes its 1x1 convs' log-determinants with the batched op: its
    Hessian-vector products with respect to the parameters equal the reference backend's (torch.linalg)."""
    from glowfast import Glow

    torch.manual_seed(0)
    model = Glow((1, 8, 8), K=2, L=2, hidden_channels=8, lu=False).double()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64) - 0.5
    model.encode(x)  # ActNorm init
    params = [p for p in model.parameters() if p.requires_grad]
    directions = [torch.randn_like(p) for p in params]
    hvps = {}
    for backend in ("auto", "reference"):
        model.backend = backend
        assert (model._batched_lu_ops() is not None) == (backend == "auto")
        grads = torch.autograd.grad(model.log_density(x).sum(), params, create_graph=True)
        hvps[backend] = torch.autograd.grad(sum((g * d).sum() for g, d in zip(grads, directions)), params)
    for a, b in zip(hvps["auto"], hvps["reference"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_inverse_times_matrix_is_identity(device, dtype):
    gen = torch.Generator().manual_seed(6)
    sizes = [12, 24, 48, 1, 3]
    mats = [torch.randn(n, n, dtype=torch.float64, generator=gen) + 3 * torch.eye(n) for n in sizes]
    inv = batched_inverse([m.to(device, dtype) for m in mats])
    assert isinstance(inv, list) and [x.shape for x in inv] == [(n, n) for n in sizes]
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for m, x in zip(mats, inv):
        assert x.dtype == dtype and x.device.type == device
        torch.testing.assert_close(x.double().cpu() @ m, torch.eye(m.shape[0], dtype=torch.float64), atol=tol, rtol=0)
    batch = torch.randn(7, 6, 6, dtype=torch.float64, generator=gen).to(device, dtype)
    xb = batched_inverse(batch)
    assert xb.shape == (7, 6, 6)
    torch.testing.assert_close(xb, torch.linalg.inv(batch.double()).to(dtype), rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("device", DEVICES)
def test_inverse_gradients_match_torch(device):
    gen = torch.Generator().manual_seed(7)
    mats = [torch.randn(n, n, dtype=torch.float64, generator=gen).to(device) for n in (5, 12, 2)]
    ours = [m.clone().requires_grad_() for m in mats]
    theirs = [m.clone().requires_grad_() for m in mats]
    gs = [torch.randn(m.shape, dtype=torch.float64, generator=gen).to(device) for m in mats]
    sum((x * g).sum() for x, g in zip(batched_inverse(ours), gs)).backward()
    sum((torch.linalg.inv(m) * g).sum() for m, g in zip(theirs, gs)).backward()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(6, 10, 10, dtype=torch.float64, generator=gen).to(device)
    views = [base.mT, base[::2], base[:, 1:8, 1:8]]
    for v in views:
        assert not v.is_contiguous()
        sign, ld = batched_slogdet(v)
        ref = torch.linalg.slogdet(v)
        torch.testing.assert_close(sign, ref.sign)
        torch.testing.assert_close(ld, ref.logabsdet)
        torch.testing.assert_close(batched_inverse(v), torch.linalg.inv(v))
    lst = [base[0].T, base[1, ::2, ::2], base[2, 2:9, 1:8]]
    _, ld = batched_slogdet(lst)
    torch.testing.assert_close(ld, torch.stack([torch.linalg.slogdet(m)[1] for m in lst]))


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.randn(3, 4, 5), "square"),
        (torch.randn(4, 4), "2-D tensor"),
        (torch.randn(4), "1-D tensor"),
        (torch.randn(2, 2, 3, 3), "4-D tensor"),
        (torch.randn(0, 3, 3), "empty"),
        (torch.randn(2, 0, 0), "empty"),
        ([], "empty list"),
        ([torch.randn(2, 2), torch.randn(0, 0)], "element 1 is an empty"),
        ([torch.randn(2, 3)], "not square"),
        ([torch.randn(2, 2), torch.randn(3)], "element 1 must be a square 2-D"),
        (torch.ones(2, 3, 3, dtype=torch.int64), "non-floating-point dtype torch.int64"),
        (torch.ones(2, 3, 3, dtype=torch.bool), "non-floating-point dtype torch.bool"),
        (torch.ones(2, 3, 3, dtype=torch.float16), "float32 or float64, got floating-point dtype torch.float16"),
        (torch.ones(2, 3, 3, dtype=torch.complex64), "dtype must be float32 or float64"),
        ([torch.randn(2, 2), torch.randn(2, 2, dtype=torch.float64)], "mixed dtypes"),
        ([torch.randn(2, 2), torch.randn(2, 2, device="meta")], "mixed devices"),
        ([torch.randn(2, 2), [[1.0]]], "not a tensor"),
        ("abc", "expected a"),
    ],
)
@pytest.mark.parametrize("fn", [batched_slogdet, batched_inverse])
def test_bad_input_raises_naming_the_problem(fn, bad, match):
    with pytest.raises(ValueError, match=match):
        fn(bad)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("fn", [batched_slogdet, batched_inverse])
def test_non_finite_input_raises_on_cpu(fn, value):
    mats = [torch.eye(3), torch.randn(4, 4), torch.eye(2)]
    mats[1][2, 1] = value
    with pytest.raises(ValueError, match="matrix 1 contains non-finite values"):
        fn(mats)
    # Without the check: NaN for that matrix only, never a crash or a silent finite value.
    out = fn(mats, check=False)
    if fn is batched_slogdet:
        sign, ld = out
        assert torch.isnan(sign[1]) and torch.isnan(ld[1])
        assert sign[0] == 1 and ld[0] == 0 and ld[2] == 0
    else:
        assert torch.isnan(out[1]).all()
        torch.testing.assert_close(out[0], torch.eye(3))


def test_inverse_of_singular_raises_on_cpu_and_is_nan_unchecked():
    mats = torch.stack([torch.eye(3), torch.tensor([[1.0, 2, 3], [2, 4, 6], [1, 1, 1]])])
    with pytest.raises(ValueError, match="matrix 1 is singular"):
        batched_inverse(mats)
    out = batched_inverse(mats, check=False)
    assert torch.isnan(out[1]).all() and torch.equal(out[0], torch.eye(3))


@requires_cuda
def test_cuda_non_finite_is_nan_without_sync_and_raises_with_check():
    mats = torch.eye(4, device="cuda").repeat(3, 1, 1)
    mats[2, 0, 0] = math.nan
    sign, ld = batched_slogdet(mats)  # default: no check on CUDA
    assert torch.isnan(ld[2]).item() and torch.isnan(sign[2]).item() and ld[0].item() == 0
    with pytest.raises(ValueError, match="matrix 2 contains non-finite values"):
        batched_slogdet(mats, check=True)
    with pytest.raises(ValueError, match="matrix 2 contains non-finite"):
        batched_inverse(mats, check=True)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_large_matrices_global_memory_path(dtype):
    gen = torch.Generator().manual_seed(9)
    sizes = [65, 100, 12, 257, 64]
    mats = [torch.randn(n, n, dtype=torch.float64, generator=gen) + n**0.5 * torch.eye(n) for n in sizes]
    ref_sign, ref_ld = _ref_slogdet([m.to(dtype) for m in mats])
    sign, ld = batched_slogdet([m.to("cuda", dtype) for m in mats])
    np.testing.assert_array_equal(sign.cpu().double().numpy(), ref_sign)
    np.testing.assert_allclose(ld.cpu().double().numpy(), ref_ld, rtol=0, atol=_tol(dtype, 257))
    inv = batched_inverse([m.to("cuda", dtype) for m in mats])
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    for m, x in zip(mats, inv):
        torch.testing.assert_close(x.cpu().double() @ m, torch.eye(m.shape[0], dtype=torch.float64), atol=tol, rtol=0)
    grads = [m.to("cuda", dtype).requires_grad_() for m in mats]
    batched_slogdet(grads)[1].sum().backward()
    for m, g in zip(mats, grads):
        torch.testing.assert_close(g.grad.cpu().double(), torch.linalg.inv(m.to(dtype).double()).T, atol=tol, rtol=tol)


def _lu_cases(gen):
    """(matrix, pivots_are_lapacks) pairs: random, zero diagonal, permutations, small integers (ties between
    candidate pivots: LAPACK takes the smallest row), a zero column (singular: no swap at that step), every n from
    1 to 64. After the first column of an integer matrix, ties between rounded values may fall either way."""
    cases = [(torch.randn(n, n, dtype=torch.float64, generator=gen), True) for n in range(1, 65)]
    for n in (1, 2, 12, 31, 32, 33, 48, 64):
        singular = torch.randn(n, n, dtype=torch.float64, generator=gen)
        singular[:, n // 2] = 0
        cases += [(_needs_pivoting(n, gen), True), (_permutation(n, gen), True), (singular, True),
                  (torch.randint(-2, 3, (n, n), generator=gen).double(), False)]
    return cases


def _factor_and_invert(mats, dtype, scale, device):
    sizes = [m.shape[0] for m in mats]
    packed = PackedMatrices.from_list([m.to(device, dtype) for m in mats])
    offsets, sizes_t = torch.tensor(packed.offsets, device=device), torch.tensor(sizes, device=device)
    ops = torch.ops.glowfast
    factors, pivots, sign, ld, _ = ops.lu_factor_packed(packed.data, offsets, sizes_t, max(sizes))
    inverse = ops.lu_inverse_packed(factors, pivots, offsets, sizes_t, max(sizes))
    grad = ops.lu_inverse_packed(factors, pivots, offsets, sizes_t, max(sizes), True, scale.to(device, dtype))
    return [t.cpu() for t in (factors, pivots, sign, ld, inverse, grad)]


def _check_against_lapack(cases, mats, scale, out, dtype):
    factors, pivots, sign, ld, inverse, grad = out
    eps = torch.finfo(dtype).eps
    off = 0
    for i, ((_, lapack_pivots), m) in enumerate(zip(cases, mats)):
        n = m.shape[0]
        block = slice(off, off + n * n)
        off += n * n
        _, their_piv, _ = torch.linalg.lu_factor_ex(m)
        piv = pivots[i, :n].long()
        checked = n if lapack_pivots else 1
        assert torch.equal(piv[:checked], their_piv[:checked].long() - 1), (i, n)
        perm, lo, up = torch.lu_unpack(factors[block].view(n, n).double(), piv.int() + 1)
        torch.testing.assert_close(perm @ lo @ up, m, rtol=0, atol=50 * n * eps * m.abs().max().item())
        assert lo.abs().max().item() <= 1  # partial pivoting: no multiplier above 1
        their_sign, their_ld = torch.linalg.slogdet(m)
        assert sign[i].item() == their_sign.item(), (i, n)
        if their_sign.item() == 0:
            assert ld[i].item() == -math.inf
            assert torch.isnan(inverse[block]).all() and torch.isnan(grad[block]).all()
            continue
        torch.testing.assert_close(ld[i].double(), their_ld, rtol=0, atol=_tol(dtype, n))
        x = inverse[block].view(n, n).double()
        expected_grad = scale[i].to(dtype).double() * x.T
        torch.testing.assert_close(grad[block].view(n, n).double(), expected_grad, rtol=4 * eps, atol=0)
        bound = 50 * n * torch.linalg.cond(m).item() * eps
        torch.testing.assert_close(x @ m, torch.eye(n, dtype=torch.float64), rtol=0, atol=bound)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_kernel_gives_lapacks_factors(dtype):
    """The C++ CPU op on the cases above: LAPACK's pivots and factors, inverses, scaled transposed inverses."""
    gen = torch.Generator().manual_seed(31)
    cases = _lu_cases(gen)
    mats = [m.to(dtype).double() for m, _ in cases]  # the values the kernel sees
    scale = torch.randn(len(mats), dtype=torch.float64, generator=gen)
    _check_against_lapack(cases, mats, scale, _factor_and_invert(mats, dtype, scale, "cpu"), dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernel_families_agree_and_give_lapacks_factors(monkeypatch, dtype):
    """The CUDA op has two kernel families for max_n <= 64 (GLOWFAST_LU_CUDA_KERNELS): the register kernels
    (default) and the shared-memory ones (which also serve larger n). Both do the same arithmetic per element, so
    their factors, pivots and log-determinants must be identical; both must give LAPACK's pivots and factors, and
    inverses and scaled transposed inverses (the slogdet gradient) that invert the matrix; in one ragged call and in
    batches of one width (NB 32 and 64)."""
    gen = torch.Generator().manual_seed(31)
    cases = _lu_cases(gen)
    for group in (cases, [c for c in cases if c[0].shape[0] <= 32], [c for c in cases if c[0].shape[0] == 48]):
        mats = [m.to(dtype).double() for m, _ in group]
        scale = torch.randn(len(mats), dtype=torch.float64, generator=gen)
        results = {}
        for kernels in ("registers", "shared"):
            monkeypatch.setenv("GLOWFAST_LU_CUDA_KERNELS", kernels)
            results[kernels] = _factor_and_invert(mats, dtype, scale, "cuda")
            _check_against_lapack(group, mats, scale, results[kernels], dtype)
        for ours, theirs in zip(results["registers"][:4], results["shared"][:4]):  # factors, pivots, sign, ld
            assert torch.equal(ours, theirs)


@requires_cuda
def test_cuda_too_large_is_a_clear_error():
    with pytest.raises(ValueError, match=f"exceeds the CUDA kernels' limit n <= {MAX_N_CUDA}"):
        batched_slogdet(torch.eye(MAX_N_CUDA + 1, device="cuda").unsqueeze(0))


def _sample_inputs(device="cpu"):
    gen = torch.Generator().manual_seed(10)
    mats = [torch.randn(n, n, dtype=torch.float64, generator=gen) for n in (3, 1, 5)]
    packed = torch.cat([m.reshape(-1) for m in mats]).to(device)
    offsets = torch.tensor([0, 9, 10], device=device)
    sizes = torch.tensor([3, 1, 5], device=device)
    return packed, offsets, sizes, 5


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    packed, offsets, sizes, max_n = _sample_inputs(device)
    ops = torch.ops.glowfast
    torch.library.opcheck(ops.lu_factor_packed, (packed.clone().requires_grad_(), offsets, sizes, max_n))
    torch.library.opcheck(ops.lu_factor_packed, (packed.float(), offsets, sizes, 6))
    lu, piv, _, _, _ = ops.lu_factor_packed(packed, offsets, sizes, max_n)
    scale = torch.randn(3, dtype=torch.float64, device=device)
    torch.library.opcheck(ops.lu_inverse_packed, (lu, piv, offsets, sizes, max_n))
    torch.library.opcheck(ops.lu_inverse_packed, (lu, piv, offsets, sizes, max_n, True, scale))
    torch.library.opcheck(ops.inverse_packed, (packed.clone().requires_grad_(), offsets, sizes, max_n))
    inv, _ = ops.inverse_packed(packed, offsets, sizes, max_n)
    torch.library.opcheck(ops.inverse_packed_backward, (inv, torch.randn_like(inv), offsets, sizes, max_n))


def test_op_rejects_inconsistent_layout():
    packed, offsets, sizes, max_n = _sample_inputs()
    with pytest.raises(RuntimeError, match="overruns the packed buffer"):
        torch.ops.glowfast.lu_factor_packed(packed, offsets + 30, sizes, max_n)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.glowfast.lu_factor_packed(packed, offsets, sizes, 4)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.glowfast.lu_factor_packed(packed, offsets.int(), sizes, max_n)


def test_the_cuda_kernel_check_traces_under_torch_compile():
    """has_cuda_kernels() runs inside traced code on CUDA tensors (the op wrappers' device check): it must be a
    constant to torch.compile, not a dispatcher query (which returns a bool and broke fullgraph compiles on the GPU,
    where the check runs; on CPU tensors it is skipped, so this calls it directly)."""
    from glowfast.ops.batched_lu import has_cuda_kernels

    torch._dynamo.reset()
    f = torch.compile(lambda x: x + 1 if has_cuda_kernels() else x - 1, fullgraph=True, backend="eager")
    x = torch.zeros(3)
    torch.testing.assert_close(f(x), x + 1 if has_cuda_kernels() else x - 1)


def test_torch_compile_fullgraph_forward_and_backward():
    def f(ws):
        sign, ld = batched_slogdet(ws)
        inv = batched_inverse(ws)
        return (ld * sign).sum() + sum(x.sum() for x in inv)

    gen = torch.Generator().manual_seed(11)
    ws = [torch.randn(n, n, dtype=torch.float64, generator=gen) + 2 * torch.eye(n) for n in (4, 6, 4)]
    a = [w.clone().requires_grad_() for w in ws]
    b = [w.clone().requires_grad_() for w in ws]
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out_c = compiled(a)
    out_c.backward()
    out_e = f(b)
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor():
    ws = torch.randn(8, 5, 5, dtype=torch.float64) + 2 * torch.eye(5)
    torch._dynamo.reset()
    compiled = torch.compile(lambda w: batched_slogdet(w)[1].exp() * 2, fullgraph=True)
    torch.testing.assert_close(compiled(ws), torch.linalg.det(ws).abs() * 2)


# ----------------------------------------------------------------------------------------------------------
# PackedMatrices: many matrices in one flat buffer, validated once
# ----------------------------------------------------------------------------------------------------------
CIFAR_SIZES = [12] * 32 + [24] * 32 + [48] * 32
RAGGED_SIZES = [1, 5, 12, 1, 24, 3, 48, 2, 1]


def _random_mats(sizes, gen, dtype=torch.float64, device="cpu"):
    return [
        (torch.randn(n, n, dtype=torch.float64, generator=gen) / n**0.5 + torch.eye(n, dtype=torch.float64))
        .to(device, dtype)
        for n in sizes
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", [RAGGED_SIZES, CIFAR_SIZES, [1] * 7, [6]], ids=["ragged", "cifar96", "1x1", "one"])
def test_packed_matches_list_api_and_torch(device, dtype, sizes):
    gen = torch.Generator().manual_seed(20)
    mats = _random_mats(sizes, gen, dtype, device)
    mats[-1][0] *= -1  # a negative determinant among them
    packed = PackedMatrices.from_list(mats)
    assert len(packed) == len(sizes) and packed.sizes == tuple(sizes)
    assert packed.data.shape == (sum(n * n for n in sizes),) and packed.data.is_contiguous()
    assert packed.dtype == dtype and packed.device.type == device
    sign, ld = batched_slogdet(packed)
    sign_l, ld_l = batched_slogdet(mats)
    assert torch.equal(sign, sign_l) and torch.equal(ld, ld_l)  # the same kernel on the same values
    ref = [torch.linalg.slogdet(m.double()) for m in mats]
    torch.testing.assert_close(sign.double(), torch.stack([r.sign for r in ref]), rtol=0, atol=0)
    torch.testing.assert_close(ld.double(), torch.stack([r.logabsdet for r in ref]), rtol=0, atol=_tol(dtype))
    inv = batched_inverse(packed)
    assert isinstance(inv, PackedMatrices) and inv.sizes == packed.sizes and inv.data.shape == packed.data.shape
    for x, y in zip(inv.matrices(), batched_inverse(mats)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sizes", [RAGGED_SIZES, CIFAR_SIZES], ids=["ragged", "cifar96"])
def test_packed_gradient_on_data_matches_torch_slogdet(device, sizes):
    gen = torch.Generator().manual_seed(21)
    mats = _random_mats(sizes, gen, device=device)
    weight = nn.Parameter(PackedMatrices.from_list(mats).data)
    packed = PackedMatrices(weight, sizes)
    w = torch.randn(len(sizes), dtype=torch.float64, generator=gen).to(device)
    (batched_slogdet(packed)[1] * w).sum().backward()
    assert weight.grad is not None and weight.grad.shape == weight.shape
    theirs = [m.clone().requires_grad_() for m in mats]
    (torch.stack([torch.linalg.slogdet(m)[1] for m in theirs]) * w).sum().backward()
    expected = torch.zeros_like(weight)
    for off, n, m in zip(packed.offsets, sizes, theirs):
        expected[off : off + n * n] = m.grad.reshape(-1)  # matrix i's gradient at its offset, row-major
    torch.testing.assert_close(weight.grad, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_inverse_times_matrix_is_identity_and_gradients(device):
    gen = torch.Generator().manual_seed(22)
    sizes = [12, 1, 24, 3, 48]
    mats = _random_mats(sizes, gen, device=device)
    data = PackedMatrices.from_list(mats).data.requires_grad_()
    inv = batched_inverse(PackedMatrices(data, sizes))
    assert isinstance(inv, PackedMatrices) and inv.sizes == tuple(sizes)
    for m, x in zip(mats, inv):
        assert x.shape == m.shape
        torch.testing.assert_close(x.detach() @ m, torch.eye(m.shape[0], dtype=torch.float64, device=device),
                                   rtol=0, atol=1e-10)
    gs = [torch.randn(m.shape, dtype=torch.float64, generator=gen).to(device) for m in mats]
    sum((x * g).sum() for x, g in zip(inv.matrices(), gs)).backward()
    theirs = [m.clone().requires_grad_() for m in mats]
    sum((torch.linalg.inv(m) * g).sum() for m, g in zip(theirs, gs)).backward()
    torch.testing.assert_close(data.grad, torch.cat([m.grad.reshape(-1) for m in theirs]), rtol=1e-9, atol=1e-9)


def test_packed_views_share_storage_and_carry_gradients():
    gen = torch.Generator().manual_seed(23)
    sizes = [3, 1, 4, 2]
    mats = _random_mats(sizes, gen)
    packed = PackedMatrices.from_list(mats)
    data = packed.data
    assert packed.offsets == (0, 9, 10, 26)
    assert all(v.data_ptr() != m.data_ptr() for v, m in zip(packed.matrices(), mats))  # from_list copies
    for i, (view, m) in enumerate(zip(packed.matrices(), mats)):
        assert view.shape == m.shape and torch.equal(view, m)
        assert view.data_ptr() == data.data_ptr() + packed.offsets[i] * data.element_size()
        assert packed[i].data_ptr() == view.data_ptr() and torch.equal(packed[i], view)
    assert torch.equal(packed[-1], mats[-1]) and [x.shape for x in packed] == [m.shape for m in mats]
    assert torch.equal(packed[-4], mats[0])  # negative indices count from the end, like a list's
    for bad in (4, -5):
        with pytest.raises(IndexError, match="out of range"):
            packed[bad]
    packed[2][1, 3] = 7.0  # writes through to the buffer
    assert data[packed.offsets[2] + 1 * 4 + 3] == 7.0
    copies = packed.to_list()
    assert all(c.data_ptr() != v.data_ptr() for c, v in zip(copies, packed.matrices()))
    data.requires_grad_()
    (packed[2].sum() + 2 * packed.matrices()[0][0, 1]).backward()
    expected = torch.zeros_like(data)
    expected[10:26] = 1.0
    expected[1] = 2.0
    assert torch.equal(data.grad, expected)


def test_packed_from_an_existing_buffer():
    gen = torch.Generator().manual_seed(24)
    sizes = [2, 3, 1]
    mats = _random_mats(sizes, gen)
    flat = torch.cat([m.reshape(-1) for m in mats])
    strided = torch.zeros(2 * flat.numel(), dtype=torch.float64)
    strided[::2] = flat
    for data, sz in [(flat, sizes), (strided[::2], tuple(sizes)), (flat, torch.tensor(sizes)),
                     (flat, [np.int64(n) for n in sizes])]:
        packed = PackedMatrices(data, sz)
        assert packed.data is data and packed.sizes == (2, 3, 1)
        assert all(torch.equal(v, m) for v, m in zip(packed.matrices(), mats))
        _, ld = batched_slogdet(packed)
        torch.testing.assert_close(ld, torch.stack([torch.linalg.slogdet(m)[1] for m in mats]))
    # A (B, n, n) batch: from_list copies it into a new contiguous buffer.
    batch = torch.randn(5, 4, 4, dtype=torch.float64, generator=gen).mT
    packed = PackedMatrices.from_list(batch)
    assert packed.sizes == (4,) * 5 and packed.data.data_ptr() != batch.data_ptr()
    torch.testing.assert_close(batched_slogdet(packed)[1], torch.linalg.slogdet(batch)[1])
    # from_list is differentiable w.r.t. the list (a copy, not a new leaf).
    leaves = [m.clone().requires_grad_() for m in mats]
    batched_slogdet(PackedMatrices.from_list(leaves))[1].sum().backward()
    for leaf, m in zip(leaves, mats):
        torch.testing.assert_close(leaf.grad, torch.linalg.inv(m).T)
    # .data may be replaced by a buffer of the same layout (e.g. an nn.Parameter), checked.
    packed = PackedMatrices(flat.clone(), sizes)
    packed.data = nn.Parameter(flat.clone())
    batched_slogdet(packed)[1].sum().backward()
    assert packed.data.grad is not None and packed.data.grad.shape == flat.shape
    with pytest.raises(ValueError, match="PackedMatrices.data: data has 15 elements but the sizes need"):
        packed.data = torch.zeros(15, dtype=torch.float64)


@pytest.mark.parametrize(
    "data, sizes, match",
    [
        (torch.zeros(12), (2, 3), r"data has 12 elements but the sizes need sum\(n_i\^2\) = 13"),
        (torch.zeros(14), (2, 3), r"data has 14 elements but the sizes need sum\(n_i\^2\) = 13"),
        (torch.zeros(2, 2), (2,), r"1-D \(flat\) buffer, got a 2-D tensor of shape \(2, 2\)"),
        (torch.zeros(4, dtype=torch.int32), (2,), "non-floating-point dtype torch.int32"),
        (torch.zeros(4, dtype=torch.float16), (2,), "float32 or float64, got floating-point dtype torch.float16"),
        (torch.zeros(0), (), "empty sizes"),
        (torch.zeros(4), (2, 0), r"sizes\[1\] must be a positive int, got non-positive size 0"),
        (torch.zeros(4), (-2,), r"sizes\[0\] must be a positive int, got non-positive size -2"),
        (torch.zeros(4), (2.0,), r"sizes\[0\] must be a positive int, got float"),
        (torch.zeros(1), (True,), r"sizes\[0\] must be a positive int, got bool"),
        (torch.zeros(4), 2, "sizes must be a sequence"),
        ([0.0] * 4, (2,), "data must be a 1-D tensor, got a list"),
    ],
)
def test_packed_bad_input_raises_naming_the_problem(data, sizes, match):
    with pytest.raises(ValueError, match="^PackedMatrices: .*" + match):
        PackedMatrices(data, sizes)



def test_packed_sizes_check_does_not_depend_on_what_was_seen_before():
    # A tuple of plain ints seen before skips the per-size checks (a cache lookup); values that compare equal
    # to a cached tuple but are not ints must still be rejected, whatever was built before.
    for good, bad, match in [((2,), (2.0,), "got float"), ((1,), (True,), "got bool"), ((2, 1), (2, 0), "size 0")]:
        data = torch.zeros(sum(n * n for n in good))
        assert PackedMatrices(data, good).sizes == good
        assert PackedMatrices(data, good).sizes == good
        with pytest.raises(ValueError, match=match):
            PackedMatrices(data, bad)
    sizes = (3, 1)
    assert PackedMatrices(torch.zeros(10), sizes)._layout is PackedMatrices(torch.zeros(10), list(sizes))._layout

@pytest.mark.parametrize(
    "bad, match",
    [
        ([], "empty list"),
        ([torch.randn(2, 2), torch.randn(0, 0)], "element 1 is an empty"),
        ([torch.randn(2, 3)], "not square"),
        ([torch.randn(2, 2), torch.randn(3)], "element 1 must be a square 2-D"),
        ([torch.randn(2, 2), torch.randn(2, 2, dtype=torch.float64)], "mixed dtypes"),
        ([torch.randn(2, 2), [[1.0]]], "not a tensor"),
        ([torch.ones(2, 2, dtype=torch.int64)], "non-floating-point dtype torch.int64"),
        (torch.randn(3, 4, 5), "square"),
        (torch.randn(0, 3, 3), "empty"),
        ("abc", "expected a"),
    ],
)
def test_packed_from_list_checks_like_the_list_api(bad, match):
    with pytest.raises(ValueError, match="PackedMatrices.from_list: .*" + match):
        PackedMatrices.from_list(bad)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_packed_non_finite_and_singular_semantics(value):
    mats = [torch.eye(3), torch.randn(4, 4), torch.eye(2), torch.zeros(2, 2)]
    mats[1][2, 1] = value
    packed = PackedMatrices.from_list(mats)
    with pytest.raises(ValueError, match="batched_slogdet: matrix 1 contains non-finite values"):
        batched_slogdet(packed)
    with pytest.raises(ValueError, match="batched_inverse: matrix 1 contains non-finite values"):
        batched_inverse(packed)
    sign, ld = batched_slogdet(packed, check=False)
    assert torch.isnan(sign[1]) and torch.isnan(ld[1]) and ld[0] == 0 and ld[2] == 0
    assert sign[3] == 0 and ld[3] == -math.inf
    inv = batched_inverse(packed, check=False)
    assert torch.isnan(inv[1]).all() and torch.isnan(inv[3]).all() and torch.equal(inv[0], torch.eye(3))
    packed.data[packed.offsets[1] : packed.offsets[2]] = torch.eye(4).reshape(-1)  # now only a singular one
    sign, ld = batched_slogdet(packed)  # singular is not an error for slogdet
    assert sign[3] == 0 and ld[3] == -math.inf and ld[1] == 0
    with pytest.raises(ValueError, match="batched_inverse: matrix 3 is singular"):
        batched_inverse(packed)


def test_gradcheck_packed_slogdet_and_inverse():
    gen = torch.Generator().manual_seed(25)
    sizes = [1, 3, 4]
    data = PackedMatrices.from_list(_random_mats(sizes, gen)).data.requires_grad_()
    assert torch.autograd.gradcheck(lambda d: batched_slogdet(PackedMatrices(d, sizes))[1], (data,))
    assert torch.autograd.gradcheck(lambda d: batched_inverse(PackedMatrices(d, sizes)).data, (data,))


@requires_cuda
def test_cuda_packed_no_sync_by_default_and_layout_on_device():
    gen = torch.Generator().manual_seed(26)
    mats = _random_mats([12, 24, 48, 1], gen, torch.float32, "cuda")
    mats[2][0, 0] = math.nan
    packed = PackedMatrices.from_list(mats)
    sign, ld = batched_slogdet(packed)  # default: no check (no sync) on CUDA
    assert sign.device.type == "cuda" and torch.isnan(ld[2]).item() and not torch.isnan(ld[0]).item()
    with pytest.raises(ValueError, match="matrix 2 contains non-finite values"):
        batched_slogdet(packed, check=True)
    offsets, sizes = packed._layout.tensors(packed.device)
    assert offsets.device.type == "cuda" and sizes.device.type == "cuda"
    with pytest.raises(ValueError, match=f"exceeds the CUDA kernels' limit n <= {MAX_N_CUDA}"):
        batched_slogdet(PackedMatrices(torch.zeros((MAX_N_CUDA + 1) ** 2, device="cuda"), [MAX_N_CUDA + 1]))


def test_torch_compile_fullgraph_packed():
    sizes = (4, 6, 1, 4)

    def f(packed):
        sign, ld = batched_slogdet(packed)
        inv = batched_inverse(packed)
        return (ld * sign).sum() + inv.data.sum() + packed[1].sum()

    def g(data):  # the PackedMatrices built inside the compiled region
        return f(PackedMatrices(data, sizes))

    gen = torch.Generator().manual_seed(27)
    flat = PackedMatrices.from_list(_random_mats(sizes, gen)).data
    torch._dynamo.reset()
    for fn, wrap in [(f, lambda d: PackedMatrices(d, sizes)), (g, lambda d: d)]:
        a, b = flat.clone().requires_grad_(), flat.clone().requires_grad_()
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        out_c = compiled(wrap(a))
        out_c.backward()
        out_e = fn(wrap(b))
        out_e.backward()
        torch.testing.assert_close(out_c, out_e)
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.skipif(torch.version.cuda is None or os.environ.get("GLOWFAST_NO_CUDA") == "1",
                    reason="a CPU build of torch (or GLOWFAST_NO_CUDA=1): no CUDA kernels are built")
def test_extension_has_its_cuda_kernels_where_nvcc_exists():
    """setup.py builds the CUDA kernels when torch is a CUDA build and nvcc is found; a build that silently lost
    them would only show on a GPU (where calls then raise has_cuda_kernels()'s clear error)."""
    from glowfast.ops.batched_lu import has_cuda_kernels

    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    if not (os.path.exists(os.path.join(cuda_home, "bin", "nvcc")) or shutil.which("nvcc")):
        pytest.skip("no nvcc here: the extension is built without CUDA kernels")
    assert has_cuda_kernels()


@pytest.mark.skipif(not (sys.platform.startswith("linux") and torch.backends.openmp.is_available())
                    or os.environ.get("GLOWFAST_NO_OPENMP") == "1",
                    reason="setup.py adds -fopenmp only on Linux where torch's CPU threads are OpenMP ones (and not "
                           "under GLOWFAST_NO_OPENMP=1)")
def test_cpu_kernels_are_built_to_run_on_torchs_threads():
    """at::parallel_for is a header template: compiled without OpenMP it runs every matrix on the calling thread
    (as glowfast._C did before setup.py passed -fopenmp: one thread whatever torch.get_num_threads() said)."""
    import glowfast._C

    assert glowfast._C.intra_op_parallel == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_results_do_not_depend_on_the_thread_count(dtype):
    """Each matrix is one task: splitting the batch over threads must give bit-identical results (forward, inverse,
    logabsdet gradient and inverse gradient), for a ragged batch large enough to be split."""
    gen = torch.Generator().manual_seed(7)
    sizes = [1, 2, 3, 5, 8, 12, 24, 48] * 40
    mats = [torch.randn(n, n, dtype=dtype, generator=gen) for n in sizes]
    grads = [torch.randn(n, n, dtype=dtype, generator=gen) for n in sizes]

    def run():
        leaves = [m.clone().requires_grad_() for m in mats]
        sign, logabsdet = batched_slogdet(leaves)
        inverses = batched_inverse(leaves)
        loss = (logabsdet * torch.arange(len(sizes), dtype=dtype)).sum()
        loss = loss + sum((x * g).sum() for x, g in zip(inverses, grads))
        loss.backward()
        return [sign, logabsdet, *(x.detach() for x in inverses), *(w.grad for w in leaves)]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = run()
        torch.set_num_threads(max(2, threads))
        parallel = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a, b)


def test_overflow_during_elimination_is_not_called_non_finite_input():
    """Finite float32 entries whose elimination overflows (det ~ -1.8e77): the error says so and points to float64,
    where the same matrix works."""
    m = torch.tensor([[3e38, 3e38], [3e38, -3e38]])
    assert bool(torch.isfinite(m).all())
    with pytest.raises(ValueError, match="matrix 0 overflows torch.float32 during its LU factorisation"):
        batched_slogdet(m[None])
    sign, logabsdet = batched_slogdet(m[None].double())
    expected = torch.linalg.slogdet(m.double())
    assert float(sign[0]) == float(expected.sign) == -1.0
    assert float(logabsdet[0]) == pytest.approx(float(expected.logabsdet), rel=1e-12)
    with pytest.raises(ValueError, match="contains non-finite values"):  # genuinely non-finite input
        batched_slogdet(torch.tensor([[[1.0, float("nan")], [0.0, 1.0]]]))


def test_derivatives_past_those_supported_are_an_error():
    """batched_inverse's second derivative and batched_slogdet's third raise (never a silent zero)."""
    w = (torch.eye(3, dtype=torch.float64) + 0.3 * torch.randn(2, 3, 3, dtype=torch.float64)).requires_grad_()
    (g,) = torch.autograd.grad(batched_inverse(w).sum(), w, create_graph=True)
    with pytest.raises(RuntimeError, match="batched_inverse has no second derivative"):
        torch.autograd.grad(g.sum(), w)
    (g1,) = torch.autograd.grad(batched_slogdet(w)[1].sum(), w, create_graph=True)
    (g2,) = torch.autograd.grad((g1 * g1).sum(), w, create_graph=True)  # the second derivative: supported
    with pytest.raises(RuntimeError, match="batched_slogdet no third"):
        torch.autograd.grad(g2.sum(), w)


# ------------------------------------------------------------------ gaps found by mutation testing (12th session)
def test_cuda_matrix_size_limit_is_inclusive(monkeypatch):
    """The CUDA kernels take n <= MAX_N_CUDA: exactly MAX_N_CUDA passes the wrapper's check, one more is refused
    with a ValueError naming both (checked on a stand-in CUDA buffer: the check reads only its device)."""
    monkeypatch.setattr(lu, "has_cuda_kernels", lambda: True)
    on_cuda = types.SimpleNamespace(device=types.SimpleNamespace(type="cuda"))
    lu._check_device(on_cuda, lu._Layout((3, lu.MAX_N_CUDA), False), "batched_slogdet")
    with pytest.raises(ValueError, match=f"matrix size {lu.MAX_N_CUDA + 1} exceeds the CUDA kernels' limit "
                                         f"n <= {lu.MAX_N_CUDA}"):
        lu._check_device(on_cuda, lu._Layout((lu.MAX_N_CUDA + 1,), False), "batched_slogdet")
