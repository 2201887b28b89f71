"""Ablations (Glow paper, Figure 3): test bits/dim against training steps for permutations and couplings."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .common import Trained, bpd_unit_note, load_split, md_table, model_summary, nll_bits_per_dim, pyplot, train

PERMUTATIONS = ("invconv", "shuffle", "reverse")
COUPLINGS = ("additive", "affine")


def _variants(ctx, kind: str):
    base = ctx.preset.ablation
    if kind == "permutation":
        return {p: replace(base, permutation=p, coupling="affine") for p in PERMUTATIONS}
    return {c: replace(base, coupling=c, permutation="invconv") for c in COUPLINGS}


def _plot(path, runs: dict[str, Trained], title: str, unit: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, t in runs.items():
        h = t.history
        steps = np.asarray(h["step"], dtype=float)
        bpd = np.asarray(h["test_bpd"], dtype=float)
        keep = steps > 0  # step 0 = the untrained model (~8 bits/dim) would squash the axis
        axes[0].plot(steps[keep], bpd[keep], marker="o", ms=3, label=label)
        axes[1].plot(np.asarray(h["wall_s"], dtype=float)[keep], bpd[keep], marker="o", ms=3, label=label)
    axes[0].set_xlabel("training steps")
    axes[1].set_xlabel("training wall time (s, evaluation excluded)")
    for ax in axes:
        ax.set_ylabel("test bits/dim")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{title}\n({unit})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_ablation(ctx, kind: str) -> tuple[dict, str]:
    specs = _variants(ctx, kind)
    runs = {name: train(spec, ctx.data_dir, ctx.device, ctx.backend, ctx.cache) for name, spec in specs.items()}
    base = ctx.preset.ablation
    te = load_split(base.dataset, "test", ctx.data_dir, base.size, n=ctx.preset.ood_n or None)
    unit = bpd_unit_note(base)
    final = {name: float(nll_bits_per_dim(t.model, te.images, ctx.device).mean()) for name, t in runs.items()}
    # compare at a step every variant reached and evaluated (a time cap can stop one variant early)
    common = set.intersection(*(set(t.history["step"]) for t in runs.values()))
    common_step = max(common) if common else None
    at_common = ({name: t.history["test_bpd"][t.history["step"].index(common_step)] for name, t in runs.items()}
                 if common_step is not None else {})
    same_steps = len({t.history.get("steps_done") for t in runs.values()}) == 1
    ranking = final if same_steps or not at_common else at_common
    best = min(ranking, key=ranking.get)
    title = (f"{kind} ablation on {base.dataset} (K={base.K}, L={base.L}, hidden={base.hidden}, batch={base.batch}, "
             f"{'additive/affine' if kind == 'coupling' else 'affine'} coupling)")
    fig = ctx.out / f"ablation_{kind}_bpd_vs_steps.png"
    _plot(fig, runs, title, unit)
    results = {
        "kind": kind, "dataset": base.dataset, "bpd_unit": unit, "n_test_images": int(te.images.shape[0]),
        "final_test_bpd": final, "best": best, "same_number_of_steps": same_steps,
        "common_step": common_step, "test_bpd_at_common_step_eval_subset": at_common,
        "curves": {name: {"step": t.history["step"], "test_bpd": t.history["test_bpd"],
                          "train_bpd": t.history["train_bpd"], "wall_s": t.history["wall_s"]}
                   for name, t in runs.items()},
        "models": {name: model_summary(t) for name, t in runs.items()},
        "figures": [fig.name],
    }
    rows = [[name, final[name], at_common.get(name, float("nan")), runs[name].history.get("steps_done"),
             f"{runs[name].history.get('s_per_step', float('nan')):.3f}",
             "yes" if runs[name].history.get("stopped_by_time_limit") else "no"] for name in runs]
    md = (f"{title}.\n\nTest {unit}, on {te.images.shape[0]} test images after the same number of steps "
          f"(curves: on {base.eval_n or 'all'} test images every {base.eval_every} steps). One seed.\n\n"
          + md_table([kind, "final test bpd", f"test bpd at step {common_step} (eval subset)", "steps",
                      "s/step", "stopped by time limit"], rows)
          + f"\n\nBest: **{best}**"
          + ("." if same_steps else f" (compared at step {common_step}, the last step every variant reached: a "
             "wall-time cap stopped some variants early, so their final numbers are not comparable).") + "\n")
    return results, md
