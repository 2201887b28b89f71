"""Sample from a trained Glow: ``python -m glowfast.sample --run RUN [options]`` (``--help`` lists them).

Writes into ``--out`` (default RUN/generated/ with --run, else generated/ beside the checkpoint file):
    samples_t{T}.png         ``--n`` samples per temperature (class-conditional models: one row per class,
                             ``--per-class`` samples each)
    class{C}_t{T}.png        class-conditional models only: ``--n`` samples of class C per temperature
    interpolation.png        ``--interpolate-pairs`` rows: a linear path in latent space between two test
                             images (first and last column reconstruct the two images), ``--steps`` columns

Interpolation encodes each test image at the centre of its quantisation bin (``preprocess(dequantize=False)``
plus half a bin, so the end points decode back to the exact images), interpolates every latent (each
split's factored-out latent and the top one) linearly, and decodes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from . import __version__
from ._checks import check_device_exists, is_temperature
from .ema import use_checkpoint_average


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m glowfast.sample", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--run", default=None, help="run folder (uses its newest loadable checkpoint)")
    src.add_argument("--checkpoint", default=None,
                     help="a checkpoint file or run folder; with --run, it may name one in the run (e.g. prev.pt)")
    src.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    src.add_argument("--backend", choices=("reference", "fused", "auto"), default="auto")
    src.add_argument("--raw-weights", action="store_true",
                     help="use the last iterate's weights even when the run kept a moving average (--ema-decay)")
    g = p.add_argument_group("samples")
    g.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.8, 1.0])
    g.add_argument("--n", type=int, default=64, help="samples per grid")
    g.add_argument("--per-class", type=int, default=8, help="samples per class row (class-conditional)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("interpolation")
    g.add_argument("--interpolate-pairs", type=int, default=4, help="pairs of test images (0: none)")
    g.add_argument("--steps", type=int, default=8, help="images per interpolation row, end points included")
    g.add_argument("--data-dir", default=None, help="dataset folder (default: the run's)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/generated with --run, else a generated/ "
                                               "folder beside the checkpoint file)")
    p.add_argument("--version", action="version", version=f"glowfast {__version__}")
    return p


def glow_config(state: dict) -> dict | None:
    """The Glow constructor arguments a checkpoint was saved with: ``model_config`` (python -m glowfast.train), or
    ``config`` beside a ``spec`` (glowfast.experiments' model cache, where ``config`` is the model's, not a CLI's);
    None for anything else."""
    if "model_config" in state:
        return state["model_config"]
    if "spec" in state and "config" in state:
        return state["config"]
    return None


def training_options(state: dict) -> dict:
    """The options a checkpoint's model was trained with, as python -m glowfast.train names them (dataset, size,
    data_dir, amp, ...); of an experiments checkpoint, its spec's dataset, size and network options."""
    if "model_config" in state:
        return dict(state.get("config") or {})
    spec = state.get("spec") or {}
    return {k: spec[k] for k in ("dataset", "size", "amp", "channels_last") if k in spec}


def load_model(state: dict, device: torch.device, backend: str = "auto", raw_weights: bool = False):
    """A Glow rebuilt from a checkpoint's config (``glow_config``) with its weights, in eval mode: the moving
    average of the weights when the run kept one (``--ema-decay``), unless ``raw_weights``. (The experiments save
    the weights they chose -- average or last iterate -- as the model's, with no separate average.)"""
    from .model import Glow

    mc = dict(glow_config(state))
    mc["image_shape"] = tuple(mc["image_shape"])
    model = Glow(**mc, backend=backend)
    model.load_state_dict(state["model"])
    if not raw_weights:  # the weights the run evaluated with
        use_checkpoint_average(model, state)
    config = training_options(state)
    model.to(device)
    from .amp import apply_network_options

    apply_network_options(model, config)  # the networks run as they were trained
    return model.eval()


def load_glow(source: str | os.PathLike, device: str | torch.device = "cpu", backend: str = "auto",
              raw_weights: bool = False):
    """A trained Glow, ready to score and sample: ``glowfast.load_glow("runs/mnist-k16", device="cuda")``.

    `source`: a run folder of ``python -m glowfast.train`` (its newest checkpoint that loads: ``last.pt``, else
    ``prev.pt`` with a warning), its ``checkpoints/`` folder, or one checkpoint file; or a model folder of
    glowfast.experiments' ``--cache``. The model is rebuilt from the checkpoint's config on `device`, in eval mode,
    with the weights the run evaluated with -- the moving average when the run kept one (``--ema-decay``), unless
    `raw_weights` -- and with its coupling networks' precision and layout options (``--amp``, ``--channels-last``,
    ``--gemm-networks``, ``--triton-networks``). `backend`: "auto" (the fused kernels on CUDA where they run, else
    the reference layers), "fused" or "reference".

    Raises CheckpointError (a RuntimeError) when no checkpoint loads, ValueError for a checkpoint without a model
    config or a backend that cannot run on `device`, RuntimeError for a device this machine lacks.
    """
    from .checkpoint import find_checkpoint

    dev = torch.device(device)
    check_device_exists(dev)
    path, state = find_checkpoint(source, map_location="cpu")
    return _model_of_checkpoint(path, state, dev, backend, raw_weights)


def _require_glow_config(path: Path, state: dict) -> None:
    if glow_config(state) is None:
        raise ValueError(f"{path} has no model config (neither a python -m glowfast.train nor a "
                         "glowfast.experiments checkpoint)")


def _model_of_checkpoint(path: Path, state: dict, dev: torch.device, backend: str, raw_weights: bool):
    """load_model, after checking that `state` is a training checkpoint, with `backend` resolved on `dev` ("auto"
    falls back to the reference layers where the fused kernels cannot run); ValueError names the problem."""
    _require_glow_config(path, state)
    model = load_model(state, dev, backend, raw_weights)
    try:
        model.resolve_backend(dev)
    except (RuntimeError, ImportError) as e:
        if backend != "auto":  # resolve_backend's message names the backend, the device and the reason
            raise ValueError(str(e).splitlines()[0]) from None
        model.backend = "reference"
    return model


def load_run_model(run, checkpoint, device: str, backend: str, raw_weights: bool = False):
    """(checkpoint path, its state, the model in eval mode, the torch.device) for a CLI given --run / --checkpoint,
    --device, --backend and --raw-weights; ValueError with a one-line message (the CLI prints it and exits 2)."""
    from .checkpoint import CheckpointError, find_checkpoint

    device_str = device
    if device_str == "auto":
        device_str = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device_str)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device (auto, cpu, cuda or cuda:N)") from None
    try:
        check_device_exists(dev)
    except RuntimeError as e:
        raise ValueError(f"--device {device}: {e}") from None
    source = checkpoint or run
    if run and checkpoint and not Path(checkpoint).exists():  # a checkpoint named within the run, e.g. prev.pt
        within = (Path(run) / "checkpoints" / checkpoint, Path(run) / checkpoint)
        source = next((c for c in within if c.exists()), None)
        if source is None:
            raise ValueError(f"--checkpoint {checkpoint}: not found (looked for {checkpoint}, "
                             f"{within[0]} and {within[1]})")
    try:
        path, state = find_checkpoint(source, map_location="cpu")
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    _require_glow_config(path, state)  # its ValueError as it is; after it, a ValueError is about --backend
    try:
        model = _model_of_checkpoint(path, state, dev, backend, raw_weights)
    except ValueError as e:
        raise ValueError(f"--backend {backend}: {e}") from None
    return path, state, model, dev


@torch.no_grad()
def interpolate(model, x_a: torch.Tensor, x_b: torch.Tensor, steps: int) -> torch.Tensor:
    """(P, steps, C, H, W) images in [0, 1]: row p walks linearly in latent space from x_a[p] to x_b[p]. In full
    fp32 (no TF32 on a GPU), so that the end points decode to the images exactly."""
    from .evaluate import full_fp32

    half_bin = 0.5 / model.n_bins
    rows = []
    with full_fp32():
        za, _ = model.encode(model.preprocess(x_a, dequantize=False) + half_bin)
        zb, _ = model.encode(model.preprocess(x_b, dequantize=False) + half_bin)
        for alpha in torch.linspace(0, 1, steps).tolist():
            latents = [(1 - alpha) * a + alpha * b for a, b in zip(za, zb)]
            rows.append(model.postprocess(model.decode(latents)))
    return torch.stack(rows, dim=1)


def main(argv: list[str] | None = None) -> int:
    from .images import save_grid

    args = build_parser().parse_args(argv)
    if not args.run and not args.checkpoint:
        print("error: give --run RUN or --checkpoint PATH", file=sys.stderr)
        return 2
    for name in ("n", "per_class", "steps"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.interpolate_pairs < 0:
        print(f"error: --interpolate-pairs must be >= 0 (0: none), got {args.interpolate_pairs}", file=sys.stderr)
        return 2
    bad = [t for t in args.temperatures if not is_temperature(t)]
    if bad:
        print(f"error: --temperatures must be finite and >= 0, got {bad[0]}", file=sys.stderr)
        return 2
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        print(f"error: --out {args.out} is a file, not a folder", file=sys.stderr)
        return 2
    try:
        path, state, model, device = load_run_model(args.run, args.checkpoint, args.device, args.backend,
                                                    args.raw_weights)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = training_options(state)
    pairs = None
    if args.interpolate_pairs > 0:  # its test images first: a missing split fails before any grid is written
        from .data import DatasetNotFoundError, get_dataset, is_folder_dataset

        dataset = cfg.get("dataset", "digits")
        # a folder's images at the model's shape (a run older than the recorded size and channels, or files added)
        shape = dict(size=model.image_shape[1], channels=model.image_shape[0]) if is_folder_dataset(dataset) else \
            dict(size=cfg.get("size"))
        k = args.interpolate_pairs
        try:
            test = get_dataset(dataset, "test", args.data_dir or cfg.get("data_dir", "data"), **shape)
            if len(test) < 2 * k:
                print(f"error: --interpolate-pairs {k}: the test split has {len(test)} images, fewer than 2 x {k}",
                      file=sys.stderr)
                return 2
            idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))[: 2 * k].tolist()
            x = torch.stack([test[i][0] for i in idx]).to(device)
        except (DatasetNotFoundError, ValueError) as e:  # ValueError: also an image that cannot be decoded
            print(f"error: interpolation needs the test split: {e}", file=sys.stderr)
            return 2
        pairs = (x[:k], x[k:])
    out = Path(args.out) if args.out else (Path(args.run) / "generated" if args.run else path.parent / "generated")
    out.mkdir(parents=True, exist_ok=True)
    n_classes = model.n_classes
    written = []

    def gen():
        return torch.Generator(device=device).manual_seed(args.seed)

    for t in args.temperatures:
        if n_classes:
            y = torch.arange(n_classes, device=device).repeat_interleave(args.per_class)
            images, nrow = model.sample(len(y), temperature=t, y=y, generator=gen()), args.per_class
        else:
            images, nrow = model.sample(args.n, temperature=t, generator=gen()), max(1, int(args.n**0.5))
        p = out / f"samples_t{t:g}.png"
        save_grid(images, p, nrow=nrow)
        written.append(p)
        for c in range(n_classes or 0):
            y = torch.full((args.n,), c, dtype=torch.long, device=device)
            images = model.sample(args.n, temperature=t, y=y, generator=gen())
            p = out / f"class{c}_t{t:g}.png"
            save_grid(images, p, nrow=max(1, int(args.n**0.5)))
            written.append(p)

    if pairs is not None:
        grid = interpolate(model, *pairs, args.steps)
        p = out / "interpolation.png"
        save_grid(grid.flatten(0, 1), p, nrow=args.steps)
        written.append(p)
    step = state.get("step", (state.get("history") or {}).get("steps_done"))  # an experiments model: its history
    print(f"checkpoint {path}{'' if step is None else f' (step {step})'}; wrote {len(written)} images to {out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    from ._cli import plain_warnings

    plain_warnings()
    sys.exit(main())
