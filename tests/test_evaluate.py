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

import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import glowfast.evaluate as ev
from glowfast import Glow
from glowfast.evaluate import class_log_likelihoods, evaluate_bpd, main, nll_bits_per_dim

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


def test_nll_bits_per_dim_of_a_model_in_training_mode_does_not_initialise_actnorm():
    """Per-image scores run in eval mode: scoring a fresh model that is in training mode must not initialise its
    ActNorm layers on the scored images (that would fit them, and move the scores off the closed form)."""
    model = _measure_preserving_glow().train()
    images = _images(64)
    bpd = nll_bits_per_dim(model, images, "cpu", batch_size=16, seed=3)
    flags = [bool(m.initialized) for m in model.modules() if hasattr(m, "initialized")]
    assert flags and not any(flags)
    assert bpd.mean() == pytest.approx(_expected_bpd(images).mean(), abs=2e-5)
    np.testing.assert_array_equal(bpd, nll_bits_per_dim(model.eval(), images, "cpu", batch_size=16, seed=3))


def test_nll_bits_per_dim_restores_training_mode():
    """Scoring gives the caller's mode back, as evaluate_bpd does (it left a training model in eval mode)."""
    model = _measure_preserving_glow().train()
    nll_bits_per_dim(model, _images(4), "cpu")
    assert model.training
    model.eval()
    nll_bits_per_dim(model, _images(4), "cpu")
    assert not model.training


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


def test_class_log_likelihoods_returned_with_given_labels_and_bad_requests_named():
    """return_class_ll with labels: bits/dim of p(x | label) plus every class's log p(x | y), from the same noise
    (it crashed in torch.cat); an unconditional model or bad labels get a clear error."""
    model = _measure_preserving_glow(n_classes=3)
    with torch.no_grad():
        for p in model.prior.parameters():
            p.normal_(0, 0.3)
    images, labels = _images(20, seed=4), torch.arange(20) % 3
    bpd, cll = nll_bits_per_dim(model, images, "cpu", seed=2, batch_size=8, labels=labels, return_class_ll=True)
    np.testing.assert_allclose(bpd, nll_bits_per_dim(model, images, "cpu", seed=2, batch_size=8, labels=labels),
                               rtol=0, atol=1e-9)
    _, cll_marginal = nll_bits_per_dim(model, images, "cpu", seed=2, batch_size=8, return_class_ll=True)
    np.testing.assert_allclose(cll, cll_marginal, rtol=0, atol=1e-9)
    d = math.prod(SHAPE)
    np.testing.assert_allclose(bpd, -cll[np.arange(20), labels.numpy()] / (d * math.log(2)), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="class-conditional"):
        nll_bits_per_dim(_measure_preserving_glow(), images, "cpu", return_class_ll=True)
    with pytest.raises(ValueError, match=r"labels must have shape \(20,\)"):
        nll_bits_per_dim(model, images, "cpu", labels=labels[:5])
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 3\)"):
        nll_bits_per_dim(model, images, "cpu", labels=labels + 1, return_class_ll=True)


def test_several_dequantisation_draws_are_a_log_mean_exp():
    """dequant_samples=K: log (1/K) sum_k p(x + u_k) over K consecutive draws of the seeded noise."""
    model = _measure_preserving_glow()
    with torch.no_grad():
        for p in model.parameters():  # no longer a rotation: the draws' densities differ
            p.add_(0.05 * torch.randn_like(p))
    images = _images(12, seed=3)
    k = 4
    g = torch.Generator().manual_seed(7)
    draws = torch.stack([model(images, generator=g).log_prob for _ in range(k)]).detach()
    d = math.prod(SHAPE)
    expected = -(torch.logsumexp(draws, 0) - math.log(k)) / (d * math.log(2))
    got = nll_bits_per_dim(model, images, "cpu", seed=7, dequant_samples=k)
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-9)
    one = nll_bits_per_dim(model, images, "cpu", seed=7)
    np.testing.assert_allclose(one, (-draws[0] / (d * math.log(2))).numpy(), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="dequant_samples"):
        nll_bits_per_dim(model, images, "cpu", dequant_samples=0)


def test_cli_scores_sets_and_matches_the_runs_own_evaluation(tmp_path, capsys):
    """python -m glowfast.evaluate on a real (tiny) glowfast.train run with a moving average of its weights: the
    test split's mean bits/dim is the one the run logged (same weights, noise and batches); noise is told apart."""
    from glowfast.train import main as train_main

    from test_train import TINY

    run = tmp_path / "run"
    assert train_main(TINY + ["--steps", "40", "--eval-interval", "40", "--ema-decay", "0.9", "--lr", "1e-2",
                              "--run-dir", str(run)]) == 0
    logged = json.loads((run / "summary.json").read_text())["test_bpd"]
    out, scores = tmp_path / "eval.json", tmp_path / "scores"
    assert main(["--run", str(run), "--datasets", "digits", "noise", "--batch-size", "512", "--device", "cpu",
                 "--json", str(out), "--save-scores", str(scores)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["dataset"] for r in rows] == ["digits:test", "noise:test"]
    assert rows[0]["n"] == 297 and rows[0]["mean_bpd"] == pytest.approx(logged, rel=1e-6)
    assert rows[1]["auroc_vs_first"] > 0.99
    one_draw = np.load(scores / "digits_test.npy")
    assert one_draw.shape == (297,)
    # "mean bits/dim ± standard error" (README): the standard error of the mean of the saved per-image scores,
    # sample standard deviation / sqrt(n) (one image has none: see test_cli_output_paths_and_devices_checked...)
    for r in rows:
        s = np.load(scores / f"{r['dataset'].replace(':', '_')}.npy")
        assert r["n"] == s.size and r["mean_bpd"] == pytest.approx(s.mean(), rel=1e-12)
        assert r["sem_bpd"] == pytest.approx(np.std(s, ddof=1) / math.sqrt(s.size), rel=1e-9)
    # --dequant-samples K (and --seed) reach the scorer: the saved scores are nll_bits_per_dim's K-draw estimate
    # with that seed (the same weights, the run's moving average, and batches), not the one-draw scores
    from glowfast.checkpoint import find_checkpoint
    from glowfast.data import get_dataset
    from glowfast.sample import load_model

    scores4 = tmp_path / "scores4"
    assert main(["--run", str(run), "--datasets", "digits", "--batch-size", "512", "--device", "cpu",
                 "--dequant-samples", "4", "--seed", "3", "--save-scores", str(scores4)]) == 0
    four_draws = np.load(scores4 / "digits_test.npy")
    test = get_dataset("digits", "test")
    images = torch.stack([test[i][0] for i in range(len(test))])
    model = load_model(find_checkpoint(run)[1], torch.device("cpu"))
    np.testing.assert_array_equal(four_draws, nll_bits_per_dim(model, images, "cpu", 512, seed=3, dequant_samples=4))
    assert np.abs(four_draws - nll_bits_per_dim(model, images, "cpu", 512, seed=3)).min() > 0
    assert np.abs(four_draws - one_draw).min() > 0
    # the last iterate differs from the average the run evaluated
    assert main(["--run", str(run), "--datasets", "digits", "--raw-weights", "--batch-size", "512", "--device",
                 "cpu", "--n", "100", "--json", str(out)]) == 0
    raw = json.loads(out.read_text())["rows"][0]
    assert raw["n"] == 100 and raw["mean_bpd"] != pytest.approx(logged, rel=1e-6)
    capsys.readouterr()
    assert main(["--datasets", "digits"]) == 2
    assert main(["--run", str(run), "--datasets", "digits", "--dequant-samples", "0"]) == 2
    assert main(["--run", str(run), "--datasets", "cifar10", "--data-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "--run" in err and "dequant" in err and "cifar10: " in err and "cifar10: cifar10" not in err


def test_cli_labels_condition_only_the_models_own_dataset(tmp_path):
    """--labels scores the training dataset's sets by p(x | label); another set's labels are not the model's classes
    (noise: all 0), so it keeps p(x), the same score as without --labels, and each row says which it is."""
    from glowfast.train import main as train_main

    from test_train import TINY

    run = tmp_path / "run"
    assert train_main(TINY + ["--steps", "12", "--eval-interval", "12", "--y-condition", "--lr", "1e-2",
                              "--run-dir", str(run)]) == 0
    tables = {}
    for extra in ([], ["--labels"]):
        out = tmp_path / f"eval{len(extra)}.json"
        assert main(["--run", str(run), "--datasets", "digits", "noise", "--n", "64", "--device", "cpu",
                     "--json", str(out), *extra]) == 0
        tables[bool(extra)] = {r["dataset"]: r for r in json.loads(out.read_text())["rows"]}
    assert [r["score"] for r in tables[True].values()] == ["p(x | label)", "p(x)"]
    assert [r["score"] for r in tables[False].values()] == ["p(x)", "p(x)"]
    assert tables[True]["noise:test"]["mean_bpd"] == tables[False]["noise:test"]["mean_bpd"]
    assert tables[True]["digits:test"]["mean_bpd"] != tables[False]["digits:test"]["mean_bpd"]


def test_cli_output_paths_and_devices_checked_before_scoring(tmp_path, capsys):
    """--json into a folder that does not exist yet is created (it crashed after all the scoring); one image has
    no standard error: JSON null, not NaN (invalid JSON); a bad --device or a folder as --json: one line, exit 2."""
    from glowfast.train import main as train_main

    from test_train import TINY

    run = tmp_path / "run"
    assert train_main(TINY + ["--steps", "2", "--eval-interval", "2", "--run-dir", str(run)]) == 0
    out = tmp_path / "new" / "folder" / "eval.json"
    assert main(["--run", str(run), "--datasets", "digits", "--n", "1", "--device", "cpu", "--json", str(out)]) == 0

    def no_nan(name):
        raise AssertionError(f"{name} in the JSON")

    row = json.loads(out.read_text(), parse_constant=no_nan)["rows"][0]
    assert row["n"] == 1 and row["sem_bpd"] is None
    capsys.readouterr()
    assert main(["--run", str(run), "--datasets", "digits", "--device", "gpu"]) == 2
    assert main(["--run", str(run), "--datasets", "digits", "--device", "cpu", "--json", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --device gpu: not a device (auto, cpu, cuda or cuda:N)", f"error: --json {tmp_path} is a folder"]


class _PrecisionRecordingGlow(Glow):
    """A Glow that notes the fp32 precision settings in force whenever its flow runs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def _flow(self, x):
        from glowfast.kernels import dot_precision

        self.seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
                          dot_precision("cuda")))
        return super()._flow(x)


def _tf32_state():
    """Every TF32 setting torch has (new API values, float32 matmul precision, legacy flags; None: unreadable)."""
    def legacy(switch):
        try:
            return bool(switch.allow_tf32)
        except RuntimeError:  # a mix of the two APIs makes the legacy getter raise
            return None

    def matmul_precision():
        try:
            return torch.get_float32_matmul_precision()
        except RuntimeError:  # likewise
            return None

    new = [s.fp32_precision for s in (torch.backends, torch.backends.cudnn, torch.backends.cudnn.conv,
                                       torch.backends.cudnn.rnn, torch.backends.cuda.matmul)]
    return (*new, matmul_precision(), legacy(torch.backends.cudnn), legacy(torch.backends.cuda.matmul))


def _computes_in_tf32(op, parent, legacy_switch) -> bool:
    """Whether torch runs `op` (cudnn.conv, cuda.matmul) in TF32: the first of the op's, its parent's and the global
    new-API precision that is set, else the legacy flag."""
    for value in (op.fp32_precision, parent.fp32_precision, torch.backends.fp32_precision):
        if value != "none":
            return value == "tf32"
    return bool(legacy_switch.allow_tf32)


SETTINGS = {  # what callers do before evaluating: the defaults, the legacy API, the new per-op API
    "defaults": lambda: None,
    "matmul precision high": lambda: torch.set_float32_matmul_precision("high"),
    "legacy matmul tf32": lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
    "new-API conv ieee": lambda: setattr(torch.backends.cudnn.conv, "fp32_precision", "ieee"),
    "new-API cudnn tf32": lambda: setattr(torch.backends.cudnn, "fp32_precision", "tf32"),
    "new-API global tf32": lambda: setattr(torch.backends, "fp32_precision", "tf32"),
    "new-API matmul tf32": lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
}


def test_full_fp32_switches_tf32_off_and_restores_every_setting():
    """Inside: TF32 off in cuDNN convolutions, cuBLAS and the kernels' dots, whichever API the caller used (a
    caller's new-API "tf32" survived the legacy setters). After (also after an exception): exactly the caller's
    settings, legacy getters included — checked in a fresh process per setting, since torch keeps hidden legacy
    state."""
    import subprocess
    import sys

    code = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_evaluate import SETTINGS, _computes_in_tf32, _tf32_state
from glowfast.evaluate import full_fp32
from glowfast.kernels import dot_precision
SETTINGS[{name!r}]()
before = _tf32_state()
b = torch.backends
with full_fp32():
    inside = (_computes_in_tf32(b.cudnn.conv, b.cudnn, b.cudnn), _computes_in_tf32(b.cuda.matmul, b, b.cuda.matmul),
              dot_precision("cuda"))
try:
    with full_fp32():
        raise KeyError("raised inside")
except KeyError:
    pass
print(json.dumps([before, inside, _tf32_state()]))
"""
    import json
    from pathlib import Path

    for name in SETTINGS:
        r = subprocess.run([sys.executable, "-c", code.format(tests=str(Path(__file__).parent), name=name)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        before, inside, after = json.loads(r.stdout.strip().splitlines()[-1])
        assert inside == [False, False, "ieee"], name
        assert after == before, name


def test_reported_likelihoods_are_computed_in_full_fp32():
    """evaluate_bpd, nll_bits_per_dim and class_log_likelihoods run with TF32 off everywhere (cuDNN, cuBLAS, the
    kernels' dots), whatever the caller's settings, which come back afterwards."""
    before = _tf32_state()
    model = _PrecisionRecordingGlow(SHAPE, K=1, L=1, hidden_channels=4, n_classes=3).eval()
    images = _images(8)
    evaluate_bpd(model, TensorDataset(images, torch.zeros(8, dtype=torch.long)), "cpu", y_condition=True)
    nll_bits_per_dim(model, images, "cpu")
    class_log_likelihoods(model, model.preprocess(images, dequantize=False))
    assert len(model.seen) >= 3 and set(model.seen) == {(False, False, "ieee")}
    assert _tf32_state() == before


def test_cli_checks_every_set_first_keeps_subset_indices_and_escapes_the_table(tmp_path, capsys, monkeypatch):
    """Found by a user-study audit: (1) a missing set named after good ones failed only after those were scored;
    (2) --save-scores with --n saved the scores of a random subset without saying which images; (3) the row of a
    p(x | label) score broke the printed Markdown table (an extra column)."""
    from glowfast.checkpoint import find_checkpoint
    from glowfast.data import get_dataset
    from glowfast.sample import load_model
    from glowfast.train import main as train_main

    from test_train import TINY

    run = tmp_path / "run"
    assert train_main(TINY + ["--steps", "4", "--eval-interval", "4", "--y-condition", "--run-dir", str(run)]) == 0
    scored = []
    real = ev.nll_bits_per_dim
    monkeypatch.setattr(ev, "nll_bits_per_dim", lambda model, images, *a, **k: scored.append(len(images))
                        or real(model, images, *a, **k))
    capsys.readouterr()
    assert main(["--run", str(run), "--datasets", "digits", "noise", "cifar10", "--data-dir", str(tmp_path / "none"),
                 "--device", "cpu"]) == 2
    assert "cifar10: " in capsys.readouterr().err and scored == []
    scores = tmp_path / "scores"
    assert main(["--run", str(run), "--datasets", "digits", "--n", "50", "--labels", "--device", "cpu",
                 "--batch-size", "512", "--save-scores", str(scores)]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len({line.replace("\\|", "").count("|") for line in table}) == 1, table  # one column count
    assert r"| p(x \| label) |" in table[-1]
    index = np.load(scores / "digits_test_index.npy")
    assert index.shape == (50,) and len(set(index.tolist())) == 50 and 0 <= index.min() and index.max() < 297
    test = get_dataset("digits", "test")
    images = torch.stack([test[int(i)][0] for i in index])
    labels = torch.tensor([int(test[int(i)][1]) for i in index])
    model = load_model(find_checkpoint(run)[1], torch.device("cpu"))
    np.testing.assert_array_equal(np.load(scores / "digits_test.npy"),
                                  real(model, images, "cpu", 512, seed=0, labels=labels))


def test_cli_non_finite_scores_are_named_never_a_crash_or_nan_json(tmp_path, capsys):
    """A model whose forward overflows (a coupling network's output bias set to 1e30: finite weights, since a
    checkpoint holding NaN is refused as damaged, but an infinite log-density): the sets are still tabled, each
    with its count of non-finite images, no mean and no AUROC (it was an AUROC traceback that lost every result,
    and with one set "nan" rows and NaN in the JSON)."""
    from glowfast.checkpoint import find_checkpoint
    from glowfast.train import main as train_main

    from test_train import TINY

    run = tmp_path / "run"
    assert train_main(TINY + ["--steps", "2", "--eval-interval", "2", "--run-dir", str(run)]) == 0
    path, state = find_checkpoint(run)
    bias = next(k for k in state["model"] if k.endswith(".bias") and "coupling" in k)
    state["model"][bias].fill_(1e30)
    torch.save(state, path)
    out = tmp_path / "eval.json"
    capsys.readouterr()
    assert main(["--run", str(run), "--datasets", "digits", "noise", "--n", "20", "--device", "cpu",
                 "--json", str(out)]) == 0
    captured = capsys.readouterr()
    for name in ("digits:test", "noise:test"):
        assert f"warning: {name}: 20 of 20 images have non-finite bits/dim" in captured.err

    def no_nan(name):
        raise AssertionError(f"{name} in the JSON")

    rows = json.loads(out.read_text(), parse_constant=no_nan)["rows"]
    assert [(r["n_nonfinite"], r["mean_bpd"], r["sem_bpd"]) for r in rows] == [(20, None, None)] * 2
    assert rows[1]["auroc_vs_first"] is None
    assert "| digits:test | p(x) | 20 | non-finite | — | — |" in captured.out


# ------------------------------------------------------------------ gaps found by mutation testing (12th session)
def test_colour_images_are_averaged_over_every_channel_too():
    """bits/dim divides by D = C·H·W. Every other test here uses 1-channel images, where C·H·W = H·W; a fresh additive
    Glow on 3-channel images is the same rotation of N(0, I) (module docstring), so the per-dimension closed form
    holds unchanged, for the per-image scores and for evaluate_bpd."""
    shape = (3, 8, 8)
    torch.manual_seed(0)
    model = Glow(shape, K=2, L=2, hidden_channels=8, coupling="additive").double().eval()
    g = torch.Generator().manual_seed(0)
    images = (torch.rand((40, *shape), generator=g) < torch.rand((40, 1, 1, 1), generator=g)).to(torch.uint8) * 255
    expected = _expected_bpd(images)
    assert nll_bits_per_dim(model, images, "cpu", batch_size=16).mean() == pytest.approx(expected.mean(), abs=2e-5)
    data = TensorDataset(images, torch.zeros(40, dtype=torch.long))
    assert evaluate_bpd(model, data, "cpu", batch_size=16) == pytest.approx(expected.mean(), abs=2e-5)


def test_conditional_evaluation_of_an_in_memory_dataset_keeps_each_image_with_its_label():
    """An in-memory dataset (ImageTensorDataset: the training runs' test sets) is batched by a fast path of its own.
    Its batches pair every image with its own label, in index order; and evaluate_bpd(y_condition=True) is the mean
    over images of −log p(x | its label) / (D ln 2), the seeded noise drawn batch by batch -- recomputed here from
    the model's forward. Distinct class priors make a misplaced label show."""
    from glowfast.data import DatasetInfo, ImageTensorDataset
    from glowfast.evaluate import iterate_batches

    model = _measure_preserving_glow(n_classes=3)
    with torch.no_grad():
        for p in model.prior.parameters():
            p.normal_(0, 0.3)
    images, labels = _images(30, seed=6), torch.arange(30) % 3
    ds = ImageTensorDataset(images, labels, DatasetInfo("pairs", SHAPE, 3))
    idx = [5, 0, 29, 7, 12, 3, 3]
    xs, ys = zip(*iterate_batches(ds, 4, idx))
    assert torch.equal(torch.cat(xs), images[idx]) and torch.equal(torch.cat(ys), labels[idx])

    @torch.no_grad()
    def by_hand(lab):
        g = torch.Generator().manual_seed(3)
        return float(torch.cat([model(images[i: i + 8], lab[i: i + 8], generator=g).bits_per_dim
                                for i in range(0, 30, 8)]).mean())

    expected = by_hand(labels)
    assert abs(expected - by_hand((labels + 1) % 3)) > 1e-3  # the label matters
    assert evaluate_bpd(model, ds, "cpu", batch_size=8, y_condition=True, seed=3) == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------ gaps found by mutation testing (12th session)
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from glowfast.train import main as train_main

    from test_train import TINY

    run = tmp_path_factory.mktemp("eval") / "run"
    assert train_main(TINY + ["--steps", "2", "--eval-interval", "2", "--run-dir", str(run)]) == 0
    return run


def test_negative_n_is_a_one_line_error(run, capsys):
    assert main(["--run", str(run), "--datasets", "digits", "--device", "cpu", "--n", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --batch-size and --dequant-samples must be >= 1, --n >= 0"


def test_synthetic_sets_default_to_10000_images(run, tmp_path):
    """--n 0 (the default) scores all of a real set and 10000 images of the synthetic noise set (the option's help)."""
    out = tmp_path / "eval.json"
    assert main(["--run", str(run), "--datasets", "digits", "noise", "--device", "cpu", "--batch-size", "2000",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["dataset"], r["n"]) for r in rows] == [("digits:test", 297), ("noise:test", 10000)]


def test_input_complexity_column_is_serras_score_recomputed_from_the_sets(run, tmp_path, capsys):
    """--input-complexity: each row's PNG bits/dim is that of its set's scored images (found again from the saved
    indices), and its AUROC is that of bits/dim minus PNG bits/dim (glowfast.ood's functions on the saved scores).
    A model whose images PNG cannot hold (2 channels) is refused before anything is scored."""
    from glowfast import Glow
    from glowfast.checkpoint import save_checkpoint
    from glowfast.data import get_dataset
    from glowfast.ood import auroc, input_complexity_score, png_bits_per_dim

    out, scores = tmp_path / "eval.json", tmp_path / "scores"
    assert main(["--run", str(run), "--datasets", "digits", "constant", "--n", "200", "--device", "cpu",
                 "--input-complexity", "--json", str(out), "--save-scores", str(scores)]) == 0
    table = capsys.readouterr().out
    assert "| mean PNG bits/dim | AUROC (input complexity) |" in table
    rows = json.loads(out.read_text())["rows"]
    digits = get_dataset("digits", "test")
    images = torch.stack([digits[i][0] for i in np.load(scores / "digits_test_index.npy")])
    png = png_bits_per_dim(images)
    np.testing.assert_array_equal(np.load(scores / "digits_test_png.npy"), png)
    assert rows[0]["mean_png_bpd"] == pytest.approx(png.mean(), rel=1e-12)
    s_digits = input_complexity_score(np.load(scores / "digits_test.npy"), images)
    s_constant = np.load(scores / "constant_test.npy") - np.load(scores / "constant_test_png.npy")
    assert rows[1]["auroc_input_complexity_vs_first"] == pytest.approx(auroc(s_digits, s_constant), abs=1e-12)
    assert rows[1]["auroc_input_complexity_vs_first"] != rows[1]["auroc_vs_first"]
    assert rows[1]["mean_png_bpd"] < rows[0]["mean_png_bpd"]  # constant images compress better than digits

    two_channels = tmp_path / "two.pt"
    model = Glow((2, 8, 8), K=1, L=1, hidden_channels=4)
    save_checkpoint({"model": model.state_dict(), "model_config": model.config}, two_channels)
    code = main(["--checkpoint", str(two_channels), "--datasets", "digits", "--device", "cpu", "--input-complexity"])
    err = capsys.readouterr().err
    assert code == 2 and "--input-complexity measures PNG lengths of 1- or 3-channel images; the model's have 2" \
        in err, err
