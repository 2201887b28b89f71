"""FusedAdamax: torch.optim.Adamax whose step is one Triton kernel per parameter group (glowfast.kernels.adamax).

The same optimiser as torch's: a subclass with its hyper-parameters, its state (`step`, `exp_avg`, `exp_inf` per
parameter) and so its state dicts, which load into either class; only the update's arithmetic moves into one
kernel that reads and writes each tensor once instead of torch's six foreach passes. Equal to torch's Adamax up to
fp32 rounding (fused multiply-adds; tests/test_optim.py).

Where the kernel cannot run, the group steps with torch's own functional Adamax instead, the same update: CPU
tensors outside the Triton interpreter, non-fp32 or non-contiguous tensors (`kernels.adamax.check_group`), and
`capturable` groups (torch's option; kept on torch's path). `differentiable=True` is refused. `kernel_steps` counts
the group updates the kernel made.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.optim.adamax import adamax as torch_adamax

from ._checks import triton_kernels_run_on


class FusedAdamax(torch.optim.Adamax):
    """`torch.optim.Adamax(params, lr, betas, eps, weight_decay, maximize=...)` with a fused update (module
    docstring). `foreach` and `capturable` are torch's options and run torch's step; `differentiable` is refused."""

    def __init__(self, params, lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, **kwargs):
        if kwargs.get("differentiable"):  # its step must run with grad enabled, which this one's does not
            raise ValueError("FusedAdamax does not take differentiable=True; use torch.optim.Adamax")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
        self._tables: dict = {}  # (group index[, tensor indices]) -> kernels.adamax.AdamaxTables
        self.kernel_steps = 0

    def __setstate__(self, state):  # an unpickled optimiser: no tables yet (they hold device pointers)
        super().__setstate__(state)
        self.__dict__.setdefault("_tables", {})
        self.__dict__.setdefault("kernel_steps", 0)

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._tables.clear()  # the state tensors are new ones

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            params, grads, exp_avgs, exp_infs, steps = [], [], [], [], []
            has_complex = self._init_group(group, params, grads, exp_avgs, exp_infs, steps)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            if group["capturable"] or not self._fusable(params, grads, exp_avgs, exp_infs):
                torch_adamax(params, grads, exp_avgs, exp_infs, steps, eps=group["eps"], beta1=beta1, beta2=beta2,
                             lr=group["lr"], weight_decay=group["weight_decay"], foreach=group["foreach"],
                             maximize=group["maximize"], differentiable=False, capturable=group["capturable"],
                             has_complex=has_complex)
                continue
            self._fused_group_step(gi, group, params, grads, exp_avgs, exp_infs, steps)
        return loss

    @staticmethod
    def _fusable(params, grads, exp_avgs, exp_infs) -> bool:
        from .kernels.adamax import check_group  # here: Triton loads only when the kernel may run

        return triton_kernels_run_on(params[0]) and check_group(params, grads, exp_avgs, exp_infs) is None

    def _fused_group_step(self, gi, group, params, grads, exp_avgs, exp_infs, steps) -> None:
        from .kernels.adamax import AdamaxTables, adamax_update

        # the step counters: CPU scalars as torch keeps them (one foreach add, as torch's foreach step does)
        torch._foreach_add_(steps, torch.tensor(1.0), alpha=1.0)
        by_step = defaultdict(list)  # parameters stepped a different number of times (some had no gradient)
        for i, s in enumerate(torch.stack(steps).tolist()):
            by_step[s].append(i)
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        # the tables per subset of the group's tensors (one subset, the whole group, in the usual case)
        keys = {step: (gi,) if len(by_step) == 1 else (gi, tuple(idx)) for step, idx in by_step.items()}
        self._tables = {k: v for k, v in self._tables.items() if k[0] != gi or k in keys.values()}
        for step, idx in by_step.items():
            sub = [params, grads, exp_avgs, exp_infs]
            if len(by_step) > 1:
                sub = [[t[i] for i in idx] for t in sub]
            tables = self._tables.get(keys[step])
            if tables is None or tables.key != AdamaxTables.key_of(*sub):  # new pointers: new gradient tensors
                tables = self._tables[keys[step]] = AdamaxTables.for_tensors(*sub)  # or a loaded state
            clr = lr / (1 - beta1 ** step)
            adamax_update(tables, -clr, beta1, beta2, group["eps"], group["weight_decay"], group["maximize"])
        self.kernel_steps += 1
