"""Bits/dim evaluation (glowfast.evaluate.evaluate_bpd, the experiments' nll_bits_per_dim and
class_log_likelihoods) against an answer known in closed form.

A freshly built Glow with *additive* couplings is a rotation of its input: ActNorm starts as the identity, every
coupling network and prior ends in a zero-initialised convolution (identity couplings, standard-normal priors),
and the 1x1 convolutions start orthogonal. A rotation keeps the standard normal's density, so the model's
density of the dequantised image x is that of N(0, I) at x, and with x = v/256 - 1/2 + u/256, u ~ U[0, 1):

    E[bits/dim] = log2(256) + (log(2 pi) / 2 + E[x^2] / 2) / ln 2,   E[x^2] = ((a + w)^3 - a^3) / (3 w)

with a = v/256 - 1/2 and w = 1/256, per pixel value v. Averaged over thousands of pixels the dequantisation
noise moves the mean by < 1e-5 bits/dim.
"""

import math

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from glowfast import Glow
from glowfast.evaluate import evaluate_bpd
from glowfast.experiments.common import class_log_likelihoods, nll_bits_per_dim

SHAPE = (1, 8, 8)


def _measure_preserving_glow(n_classes=None, lu=True):
    torch.manual_seed(0)
    return Glow(SHAPE, K=2, L=2, hidden_channels=8, coupling="additive", lu=lu, n_classes=n_classes).double().eval()


def _images(n=100, seed=0):
    """Black-and-white images (pixel values 0 and 255), the mix differing per image."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((n, *SHAPE), generator=g) < torch.rand((n, 1, 1, 1), generator=g)).to(torch.uint8) * 255


def _expected_bpd(images: torch.Tensor) -> np.ndarray:
    """The closed-form expectation above, per image (float64)."""
    w = 1 / 256
    a = images.double() / 256 - 0.5
    ex2 = ((a + w) ** 3 - a**3) / (3 * w)
    nats = 0.5 * math.log(2 * math.pi) + 0.5 * ex2
    return (math.log2(256) + nats.flatten(1).mean(1) / math.log(2)).numpy()


@pytest.mark.parametrize("lu", [True, False])
def test_evaluate_bpd_known_answer_and_ragged_batches(lu):
    model = _measure_preserving_glow(lu=lu)
    images = _images(101)
    data = TensorDataset(images, torch.zeros(len(images), dtype=torch.long))
    expected = _expected_bpd(images).mean()
    for batch_size in (7, 101, 512):  # a last partial batch, one batch, fewer images than a batch
        assert evaluate_bpd(model, data, "cpu", batch_size=batch_size) == pytest.approx(expected, abs=2e-5)
    # an iterable of plain image batches; an empty one has no mean
    assert evaluate_bpd(model, [images[:50], images[50:]], "cpu") == pytest.approx(expected, abs=2e-5)
    assert math.isnan(evaluate_bpd(model, [], "cpu"))


def test_evaluate_bpd_fixed_seed_training_mode_restored_and_no_actnorm_init():
    """Evaluation runs in eval mode: test images never initialise ActNorm (that would fit the test set), and the
    caller's training mode comes back."""
    model = _measure_preserving_glow().train()
    data = TensorDataset(_images(64), torch.zeros(64, dtype=torch.long))
    a = evaluate_bpd(model, data, "cpu", seed=3)
    b = evaluate_bpd(model, data, "cpu", seed=3)
    c = evaluate_bpd(model, data, "cpu", seed=4)
    assert a == b and a != c and model.training
    flags = [bool(m.initialized) for m in model.modules() if hasattr(m, "initialized")]
    assert flags and not any(flags)


def test_class_conditional_marginal_and_per_class_known_answer():
    """Fresh class priors are all N(0, I): p(x | y) is the same for every y, so the marginal p(x) = mean_y p(x|y)
    equals it, and both equal the closed form."""
    model = _measure_preserving_glow(n_classes=3)
    images = _images(60, seed=1)
    labels = torch.arange(60) % 3
    expected = _expected_bpd(images)
    marginal = nll_bits_per_dim(model, images, "cpu", batch_size=16)
    conditional = nll_bits_per_dim(model, images, "cpu", batch_size=16, labels=labels)
    assert marginal.shape == (60,)
    np.testing.assert_allclose(marginal.mean(), expected.mean(), atol=2e-5)
    np.testing.assert_allclose(marginal, conditional, rtol=0, atol=1e-9)  # same noise (seed), same density
    data = TensorDataset(images, labels)
    assert evaluate_bpd(model, data, "cpu", y_condition=True) == pytest.approx(expected.mean(), abs=2e-5)

    xc = model.preprocess(images, dequantize=False)
    ll = class_log_likelihoods(model, xc)
    assert ll.shape == (60, 3)
    for y in range(3):
        out = model(images, torch.full((60,), y), dequantize=False)
        torch.testing.assert_close(ll[:, y], out.log_prob)


def test_marginal_is_the_log_mean_exp_over_classes():
    """With distinct class priors: marginal bits/dim = -(logsumexp_y log p(x|y) - log C) / (D ln 2)."""
    model = _measure_preserving_glow(n_classes=3)
    with torch.no_grad():
        for p in model.prior.parameters():
            p.normal_(0, 0.3)
    images = _images(20, seed=2)
    marginal = nll_bits_per_dim(model, images, "cpu", seed=5)
    per_class = torch.stack([model(images, torch.full((20,), y), generator=torch.Generator().manual_seed(5)).log_prob
                             for y in range(3)], 1)
    d = math.prod(SHAPE)
    expected = -(torch.logsumexp(per_class, 1) - math.log(3)) / (d * math.log(2))
    np.testing.assert_allclose(marginal, expected.detach().numpy(), rtol=0, atol=1e-9)
    assert np.ptp(per_class.detach().numpy(), axis=1).min() > 1e-3  # the classes really differ
