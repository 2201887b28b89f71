"""Samples at several temperatures, latent interpolation, and attribute (class) manipulation."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..evaluate import full_fp32
from .common import (
    bpd_unit_note,
    class_log_likelihoods,
    load_split,
    md_table,
    nll_bits_per_dim,
    save_grid,
    train_holdout,
)

TEMPERATURES = (0.0, 0.5, 0.7, 0.8, 1.0)
STRENGTHS = (-0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
# (source class, target class) pairs for 10-class digit datasets: visually related digits
DIGIT_PAIRS = ((1, 7), (3, 8), (4, 9), (5, 6), (0, 6), (7, 2))


def _finite(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the samples, each one whose inverse overflowed -- a NaN image from `Glow.postprocess`, e.g. of an
    under-trained flow -- set to 0 so grids draw it black; the mask of the samples that did not overflow)."""
    return torch.nan_to_num(x, nan=0.0), torch.isfinite(x).flatten(1).all(1)


def _to_uint8(x01: torch.Tensor) -> torch.Tensor:
    return torch.round(x01.clamp(0, 1) * 255).to(torch.uint8)


@torch.no_grad()
def encode_images(model, images: torch.Tensor, device, batch_size: int = 500) -> list[torch.Tensor]:
    """uint8 images -> latents (one tensor per level, on CPU), encoding the centre of each pixel's bin. In full
    fp32 (no TF32 on a GPU), like decode_images: decoding the latents gives the images back exactly."""
    model.eval()
    outs = []
    with full_fp32():
        for i in range(0, images.shape[0], batch_size):
            x = images[i: i + batch_size].to(device)
            xc = model.preprocess(x, dequantize=False) + 0.5 / model.n_bins
            z, _ = model.encode(xc)
            outs.append([t.cpu() for t in z])
    return [torch.cat([o[k] for o in outs]) for k in range(len(outs[0]))]


@torch.no_grad()
def decode_images(model, latents: list[torch.Tensor], device) -> torch.Tensor:
    """Latents (all levels given) -> floats in [0, 1] (CPU); in full fp32, as encode_images."""
    with full_fp32():
        x = model.decode([z.to(device) for z in latents])
    return model.postprocess(x).cpu()


@torch.no_grad()
def generative_classifier(model, images: torch.Tensor, device, batch_size: int = 500) -> np.ndarray:
    """p(y | x) ∝ p(x | y) of a class-conditional model (uniform class prior), (N, n_classes)."""
    model.eval()
    g = torch.Generator(device=device).manual_seed(0)
    probs = []
    for i in range(0, images.shape[0], batch_size):
        xc = model.preprocess(images[i: i + batch_size].to(device), dequantize=True, generator=g)
        probs.append(torch.softmax(class_log_likelihoods(model, xc).double(), 1).cpu())
    return torch.cat(probs).numpy()


def run_samples(ctx) -> tuple[dict, str]:
    t = ctx.main_model()
    model, spec = t.model, t.spec
    nc = model.n_classes
    g = torch.Generator(device=ctx.device).manual_seed(0)
    n = ctx.preset.grid_n
    nrow = int(math.isqrt(n))
    figs, per_t = [], {}
    for T in TEMPERATURES:
        y = (torch.arange(n, device=ctx.device) % nc) if nc else None
        x, ok = _finite(model.sample(n, temperature=T, y=y, generator=g).cpu())
        f = ctx.out / f"samples_T{T:.1f}.png"
        save_grid(f, x, nrow, title=f"{spec.dataset} samples, T = {T}" + (" (labels cycle 0..9)" if nc else ""))
        figs.append(f.name)
        # statistics of the samples the model produced: an overflowed one is no image (its black stand-in would
        # be scored and averaged as if the model had drawn it)
        good = x[ok]
        bpd = nll_bits_per_dim(model, _to_uint8(good), ctx.device) if len(good) else np.array([math.nan])
        per_t[str(T)] = {"figure": f.name, "mean_bpd_of_samples": float(bpd.mean()),
                         "fraction_nonfinite": float((~ok).float().mean()),
                         "pixel_mean": float(good.mean()) if len(good) else math.nan,
                         "pixel_std": float(good.std()) if len(good) > 1 else math.nan}
    # all temperatures side by side, same labels (one row per temperature)
    k = min(nrow * 2, 16)
    rows = []
    for T in TEMPERATURES:
        g2 = torch.Generator(device=ctx.device).manual_seed(1)
        y = (torch.arange(k, device=ctx.device) % nc) if nc else None
        rows.append(_finite(model.sample(k, temperature=T, y=y, generator=g2).cpu())[0])
    f = ctx.out / "samples_by_temperature.png"
    save_grid(f, torch.cat(rows), k, title="samples by temperature (rows), same noise seed",
              row_labels=[f"T={T}" for T in TEMPERATURES])
    figs.append(f.name)
    per_class = {}
    if nc:
        for T in (0.7, 1.0):
            m = ctx.preset.per_class
            y = torch.arange(nc, device=ctx.device).repeat_interleave(m)
            x, ok = _finite(model.sample(nc * m, temperature=T, y=y, generator=g).cpu())
            f = ctx.out / f"samples_per_class_T{T:.1f}.png"
            save_grid(f, x, m, title=f"class-conditional samples, T = {T} (row = class)",
                      row_labels=[str(c) for c in range(nc)])
            figs.append(f.name)
            right = (generative_classifier(model, _to_uint8(x[ok]), ctx.device).argmax(1) == y.cpu()[ok].numpy()
                     if bool(ok.any()) else np.array([math.nan]))  # the samples that did not overflow
            per_class[str(T)] = {"figure": f.name, "fraction_classified_as_conditioning_class": float(right.mean())}
    results = {"temperatures": per_t, "per_class": per_class, "model": ctx.main_summary(),
               "bpd_unit": bpd_unit_note(spec), "figures": figs}
    rows = [[T, per_t[str(T)]["mean_bpd_of_samples"], per_t[str(T)]["pixel_std"],
             per_t[str(T)]["fraction_nonfinite"]] for T in TEMPERATURES]
    md = (f"Samples of the class-conditional {spec.dataset} model at temperatures {TEMPERATURES} (every prior's "
          "standard deviation is scaled by T, split priors included). Lower T trades diversity for quality.\n\n"
          + md_table(["T", "mean bits/dim of the samples (model's own marginal)", "pixel std",
                     "fraction of samples that overflowed (shown black; left out of the other columns)"], rows)
          + "\n")
    if per_class:
        md += "\nFraction of class-conditional samples that the model's own generative classifier " \
              "(argmax_y p(x|y)) assigns to the conditioning class: " + ", ".join(
                  f"T={T}: {v['fraction_classified_as_conditioning_class']:.3f}" for T, v in per_class.items()) + "\n"
    return results, md


def _class_indices(labels: torch.Tensor, c: int, k: int, seed: int = 0) -> torch.Tensor:
    idx = torch.nonzero(labels == c).flatten()
    g = torch.Generator().manual_seed(seed + c)
    return idx[torch.randperm(idx.numel(), generator=g)[:k]]


def run_interpolation(ctx) -> tuple[dict, str]:
    t = ctx.main_model()
    model, spec = t.model, t.spec
    te = load_split(spec.dataset, "test", ctx.data_dir, spec.size)
    classes = sorted(int(c) for c in te.labels.unique())
    S = ctx.preset.interp_steps
    ts = torch.linspace(0, 1, S)
    rows, used, recon_err = [], [], 0.0
    path_bpd = np.zeros(S)
    for c in classes:
        idx = _class_indices(te.labels, c, 2)
        if idx.numel() < 2:
            continue
        z = encode_images(model, te.images[idx], ctx.device)
        zs = [torch.stack([(1 - a) * zl[0] + a * zl[1] for a in ts]) for zl in z]
        x = decode_images(model, zs, ctx.device)
        recon_err = max(recon_err, float((x[[0, -1]] - te.images[idx].float() / 255).abs().max()))
        path_bpd += nll_bits_per_dim(model, _to_uint8(x), ctx.device)
        rows.append(x)
        used.append([c, int(idx[0]), int(idx[1])])
    path_bpd /= max(1, len(rows))
    f = ctx.out / "interpolation.png"
    save_grid(f, torch.cat(rows), S, title="linear interpolation in latent space (all levels) between two test "
              "images of each class", row_labels=[str(u[0]) for u in used],
              col_labels=[f"{a:.2f}" for a in ts.tolist()])
    # across classes: consecutive classes' first images
    cross = []
    for a, b in zip(classes, classes[1:] + classes[:1]):
        ia, ib = _class_indices(te.labels, a, 1), _class_indices(te.labels, b, 1)
        z = encode_images(model, torch.cat([te.images[ia], te.images[ib]]), ctx.device)
        cross.append(decode_images(model, [torch.stack([(1 - s) * zl[0] + s * zl[1] for s in ts]) for zl in z],
                                   ctx.device))
    f2 = ctx.out / "interpolation_across_classes.png"
    save_grid(f2, torch.cat(cross), S, title="interpolation between test images of consecutive classes",
              row_labels=[f"{a}->{b}" for a, b in zip(classes, classes[1:] + classes[:1])])
    results = {"pairs": [{"class": u[0], "test_index_a": u[1], "test_index_b": u[2]} for u in used],
               "t": ts.tolist(), "mean_bpd_along_path": path_bpd.tolist(),
               "max_abs_reconstruction_error_endpoints": recon_err, "model": ctx.main_summary(),
               "bpd_unit": bpd_unit_note(spec), "figures": [f.name, f2.name]}
    md = ("Linear interpolation z(t) = (1 − t) z_a + t z_b of the latents of every level between two test images "
          "of the same class (endpoints are exact reconstructions: max |error| = "
          f"{recon_err:.2e} on the [0, 1] pixel scale).\n\n"
          + md_table(["t", "mean bits/dim of the interpolants"], [[a, b] for a, b in zip(ts.tolist(), path_bpd)])
          + "\n")
    return results, md


def run_attributes(ctx) -> tuple[dict, str]:
    t = ctx.main_model()
    model, spec = t.model, t.spec
    te = load_split(spec.dataset, "test", ctx.data_dir, spec.size, n=ctx.preset.ood_n or None)
    # The class means come from training images (as in the Glow paper), so that the edited test images are
    # not part of the statistics that move them.
    tr, _ = train_holdout(spec, ctx.data_dir)
    n_means = min(ctx.preset.score_n_train, tr.images.shape[0])
    pick = torch.randperm(tr.images.shape[0], generator=torch.Generator().manual_seed(5))[:n_means]
    tr_labels = tr.labels[pick]
    z_train = encode_images(model, tr.images[pick], ctx.device)
    classes = sorted(set(int(c) for c in te.labels.unique()) & set(int(c) for c in tr_labels.unique()))
    means = {c: [z[tr_labels == c].mean(0) for z in z_train] for c in classes}
    del z_train
    z_all = encode_images(model, te.images, ctx.device)
    pairs = [p for p in DIGIT_PAIRS if p[0] in means and p[1] in means] if len(classes) == 10 else \
        [(classes[0], classes[1])]
    n_show = 5
    n_stat = 64
    table, figs = {}, []
    for src, dst in pairs:
        delta = [b - a for a, b in zip(means[src], means[dst])]
        idx = torch.nonzero(te.labels == src).flatten()[:n_stat]
        rows, frac_dst, frac_src = [], [], []
        for alpha in STRENGTHS:
            zs = [z[idx] + alpha * d for z, d in zip(z_all, delta)]
            x = decode_images(model, zs, ctx.device)
            rows.append(x[:n_show])
            if model.n_classes:
                pred = generative_classifier(model, _to_uint8(x), ctx.device).argmax(1)
                frac_dst.append(float((pred == dst).mean()))
                frac_src.append(float((pred == src).mean()))
        # figure: one row per test image, one column per strength
        grid = torch.stack(rows, 1).reshape(-1, *rows[0].shape[1:])
        f = ctx.out / f"attribute_{src}_to_{dst}.png"
        save_grid(f, grid, len(STRENGTHS), title=f"z + a (mean z[{dst}] - mean z[{src}]) on test images of {src}",
                  col_labels=[f"a={a}" for a in STRENGTHS])
        figs.append(f.name)
        table[f"{src}->{dst}"] = {"n_images": int(idx.numel()), "strengths": list(STRENGTHS),
                                  "fraction_classified_as_target": frac_dst,
                                  "fraction_classified_as_source": frac_src, "figure": f.name}
    results = {"pairs": table, "n_train_images_for_means": n_means,
               "model": ctx.main_summary(), "figures": figs,
               "classifier": "the model's own generative classifier argmax_y p(x | y)" if model.n_classes else None}
    md = ("Attribute manipulation (Glow §5.3): the direction Δ = mean latent of class *dst* − mean latent of class "
          f"*src* ({n_means} training images, every level), added with strength a to the latents of test images of "
          "class *src*. "
          "Columns of the figures are strengths.\n\n")
    if model.n_classes:
        md += "Fraction of manipulated images classified as *dst* by the model's generative classifier:\n\n"
        md += md_table(["pair"] + [f"a={a}" for a in STRENGTHS],
                       [[k] + [f"{v:.2f}" for v in r["fraction_classified_as_target"]] for k, r in table.items()])
        md += "\n"
    return results, md
