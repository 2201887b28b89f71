"""glowfast.ood on synthetic distributions with known answers."""

import math

import numpy as np
import pytest

from glowfast import ood


def _phi(x):
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


# ----------------------------------------------------------------------------------------------- AUROC
@pytest.mark.parametrize("d", [0.0, 0.5, 1.0, 2.0])
def test_auroc_gaussians_known_answer(d):
    # s_in ~ N(0,1), s_out ~ N(d,1): P(s_out > s_in) = Phi(d / sqrt(2)).
    rng = np.random.default_rng(1)
    n = 4000
    a = ood.auroc(rng.normal(0, 1, n), rng.normal(d, 1, n))
    expected = _phi(d / math.sqrt(2))
    # the standard error of the Mann-Whitney AUROC at n = 4000 per side is <= ~0.0065
    assert abs(a - expected) < 0.02, (a, expected)


def test_auroc_symmetry_and_complement():
    rng = np.random.default_rng(2)
    x, y = rng.normal(0, 1, 300), rng.normal(0.7, 2, 500)
    assert ood.auroc(x, y) == pytest.approx(1.0 - ood.auroc(y, x), abs=1e-12)


def test_auroc_perfect_and_reversed_separation():
    assert ood.auroc([0.0, 1.0, 2.0], [3.0, 4.0]) == 1.0
    assert ood.auroc([3.0, 4.0], [0.0, 1.0, 2.0]) == 0.0


def test_auroc_ties_count_one_half():
    assert ood.auroc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5
    # pairs (in, out): (0,1) 1, (0,2) 1, (1,1) 0.5, (1,2) 1  -> 3.5 / 4
    assert ood.auroc([0.0, 1.0], [1.0, 2.0]) == pytest.approx(0.875)
    # heavily tied integer scores against a brute-force pair count
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 5, 200).astype(float), rng.integers(1, 6, 150).astype(float)
    brute = ((b[None, :] > a[:, None]).sum() + 0.5 * (b[None, :] == a[:, None]).sum()) / (a.size * b.size)
    assert ood.auroc(a, b) == pytest.approx(brute, abs=1e-12)


def test_auroc_matches_sklearn_and_roc_curve():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(4)
    a, b = np.round(rng.normal(0, 1, 700), 1), np.round(rng.normal(0.4, 1.3, 400), 1)
    labels = np.r_[np.zeros(a.size), np.ones(b.size)]
    ref = metrics.roc_auc_score(labels, np.r_[a, b])
    assert ood.auroc(a, b) == pytest.approx(ref, abs=1e-12)
    fpr, tpr = ood.roc_curve(a, b)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("bad", [[], np.array([]), [1.0, np.nan], [np.inf], 3.0])
def test_auroc_bad_input(bad):
    with pytest.raises(ValueError):
        ood.auroc(bad, [1.0, 2.0])
    with pytest.raises(ValueError):
        ood.auroc([1.0, 2.0], bad)


# ----------------------------------------------------------------------------------------------- typicality
D = 50
C = 0.5 * D * math.log(2 * math.pi)


def gaussian_nll(n, sigma=1.0, seed=0):
    """NLL under N(0, I_D) of n samples x ~ N(0, sigma^2 I_D): C + ||x||^2 / 2 = C + sigma^2 chi2_D / 2."""
    x = np.random.default_rng(seed).normal(0.0, sigma, size=(n, D))
    return C + 0.5 * (x**2).sum(1)


def exact_epsilon(M, alpha):
    """The alpha-quantile of |mean NLL of M samples - H| with H = C + D/2: mean NLL = C + chi2_{MD} / (2M)."""
    stats = pytest.importorskip("scipy.stats")
    optimize = pytest.importorskip("scipy.optimize")
    k = M * D

    def coverage(eps):
        return stats.chi2.cdf(k + 2 * M * eps, k) - stats.chi2.cdf(max(k - 2 * M * eps, 0.0), k) - alpha

    return optimize.brentq(coverage, 1e-9, 10 * D)


@pytest.mark.parametrize("M", [1, 10, 100])
def test_typicality_epsilon_matches_chi_square(M):
    alpha = 0.95
    held = gaussian_nll(20000, seed=1)
    eps = ood.typicality_epsilon(held, C + D / 2, M, K=4000, alpha=alpha, rng=0)
    assert eps == pytest.approx(exact_epsilon(M, alpha), rel=0.08)


def test_typicality_in_distribution_flagged_at_nominal_rate():
    alpha = 0.95
    train, held, test = gaussian_nll(20000, seed=1), gaussian_nll(5000, seed=2), gaussian_nll(20000, seed=3)
    table = ood.typicality_table(train, held, test, {}, Ms=(1, 5, 25, 100), K=4000, alpha=alpha,
                                 n_batches=2000, rng=0)
    assert table["entropy_estimate"] == pytest.approx(C + D / 2, abs=0.2)  # the true entropy of N(0, I_D)
    for row in table["rows"]:
        # nominal 1 - alpha = 0.05; binomial SE at 2000 batches ~0.005, plus bootstrap/H-hat error
        assert abs(row["in_distribution_flagged"] - (1 - alpha)) < 0.03, row


def test_typicality_flags_higher_likelihood_shifted_scale():
    """x ~ N(0, 0.8^2 I): same mean, HIGHER likelihood than in-distribution data (a likelihood threshold
    misses it: AUROC < 0.5), yet outside the typical set, so the typicality test flags it as M grows."""
    alpha = 0.99
    train, held, test = gaussian_nll(20000, seed=1), gaussian_nll(5000, seed=2), gaussian_nll(10000, seed=3)
    narrow = gaussian_nll(10000, sigma=0.8, seed=4)
    wide = gaussian_nll(10000, sigma=1.2, seed=5)
    assert ood.auroc(test, narrow) < 0.2  # likelihood says "more in-distribution than the test set"
    Ms = (1, 2, 5, 10, 25, 50, 100)
    table = ood.typicality_table(train, held, test, {"narrow": narrow, "wide": wide}, Ms=Ms, K=2000,
                                 alpha=alpha, n_batches=1000, rng=0)
    rates = [row["ood_flagged"]["narrow"] for row in table["rows"]]
    assert rates[0] < 0.2  # single inputs: hard to tell
    assert rates[-1] == 1.0  # M = 100: always flagged
    assert all(b >= a - 0.05 for a, b in zip(rates, rates[1:])), rates  # (nearly) monotone in M
    assert table["rows"][-1]["ood_flagged"]["wide"] == 1.0
    for row in table["rows"]:
        assert row["in_distribution_flagged"] < 0.03
    assert table["mean_nll"]["narrow"] < table["mean_nll"]["test_in"]


def test_typicality_test_single_and_batched():
    H = 10.0
    assert ood.typicality_test([10.0, 10.2], H, 0.5) is False
    assert ood.typicality_test([12.0, 11.0], H, 0.5) is True
    assert ood.typicality_test([8.0, 9.0], H, 0.5) is True  # too likely is OOD too
    flags = ood.typicality_test(np.array([[10.0, 10.0], [11.0, 11.0], [9.0, 8.0]]), H, 0.5)
    assert flags.tolist() == [False, True, True]
    assert ood.typicality_statistic([9.0, 8.0], H) == pytest.approx(1.5)


def test_batch_means_without_replacement_uses_distinct_items():
    x = np.arange(10, dtype=float)
    m = ood.batch_means(x, 10, 5, rng=0)
    assert np.allclose(m, 4.5)  # every batch of 10 out of 10 distinct items is the whole set
    assert ood.batch_means(x, 3, 7, rng=0).shape == (7,)
    assert ood.bootstrap_batch_means(x, 20, 30, rng=0).shape == (30,)  # with replacement: M > N is fine


def test_typicality_bad_input():
    x = np.ones(10)
    with pytest.raises(ValueError):
        ood.typicality_epsilon([], 1.0, 5)
    with pytest.raises(ValueError):
        ood.typicality_epsilon(x, 1.0, 0)
    with pytest.raises(ValueError):
        ood.typicality_epsilon(x, 1.0, 2.5)
    for alpha in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            ood.typicality_epsilon(x, 1.0, 5, alpha=alpha)
    with pytest.raises(ValueError):
        ood.typicality_epsilon(x, 1.0, 5, K=0)
    with pytest.raises(ValueError):
        ood.typicality_epsilon(x, float("nan"), 5)
    with pytest.raises(ValueError):
        ood.fraction_flagged(x, 1.0, -1.0, 2)
    with pytest.raises(ValueError):
        ood.fraction_flagged([], 1.0, 1.0, 2)
    with pytest.raises(ValueError):
        ood.batch_means(x, 11, 3, replace=False)
    with pytest.raises(ValueError):
        ood.typicality_test([], 1.0, 1.0)
    with pytest.raises(ValueError):
        ood.typicality_table(x, x, x, {}, Ms=(0,))


def test_typicality_table_uses_train_for_entropy_heldout_for_epsilon_and_test_for_false_positives():
    """The three in-distribution roles of typicality_table are not interchangeable: Ĥ = mean NLL of the TRAIN
    set, ε_M from the HELD-OUT set, the false-positive rate on the TEST set. Give each set its own known
    distribution (unit-variance Gaussian scores with means 0, 1 and 3) so a swapped role shows."""
    rng = np.random.default_rng(0)
    train = rng.normal(0.0, 1.0, 20000)
    held = rng.normal(1.0, 1.0, 5000)
    test_in = rng.normal(3.0, 1.0, 5000)
    table = ood.typicality_table(train, held, test_in, {"like_train": rng.normal(0.0, 1.0, 5000)},
                                 Ms=(100,), K=2000, alpha=0.99, n_batches=500, rng=0)
    assert table["entropy_estimate"] == pytest.approx(float(np.mean(train)), abs=1e-12)
    assert table["mean_nll"]["heldout"] == pytest.approx(float(np.mean(held)), abs=1e-12)
    (row,) = table["rows"]
    # batches of 100 held-out scores have means 1 ± 0.1 and Ĥ ≈ 0, so their 0.99-quantile of |mean − Ĥ| is
    # ≈ 1 + 2.33 · 0.1; measured against Ĥ = mean(held) it would be only ≈ 2.58 · 0.1.
    assert 1.0 < row["epsilon"] < 1.5, row
    # test batches have means 3 ± 0.1, |3 − 0| > ε always; held-out batches would be flagged at ≈ 1 − α.
    assert row["in_distribution_flagged"] == 1.0, row
    # a set distributed like the training data sits at Ĥ, well inside ε: never flagged
    assert row["ood_flagged"]["like_train"] == 0.0, row


def test_fraction_flagged_batches_as_large_as_the_set_are_the_whole_set():
    """Without replacement a batch of M = N items is the whole set, so its mean is the set mean exactly:
    with Ĥ = that mean and ε = 0 no batch is flagged (|0| > 0 is false). With replacement almost every
    batch of 10 draws from 0..9 would have another mean."""
    x = np.arange(10, dtype=float)
    assert ood.fraction_flagged(x, 4.5, 0.0, 10, n_batches=200, rng=0) == 0.0
    assert ood.fraction_flagged(x, 4.5, 0.0, 10, n_batches=200, rng=0, replace=False) == 0.0
    # forcing replacement does change the batches (the same call is then flagged most of the time)
    assert ood.fraction_flagged(x, 4.5, 0.0, 10, n_batches=200, rng=0, replace=True) > 0.5


def test_bootstrap_draws_every_item_including_the_last():
    """Bootstrap batches are drawn with replacement from ALL held-out items: from [0, 1] with M = 1 both
    values appear, each about half the time."""
    means = ood.bootstrap_batch_means([0.0, 1.0], 1, 400, rng=0)
    assert set(means.tolist()) == {0.0, 1.0}
    assert 0.4 < means.mean() < 0.6
    # the same for a longer set: each of 5 items is drawn
    assert set(ood.bootstrap_batch_means(np.arange(5.0), 1, 400, rng=1).tolist()) == {0.0, 1.0, 2.0, 3.0, 4.0}


def test_typicality_flags_only_strictly_greater_than_epsilon():
    """The documented rule is |mean NLL − Ĥ| > ε (strict): a batch whose mean equals Ĥ is not flagged at
    ε = 0, and a batch exactly ε away is not flagged either."""
    H = 10.0
    assert ood.typicality_test([10.0, 10.0], H, 0.0) is False
    assert ood.typicality_test([9.0, 11.0], H, 0.0) is False  # mean 10 = Ĥ
    assert ood.typicality_test([10.5, 10.5], H, 0.5) is False  # exactly ε away (0.5 is exact in binary)
    assert ood.typicality_test([10.5, 10.5], H, 0.25) is True
    flags = ood.typicality_test(np.array([[10.0, 10.0], [9.5, 9.5], [10.0, 11.0]]), H, 0.5)
    assert flags.tolist() == [False, False, False]
    assert ood.typicality_test(np.array([[10.0, 10.0], [12.0, 12.0]]), H, 0.0).tolist() == [False, True]
    # fraction_flagged applies the same strict rule
    assert ood.fraction_flagged(np.full(8, H), H, 0.0, 4, n_batches=50, rng=0) == 0.0
    assert ood.fraction_flagged(np.full(8, H + 0.5), H, 0.5, 4, n_batches=50, rng=0) == 0.0


# ------------------------------------------------------------------ gaps found by mutation testing (12th session)
def test_bootstrap_epsilon_draws_with_replacement_even_when_the_batch_fits_in_the_set():
    """ε is a bootstrap quantile (Algorithm 1): batches of M drawn WITH replacement from the held-out scores, also
    when M <= N. From {0, 1} with M = 2 the batch mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4, so
    |mean − 1/2| is 1/2 with probability 1/2 and its 0.9-quantile is 1/2. Drawn without replacement every batch
    would be the whole set (mean 1/2) and ε would be 0."""
    means = ood.bootstrap_batch_means([0.0, 1.0], 2, 4000, rng=1)
    assert set(means.tolist()) == {0.0, 0.5, 1.0}
    frac = {v: float(np.mean(means == v)) for v in (0.0, 0.5, 1.0)}
    assert frac == pytest.approx({0.0: 0.25, 0.5: 0.5, 1.0: 0.25}, abs=0.03)  # binomial SE <= 0.008
    assert ood.typicality_epsilon([0.0, 1.0], 0.5, 2, K=400, alpha=0.9, rng=0) == 0.5


def test_typicality_statistic_of_one_batch_is_the_distance_of_its_mean():
    """|mean NLL of the batch − Ĥ| for a 1-D batch too, and the same as the batched form's row. With three
    values (0, 0, 3) the mean (1) differs from the median (0): a location other than the mean shows."""
    batch = [0.0, 0.0, 3.0]
    assert ood.typicality_statistic(batch, 0.0) == pytest.approx(1.0, abs=1e-15)
    assert ood.typicality_statistic(batch, 0.25) == pytest.approx(0.75, abs=1e-15)
    assert ood.typicality_statistic(np.array([batch]), 0.0).tolist() == pytest.approx([1.0], abs=1e-15)
    assert ood.typicality_test(batch, 0.0, 0.5) is True
    assert ood.typicality_test(batch, 1.0, 0.5) is False


# ----------------------------------------------------------------------------------------------- input complexity
def _images(kind: str, n: int, c: int = 1, size: int = 28, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.integers(0, 256, (n, c, size, size), dtype=np.uint8)
    if kind == "constant":
        return np.broadcast_to(rng.integers(0, 256, (n, c, 1, 1), dtype=np.uint8), (n, c, size, size)).copy()
    # "strokes": a few bright horizontal bars on black, like digits: structured, between the two
    x = np.zeros((n, c, size, size), dtype=np.uint8)
    for i in range(n):
        for _ in range(3):
            r, c0 = rng.integers(0, size - 3), rng.integers(0, size // 2)
            x[i, :, r: r + 3, c0: c0 + size // 3] = rng.integers(128, 256)
    return x


@pytest.mark.parametrize("c", [1, 3])
def test_png_bits_per_dim_is_a_lossless_file_of_the_image(c):
    """The measured bytes are a PNG file that decodes to the image itself (orientation and channel order
    included), and bits/dim is 8 x its length over C·H·W."""
    import io

    from PIL import Image

    images = np.maximum(_images("strokes", 3, c=c, size=12), _images("noise", 3, c=c, size=12) // 8)
    bpd = ood.png_bits_per_dim(images)
    for image, v in zip(images, bpd, strict=True):
        data = ood._png(image)
        decoded = np.asarray(Image.open(io.BytesIO(data)))
        np.testing.assert_array_equal(decoded, image[0] if c == 1 else image.transpose(1, 2, 0))
        assert v == 8 * len(data) / image.size


def test_png_complexity_orders_constant_structured_noise():
    """Uniform noise cannot be compressed: more than 8 bits/dim (PNG adds a filter byte per row and its framing).
    A constant image is nearly free (its fixed bytes, spread over 784 pixels); sparse strokes lie between."""
    const, strokes, noise = (ood.png_bits_per_dim(_images(k, 20)) for k in ("constant", "strokes", "noise"))
    assert noise.min() > 8.0 and const.max() < 1.5
    assert const.max() < strokes.min() and strokes.max() < noise.min()


def test_input_complexity_score_is_bits_per_dim_minus_png_and_only_helps_against_simpler_images():
    """S = bpd − PNG bits/dim (Serrà et al. 2020). Against an OOD set that compresses better than every
    in-distribution image (constant images vs strokes), S can only raise the AUROC of bits/dim, whatever the
    model's scores: each OOD−in pair's difference grows by the positive gap in PNG length."""
    rng = np.random.default_rng(1)
    ins, outs = _images("strokes", 50, seed=2), _images("constant", 40, seed=3)
    assert ood.png_bits_per_dim(outs).max() < ood.png_bits_per_dim(ins).min()  # the premise
    for _ in range(20):
        b_in, b_out = rng.normal(2.0, 0.5, 50), rng.normal(1.5, 0.5, 40)  # a flow that likes the constant images
        s_in, s_out = ood.input_complexity_score(b_in, ins), ood.input_complexity_score(b_out, outs)
        np.testing.assert_array_equal(s_in, b_in - ood.png_bits_per_dim(ins))
        assert ood.auroc(s_in, s_out) >= ood.auroc(b_in, b_out)


@pytest.mark.parametrize("images, error, match", [
    (np.zeros((2, 1, 4), np.uint8), ValueError, r"shape \(N, C, H, W\), got \(2, 1, 4\) \(3-D\)"),
    (np.zeros((2, 1, 4, 4), np.float32), TypeError, "must be uint8"),
    (np.zeros((2, 2, 4, 4), np.uint8), ValueError, "1 .greyscale. or 3 .RGB. channels for PNG, got 2"),
    (np.zeros((0, 1, 4, 4), np.uint8), ValueError, "empty"),
])
def test_png_bits_per_dim_bad_input(images, error, match):
    with pytest.raises(error, match=match):
        ood.png_bits_per_dim(images)


def test_input_complexity_score_bad_input():
    images = _images("strokes", 3)
    with pytest.raises(ValueError, match="2 scores for 3 images"):
        ood.input_complexity_score([1.0, 2.0], images)
    with pytest.raises(ValueError, match="non-finite"):
        ood.input_complexity_score([1.0, np.nan, 2.0], images)
