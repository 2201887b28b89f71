"""How TF32 1x1 convolutions move a Glow's log-likelihood: operands truncated vs rounded vs 3xTF32 (float64
emulation, CPU).

The fused kernels' 1x1 convolutions are `tl.dot`s. Under TF32 (PyTorch's default for convolutions on a GPU), fp32
operands given to the tensor cores lose their 13 low mantissa bits by truncation, which shrinks every product
towards zero; the kernels therefore round their operands to the nearest TF32 value first
(`glowfast.kernels.actnorm_invconv.round_to_tf32`). This script measures what either choice does to held-out
bits/dim: it trains a small Glow (reference path, fp32), then evaluates it in float64 (the same dequantisation
noise each time) — exactly, and with every flow step's 1x1 conv computed from truncated or from rounded TF32
operands, as 3xTF32 (each fp32 operand split into two TF32 values, three products: the kernels' GPU default,
`conv_dot`), and in plain fp32 (what the reference's fp32 conv computes); the flow's log-determinant stays the
exact log|det W|, as in the kernels. Only the 1x1 convs are emulated; the coupling networks stay exact.

    python benchmarks/tf32_rounding.py                       # digits (embedded), K = 8 and 32, ~3 min on 2 cores
    python benchmarks/tf32_rounding.py --dataset mnist --size 28 --data-dir data -K 16 --steps 500

On a GPU, `--run RUN_DIR --device cuda` measures instead of emulating: the held-out bits/dim of a trained
`glowfast.train` run with the fused path at its default (3xTF32 dots under cuDNN's default TF32 flag) and with
plain TF32 dots (`use_dot_precision("tf32")`), the reference path at the default (cuDNN), and the fused path in
full fp32 (`glowfast.evaluate.full_fp32`), each against the same model in float64 (benchmarks/gpu_check.sh runs
it after its training run).
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from glowfast.data import get_dataset
from glowfast.model import Glow
from glowfast.reference import InvConv1x1

_LOW_BITS = 0x1FFF  # the 13 mantissa bits an fp32 has beyond TF32's 10


def tf32(t: torch.Tensor, mode: str) -> torch.Tensor:
    """t (any float dtype) as fp32 cut to TF32: 'truncate' drops the low bits, 'round' rounds to nearest."""
    bits = t.float().contiguous().view(torch.int32)
    if mode == "round":
        bits = bits + 0x1000
    return (bits & ~_LOW_BITS).view(torch.float32).to(t.dtype)


def conv1x1(w: torch.Tensor, x: torch.Tensor, mode: str) -> torch.Tensor:
    """W x per pixel (float64 result) as computed in `mode`: "truncate" / "round" (one product of TF32-cut
    operands), "3xtf32" (a_hi b_hi + a_hi b_lo + a_lo b_hi of the fp32 operands split into TF32 halves) or "fp32"."""
    prod = lambda a, b: torch.einsum("oc,bchw->bohw", a, b)  # noqa: E731
    if mode == "fp32":
        return prod(w.float(), x.float()).double()
    if mode == "3xtf32":
        w32, x32 = w.float(), x.float()
        w_hi, x_hi = tf32(w32, "round"), tf32(x32, "round")
        w_lo, x_lo = tf32(w32 - w_hi, "round"), tf32(x32 - x_hi, "round")
        return prod(w_lo.double(), x_hi.double()) + prod(w_hi.double(), x_lo.double()) \
            + prod(w_hi.double(), x_hi.double())
    return prod(tf32(w, mode), tf32(x, mode))


MODES = ("truncate", "round", "3xtf32", "fp32")


def emulate_tf32_invconv(model: Glow, mode: str) -> list:
    """Forward hooks that replace every InvConv1x1's output by W x computed as in `mode` (see conv1x1)."""
    def hook(module, args, output):
        return (conv1x1(module.weight_matrix(), args[0], mode), *output[1:])

    return [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, InvConv1x1)]


def heldout_bpd(model: Glow, images: torch.Tensor, seed: int) -> torch.Tensor:
    """Bits/dim as reported (uniform dequantisation noise), the same noise for every evaluation."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return torch.cat([model(b).bits_per_dim for b in images.split(256)])


def study(args, K: int) -> dict:
    torch.manual_seed(args.seed)
    train = get_dataset(args.dataset, "train", args.data_dir or "data", size=args.size)
    test = get_dataset(args.dataset, "test", args.data_dir or "data", size=args.size)
    x_train = torch.stack([train[i][0] for i in range(len(train))])
    x_test = torch.stack([test[i][0] for i in range(min(len(test), args.test_images))])
    model = Glow(tuple(x_train.shape[1:]), K=K, L=args.L, hidden_channels=args.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(args.seed)
    for _ in range(args.steps):
        batch = x_train[torch.randint(0, len(x_train), (args.batch,), generator=g)]
        loss = model(batch).bits_per_dim.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model64 = copy.deepcopy(model).double().eval()
    exact = heldout_bpd(model64, x_test, args.seed)
    row = {"dataset": args.dataset, "K": K, "L": args.L, "flow_steps": K * args.L, "train_steps": args.steps,
           "heldout_bpd": float(exact.mean()), "images": len(x_test)}
    for mode in MODES:
        handles = emulate_tf32_invconv(model64, mode)
        err = heldout_bpd(model64, x_test, args.seed) - exact
        for h in handles:
            h.remove()
        row[mode] = {"mean_bpd_error": float(err.mean()), "max_abs_bpd_error": float(err.abs().max())}
    return row


def measure_run(args) -> dict:
    """Measured (not emulated) errors of a trained run's held-out bits/dim (at the bins' corners) on args.device,
    vs the same model in float64."""
    from glowfast.evaluate import full_fp32
    from glowfast.experiments.common import load_split
    from glowfast.kernels import dot_precision, use_dot_precision
    from glowfast.sample import load_run_model

    _, state, model, dev = load_run_model(args.run, None, args.device, "auto")
    cfg = state["config"]
    split = load_split(cfg["dataset"], "test", args.data_dir or cfg.get("data_dir", "data"), model.image_shape[1],
                       n=args.test_images)
    images = split.images.to(dev)
    labels = split.labels.to(dev) if model.n_classes else None

    def bpd(m, backend):
        # no dequantisation noise: a float64 copy would draw different noise from the same seed
        m.backend = backend
        with torch.no_grad():
            return torch.cat([m(b, None if labels is None else labels[i:i + 256], dequantize=False).bits_per_dim
                              .double() for i, b in zip(range(0, len(images), 256), images.split(256), strict=True)])

    fused_backend = model.resolve_backend(dev)
    exact = bpd(copy.deepcopy(model).double(), "reference")
    rows = {f"{fused_backend}, default ({dot_precision(dev)} dots)": bpd(model, fused_backend)}
    with use_dot_precision("tf32"):
        rows[f"{fused_backend}, plain TF32 dots"] = bpd(model, fused_backend)
    rows["reference, default TF32 flag (cuDNN)"] = bpd(model, "reference")
    with full_fp32():
        rows[f"{fused_backend}, full fp32"] = bpd(model, fused_backend)
    out = {"run": str(args.run), "device": str(dev), "images": len(images), "heldout_bpd": float(exact.mean()),
           "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}
    for name, b in rows.items():
        err = b - exact
        out[name] = {"mean_bpd_error": float(err.mean()), "max_abs_bpd_error": float(err.abs().max())}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None, help="default: data (or, with --run, the run's own)")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("-K", type=int, nargs="+", default=[8, 32])
    p.add_argument("-L", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--run", help="measure this glowfast.train run on --device instead of emulating")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.run:
        r = measure_run(args)
        print(f"held-out bits/dim {r['heldout_bpd']:.4f} ({r['images']} images, {r['device']}); error vs float64:")
        print("| path | mean error | max \\|error\\| |\n| --- | ---: | ---: |")
        for name, v in r.items():
            if isinstance(v, dict):
                print(f"| {name} | {v['mean_bpd_error']:+.2e} | {v['max_abs_bpd_error']:.1e} |")
        print(json.dumps(r))
        return 0
    print("| data | flow steps | held-out bits/dim | " + " | ".join(
        f"{m}: mean (max) error" for m in MODES) + " |")
    print("| --- | ---: | ---: |" + " ---: |" * len(MODES))
    for K in args.K:
        r = study(args, K)
        cells = " | ".join(f"{r[m]['mean_bpd_error']:+.2e} ({r[m]['max_abs_bpd_error']:.1e})" for m in MODES)
        print(f"| {r['dataset']} | {r['flow_steps']} | {r['heldout_bpd']:.4f} | {cells} |", flush=True)
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
