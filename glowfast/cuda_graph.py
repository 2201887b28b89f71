"""A training step's forward + backward captured once in a CUDA graph and replayed for every batch.

Why: a Glow is ~100 flow steps of small ops. Even on the fused path one training step of the CIFAR-10 model
issues ~5,000 small ops (the coupling networks' convs, ReLUs and ActNorms, their backward, the parameter-side
ops): at batch 64 the host's launch overhead, not the GPU, can bound the step. Replaying a captured graph
costs one launch from the host.

    step = GraphedStep(loss_and_grads, (x, y), model.parameters())   # warm-up + capture (first batch)
    stats = step(x, y)        # copy the batch into the static inputs, replay; `stats` is a static output
    optimizer.step()          # eager, reads the grads the replay wrote

What `fn` must satisfy (torch.cuda.graphs rules): CUDA tensors only, no host synchronisation (no .item(),
no bool(tensor), no data-dependent Python branches), fixed shapes. glowfast's model does not synchronise once
every ActNorm is initialised (it skips its finite-value input checks while a capture is running), so
`fn = forward + loss.backward() + clip_grad_norm_` qualifies. Random numbers (the dequantisation noise) are
fresh on every replay: the default CUDA generator advances per replay.

Resuming: the warm-up calls draw random numbers too, so a run resumed with CUDA graphs continues with other
dequantisation noise than an uninterrupted one would have drawn (without graphs, resume is bit-identical).

Gradients: before the capture every parameter's `.grad` is set to None, so the captured backward allocates
the gradients in the graph's memory pool and each replay *overwrites* them (it never accumulates). Do not
set them to None or replace them afterwards (`optimizer.zero_grad(set_to_none=True)` would make the next
`optimizer.step()` see no gradients): `__call__` checks this and raises. Zeroing in place is harmless.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

__all__ = ["GraphedStep", "check_graphable", "clear_failed_capture"]


def clear_failed_capture(device: torch.device) -> None:
    """After a capture that raised: let `device`'s default CUDA generator draw random numbers again.

    torch marks the generator as capturing when a capture begins and unmarks it only when the capture ends
    cleanly. After a failed one every later random draw on that device raises "Offset increment outside graph
    capture encountered unexpectedly" (22nd session: one benchmark whose capture failed failed the next 11 at
    their first torch.randn). A copy of the generator's own state -- same seed and offset, not marked -- replaces
    it. Graphs captured earlier keep the old state: their replays draw on, but no longer in step with the eager
    draws (they may repeat numbers those draw), so a caller that keeps such graphs should not rely on the two
    being independent."""
    device = torch.device(device)
    gen = torch.cuda.default_generators[torch.cuda.current_device() if device.index is None else device.index]
    gen.graphsafe_set_state(gen.clone_state())


def check_graphable(device: torch.device) -> None:
    """Raise ValueError if CUDA graphs cannot be used on `device`."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device; the model is on {device}")
    if not torch.cuda.is_available():
        raise ValueError("CUDA graphs need CUDA, and torch.cuda.is_available() is False")


class GraphedStep:
    """`fn(*inputs)` (forward + backward) captured in a CUDA graph; calling it replays the graph on new inputs.

    `inputs`: example tensors (the first batch); their shapes, dtypes and device are fixed from now on.
    `params`: the tensors whose `.grad` the backward writes (the model's parameters).
    `warmup`: eager calls on a side stream before the capture (cuDNN/Triton autotuning and JIT, allocator
    warm-up, lazily created caches); their gradients are discarded, parameters are not changed.
    """

    def __init__(self, fn: Callable[..., torch.Tensor | Sequence[torch.Tensor]], inputs: Sequence[torch.Tensor],
                 params: Iterable[torch.Tensor], warmup: int = 3):
        if not inputs:
            raise ValueError("GraphedStep needs at least one input tensor")
        for t in inputs:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"GraphedStep inputs must be tensors, got {type(t).__name__}")
            check_graphable(t.device)
        if len({t.device for t in inputs}) > 1:
            raise ValueError(f"GraphedStep inputs must be on one device, got {sorted({str(t.device) for t in inputs})}")
        self.fn = fn
        self.params = [p for p in params if p.requires_grad]
        self.static_inputs = [t.detach().clone() for t in inputs]
        self.device = self.static_inputs[0].device

        # the inputs' device is current throughout: the streams below and the capture stream are per device
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self._clear_grads()
                    fn(*self.static_inputs)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()

            self._clear_grads()
            self.graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                    self.static_outputs = fn(*self.static_inputs)
            except BaseException:
                clear_failed_capture(self.device)  # a caller that goes on eagerly can still draw noise
                raise
        self._grads = [p.grad for p in self.params]

    def _clear_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def __call__(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.static_inputs):
            raise ValueError(f"GraphedStep was captured with {len(self.static_inputs)} inputs, got {len(inputs)}")
        for i, (t, static) in enumerate(zip(inputs, self.static_inputs, strict=True)):
            if t.shape != static.shape or t.dtype != static.dtype:
                raise ValueError(f"GraphedStep input {i}: captured with shape {tuple(static.shape)} and dtype "
                                 f"{static.dtype}, got {tuple(t.shape)} and {t.dtype} (a graph has fixed shapes; "
                                 "drop the last incomplete batch)")
        if any(p.grad is not g for p, g in zip(self.params, self._grads, strict=True)):
            raise RuntimeError("a parameter's .grad was replaced or set to None after the CUDA graph was captured "
                               "(e.g. optimizer.zero_grad(set_to_none=True)); the graph writes the gradients into "
                               "its own tensors, so leave them in place (zero_grad(set_to_none=False) is fine)")
        with torch.cuda.device(self.device):
            for t, static in zip(inputs, self.static_inputs, strict=True):
                static.copy_(t, non_blocking=True)
            self.graph.replay()
        return self.static_outputs
