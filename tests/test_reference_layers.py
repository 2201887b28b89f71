"""The reference layers: exact inverses, log-determinants equal to autograd's, gradcheck, ActNorm init."""

import pytest
import torch

from glowfast.reference import (
    ActNorm2d,
    AdditiveCoupling,
    AffineCoupling,
    FlowStep,
    InvConv1x1,
    Reverse,
    Shuffle,
    Split2d,
    Squeeze2d,
    squeeze2d,
    unsqueeze2d,
)

from helpers import jacobian_logabsdet, max_rel_err, randomize_

C, H, W = 4, 4, 6  # non-square on purpose


def _non_involutive_shuffle(channels: int) -> Shuffle:
    """A Shuffle that is not its own inverse (randperm(4) often is), so a wrong inverse cannot pass."""
    for seed in range(100):
        layer = Shuffle(channels, generator=torch.Generator().manual_seed(seed))
        if not torch.equal(layer.perm[layer.perm], torch.arange(channels)):
            return layer
    raise AssertionError(f"no non-involutive permutation of {channels} channels in 100 seeds")


def _layers():
    """(name, factory(channels)) of every layer with a forward(x) -> (y, logdet) / inverse(y) pair."""
    return [
        ("actnorm", lambda c: ActNorm2d(c)),
        ("invconv_plain", lambda c: InvConv1x1(c, lu=False)),
        ("invconv_lu", lambda c: InvConv1x1(c, lu=True)),
        ("shuffle", _non_involutive_shuffle),
        ("reverse", lambda c: Reverse(c)),
        ("affine", lambda c: AffineCoupling(c, hidden_channels=8)),
        ("additive", lambda c: AdditiveCoupling(c, hidden_channels=8)),
        ("affine_odd_channels", lambda c: AffineCoupling(c + 1, hidden_channels=8)),
        ("flowstep", lambda c: FlowStep(c, hidden_channels=8)),
        ("flowstep_additive_shuffle_plain", lambda c: FlowStep(c, 8, coupling="additive", permutation="shuffle",
                                                                lu=False)),
        ("squeeze", lambda c: Squeeze2d()),
    ]


LAYERS = _layers()


def _make(factory, dtype, channels=C):
    layer = randomize_(factory(channels), scale=0.2).to(dtype)
    layer.eval()
    return layer


def _input(layer, dtype, batch=3):
    channels = getattr(layer, "channels", C)
    return torch.randn(batch, channels, H, W, dtype=dtype)


@pytest.mark.parametrize("name,factory", LAYERS, ids=[n for n, _ in LAYERS])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_inverse_recovers_input(name, factory, dtype, tol):
    layer = _make(factory, dtype)
    x = _input(layer, dtype)
    y, logdet = layer(x)
    assert y.dtype == dtype and logdet.shape == (x.shape[0],)
    assert max_rel_err(layer.inverse(y), x) <= tol


@pytest.mark.parametrize("name,factory", LAYERS, ids=[n for n, _ in LAYERS])
def test_logdet_equals_autograd_jacobian(name, factory):
    layer = _make(factory, torch.float64)
    x = _input(layer, torch.float64, batch=2)
    _, logdet = layer(x)
    expected = jacobian_logabsdet(lambda v: layer(v)[0], x)
    torch.testing.assert_close(logdet, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name,factory", LAYERS, ids=[n for n, _ in LAYERS])
def test_gradcheck(name, factory):
    layer = _make(factory, torch.float64)
    x = torch.randn(2, getattr(layer, "channels", 2), 2, 4, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]

    def fn(x, *params):  # gradients w.r.t. the input and every parameter
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    inputs = (x, *[p.detach().clone().requires_grad_(True) for p in layer.parameters()])
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=True)


def test_invconv_lu_weight_matches_its_logdet():
    layer = randomize_(InvConv1x1(6, lu=True), 0.3).double()
    w = layer.weight_matrix()
    torch.testing.assert_close(layer.log_abs_det(), torch.linalg.slogdet(w)[1], rtol=1e-12, atol=1e-12)


def test_invconv_init_is_orthogonal():
    w = InvConv1x1(12, lu=False).weight.double()
    torch.testing.assert_close(w @ w.T, torch.eye(12, dtype=torch.float64), atol=1e-6, rtol=0)


def test_actnorm_data_dependent_init_normalises_per_channel():
    layer = ActNorm2d(5)
    layer.train()
    x = 3.0 + 2.5 * torch.randn(16, 5, 6, 6) * torch.arange(1, 6).view(1, 5, 1, 1)
    y, _ = layer(x)
    assert bool(layer.initialized)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(5), atol=1e-4, rtol=0)
    # Initialisation happens once: a second, differently distributed batch keeps the parameters.
    bias = layer.bias.detach().clone()
    layer(x * 10)
    torch.testing.assert_close(layer.bias.detach(), bias)


def test_actnorm_init_survives_a_large_mean_over_a_small_std():
    """The std comes from E[x^2] - E[x]^2: in float32 that cancels to garbage at mean 300, std 0.01."""
    layer = ActNorm2d(3).train()
    x = 300.0 + 0.01 * torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    y, _ = layer(x)
    torch.testing.assert_close(y.double().std(dim=(0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64),
                               atol=1e-3, rtol=0)


def test_actnorm_does_not_initialise_in_eval_mode():
    layer = ActNorm2d(3).eval()
    x = torch.randn(2, 3, 4, 4) + 5
    y, _ = layer(x)
    torch.testing.assert_close(y, x)
    assert not bool(layer.initialized)


def test_squeeze_roundtrip_and_layout():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    y = squeeze2d(x)
    assert y.shape == (2, 12, 2, 3)
    # Channel c*4 + 2*i + j of the output holds pixel (2h + i, 2w + j) of input channel c.
    assert y[1, 2 * 4 + 2 * 1 + 0, 1, 2] == x[1, 2, 2 * 1 + 1, 2 * 2 + 0]
    torch.testing.assert_close(unsqueeze2d(y), x)


def test_squeeze_rejects_odd_spatial_size():
    with pytest.raises(ValueError, match="odd"):
        squeeze2d(torch.zeros(1, 2, 3, 4))


def test_split_roundtrip_and_prior_log_prob():
    split = randomize_(Split2d(6), 0.3).double()
    z = torch.randn(3, 6, 2, 4, dtype=torch.float64)
    z1, z2, logp = split(z)
    assert z1.shape == (3, 3, 2, 4) and z2.shape == (3, 3, 2, 4)
    torch.testing.assert_close(split.inverse(z1, z2), z)
    mean, log_std = split.prior_params(z1)
    expected = torch.distributions.Normal(mean, log_std.exp()).log_prob(z2).flatten(1).sum(1)
    torch.testing.assert_close(logp, expected)
    # Temperature 0 draws the conditional mean.
    torch.testing.assert_close(split.inverse(z1, None, temperature=0.0)[:, 3:], mean)


def test_coupling_rejects_single_channel():
    with pytest.raises(ValueError, match="at least 2 channels"):
        AffineCoupling(1, 8)


def test_actnorm_init_flag_follows_loaded_state_dicts():
    # needs_init() caches the buffer on the host (no device sync per step); loading must refresh that cache.
    fresh = ActNorm2d(3).state_dict()
    layer = ActNorm2d(3).train()
    layer(torch.randn(4, 3, 2, 2))
    assert not layer.needs_init()
    layer.load_state_dict(fresh)
    assert layer.needs_init()
    layer(torch.randn(4, 3, 2, 2) * 7 + 1)
    assert not layer.needs_init() and bool(layer.initialized)
    other = ActNorm2d(3).train()
    other.load_state_dict(layer.state_dict())
    assert not other.needs_init()


def _gradcheck_module(module, inputs, fn):
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in module.parameters()]
    n_in = len(inputs)

    def call(*args):
        return fn(lambda *a: torch.func.functional_call(module, dict(zip(names, args[n_in:])), a), *args[:n_in])

    assert torch.autograd.gradcheck(call, (*inputs, *params), eps=1e-6, atol=1e-6, fast_mode=True)


def test_gradcheck_split_prior():
    split = randomize_(Split2d(4), 0.3).double()
    z = torch.randn(2, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    _gradcheck_module(split, (z,), lambda f, z: f(z))


def test_gradcheck_top_prior_class_conditional():
    from glowfast.reference import TopPrior

    prior = randomize_(TopPrior((3, 2, 2), learn_top=True, n_classes=4), 0.3).double()
    z = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 3])
    _gradcheck_module(prior, (z,), lambda f, z: f(z, y))


# ------------------------------------------------------------------ bad input: clear errors naming the layer
def _actnorm_state(layer):
    return layer.bias.detach().clone(), layer.log_scale.detach().clone(), bool(layer.initialized)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)], ids=["empty_batch", "empty_spatial"])
def test_actnorm_init_rejects_empty_batch_and_keeps_parameters(shape):
    layer = ActNorm2d(3).train()
    before = _actnorm_state(layer)
    with pytest.raises(ValueError, match=r"ActNorm2d\(3\).*non-empty batch"):
        layer(torch.randn(shape))
    after = _actnorm_state(layer)
    torch.testing.assert_close(after[:2], before[:2])
    assert after[2] is False and layer.needs_init()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_actnorm_init_rejects_non_finite_batch_and_keeps_parameters(bad):
    layer = ActNorm2d(3).train()
    before = _actnorm_state(layer)
    x = torch.randn(4, 3, 2, 2)
    x[1, 2, 0, 1] = bad
    with pytest.raises(ValueError, match=r"ActNorm2d\(3\).*non-finite"):
        layer(x)
    after = _actnorm_state(layer)
    torch.testing.assert_close(after[:2], before[:2])
    assert after[2] is False
    # The layer is not poisoned: the next good batch initialises it.
    y, logdet = layer(torch.randn(4, 3, 2, 2) * 3 + 1)
    assert bool(layer.initialized) and torch.isfinite(y).all() and torch.isfinite(logdet).all()


def _split_inverse_bad_z2():
    split = Split2d(4)
    return split.inverse(torch.randn(2, 2, 4, 4), torch.randn(2, 3, 4, 4))


def _top_prior_bad_z():
    from glowfast.reference import TopPrior

    return TopPrior((4, 2, 2)).log_prob(torch.randn(2, 4, 1, 1))


WRONG_CHANNELS = [
    ("affine", lambda: AffineCoupling(4, 8)(torch.randn(2, 3, 8, 8)), r"AffineCoupling\(4\).*\(2, 3, 8, 8\)"),
    ("affine_inverse", lambda: AffineCoupling(4, 8).inverse(torch.randn(2, 3, 8, 8)), r"AffineCoupling\(4\)"),
    ("additive", lambda: AdditiveCoupling(4, 8)(torch.randn(2, 3, 8, 8)), r"AdditiveCoupling\(4\)"),
    ("split", lambda: Split2d(4)(torch.randn(2, 3, 4, 4)), r"Split2d\(4\).*\(B, 4, H, W\)"),
    ("split_inverse_z2", _split_inverse_bad_z2, r"Split2d\(4\).*z2"),
    ("shuffle", lambda: Shuffle(4)(torch.randn(2, 6, 4, 4)), r"Shuffle\(4\).*\(2, 6, 4, 4\)"),
    ("reverse_inverse", lambda: Reverse(4).inverse(torch.randn(2, 6, 4, 4)), r"Reverse\(4\)"),
    ("top_prior", _top_prior_bad_z, r"TopPrior.*\(B, 4, 2, 2\)"),
    ("actnorm_eval", lambda: ActNorm2d(1).eval()(torch.randn(2, 3, 4, 4)), r"ActNorm2d\(1\).*\(B, 1, H, W\)"),
    ("actnorm_init", lambda: ActNorm2d(3).train()(torch.randn(2, 1, 4, 4)), r"ActNorm2d\(3\)"),
    ("invconv", lambda: InvConv1x1(4)(torch.randn(2, 3, 4, 4)), r"InvConv1x1\(4\)"),
]


@pytest.mark.parametrize("name,call,match", WRONG_CHANNELS, ids=[n for n, _, _ in WRONG_CHANNELS])
def test_wrong_channel_count_is_rejected(name, call, match):
    with pytest.raises(ValueError, match=match):
        call()


THREE_D = [
    ("actnorm", lambda: ActNorm2d(4).eval()),
    ("flowstep", lambda: FlowStep(4, 8).eval()),
    ("invconv", lambda: InvConv1x1(4)),
    ("reverse", lambda: Reverse(4)),
]


@pytest.mark.parametrize("name,factory", THREE_D, ids=[n for n, _ in THREE_D])
def test_unbatched_3d_input_is_rejected(name, factory):
    layer = factory()
    with pytest.raises(ValueError, match=r"\(4\): expected input of shape \(B, 4, H, W\), got \(4, 4, 4\)"):
        layer(torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match=r"expected input of shape"):
        layer.inverse(torch.randn(4, 4, 4))


def test_invconv_rejects_integer_input():
    with pytest.raises(TypeError, match=r"InvConv1x1\(4\).*floating-point"):
        InvConv1x1(4)(torch.ones(2, 4, 3, 3, dtype=torch.long))


def test_invconv_rejects_non_scalar_w_logabsdet():
    layer = InvConv1x1(4, lu=False)
    with pytest.raises(ValueError, match=r"InvConv1x1\(4\).*w_logabsdet.*0-d.*\(2,\)"):
        layer(torch.randn(2, 4, 3, 3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"InvConv1x1\(4\).*w_inverse.*\(4, 4\)"):
        layer.inverse(torch.randn(2, 4, 3, 3), torch.eye(4).flatten())


@pytest.mark.parametrize("fn", [squeeze2d, unsqueeze2d], ids=["squeeze2d", "unsqueeze2d"])
def test_squeeze_rejects_non_4d_input(fn):
    with pytest.raises(ValueError, match=rf"{fn.__name__}: expected input of shape \(B, C, H, W\), got \(4, 4, 4\)"):
        fn(torch.zeros(4, 4, 4))


def test_squeeze_odd_spatial_error_names_squeeze2d():
    with pytest.raises(ValueError, match=r"squeeze2d.*3x4 is odd"):
        squeeze2d(torch.zeros(1, 2, 3, 4))


def test_steps_forward_rejects_w_logabsdet_count_mismatch():
    from glowfast.reference import steps_forward

    steps = [FlowStep(4, 8, lu=False).eval() for _ in range(2)]
    with pytest.raises(ValueError, match="w_logabsdets has 1 entries for 2 steps"):
        steps_forward(steps, torch.randn(2, 4, 2, 2), [torch.tensor(0.0)])


def test_class_conditional_prior_rejects_label_list():
    from glowfast.reference import TopPrior

    prior = TopPrior((3, 2, 2), n_classes=4)
    with pytest.raises(TypeError, match=r"TopPrior.*labels y must be an integer torch.Tensor, got list"):
        prior.log_prob(torch.randn(2, 3, 2, 2), [1, 3])
    assert prior.log_prob(torch.randn(2, 3, 2, 2), torch.tensor([1, 3])).shape == (2,)
