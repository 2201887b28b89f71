"""Out-of-distribution detection with likelihood models: AUROC and the typicality test.

Pure numpy functions with no model dependency. Scores follow one convention throughout: a score is a
negative log-likelihood (or bits/dim), and a HIGHER score means MORE out-of-distribution.

- :func:`auroc` — area under the ROC curve of "score > threshold ⇒ OOD", computed exactly as the
  Mann-Whitney statistic P(s_out > s_in) + ½·P(s_out = s_in).
- The typicality test of Nalisnick et al. 2019 ("Detecting Out-of-Distribution Inputs to Deep Generative
  Models Using Typicality", Algorithm 1): with Ĥ = the mean NLL on training data (an estimate of the
  model's entropy), a batch of M inputs is flagged OOD when |mean NLL of the batch − Ĥ| > ε_M^α, where
  ε_M^α is the α-quantile of |mean NLL of a bootstrap batch of size M − Ĥ| over K bootstrap batches drawn
  (with replacement) from held-out in-distribution data. In-distribution batches are then flagged at a rate
  ≈ 1 − α. Unlike a likelihood threshold, the test also flags inputs whose likelihood is too HIGH (e.g.
  SVHN under a CIFAR-10 Glow, or constant images), i.e. inputs outside the typical set.

- Input complexity (Serrà et al. 2020, "Input Complexity and Out-of-distribution Detection with
  Likelihood-based Generative Models"): simple images (constant, smooth) get high likelihood under any flow
  because they are easy to compress, whatever data the flow was trained on. The score S(x) = −log2 p(x) − L(x),
  with L(x) the length in bits of x under a generic lossless compressor, removes that part:
  :func:`png_bits_per_dim` is L(x) per dimension for PNG, :func:`input_complexity_score` is S(x) in bits/dim.

All NLLs must be in the same unit (nats or bits/dim — any affine rescaling leaves the decisions unchanged).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "auroc",
    "roc_curve",
    "batch_means",
    "bootstrap_batch_means",
    "typicality_epsilon",
    "typicality_statistic",
    "typicality_test",
    "fraction_flagged",
    "typicality_table",
    "png_bits_per_dim",
    "input_complexity_score",
]


def _as_1d(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0:
        raise ValueError(f"{name} must be a 1-D array of scores, got a scalar")
    a = a.reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return a


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha (the confidence level) must lie in (0, 1), got {alpha}")
    return alpha


def _check_positive_int(v, name: str) -> int:
    if isinstance(v, bool) or int(v) != v or int(v) < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return int(v)


def _rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


# ----------------------------------------------------------------------------------------------- AUROC
def auroc(scores_in, scores_out) -> float:
    """Exact AUROC for separating OOD (``scores_out``) from in-distribution (``scores_in``) inputs.

    Scores are e.g. −log p(x) or bits/dim: higher = more OOD. Returns the Mann-Whitney U statistic
    normalised to [0, 1]: P(s_out > s_in) + 0.5·P(s_out = s_in) over all pairs (ties count one half).
    1.0 = perfect detection, 0.5 = chance, 0.0 = the OOD set is consistently MORE likely than the
    in-distribution set (what Nalisnick et al. 2019 found for SVHN under a CIFAR-10 Glow).
    """
    s_in = _as_1d(scores_in, "scores_in")
    s_out = _as_1d(scores_out, "scores_out")
    n_in, n_out = s_in.size, s_out.size
    allv = np.concatenate([s_in, s_out])
    # average ranks (1-based) with ties sharing the mean of their ranks
    uniq, inverse, counts = np.unique(allv, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts  # 0-based first rank of each tie group
    avg_rank = starts + (counts + 1) / 2.0
    ranks = avg_rank[inverse]
    r_out = ranks[n_in:].sum()
    u = r_out - n_out * (n_out + 1) / 2.0
    return float(u / (n_in * n_out))


def roc_curve(scores_in, scores_out) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate) of "score >= t ⇒ OOD" over all thresholds t, from
    (0, 0) to (1, 1). OOD is the positive class; ``np.trapezoid(tpr, fpr) == auroc(...)``."""
    s_in = _as_1d(scores_in, "scores_in")
    s_out = _as_1d(scores_out, "scores_out")
    thresholds = np.unique(np.concatenate([s_in, s_out]))[::-1]
    s_in_sorted = np.sort(s_in)
    s_out_sorted = np.sort(s_out)
    fpr = (s_in.size - np.searchsorted(s_in_sorted, thresholds, side="left")) / s_in.size
    tpr = (s_out.size - np.searchsorted(s_out_sorted, thresholds, side="left")) / s_out.size
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


# ----------------------------------------------------------------------------------------------- typicality
def batch_means(nll, M: int, n_batches: int, rng=None, replace: bool = False) -> np.ndarray:
    """Mean NLL of ``n_batches`` random batches of size ``M`` drawn from ``nll``.

    Each batch is drawn without replacement within the batch (``replace=False``; needs M <= len(nll)) or
    with replacement (``replace=True``, the bootstrap). Batches are drawn independently of each other.
    """
    x = _as_1d(nll, "nll")
    M = _check_positive_int(M, "M")
    n_batches = _check_positive_int(n_batches, "n_batches")
    g = _rng(rng)
    if replace:
        idx = g.integers(0, x.size, size=(n_batches, M))
    else:
        if M > x.size:
            raise ValueError(f"batch size M={M} exceeds the {x.size} available scores (use replace=True)")
        # concatenated random permutations, cut into disjoint batches: within a batch no index repeats;
        # batches from different permutations are independent.
        per_perm = x.size // M
        n_perms = -(-n_batches // per_perm)
        idx = np.concatenate([g.permutation(x.size)[: per_perm * M].reshape(per_perm, M)
                              for _ in range(n_perms)])[:n_batches]
    return x[idx].mean(axis=1)


def bootstrap_batch_means(nll_heldout, M: int, K: int = 1000, rng=None) -> np.ndarray:
    """Means of K bootstrap batches (size M, drawn with replacement) of held-out in-distribution NLLs."""
    return batch_means(nll_heldout, M, K, rng=rng, replace=True)


def typicality_statistic(nll_batches, entropy_estimate: float) -> np.ndarray | float:
    """|mean NLL of each batch − Ĥ|. ``nll_batches``: (M,) for one batch or (n_batches, M)."""
    a = np.asarray(nll_batches, dtype=np.float64)
    if a.size == 0:
        raise ValueError("nll_batches is empty")
    if a.ndim == 1:
        return float(abs(a.mean() - float(entropy_estimate)))
    if a.ndim != 2:
        raise ValueError(f"nll_batches must be (M,) or (n_batches, M), got shape {a.shape}")
    return np.abs(a.mean(axis=1) - float(entropy_estimate))


def typicality_epsilon(nll_heldout, entropy_estimate: float, M: int, K: int = 1000, alpha: float = 0.99,
                       rng=None) -> float:
    """ε_M^α of Nalisnick et al. 2019, Algorithm 1.

    ``nll_heldout``: NLLs of held-out (validation) in-distribution data, not used to fit the model.
    ``entropy_estimate``: Ĥ, the mean NLL on the training data. ``M``: batch size; ``K``: number of
    bootstrap batches; ``alpha``: confidence in (0, 1) — ε is the α-quantile of |bootstrap batch mean − Ĥ|,
    so in-distribution batches are flagged at a rate ≈ 1 − α.
    """
    alpha = _check_alpha(alpha)
    K = _check_positive_int(K, "K")
    if not np.isfinite(float(entropy_estimate)):
        raise ValueError(f"entropy_estimate must be finite, got {entropy_estimate}")
    means = bootstrap_batch_means(nll_heldout, M, K, rng)
    return float(np.quantile(np.abs(means - float(entropy_estimate)), alpha))


def typicality_test(nll_batches, entropy_estimate: float, epsilon: float) -> np.ndarray | bool:
    """True where a batch is flagged OOD: |mean NLL − Ĥ| > ε. ``nll_batches``: (M,) or (n_batches, M)."""
    if not float(epsilon) >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    stat = typicality_statistic(nll_batches, entropy_estimate)
    if isinstance(stat, float):
        return bool(stat > epsilon)
    return stat > float(epsilon)


def fraction_flagged(nll, entropy_estimate: float, epsilon: float, M: int, n_batches: int = 1000,
                     rng=None, replace: bool | None = None) -> float:
    """Fraction of ``n_batches`` random batches of size M from ``nll`` that the typicality test flags.

    Batches are drawn without replacement within a batch when the set is large enough (else with
    replacement); ``replace`` forces one or the other.
    """
    x = _as_1d(nll, "nll")
    if replace is None:
        replace = M > x.size
    means = batch_means(x, M, n_batches, rng=rng, replace=replace)
    if not float(epsilon) >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    return float(np.mean(np.abs(means - float(entropy_estimate)) > float(epsilon)))


def typicality_table(nll_train, nll_heldout, nll_test_in, nll_ood: Mapping[str, Sequence[float]],
                     Ms: Sequence[int] = (1, 2, 5, 10, 25, 50, 100, 200), K: int = 1000, alpha: float = 0.99,
                     n_batches: int = 1000, rng=None) -> dict:
    """The whole experiment of Nalisnick et al. 2019 (their Table/Figure 2) for a set of batch sizes.

    Ĥ = mean(nll_train); for each M, ε_M from ``nll_heldout`` by bootstrap; then the fraction of random
    batches flagged among in-distribution test batches (false-positive rate, ≈ 1 − α) and among each OOD
    set's batches (true-positive rate). Returns a JSON-ready dict.
    """
    g = _rng(rng)
    train = _as_1d(nll_train, "nll_train")
    held = _as_1d(nll_heldout, "nll_heldout")
    test_in = _as_1d(nll_test_in, "nll_test_in")
    alpha = _check_alpha(alpha)
    H = float(train.mean())
    rows = []
    for M in Ms:
        M = _check_positive_int(M, "M")
        eps = typicality_epsilon(held, H, M, K=K, alpha=alpha, rng=g)
        row = {"M": M, "epsilon": eps,
               "in_distribution_flagged": fraction_flagged(test_in, H, eps, M, n_batches, rng=g)}
        row["ood_flagged"] = {name: fraction_flagged(_as_1d(v, name), H, eps, M, n_batches, rng=g)
                              for name, v in nll_ood.items()}
        rows.append(row)
    return {"entropy_estimate": H, "alpha": alpha, "K": K, "n_batches": n_batches,
            "mean_nll": {"train": H, "heldout": float(held.mean()), "test_in": float(test_in.mean()),
                         **{name: float(np.mean(v)) for name, v in nll_ood.items()}},
            "rows": rows}


# ----------------------------------------------------------------------------------------------- input complexity
def png_bits_per_dim(images) -> np.ndarray:
    """Each image's length as a lossless PNG (zlib level 9), in bits per dimension: 8 · bytes / (C·H·W).

    ``images``: uint8, shape (N, C, H, W) with C = 1 (greyscale) or 3 (RGB), a torch tensor or numpy array. The
    PNG container's fixed bytes (≈ 57 for these images: signature, header, framing) are included: they add the
    same amount to every image of one size, so rankings and AUROCs between sets of one size do not change, but the
    values are not comparable across image sizes.
    """
    a = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if a.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(a.shape)} ({a.ndim}-D)")
    if a.dtype != np.uint8:
        raise TypeError(f"images must be uint8 (the 8-bit pixels a compressor sees), got dtype {a.dtype}")
    n, c, h, w = a.shape
    if c not in (1, 3):
        raise ValueError(f"images must have 1 (greyscale) or 3 (RGB) channels for PNG, got {c}")
    if n == 0 or h == 0 or w == 0:
        raise ValueError(f"images is empty: shape {tuple(a.shape)}")
    return np.array([8.0 * len(_png(image)) / (c * h * w) for image in a], dtype=np.float64)


def _png(image: np.ndarray) -> bytes:
    """One uint8 (C, H, W) image, C = 1 or 3, as a PNG file (zlib level 9)."""
    from PIL import Image

    pixels = image[0] if image.shape[0] == 1 else np.ascontiguousarray(image.transpose(1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L" if image.shape[0] == 1 else "RGB").save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def input_complexity_score(bits_per_dim, images) -> np.ndarray:
    """Serrà et al.'s S(x) = −log2 p(x) − L(x) per dimension: the model's bits/dim minus the image's PNG
    bits/dim (:func:`png_bits_per_dim`). Higher = more OOD, as every score here; ``bits_per_dim[i]`` must score
    ``images[i]``."""
    bpd = _as_1d(bits_per_dim, "bits_per_dim")
    complexity = png_bits_per_dim(images)
    if complexity.size != bpd.size:
        raise ValueError(f"bits_per_dim has {bpd.size} scores for {complexity.size} images")
    return bpd - complexity
