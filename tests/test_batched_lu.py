"""glowfast.ops batched LU (slogdet / inverse) against float64 numpy / torch.linalg; CPU always, CUDA if present."""

import math

import numpy as np
import pytest
import torch

from glowfast.ops import MAX_N_CUDA, batched_inverse, batched_slogdet

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
