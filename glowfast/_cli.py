"""What the command-line entry points share: how they print warnings, and cuDNN's autotuner."""

from __future__ import annotations

import contextlib
import warnings

import torch


def plain_warnings() -> None:
    """Warnings as one ``warning: ...`` line on stderr, as the CLIs print their errors and notes, instead of Python's
    ``path:line: UserWarning: ...`` followed by the source line that raised it. Called only under ``__main__``: a
    library user's warnings keep Python's format."""
    warnings.formatwarning = lambda message, category, filename, lineno, line=None: f"warning: {message}\n"


@contextlib.contextmanager
def cudnn_autotune(device: torch.device, enabled: bool = True):
    """``torch.backends.cudnn.benchmark = enabled`` while a CLI's work runs on a CUDA device, restored after.

    With it cuDNN times its convolution algorithms at each new input shape and keeps the fastest, instead of its
    heuristic's pick: a Glow's coupling networks run the same few shapes for the whole run, so the one-off timing
    (seconds, at start-up and at each new batch shape such as an evaluation batch) pays back. benchmarks/ measures
    every speed with it on, so the training CLIs run as they were measured. Other devices: the flag is untouched
    (it only concerns cuDNN). Restored on exit so that an in-process caller (a test, a notebook) keeps its own."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = bool(enabled)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
