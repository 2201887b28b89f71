"""Command line and the shared context of the experiments (models and scores computed once per process)."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from .._cli import cudnn_autotune
from ..amp import AMP_MODES
from ..checkpoint import find_checkpoint
from ..data import DatasetNotFoundError
from ..ema import use_checkpoint_average
from ..sample import load_model
from .common import (
    ModelSpec,
    Trained,
    _log,
    bpd_unit_note,
    build_model,
    load_split,
    model_summary,
    nll_bits_per_dim,
    provenance,
    reference_check,
    resolve_device,
    resolve_preset,
    set_backend,
    train,
    write_results,
)

EXPERIMENTS = ("ablation-permutation", "ablation-coupling", "samples", "interpolation", "attributes", "ood",
               "typicality")


class Context:
    def __init__(self, args, preset, notes, device, out: Path):
        self.preset = preset
        self.notes = notes
        self.device = device
        self.backend = args.backend
        self.data_dir = args.data_dir
        self.cache = Path(args.cache)
        self.checkpoint = args.checkpoint
        self.args_cifar = args.cifar
        self.alpha = args.alpha
        self.out = Path(out)  # the experiment's folder: main() sets it per experiment
        self._models: dict[str, Trained] = {}
        self._scores: dict = {}
        self._main_test_bpd: dict | None = None
        self._failed: dict[str, str] = {}  # models whose training raised: not trained again by the next experiment
        self.warned: set[str] = set()  # what was already said on stderr

    def get_model(self, spec: ModelSpec) -> Trained:
        key = spec.key()
        if key in self._failed:
            raise RuntimeError(f"{key}: its training failed earlier in this process ({self._failed[key]})")
        if key not in self._models:
            try:
                self._models[key] = train(spec, self.data_dir, self.device, self.backend, self.cache)
            except Exception as e:
                self._failed[key] = f"{type(e).__name__}: {e}"
                raise
        return self._models[key]

    def main_model(self) -> Trained:
        if self.checkpoint:
            if "__checkpoint__" not in self._models:
                self._models["__checkpoint__"] = self._load_checkpoint(self.checkpoint)
            return self._models["__checkpoint__"]
        return self.get_model(self.preset.main)

    def _load_checkpoint(self, path) -> Trained:
        p, state = find_checkpoint(path, map_location="cpu")
        if "spec" in state:
            spec = ModelSpec(**{k: v for k, v in state["spec"].items() if k in {f.name for f in fields(ModelSpec)}})
            model = build_model(spec)
            model.load_state_dict(state["model"])
            averaged = use_checkpoint_average(model, state)
            history = dict(state.get("history") or {})
        elif "model_config" in state:
            # a glowfast.train checkpoint: the model as the run trained and evaluated it, as glowfast.sample and
            # glowfast.evaluate load it (moving average, and the networks' bf16 / channels-last / GEMM options)
            model = load_model(state, self.device, "reference")
            averaged = state.get("ema") is not None
            spec = _train_run_spec(state, model, self.preset.main.dataset)
            history = {"steps_done": state.get("step"), "run_config": state.get("config") or {}}
        else:
            raise ValueError(f"{p} is neither a glowfast.experiments nor a glowfast.train checkpoint")
        if averaged:  # the weights evaluated are the checkpoint's moving average, whatever the run kept before
            history["eval_weights"] = f"ema {float(state['ema']['decay']):g}"
        history["checkpoint"] = str(p)
        model.to(self.device).eval()
        set_backend(model, self.backend, self.device)
        _log(f"using checkpoint {p}{' (its weights moving average)' if averaged else ''}")
        return Trained(model, spec, history, p, cached=True)

    def scores(self, trained: Trained):
        from .ood_exp import Scores

        key = id(trained)
        if key not in self._scores:
            self._scores[key] = Scores(self, trained, self.preset.ood_n)
        return self._scores[key]

    def main_test_bpd(self) -> dict:
        """Headline numbers of the shared model on the whole test set (computed once)."""
        if self._main_test_bpd is None:
            t = self.main_model()
            te = load_split(t.spec.dataset, "test", self.data_dir, t.spec.size)
            d = {"n_test": int(te.images.shape[0]), "bpd_unit": bpd_unit_note(t.spec)}
            if t.model.n_classes:
                bpd, cll = nll_bits_per_dim(t.model, te.images, self.device, return_class_ll=True)
                d["generative_classifier_test_accuracy"] = float((cll.argmax(1) == te.labels.numpy()).mean())
            else:
                bpd = nll_bits_per_dim(t.model, te.images, self.device)
            d["test_bpd_marginal"] = float(bpd.mean())
            if t.model.n_classes:
                d["test_bpd_given_true_class"] = float(
                    nll_bits_per_dim(t.model, te.images, self.device, labels=te.labels).mean())
            if t.model.resolve_backend(self.device) == "fused":
                d["reference_check"] = reference_check(t.model, te.images, bpd, self.device)
            self._main_test_bpd = d
            _log(f"shared model: test bits/dim {d['test_bpd_marginal']:.4f} (marginal p(x), {d['n_test']} test "
                 f"images, {d['bpd_unit']})")
        return self._main_test_bpd

    def main_summary(self) -> dict:
        return {**model_summary(self.main_model()), **self.main_test_bpd()}


def _train_run_spec(state: dict, model, default_dataset: str) -> ModelSpec:
    """The spec of the model a glowfast.train checkpoint holds, from the run's own config (its config.json, also
    stored in the checkpoint): architecture, data and optimisation settings; none comes from the preset."""
    cfg = dict(state["model_config"])
    run = state.get("config") or {}
    default = {f.name: f.default for f in fields(ModelSpec)}

    def opt(key, field, cast):
        return cast(run[key]) if run.get(key) is not None else default[field]

    steps = run.get("steps") or state.get("step") or default["steps"]  # --epochs runs: the steps reached
    return ModelSpec(dataset=run.get("dataset", default_dataset), size=int(model.image_shape[-1]), K=int(cfg["K"]),
                     L=int(cfg["L"]), hidden=int(cfg.get("hidden_channels", 0)),
                     coupling=cfg.get("coupling", "affine"), permutation=cfg.get("permutation", "invconv"),
                     lu=bool(cfg.get("lu", True)), conditional=model.n_classes is not None,
                     batch=opt("batch_size", "batch", int), steps=int(steps),
                     lr=opt("lr", "lr", float), warmup=opt("warmup_steps", "warmup", int),
                     max_grad_norm=opt("grad_clip", "max_grad_norm", float),
                     eval_every=opt("eval_interval", "eval_every", int), eval_n=0, holdout=0,
                     seed=opt("seed", "seed", int), ema=float(run.get("ema_decay") or 0.0),
                     cuda_graphs=bool(run.get("cuda_graphs")))


def run_one(ctx: Context, name: str) -> tuple[dict, str]:
    from .ablation import run_ablation
    from .generative import run_attributes, run_interpolation, run_samples
    from .ood_exp import run_ood, run_typicality

    if name == "ablation-permutation":
        return run_ablation(ctx, "permutation")
    if name == "ablation-coupling":
        return run_ablation(ctx, "coupling")
    if name == "samples":
        return run_samples(ctx)
    if name == "interpolation":
        return run_interpolation(ctx)
    if name == "attributes":
        return run_attributes(ctx)
    if name == "ood":
        return run_ood(ctx)
    if name == "typicality":
        return run_typicality(ctx, ctx.alpha)
    raise ValueError(f"unknown experiment {name!r}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m glowfast.experiments",
                                 description="Reproduce the Glow literature's experiments (see module docstring).")
    ap.add_argument("names", nargs="+", metavar="NAME", choices=(*EXPERIMENTS, "all"),
                    help=f"one or more of {', '.join(EXPERIMENTS)}, or all")
    ap.add_argument("--config", default="tiny", choices=("tiny", "small", "full"))
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--out", default=None, help="output folder (one NAME) or root folder (several / all)")
    ap.add_argument("--cache", default=None, help="trained-model cache (default: OUT_ROOT/models)")
    ap.add_argument("--checkpoint", default=None, help="use this model as the shared model of experiments 2-6")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="auto", choices=("auto", "reference", "fused"))
    ap.add_argument("--steps", type=int, default=None, help="override every model's number of training steps")
    ap.add_argument("--time-limit", type=float, default=None, help="override each model's training time cap (s)")
    ap.add_argument("--batch", type=int, default=None,
                    help="override every model's training batch size (e.g. to compare, within the same time cap, "
                         "more steps on smaller batches)")
    ap.add_argument("--amp", default=None, choices=AMP_MODES,
                    help="every model's coupling networks in bf16 autocast (default: the config's; none in every "
                         "config)")
    ap.add_argument("--channels-last", action="store_true", default=None,
                    help="every model's coupling networks in NHWC (cuDNN's faster layout)")
    ap.add_argument("--alpha", type=float, default=0.99, help="typicality test confidence (paper: 0.99)")
    ap.add_argument("--cifar", action="store_true", help="ood, typicality: also train a CIFAR-10 model (skipped, and "
                    "said so, when its files are not under --data-dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                    help="CUDA: cuDNN times its convolution algorithms per input shape and keeps the fastest "
                         "(torch.backends.cudnn.benchmark, as benchmarks/ measures); --no-cudnn-benchmark keeps "
                         "its heuristic choice")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    bad = [f"--{k.replace('_', '-')} must be {want}, got {v}" for k, v, ok, want in (
        ("steps", args.steps, args.steps is None or args.steps >= 1, ">= 1"),
        ("batch", args.batch, args.batch is None or args.batch >= 1, ">= 1"),
        ("time_limit", args.time_limit, args.time_limit is None or args.time_limit > 0, "> 0"),
        ("alpha", args.alpha, 0 < args.alpha < 1, "in (0, 1)"),
        ("threads", args.threads, args.threads is None or args.threads >= 0, ">= 0")) if not ok]
    if bad:  # a model trained for 0 steps was cached and reported as if trained (found by a user-study audit)
        print(f"error: {bad[0]}", file=sys.stderr)
        return 2
    names = list(EXPERIMENTS) if "all" in args.names else list(dict.fromkeys(args.names))
    single = len(names) == 1
    root = Path(args.out) if args.out else (Path("results") / names[0] if single else Path("results"))
    cache_root = root.parent if single else root
    args.cache = args.cache or str(cache_root / "models")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        device = resolve_device(args.device)
    except (RuntimeError, ValueError) as e:
        print(f"error: --device {args.device}: {e}", file=sys.stderr)
        return 2
    try:
        networks = {k: v for k, v in (("amp", args.amp), ("channels_last", args.channels_last)) if v is not None}
        preset, notes = resolve_preset(args.config, args.data_dir, args.steps, args.time_limit, networks, args.batch)
    except DatasetNotFoundError as e:  # small / full without MNIST: one line, not a traceback
        print(f"error: --config {args.config}: {e}", file=sys.stderr)
        return 2
    for note in notes:  # e.g. the tiny config's fallback to the digits: on the console too, not only in results.md
        _log(note)
    if args.seed:
        preset = replace(preset, main=replace(preset.main, seed=args.seed),
                         ablation=replace(preset.ablation, seed=args.seed))
    argv_list = list(argv) if argv is not None else None
    prov = provenance(device, argv_list)
    if device.type == "cuda":
        prov["cudnn_benchmark"] = args.cudnn_benchmark
    ctx = Context(args, preset, notes, device, root)
    # cuDNN's autotuner on while the models train and score (the speed benchmarks/ measures); restored after
    with cudnn_autotune(device, args.cudnn_benchmark):
        timings, failed = {}, []
        for name in names:
            ctx.out = root if single else root / name
            ctx.out.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            _log(f"{name} (config {preset.name}, device {device}) -> {ctx.out}")
            try:
                if not name.startswith("ablation"):
                    # the shared model's headline first: an experiment that fails later (in sampling, say) cannot
                    # take it along
                    ctx.main_test_bpd()
                results, md = run_one(ctx, name)
            except Exception as e:  # noqa: BLE001 - one failed experiment must not lose the others of this command
                failed.append(name)
                tb = traceback.format_exc()
                print(tb, file=sys.stderr)
                _log(f"{name} FAILED: {type(e).__name__}: {e}")
                results = {"error": f"{type(e).__name__}: {e}", "traceback": tb}
                md = f"**This experiment failed**: `{type(e).__name__}: {e}` (the traceback is in results.json).\n"
                if ctx._main_test_bpd is not None and not name.startswith("ablation"):
                    results["model"] = ctx.main_summary()
            wall = time.perf_counter() - t0
            timings[name] = wall
            results = {"config": preset.name, "config_notes": preset.notes, "notes": notes, "wall_s": wall,
                       "preset": {"main": asdict(preset.main), "ablation": asdict(preset.ablation)}, **results}
            header = f"Config **{preset.name}**: {preset.notes}\n" + "".join(f"\n- {n}" for n in notes)
            m = results.get("model")
            if isinstance(m, dict) and "test_bpd_marginal" in m:
                steps = "" if m.get("steps_done") is None else f", {m['steps_done']} steps"  # unknown: say nothing
                steps += " (stopped by its time limit)" if m.get("stopped_by_time_limit") else ""
                source = f", checkpoint {m['checkpoint']} ({m['eval_weights']} weights)" if m.get("checkpoint") else ""
                header += (f"\n\nShared model: {m['spec']['dataset']} K={m['spec']['K']} L={m['spec']['L']} "
                           f"hidden={m['spec']['hidden']}{steps}{source}; test bits/dim "
                           f"{m['test_bpd_marginal']:.4f} (marginal p(x)"
                           + (f", {m['test_bpd_given_true_class']:.4f} given the true class; generative-classifier "
                              f"accuracy {m['generative_classifier_test_accuracy']:.3f}" if "test_bpd_given_true_class"
                              in m else "") + f") on {m['n_test']} test images, {m['bpd_unit']}.")
                if m.get("reference_check"):
                    rc = m["reference_check"]
                    header += (f" Fused path checked against the reference layers on the first {rc['n']} test images: "
                               f"max |difference| {rc['max_abs_diff']:.2e} bits/dim.")
            header += f"\n\nWall time of this command (this process, incl. training unless cached): {wall:.1f} s.\n\n"
            write_results(ctx.out, name, results, header + md, prov)
            _log(f"{name} {'FAILED' if name in failed else 'done'} in {wall:.1f}s")
    if failed:
        print(f"error: {len(failed)} experiment(s) failed: {', '.join(failed)} (their results.json hold the "
              "tracebacks; the others completed)", file=sys.stderr)
        return 1
    return 0
