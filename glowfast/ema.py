"""Exponential moving average of a model's parameters (openai/glow's "Polyak averaging").

A flow's test log-likelihood is measurably better with averaged weights than with the last iterate of a
short run (the optimiser's noise averages out). openai/glow keeps such an average (TensorFlow's
ExponentialMovingAverage, decay = Adam's beta2, zero-debiased, no ``num_updates``) and saves it beside its
checkpoints, but its training script evaluates the last iterate (the swap is commented out), so averaged numbers
are not like-for-like with its logs. Here:

    ema = ParameterEMA(model, decay=0.999)
    ...  optimizer.step(); ema.update()          # after every applied update (not after skipped ones)
    with ema.applied():                          # evaluate / sample / save figures with the averaged weights
        evaluate(model)

The average is kept in float32 (or the parameter's dtype if wider) on the parameters' device, one copy of
the parameters. The n-th update uses ``min(decay, (1 + n) / (10 + n))`` (TensorFlow's
ExponentialMovingAverage with ``num_updates``): early in a run the average follows the weights closely
instead of remembering the initialisation for ~1/(1 - decay) steps. Buffers are not averaged: a Glow's
buffers (ActNorm's "initialised" flag, the LU's fixed permutation and signs) are constants after
initialisation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["ParameterEMA", "use_checkpoint_average"]


class ParameterEMA:
    """An exponential moving average of ``model.parameters()`` (in their registration order)."""

    def __init__(self, model: nn.Module, decay: float):
        if not (isinstance(decay, (int, float)) and math.isfinite(decay) and 0.0 < decay < 1.0):
            raise ValueError(f"EMA decay must be a number in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.params = [p for p in model.parameters()]
        if not self.params:
            raise ValueError("EMA of a model without parameters")
        self.shadow = [p.detach().to(torch.promote_types(p.dtype, torch.float32)).clone() for p in self.params]
        self.num_updates = 0

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self) -> None:
        """shadow ← decay · shadow + (1 − decay) · param, for every parameter (one fused foreach call)."""
        weight = 1.0 - self.current_decay()
        current = [p.detach().to(s.dtype) for p, s in zip(self.params, self.shadow)]  # .to: no copy when equal
        torch._foreach_lerp_(self.shadow, current, weight)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self) -> None:
        """Write the average into the parameters (in place: CUDA graphs and optimisers keep their tensors)."""
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the model holds the averaged weights; on exit (also on error) its own again."""
        with torch.no_grad():
            backup = [p.detach().clone() for p in self.params]
            self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow):
            raise ValueError(f"EMA state holds {len(shadow)} tensors, the model has {len(self.shadow)} parameters")
        for i, (s, v) in enumerate(zip(self.shadow, shadow)):
            if s.shape != v.shape:
                raise ValueError(f"EMA state tensor {i} has shape {tuple(v.shape)}, the parameter {tuple(s.shape)}")
        with torch.no_grad():
            for s, v in zip(self.shadow, shadow):
                s.copy_(v)
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])


def use_checkpoint_average(model: nn.Module, state: dict) -> bool:
    """Load the moving average a checkpoint kept (``state["ema"]``, from ``--ema-decay``) into ``model``, whose
    own weights are already loaded. Returns whether there was one."""
    if state.get("ema") is None:
        return False
    ema = ParameterEMA(model, state["ema"]["decay"])
    ema.load_state_dict(state["ema"])
    ema.copy_to()
    return True
