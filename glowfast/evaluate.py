"""Likelihood evaluation of a Glow model: mean bits/dim over a dataset split, per-image scores, and a CLI.

    python -m glowfast.evaluate --run runs/mnist --datasets mnist fashion-mnist noise [--data-dir data]

scores every image of each dataset's test split (or ``name:train``) with the run's model (its weights' moving
average when it kept one) and prints mean bits/dim and, for every set after the first, the AUROC of separating
it from the first by −log p (Nalisnick et al. 2019's question: does the flow give OOD data lower likelihood?).
``--dequant-samples K`` uses K dequantisation draws per image: log (1/K) Σ_k p(x + u_k) is a tighter lower
bound on the discrete log-likelihood than one draw. ``--json`` / ``--save-scores`` keep the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["class_log_likelihoods", "evaluate_bpd", "full_fp32", "iterate_batches", "nll_bits_per_dim",
           "shard_indices", "unwrap"]


@contextlib.contextmanager
def full_fp32():
    """Exact fp32 inside: no TF32 in cuDNN convolutions, cuBLAS matmuls or the fused kernels' 1x1-conv dots
    (settings restored on exit). Every likelihood this module reports is computed under it.

    Why: training may use TF32 (PyTorch's default for convolutions; fast, and its rounding noise is harmless to
    SGD), but a reported bits/dim, or the likelihood ranking of an OOD test, should not carry TF32's error: in a
    float64 emulation the 1x1 convs alone moved single images' bits/dim by up to 1.4e-2 with rounded TF32 operands
    (the kernels' opt-in plain "tf32") and by -4e-2 on average with truncated ones (benchmarks/RESULTS.md); the
    kernels' default 3xTF32 dots are at fp32 level, but cuDNN's TF32 convolutions in the coupling networks are not.
    A network's own bf16 option (--amp bf16) is part of the model and stays."""
    from .kernels import use_dot_precision

    # Switched through the legacy setters, which keep torch's two TF32 APIs consistent (the legacy getters still
    # work inside). Restored in the order that gives back exactly what the caller had, on torch 2.11-2.14: the
    # legacy flags where they were readable, the float32 matmul precision, then any new-API value that differs.
    switches = (torch.backends, torch.backends.cudnn, torch.backends.cudnn.conv, torch.backends.cudnn.rnn,
                torch.backends.cuda.matmul)
    saved = [s.fp32_precision for s in switches]
    try:
        saved_matmul_precision = torch.get_float32_matmul_precision()
    except RuntimeError:  # unreadable once the caller mixed the two APIs; the new-API values restore it
        saved_matmul_precision = None
    legacy = [_legacy_tf32_flag(torch.backends.cudnn), _legacy_tf32_flag(torch.backends.cuda.matmul)]
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    # A caller who chose TF32 through the new API (torch.backends[.cudnn].fp32_precision = "tf32") keeps it on
    # the ops after the legacy setters: switch those off by name.
    for op in (torch.backends.cudnn.conv, torch.backends.cudnn.rnn, torch.backends.cuda.matmul):
        if op.fp32_precision == "tf32":
            op.fp32_precision = "ieee"
    try:
        with use_dot_precision("ieee"):
            yield
    finally:
        for switch, flag in zip((torch.backends.cudnn, torch.backends.cuda.matmul), legacy, strict=True):
            if flag is not None:
                switch.allow_tf32 = flag
        if saved_matmul_precision is not None:
            torch.set_float32_matmul_precision(saved_matmul_precision)
        for s, value in zip(switches, saved, strict=True):
            if s.fp32_precision != value:
                s.fp32_precision = value


def _legacy_tf32_flag(switch) -> bool | None:
    """torch's legacy allow_tf32 of cudnn or cuda.matmul; None where the new API left it unreadable (mixed)."""
    try:
        return bool(switch.allow_tf32)
    except RuntimeError:
        return None


def unwrap(model: nn.Module) -> nn.Module:
    """The Glow inside a DistributedDataParallel / compiled wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_indices(n: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Indices rank, rank + W, ... of ``range(n)``: every item exactly once over all ranks (no padding)."""
    return list(range(rank, n, world_size))


def iterate_batches(dataset: Dataset, batch_size: int, indices: list[int] | None = None,
                    num_workers: int = 0) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, int64 labels) batches in index order; a fast path for in-memory tensor datasets."""
    if indices is None:
        indices = list(range(len(dataset)))
    images = getattr(dataset, "images", None)
    labels = getattr(dataset, "labels", None)
    if isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor):
        idx = torch.as_tensor(indices, dtype=torch.long)
        for i in range(0, len(idx), batch_size):
            j = idx[i: i + batch_size]
            yield images[j], labels[j]
        return
    subset = torch.utils.data.Subset(dataset, indices)
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        generator=torch.Generator())
    for x, y in loader:
        yield x, torch.as_tensor(y)


@torch.no_grad()
@full_fp32()
def evaluate_bpd(model: nn.Module, data: Dataset | DataLoader | Iterable, device: torch.device | str | None = None,
                 batch_size: int = 256, y_condition: bool = False, seed: int | None = 0,
                 num_workers: int = 0) -> float:
    """Mean bits/dim of ``model`` over every image of ``data`` (no grad, eval mode, training mode restored).

    ``data`` is a Dataset of ``(uint8 image, label)`` (under torch.distributed each rank evaluates a disjoint
    shard and the sums are all-reduced, so every rank returns the mean over the whole split), or any iterable
    of ``(images, labels)`` batches / image tensors (evaluated as given, no sharding).
    ``y_condition`` passes the labels to a class-conditional model. ``seed`` fixes the dequantisation noise
    (a private generator: the global RNG is not consumed); ``None`` uses the global RNG.
    """
    glow = unwrap(model)
    if device is None:
        device = next(glow.parameters()).device
    device = torch.device(device)
    was_training = glow.training
    glow.eval()
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    rank, world = _dist_info()
    if isinstance(data, Dataset):
        batches = iterate_batches(data, batch_size, shard_indices(len(data), rank, world), num_workers)
        reduce = world > 1
    else:
        batches = data
        reduce = False
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for batch in batches:
            if isinstance(batch, (tuple, list)):
                x, y = batch[0], batch[1]
            else:
                x, y = batch, None
            x = x.to(device, non_blocking=True)
            yy = torch.as_tensor(y).to(device) if (y_condition and y is not None) else None
            bpd = glow(x, yy, generator=generator).bits_per_dim
            total += bpd.double().sum()
            count += bpd.numel()
    finally:
        glow.train(was_training)
    if reduce:
        stats = torch.stack([total, count])
        dist.all_reduce(stats)
        total, count = stats[0], stats[1]
    if count.item() == 0:
        return math.nan
    return float(total / count)


# ------------------------------------------------------------------------------------------------ per image
@torch.no_grad()
@full_fp32()
def class_log_likelihoods(model: nn.Module, xc: torch.Tensor) -> torch.Tensor:
    """log p(x | y) in nats for every class y, (B, n_classes), from ONE flow pass over x (model space).

    Only the top prior depends on y in Glow, so the flow, its log-determinant and the split priors are shared.
    """
    latents, logdet, log_pz = model._flow(xc)
    top = latents[-1]
    b = top.shape[0]
    const = logdet + log_pz - math.prod(model.image_shape) * math.log(model.n_bins)
    cols = [model.prior.log_prob(top, torch.full((b,), c, dtype=torch.long, device=top.device)) for c in
            range(model.n_classes)]
    return torch.stack(cols, 1) + const[:, None]


@torch.no_grad()
@full_fp32()
def nll_bits_per_dim(model: nn.Module, images: torch.Tensor, device, batch_size: int = 500, seed: int = 0,
                     labels: torch.Tensor | None = None, return_class_ll: bool = False, dequant_samples: int = 1):
    """Per-image −log p(x) in bits/dim (numpy, (N,)) of uint8 (or [0, 1] float) ``images``.

    A class-conditional model is scored by its marginal p(x) = mean_y p(x | y) (uniform class prior), or by
    p(x | y) when ``labels`` are given. Dequantisation noise comes from a private generator seeded with ``seed``.
    ``dequant_samples`` K > 1: log p(x) is estimated as log (1/K) Σ_k p(x + u_k) over K noise draws (a tighter
    lower bound on the discrete likelihood; K = 1 is the usual one-draw estimate). ``return_class_ll`` (K = 1
    only) also returns the (N, n_classes) log p(x | y) in nats.
    """
    if isinstance(dequant_samples, bool) or not isinstance(dequant_samples, int) or dequant_samples < 1:
        raise ValueError(f"dequant_samples must be an integer >= 1, got {dequant_samples!r}")
    if return_class_ll and dequant_samples != 1:
        raise ValueError("return_class_ll needs dequant_samples=1")
    glow = unwrap(model)
    if return_class_ll and not glow.n_classes:
        raise ValueError("return_class_ll needs a class-conditional model (n_classes), this one has none")
    if labels is not None and glow.n_classes:
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},) like the images, got {tuple(labels.shape)}")
        glow.prior.one_hot(labels.cpu())  # integer labels in [0, n_classes), or a clear error
    was_training = glow.training
    glow.eval()  # no ActNorm initialisation on the scored images; the caller's mode is given back
    try:
        return _nll_bits_per_dim_eval(glow, images, device, batch_size, seed, labels, return_class_ll,
                                      dequant_samples)
    finally:
        glow.train(was_training)


def _nll_bits_per_dim_eval(glow, images, device, batch_size, seed, labels, return_class_ll, dequant_samples):
    d = math.prod(glow.image_shape)
    g = torch.Generator(device=device).manual_seed(seed)
    out, cls = [], []
    for i in range(0, images.shape[0], batch_size):
        x = images[i: i + batch_size].to(device)
        draws = []
        for _ in range(dequant_samples):
            if glow.n_classes and (labels is None or return_class_ll):
                xc = glow.preprocess(x, dequantize=True, generator=g)
                ll = class_log_likelihoods(glow, xc)
                if labels is None:
                    draws.append(torch.logsumexp(ll, 1) - math.log(glow.n_classes))
                else:  # log p(x | y) of the given class: its column
                    y = labels[i: i + batch_size].to(device=device, dtype=torch.long)
                    draws.append(ll.gather(1, y[:, None])[:, 0])
                if return_class_ll:
                    cls.append(ll.double().cpu())
            else:
                y = labels[i: i + batch_size].to(device) if (labels is not None and glow.n_classes) else None
                draws.append(glow(x, y, generator=g).log_prob)
        lp = draws[0] if dequant_samples == 1 else \
            torch.logsumexp(torch.stack(draws).double(), 0) - math.log(dequant_samples)
        out.append((-lp / (d * math.log(2.0))).double().cpu())
    bpd = torch.cat(out).numpy() if out else torch.zeros(0, dtype=torch.float64).numpy()
    if return_class_ll:
        return bpd, torch.cat(cls).numpy()
    return bpd


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m glowfast.evaluate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", default=None, help="run folder of python -m glowfast.train (its newest checkpoint)")
    p.add_argument("--checkpoint", default=None,
                   help="a checkpoint file or run folder; with --run, it may name one in the run (e.g. prev.pt)")
    p.add_argument("--raw-weights", action="store_true",
                   help="the last iterate's weights even when the run kept a moving average (--ema-decay)")
    p.add_argument("--datasets", nargs="+", required=True, metavar="NAME[:SPLIT]",
                   help="datasets to score (split: test unless NAME:train), including folder:PATH[:train] (your own "
                        "images, glowfast/image_folder.py); AUROCs are against the first")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: the run's --data-dir)")
    p.add_argument("--n", type=int, default=0, help="score at most this many images per set, a fixed random subset "
                   "(0: all; 10000 for the synthetic noise / constant sets)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--dequant-samples", type=int, default=1, help="dequantisation draws per image (K)")
    p.add_argument("--labels", action="store_true",
                   help="class-conditional model: score the sets of its own dataset by p(x | true label) instead of "
                        "the marginal p(x) (other sets' labels are not its classes: they keep p(x))")
    p.add_argument("--input-complexity", action="store_true",
                   help="also the AUROC of Serrà et al. 2020's input-complexity score, bits/dim minus each image's "
                        "length as a PNG in bits/dim (glowfast.ood.input_complexity_score; 1- or 3-channel models)")
    p.add_argument("--seed", type=int, default=0, help="dequantisation noise seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--backend", choices=("reference", "fused", "auto"), default="auto")
    p.add_argument("--json", default=None, help="write the table (and settings) as JSON here")
    p.add_argument("--save-scores", default=None, metavar="DIR",
                   help="per-image bits/dim as DIR/<dataset>_<split>.npy, and each image's index in its set as "
                        "DIR/<dataset>_<split>_index.npy (a random subset with --n; a folder:PATH set's name with "
                        "every run of characters other than letters, digits, '.' and '-' as '_', then '_' and the "
                        "CRC-32 of NAME:SPLIT in hex); with --input-complexity also the PNG bits/dim as "
                        "DIR/<stem>_png.npy")
    return p


def _dataset_and_split(spec: str) -> tuple[str, str]:
    """--datasets NAME[:SPLIT] -> (name, split); a [inverted-]folder:PATH[:SPLIT] name keeps its path (canonical,
    absolute)."""
    from .data import SPLITS, is_folder_dataset
    from .image_folder import canonical_name

    prefix = "inverted-" if spec.startswith("inverted-folder:") else ""
    body = spec[len(prefix):]
    if not is_folder_dataset(body):
        name, _, split = spec.partition(":")
        return name, split or "test"
    path, _, split = body.rpartition(":")
    if split not in SPLITS or not path[len("folder:"):]:
        path, split = body, "test"
    return prefix + canonical_name(path), split


def _file_stem(key: str) -> str:
    """A set's key (name:split) as a file name: every run of characters other than letters, digits, '.', '-'
    becomes '_' (mnist:test -> mnist_test); a folder set's also ends in the CRC-32 of its key, as two folders can
    give the same stem (folder:/data/x_y:test and folder:/data/x/y:test)."""
    stem = re.sub(r"[^A-Za-z0-9.-]+", "_", key)
    return f"{stem}_{zlib.crc32(key.encode()):08x}" if "folder:" in key else stem


def _load_images(name: str, split: str, data_dir, image_shape: tuple[int, int, int], n: int):
    """The Split (uint8 images, labels, each image's index in the set) of a set in the model's shape: at most `n`
    (a fixed random subset; 0 = all, and 10000 images of the synthetic noise / constant sets)."""
    from .experiments.common import load_split

    synthetic = name in ("noise", "constant")
    return load_split(name, split, data_dir, image_shape[1], image_shape=image_shape,
                      n=(n or 10000) if synthetic else (n or None))


def main(argv: list[str] | None = None) -> int:
    from .data import DatasetNotFoundError
    from .ood import auroc, png_bits_per_dim
    from .sample import load_run_model, training_options

    args = build_parser().parse_args(argv)

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    if not args.run and not args.checkpoint:
        return fail("give --run RUN or --checkpoint PATH")
    if args.batch_size < 1 or args.n < 0 or args.dequant_samples < 1:
        return fail("--batch-size and --dequant-samples must be >= 1, --n >= 0")
    try:  # the output paths before the scoring, not after minutes of it
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            if Path(args.json).is_dir():
                return fail(f"--json {args.json} is a folder")
        if args.save_scores:
            Path(args.save_scores).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return fail(f"output path: {e}")
    try:
        path, state, model, device = load_run_model(args.run, args.checkpoint, args.device, args.backend,
                                                    args.raw_weights)
    except ValueError as e:
        return fail(str(e))
    if args.input_complexity and model.image_shape[0] not in (1, 3):
        return fail(f"--input-complexity measures PNG lengths of 1- or 3-channel images; the model's have "
                    f"{model.image_shape[0]}")
    cfg = training_options(state)
    data_dir = args.data_dir or cfg.get("data_dir") or "data"
    sets = {}  # every set loaded before any is scored: a missing one fails at once, not after minutes of scoring
    for spec in args.datasets:
        name = spec.partition(":")[0]  # for the message, if the name itself is refused
        try:
            name, split = _dataset_and_split(spec)
            s = _load_images(name, split, data_dir, model.image_shape, args.n)
        except (DatasetNotFoundError, ValueError) as e:
            message = str(e)  # data's messages start with the dataset's name already
            return fail(message if message.startswith(f"{name}:") else f"{spec}: {message}")
        if tuple(s.images.shape[1:]) != model.image_shape:
            return fail(f"{spec}: images of shape {tuple(s.images.shape[1:])}, the model expects {model.image_shape}")
        sets[f"{name}:{split}"] = (name, s)
    rows, scores, png = [], {}, {}
    for key, (name, s) in sets.items():
        # a set's labels are the model's classes only for the dataset it was trained on: any other set (noise,
        # another dataset's classes) is scored by the marginal p(x), and the table says which score each row is
        conditional = bool(args.labels and model.n_classes and name == cfg.get("dataset"))
        use_labels = s.labels if conditional else None
        bpd = nll_bits_per_dim(model, s.images, device, args.batch_size, args.seed, labels=use_labels,
                               dequant_samples=args.dequant_samples)
        scores[key] = bpd
        n = int(bpd.size)
        n_nonfinite = int((~np.isfinite(bpd)).sum())
        finite = n_nonfinite == 0
        if not finite:  # a broken model (NaN) or a zero likelihood (inf): no mean, no ranking, and said so
            print(f"warning: {key}: {n_nonfinite} of {n} images have non-finite bits/dim; "
                  "its mean and AUROC are not computed", file=sys.stderr)
        # JSON null, never NaN (NaN is not JSON)
        sem = float(bpd.std(ddof=1) / math.sqrt(n)) if n > 1 and finite else None
        row = {"dataset": key, "n": n, "mean_bpd": float(bpd.mean()) if finite else None, "sem_bpd": sem,
               "n_nonfinite": n_nonfinite, "score": "p(x | label)" if conditional else "p(x)"}
        if args.input_complexity:
            png[key] = png_bits_per_dim(s.images)
            row["mean_png_bpd"] = float(png[key].mean())
        if rows:
            first_key = rows[0]["dataset"]
            first_finite = bool(np.isfinite(scores[first_key]).all())
            row["auroc_vs_first"] = auroc(scores[first_key], bpd) if finite and first_finite else None
            if args.input_complexity:  # Serrà et al.'s score, bits/dim - PNG bits/dim (ood.input_complexity_score)
                row["auroc_input_complexity_vs_first"] = (auroc(scores[first_key] - png[first_key], bpd - png[key])
                                                          if finite and first_finite else None)
        rows.append(row)
    header = "| dataset | score | images | mean bits/dim | ± s.e. | AUROC vs " + rows[0]["dataset"] + " (−log p) |"
    if args.input_complexity:
        header += " mean PNG bits/dim | AUROC (input complexity) |"
    print(f"{path} ({'moving average' if state.get('ema') is not None and not args.raw_weights else 'weights'}; "
          f"{args.dequant_samples} dequantisation draw(s), seed {args.seed})")
    if args.labels and all(r["score"] == "p(x)" for r in rows):
        print(f"note: --labels applies to the model's own dataset ({cfg.get('dataset', '?')}) and only to a "
              "class-conditional model; every set here is scored by p(x)")
    print(header + "\n| --- | --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if args.input_complexity else ""))

    def fmt(v):
        return "—" if v is None else f"{v:.4f}"

    for r in rows:
        mean = "non-finite" if r["mean_bpd"] is None else f"{r['mean_bpd']:.4f}"
        line = (f"| {r['dataset']} | {r['score'].replace('|', chr(92) + '|')} | {r['n']} | {mean} | "
                f"{fmt(r['sem_bpd'])} | {fmt(r.get('auroc_vs_first'))} |")
        if args.input_complexity:
            line += f" {fmt(r['mean_png_bpd'])} | {fmt(r.get('auroc_input_complexity_vs_first'))} |"
        print(line)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json",)}
        Path(args.json).write_text(json.dumps({"checkpoint": str(path), "settings": settings, "rows": rows},
                                              indent=1) + "\n")
    if args.save_scores:
        out = Path(args.save_scores)
        for key, bpd in scores.items():
            np.save(out / f"{_file_stem(key)}.npy", bpd)
            # which image of the set each score is (a subset with --n; the synthetic sets are generated in order)
            np.save(out / f"{_file_stem(key)}_index.npy", sets[key][1].index.numpy())
            if key in png:
                np.save(out / f"{_file_stem(key)}_png.npy", png[key])
    return 0


if __name__ == "__main__":
    from ._cli import plain_warnings

    plain_warnings()
    sys.exit(main())
