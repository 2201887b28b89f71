"""The reference Glow model: invertibility, exact log-determinants, priors, sampling and bad input."""

import itertools
import math

import numpy as np
import pytest
import torch

from glowfast import Glow
from glowfast._checks import check_device_exists
from glowfast.reference import squeeze2d

from conftest import requires_cuda
from helpers import jacobian_logabsdet, max_rel_err, randomize_

CHOICES = list(itertools.product(["affine", "additive"], ["invconv", "shuffle", "reverse"], [True, False]))
CHOICE_IDS = [f"{c}-{p}-{'lu' if lu else 'plain'}" for c, p, lu in CHOICES]


def tiny_glow(shape=(3, 4, 4), coupling="affine", permutation="invconv", lu=True, dtype=torch.float64, **kw):
    kw.setdefault("K", 2)
    kw.setdefault("L", 2)
    model = Glow(shape, hidden_channels=8, coupling=coupling, permutation=permutation, lu=lu, **kw)
    return randomize_(model, scale=0.1).to(dtype).eval()


def flat_latents(latents):
    return torch.cat([z.flatten(1) for z in latents], dim=1)


@pytest.mark.parametrize("coupling,permutation,lu", CHOICES, ids=CHOICE_IDS)
@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 4, 4)])
def test_logdet_equals_autograd_jacobian(shape, coupling, permutation, lu):
    model = tiny_glow(shape, coupling, permutation, lu)
    x = torch.rand(2, *shape, dtype=torch.float64) - 0.5
    latents, logdet = model.encode(x)
    assert flat_latents(latents).shape[1] == math.prod(shape)  # the flow is dimension-preserving
    expected = jacobian_logabsdet(lambda v: flat_latents(model.encode(v)[0]), x)
    torch.testing.assert_close(logdet, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("coupling,permutation,lu", CHOICES, ids=CHOICE_IDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_decode_encode_recovers_input(coupling, permutation, lu, dtype, tol):
    model = tiny_glow((3, 8, 4), coupling, permutation, lu, dtype=dtype)
    x = torch.rand(3, 3, 8, 4, dtype=dtype) - 0.5
    latents, _ = model.encode(x)
    assert max_rel_err(model.decode(latents), x) <= tol


def test_log_prob_is_prior_plus_logdet_minus_quantisation():
    model = tiny_glow((1, 4, 4), n_bits=5)
    images = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8)
    g = torch.Generator().manual_seed(1)
    x = model.preprocess(images, generator=g)
    latents, logdet = model.encode(x)
    # Recompute log p(z) by hand from the layers: split prior conditioned on z1, then the top prior.
    z = squeeze2d(x)
    for step in model.levels[0].steps:
        z, _ = step(z)
    z1, z2, _ = model.levels[0].split(z)
    mean, log_std = model.levels[0].split.prior_params(z1)
    normal = torch.distributions.Normal
    log_pz = normal(mean, log_std.exp()).log_prob(latents[0]).flatten(1).sum(1)
    top_mean, top_log_std = model.prior.params(3, None, x.device, x.dtype)
    log_pz = log_pz + normal(top_mean, top_log_std.exp()).log_prob(latents[1]).flatten(1).sum(1)
    expected = log_pz + logdet - 16 * math.log(32)
    g = torch.Generator().manual_seed(1)
    out = model(images, generator=g)
    torch.testing.assert_close(out.log_prob, expected)
    torch.testing.assert_close(out.bits_per_dim, -expected / (16 * math.log(2)))


def test_preprocess_quantises_and_dequantises():
    model = tiny_glow((1, 4, 4), n_bits=5)
    images = torch.arange(0, 256, 16, dtype=torch.uint8).view(1, 1, 4, 4)
    x = model.preprocess(images, dequantize=False)
    expected = torch.floor(images.double() / 8) / 32 - 0.5
    torch.testing.assert_close(x, expected)
    # Pixels in the same 5-bit bin map to the same value; dequantisation stays inside the bin.
    torch.testing.assert_close(model.preprocess(images + 7, dequantize=False), x)
    noisy = model.preprocess(images)
    assert bool(((noisy - x) >= 0).all() and ((noisy - x) < 1 / 32).all())
    # Float images in [0, 1] are read on the 8-bit grid.
    torch.testing.assert_close(model.preprocess(images.double() / 255, dequantize=False), x)
    torch.testing.assert_close(model.postprocess(x), torch.floor(images.double() / 8) * 8 / 255)


@torch.no_grad()
def _latents_and_priors(model, x):
    """Re-encode x level by level: (latent, its prior's mean, its prior's log-std) for every factored-out latent
    (under its conditional prior) and the top one (unconditional model)."""
    z, out = x, []
    for level in model.levels:
        z = squeeze2d(z)
        for step in level.steps:
            z, _ = step(z)
        if level.split is not None:
            z, z2, _ = level.split(z)
            out.append((z2, *level.split.prior_params(z)))
    out.append((z, *model.prior.params(x.shape[0], None, z.device, z.dtype)))
    return out


def test_temperature_zero_gives_prior_means():
    model = tiny_glow((3, 8, 8), K=2, L=3)
    x = model.decode([None] * 3, temperature=0.0, n=2)
    for z, mean, _ in _latents_and_priors(model, x):  # every latent equals its (conditional) prior mean
        torch.testing.assert_close(z, mean, rtol=1e-8, atol=1e-8)


def test_sample_shapes_range_and_generator():
    model = tiny_glow((3, 8, 8), dtype=torch.float32)
    s1 = model.sample(5, temperature=0.7, generator=torch.Generator().manual_seed(3))
    s2 = model.sample(5, temperature=0.7, generator=torch.Generator().manual_seed(3))
    assert s1.shape == (5, 3, 8, 8) and s1.dtype == torch.float32
    assert bool((s1 >= 0).all() and (s1 <= 1).all())
    torch.testing.assert_close(s1, s2)


@pytest.mark.filterwarnings("ignore:.* encountered in:RuntimeWarning")  # numpy's, from the Triton interpreter
@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_samples_whose_inverse_overflows_are_nan_images_with_a_warning(backend, kernel_device, tmp_path):
    """Class 1's top prior has log-std 100: exp(100) overflows fp32, so its samples are infinite before the inverse
    flow even starts. They come back as all-NaN images with a warning that counts them (clamping gave them
    saturated pixels that passed for an image); class 0's samples are untouched, and a grid draws the NaN black."""
    from PIL import Image

    from glowfast.images import save_grid

    with torch.device("cpu"):  # the same model on any device (kernel_device makes CUDA the default on a GPU)
        model = tiny_glow((1, 8, 8), n_classes=2, dtype=torch.float32)
    model = model.to(kernel_device)
    model.backend = backend
    c = model.prior.shape[0]
    healthy = model.sample(4, temperature=0.7, y=torch.zeros(4, dtype=torch.long),
                           generator=torch.Generator(kernel_device).manual_seed(1))
    with torch.no_grad():
        model.prior.class_embed.weight[c:, 1] = 100.0
    y = torch.tensor([0, 1, 0, 1])
    with pytest.warns(RuntimeWarning, match=r"^2 of 4 images have non-finite values in model space"):
        s = model.sample(4, temperature=0.7, y=y, generator=torch.Generator(kernel_device).manual_seed(1))
    assert bool(s[1].isnan().all() and s[3].isnan().all())
    assert bool(((s[0::2] >= 0) & (s[0::2] <= 1)).all())
    torch.testing.assert_close(s[0::2], healthy[0::2])  # y=0's noise is drawn as before: rows 0 and 2 of each batch
    save_grid(s, tmp_path / "grid.png", nrow=4, min_side=8)
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGBA"))
    cell = lambda i: grid[1:9, 1 + 9 * i: 9 + 9 * i]  # noqa: E731  (8x8 cells behind a 1-pixel border)
    assert (cell(1)[..., :3] == 0).all() and (cell(1)[..., 3] == 255).all()  # black and opaque
    assert (cell(0)[..., :3] > 0).any()


def test_class_conditional_prior_and_head():
    model = tiny_glow((1, 8, 8), n_classes=3)
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 1])
    out = model(images, y)
    assert out.y_logits.shape == (4, 3)
    # The class changes only the top prior: log p differs between labels once class_embed is non-zero.
    g = torch.Generator().manual_seed(0)
    lp0 = model.log_prob(images, torch.zeros(4, dtype=torch.long), generator=g)
    g = torch.Generator().manual_seed(0)
    lp1 = model.log_prob(images, torch.ones(4, dtype=torch.long), generator=g)
    assert not torch.allclose(lp0, lp1)
    samples = model.sample(2, y=torch.tensor([2, 0]))
    assert samples.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="class-conditional"):
        model(images)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 3\)"):
        model(images, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(TypeError, match="integer"):
        model(images, torch.zeros(4))


def test_actnorm_initialises_on_first_training_batch():
    model = Glow((3, 8, 8), K=2, L=2, hidden_channels=8)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    model(images, generator=torch.Generator().manual_seed(5))
    assert all(bool(step.actnorm.initialized) for step in model.steps())
    x = squeeze2d(model.preprocess(images, generator=torch.Generator().manual_seed(5)))
    y, _ = model.levels[0].steps[0].actnorm(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(12), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(12), atol=1e-4, rtol=0)


def test_training_reduces_bits_per_dim():
    torch.manual_seed(0)
    model = Glow((1, 4, 4), K=2, L=1, hidden_channels=16)
    images = (torch.rand(64, 1, 4, 4) < 0.5).to(torch.uint8) * 255  # binary images: easy to model
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model(images).bits_per_dim.mean().item()
    for _ in range(80):
        loss = model(images).bits_per_dim.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.5


# ------------------------------------------------------------------------------------------- bad input
def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="not divisible by 2\\^L"):
        Glow((3, 12, 12), K=1, L=3)
    with pytest.raises(ValueError, match="coupling must be one of"):
        Glow((3, 8, 8), K=1, L=1, coupling="spline")
    with pytest.raises(ValueError, match="permutation must be one of"):
        Glow((3, 8, 8), K=1, L=1, permutation="random")
    with pytest.raises(ValueError, match="backend must be one of"):
        Glow((3, 8, 8), K=1, L=1, backend="cuda")
    with pytest.raises(ValueError, match="n_bits"):
        Glow((3, 8, 8), K=1, L=1, n_bits=9)
    with pytest.raises(ValueError, match="image_shape"):
        Glow((8, 8), K=1, L=1)


@pytest.mark.parametrize(
    "images,error,match",
    [
        (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), ValueError, "channels|shape"),
        (torch.zeros(2, 3, 6, 8, dtype=torch.uint8), ValueError, "shape"),
        (torch.zeros(3, 8, 8, dtype=torch.uint8), ValueError, "3-D"),
        (torch.full((2, 3, 8, 8), float("nan")), ValueError, "non-finite"),
        (torch.full((2, 3, 8, 8), float("inf")), ValueError, "non-finite"),
        (torch.full((2, 3, 8, 8), 2.0), ValueError, r"\[0, 1\]"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.int32), TypeError, "dtype"),
    ],
    ids=["channels", "spatial", "3d", "nan", "inf", "range", "int32"],
)
def test_bad_images(images, error, match):
    model = Glow((3, 8, 8), K=1, L=2, hidden_channels=8)
    with pytest.raises(error, match=match):
        model(images)


def test_bad_continuous_input_to_encode():
    model = tiny_glow((3, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        model.encode(torch.zeros(2, 4, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-finite"):
        model.encode(torch.full((2, 3, 8, 8), float("nan"), dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        model.encode(torch.zeros(2, 3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="expected 2 latents"):
        model.decode([None])
    with pytest.raises(ValueError, match="pass n"):
        model.decode([None, None])


def test_images_that_require_grad_are_refused_with_the_way_to_the_input_gradient():
    """Quantisation has a zero gradient: log_prob's x.grad was silently all zeros. The error names the route,
    model.log_density on model-space values (it named encode, whose outputs leave out the split priors' log p(z2 |
    z1): no log p could be built from them, found by a user-study audit). That route is the log-likelihood forward
    reports, and its gradient is the density's (gradcheck: central differences, float64)."""
    model = tiny_glow((3, 8, 8), n_classes=3).double()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 2])
    model(x, y)  # ActNorm init
    with pytest.raises(ValueError, match="require grad.*model.log_density"):
        model(x.clone().requires_grad_(True), y)
    with torch.no_grad():
        model(x.clone().requires_grad_(True), y)  # no gradient asked for: fine

    gen = torch.Generator().manual_seed(5)
    xm = model.preprocess(x, generator=gen)
    expected = model(x, y, generator=torch.Generator().manual_seed(5)).log_prob  # the same noise
    offset = math.prod(model.image_shape) * math.log(model.n_bins)
    torch.testing.assert_close(model.log_density(xm, y) - offset, expected, rtol=1e-12, atol=1e-9)
    assert not torch.allclose(model.log_density(xm, y), model.log_density(xm, torch.tensor([1, 1])))
    assert torch.autograd.gradcheck(lambda v: model.log_density(v, y), xm.clone().requires_grad_(True))
    with pytest.raises(ValueError, match="non-finite"):
        model.log_density(torch.full_like(xm, float("nan")))
    with pytest.raises(ValueError, match="model expects"):
        model.log_density(xm[:, :, :4])


def test_forward_traces_as_one_graph_without_breaks():
    # No host sync per flow step (ActNorm's init flag, finite checks): torch.compile sees one graph.
    import torch._dynamo as dynamo

    model = Glow((1, 8, 8), K=2, L=2, hidden_channels=8)
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    model(images)  # data-dependent ActNorm init, eagerly
    dynamo.reset()
    explained = dynamo.explain(lambda x: model(x).bits_per_dim.mean())(images)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


# ---------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(n_bits=4.5), TypeError, "n_bits must be an integer"),
    (dict(n_bits=True), TypeError, "n_bits must be an integer"),
    (dict(n_bits=9), ValueError, "n_bits must be in 1..8"),
    (dict(hidden_channels=0), ValueError, "hidden_channels must be >= 1"),
    (dict(K=1.5), TypeError, "K must be an integer"),
    (dict(L=0), ValueError, "L must be >= 1"),
    (dict(n_classes=2.5), TypeError, "n_classes"),
    (dict(n_classes=1), ValueError, "n_classes"),
    (dict(image_shape=(3, 8.5, 8)), TypeError, "image_shape"),
    (dict(image_shape=(3, 0, 0)), ValueError, "image_shape"),
    (dict(image_shape=(3, -8, -8)), ValueError, "image_shape"),
])
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    args = dict(image_shape=(3, 8, 8), K=1, L=2, hidden_channels=4) | kwargs
    with pytest.raises(error, match=match):
        Glow(**args)


def test_decode_rejects_bad_latents_and_temperatures():
    model = tiny_glow((3, 8, 8), K=1, L=2)  # latents (B, 6, 4, 4) and (B, 24, 2, 2)
    latents, _ = model.encode(model.preprocess(torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)))
    assert [tuple(z.shape[1:]) for z in latents] == model.latent_shapes
    nan = torch.full_like(latents[0], float("nan"))
    with pytest.raises(ValueError, match=r"latent 0 .*non-finite"):  # a factored-out latent, not only the top
        model.decode([nan, latents[1]])
    with pytest.raises(ValueError, match=r"top latent must have shape \(B, 24, 2, 2\)"):
        model.decode([None, torch.zeros(2, 24, 4, 4, dtype=torch.float64)])
    with pytest.raises(ValueError, match="latent 0 .*shape"):
        model.decode([torch.zeros(2, 5, 4, 4, dtype=torch.float64), latents[1]])
    with pytest.raises(ValueError, match="batch size 3"):
        model.decode([latents[0], torch.zeros(3, 24, 2, 2, dtype=torch.float64)])
    with pytest.raises(TypeError, match="dtype torch.float32"):
        model.decode([latents[0], latents[1].float()])
    with pytest.raises(TypeError, match="torch.Tensor or None"):
        model.decode([None, [1.0]])
    with pytest.raises(TypeError, match="list"):
        model.decode(latents[1])
    for t in (float("nan"), float("inf"), -0.5, True):
        with pytest.raises(ValueError, match="temperature"):
            model.sample(2, temperature=t)
    for n, error in ((0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="n "):
            model.sample(n)
    x = model.decode(latents, temperature=0.0)  # valid input still works
    assert x.shape == (2, 3, 8, 8) and bool(torch.isfinite(x).all())


def test_encode_names_a_dtype_mismatch():
    model = tiny_glow((3, 8, 8), K=1, L=2, dtype=torch.float32)
    x = torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype torch.float64, the model's parameters are torch.float32"):
        model.encode(x)


def test_images_and_labels_on_another_device_are_named():
    """A model on one device given images or labels on another: a clear error naming both (on a GPU: CPU images
    to a CUDA model), not a failure deep inside a layer. The meta device stands in for the other one here."""
    model = Glow((1, 8, 8), K=1, L=2, hidden_channels=4, n_classes=3)
    images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    with pytest.raises(ValueError, match="images are on meta, the model is on cpu"):
        model(images.to("meta"), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="class labels y are on meta, the model is on cpu"):
        model(images, torch.zeros(2, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="class labels y are on meta, the model is on cpu"):
        model.sample(2, y=torch.zeros(2, dtype=torch.long, device="meta"))
    assert torch.isfinite(model(images, torch.zeros(2, dtype=torch.long)).log_prob).all()


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float64], ids=["model32", "model64"])
@pytest.mark.parametrize("image_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=["f16", "bf16", "f32", "f64"])
def test_float_images_k_over_255_read_as_uint8_k(image_dtype, model_dtype):
    """A float image k/255 stored in any float dtype is the 8-bit value k: for every k in 0..255 preprocess
    gives exactly what it gives for the uint8 image k. k/255 is not exact in binary (in float16 and bfloat16
    it is off by up to half a unit in the last place, i.e. < 0.5/255), so reading it back must round to the
    nearest level, not truncate."""
    model = tiny_glow((1, 4, 4), dtype=model_dtype)  # n_bits = 8: every level is its own bin
    k = torch.arange(256)
    images_u8 = k.to(torch.uint8).view(16, 1, 4, 4)
    images_f = (k.double() / 255).to(image_dtype).view(16, 1, 4, 4)
    if image_dtype == torch.float16:  # 131 of the 256 stored values lie BELOW k/255: truncating would lose them
        assert int(((images_f.double() * 255).flatten() < k).sum()) > 100
    expected = model.preprocess(images_u8, dequantize=False)
    torch.testing.assert_close(expected.flatten(), k.to(model_dtype) / 256 - 0.5, rtol=0, atol=0)
    got = model.preprocess(images_f, dequantize=False)
    assert got.dtype == model_dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # with dequantisation noise from the same generator both paths are still identical
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(model.preprocess(images_f, generator=g1), model.preprocess(images_u8, generator=g2),
                               rtol=0, atol=0)
    if image_dtype == torch.bfloat16:
        return  # bfloat16 (8 significant bits) stores values near 1 only to within ~half a level
    # a float image within a quarter level of k/255 (either side) is read as k too: nearest level, not floor
    for delta in (-0.25, 0.25):
        near = ((k.double() + delta) / 255).clamp(0, 1).to(image_dtype).view(16, 1, 4, 4)
        torch.testing.assert_close(model.preprocess(near, dequantize=False), expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- backend choice
def test_auto_backend_is_the_reference_on_cpu_and_fused_on_cuda(monkeypatch):
    """backend='auto' never sends CPU tensors through the Triton kernels (the interpreter is for tests, not
    speed): on CPU it resolves to, and computes exactly, the reference. On CUDA it picks the fused path when
    that can run. Without a GPU the CUDA half patches glowfast.fused.fused_available to report (True, ""): the
    patch stands in only for the hardware probe, the decision under test is resolve_backend's. On a GPU machine
    the real probe answers."""
    import glowfast.fused

    model = tiny_glow((1, 4, 4), dtype=torch.float32)
    ref = tiny_glow((1, 4, 4), dtype=torch.float32)
    ref.load_state_dict(model.state_dict())
    model.backend = "auto"
    assert model.resolve_backend(torch.device("cpu")) == "reference"
    assert model.resolve_backend("cpu") == "reference"
    images = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8)
    assert torch.equal(model.log_prob(images, dequantize=False), ref.log_prob(images, dequantize=False))

    if not torch.cuda.is_available():  # on a GPU machine the real probe answers
        monkeypatch.setattr(glowfast.fused, "fused_available", lambda device: (True, ""))
    assert model.resolve_backend(torch.device("cuda")) == "fused"
    assert model.resolve_backend("cuda:0") == "fused"
    assert model.resolve_backend("cpu") == "reference"  # still the reference, even where the kernels could run
    model.backend = "reference"
    assert model.resolve_backend("cuda") == "reference"  # an explicit reference is never overridden


# ------------------------------------------------------------------------------------------- class-conditional prior
def test_class_conditional_sampling_uses_the_label():
    """At temperature 0 the top latent is the top prior's mean for the given label. class_embed is set by hand
    so that label 2 adds +5 to the mean of top channel 1 (and nothing else), every other term being zero: the
    top latent must be 5 in channel 1 for y=2 and 0 everywhere for y=0, both from the prior directly and after
    decoding to an image and re-encoding it."""
    model = tiny_glow((1, 8, 8), n_classes=3)  # top latent (8, 2, 2)
    c, h, w = model.top_shape
    prior = model.prior
    with torch.no_grad():
        prior.top.zero_()
        prior.class_embed.weight.zero_()
        prior.class_embed.bias.zero_()
        prior.class_embed.weight[1, 2] = 5.0  # output row 1: the mean of channel 1; input column 2: label 2
    y = torch.tensor([2, 0])
    expected = torch.zeros(2, c, h, w, dtype=torch.float64)
    expected[0, 1] = 5.0

    top = prior.sample(2, y, temperature=0.0, dtype=torch.float64)
    torch.testing.assert_close(top, expected, rtol=0, atol=0)

    x = model.decode([None, None], y=y, temperature=0.0, n=2)
    latents, _ = model.encode(x)
    torch.testing.assert_close(latents[-1], expected, rtol=1e-9, atol=1e-9)


def test_class_logits_are_the_head_of_the_spatially_averaged_top_latent():
    """The class head reads the top latent averaged over all positions. With the head set to the identity
    (n_classes = the top latent's channels, zero bias) the logits are exactly that spatial mean."""
    model = tiny_glow((1, 8, 8), n_classes=8)  # top latent (8, 2, 2): 4 positions per channel
    with torch.no_grad():
        model.prior.class_head.weight.copy_(torch.eye(8, dtype=torch.float64))
        model.prior.class_head.bias.zero_()
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 5, 7])
    out = model(images, y, dequantize=False)
    latents, _ = model.encode(model.preprocess(images, dequantize=False))
    top = latents[-1]
    mean = (top[:, :, 0, 0] + top[:, :, 0, 1] + top[:, :, 1, 0] + top[:, :, 1, 1]) / 4
    assert not torch.allclose(mean, top[:, :, 0, 0])  # the positions really differ
    torch.testing.assert_close(out.y_logits, mean, rtol=1e-12, atol=1e-12)
    # the same head on a latent chosen by hand: channel k holds k at every position but (0, 0), which holds 0
    z = torch.arange(8, dtype=torch.float64).view(1, 8, 1, 1).expand(2, 8, 2, 2).clone()
    z[:, :, 0, 0] = 0
    torch.testing.assert_close(model.prior.class_logits(z), torch.arange(8, dtype=torch.float64).expand(2, 8) * 0.75,
                               rtol=1e-15, atol=1e-15)


# ------------------------------------------------------------------------------------------- likelihood wrappers
def test_log_prob_and_bits_per_dim_without_dequantisation_are_deterministic():
    """dequantize=False evaluates the density at the bin corners: no noise is drawn, so repeated calls are
    bit-identical, equal the forward's log_prob, and bits_per_dim is -log_prob / (D ln 2)."""
    model = tiny_glow((3, 4, 4))
    images = torch.randint(0, 256, (4, 3, 4, 4), dtype=torch.uint8)
    lp1 = model.log_prob(images, dequantize=False)
    lp2 = model.log_prob(images, dequantize=False)
    assert torch.equal(lp1, lp2)
    assert torch.equal(lp1, model(images, dequantize=False).log_prob)
    # by hand: the corners' latents and log-determinant, the priors, and the 8-bit quantisation term
    x = (images.double() / 256) - 0.5  # n_bits = 8: pixel k sits at k/256 - 1/2
    latents, logdet = model.encode(x)
    normal = torch.distributions.Normal
    top_mean, top_log_std = model.prior.params(4, None, x.device, x.dtype)
    log_pz = normal(top_mean, top_log_std.exp()).log_prob(latents[1]).flatten(1).sum(1)
    z = squeeze2d(x)
    for step in model.levels[0].steps:
        z, _ = step(z)
    z1, _, _ = model.levels[0].split(z)
    mean, log_std = model.levels[0].split.prior_params(z1)
    log_pz = log_pz + normal(mean, log_std.exp()).log_prob(latents[0]).flatten(1).sum(1)
    torch.testing.assert_close(lp1, log_pz + logdet - 48 * math.log(256), rtol=1e-12, atol=1e-9)

    bpd1 = model.bits_per_dim(images, dequantize=False)
    assert torch.equal(bpd1, model.bits_per_dim(images, dequantize=False))
    torch.testing.assert_close(bpd1, -lp1 / (48 * math.log(2)), rtol=1e-14, atol=0)
    # with dequantisation the same generator seed gives the same noise, and it is a different point
    g = torch.Generator().manual_seed(4)
    noisy = model.bits_per_dim(images, generator=g)
    torch.testing.assert_close(noisy, model(images, generator=torch.Generator().manual_seed(4)).bits_per_dim,
                               rtol=0, atol=0)
    assert not torch.equal(noisy, bpd1)


# ------------------------------------------------------------------ gaps found by mutation testing (12th session)
def test_dequantisation_noise_fills_the_whole_bin_with_fewer_bits():
    """With n_bits = 5 a pixel's bin is 1/32 wide in model space; the uniform dequantisation noise must cover all of
    it (the likelihood's −D·log(n_bins) term assumes a density over the whole bin): (noisy − corner)·32 ~ U[0, 1)."""
    model = tiny_glow((1, 4, 4), n_bits=5)
    images = torch.randint(0, 256, (2000, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    corner = model.preprocess(images, dequantize=False)
    u = (model.preprocess(images, generator=torch.Generator().manual_seed(1)) - corner) * 32
    assert float(u.min()) >= 0 and float(u.max()) < 1
    assert float(u.max()) > 0.99  # 32000 draws: P(max < 0.99) = 0.99^32000
    assert float(u.mean()) == pytest.approx(0.5, abs=0.01)  # SE 0.0016
    assert float((u < 0.5).double().mean()) == pytest.approx(0.5, abs=0.015)


@torch.no_grad()
def _standardised_latents(model, temperature, n, seed):
    """decode(temperature) with a seeded generator, re-encoded level by level: (z − prior mean) / prior std of
    every latent, each under its own (conditional) prior."""
    x = model.decode([None] * len(model.levels), temperature=temperature, n=n,
                     generator=torch.Generator().manual_seed(seed))
    return [(z - mean) / log_std.exp() for z, mean, log_std in _latents_and_priors(model, x)]


def test_temperature_scales_every_priors_standard_deviation_linearly():
    """Glow's temperature T samples every latent as mean + T·std·eps (the docstring: 'temperature scales every
    prior's standard deviation'). So (z − mean)/std is T·eps: standard normal times T at every level, and for the
    same generator seed exactly T times the T = 1 draws (same eps). T = 0 and T = 1 cannot tell T from T²."""
    torch.manual_seed(0)
    # mildly random weights: non-trivial conditional priors, and a flow whose inverse stays finite at T = 1
    model = randomize_(Glow((3, 8, 8), K=2, L=3, hidden_channels=8), scale=0.05).double().eval()
    ones = _standardised_latents(model, 1.0, 200, 7)
    halves = _standardised_latents(model, 0.5, 200, 7)
    for a, b in zip(ones, halves, strict=True):
        torch.testing.assert_close(b, 0.5 * a, rtol=1e-7, atol=1e-7)
    flat1 = torch.cat([t.flatten() for t in ones])  # 200 x 192 values
    assert float(flat1.mean()) == pytest.approx(0.0, abs=0.03)
    assert float(flat1.std()) == pytest.approx(1.0, abs=0.02)
    assert float(torch.cat([t.flatten() for t in halves]).std()) == pytest.approx(0.5, abs=0.01)


# ------------------------------------------------------------------ gaps found by mutation testing (12th session)
@requires_cuda
def test_cuda_index_equal_to_the_device_count_does_not_exist():
    """Devices are cuda:0 ... cuda:n-1: the last one exists, cuda:n does not (on the machine's real devices)."""
    n = torch.cuda.device_count()
    check_device_exists(torch.device("cuda", n - 1))
    check_device_exists(torch.device("cuda"))
    with pytest.raises(RuntimeError, match=rf"^cuda:{n} does not exist: this machine has {n} CUDA device"):
        check_device_exists(torch.device("cuda", n))
