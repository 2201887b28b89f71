"""The whole-model configurations and training step shared by bench_model.py and startup.py (no pytest import:
startup.py times its own imports)."""

from __future__ import annotations

import torch

CONFIGS = {
    "cifar10_K32": dict(image_shape=(3, 32, 32), K=32, L=3, hidden_channels=512),
    "mnist_K16": dict(image_shape=(1, 32, 32), K=16, L=3, hidden_channels=512),
    "mnist_K32": dict(image_shape=(1, 32, 32), K=32, L=3, hidden_channels=512),
    "mnist_K4_h128": dict(image_shape=(1, 32, 32), K=4, L=3, hidden_channels=128),
}
COMMON = dict(coupling="affine", permutation="invconv", lu=True, learn_top=True, n_classes=None, n_bits=8)
LR = 1e-4


def model_config(name: str) -> dict:
    """Glow(**model_config(name), backend=...) builds configuration `name`."""
    return {**CONFIGS[name], **COMMON}


def adamax(params, fused: bool = False) -> torch.optim.Optimizer:
    """The benchmarks' optimiser: torch's Adamax at LR, or glowfast's FusedAdamax (`fused`)."""
    if fused:
        from glowfast.optim import FusedAdamax

        return FusedAdamax(params, lr=LR)
    return torch.optim.Adamax(params, lr=LR)


def glow_train_step(model, x, fused_optimizer: bool = False):
    """One training step on the fixed batch x: forward (mean bits/dim), backward, Adamax step (glowfast's
    FusedAdamax with `fused_optimizer`); returns the loss."""
    opt = adamax(model.parameters(), fused_optimizer)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(x).bits_per_dim.mean()
        loss.backward()
        opt.step()
        return loss

    return step
