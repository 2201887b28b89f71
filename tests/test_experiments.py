"""Every experiment command end to end in the tiny config on CPU (digits + synthetic OOD sets, no download)."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import glowfast.experiments.cli as cli
from glowfast.experiments import EXPERIMENTS, main

from helpers import BEYOND, BEYOND_MESSAGE

PROVENANCE_KEYS = {"command", "git_commit", "device", "torch", "date"}

EXPECTED = {
    "ablation-permutation": ("ablation_permutation_bpd_vs_steps.png", {"final_test_bpd", "curves", "best", "models"}),
    "ablation-coupling": ("ablation_coupling_bpd_vs_steps.png", {"final_test_bpd", "curves", "best", "models"}),
    "samples": ("samples_T0.7.png", {"temperatures", "per_class", "model"}),
    "interpolation": ("interpolation.png", {"pairs", "t", "mean_bpd_along_path",
                                            "max_abs_reconstruction_error_endpoints"}),
    "attributes": ("attribute_1_to_7.png", {"pairs", "model"}),
    "ood": ("ood_hist_digits.png", {"models"}),
    "typicality": ("typicality_flagged_vs_M.png", {"table", "alpha", "Ms", "auroc_single_input_likelihood"}),
}

# No time caps: step counts must not depend on how loaded the machine is.
TINY = ["--config", "tiny", "--steps", "20", "--time-limit", "1e9", "--device", "cpu", "--backend", "reference"]


# one pytest-xdist worker for this module (gpu_check.sh runs the suite with --dist loadgroup): its module-scoped fixture
# is expensive and would otherwise be rebuilt by every worker that gets one of its tests
pytestmark = pytest.mark.xdist_group("experiments")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    empty = tmp_path_factory.mktemp("no-data")  # no MNIST here: the tiny config falls back to digits
    assert main(["all", *TINY, "--data-dir", str(empty), "--out", str(root)]) == 0
    return root, empty


def _load(folder: Path) -> dict:
    assert (folder / "results.md").is_file()
    data = json.loads((folder / "results.json").read_text())
    assert PROVENANCE_KEYS <= set(data["provenance"])
    md = (folder / "results.md").read_text()
    for key in PROVENANCE_KEYS:
        assert f"| {key} |" in md
    return data


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_outputs(tiny_run, name):
    root, _ = tiny_run
    folder = root / name
    fig, keys = EXPECTED[name]
    data = _load(folder)
    assert data["experiment"] == name and data["config"] == "tiny"
    assert keys <= set(data), set(data)
    assert (folder / fig).is_file() and (folder / fig).stat().st_size > 1000
    for f in data.get("figures", []):
        assert (folder / f).is_file()
    assert any("digits" in n for n in data["notes"])


def test_ablation_contents(tiny_run):
    root, _ = tiny_run
    perm = json.loads((root / "ablation-permutation" / "results.json").read_text())
    assert set(perm["final_test_bpd"]) == {"invconv", "shuffle", "reverse"}
    for curve in perm["curves"].values():
        assert curve["step"][0] == 0 and curve["step"][-1] == 20
        assert len(curve["step"]) == len(curve["test_bpd"])
    coup = json.loads((root / "ablation-coupling" / "results.json").read_text())
    assert set(coup["final_test_bpd"]) == {"additive", "affine"}
    # the affine/invconv model is shared by both ablations (trained once)
    assert coup["models"]["affine"]["cached"]


def test_generative_contents(tiny_run):
    root, _ = tiny_run
    s = json.loads((root / "samples" / "results.json").read_text())
    assert set(s["temperatures"]) == {"0.0", "0.5", "0.7", "0.8", "1.0"}
    assert set(s["per_class"]) == {"0.7", "1.0"}
    assert s["model"]["test_bpd_marginal"] > 0
    i = json.loads((root / "interpolation" / "results.json").read_text())
    assert len(i["pairs"]) == 10
    # each endpoint is encoded at the centre of its pixels' quantisation bins and decoded onto the 8-bit grid:
    # the exact image back (an endpoint encoded at a bin edge comes back one level off where rounding goes down)
    assert i["max_abs_reconstruction_error_endpoints"] <= 0.5 / 255
    a = json.loads((root / "attributes" / "results.json").read_text())
    for pair in a["pairs"].values():
        assert len(pair["fraction_classified_as_target"]) == len(pair["strengths"])
    # Δ = mean z[dst] − mean z[src]: a = 1 moves source images to the target class's mean latent, a = 0 leaves
    # them alone, so the model's own classifier calls more of them dst and fewer src at a = 1 (on average over
    # the pairs; Δ of the wrong sign moves them away from dst)
    strengths = next(iter(a["pairs"].values()))["strengths"]
    at0, at1 = strengths.index(0.0), strengths.index(1.0)

    def mean_fraction(key, i):
        return sum(p[key][i] for p in a["pairs"].values()) / len(a["pairs"])

    target, source = "fraction_classified_as_target", "fraction_classified_as_source"
    assert mean_fraction(target, at1) > mean_fraction(target, at0) + 0.2
    assert mean_fraction(source, at1) < mean_fraction(source, at0)


def test_ood_and_typicality_contents(tiny_run):
    root, _ = tiny_run
    o = json.loads((root / "ood" / "results.json").read_text())
    sets = o["models"]["digits"]["ood"]
    assert set(sets) == {"inverted-digits", "noise", "constant"}
    assert all(0.0 <= v["auroc"] <= 1.0 for v in sets.values())
    # fraction_more_likely_than_median_test = P(bits/dim of an OOD image < the test set's median). An OOD image
    # below the median is below every test image above it (at least half of them), so that fraction is at most
    # 2 P(s_ood < s_test) <= 2 (1 − AUROC); AUROC = 1 (every OOD image less likely than every test image) makes it
    # 0. Inverted digits are far from the model's digits (AUROC 1.0 for this run), so the bound is tight there.
    assert sets["inverted-digits"]["auroc"] > 0.9
    for name, v in sets.items():
        assert v["fraction_more_likely_than_median_test"] <= 2 * (1 - v["auroc"]) + 1e-12, name
        # an OOD set whose median lies above the test set's has at most half its images below the test median
        if v["median_bpd"] > o["models"]["digits"]["test_bpd_median"]:
            assert v["fraction_more_likely_than_median_test"] <= 0.5, name
    assert sets["inverted-digits"]["median_bpd"] > o["models"]["digits"]["test_bpd_median"]
    # Serrà et al.'s input-complexity score subtracts each image's PNG bits/dim. A constant 8x8 image's PNG (9.1
    # bits/dim at most) is shorter than every test digit's (13.0 at least), so against the constant set the score
    # can only raise the AUROC of bits/dim (tests/test_ood.py proves the pairwise argument).
    assert all(0.0 <= v["auroc_input_complexity"] <= 1.0 for v in sets.values())
    assert sets["constant"]["auroc_input_complexity"] >= sets["constant"]["auroc"]
    t = json.loads((root / "typicality" / "results.json").read_text())
    # every M of the paper's list that the smallest scored set holds ten times over (nearly independent batches)
    n_min = min(t["n"]["test"], *(t["n"][name] for name in sets))
    assert t["Ms"] == [m for m in (1, 2, 5, 10, 25, 50, 100, 200) if 10 * m <= n_min] and len(t["Ms"]) >= 3
    for row in t["table"]["rows"]:
        assert {"M", "epsilon", "in_distribution_flagged", "ood_flagged"} <= set(row)
        assert set(row["ood_flagged"]) == set(sets)
    # even this barely trained model puts every OOD set outside its typical set far more often than its own test
    # set at the largest batch size, and flags noise more often with larger batches
    first, last = t["table"]["rows"][0], t["table"]["rows"][-1]
    assert all(v >= 0.5 and v > last["in_distribution_flagged"] + 0.3 for v in last["ood_flagged"].values())
    assert last["ood_flagged"]["noise"] > first["ood_flagged"]["noise"]


def test_ood_cifar_without_its_data_says_so(tiny_run, tmp_path, capsys):
    """ood / typicality --cifar when CIFAR-10 is not under --data-dir: they run without the CIFAR-10 model (like the
    other sets that need files on disk) but say so, once on stderr and in each results.json / results.md."""
    root, empty = tiny_run
    capsys.readouterr()
    assert main(["ood", "typicality", *TINY, "--cifar", "--data-dir", str(empty), "--out", str(tmp_path),
                 "--cache", str(root / "models")]) == 0  # the shared model trained by the fixture
    looked_for = str(empty / "cifar-10-batches-py" / "test_batch")
    err = [line for line in capsys.readouterr().err.splitlines() if "--cifar" in line]
    assert len(err) == 1 and err[0].startswith("warning: --cifar: no CIFAR-10 model trained") and looked_for in err[0]
    ood, typ = _load(tmp_path / "ood"), _load(tmp_path / "typicality")
    assert set(ood["models"]) == {"digits"} and typ["other_models"] == {}
    for name, data in (("ood", ood), ("typicality", typ)):
        assert set(data["skipped"]) == {"cifar10"} and looked_for in data["skipped"]["cifar10"]
        assert "**cifar10 model skipped**" in (tmp_path / name / "results.md").read_text()


@pytest.mark.filterwarnings("ignore:.* images have non-finite values:RuntimeWarning")
def test_samples_that_overflow_are_counted_and_left_out_of_the_statistics(tiny_run, tmp_path, monkeypatch):
    """The shared model with class 3's top-prior log-std set to 100 (exp(100) overflows fp32): every class-3 sample
    overflows. The samples table counts exactly those, and its bits/dim and the classifier's fraction are those of
    the other samples (recomputed here from the samples as drawn), not of black stand-ins."""
    import shutil

    from glowfast import Glow
    from glowfast.evaluate import nll_bits_per_dim
    from glowfast.experiments.common import PRESETS
    from glowfast.experiments.generative import generative_classifier

    drawn = []
    sample = Glow.sample

    def recording_sample(self, *args, **kwargs):
        x = sample(self, *args, **kwargs)
        drawn.append((self, kwargs["temperature"], kwargs.get("y"), x))
        return x

    monkeypatch.setattr(Glow, "sample", recording_sample)
    root, empty = tiny_run
    ckpt = tmp_path / "broken"
    shutil.copytree(next(p for p in (root / "models").iterdir() if "-cond-" in p.name), ckpt)
    last = ckpt / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=False)
    embed = state["model"]["prior.class_embed.weight"]
    embed[embed.shape[0] // 2:, 3] = 100.0  # the log-std half of the top prior's parameters
    torch.save(state, last)
    assert main(["samples", *TINY, "--data-dir", str(empty), "--out", str(tmp_path / "s"), "--checkpoint",
                 str(ckpt)]) == 0
    data = _load(tmp_path / "s")
    preset = PRESETS["tiny"]
    for t, entry in data["temperatures"].items():
        model, _, y, x = next(d for d in drawn if d[1] == float(t) and len(d[3]) == preset.grid_n)
        overflowed = y == 3
        assert bool(x[overflowed].isnan().all()) and bool(x[~overflowed].isfinite().all())
        assert entry["fraction_nonfinite"] == pytest.approx(float(overflowed.float().mean()))
        good = torch.round(x[~overflowed] * 255).to(torch.uint8)
        assert entry["mean_bpd_of_samples"] == pytest.approx(float(nll_bits_per_dim(model, good, "cpu").mean()),
                                                             rel=1e-6)
        assert entry["pixel_mean"] == pytest.approx(float(x[~overflowed].mean()), rel=1e-6)
    for t, entry in data["per_class"].items():
        model, _, y, x = next(d for d in drawn if d[1] == float(t) and len(d[3]) == 10 * preset.per_class)
        ok = y != 3
        probs = generative_classifier(model, torch.round(x[ok] * 255).to(torch.uint8), "cpu")
        assert entry["fraction_classified_as_conditioning_class"] == pytest.approx(
            float((probs.argmax(1) == y[ok].numpy()).mean()))
    assert "fraction of samples that overflowed" in (tmp_path / "s" / "results.md").read_text()


def test_single_command_with_checkpoint(tiny_run, tmp_path, monkeypatch):
    """samples from a checkpoint: nothing trained. Its per-class grids have one row per class: the labels that
    every row's samples were drawn with (recorded on their way through Glow.sample and save_grid, both run
    unchanged) are the class written beside the row."""
    from glowfast import Glow
    from glowfast.experiments import generative

    drawn, grids = [], {}
    sample, save_grid = Glow.sample, generative.save_grid

    def recording_sample(self, *args, **kwargs):
        x = sample(self, *args, **kwargs)
        drawn.append((kwargs.get("y"), x.detach().cpu()))
        return x

    def recording_save_grid(path, images, nrow, *args, **kwargs):
        grids[Path(path).name] = (images, nrow, kwargs.get("row_labels"))
        return save_grid(path, images, nrow, *args, **kwargs)

    monkeypatch.setattr(Glow, "sample", recording_sample)
    monkeypatch.setattr(generative, "save_grid", recording_save_grid)
    root, empty = tiny_run
    ckpt = next(p for p in (root / "models").iterdir() if "-cond-" in p.name)
    out = tmp_path / "samples"
    assert main(["samples", *TINY, "--data-dir", str(empty), "--out", str(out), "--checkpoint", str(ckpt)]) == 0
    data = _load(out)
    assert data["model"]["cached"] is True
    assert not (tmp_path / "models").exists()  # nothing trained
    assert set(data["per_class"]) == {"0.7", "1.0"}
    for t, entry in data["per_class"].items():
        images, nrow, row_labels = grids[entry["figure"]]
        assert row_labels == [str(c) for c in range(10)] and images.shape[0] == 10 * nrow
        ys = [y for y, x in drawn if x.shape == images.shape and torch.equal(x[x.isfinite()], images[x.isfinite()])]
        assert len(ys) == 1, t
        rows = ys[0].cpu().reshape(10, nrow)
        assert (rows == torch.tensor([int(c) for c in row_labels])[:, None]).all(), (t, rows)


def test_train_holdout_holds_out_the_last_images_and_trains_on_the_rest(tmp_path):
    """train_holdout: the training split minus its last `holdout` images (at most a fifth of it), and those
    images; together exactly the full split, the held-out images never in the training part."""
    from glowfast.experiments.common import ModelSpec, load_split, train_holdout

    full = load_split("digits", "train", tmp_path, 8)
    n = full.images.shape[0]
    for holdout, h in ((200, 200), (10**6, n // 5)):
        tr, held = train_holdout(ModelSpec("digits", 8, K=1, L=1, hidden=8, holdout=holdout), tmp_path)
        assert tr.images.shape[0] == n - h and held.images.shape[0] == h
        assert torch.equal(torch.cat([tr.images, held.images]), full.images)
        assert torch.equal(torch.cat([tr.labels, held.labels]), full.labels)
        train_bytes = {im.numpy().tobytes() for im in tr.images}
        held_bytes = {im.numpy().tobytes() for im in held.images}
        # digits' training split has no repeated image, so distinct positions are distinct images
        assert len(train_bytes) == n - h and len(held_bytes) == h and not train_bytes & held_bytes
    tr, held = train_holdout(ModelSpec("digits", 8, K=1, L=1, hidden=8), tmp_path)
    assert held is None and torch.equal(tr.images, full.images)


def test_default_out_folder(tmp_path, monkeypatch):
    """Without --out, one NAME writes to results/NAME and caches its models in results/models (the module
    docstring and results/README.md); it was a TypeError from Path(None)."""
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "no-data"
    empty.mkdir()
    assert main(["ablation-coupling", *TINY, "--steps", "3", "--data-dir", str(empty)]) == 0
    data = _load(tmp_path / "results" / "ablation-coupling")
    assert data["experiment"] == "ablation-coupling"
    assert (tmp_path / "results" / "ablation-coupling" / "ablation_coupling_bpd_vs_steps.png").is_file()
    assert sorted(p.name.split("-")[3] for p in (tmp_path / "results" / "models").iterdir()) == ["additive", "affine"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-data", "results"]


def test_module_entry_point(tiny_run):
    root, empty = tiny_run
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "glowfast.experiments", "typicality", *TINY, "--data-dir", str(empty),
                        "--out", str(root / "typicality-cli")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "loaded cached model" in r.stdout  # the model trained by the fixture is reused from root/models
    # the digits fallback is said on the console too (it was only in results.md: a mistyped --data-dir went unseen)
    assert f"MNIST not found under {empty}: the tiny config uses the 8x8 digits dataset instead." in r.stdout
    _load(root / "typicality-cli")


def test_bad_arguments(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["no-such-experiment"])
    with pytest.raises(SystemExit):
        main(["samples", "--config", "huge"])
    # a config that needs MNIST, without it: one line, exit 2 (it was a traceback)
    capsys.readouterr()
    assert main(["samples", "--config", "small", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --config small: MNIST is not under") and "\n" not in err
    assert not (tmp_path / "o").exists()
    if not torch.cuda.is_available():  # one line, exit 2 (it was a traceback from deep inside torch.cuda)
        assert main(["samples", "--config", "tiny", "--device", "cuda"]) == 2
        assert "error: --device cuda: CUDA is not available" in capsys.readouterr().err
    # cuda:N past the last GPU: the same one line
    assert main(["samples", "--config", "tiny", "--device", BEYOND, "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --device {BEYOND}: {BEYOND_MESSAGE}"
    assert not (tmp_path / "b").exists()
    # --steps -1 trained 0 steps and cached that model as trained (found by a user-study audit)
    for option, value, message in (("--steps", "-1", "--steps must be >= 1, got -1"),
                                   ("--batch", "0", "--batch must be >= 1, got 0"),
                                   ("--time-limit", "0", "--time-limit must be > 0, got 0.0"),
                                   ("--alpha", "1", "--alpha must be in (0, 1), got 1.0")):
        assert main(["samples", "--config", "tiny", option, value, "--out", str(tmp_path / "s")]) == 2
        assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not (tmp_path / "s").exists()


def test_glowfast_train_checkpoint(tiny_run, tmp_path, capsys):
    """A checkpoint written by glowfast.train (model + model_config) serves as the shared model, loaded as the run
    trained it (its moving average, its networks in bf16) like glowfast.evaluate loads it."""
    train = pytest.importorskip("glowfast.train")
    _, empty = tiny_run
    run = tmp_path / "run"
    assert train.main(["--dataset", "digits", "--steps", "6", "--K", "2", "--L", "2", "--hidden-channels", "16",
                       "--run-dir", str(run), "--no-progress", "--device", "cpu", "--eval-interval", "6",
                       "--y-condition", "--ema-decay", "0.9", "--lr", "1e-2", "--amp", "bf16",
                       "--batch-size", "32", "--warmup-steps", "3"]) == 0
    out = tmp_path / "typicality"
    capsys.readouterr()
    assert main(["typicality", *TINY, "--data-dir", str(empty), "--out", str(out), "--checkpoint", str(run)]) == 0
    assert "(its weights moving average)" in capsys.readouterr().out
    data = _load(out)
    assert data["heldout_source"] == "test half"
    # the metadata describe the model used: the run's settings (not the tiny preset's), the checkpoint, and the
    # weights evaluated (the average, as the log line says)
    m = data["model"]
    run_config = json.loads((run / "config.json").read_text())
    assert {k: m["spec"][k] for k in ("dataset", "K", "L", "hidden", "conditional", "batch", "lr", "warmup", "steps",
                                      "ema", "holdout")} == {
        "dataset": "digits", "K": 2, "L": 2, "hidden": 16, "conditional": True, "batch": 32, "lr": 1e-2,
        "warmup": 3, "steps": 6, "ema": 0.9, "holdout": 0}
    assert m["steps_done"] == 6 and m["eval_weights"] == "ema 0.9"
    assert m["checkpoint"] == str(run / "checkpoints" / "last.pt")
    assert {k: run_config[k] for k in m["run_config"]} == m["run_config"]  # the run's options, as config.json has them
    assert m["run_config"]["optimizer"] == "adamax"
    md = (out / "results.md").read_text()
    assert "None steps" not in md
    assert f"digits K=2 L=2 hidden=16, 6 steps, checkpoint {run / 'checkpoints' / 'last.pt'} (ema 0.9 weights)" in md
    # the run kept a moving average of its weights and ran its networks in bf16: the experiments score with both,
    # as glowfast.evaluate does
    from glowfast.evaluate import main as evaluate_main

    scores = tmp_path / "eval.json"
    for extra, same in (([], True), (["--raw-weights"], False)):
        assert evaluate_main(["--run", str(run), "--datasets", "digits", "--device", "cpu", "--json", str(scores),
                              *extra]) == 0
        bpd = json.loads(scores.read_text())["rows"][0]["mean_bpd"]
        # the same function and batches: equal to rounding (bf16 networks barely move a 6-step model's scores,
        # 2e-8 relative, hence the tight tolerance)
        assert (bpd == pytest.approx(data["model"]["test_bpd_marginal"], rel=1e-10, abs=0)) == same


def test_main_model_keeps_the_weights_better_on_heldout_images(tiny_run):
    """The shared model keeps a moving average of its weights; the model kept (and cached) is the average or the
    last iterate, whichever has the lower bits/dim on held-out training images."""
    from glowfast.checkpoint import find_checkpoint
    from glowfast.experiments.common import ModelSpec, build_model, load_split, nll_bits_per_dim, train_holdout

    root, empty = tiny_run
    summary = json.loads((root / "samples" / "results.json").read_text())["model"]
    held = summary["heldout_bpd"]
    assert set(held) == {"last_iterate", "ema 0.999", "n"} and held["n"] > 0
    ema_better = held["ema 0.999"] <= held["last_iterate"]
    assert summary["eval_weights"] == ("ema 0.999" if ema_better else "raw")
    spec = ModelSpec(**summary["spec"])
    _, state = find_checkpoint(root / "models" / spec.key())
    model = build_model(spec)
    model.load_state_dict(state["model"])
    _, heldout = train_holdout(spec, empty)
    n = held["n"]
    labels = heldout.labels[:n] if model.n_classes else None
    bpd = float(nll_bits_per_dim(model, heldout.images[:n], "cpu", labels=labels).mean())
    assert bpd == pytest.approx(min(held["last_iterate"], held["ema 0.999"]), abs=1e-6)
    # the final test bits/dim in the history are the kept weights' too (the eval_n test images, fixed subset)
    te = load_split(spec.dataset, "test", empty, spec.size)
    if spec.eval_n and spec.eval_n < te.images.shape[0]:
        idx = torch.randperm(te.images.shape[0], generator=torch.Generator().manual_seed(99))[: spec.eval_n]
        te = type(te)(te.images[idx], te.labels[idx], te.name)
    test_bpd = float(nll_bits_per_dim(model, te.images, "cpu", labels=te.labels if model.n_classes else None).mean())
    assert summary["final_test_bpd_eval_subset"] == pytest.approx(test_bpd, abs=1e-6)
    assert state["history"]["step"][-1] == summary["steps_done"]


def _graphs_spec():
    from glowfast.experiments.common import ModelSpec

    return ModelSpec("digits", 8, K=2, L=1, hidden=16, batch=64, steps=30, warmup=5, eval_every=10, eval_n=200,
                     ema=0.9, cuda_graphs=True)


def test_cuda_graphs_spec_trains_eagerly_off_cuda(tmp_path):
    from glowfast.experiments.common import train

    t = train(_graphs_spec(), tmp_path, torch.device("cpu"), backend="reference")
    assert t.history["cuda_graphs"] == "off: not a CUDA device"
    assert t.history["steps_done"] == 30 and all(math.isfinite(v) for v in t.history["test_bpd"])


def _nan_losses_on(monkeypatch, bad_calls):
    """Training-mode forwards number `bad_calls` (0-based) of the next model built return a NaN loss."""
    from glowfast.experiments import common

    build = common.build_model
    calls = [0]

    def poison(module, inputs, out):
        if not module.training:
            return out
        calls[0] += 1
        return out._replace(bits_per_dim=out.bits_per_dim * float("nan")) if calls[0] - 1 in bad_calls else out

    def build_poisoned(spec):
        model = build(spec)
        model.register_forward_hook(poison)
        return model

    monkeypatch.setattr(common, "build_model", build_poisoned)


def test_sporadic_non_finite_steps_are_skipped_not_fatal(tmp_path, monkeypatch):
    """29 bad batches spread over a run are skipped (counted in the history) and the run completes; 21 in a row
    (a diverged model) stop it."""
    from glowfast.experiments.common import ModelSpec, train

    spec = ModelSpec("digits", 8, K=1, L=1, hidden=8, conditional=False, batch=64, steps=30, warmup=5, eval_n=100)
    _nan_losses_on(monkeypatch, set(range(1, 60, 2)))
    t = train(spec, tmp_path, torch.device("cpu"), backend="reference")
    assert t.history["steps_done"] == 30 and t.history["skipped_nonfinite_steps"] == 29  # between the 30 steps
    assert all(math.isfinite(v) for v in t.history["test_bpd"])
    monkeypatch.undo()
    _nan_losses_on(monkeypatch, set(range(5, 26)))
    with pytest.raises(FloatingPointError, match="21 non-finite losses/gradients in a row"):
        train(spec, tmp_path, torch.device("cpu"), backend="reference")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_spec_trains_from_replays_on_cuda(tmp_path, monkeypatch):
    """The experiments' graphed training (forward + backward replayed, Adam and the average eager) learns like
    the eager loop: the same steps done, test bits/dim falling, finite weights; and the logged running losses are
    the replays' own (a replay overwrites its static output, so keeping references instead of copies would log
    the last loss ten times)."""
    from glowfast.cuda_graph import GraphedStep
    from glowfast.experiments.common import train

    losses = []
    replay = GraphedStep.__call__

    def recording(self, *inputs):
        out = replay(self, *inputs)
        losses.append(float(out[0]))
        return out

    monkeypatch.setattr(GraphedStep, "__call__", recording)
    t = train(_graphs_spec(), tmp_path, torch.device("cuda"), backend="auto")
    h = t.history
    assert h["compute_path"] == "fused"  # auto on CUDA: the fused kernels are what is replayed
    assert h["precompile"]["skipped"] is None and h["precompile"]["launches"] > 0  # compiled ahead, in parallel
    assert h["cuda_graphs"] == "on" and h["steps_done"] == 30 and len(losses) == 30
    assert h["test_bpd"][-1] < h["test_bpd"][0]
    # evaluations at steps 10 and 20 log the mean loss of the 10 steps before them
    assert h["train_bpd"][1] == pytest.approx(sum(losses[:10]) / 10, rel=1e-5)
    assert h["train_bpd"][2] == pytest.approx(sum(losses[10:20]) / 10, rel=1e-5)
    assert all(bool(torch.isfinite(p).all()) for p in t.model.parameters())
    assert all(p.grad is None for p in t.model.parameters())  # the graph's pool is released


def test_latent_round_trips_run_in_full_fp32(monkeypatch):
    """encode_images / decode_images (interpolation, attributes) run without TF32, so that the decoded endpoints
    are the test images exactly on a GPU too: every coupling network call sees TF32 off."""
    from glowfast import Glow
    from glowfast.amp import coupling_networks
    from glowfast.experiments.generative import decode_images, encode_images
    from glowfast.kernels import dot_precision

    model = Glow((1, 8, 8), K=2, L=2, hidden_channels=8, backend="reference")
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    model(images)  # ActNorm init
    seen = []
    for net in coupling_networks(model):
        net.register_forward_pre_hook(lambda *_: seen.append((torch.backends.cudnn.allow_tf32, dot_precision())))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # PyTorch's default, which a GPU run trains with
    z = encode_images(model, images, "cpu")
    n_encode = len(seen)
    x = decode_images(model, z, "cpu")
    assert n_encode and len(seen) > n_encode
    assert set(seen) == {(False, "ieee")}
    assert torch.equal((x * 255).round().to(torch.uint8), images)


# ------------------------------------------------------------------------------------------------ one GPU command
# runs several experiments: one failure must not lose the others, nor the shared model's headline


def test_a_failed_experiment_is_recorded_and_the_others_complete(tmp_path, monkeypatch, capsys):
    from glowfast.experiments import common, generative

    def broken_sampling(ctx):
        raise ArithmeticError("sampling broke")  # not a RuntimeError: any exception

    monkeypatch.setattr(generative, "run_samples", broken_sampling)
    trainings = []
    real_train = common.train
    monkeypatch.setattr("glowfast.experiments.cli.train", lambda *a, **k: trainings.append(1) or real_train(*a, **k))
    empty = tmp_path / "no-data"
    empty.mkdir()
    assert main(["samples", "interpolation", *TINY, "--data-dir", str(empty), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "ArithmeticError: sampling broke" in err and "1 experiment(s) failed: samples" in err
    failed = _load(tmp_path / "o" / "samples")
    assert failed["error"] == "ArithmeticError: sampling broke" and "Traceback" in failed["traceback"]
    # the headline was computed before the experiment broke, and is in its report
    assert math.isfinite(failed["model"]["test_bpd_marginal"])
    assert "This experiment failed" in (tmp_path / "o" / "samples" / "results.md").read_text()
    ok = _load(tmp_path / "o" / "interpolation")
    assert "error" not in ok and ok["pairs"]
    assert len(trainings) == 1  # the shared model was trained once


def test_a_model_whose_training_failed_is_not_trained_again(tmp_path, monkeypatch, capsys):
    calls = []

    def diverging(*a, **k):
        calls.append(1)
        raise FloatingPointError("21 non-finite losses/gradients in a row")

    monkeypatch.setattr("glowfast.experiments.cli.train", diverging)
    empty = tmp_path / "no-data"
    empty.mkdir()
    assert main(["samples", "interpolation", *TINY, "--data-dir", str(empty), "--out", str(tmp_path / "o")]) == 1
    assert len(calls) == 1
    second = _load(tmp_path / "o" / "interpolation")
    assert "training failed earlier in this process (FloatingPointError" in second["error"]


def test_backend_probe_falls_back_on_any_exception(monkeypatch):
    """A Triton compile error (TritonError derives from Exception, not RuntimeError) in the fused probe falls back
    to the reference path with a warning instead of ending the command."""
    from glowfast import fused
    from glowfast.experiments.common import ModelSpec, build_model, set_backend

    class CompileError(Exception):
        pass

    def broken(*a, **k):
        raise CompileError("ptxas failed")

    monkeypatch.setattr(fused, "steps_forward", broken)
    model = build_model(ModelSpec("digits", 8, K=1, L=1, hidden=8))
    with pytest.warns(UserWarning, match="CompileError: ptxas failed"):
        assert set_backend(model, "fused", torch.device("cpu")) == "reference"
    assert model.backend == "reference"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the fused path on CPU needs the interpreter")
def test_reference_check_compares_the_fused_headline_with_the_reference_layers(monkeypatch):
    """glowfast.experiments reports, for a fused shared model, its per-image bits/dim against the reference layers'
    on the same images and noise (the whole command with --backend fused passed this once by hand, 275 s under
    the interpreter: too slow for CI). A fused result that is off is reported, with a warning."""
    from glowfast.experiments.common import ModelSpec, build_model, nll_bits_per_dim, reference_check

    model = build_model(ModelSpec("digits", 8, K=2, L=2, hidden=8, conditional=False))
    model.backend = "fused"
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 17, (6, 1, 8, 8), generator=g, dtype=torch.uint8) * 15
    with torch.no_grad():
        model.train()
        model(images)  # ActNorm's init
        model.eval()
    fused_bpd = nll_bits_per_dim(model, images, torch.device("cpu"))
    from glowfast import fused

    def no_fused(*a, **k):
        raise AssertionError("reference_check ran the fused path")

    monkeypatch.setattr(fused, "steps_forward", no_fused)  # the check's own pass must be the reference layers'
    rc = reference_check(model, images, fused_bpd, torch.device("cpu"), n=4)
    assert model.backend == "fused" and rc["n"] == 4
    assert rc["max_abs_diff"] < 1e-4 and abs(rc["fused_mean"] - float(fused_bpd[:4].mean())) < 1e-12
    with pytest.warns(UserWarning, match="the headline may be wrong"):
        off = reference_check(model, images, fused_bpd + 0.01, torch.device("cpu"), n=4)
    assert abs(off["max_abs_diff"] - 0.01) < 1e-4


# ------------------------------------------------------------------ gaps found by mutation testing (12th session)
def _spec(**kw):
    from glowfast.experiments.common import ModelSpec

    base = dict(K=1, L=1, hidden=8, batch=64, steps=1, warmup=4, lr=1e-3, conditional=False, eval_n=50)
    return ModelSpec("digits", 8, **{**base, **kw})


def test_experiment_training_warms_up_from_lr_over_warmup_and_clips_the_gradient(tmp_path):
    """The experiments' training loop (Adam, linear warm-up, gradient clipping). Adam's first update of a parameter is
    lr_1 · g / (|g| + eps) with lr_1 the first step's rate: at most lr_1, and lr_1 to 1e-6 wherever |g| > 1e-2. The
    top prior starts at zero, so after one step its largest entry is lr/warmup (warm-up from lr/W: not 0, not lr).
    Clipped to a global norm of 1e-12, every |g| <= 1e-12 and the update is at most lr_1 · 1e-12 / 1e-8."""
    from glowfast.experiments.common import train

    cpu = torch.device("cpu")
    lr_1 = 1e-3 / 4
    top = train(_spec(), tmp_path, cpu, backend="reference").model.prior.top.detach().double()
    assert float(top.abs().max()) == pytest.approx(lr_1, rel=1e-5)
    assert bool((top.abs() <= lr_1 * (1 + 1e-6)).all())
    clipped = train(_spec(max_grad_norm=1e-12), tmp_path, cpu, backend="reference").model.prior.top.detach()
    assert float(clipped.abs().max()) <= lr_1 * 1e-4


def test_experiment_moving_average_is_updated_after_each_step(tmp_path):
    """The experiments' moving average is created after the first update (ActNorm initialises in the first forward)
    and updated after every optimiser step; without held-out images the model kept is the average. After 2 steps with
    decay 0.9 it is therefore d·w1 + (1 − d)·w2 with d = min(0.9, 2/11) (its second update), w_k being the last
    iterate after k steps (the same trajectory, trained without the average)."""
    from glowfast.experiments.common import train

    cpu = torch.device("cpu")
    w1 = train(_spec(steps=1), tmp_path, cpu, backend="reference").model.state_dict()
    w2 = train(_spec(steps=2), tmp_path, cpu, backend="reference").model.state_dict()
    avg = train(_spec(steps=2, ema=0.9), tmp_path, cpu, backend="reference").model.state_dict()
    d = 2 / 11
    moved = 0
    for k in w2:
        if not w2[k].is_floating_point():
            continue
        torch.testing.assert_close(avg[k].double(), d * w1[k].double() + (1 - d) * w2[k].double(), rtol=0, atol=1e-6)
        moved += int(not torch.equal(w1[k], w2[k]))
    assert moved > 0


def test_lr_factor_warms_up_then_follows_a_half_cosine():
    from glowfast.experiments.common import lr_factor

    assert [lr_factor(s, 0.0, 4, "none") for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(10, 0.9, 4, "none") == 1.0
    cos = [lr_factor(100, p, 4, "cosine") for p in (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)]
    assert cos == pytest.approx([1.0, (1 + 2 ** -0.5) / 2, 0.5, (1 - 2 ** -0.5) / 2, 0.0, 0.0], abs=1e-15)
    assert lr_factor(1, 0.5, 4, "cosine") == pytest.approx(0.5 * 0.5)  # warm-up and decay multiply


def test_lr_decay_is_checked_and_names_its_own_cache_folder():
    with pytest.raises(ValueError, match="lr_decay must be one of none, cosine, got 'linear'"):
        _spec(lr_decay="linear")
    assert _spec(lr_decay="cosine").key() != _spec().key()


@pytest.mark.parametrize("decay", ["none", "cosine"])
def test_cosine_decay_reaches_zero_at_the_step_count_or_the_time_limit(tmp_path, decay):
    """A run ends at lr 0 under "cosine" whichever ends it: its step count, or its time limit (a limit of 1 ns stops
    it at the first clock reading, step 10 of a million, and its progress is then the time's, 1). "none" ends at
    lr."""
    from glowfast.experiments.common import train

    cpu = torch.device("cpu")
    by_steps = train(_spec(steps=12, lr_decay=decay), tmp_path, cpu, backend="reference").history
    by_time = train(_spec(steps=10**6, time_limit_s=1e-9, lr_decay=decay), tmp_path, cpu,
                    backend="reference").history
    assert by_steps["steps_done"] == 12 and not by_steps["stopped_by_time_limit"]
    assert by_time["steps_done"] == 10 and by_time["stopped_by_time_limit"]
    for h in (by_steps, by_time):
        assert h["lr_decay"] == decay
        assert h["final_lr"] == (0.0 if decay == "cosine" else 1e-3)


def test_network_options_train_reload_and_load_as_trained(tmp_path):
    """A spec's amp / channels_last: the networks of the trained model run in bf16 and NHWC, and so do those of the
    model loaded back from the cache and by glowfast.load_glow (sampling and scoring as trained); the options name
    their own cache folder, and a bad amp is refused naming it."""
    from glowfast import load_glow
    from glowfast.amp import bf16_networks_enabled, channels_last_networks_enabled
    from glowfast.experiments.common import train

    with pytest.raises(ValueError, match="amp must be one of none, bf16, got 'fp16'"):
        _spec(amp="fp16")
    spec = _spec(steps=3, amp="bf16", channels_last=True)
    assert spec.key() != _spec(steps=3).key()
    cpu = torch.device("cpu")
    trained = train(spec, tmp_path, cpu, backend="reference", cache_dir=tmp_path / "cache")
    assert not trained.cached and math.isfinite(trained.history["test_bpd"][-1])
    cached = train(spec, tmp_path, cpu, backend="reference", cache_dir=tmp_path / "cache")
    loaded = load_glow(tmp_path / "cache" / spec.key())
    for model in (trained.model, cached.model, loaded):
        assert bf16_networks_enabled(model) and channels_last_networks_enabled(model)
    assert cached.cached
    plain = train(_spec(steps=3), tmp_path, cpu, backend="reference").model
    assert not bf16_networks_enabled(plain) and not channels_last_networks_enabled(plain)


def test_ablation_best_is_the_lowest_bits_per_dim(tiny_run):  # noqa: F811
    """'best' names the variant with the LOWEST test bits/dim (of the final numbers when every variant trained the
    same number of steps)."""
    root, _ = tiny_run
    for kind in ("permutation", "coupling"):
        data = json.loads((root / f"ablation-{kind}" / "results.json").read_text())
        ranking = data["final_test_bpd"] if data["same_number_of_steps"] else \
            data["test_bpd_at_common_step_eval_subset"]
        assert len(set(ranking.values())) == len(ranking)  # distinct: min and max differ
        assert data["best"] == min(ranking, key=ranking.get), kind


def test_interpolation_path_bits_per_dim_are_the_mean_over_pairs(tiny_run):  # noqa: F811
    """mean_bpd_along_path[k] is the mean over the class pairs of the k-th interpolant's bits/dim. Its endpoints decode
    to the test images themselves (max reconstruction error < half a level), so entry 0 is the mean over pairs of
    image a's bits/dim, and entry −1 of image b's, each scored with the noise its position in the row draws
    (nll_bits_per_dim's seeded generator, position by position)."""
    from glowfast.checkpoint import find_checkpoint
    from glowfast.experiments.common import ModelSpec, build_model, load_split, nll_bits_per_dim

    root, empty = tiny_run
    res = json.loads((root / "interpolation" / "results.json").read_text())
    spec = ModelSpec(**res["model"]["spec"])
    _, state = find_checkpoint(root / "models" / spec.key())
    model = build_model(spec)
    model.load_state_dict(state["model"])
    te = load_split(spec.dataset, "test", empty, spec.size)
    S = len(res["t"])
    first, last = [], []
    for p in res["pairs"]:
        a, b = te.images[p["test_index_a"]], te.images[p["test_index_b"]]
        first.append(nll_bits_per_dim(model, a.expand(S, *a.shape).contiguous(), "cpu")[0])
        last.append(nll_bits_per_dim(model, b.expand(S, *b.shape).contiguous(), "cpu")[-1])
    assert res["mean_bpd_along_path"][0] == pytest.approx(float(np.mean(first)), rel=1e-6)
    assert res["mean_bpd_along_path"][-1] == pytest.approx(float(np.mean(last)), rel=1e-6)


def test_typicality_on_a_model_without_held_out_images_splits_the_test_set_in_two(tiny_run, tmp_path):  # noqa: F811
    """A model trained on the whole training split (glowfast.train) has no held-out images: ε is bootstrapped on a
    random half of the scored test images and the other half gives the false-positive rate -- two disjoint halves,
    not the same set twice."""
    train = pytest.importorskip("glowfast.train")
    _, empty = tiny_run
    run = tmp_path / "run"
    assert train.main(["--dataset", "digits", "--steps", "2", "--K", "1", "--L", "1", "--hidden-channels", "8",
                       "--run-dir", str(run), "--no-progress", "--device", "cpu", "--eval-interval", "2",
                       "--batch-size", "32", "--temperatures", "0.7"]) == 0
    out = tmp_path / "typicality"
    assert main(["typicality", *TINY, "--data-dir", str(empty), "--out", str(out), "--checkpoint", str(run)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["heldout_source"] == "test half"
    n = data["n"]
    scored = min(297, 256)  # digits' test split, scored at most ood_n = 256 images in the tiny preset (digits)
    assert n["heldout"] + n["test"] == scored and abs(n["heldout"] - n["test"]) <= 1


# ------------------------------------------------------------------ gaps found by mutation testing (12th session)
@pytest.fixture
def recorded_runs(monkeypatch):
    """run_one replaced by a recorder (no training): what main() hands each experiment."""
    seen = []

    def fake_run_one(ctx, name):
        seen.append(dict(name=name, main_seed=ctx.preset.main.seed, ablation_seed=ctx.preset.ablation.seed,
                         threads=torch.get_num_threads(),
                         networks={(m.amp, m.channels_last) for m in (ctx.preset.main, ctx.preset.ablation)}))
        return {}, ""

    monkeypatch.setattr(cli, "run_one", fake_run_one)
    threads = torch.get_num_threads()
    yield seen
    torch.set_num_threads(threads)


def test_seed_reaches_the_shared_and_the_ablation_models(recorded_runs, tmp_path):
    assert cli.main(["ablation-coupling", "--seed", "5", "--data-dir", str(tmp_path / "none"),
                     "--out", str(tmp_path / "o"), "--device", "cpu"]) == 0
    assert [(r["main_seed"], r["ablation_seed"]) for r in recorded_runs] == [(5, 5)]


@pytest.mark.parametrize("flags, want", [([], {("none", False)}), (["--amp", "bf16"], {("bf16", False)}),
                                         (["--amp", "bf16", "--channels-last"], {("bf16", True)})])
def test_network_options_reach_the_shared_and_the_ablation_models(recorded_runs, tmp_path, flags, want):
    assert cli.main(["ablation-coupling", *flags, "--data-dir", str(tmp_path / "none"),
                     "--out", str(tmp_path / "o"), "--device", "cpu"]) == 0
    assert [r["networks"] for r in recorded_runs] == [want]


def test_a_name_given_twice_runs_once(recorded_runs, tmp_path):
    assert cli.main(["ablation-coupling", "ablation-coupling", "--data-dir", str(tmp_path / "none"),
                     "--out", str(tmp_path / "o"), "--device", "cpu"]) == 0
    assert [r["name"] for r in recorded_runs] == ["ablation-coupling"]


def test_threads_option_sets_torch_threads(recorded_runs, tmp_path):
    assert cli.main(["ablation-coupling", "--threads", "1", "--data-dir", str(tmp_path / "none"),
                     "--out", str(tmp_path / "o"), "--device", "cpu"]) == 0
    assert recorded_runs[0]["threads"] == 1


@pytest.mark.parametrize("option, value, message", [("--threads", "-1", "--threads must be >= 0, got -1"),
                                                    ("--alpha", "0", "--alpha must be in (0, 1), got 0.0")])
def test_bad_threads_and_alpha_are_one_line_errors(recorded_runs, tmp_path, capsys, option, value, message):
    assert cli.main(["ablation-coupling", option, value, "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert recorded_runs == [] and not (tmp_path / "o").exists()


def test_cudnn_autotuner_is_on_by_default_and_can_be_turned_off():
    """As in glowfast.train: a CUDA run trains with cuDNN's autotuner (the speed benchmarks/ measures) unless
    --no-cudnn-benchmark; the switch itself is glowfast._cli.cudnn_autotune (tests/test_train.py)."""
    assert cli.parse_args(["samples"]).cudnn_benchmark is True
    assert cli.parse_args(["samples", "--no-cudnn-benchmark"]).cudnn_benchmark is False


def test_batch_override_reaches_every_model(tmp_path):
    """--batch sets the training batch of the shared, ablation and reverse (OOD) models, and so their cache names:
    a model trained at another batch size is never loaded in its place."""
    from glowfast.experiments.common import resolve_preset
    from glowfast.experiments.ood_exp import _reverse_spec

    base, _ = resolve_preset("tiny", tmp_path)
    p, _ = resolve_preset("tiny", tmp_path, batch=16)
    reverse = _reverse_spec(p.main, "fashion-mnist", p.reverse_steps, p.reverse_time_limit_s)
    assert (p.main.batch, p.ablation.batch, reverse.batch) == (16, 16, 16) and base.main.batch != 16
    assert p.main.key() != base.main.key() and p.ablation.key() != base.ablation.key()
    assert replace(p.main, batch=base.main.batch) == base.main  # nothing else changed
