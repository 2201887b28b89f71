"""Train a Glow model: ``python -m glowfast.train [options]`` (``--help`` lists them all).

With no arguments it trains a small Glow on scikit-learn's embedded 8x8 digits on the CPU in a few
minutes and leaves a run folder (runs/<start time>-<process id>/, or runs/<--name>/) with config.json,
metrics.jsonl, curves.png, samples/ (grids at temperatures 0, 0.5, 0.7, 0.8, 1.0 at each eval),
checkpoints/{last,prev}.pt and summary.json (held-out bits/dim on the whole test split). One process trains in
a run folder at a time (RUN/.lock). See glowfast/trainer.py for the loop.

Multi-GPU / multi-process: ``torchrun --nproc_per_node N -m glowfast.train ...`` trains with
DistributedDataParallel (NCCL on CUDA, gloo on CPU) and a DistributedSampler; ``--batch-size`` is per
process. ``--resume RUN`` continues RUN exactly where its newest checkpoint left it.

Exit status: 0 done; 1 an I/O error stopped it (e.g. a full disk; the older checkpoints stand), or the run
folder was removed while training; 2 bad usage, missing dataset, unusable device/backend, checkpoint or run
folder, run folder in use by another process; 3 stopped on non-finite losses; 130 interrupted (Ctrl-C: the step
in flight finishes and is checkpointed; a second Ctrl-C stops at once and leaves the newest checkpoint as it
is); 143 terminated by SIGTERM (handled as Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from . import __version__
from ._checks import is_temperature
from ._cli import cudnn_autotune
from .amp import AMP_MODES
from .checkpoint import CheckpointError, find_checkpoint
from .data import is_folder_dataset
from .image_folder import ImageReadError, canonical_name

OPTIMIZERS = ("adamax", "adam")
# options that may be changed when resuming a run; everything else comes from the run's config.json
RESUMABLE_OVERRIDES = ("steps", "epochs", "eval_interval", "ckpt_interval", "log_interval", "device", "backend",
                       "max_nonfinite", "progress", "num_workers", "eval_batch_size", "data_dir", "threads",
                       "cuda_graphs", "channels_last", "memory_saving", "gemm_networks", "triton_networks",
                       "compile_networks", "precompile", "cudnn_benchmark", "fused_optimizer")

DEFAULTS_NOTE = "defaults: a small digits model that trains in a few minutes on 2 CPU cores"


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m glowfast.train",
        description="Train Glow (Kingma & Dhariwal 2018) on an image dataset; " + DEFAULTS_NOTE + ".",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS if suppress_defaults else None,
        epilog="Run folder: config.json, metrics.jsonl (JSON lines), curves.png, samples/step*_t*.png, "
               "checkpoints/{last,prev}.pt (atomic; loaded with weights_only=True), summary.json. "
               "Multi-process: torchrun --nproc_per_node N -m glowfast.train ... (DDP; NCCL on CUDA, gloo on CPU). "
               "Exit status 1: an I/O error stopped it (e.g. a full disk; the older checkpoints stand), 2: "
               "usage/dataset/device/checkpoint errors or a run folder in use by another process, 3: stopped on "
               "non-finite losses, 130 / 143: interrupted by Ctrl-C / SIGTERM (the step in flight finishes and is "
               "checkpointed; --resume continues exactly).")

    def add(group, *names, **kw):
        if suppress_defaults:
            kw.pop("default", None)
        group.add_argument(*names, **kw)

    g = p.add_argument_group("data")
    add(g, "--dataset", default="digits",
        help="digits (1x8x8, embedded in scikit-learn, no download), mnist, fashion-mnist, cifar10, svhn, celeba, "
             "... (see glowfast/data.py), or folder:PATH -- your own images (train/ and test/ subfolders or a 10%% "
             "hold-out, classes from subfolders; see glowfast/image_folder.py)")
    add(g, "--data-dir", default="data", help="folder holding the datasets (torchvision layouts)")
    add(g, "--size", type=int, default=None, help="spatial size (dataset default if omitted, e.g. 32 for mnist)")
    add(g, "--download", action="store_true", default=False,
        help="let torchvision download missing datasets (needs network)")
    add(g, "--num-workers", type=int, default=0, help="DataLoader workers for on-disk datasets")
    add(g, "--channels", type=int, choices=(1, 3), default=None,
        help="folder:PATH: convert the images to 1 (greyscale) or 3 (RGB) channels (default: as the first training "
             "image)")
    add(g, "--hflip", action=argparse.BooleanOptionalAction, default=False,
        help="augment the training images with random horizontal flips (each image flipped with probability 1/2, "
             "drawn afresh each epoch from --seed: a resumed run flips the same images); evaluation never flips")

    g = p.add_argument_group("model")
    add(g, "-K", "--K", dest="K", type=int, default=8, help="flow steps per level")
    add(g, "-L", "--L", dest="L", type=int, default=2, help="levels (each squeezes 2x)")
    add(g, "--hidden-channels", "--width", dest="hidden_channels", type=int, default=64,
        help="hidden width of the coupling networks")
    add(g, "--coupling", choices=("affine", "additive"), default="affine")
    add(g, "--permutation", choices=("invconv", "shuffle", "reverse"), default="invconv")
    add(g, "--lu", dest="lu", action=argparse.BooleanOptionalAction, default=True,
        help="LU-parametrised 1x1 convolutions (--no-lu: plain W)")
    add(g, "--learn-top", action=argparse.BooleanOptionalAction, default=True, help="learned top prior")
    add(g, "--n-bits", dest="n_bits", type=int, default=8, help="bits per pixel the images are reduced to (1..8)")
    add(g, "--y-condition", action="store_true", default=False,
        help="class-conditional prior + class-prediction loss; sample grids show one row per class")
    add(g, "--y-weight", type=float, default=0.01,
        help="weight of the class cross-entropy in bits (with --y-condition): openai/glow's weight_y")

    g = p.add_argument_group("optimisation")
    add(g, "--batch-size", type=int, default=64, help="images per step per process")
    add(g, "--optimizer", choices=OPTIMIZERS, default="adamax")
    add(g, "--lr", type=float, default=3e-3,
        help="peak learning rate (3e-3 suits the small default model; openai/glow used 1e-3 for its large ones)")
    add(g, "--warmup-steps", type=int, default=100, help="linear learning-rate warm-up from lr/warmup to lr")
    add(g, "--lr-schedule", choices=("constant", "cosine"), default="constant",
        help="after warm-up: constant, or a cosine decay from lr over the remaining steps (0 after the last)")
    add(g, "--fused-optimizer", action=argparse.BooleanOptionalAction, default=False,
        help="adamax only: its update as one Triton kernel on CUDA (glowfast.optim.FusedAdamax: the same optimiser, "
             "state and checkpoints; torch's step elsewhere); may change on --resume")
    add(g, "--weight-decay", type=float, default=0.0)
    add(g, "--grad-clip", type=float, default=50.0, help="clip the global gradient norm to this (0: off)")
    add(g, "--ema-decay", type=float, default=0.0,
        help="keep an exponential moving average of the weights with this decay (e.g. 0.999; openai/glow's "
             "Polyak averaging) and evaluate / sample with it; 0: off")
    add(g, "--steps", type=int, default=2000, help="training steps (overrides --epochs)")
    add(g, "--epochs", type=int, default=None, help="train for this many epochs instead of --steps")
    add(g, "--init-batch-size", type=int, default=256,
        help="images (per process) for ActNorm's data-dependent initialisation")
    add(g, "--max-nonfinite", type=int, default=10,
        help="stop after this many non-finite losses / gradient norms in a row (each such step is skipped)")
    add(g, "--seed", type=int, default=0)

    g = p.add_argument_group("evaluation, logging, checkpoints")
    add(g, "--eval-interval", type=int, default=500,
        help="every N steps (and at the end): test bits/dim on the whole test split + sample grids")
    add(g, "--eval-batch-size", type=int, default=512)
    add(g, "--ckpt-interval", type=int, default=None, help="checkpoint every N steps (default: --eval-interval)")
    add(g, "--log-interval", type=int, default=50, help="write a train record to metrics.jsonl every N steps")
    add(g, "--temperatures", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.8, 1.0],
        help="sampling temperatures of the grids saved at each eval")
    add(g, "--n-samples", type=int, default=64, help="images per sample grid (unconditional)")
    add(g, "--samples-per-class", type=int, default=8, help="images per class row (with --y-condition)")
    add(g, "--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")

    g = p.add_argument_group("run folder")
    add(g, "--run-dir", default=None, help="the run folder (default: RUNS_ROOT/NAME)")
    add(g, "--runs-root", default="runs", help="parent folder of runs")
    add(g, "--name", default=None, help="run name (default: the start time and the process id)")
    add(g, "--resume", default=None, metavar="RUN",
        help="continue the run in folder RUN from its newest checkpoint (its config.json is reused; only "
             + ", ".join("--" + o.replace("_", "-") for o in RESUMABLE_OVERRIDES) + " may be changed)")

    g = p.add_argument_group("hardware")
    add(g, "--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    add(g, "--backend", choices=("reference", "fused", "auto"), default="auto",
        help="compute path: reference PyTorch layers, fused Triton kernels (CUDA only), or auto")
    add(g, "--cuda-graphs", action=argparse.BooleanOptionalAction, default=False,
        help="capture the training step's forward + backward in a CUDA graph and replay it (one launch per "
             "step instead of thousands: for small batches, where launch overhead bounds the step); single "
             "process, CUDA only")
    add(g, "--precompile", action=argparse.BooleanOptionalAction, default=None,
        help="before the first step, compile the fused kernels it launches in parallel (from a dry run of the "
             "step) instead of one after another at their first launches; changes no numbers. Default: off "
             "(on an H200 with Triton 3.6 it did not pay: 21.9 s to the end of the first step with it, 18.3 s "
             "without)")
    add(g, "--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
        help="CUDA: let cuDNN time its convolution algorithms at each new input shape and keep the fastest "
             "(torch.backends.cudnn.benchmark; a few seconds of timing at start-up and at a new batch shape; "
             "benchmarks/ measures with it on); --no-cudnn-benchmark keeps cuDNN's heuristic choice. No effect on "
             "CPU")
    add(g, "--memory-saving", action=argparse.BooleanOptionalAction, default=False,
        help="fused backend: backward reconstructs each flow step's input from its output (the flow is "
             "invertible) instead of storing activations: much less activation memory for about one extra "
             "coupling-network forward per step; same model, gradients up to rounding")
    add(g, "--channels-last", action=argparse.BooleanOptionalAction, default=False,
        help="run the coupling networks in the channels_last (NHWC) memory format, cuDNN's faster layout for "
             "their convolutions; the flow stays NCHW and the function computed is the same")
    add(g, "--gemm-networks", action=argparse.BooleanOptionalAction, default=False,
        help="run the coupling networks' convolutions as GEMMs over the pixels (im2col / col2im for the thin "
             "3x3s) instead of cuDNN; the same function; exclusive with --channels-last")
    add(g, "--triton-networks", action=argparse.BooleanOptionalAction, default=False,
        help="run the coupling networks by glowfast's Triton kernels (each thin 3x3 conv one fused pass, the 1x1 a "
             "cuBLAS GEMM) instead of cuDNN, where they run (CUDA); the same function; with --amp bf16 its hidden "
             "activations are bf16; exclusive with --channels-last and --gemm-networks")
    add(g, "--compile-networks", action=argparse.BooleanOptionalAction, default=False,
        help="run the coupling networks as one torch.compile'd function (cuDNN convolutions, the small ops between "
             "them fused by inductor), with --amp bf16 and --channels-last if given; the first step of each image "
             "size compiles (start-up); the same function; exclusive with --gemm-networks and --triton-networks")
    add(g, "--amp", choices=AMP_MODES, default="none",
        help="bf16: coupling networks under bf16 autocast; flow, log-determinants and loss stay fp32")
    add(g, "--threads", type=int, default=1,
        help="torch CPU threads; 0 = torch's default (one per core). 1 is the default because the small default "
             "model gains little from more, and multi-threaded torch on busy (oversubscribed) cores can run 10x "
             "slower; raise it for big models on an idle machine")
    p.add_argument("--version", action="version", version=f"glowfast {__version__}")
    return p


def _fail(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def resolve_config(argv: list[str] | None) -> tuple[dict, Path, bool]:
    """(config, run folder, resume?) from the command line (and the run's config.json when resuming)."""
    args = build_parser().parse_args(argv)
    explicit = vars(build_parser(suppress_defaults=True).parse_args(argv))
    cfg = vars(args)
    if args.resume:
        run_dir = Path(args.resume)
        saved = _saved_config(run_dir)
        # a folder dataset may be re-pointed (its images moved, or the same folder spelled another way)
        repoint = "dataset" in explicit and is_folder_dataset(saved.get("dataset")) and \
            is_folder_dataset(explicit["dataset"])
        bad = sorted(k for k in explicit if k not in RESUMABLE_OVERRIDES and k != "resume"
                     and saved.get(k, None) != explicit[k] and not (k == "dataset" and repoint))
        if bad:
            raise ValueError("--resume reuses the run's config; these options cannot change: "
                             + ", ".join("--" + k.replace("_", "-") for k in bad))
        merged = dict(saved)
        for k in RESUMABLE_OVERRIDES:
            if k in explicit:
                merged[k] = explicit[k]
        if "steps" in explicit and "epochs" not in explicit:
            merged["epochs"] = None
        if "epochs" in explicit and "steps" not in explicit:
            merged["steps"] = None
        if repoint:
            merged["dataset"] = canonical_name(explicit["dataset"])
            if merged["dataset"] != saved["dataset"]:
                print(f"note: the run's images are now read from {merged['dataset']} (were {saved['dataset']}); "
                      "the run continues exactly only if they are the same files", file=sys.stderr)
        merged["resume"] = str(run_dir)
        return merged, run_dir, True
    if args.epochs is not None and "steps" not in explicit:
        cfg["steps"] = None
    if cfg["ckpt_interval"] is None:
        cfg["ckpt_interval"] = cfg["eval_interval"]
    if args.run_dir:
        run_dir = Path(args.run_dir)
    else:
        # default name: the start time and the process id, so runs launched in the same second (a sweep started
        # from a shell loop) get folders of their own
        run_dir = Path(args.runs_root) / (args.name or f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    cfg["run_dir"] = str(run_dir)
    return cfg, run_dir, False


def _saved_config(run_dir: Path) -> dict:
    """The run's config for --resume: config.json, or -- when that file is missing or damaged -- the copy every
    checkpoint holds (with a note). ValueError / FileNotFoundError naming the problem when neither is there."""
    cfg_path = run_dir / "config.json"
    try:
        saved = json.loads(cfg_path.read_text())
        if isinstance(saved, dict) and "batch_size" in saved:
            return saved
        problem = "does not hold a run's config"
    except FileNotFoundError:
        problem = "is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = f"does not load ({e})"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--resume {run_dir}: no such folder")
    try:
        path, state = find_checkpoint(run_dir, map_location="cpu")
    except CheckpointError:
        if problem == "is missing":
            raise FileNotFoundError(f"--resume {run_dir}: no config.json there (not a glowfast run folder?)") from None
        raise ValueError(f"--resume {run_dir}: {cfg_path} {problem}, and no checkpoint there holds a copy") from None
    saved = state.get("config")
    if not (isinstance(saved, dict) and "batch_size" in saved):
        raise ValueError(f"--resume {run_dir}: {cfg_path} {problem}, and {path} holds no run config")
    print(f"note: {cfg_path} {problem}; using the config saved in {path} (config.json is rewritten once the run "
          "resumes)", file=sys.stderr)
    return saved


def validate(cfg: dict) -> None:
    for key in ("batch_size", "eval_interval", "ckpt_interval", "log_interval", "max_nonfinite", "init_batch_size",
                "eval_batch_size", "hidden_channels", "n_samples", "samples_per_class"):
        if cfg[key] is None or cfg[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    if cfg["steps"] is None and (cfg["epochs"] is None or cfg["epochs"] < 1):
        raise ValueError("give --steps N or --epochs N (>= 1)")
    if cfg["steps"] is not None and cfg["steps"] < 1:
        raise ValueError(f"--steps must be >= 1, got {cfg['steps']}")
    if cfg["warmup_steps"] < 0:
        raise ValueError("--warmup-steps must be >= 0")
    if not (math.isfinite(cfg["lr"]) and cfg["lr"] > 0):
        raise ValueError(f"--lr must be finite and > 0, got {cfg['lr']}")
    if not (math.isfinite(cfg["grad_clip"]) and cfg["grad_clip"] >= 0):
        raise ValueError(f"--grad-clip must be finite and >= 0 (0: off), got {cfg['grad_clip']}")
    ema = cfg.get("ema_decay") or 0.0
    if not (math.isfinite(ema) and 0.0 <= ema < 1.0):
        raise ValueError(f"--ema-decay must be in [0, 1) (0: off), got {ema}")
    bad = [t for t in cfg.get("temperatures") or () if not is_temperature(t)]
    if bad:  # else the first evaluation's sample grids would fail, hundreds of steps in
        raise ValueError(f"--temperatures must be finite and >= 0, got {bad[0]}")
    if cfg.get("fused_optimizer") and cfg["optimizer"].lower() != "adamax":
        raise ValueError(f"--fused-optimizer fuses Adamax's update; --optimizer is {cfg['optimizer']}")
    layouts = [f"--{k.replace('_', '-')}" for k in ("channels_last", "gemm_networks", "triton_networks") if cfg.get(k)]
    if len(layouts) > 1:
        raise ValueError(f"{' and '.join(layouts)} are different network layouts; choose one")
    replaced = [f"--{k.replace('_', '-')}" for k in ("gemm_networks", "triton_networks") if cfg.get(k)]
    if cfg.get("compile_networks") and replaced:
        raise ValueError(f"--compile-networks compiles the standard network, which {replaced[0]} replaces; "
                         "choose one")


def _one_line(e: BaseException) -> str:
    """An error's message in one line: a DataLoader worker's error arrives as "Caught X in DataLoader worker
    process N" + the worker's traceback, whose last line is the original message."""
    last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    name = type(e).__name__ + ": "
    return last.split(name, 1)[1] if name in last else last


def main(argv: list[str] | None = None, callbacks=()) -> int:
    """Entry point of ``python -m glowfast.train``; returns the exit status. ``callbacks``: see Trainer."""
    from .data import DatasetNotFoundError, dataset_info, get_dataset
    from .distributed import broadcast_object, cleanup, init_from_env
    from .trainer import NonFiniteLossError, Trainer

    try:
        cfg, run_dir, resume = resolve_config(argv)
        validate(cfg)
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        return _fail(str(e))
    if (cfg.get("threads") or 0) < 0:
        return _fail("--threads must be >= 0")
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    try:
        dist_info, device = init_from_env(cfg["device"])
    except (RuntimeError, ValueError) as e:
        return _fail(f"--device {cfg['device']}: {e}")
    try:
        with cudnn_autotune(device, cfg.get("cudnn_benchmark", True)):  # a run saved before the option: on
            return _run(cfg, run_dir, resume, dist_info, device, callbacks,
                        (DatasetNotFoundError, dataset_info, get_dataset), Trainer, NonFiniteLossError,
                        broadcast_object)
    finally:
        cleanup()


def _run(cfg, run_dir, resume, dist_info, device, callbacks, data_api, Trainer, NonFiniteLossError,
         broadcast_object) -> int:
    DatasetNotFoundError, dataset_info, get_dataset = data_api
    main_rank = dist_info.is_main
    run_dir = Path(broadcast_object(str(run_dir)))  # a timestamped name must be the same on every rank
    channels = {"channels": cfg["channels"]} if cfg.get("channels") is not None else {}
    try:
        info = dataset_info(cfg["dataset"], cfg["size"], **channels)
        train_set = get_dataset(cfg["dataset"], "train", cfg["data_dir"], cfg["size"], cfg["download"], **channels)
        test_set = get_dataset(cfg["dataset"], "test", cfg["data_dir"], cfg["size"], cfg["download"], **channels)
    except DatasetNotFoundError as e:
        return _fail(str(e))
    except ValueError as e:
        return _fail(str(e))
    cfg["dataset"] = info.name  # folder:PATH as an absolute path: --resume and evaluate find it from anywhere
    if is_folder_dataset(cfg["dataset"]):  # recorded: images added to the folder later cannot change them
        cfg["channels"], cfg["size"] = info.image_shape[0], info.image_shape[1]
    n_classes = info.n_classes or None
    if cfg["y_condition"] and not n_classes:
        return _fail(f"--y-condition needs class labels, but dataset {cfg['dataset']} has none")
    if not 1 <= cfg["n_bits"] <= 8:
        return _fail(f"--n-bits must be in 1..8, got {cfg['n_bits']}")

    # fail fast on a reused folder, before building the model (on a GPU the backend check compiles kernels); the
    # decision that counts is taken again under the run folder's lock below
    try:
        taken = _holds_a_run(run_dir) if (main_rank and not resume) else None
    except OSError as e:
        taken = f"cannot use the run folder {run_dir}: {e}"
    taken = broadcast_object(taken)
    if taken:
        return _fail(taken) if main_rank else 2
    try:
        trainer = Trainer(cfg, run_dir, train_set, test_set, info.image_shape, n_classes, device, dist_info,
                          callbacks)
    except ValueError as e:
        return _fail(str(e))

    # Can the chosen backend run here? (e.g. --backend fused on CPU) -- checked before anything is written.
    try:
        x = torch.stack([train_set[i][0] for i in range(min(2, len(train_set)))]).to(device)
        y = torch.zeros(x.shape[0], dtype=torch.long, device=device) if trainer.n_classes else None
        trainer.model.eval()
        with torch.no_grad():
            trainer.model(x, y)
        trainer.model.train()
    except ImageReadError as e:
        return _fail(_one_line(e))
    except RuntimeError as e:
        return _fail(f"--backend {cfg['backend']} on {device}: {str(e).splitlines()[0]}")
    except ImportError as e:
        if cfg["backend"] != "auto":
            return _fail(f"--backend {cfg['backend']}: {e}")
        trainer.model.backend = "reference"
        if main_rank:
            print(f"note: the fused path is unavailable ({e}); using backend=reference", file=sys.stderr)
    if cfg.get("memory_saving") and main_rank and trainer.model.resolve_backend(device) == "reference":
        print("note: --memory-saving applies to the fused backend; this run uses the reference backend, which "
              "stores activations", file=sys.stderr)
    note = trainer.model.reference_levels_note(device) if main_rank else None
    if note:  # a model wider than the kernels at its top levels (large images): those run the reference layers
        saving = " (they store activations: --memory-saving covers the fused levels)" if cfg.get("memory_saving") \
            else ""
        print(f"note: {note}{saving}", file=sys.stderr)

    # One process per run folder: a second one (a repeated --name, a --resume while the run still trains) would
    # mix two runs' checkpoints and metrics. The lock is released when this function returns or the process dies.
    # A fresh run then refuses a folder that holds checkpoints -- checked under the lock, so that a run finishing
    # meanwhile cannot be overwritten.
    lock, refused = None, None
    if main_rank:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = _lock_run_folder(run_dir)
            if lock is None:
                refused = (f"{run_dir} is in use by another python -m glowfast.train process; wait for it to finish, "
                           "or give this run another --name/--run-dir")
            elif not resume:
                refused = _holds_a_run(run_dir)
        except OSError as e:  # an unwritable parent, a read-only run folder, an unreadable checkpoints/ ...
            refused = f"cannot use the run folder {run_dir}: {e}"
    refused = broadcast_object(refused)  # every rank stops, not only rank 0
    if refused:
        if lock is not None:
            lock.close()
        return _fail(refused) if main_rank else 2
    try:
        return _train_locked(cfg, run_dir, resume, dist_info, device, info, n_classes, trainer, NonFiniteLossError)
    finally:
        if lock is not None:
            lock.close()


def _holds_a_run(run_dir: Path) -> str | None:
    """The refusal of a fresh run into a folder that holds checkpoints (None: the folder is free)."""
    ckpt = run_dir / "checkpoints"
    if ckpt.is_dir() and any(ckpt.iterdir()):
        return f"{run_dir} already holds a run; use --resume {run_dir} or another --name/--run-dir"
    return None


def _lock_run_folder(run_dir: Path):
    """An exclusive advisory lock on RUN/.lock (an open file; None when another process holds it). Platforms
    without fcntl, and file systems without locks, go unlocked (an open file all the same)."""
    f = open(run_dir / ".lock", "a")
    try:
        import fcntl

        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    except (ImportError, OSError):
        pass
    return f


def _write_config(run_dir: Path, full: dict) -> None:
    from .trainer import _atomic_write_text

    _atomic_write_text(run_dir / "config.json", json.dumps(full, indent=2) + "\n")


def _train_locked(cfg, run_dir, resume, dist_info, device, info, n_classes, trainer, NonFiniteLossError) -> int:
    from .trainer import ResumePastEndError, RunFolderGoneError

    main_rank = dist_info.is_main
    full = None
    if main_rank:
        full = {**cfg, "image_shape": list(info.image_shape), "n_classes": n_classes,
                "model_config": {**trainer.model.config, "image_shape": list(info.image_shape)},
                "world_size": dist_info.world_size, "device_used": str(device),
                "glowfast_version": __version__, "torch_version": torch.__version__,
                "steps_total": trainer.total_steps, "batches_per_epoch": trainer.batches_per_epoch}
        print(f"run folder: {run_dir}  ({cfg['dataset']} {tuple(info.image_shape)}, "
              f"{sum(p.numel() for p in trainer.model.parameters()):,} parameters, {trainer.total_steps} steps, "
              f"device {device}, world size {dist_info.world_size})", file=sys.stderr)
    try:
        if main_rank and not resume:  # a resume writes it once the checkpoint has loaded: a failed one changes nothing
            _write_config(run_dir, full)
        trainer.setup(resume)
        if resume and main_rank:
            _write_config(run_dir, full)
        summary = trainer.fit()
    except NonFiniteLossError as e:
        return _fail(str(e), 3)
    except CheckpointError as e:
        return _fail(f"cannot resume {run_dir}: {e}. The files were left as they are.")
    except ResumePastEndError as e:
        return _fail(f"--resume {run_dir}: {e}. The run was left as it is.")
    except RunFolderGoneError as e:
        return _fail(str(e), 1)
    except (OSError, ImageReadError) as e:  # a full disk while saving, an image file that cannot be decoded:
        # checkpoints are written atomically, the older ones stand
        newest = (f"the newest checkpoint is step {trainer.saved_step}" if trainer.saved_step is not None else
                  "this session wrote no checkpoint; the run's checkpoints were left as they are" if resume else
                  "no checkpoint was written")
        return _fail(f"stopped at step {trainer.step}: {_one_line(e)} ({newest}); resume with --resume {run_dir}", 1)
    except KeyboardInterrupt:
        saved = False
        if dist_info.distributed:  # under DDP only the agreed stop in fit() can save (a collective)
            saved = trainer.saved_step == trainer.step
        elif not trainer.stop_requested:  # an interrupt fit() did not defer: save the step if it is whole.
            # (A requested stop has saved already, or was interrupted by a second signal: no checkpoint then.)
            try:
                saved = trainer.save_if_consistent()
            except BaseException:  # a failed save, or yet another Ctrl-C: the newest checkpoint stands
                pass
        else:
            saved = trainer.saved_step == trainer.step
        if saved:
            where = "the checkpoint holds it"
        elif trainer.saved_step is None:
            where = "no checkpoint was written"
        else:
            when = "stopped before its checkpoint" if trainer.at_step_boundary else "interrupted mid-step"
            where = f"{when}: the newest checkpoint (step {trainer.saved_step}) was left as it is"
        how, code = ("terminated (SIGTERM)", 143) if trainer.stop_signal == "SIGTERM" else ("interrupted", 130)
        return _fail(f"{how} at step {trainer.step} ({where}); resume with --resume {run_dir}", code)
    if main_rank:
        bpd = summary["test_bpd"]
        print(f"done: step {summary['step']}, test bits/dim {'non-finite' if bpd is None else f'{bpd:.4f}'} "
              f"({summary['test_images']} test images), {summary['wall_seconds']:.0f} s; run folder {run_dir}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    from ._cli import plain_warnings

    plain_warnings()
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # during start-up (imports, data, model): once training runs, fit() handles Ctrl-C
        sys.exit(_fail("interrupted during start-up, before the first training step", 130))
