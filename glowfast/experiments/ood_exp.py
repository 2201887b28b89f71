"""OOD detection by likelihood (AUROC, histograms, most/least likely images) and the typicality test."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import replace

import numpy as np
import torch

from .. import ood
from ..data import DatasetNotFoundError, get_dataset
from .common import (
    Trained,
    bpd_unit_note,
    dataset_available,
    load_split,
    md_table,
    model_summary,
    nll_bits_per_dim,
    pyplot,
    save_grid,
    train_holdout,
)

MS = (1, 2, 5, 10, 25, 50, 100, 200)
MIN_SET_PER_BATCH = 10  # a set of N scores gives batches of M <= N / 10


def ood_sets(ctx, in_dist: str) -> list[str]:
    """OOD sets for a model trained on `in_dist`: what is available offline + what the user has on disk."""
    if in_dist == "mnist":
        names = ["fashion-mnist", "emnist-letters"]
        names = [n for n in names if dataset_available(n, ctx.data_dir)] + ["inverted-mnist"]
    elif in_dist == "fashion-mnist":
        names = ["mnist"] if dataset_available("mnist", ctx.data_dir) else []
        names += ["inverted-fashion-mnist"]
    elif in_dist == "cifar10":
        names = ["svhn"] if dataset_available("svhn", ctx.data_dir) else []
    else:
        names = [f"inverted-{in_dist}"]
    return names + ["noise", "constant"]


class Scores:
    """Per-image bits/dim of one model on its train/held-out/test data and its OOD sets (computed once)."""

    def __init__(self, ctx, trained: Trained, n: int):
        self.ctx, self.t, self.n = ctx, trained, n
        self.spec = trained.spec
        self._cache: dict[str, tuple[np.ndarray, torch.Tensor]] = {}
        self._complexity: dict[str, np.ndarray] = {}

    def images(self, name: str) -> torch.Tensor:
        return self.get(name)[1]

    def input_complexity(self, name: str) -> np.ndarray:
        """Serrà et al.'s score, bits/dim minus PNG bits/dim (glowfast.ood.input_complexity_score), per image."""
        if name not in self._complexity:
            self._complexity[name] = ood.input_complexity_score(*self.get(name))
        return self._complexity[name]

    def nll(self, name: str) -> np.ndarray:
        return self.get(name)[0]

    def get(self, name: str):
        if name not in self._cache:
            spec, ctx = self.spec, self.ctx
            n = self.n or None
            if name in ("train", "heldout"):
                tr, held = train_holdout(spec, ctx.data_dir)
                split = tr if name == "train" else held
                if split is None:
                    raise ValueError("the model was trained without a held-out split (spec.holdout = 0)")
                k = ctx.preset.score_n_train if name == "train" else split.images.shape[0]
                g = torch.Generator().manual_seed(5)
                idx = torch.randperm(split.images.shape[0], generator=g)[:k]
                imgs = split.images[idx]
            elif name == "test":
                imgs = load_split(spec.dataset, "test", ctx.data_dir, spec.size, n=n).images
            else:
                imgs = load_split(name, "test", ctx.data_dir, spec.size, image_shape=self.t.model.image_shape,
                                  n=n if name not in ("noise", "constant") else (n or 10000)).images
            seed = {"train": 1, "heldout": 2, "test": 3}.get(name, 4)
            self._cache[name] = (nll_bits_per_dim(self.t.model, imgs, ctx.device, seed=seed), imgs)
        return self._cache[name]


def _histogram(path, scores: Scores, names: list[str], title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    allv = np.concatenate([scores.nll(n) for n in ["test", *names]])
    lo, hi = np.percentile(allv, 0.5), np.percentile(allv, 99.5)
    bins = np.linspace(lo, hi, 80)
    for n in ["test", *names]:
        v = scores.nll(n)
        label = f"{scores.spec.dataset} test (in-dist)" if n == "test" else n
        ax.hist(np.clip(v, lo, hi), bins=bins, density=True, alpha=0.45, label=f"{label} (median {np.median(v):.2f})")
    ax.set_xlabel("bits/dim  (= −log p(x) / (D ln 2); right = less likely)")
    ax.set_ylabel("density")
    ax.set_title(textwrap.fill(title, 100), fontsize=9)  # long titles were cut off at the figure edge
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _extremes(path, scores: Scores, names: list[str], k: int = 8) -> None:
    rows, labels = [], []
    for n in ["test", *names]:
        v, imgs = scores.get(n)
        order = np.argsort(v)
        pick = np.r_[order[:k], order[-k:][::-1]] if v.size >= 2 * k else np.r_[order, order[::-1]][: 2 * k]
        rows.append(imgs[torch.as_tensor(pick.copy())].float() / 255)
        labels.append(("in: " if n == "test" else "") + (scores.spec.dataset if n == "test" else n))
    save_grid(path, torch.cat(rows), 2 * k, title=f"{scores.spec.dataset} model: {k} most likely (left) | "
              f"{k} least likely (right, least first) images of each set", row_labels=labels)


def _reverse_spec(main, dataset: str, steps: int, time_limit: float):
    return replace(main, dataset=dataset, steps=steps, time_limit_s=time_limit)


def _missing(name: str, data_dir) -> str | None:
    """None when the dataset's files are under `data_dir`, else why not (the file looked for, how to get it)."""
    if dataset_available(name, data_dir):
        return None
    try:
        get_dataset(name, "test", data_dir)
    except DatasetNotFoundError as e:  # a FileNotFoundError naming the file looked for and how to get it
        return str(e)
    return None


def _models(ctx) -> tuple[list[Trained], dict[str, str]]:
    """The main model, plus (when the data is here) the reverse model (Fashion-MNIST) and a CIFAR-10 model; and the
    models asked for but skipped ({dataset: why}; --cifar without CIFAR-10's files, said once on stderr)."""
    main = ctx.main_model()
    out, skipped = [main], {}
    p = ctx.preset
    if main.spec.dataset == "mnist" and dataset_available("fashion-mnist", ctx.data_dir):
        spec = _reverse_spec(p.main, "fashion-mnist", p.reverse_steps, p.reverse_time_limit_s)
        out.append(ctx.get_model(spec))
    if ctx.args_cifar:
        why = _missing("cifar10", ctx.data_dir)
        if why is None:
            spec = replace(p.main, dataset="cifar10", size=32, L=3, steps=p.reverse_steps,
                           time_limit_s=p.reverse_time_limit_s)
            out.append(ctx.get_model(spec))
        else:
            skipped["cifar10"] = why
            if "cifar10" not in ctx.warned:  # once per process (ood and typicality both ask)
                ctx.warned.add("cifar10")
                print(f"warning: --cifar: no CIFAR-10 model trained (skipped): {why}", file=sys.stderr, flush=True)
    return out, skipped


def _skipped_md(skipped: dict[str, str]) -> str:
    return "".join(f"\n**{ds} model skipped** (asked for, data not found): {why}\n" for ds, why in skipped.items())


def run_ood(ctx) -> tuple[dict, str]:
    res, md, figs = {}, [], []
    md.append("OOD detection by likelihood (Nalisnick et al. 2019; Kirichenko et al. 2020). Score = bits/dim "
              "(−log p(x), the marginal p(x) = mean_y p(x|y) for class-conditional models); AUROC of "
              "\"higher bits/dim ⇒ OOD\" (0.5 = chance, < 0.5 = the OOD set is MORE likely than the test set). "
              "Beside it, the AUROC of Serrà et al. 2020's input-complexity score: bits/dim minus the image's "
              "length as a PNG in bits/dim (glowfast.ood.input_complexity_score), which discounts how easy an "
              "image is to compress.\n")
    models, skipped = _models(ctx)
    for t in models:
        sc = ctx.scores(t)
        names = ood_sets(ctx, t.spec.dataset)
        test = sc.nll("test")
        rows, per = [], {}
        for n in names:
            v = sc.nll(n)
            a = ood.auroc(test, v)
            a_ic = ood.auroc(sc.input_complexity("test"), sc.input_complexity(n))
            # the median beside the mean: a few OOD images far outside the training data can get astronomically
            # large bits/dim (the H200 run: Fashion-MNIST under the MNIST model, mean 3e14 bits/dim while its
            # histogram sits at 2-8), and then the mean describes those few images, not the set
            per[n] = {"auroc": a, "auroc_input_complexity": a_ic, "median_bpd": float(np.median(v)),
                      "mean_bpd": float(v.mean()), "std_bpd": float(v.std()), "n": int(v.size),
                      "fraction_more_likely_than_median_test": float((v < np.median(test)).mean())}
            rows.append([n, a, a_ic, float(np.median(v)), float(v.mean()), int(v.size)])
        ds = t.spec.dataset
        fh, fe = ctx.out / f"ood_hist_{ds}.png", ctx.out / f"ood_extremes_{ds}.png"
        _histogram(fh, sc, names, f"{ds}-trained Glow: bits/dim of its test set and OOD sets "
                                  f"({bpd_unit_note(t.spec)})")
        _extremes(fe, sc, names)
        figs += [fh.name, fe.name]
        res[ds] = {"test_bpd_mean": float(test.mean()), "test_bpd_median": float(np.median(test)),
                   "n_test": int(test.size), "bpd_unit": bpd_unit_note(t.spec),
                   "ood": per, "model": model_summary(t), "figures": [fh.name, fe.name]}
        md.append(f"## Trained on {ds}\n\nTest bits/dim {test.mean():.4f} on {test.size} test images "
                  f"({bpd_unit_note(t.spec)}).\n\n"
                  + md_table(["OOD set", "AUROC (−log p)", "AUROC (input complexity)", "median bits/dim",
                              "mean bits/dim", "n"], rows) + "\n")
    out = {"models": res, "figures": figs}
    if skipped:
        out["skipped"] = skipped
    return out, "\n".join(md) + _skipped_md(skipped)


def run_typicality(ctx, alpha: float = 0.99) -> tuple[dict, str]:
    """The main model's test (top-level keys), plus the same for the other models of `ood` (the reverse
    Fashion-MNIST model, whose likelihood ranks MNIST above its own test set)."""
    models, skipped = _models(ctx)
    results, md = _typicality_one(ctx, models[0], alpha, "")
    results["other_models"] = {}
    for t in models[1:]:
        if t.spec.holdout <= 0:
            continue
        r, m = _typicality_one(ctx, t, alpha, f"_{t.spec.dataset}")
        results["other_models"][t.spec.dataset] = r
        results["figures"] += r["figures"]
        md += f"\n## Trained on {t.spec.dataset}\n\n" + m
    if skipped:
        results["skipped"] = skipped
    return results, md + _skipped_md(skipped)


def _typicality_one(ctx, t: Trained, alpha: float, suffix: str) -> tuple[dict, str]:
    sc = ctx.scores(t)
    names = ood_sets(ctx, t.spec.dataset)
    p = ctx.preset
    test = sc.nll("test")
    note = ""
    if t.spec.holdout > 0:
        held = sc.nll("heldout")
    else:  # e.g. a glowfast.train checkpoint trained on the whole training split: split the test set
        perm = np.random.default_rng(0).permutation(test.size)
        held, test = test[perm[: test.size // 2]], test[perm[test.size // 2:]]
        note = (" The model was trained on the whole training split, so ε is bootstrapped on a random half of "
                "the test set and the other half gives the in-distribution batches.")
    # Batches of one finite set share its mean: with M near the set's size the "fraction flagged" measures that
    # one mean, not the test's rate (M = 200 of 256 test images gave rates of 0 or 1 in 78% of simulated
    # repeats). Keep M at most a tenth of every scored set, so that batches are nearly independent.
    n_min = min(test.size, *(sc.nll(n).size for n in names))
    ms = [m for m in MS if MIN_SET_PER_BATCH * m <= n_min]
    dropped = [m for m in MS if m not in ms]
    if dropped:
        note += (f" Batch sizes {dropped} are left out: they need at least {MIN_SET_PER_BATCH}× as many scored "
                 f"images per set (the smallest set has {n_min}).")
    table = ood.typicality_table(sc.nll("train"), held, test, {n: sc.nll(n) for n in names}, Ms=ms,
                                 K=p.typicality_K, alpha=alpha, n_batches=p.typicality_batches, rng=0)
    aurocs = {n: ood.auroc(test, sc.nll(n)) for n in names}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(ms, [r["in_distribution_flagged"] for r in table["rows"]], "k--o", ms=3,
            label=f"{t.spec.dataset} test (false positives)")
    for n in names:
        ax.plot(ms, [r["ood_flagged"][n] for r in table["rows"]], "-o", ms=3, label=n)
    ax.axhline(1 - alpha, color="gray", lw=0.8, ls=":", label=f"nominal 1 − α = {1 - alpha:.2f}")
    ax.set_xscale("log")
    ax.set_xlabel("batch size M")
    ax.set_ylabel("fraction of batches flagged OOD")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"typicality test (Nalisnick et al. 2019), {t.spec.dataset}-trained Glow, α = {alpha}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    f = ctx.out / f"typicality_flagged_vs_M{suffix}.png"
    fig.savefig(f, dpi=120)
    plt.close(fig)
    results = {"in_distribution": t.spec.dataset, "alpha": alpha, "heldout_source": "test half" if note else
               "held-out end of the training split", "Ms": ms, "table": table,
               "auroc_single_input_likelihood": aurocs,
               "n": {"train_for_entropy": int(sc.nll("train").size), "heldout": int(held.size),
                     "test": int(test.size), **{n: int(sc.nll(n).size) for n in names}},
               "bpd_unit": bpd_unit_note(t.spec), "figures": [f.name],
               "model": ctx.main_summary() if not suffix else model_summary(t)}
    rows = [[r["M"], r["epsilon"], r["in_distribution_flagged"]] + [r["ood_flagged"][n] for n in names]
            for r in table["rows"]]
    md = (f"Typicality test (Nalisnick et al. 2019, Algorithm 1) for a {t.spec.dataset}-trained Glow. "
          f"Ĥ = mean bits/dim of {sc.nll('train').size} training images = {table['entropy_estimate']:.4f}; "
          f"ε_M = the α = {alpha} quantile of |bootstrap batch mean − Ĥ| over K = {p.typicality_K} bootstrap "
          f"batches of {held.size} held-out in-distribution images (never trained on); each cell = "
          f"fraction of {p.typicality_batches} random batches of size M flagged (|mean − Ĥ| > ε_M). "
          f"In-distribution column: false-positive rate (nominal {1 - alpha:.2f}). Units: bits/dim.{note}\n\n"
          + md_table(["M", "ε_M", f"{t.spec.dataset} test"] + names, rows)
          + "\n\nSingle-input likelihood AUROC for comparison: "
          + ", ".join(f"{n}: {a:.3f}" for n, a in aurocs.items()) + "\n")
    return results, md
