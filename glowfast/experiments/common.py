"""Shared machinery of the experiments: configs, data, training, likelihoods, images and reports."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import textwrap
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from .._checks import check_device_exists
from ..amp import AMP_MODES, apply_network_options
from ..checkpoint import CheckpointError, find_checkpoint, save_checkpoint
from ..data import DatasetNotFoundError, dataset_info, get_dataset, is_folder_dataset
from ..ema import ParameterEMA
from ..evaluate import class_log_likelihoods, nll_bits_per_dim  # noqa: F401  (re-exported)
from ..images import image_grid
from ..model import Glow

# ------------------------------------------------------------------------------------------------ configs


LR_DECAYS = ("none", "cosine")


def lr_factor(step: int, progress: float, warmup: int, decay: str) -> float:
    """The learning rate's multiplier at ``step`` (0-based) with ``progress`` in [0, 1] of the run done: linear
    warm-up over ``warmup`` steps, times the decay ("none": 1; "cosine": 1 at progress 0 down to 0 at 1)."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    if decay == "none":
        return warm
    return warm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


@dataclass(frozen=True)
class ModelSpec:
    """One model to train: architecture + data + optimisation. Its hash names its cache folder."""

    dataset: str
    size: int
    K: int
    L: int
    hidden: int
    coupling: str = "affine"
    permutation: str = "invconv"
    lu: bool = True
    conditional: bool = True
    batch: int = 64
    steps: int = 200
    lr: float = 1e-3
    warmup: int = 50
    max_grad_norm: float = 50.0
    time_limit_s: float = 1e9  # training stops early (and says so) when it runs past this
    eval_every: int = 0  # 0: evaluate only at the end
    eval_n: int = 1000  # test images for the periodic evaluation (0 = all)
    holdout: int = 0  # last `holdout` training images are held out (typicality's validation set)
    seed: int = 0
    # > 0: keep an exponential moving average of the weights (glowfast.ema); periodic evaluations use it, and the
    # model kept is the average or the last iterate, whichever does better on the held-out images
    ema: float = 0.0
    # CUDA only: capture forward + backward in a CUDA graph and replay it every step (glowfast.cuda_graph); the
    # fused path's step is launch-bound at these sizes, so the same time cap trains more steps
    cuda_graphs: bool = False
    # "cosine": after the warm-up the learning rate falls from lr to 0 along a half cosine of the run's progress,
    # the larger of steps / ``steps`` and training time / ``time_limit_s`` (a time-capped run decays by its cap).
    # "none" (every config): constant. Measured on CPU (results/README.md), cosine did worse on a model this far
    # from converged: the small config's MNIST model, 2000 steps, 2.84 test bits/dim against constant's 2.66.
    lr_decay: str = "none"
    # the coupling networks' precision and layout, as `python -m glowfast.train --amp bf16 --channels-last`
    # (glowfast.amp): bf16 autocast in the networks only (ActNorm, the 1x1 convs, log-determinants and the loss stay
    # fp32); the same function in NHWC. Applied wherever the model is built, so evaluation and sampling run the
    # networks as they were trained. On the H200 the pair doubled the CIFAR-10 step's throughput (RESULTS.md).
    amp: str = "none"
    channels_last: bool = False

    def __post_init__(self):
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {', '.join(LR_DECAYS)}, got {self.lr_decay!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")

    def key(self) -> str:
        values = asdict(self)
        # specs that leave these at their defaults keep the cache names they had before the fields existed
        defaults = {f.name: f.default for f in fields(self)}
        for name in ("ema", "cuda_graphs", "lr_decay", "amp", "channels_last"):
            if values[name] == defaults[name]:
                del values[name]
        blob = json.dumps(values, sort_keys=True).encode()
        tag = f"{self.dataset}-{self.size}px-K{self.K}L{self.L}h{self.hidden}-{self.coupling}-{self.permutation}"
        return f"{tag}{'-cond' if self.conditional else ''}-{hashlib.sha1(blob).hexdigest()[:8]}"


@dataclass(frozen=True)
class Preset:
    """Sizes of one config (tiny: CPU smoke test; small: ~10 min of CPU; full: one H100, < 10 min/command)."""

    name: str
    main: ModelSpec  # the shared class-conditional model of experiments 2-6
    reverse_steps: int  # the second OOD model (trained on the OOD set of the main model), steps
    reverse_time_limit_s: float
    ablation: ModelSpec  # the base model of the ablations (unconditional)
    ood_n: int  # images scored per OOD set (and of the in-distribution test set), 0 = all
    score_n_train: int  # training images scored for typicality's entropy estimate
    typicality_K: int
    typicality_batches: int
    grid_n: int  # samples per temperature grid (a square number)
    per_class: int  # samples per class in the class-conditional grid
    interp_steps: int
    notes: str = ""


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        main=ModelSpec("mnist", 16, K=2, L=2, hidden=32, batch=64, steps=120, warmup=20, eval_n=256, holdout=500,
                       time_limit_s=25, ema=0.999),
        reverse_steps=60, reverse_time_limit_s=12,
        ablation=ModelSpec("mnist", 16, K=2, L=2, hidden=32, conditional=False, batch=64, steps=40, warmup=10,
                           eval_every=10, eval_n=256, time_limit_s=10),
        ood_n=512, score_n_train=512, typicality_K=200, typicality_batches=200, grid_n=16, per_class=4,
        interp_steps=6,
        notes="CPU smoke test: a tiny model trained for seconds; numbers are meaningless."),
    "small": Preset(
        name="small",
        main=ModelSpec("mnist", 28, K=4, L=2, hidden=64, batch=64, steps=100000, warmup=100, eval_n=2000,
                       holdout=5000, time_limit_s=480, ema=0.999),
        reverse_steps=100000, reverse_time_limit_s=240,
        ablation=ModelSpec("mnist", 28, K=4, L=2, hidden=64, conditional=False, batch=64, steps=300, warmup=50,
                           eval_every=50, eval_n=1000, time_limit_s=300),
        ood_n=2000, score_n_train=5000, typicality_K=1000, typicality_batches=1000, grid_n=64, per_class=8,
        interp_steps=8,
        notes="CPU, small model (2 cores): trained for minutes, far from converged."),
    "full": Preset(
        name="full",
        # steps: more than the cap allows (an H200 ran 4,840 in the 270 s), so the cap decides how far the model
        # trains and no GPU time is left unused on a faster GPU or path
        main=ModelSpec("mnist", 28, K=16, L=2, hidden=512, batch=256, steps=12000, warmup=200, eval_n=0,
                       holdout=5000, time_limit_s=270, ema=0.999, cuda_graphs=True),
        reverse_steps=2000, reverse_time_limit_s=120,
        ablation=ModelSpec("mnist", 28, K=8, L=2, hidden=256, conditional=False, batch=256, steps=1500,
                           warmup=100, eval_every=100, eval_n=2000, time_limit_s=120, cuda_graphs=True),
        ood_n=0, score_n_train=10000, typicality_K=2000, typicality_batches=2000, grid_n=64, per_class=10,
        interp_steps=9,
        notes="One GPU: every command < 10 min (measured on an H200: the longest, samples with its training, "
              "288 s; see results/README.md)."),
}

TINY_FALLBACK = "digits"  # used by the tiny config when MNIST is not under --data-dir (no download needed)


def resolve_preset(name: str, data_dir: str | os.PathLike, steps: int | None = None,
                   time_limit: float | None = None, networks: dict | None = None,
                   batch: int | None = None) -> tuple[Preset, list[str]]:
    """The preset, with the tiny config's fallback to digits when MNIST is missing; returns (preset, notes).
    `steps`, `time_limit`, `networks` ({"amp": ..., "channels_last": ...}) and `batch` override every model's."""
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; choose from {', '.join(PRESETS)}")
    p = PRESETS[name]
    notes = []
    if not dataset_available("mnist", data_dir):
        if name != "tiny":
            raise DatasetNotFoundError(
                f"MNIST is not under {data_dir!r}: run `python -m glowfast.data prepare mnist --data-dir "
                f"{data_dir}` (or use --config tiny, which falls back to scikit-learn's digits)")
        notes.append(f"MNIST not found under {data_dir}: the tiny config uses the 8x8 digits dataset instead.")
        p = replace(p, main=replace(p.main, dataset=TINY_FALLBACK, size=8, holdout=200),
                    ablation=replace(p.ablation, dataset=TINY_FALLBACK, size=8), ood_n=256, score_n_train=300)
    if steps is not None:
        p = replace(p, main=replace(p.main, steps=steps), ablation=replace(p.ablation, steps=steps),
                    reverse_steps=steps)
    if time_limit is not None:
        p = replace(p, main=replace(p.main, time_limit_s=time_limit),
                    ablation=replace(p.ablation, time_limit_s=time_limit), reverse_time_limit_s=time_limit)
    if networks:  # {"amp": ..., "channels_last": ...} for every model (the reverse model follows main)
        p = replace(p, main=replace(p.main, **networks), ablation=replace(p.ablation, **networks))
    if batch is not None:  # the reverse model follows main
        p = replace(p, main=replace(p.main, batch=batch), ablation=replace(p.ablation, batch=batch))
    return p, notes


# ------------------------------------------------------------------------------------------------ data

_AVAILABLE: dict[tuple[str, str], bool] = {}


def dataset_available(name: str, data_dir) -> bool:
    key = (name, str(Path(data_dir).resolve()))
    if key not in _AVAILABLE:
        try:
            get_dataset(name, "test", data_dir)
            _AVAILABLE[key] = True
        except (DatasetNotFoundError, FileNotFoundError):
            _AVAILABLE[key] = False
    return _AVAILABLE[key]


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    name: str
    index: torch.Tensor | None = None  # int64 (N,): each image's index in the dataset split (load_split's subsets)


def load_split(name: str, split: str, data_dir, size: int, image_shape=None, n: int | None = None,
               in_dist: str | None = None) -> Split:
    """uint8 images + labels of a dataset split at `size`. Besides glowfast.data's sets:
    ``inverted-<name>`` = 255 - images of another set (e.g. inverted-digits)."""
    if name.startswith("inverted-") and name != "inverted-mnist":
        base = load_split(name[len("inverted-"):], split, data_dir, size, n=n)
        return Split(255 - base.images, base.labels, name, base.index)
    if name in ("noise", "constant"):
        ds = get_dataset(name, split, data_dir, image_shape=tuple(image_shape), n=n or 2000)
    elif is_folder_dataset(name) and image_shape is not None:  # converted to the model's channels
        ds = get_dataset(name, split, data_dir, size=size, channels=image_shape[0])
    else:
        ds = get_dataset(name, split, data_dir, size=size)
    idx = torch.arange(len(ds))
    if n is not None and n < len(ds):  # a fixed random subset (the same for in-memory and lazily read sets)
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1234))[:n].sort().values
    images = getattr(ds, "images", None)
    labels = getattr(ds, "labels", None)
    if isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor):
        images, labels = images[idx], labels[idx]
    else:
        pairs = [ds[int(i)] for i in idx]
        images = torch.stack([torch.as_tensor(p[0]) for p in pairs])
        labels = torch.tensor([int(p[1]) for p in pairs])
    return Split(images.contiguous(), labels.to(torch.int64), name, idx)


def train_holdout(spec: ModelSpec, data_dir) -> tuple[Split, Split | None]:
    """The training split minus its last `holdout` images, and those held-out images (validation)."""
    full = load_split(spec.dataset, "train", data_dir, spec.size)
    if spec.holdout <= 0:
        return full, None
    h = min(spec.holdout, full.images.shape[0] // 5)
    return (Split(full.images[:-h], full.labels[:-h], full.name),
            Split(full.images[-h:], full.labels[-h:], full.name + "-heldout"))


# ------------------------------------------------------------------------------------------------ device & model


def resolve_device(device: str) -> torch.device:
    """auto / cpu / cuda / cuda:N as a torch.device; RuntimeError for a CUDA device this machine does not have."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    check_device_exists(dev)
    return dev


def build_model(spec: ModelSpec) -> Glow:
    """The model of `spec` on the reference backend (`set_backend` picks the compute path once it is on its device)."""
    info = dataset_info(spec.dataset, spec.size)
    n_classes = info.n_classes if spec.conditional and info.n_classes >= 2 else None
    model = Glow(info.image_shape, K=spec.K, L=spec.L, hidden_channels=spec.hidden, coupling=spec.coupling,
                 permutation=spec.permutation, lu=spec.lu, n_classes=n_classes, backend="reference")
    apply_network_options(model, {"amp": spec.amp, "channels_last": spec.channels_last})
    return model


_WARNED: set[str] = set()


def set_backend(model: Glow, backend: str, device: torch.device) -> str:
    """Set `backend`, falling back to 'reference' (with a warning) when it cannot run here.
    Returns the compute path actually used on `device`."""
    model.backend = backend
    try:
        with torch.no_grad():
            x = torch.zeros((2, *model.image_shape), dtype=torch.uint8, device=device)
            y = torch.zeros(2, dtype=torch.long, device=device) if model.n_classes else None
            was = model.training
            model.eval()
            model(x, y)
            model.train(was)
        return model.resolve_backend(device)
    except Exception as e:  # noqa: BLE001 - e.g. a Triton compile error (TritonError is no RuntimeError)
        if backend == "reference":
            raise
        msg = f"backend={backend!r} unavailable ({type(e).__name__}: {e}); using 'reference'"
        if msg not in _WARNED:
            _WARNED.add(msg)
            warnings.warn(msg, stacklevel=2)
        model.backend = "reference"
        return "reference"


# ------------------------------------------------------------------------------------------------ likelihoods


# ------------------------------------------------------------------------------------------------ training


@dataclass
class Trained:
    model: Glow
    spec: ModelSpec
    history: dict = field(default_factory=dict)  # steps, test_bpd, train_bpd, wall_s, ...
    path: Path | None = None
    cached: bool = False


def _log(msg: str) -> None:
    print(f"[glowfast.experiments {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train(spec: ModelSpec, data_dir, device: torch.device, backend: str = "auto",
          cache_dir: str | os.PathLike | None = None, log_every: int = 100) -> Trained:
    """Train (or load from ``cache_dir/<spec.key()>``) the model of ``spec``.

    A minimal loop on in-memory uint8 tensors (Adam, linear warm-up, gradient clipping, uniform
    dequantisation); ActNorm initialises itself on the first batch. Test bits/dim is evaluated every
    ``spec.eval_every`` steps on ``spec.eval_n`` test images (fixed dequantisation noise) for the
    Figure-3-style curves. Checkpoints are written with glowfast.checkpoint.
    """
    run_dir = Path(cache_dir) / spec.key() if cache_dir is not None else None
    if run_dir is not None and (run_dir / "checkpoints").is_dir():
        try:
            _, state = find_checkpoint(run_dir, map_location="cpu")
            if state.get("spec") == asdict(spec) and state.get("complete"):
                model = build_model(spec)
                model.load_state_dict(state["model"])
                model.to(device)
                set_backend(model, backend, device)
                _log(f"loaded cached model {run_dir}")
                return Trained(model, spec, state["history"], run_dir, cached=True)
        except CheckpointError as e:
            warnings.warn(f"ignoring cache {run_dir}: {e}", stacklevel=2)

    torch.manual_seed(spec.seed)
    tr, held = train_holdout(spec, data_dir)
    te = load_split(spec.dataset, "test", data_dir, spec.size)
    if spec.eval_n and spec.eval_n < te.images.shape[0]:
        g = torch.Generator().manual_seed(99)
        idx = torch.randperm(te.images.shape[0], generator=g)[: spec.eval_n]
        te = Split(te.images[idx], te.labels[idx], te.name)
    x_all, y_all = tr.images.to(device), tr.labels.to(device)
    n = x_all.shape[0]
    batch = min(spec.batch, n)
    model = build_model(spec).to(device)
    path_used = set_backend(model, backend, device)
    # fused Adam on CUDA: one kernel per step instead of one per tensor group (the step is launch-bound)
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr, fused=device.type == "cuda")
    progress = [0.0]  # of the run, for lr_decay: max(steps done / steps, training time / time limit)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, progress[0], spec.warmup, spec.lr_decay))
    conditional = model.n_classes is not None
    hist = {"step": [], "test_bpd": [], "train_bpd": [], "wall_s": [], "compute_path": path_used,
            "device": str(device), "n_train": n}

    def evaluate(step: int, train_bpd: float, t_train: float) -> None:
        with eval_weights():
            bpd = nll_bits_per_dim(model, te.images, device, labels=te.labels if conditional else None)
        model.train()
        hist["step"].append(step)
        hist["test_bpd"].append(float(bpd.mean()))
        hist["train_bpd"].append(train_bpd)
        hist["wall_s"].append(t_train)
        _log(f"{spec.key()} step {step}: test bpd {bpd.mean():.4f} (train {train_bpd:.4f}, {t_train:.0f}s)")

    ema: ParameterEMA | None = None  # created after the first update (ActNorm initialises in the first forward)

    def eval_weights():
        return ema.applied() if ema is not None else contextlib.nullcontext()

    params = list(model.parameters())

    def loss_and_grads(xb, yb):
        """Forward, backward and gradient clipping without a host sync (CUDA-graph capturable)."""
        loss = model(xb, yb if conditional else None).bits_per_dim.mean()
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        return torch.stack([loss.detach(), gnorm.detach().to(loss.dtype)])

    use_graphs = spec.cuda_graphs and device.type == "cuda"
    hist["cuda_graphs"] = "on" if use_graphs else ("off: not a CUDA device" if spec.cuda_graphs else "off")
    graphed = None

    model.train()
    perm = torch.randperm(n, device=device)
    pos = 0
    if path_used == "fused" and device.type == "cuda":
        first = perm[:batch]
        hist["precompile"] = _precompile(model, x_all[first], y_all[first] if conditional else None)
    t_train = 0.0  # training time only (evaluation excluded)
    running = []
    step = 0
    skipped = in_a_row = 0
    stopped_early = False
    if spec.eval_every:
        evaluate(0, float("nan"), 0.0)
    t0 = time.perf_counter()
    while step < spec.steps:
        if pos + batch > n:
            perm, pos = torch.randperm(n, device=device), 0
        idx = perm[pos: pos + batch]
        pos += batch
        xb, yb = x_all[idx], y_all[idx]
        if use_graphs and graphed is None:
            graphed = _capture_step(loss_and_grads, (xb, yb), model, spec, hist)
            use_graphs = graphed is not None
        if use_graphs:
            stats = graphed(xb, yb)  # static outputs: overwritten by the next replay
        else:
            opt.zero_grad(set_to_none=True)
            stats = loss_and_grads(xb, yb)
        loss = stats[0]
        if not bool(torch.isfinite(stats).all()):  # skip the update (one sync per step)
            skipped, in_a_row = skipped + 1, in_a_row + 1
            hist["skipped_nonfinite_steps"] = skipped
            # a diverged model fails every step; sporadic bad batches over a long run must not lose the run
            if in_a_row > 20:
                raise FloatingPointError(f"{spec.key()}: {in_a_row} non-finite losses/gradients in a row by step "
                                         f"{step}")
            continue
        in_a_row = 0
        opt.step()
        # the clock is read every 10 steps (a sync): between reads the step count moves the progress on
        progress[0] = max(progress[0], (step + 1) / spec.steps)
        sched.step()
        if spec.ema:
            ema = ema or ParameterEMA(model, spec.ema)
            ema.update()
        step += 1
        running.append(loss.clone())
        do_eval = bool(spec.eval_every) and step % spec.eval_every == 0
        if not (step % 10 == 0 or do_eval or step == spec.steps or step % log_every == 0):
            continue
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        t_train, t0 = t_train + now - t0, now
        over = t_train > spec.time_limit_s
        progress[0] = max(progress[0], t_train / spec.time_limit_s)
        recent = float(torch.stack(running[-min(len(running), max(10, spec.eval_every or 50)):]).mean())
        running = running[-200:]
        if not math.isfinite(recent):
            raise FloatingPointError(f"{spec.key()}: training loss became {recent} by step {step}")
        if step % log_every == 0:
            _log(f"{spec.key()} step {step}/{spec.steps} train bpd {recent:.4f} ({t_train:.0f}s)")
        if do_eval or step == spec.steps or over:
            evaluate(step, recent, t_train)
            t0 = time.perf_counter()
        if over:
            stopped_early = step < spec.steps
            if stopped_early:
                _log(f"{spec.key()}: time limit {spec.time_limit_s:.0f}s reached at step {step}/{spec.steps}")
            break
    if graphed is not None:  # release the graph and the gradients that live in its memory pool
        graphed = None
        model.zero_grad(set_to_none=True)
    hist["eval_weights"] = "raw"
    if ema is not None:
        # from here on the model holds the weights it keeps; the final evaluation below is of those (an
        # evaluation already made at this step used the average: it is redone)
        _select_weights(model, ema, spec, held, device, hist)
        ema = None
        if hist["step"] and hist["step"][-1] == step:
            for key in ("step", "test_bpd", "train_bpd", "wall_s"):
                hist[key].pop()
    if not hist["step"] or hist["step"][-1] != step:
        evaluate(step, float(torch.stack(running[-50:]).mean()) if running else float("nan"), t_train)
    hist.update(steps_done=step, stopped_by_time_limit=stopped_early, train_s=t_train,
                s_per_step=t_train / max(1, step), lr_decay=spec.lr_decay,
                # the rate the schedule reached (a time limit's progress is read after the last update)
                final_lr=spec.lr * lr_factor(step, progress[0], spec.warmup, spec.lr_decay))
    model.eval()
    if run_dir is not None:
        save_checkpoint({"model": model.state_dict(), "config": dict(model.config), "spec": asdict(spec),
                         "history": hist, "complete": True}, run_dir / "checkpoints")
    return Trained(model, spec, hist, run_dir)


def _precompile(model: Glow, xb: torch.Tensor, yb: torch.Tensor | None) -> dict:
    """ActNorm's init on the first batch, then the fused kernels of a training step compiled in parallel
    (glowfast.fused.precompile_training_step) instead of one after another inside the first steps' time.

    The init runs on a forked RNG, so it draws the dequantisation noise the first step then draws again: the
    same initial parameters as the first step's own init would give, and the same training trajectory."""
    from ..fused import precompile_record

    with torch.random.fork_rng(devices=[xb.device] if xb.is_cuda else []), torch.no_grad():
        model(xb, yb)
    record = precompile_record(model, xb, yb)
    if "error" in record:
        warnings.warn(f"compiling the kernels ahead of the first step failed ({record['error']})", stacklevel=2)
    return record


_CAPTURE_FAILED: list[str] = []  # a capture that failed once is not retried in this process (the next model)


def _capture_step(fn, inputs, model: Glow, spec: ModelSpec, hist: dict):
    """glowfast.cuda_graph.GraphedStep of `fn` (forward + backward replayed from one CUDA graph: one launch per
    training step instead of thousands), or None -- with a warning and the reason in `hist` -- when the capture
    fails, so the run continues eagerly instead of ending."""
    from ..cuda_graph import GraphedStep

    if _CAPTURE_FAILED:
        hist["cuda_graphs"] = f"off: an earlier capture in this process failed ({_CAPTURE_FAILED[0]})"
        return None
    try:
        return GraphedStep(fn, inputs, model.parameters())
    except (RuntimeError, ValueError) as e:
        # a sync inside the capture surfaces as capture_end's "previous error": the cause is the context
        causes = [c for c in (e, e.__context__) if c is not None]
        reason = " <- ".join(f"{type(c).__name__}: {str(c).splitlines()[0][:200] if str(c) else ''}" for c in causes)
        _CAPTURE_FAILED.append(reason)
        hist["cuda_graphs"] = f"off: capture failed ({reason})"
        warnings.warn(f"{spec.key()}: CUDA-graph capture failed ({reason}); training eagerly", stacklevel=2)
        # a failed capture can leave this thread on the capture's side stream
        torch.cuda.set_stream(torch.cuda.default_stream(inputs[0].device))
        torch.cuda.synchronize()
        for p in model.parameters():
            p.grad = None
        return None


def _select_weights(model: Glow, ema: ParameterEMA, spec: ModelSpec, held: Split | None, device, hist: dict,
                    max_images: int = 2000) -> None:
    """Keep the moving average or the last iterate, whichever has the lower bits/dim on the held-out training
    images `held` (never the test set); without a held-out split, the average. Both values go into ``hist``."""
    if held is None:
        ema.copy_to()
        hist["eval_weights"] = f"ema {spec.ema:g}"
        return
    images, labels = held.images[:max_images], held.labels[:max_images]
    cond = labels if model.n_classes else None
    raw = float(nll_bits_per_dim(model, images, device, labels=cond).mean())
    with ema.applied():
        averaged = float(nll_bits_per_dim(model, images, device, labels=cond).mean())
    hist["heldout_bpd"] = {"last_iterate": raw, f"ema {spec.ema:g}": averaged, "n": int(images.shape[0])}
    if averaged <= raw:
        ema.copy_to()
        hist["eval_weights"] = f"ema {spec.ema:g}"
    _log(f"{spec.key()}: held-out bpd last iterate {raw:.4f}, EMA {averaged:.4f}: keeping {hist['eval_weights']}")


# ------------------------------------------------------------------------------------------------ images


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def save_grid(path: Path, images, nrow: int, title: str | None = None, row_labels=None, col_labels=None,
              scale: float = 0.5) -> Path:
    """Save an image grid as a PNG with matplotlib (optional title and row/column labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = image_grid(images, nrow)
    h, w = g.shape[:2]
    cell = images.shape[-1] + 1
    fig_w = max(3.0, w / cell * scale + (1.0 if row_labels is not None else 0.2))
    fig_h = max(2.0, h / cell * scale + (0.6 if title else 0.2) + (0.3 if col_labels is not None else 0))
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    ax.imshow(g, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if row_labels is not None:
        ch = images.shape[-2] + 1
        ax.set_yticks([1 + ch * i + ch / 2 for i in range(len(row_labels))])
        ax.set_yticklabels(row_labels, fontsize=7)
    if col_labels is not None:
        ax.set_xticks([1 + cell * i + cell / 2 for i in range(len(col_labels))])
        ax.set_xticklabels(col_labels, fontsize=7)
        ax.xaxis.tick_top()
    if title:
        ax.set_title(textwrap.fill(title, 100), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------------ reports


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "glowfast"],
                               cwd=root, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return os.environ.get("GLOWFAST_GIT_COMMIT", "unknown")
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("GLOWFAST_GIT_COMMIT", "unknown")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, " \
           f"{torch.get_num_threads()} torch threads"


def provenance(device: torch.device, argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    return {"command": "python -m glowfast.experiments " + " ".join(shlex.quote(a) for a in argv),
            "git_commit": git_commit(), "device": device_name(device), "torch": torch.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")}


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(type(o).__name__)


def _clean(o):
    """NaN/inf -> None so results.json stays strict JSON."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def write_results(out: Path, name: str, results: dict, markdown_body: str, prov: dict) -> None:
    """results.json (provenance + results) and results.md (provenance header + body)."""
    out.mkdir(parents=True, exist_ok=True)
    data = _clean(json.loads(json.dumps({"experiment": name, "provenance": prov, **results}, default=_json_default)))
    (out / "results.json").write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    head = [f"# {name}", "", "| | |", "| --- | --- |"]
    for k in ("command", "git_commit", "device", "torch", "date"):
        head.append(f"| {k} | `{prov[k]}` |")
    figs = sorted(p.name for p in out.glob("*.png"))
    body = "\n".join(head) + "\n\n" + markdown_body.strip() + "\n"
    if figs:
        body += "\n## Figures\n\n" + "\n".join(f"![{f}]({f})" for f in figs) + "\n"
    (out / "results.md").write_text(body)


def md_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "–" if not math.isfinite(v) else f"{v:.4f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def model_summary(t: Trained) -> dict:
    h = t.history
    return {"spec": asdict(t.spec), "cached": t.cached, "steps_done": h.get("steps_done"),
            "stopped_by_time_limit": h.get("stopped_by_time_limit"), "train_s": h.get("train_s"),
            "s_per_step": h.get("s_per_step"), "compute_path": h.get("compute_path"),
            "final_test_bpd_eval_subset": h["test_bpd"][-1] if h.get("test_bpd") else None,
            "eval_weights": h.get("eval_weights", "raw"), "heldout_bpd": h.get("heldout_bpd"),
            "cuda_graphs": h.get("cuda_graphs"), "precompile": h.get("precompile"),
            "skipped_nonfinite_steps": h.get("skipped_nonfinite_steps", 0),
            # a model given by --checkpoint: where it came from, and (glowfast.train runs) the run's own config
            **{k: h[k] for k in ("checkpoint", "run_config") if k in h}}


def reference_check(model: Glow, images: torch.Tensor, fused_bpd, device, n: int = 1000) -> dict:
    """The fused path's per-image bits/dim (`fused_bpd`, from nll_bits_per_dim over `images`) against the reference
    layers' on the first `n` images, same weights, same dequantisation noise (nll_bits_per_dim's private generator
    draws it batch by batch), both in full fp32. A GPU-only bug in the kernels would show here, not in the headline
    alone. Warns above 1e-3 bits/dim (fp32 rounding is ~1e-5)."""
    n = min(n, images.shape[0])
    backend = model.backend
    model.backend = "reference"
    try:
        ref = nll_bits_per_dim(model, images[:n], device)
    finally:
        model.backend = backend
    diff = np.abs(np.asarray(fused_bpd[:n], dtype=np.float64) - np.asarray(ref, dtype=np.float64))
    out = {"n": int(n), "fused_mean": float(np.mean(fused_bpd[:n])), "reference_mean": float(np.mean(ref)),
           "max_abs_diff": float(diff.max())}
    if not out["max_abs_diff"] <= 1e-3:
        warnings.warn(f"the fused path's bits/dim differ from the reference layers' by up to {out['max_abs_diff']:.3g} "
                      f"on {n} test images (expected ~1e-5): the headline may be wrong", stacklevel=2)
    return out


def bpd_unit_note(spec: ModelSpec) -> str:
    if spec.dataset in ("mnist", "fashion-mnist") and spec.size == 28:
        return "bits/dim per original 28x28 pixel (native size, no padding)"
    if spec.dataset in ("mnist", "fashion-mnist"):
        return (f"bits/dim per pixel of the {spec.size}x{spec.size} image (MNIST resized/padded: NOT comparable "
                "with the literature's 28x28 numbers)")
    return f"bits/dim per pixel of the {spec.size}x{spec.size} {spec.dataset} image"
