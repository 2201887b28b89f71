"""The training loop behind ``python -m glowfast.train`` (see glowfast/train.py for the CLI).

Run folder (rank 0 writes everything):
    config.json        every option, the model config, dataset info, world size, glowfast/torch versions
    metrics.jsonl      one JSON object per line: {"type": "train" | "eval" | "nonfinite" | "resume" | ...}
    curves.png         train (per log interval) and test bits/dim against the step
    samples/           step{STEP:07d}_t{T}.png sample grids at each eval (one row per class if conditional)
    checkpoints/       last.pt and prev.pt (atomic, weights_only-loadable; see glowfast/checkpoint.py)
    summary.json       final status (completed, interrupted, stopped_nonfinite, failed), step, held-out bits/dim,
                       wall time, non-finite counts
    .lock              locked by the process training in the folder (glowfast/train.py: one per run folder)

Exactness of resumption: the data order is a DistributedSampler permutation seeded by ``seed + epoch``
(re-entered part-way through an epoch), the dequantisation noise comes from the global RNGs whose states
(torch CPU + CUDA, python, numpy; per rank) are checkpointed, and evaluation / sampling / ActNorm's init
batch use private generators; ``--hflip``'s flips are a function of (seed, epoch, image). On CPU a run resumed at
step k therefore reaches bit-identical parameters at step n as an uninterrupted run.

With ``ema_decay`` (``--ema-decay``) an exponential moving average of the weights (glowfast.ema, openai/glow's
Polyak averaging) is updated after every applied step and checkpointed; evaluation, the sample grids and
``python -m glowfast.sample`` use the averaged weights, training continues from the model's own.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import __version__
from .amp import apply_network_options, eager_networks
from .checkpoint import (
    LAST,
    PREV,
    CheckpointError,
    NonFiniteStateError,
    assert_finite_state,
    atomic_save,
    find_checkpoint,
    get_rng_state,
    save_checkpoint,
    set_rng_state,
)
from .cuda_graph import check_graphable
from .distributed import DistInfo, ResumableDistributedSampler, broadcast_module, is_dist
from .ema import ParameterEMA
from .evaluate import evaluate_bpd, unwrap
from .images import save_grid
from .model import Glow

TEMPERATURES = (0.0, 0.5, 0.7, 0.8, 1.0)
CHECKPOINT_FORMAT = "glowfast-checkpoint-v1"

__all__ = ["NonFiniteLossError", "ResumePastEndError", "RunFolderGoneError", "Trainer", "TEMPERATURES", "build_model",
           "initialize_actnorm", "save_grid", "sample_grid"]


class RunFolderGoneError(RuntimeError):
    """The run folder was removed or replaced while training: nothing more is written (it would be recreated
    without its config, lock or checkpoints)."""


# A checkpoint the trainer can continue from holds these (glowfast.checkpoint only knows a dict of tensors).
RESUME_KEYS = ("model", "optimizer", "scheduler", "step", "epoch", "epoch_pos", "rng")


class ResumePastEndError(ValueError):
    """A resume asked for fewer steps than the run has done (raised before the run's files are touched)."""


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_nonfinite`` consecutive non-finite losses / gradient norms."""


def build_model(cfg: dict, image_shape: Sequence[int], n_classes: int | None) -> Glow:
    return Glow(tuple(image_shape), K=cfg["K"], L=cfg["L"], hidden_channels=cfg["hidden_channels"],
                coupling=cfg["coupling"], permutation=cfg["permutation"], lu=cfg["lu"],
                learn_top=cfg.get("learn_top", True), n_classes=n_classes, n_bits=cfg["n_bits"],
                backend=cfg.get("backend", "auto"))


@torch.no_grad()
def initialize_actnorm(model: Glow, dataset, batch_size: int, seed: int, device: torch.device,
                       y_condition: bool = False, dist_info: DistInfo | None = None) -> None:
    """ActNorm's data-dependent init on ``batch_size`` random training images per rank.

    The images come from a private generator (the global RNG and the data order are untouched); under
    torch.distributed each rank takes a disjoint part of the same random subset and ActNorm averages the
    statistics over ranks, so the initialised parameters are identical everywhere. Runs the reference
    backend (the same math) so it does not depend on a fused path's handling of the init, and compiled coupling
    networks eagerly (`glowfast.amp.eager_networks`: nothing compiled for this one pass).
    """
    dist_info = dist_info or DistInfo()
    g = torch.Generator().manual_seed(seed + 7_654_321)
    n = len(dataset)
    take = min(n // dist_info.world_size, batch_size)
    perm = torch.randperm(n, generator=g)[: take * dist_info.world_size]
    idx = perm[dist_info.rank:: dist_info.world_size].tolist()
    xs, ys = zip(*(dataset[i] for i in idx))
    x = torch.stack(xs).to(device)
    y = torch.as_tensor(ys, dtype=torch.long, device=device) if y_condition else None
    glow = unwrap(model)
    was_training, backend = glow.training, glow.backend
    glow.train()
    glow.backend = "reference"
    try:
        with eager_networks():  # compiled networks: no graphs for this one pass (glowfast.amp.eager_networks)
            glow(x, y)
    finally:
        glow.backend = backend
        glow.train(was_training)


def sample_grid(model: Glow, temperature: float, n: int, seed: int, device: torch.device,
                n_classes: int | None = None, per_class: int = 8) -> tuple[torch.Tensor, int]:
    """Samples for a grid: (images in [0, 1], nrow). Class-conditional: one row of ``per_class`` per class."""
    glow = unwrap(model)
    g = torch.Generator(device=device).manual_seed(seed)
    was_training = glow.training
    glow.eval()
    try:
        if n_classes:
            y = torch.arange(n_classes, device=device).repeat_interleave(per_class)
            images = glow.sample(len(y), temperature=temperature, y=y, generator=g)
            return images, per_class
        images = glow.sample(n, temperature=temperature, generator=g)
        return images, max(1, int(math.sqrt(n)))
    finally:
        glow.train(was_training)


def _atomic_write_text(path: Path, text: str) -> None:
    """A run's text file, atomically (a failed write leaves the old file and no temporary); its folder must exist."""
    atomic_save(text.encode(), path, writer=lambda data, f: f.write(data), make_parents=False)


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl records; a torn last line (a killed writer) is ignored."""
    out = []
    if not path.exists():
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def hflip_mask(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Which of the training set's `n` images are flipped horizontally in `epoch` (``--hflip``): a fair coin per
    image from a generator seeded by (seed, epoch) alone, so a run resumed part-way through an epoch, and every DDP
    rank, see the same flips (and the dequantisation RNG is untouched)."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + 7 + int(epoch)) % 2**64)  # any int seed
    return torch.rand(n, generator=g) < 0.5


class Trainer:
    """Owns the model, optimiser, schedule, data order and run folder of one training run.

    ``callbacks``: callables ``cb(event, trainer)`` with event in ``"start"`` (after init / resume),
    ``"before_step"`` (``trainer.batch`` holds the batch about to be used; a callback may replace it),
    ``"after_step"``, ``"eval"`` and ``"end"``. They are the supported hook for extensions and tests.
    """

    def __init__(self, cfg: dict, run_dir: Path, train_set, test_set, image_shape, n_classes: int | None,
                 device: torch.device, dist_info: DistInfo | None = None,
                 callbacks: Sequence[Callable[[str, Trainer], Any]] = ()):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.train_set, self.test_set = train_set, test_set
        self.image_shape = tuple(image_shape)
        self.n_classes = n_classes if cfg["y_condition"] else None
        self.device = device
        self.dist = dist_info or DistInfo()
        self.callbacks = list(callbacks)
        self.is_main = self.dist.is_main
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.batch = None

        # Same model initialisation on every rank, then per-rank RNG streams for the dequantisation noise.
        torch.manual_seed(cfg["seed"])
        self.model = build_model(cfg, self.image_shape, self.n_classes).to(device)
        apply_network_options(self.model, cfg)
        self.model.memory_saving = bool(cfg.get("memory_saving"))

        per_rank = len(train_set) // self.dist.world_size
        self.batches_per_epoch = per_rank // cfg["batch_size"]
        if self.batches_per_epoch < 1:
            raise ValueError(f"batch size {cfg['batch_size']} is larger than the training set per rank "
                             f"({per_rank} images)")
        self.total_steps = cfg["steps"] if cfg.get("steps") else cfg["epochs"] * self.batches_per_epoch
        self.optimizer = self._make_optimizer()
        # after total_steps: LambdaLR evaluates the factor of step 0 at once, and the cosine needs the total
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.sampler = ResumableDistributedSampler(train_set, num_replicas=self.dist.world_size,
                                                   rank=self.dist.rank, shuffle=True, seed=cfg["seed"],
                                                   drop_last=True)
        self.step = 0
        self.epoch = 0
        self.epoch_pos = 0
        self.nonfinite_total = 0
        self.nonfinite_streak = 0
        self.best_test_bpd = math.inf
        self.last_test_bpd = math.nan
        self.elapsed = 0.0
        self.metrics: list[dict] = []
        self.ddp: nn.Module | None = None
        self.resumed_from: str | None = None
        self.graphed_step = None  # GraphedStep, captured at the first training step with cuda_graphs
        self.precompile_pending = True  # the first train_step compiles its kernels in parallel first (CUDA)
        self.ema: ParameterEMA | None = None  # with ema_decay: created in setup(), after ActNorm's init
        # A checkpoint may only be written between steps: mid-step, the RNG has drawn the step's noise (or the
        # optimiser has applied it) while `step` says it has not happened, and resuming would not be exact.
        self.at_step_boundary = False  # True once setup() is done, False while a step is in flight
        self.saved_step: int | None = None  # the step of the newest checkpoint (this process wrote or resumed from)
        self.stop_requested = False  # set by the first Ctrl-C (SIGINT); fit() stops at the next step boundary
        self.stop_signal: str | None = None  # the signal that requested it: "SIGINT" or "SIGTERM"
        self.last_eval_step: int | None = None  # the step of the newest evaluation (checkpointed)
        self._run_dir_id: tuple[int, int] | None = None  # (device, inode) of the run folder, taken in setup()
        self.stop_agreed = False  # under DDP: whether any rank had requested it at this step's all-reduce
        self.log_window: list[dict] = []  # train records since the last metrics.jsonl train record
        self._loader = None  # the training DataLoader of an on-disk dataset, made at the first epoch (_batches)
        if cfg.get("cuda_graphs"):
            if cfg.get("backend") == "reference" and not cfg["lu"]:
                raise ValueError("--cuda-graphs with --backend reference and --no-lu: the reference computes plain-W "
                                 "log-determinants with torch.linalg.slogdet, which synchronises the GPU and cannot "
                                 "be captured; use --backend auto/fused (one batched-LU call, no sync) or --lu")
            check_graphable(device)
            if self.dist.distributed:
                raise ValueError("--cuda-graphs is not supported with several processes (DDP) yet")

    # ------------------------------------------------------------------------------------------ set-up
    def _make_optimizer(self) -> torch.optim.Optimizer:
        opt = self.cfg["optimizer"].lower()
        params = self.model.parameters()
        wd = self.cfg.get("weight_decay", 0.0)
        if opt == "adamax":
            if self.cfg.get("fused_optimizer"):  # the same optimiser and state dict, one kernel per update
                from .optim import FusedAdamax

                return FusedAdamax(params, lr=self.cfg["lr"], weight_decay=wd)
            return torch.optim.Adamax(params, lr=self.cfg["lr"], weight_decay=wd)
        if opt == "adam":
            return torch.optim.Adam(params, lr=self.cfg["lr"], weight_decay=wd)
        raise ValueError(f"optimizer must be adamax or adam, got {opt!r}")

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps`` then constant (``lr_schedule="constant"``) or cosine to 0."""
        warm = self.cfg["warmup_steps"]
        if warm > 0 and step < warm:
            return (step + 1) / warm
        if self.cfg.get("lr_schedule", "constant") == "cosine":
            total = max(1, self.total_steps - warm)
            t = min(1.0, (step - warm) / total)
            return 0.5 * (1 + math.cos(math.pi * t))
        return 1.0

    def _emit(self, event: str) -> None:
        for cb in self.callbacks:
            cb(event, self)

    def log(self, record: dict) -> None:
        """Append a record to metrics.jsonl (rank 0) and keep it in memory."""
        record = {"type": record.pop("type", "info"), "step": self.step, **record}
        self.metrics.append(record)
        if self.is_main:
            self._assert_run_folder()
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()

    def _assert_run_folder(self) -> None:
        """RunFolderGoneError if the run folder is no longer the one setup() found (rank 0, before each write)."""
        if self._run_dir_id is not None and _dir_id(self.run_dir) != self._run_dir_id:
            raise RunFolderGoneError(f"the run folder {self.run_dir} was removed or replaced while training (at step "
                                     f"{self.step}); nothing more was written")

    def _check_resumable(self, state: dict) -> None:
        """find_checkpoint's check: a checkpoint of this trainer, of this model (CheckpointError names why not)."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"not a python -m glowfast.train checkpoint (format {state.get('format')!r}, "
                                  f"expected {CHECKPOINT_FORMAT!r})")
        missing = [k for k in RESUME_KEYS if k not in state]
        if missing:
            raise CheckpointError(f"incomplete checkpoint: no {', '.join(missing)}")
        saved, ours = state.get("model_config"), self.model_config()
        if isinstance(saved, dict) and _plain(saved) != _plain(ours):
            diff = sorted(k for k in set(saved) | set(ours) if _plain(saved.get(k)) != _plain(ours.get(k)))
            raise CheckpointError("a checkpoint of another model (" + ", ".join(
                f"{k} {saved.get(k)!r} there, {ours.get(k)!r} here" for k in diff) + ")")

    def model_config(self) -> dict:
        return {**self.model.config, "image_shape": list(self.model.config["image_shape"])}

    def setup(self, resume: bool) -> None:
        """Resume from the run's newest checkpoint, or initialise ActNorm from data; then wrap for DDP."""
        state = None
        if self.is_main:
            self._run_dir_id = _dir_id(self.run_dir)
        if resume:
            if not any((self.ckpt_dir / name).exists() for name in (LAST, PREV)):
                # killed before its first checkpoint: nothing to continue, start over
                if self.is_main:
                    print(f"note: no checkpoint in {self.ckpt_dir} yet; starting from step 0")
            else:
                # Files that exist but do not load are an error (CheckpointError): restarting would overwrite them.
                path, state = find_checkpoint(self.run_dir, map_location="cpu", check=self._check_resumable)
                self.resumed_from = str(path)
                if path.name == PREV and self.is_main and (self.ckpt_dir / LAST).exists():
                    # last.pt does not load: move it aside, or the next save would keep it as prev.pt in place
                    # of the good checkpoint this run continues from
                    bad = self.ckpt_dir / f"{LAST}.unreadable"
                    os.replace(self.ckpt_dir / LAST, bad)
                    print(f"note: {LAST} is not usable; moved to {bad.name}, resuming from {PREV}")
        if state is not None:
            try:
                self.load_state(state)
            except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:  # checked above; belt and braces
                raise CheckpointError(f"{self.resumed_from} does not fit this run: "
                                      f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
            self.saved_step = self.step  # the newest checkpoint on disk holds this state
            if self.step > self.total_steps:  # before anything is written (every rank: the same decision)
                option = "--steps" if self.cfg.get("steps") is not None else "--epochs"
                raise ResumePastEndError(f"the run is already at step {self.step}, past the {option} given "
                                         f"({self.total_steps} steps); give more to train further")
            if self.is_main:
                kept = [m for m in read_metrics(self.metrics_path) if m.get("step", 0) <= self.step]
                _atomic_write_text(self.metrics_path, "".join(json.dumps(m) + "\n" for m in kept))
                self.metrics = kept
            self.log({"type": "resume", "from": self.resumed_from, "epoch": self.epoch})
        else:
            if self.is_main and self.metrics_path.exists():
                self.metrics_path.unlink()
            broadcast_module(self.model)  # identical start on all ranks whatever the construction did
            initialize_actnorm(self.model, self.train_set, self.cfg["init_batch_size"], self.cfg["seed"],
                               self.device, self.cfg["y_condition"], self.dist)
            torch.manual_seed(self.cfg["seed"] * 1000 + 1 + self.dist.rank)
        if self.cfg.get("ema_decay"):
            self.ema = ParameterEMA(self.model, self.cfg["ema_decay"])
            if state is not None and state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
        self.at_step_boundary = True
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            unused = bool(self.n_classes) and self.cfg["y_weight"] == 0
            # no buffer sync in forward (a Glow's buffers are constants once initialised); torch >= 2.14 names
            # this forward_sync_buffers and warns on every rank about the old broadcast_buffers
            no_sync = ({"forward_sync_buffers": False}
                       if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                       else {"broadcast_buffers": False})
            self.ddp = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                           find_unused_parameters=unused, **no_sync)
        else:
            self.ddp = self.model
        self._emit("start")

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        rng = get_rng_state()
        if is_dist():
            gathered: list = [None] * self.dist.world_size
            dist.all_gather_object(gathered, rng)
            rng_all = gathered
        else:
            rng_all = [rng]
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "epoch_pos": self.epoch_pos,
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_streak": self.nonfinite_streak,
            "log_window": list(self.log_window),
            "best_test_bpd": self.best_test_bpd,
            "last_test_bpd": self.last_test_bpd,
            "last_eval_step": self.last_eval_step,
            "elapsed": self.elapsed,
            "rng": rng_all,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "world_size": self.dist.world_size,
            "config": self.cfg,
            "model_config": self.model_config(),
            "version": __version__,
        }

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # the next step's rate from this run's schedule: a resume may change --steps / --epochs (the cosine's
        # length), and the saved rate was computed with the old total (the same value when nothing changed)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * self._lr_factor(self.scheduler.last_epoch)
        self.step, self.epoch, self.epoch_pos = state["step"], state["epoch"], state["epoch_pos"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.nonfinite_streak = state.get("nonfinite_streak", 0)
        self.log_window = list(state.get("log_window", []))
        self.best_test_bpd = state.get("best_test_bpd", math.inf)
        self.last_test_bpd = state.get("last_test_bpd", math.nan)
        self.last_eval_step = state.get("last_eval_step")
        self.elapsed = state.get("elapsed", 0.0)
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank])
        else:  # a different world size cannot continue the same trajectory; keep going deterministically
            if self.is_main:  # and say so: the README's "continues the same run" does not hold here
                print(f"note: this run was trained with {len(rngs)} process(es) and resumes with "
                      f"{self.dist.world_size}: the global batch ({self.cfg['batch_size']} per process) and the "
                      "random streams change, so it continues deterministically but not as the same run would have",
                      file=sys.stderr)
            set_rng_state(rngs[0])
            torch.manual_seed(self.cfg["seed"] * 1000 + 1 + self.dist.rank + 7919 * self.step)

    def save(self) -> Path | None:
        """Checkpoint (rank 0 writes; all ranks join the RNG gather). Refuses non-finite weights."""
        try:
            assert_finite_state(self.model.state_dict(), "model")  # on every rank: they all stop together
        except NonFiniteStateError as e:
            raise NonFiniteLossError(f"the weights became non-finite by step {self.step} ({e}); no checkpoint "
                                     f"was written, the previous one is intact. Try a lower --lr.") from e
        if not self.at_step_boundary:
            raise RuntimeError(f"refusing to checkpoint in the middle of step {self.step + 1} (resume would not be "
                               "exact)")
        state = self.state_dict()
        if not self.is_main:
            self.saved_step = self.step
            return None
        self._assert_run_folder()
        path = save_checkpoint(state, self.ckpt_dir)
        self.saved_step = self.step  # only once the file is in place
        return path

    def save_if_consistent(self) -> bool:
        """After an interruption: checkpoint if the state is between two steps and not saved yet. Returns
        whether the newest checkpoint holds the current step."""
        if not self.at_step_boundary:
            return False
        if self.saved_step != self.step:
            self.save()
        return True

    # ------------------------------------------------------------------------------------------ loop
    def _batches(self):
        """This rank's remaining batches of the current epoch (resumes part-way through), flipped where
        `hflip_mask` says."""
        bs = self.cfg["batch_size"]
        self.sampler.set_position(self.epoch, self.epoch_pos, bs)
        idx = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
        flips = hflip_mask(len(self.train_set), self.cfg["seed"], self.epoch) if self.cfg.get("hflip") else None
        images = getattr(self.train_set, "images", None)
        labels = getattr(self.train_set, "labels", None)
        if isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor):
            batches = ((images[idx[i: i + bs]], labels[idx[i: i + bs]]) for i in range(0, len(idx) - bs + 1, bs))
        else:
            if self._loader is None:
                from torch.utils.data import DataLoader

                # One loader for the run, iterated once per epoch; its workers (if any) persist across epochs. A
                # worker's start re-imports torch under Python 3.14's default start method (forkserver): restarted
                # every epoch, they took 36 s where training took 3 s (docs/DESIGN.md, "Data loading"). Its own
                # generator draws the workers' seeds, so the global RNG (dequantisation noise) is not touched.
                workers = self.cfg.get("num_workers", 0)
                self._loader = DataLoader(self.train_set, batch_size=bs, sampler=self.sampler, drop_last=True,
                                          num_workers=workers, persistent_workers=workers > 0,
                                          generator=torch.Generator(), pin_memory=self.device.type == "cuda")
            # the loader iterates the same sampler, at the same position: its k-th batch holds idx[k*bs:(k+1)*bs]
            batches = ((x, torch.as_tensor(y)) for x, y in self._loader)
        for k, (x, y) in enumerate(batches):
            if flips is not None:  # in place: x is this batch's own copy (and stays in pinned memory)
                m = flips[idx[k * bs: (k + 1) * bs]]
                x[m] = x[m].flip(-1)
            yield x, y

    def loss_and_grads(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward, backward and gradient clipping of one batch without any host synchronisation (so that it
        can be captured in a CUDA graph). Returns the step's statistics as one tensor:
        [loss, grad_norm, bpd(, class_ce)].

        Backward runs even when the loss is non-finite (its gradients are then non-finite and `train_step`
        skips the update): deciding before backward would cost a device sync in the middle of the step.
        """
        model = self.ddp if self.ddp is not None else self.model
        model.train()
        out = model(x, y if self.n_classes else None)
        bpd = out.bits_per_dim.mean()
        loss, extra = bpd, []
        if self.n_classes:
            ce = F.cross_entropy(out.y_logits, y)
            # in bits like the bits/dim term, so --y-weight means what openai/glow's weight_y means (its loss is
            # bits_x + weight_y * bits_y); the logged class_ce stays in nats
            loss = loss + self.cfg["y_weight"] * (ce / math.log(2.0))
            extra.append(ce.detach())
        loss.backward()
        clip = self.cfg["grad_clip"]
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip and clip > 0 else math.inf)
        return torch.stack([loss.detach(), gn.detach().to(loss.dtype), bpd.detach(), *extra])

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """One optimisation step; non-finite loss or gradient norm -> the update is skipped and counted.

        One host synchronisation per step (reading the statistics), after the forward and backward have been
        queued — with `cuda_graphs`, as one CUDA-graph replay (glowfast.cuda_graph).
        """
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.precompile_pending:
            self.precompile_pending = False
            self.precompile_kernels(x, y)
        if self.cfg.get("cuda_graphs"):
            if self.graphed_step is None:
                from .cuda_graph import GraphedStep

                self.graphed_step = GraphedStep(self.loss_and_grads, (x, y), self.model.parameters())
            stats = self.graphed_step(x, y)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            stats = self.loss_and_grads(x, y)
        flags = torch.isfinite(stats[:2]).to(stats.dtype)  # [loss ok, grad norm ok]
        if is_dist():
            # One collective: the statistics averaged over the ranks (the objective is the mean over all of them;
            # rank 0's alone are half the batch), and the flags summed: every rank skips the same steps, and all
            # stop after the same step when any rank was interrupted (a flag holds only if it holds on every rank)
            go_on = flags.new_full((1,), 0.0 if self.stop_requested else 1.0)  # filled on the device: no host wait
            packed = torch.cat([stats, flags, go_on])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            world, n = float(self.dist.world_size), stats.numel()
            stats, flags = packed[:n] / world, (packed[n:] == world).to(stats.dtype)
        flat = torch.cat([stats, flags]).tolist()  # the one sync
        if is_dist():  # the agreed decision: a rank's own flag may be set between here and the end of the step
            self.stop_agreed = not flat.pop()
        *values, loss_ok, gn_ok = flat
        rec = {"loss": values[0], "bpd": values[2], "lr": self.optimizer.param_groups[0]["lr"]}
        if self.n_classes:
            rec["class_ce"] = values[3]
        skipped = None if loss_ok and gn_ok else ("loss" if not loss_ok else "grad_norm")
        if loss_ok:
            rec["grad_norm"] = values[1]
        if not skipped:
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update()
        self.scheduler.step()
        if skipped:
            self.nonfinite_total += 1
            self.nonfinite_streak += 1
            rec["skipped"] = skipped
        else:
            self.nonfinite_streak = 0
        return rec

    def precompile_kernels(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Before the first step: compile the fused kernels that step launches in parallel, from a dry run of it
        (glowfast.fused.precompile_training_step), instead of one after another at their first launches.
        `precompile` in the config: True = on (on CPU the dry step runs and the interpreter compiles nothing:
        tests); None (default) or False = off. Off by default since the first GPU measurement (H200, Triton 3.6):
        the parallel compiles took as long as serial ones, and start-up to the end of the first step was 21.9 s
        with it against 18.3 s without (benchmarks/RESULTS.md). Changes no state of the run, so a resumed or a
        precompiled run trains exactly as one without it."""
        if not self.cfg.get("precompile"):
            return
        glow = unwrap(self.model)
        if glow.resolve_backend(self.device) != "fused":
            return
        from .fused import precompile_record

        record = precompile_record(glow, x, y if self.n_classes else None)
        if "error" in record:
            print(f"warning: compiling the kernels ahead of the first step failed ({record['error']}); "
                  "they compile at their first launch instead", file=sys.stderr)
        self.log({"type": "precompile", **record})

    def evaluate(self) -> float:
        bpd = evaluate_bpd(self.model, self.test_set, self.device, batch_size=self.cfg["eval_batch_size"],
                           y_condition=bool(self.n_classes), seed=self.cfg["seed"])
        self.last_test_bpd = bpd
        self.best_test_bpd = min(self.best_test_bpd, bpd)
        return bpd

    def save_samples(self) -> list[str]:
        paths = []
        if not self.is_main:
            return paths
        for t in self.cfg["temperatures"]:
            images, nrow = sample_grid(self.model, t, self.cfg["n_samples"], self.cfg["seed"] + 17, self.device,
                                       self.n_classes, self.cfg.get("samples_per_class", 8))
            path = self.run_dir / "samples" / f"step{self.step:07d}_t{t:g}.png"
            save_grid(images, path, nrow)
            paths.append(str(path.relative_to(self.run_dir)))
        return paths

    def plot_curves(self) -> None:
        if not self.is_main:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        tr = [(m["step"], m["bpd"]) for m in self.metrics if m["type"] == "train" and "bpd" in m]
        te = [(m["step"], m["test_bpd"]) for m in self.metrics if m["type"] == "eval"]
        fig, ax = plt.subplots(figsize=(6, 4))
        if tr:
            ax.plot(*zip(*tr), label="train (dequantised, per log interval)", lw=1)
        if te:
            ax.plot(*zip(*te), "o-", label="test (whole split)")
        ax.set_xlabel("step")
        ax.set_ylabel("bits/dim")
        ax.set_title(f"{self.cfg['dataset']} Glow K={self.cfg['K']} L={self.cfg['L']}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        try:
            atomic_save(fig, self.run_dir / "curves.png", writer=lambda fig, f: fig.savefig(f, format="png", dpi=100),
                        make_parents=False)
        finally:
            plt.close(fig)

    def eval_weights(self):
        """Context: the weights evaluation and sampling use -- the EMA's with ema_decay, else the model's own."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def do_eval(self) -> None:
        if self.is_main:
            self._assert_run_folder()  # before the sample grids, which would recreate it
        t0 = time.perf_counter()
        with self.eval_weights():
            bpd = self.evaluate()
            samples = self.save_samples()
        recent = [m["bpd"] for m in self.metrics if m["type"] == "train" and "bpd" in m][-1:]
        self.last_eval_step = self.step
        self.log({"type": "eval", "test_bpd": bpd, "train_bpd": recent[0] if recent else None,
                  "eval_seconds": round(time.perf_counter() - t0, 3), "samples": samples})
        self.plot_curves()
        self._emit("eval")

    def fit(self) -> dict:
        """Train to ``total_steps``; returns the summary (also written to summary.json by rank 0).

        Ctrl-C (SIGINT, in the main thread) or SIGTERM (a scheduler's or ``docker stop``'s): the step in flight
        finishes, a checkpoint is written and KeyboardInterrupt is raised (``stop_signal`` says which), so
        ``--resume`` continues exactly. A second signal interrupts at once and leaves the newest checkpoint as it is.
        A run resumed at its last step (stopped there before its final evaluation) evaluates and checkpoints.
        """
        from tqdm import tqdm

        cfg = self.cfg
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.is_main and cfg["progress"]),
                   dynamic_ncols=True, mininterval=0.5, desc="train")
        postfix: dict[str, str] = {}
        t_window = time.perf_counter()
        steps_timed = 0  # steps since t_window, for images/s (the log window may hold steps from before a resume)
        t_start = time.perf_counter() - self.elapsed
        imgs_per_step = cfg["batch_size"] * self.dist.world_size
        status = "completed"
        self.stop_requested = self.stop_agreed = False  # a new fit() (e.g. after an interrupted one) starts afresh
        self.stop_signal = None
        restore_signals = self._defer_stop_signals()
        try:
            if self.step >= self.total_steps and self.last_eval_step != self.step:
                # resumed at the end (a run stopped in its last checkpointed step): the final evaluation is owed
                self.do_eval()
                self.save()
            while self.step < self.total_steps:
                for batch in self._batches():
                    self.batch = batch
                    self._emit("before_step")
                    x, y = self.batch
                    self.at_step_boundary = False
                    rec = self.train_step(x, y)
                    self.step += 1
                    self.epoch_pos += 1
                    self.at_step_boundary = True
                    steps_timed += 1
                    self.elapsed = time.perf_counter() - t_start
                    if "skipped" in rec:
                        self.log({"type": "nonfinite", "what": rec["skipped"], "loss": rec["loss"],
                                  "streak": self.nonfinite_streak, "total": self.nonfinite_total})
                        if self.nonfinite_streak >= cfg["max_nonfinite"]:
                            raise NonFiniteLossError(
                                f"training stopped at step {self.step}: {self.nonfinite_streak} non-finite "
                                f"{'losses' if rec['skipped'] == 'loss' else 'gradient norms'} in a row (last loss "
                                f"{rec['loss']}); those updates were skipped and no checkpoint holds non-finite "
                                f"weights. Try a lower --lr, a longer --warmup-steps or --grad-clip.")
                    else:
                        self.log_window.append(rec)
                    bar.update(1)
                    if self.step % cfg["log_interval"] == 0 or self.step == self.total_steps:
                        dt = time.perf_counter() - t_window
                        ips = imgs_per_step * steps_timed / dt if dt > 0 else 0.0
                        window = self.log_window
                        if window:
                            avg = {k: sum(r[k] for r in window) / len(window) for k in window[-1]
                                   if isinstance(window[-1][k], float) and all(k in r for r in window)}
                            self.log({"type": "train", "epoch": self.epoch, **avg, "images_per_s": round(ips, 1),
                                      "nonfinite_total": self.nonfinite_total, "elapsed": round(self.elapsed, 2)})
                            postfix.update(loss=f"{avg['loss']:.3f}", bpd=f"{avg['bpd']:.3f}", img_s=f"{ips:.0f}")
                            bar.set_postfix(postfix)
                        self.log_window, t_window, steps_timed = [], time.perf_counter(), 0
                    self._emit("after_step")
                    last = self.step >= self.total_steps
                    stop = self.stop_agreed if is_dist() else self.stop_requested
                    t_pause = time.perf_counter()  # evaluation and checkpoints do not count against images/s
                    # (when stopping, the evaluation still comes first: its best/last test bits/dim are checkpointed)
                    if self.step % cfg["eval_interval"] == 0 or last:
                        self.do_eval()
                        postfix["test_bpd"] = f"{self.last_test_bpd:.3f}"
                        bar.set_postfix(postfix)
                    if self.step % cfg["ckpt_interval"] == 0 or last or stop:
                        self.save()
                    t_window += time.perf_counter() - t_pause
                    if stop and not last:  # a stop requested in the last step: the run is complete anyway
                        raise KeyboardInterrupt
                    if last:
                        break
                else:
                    self.epoch += 1
                    self.epoch_pos = 0
                    continue
                if self.epoch_pos >= self.batches_per_epoch:
                    self.epoch += 1
                    self.epoch_pos = 0
        except NonFiniteLossError:
            status = "stopped_nonfinite"
            raise
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        except BaseException:  # any other error (a full disk while saving, ...): not "completed"
            status = "failed"
            raise
        finally:
            restore_signals()
            bar.close()
            self._loader = None  # its worker processes stop with it (a later fit() starts new ones)
            self.elapsed = time.perf_counter() - t_start  # training + evals + checkpoints of all sessions
            try:
                self.summary = self._write_summary(status)
            except (OSError, RunFolderGoneError):
                if status == "completed":
                    raise
                # the error already propagating is the cause (e.g. the full disk that failed a save): keep it
                self.summary = self._summary(status)
            self._emit("end")
        return self.summary

    def _defer_stop_signals(self) -> Callable[[], None]:
        """Make the first SIGINT or SIGTERM a request to stop at the next step boundary (a second one interrupts at
        once). Only from the main thread, and over Python's default handlers (SIGINT: default_int_handler, SIGTERM:
        SIG_DFL), never over a handler someone else installed; returns the function that restores them."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
        ours = [s for s, default in defaults.items() if signal.getsignal(s) is default]

        def request_stop(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            self.stop_signal = signal.Signals(signum).name
            if self.is_main:  # os.write: print() here could re-enter a stderr write the signal interrupted
                again = "Ctrl-C" if signum == signal.SIGINT else "a second signal"
                os.write(2, f"\n{self.stop_signal}: stopping after step {self.step + 1} with a checkpoint ({again} "
                            "stops now without one)\n".encode())

        for s in ours:
            signal.signal(s, request_stop)

        def restore() -> None:
            for s in ours:
                signal.signal(s, defaults[s])
        return restore

    def _write_summary(self, status: str) -> dict:
        summary = self._summary(status)
        if self.is_main:
            self._assert_run_folder()
            _atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary

    def _summary(self, status: str) -> dict:
        return {
            "status": status,
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": self.epoch,
            "test_bpd": self.last_test_bpd if math.isfinite(self.last_test_bpd) else None,
            "best_test_bpd": self.best_test_bpd if math.isfinite(self.best_test_bpd) else None,
            "test_images": len(self.test_set),
            "train_images": len(self.train_set),
            "nonfinite_skipped": self.nonfinite_total,
            "wall_seconds": round(self.elapsed, 2),
            "n_params": sum(p.numel() for p in self.model.parameters()),
            "eval_weights": f"ema {self.ema.decay:g}" if self.ema is not None else "raw",
            "world_size": self.dist.world_size,
            "device": str(self.device),
            "resumed_from": self.resumed_from,
        }


def _dir_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _plain(value):
    """A config value as JSON would give it back (tuples as lists), for comparing a checkpoint's with ours."""
    return json.loads(json.dumps(value, default=str))
