"""Crash-safe checkpoints that cannot execute code when loaded.

Saving is atomic: the checkpoint is written to a temporary file in the target directory, flushed and
fsync'ed, then moved over the target with ``os.replace`` (atomic on POSIX and Windows), and the directory is
fsync'ed. A crash at any point -- an exception in the writer, SIGKILL, a full disk -- leaves either the old
or the new file, never a half-written one under the final name.

A run keeps two checkpoints in ``RUN/checkpoints/``: ``last.pt`` and ``prev.pt`` (the one before it).
:func:`find_checkpoint` returns the newest one that loads, so even a damaged ``last.pt`` (e.g. a file
system that lost data without fsync) falls back to ``prev.pt``.

Loading uses ``torch.load(weights_only=True)``: only tensors and plain Python containers/scalars are
accepted, so a checkpoint holds the config as a plain dict and RNG states as tensors / lists of ints.
"""

from __future__ import annotations

import os
import random
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

LAST = "last.pt"
PREV = "prev.pt"

__all__ = [
    "LAST",
    "PREV",
    "CheckpointError",
    "NonFiniteStateError",
    "assert_finite_state",
    "atomic_save",
    "find_checkpoint",
    "get_rng_state",
    "load_checkpoint",
    "save_checkpoint",
    "set_rng_state",
]


class CheckpointError(RuntimeError):
    """No usable checkpoint (missing, unreadable, damaged, or not one of this run)."""


class NonFiniteStateError(ValueError):
    """A state dict to be saved holds NaN/Inf values; it is refused so no checkpoint holds them."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_umask() -> int:
    try:  # Linux: read it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it (once, at import)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _readable_by_group(fd: int) -> None:
    """mkstemp makes the file owner-only (0600); a checkpoint gets the mode of any other file the user writes (the
    umask), so colleagues sharing a project folder can load it. Best effort: no fchmod (Windows) or a file system
    that refuses it (some FUSE / CIFS mounts) leaves 0600 rather than failing the save."""
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
    except (AttributeError, OSError):
        pass


def atomic_save(obj: Any, path: str | os.PathLike, writer: Callable[[Any, Any], None] | None = None,
                before_replace: Callable[[], None] | None = None, make_parents: bool = True) -> Path:
    """Write ``obj`` to ``path`` atomically (temp file in the same directory + fsync + ``os.replace``).

    ``writer(obj, file)`` serialises ``obj`` into an open binary file (default ``torch.save``). If it raises
    (or the process dies) the temporary file is removed / left under a ``.tmp`` name and ``path`` keeps its
    previous content. ``before_replace()`` runs once the new content is safely on disk, just before the rename
    (save_checkpoint keeps the old file as prev.pt there). ``make_parents=False``: the folder must exist (a run's
    own files: a run folder deleted while training is not silently recreated).
    """
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    writer = writer or torch.save
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _readable_by_group(f.fileno())
            writer(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def assert_finite_state(state: Any, name: str = "state") -> None:
    """Raise NonFiniteStateError if any floating tensor in a (nested) state holds NaN or Inf."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() and not bool(torch.isfinite(state).all()):
            raise NonFiniteStateError(f"{name} contains non-finite values (NaN or Inf)")
    elif isinstance(state, dict):
        for k, v in state.items():
            assert_finite_state(v, f"{name}.{k}")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            assert_finite_state(v, f"{name}[{i}]")


def save_checkpoint(state: dict, directory: str | os.PathLike,
                    writer: Callable[[Any, Any], None] | None = None) -> Path:
    """Save ``state`` as ``directory/last.pt``, keeping the previous ``last.pt`` as ``prev.pt``.

    ``state["model"]`` and ``state["optimizer"]`` are checked for NaN/Inf first (NonFiniteStateError). The
    order of operations keeps a loadable ``last.pt`` on disk at every instant: the new file is fully written
    to a temporary name, the current ``last.pt`` is hard-linked (or copied) to ``prev.pt`` atomically, and
    only then is the new file renamed over ``last.pt``.
    """
    for key in ("model", "optimizer"):
        if key in state:
            assert_finite_state(state[key], key)
    directory = Path(directory)
    last, prev = directory / LAST, directory / PREV

    def keep_previous() -> None:
        if last.exists():
            _preserve_as(last, prev)

    atomic_save(state, last, writer, before_replace=keep_previous)
    _remove_stale_temporaries(directory)
    return last


def _remove_stale_temporaries(directory: Path) -> None:
    """Delete the half-written `.last.pt.*.tmp` files of a writer that was killed mid-save. Only one process
    writes a run's checkpoints (rank 0) and its own temporary is already renamed, so any left are stale."""
    for stale in directory.glob(f".{LAST}.*.tmp"):
        try:
            stale.unlink()
        except OSError:
            pass


def _preserve_as(src: Path, dst: Path) -> None:
    """Atomically make ``dst`` a copy of ``src`` (hard link when possible)."""
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)


def _load_failure(e: Exception) -> str:
    """torch.load's error in one short line. Its weights-only refusal is a paragraph that advises re-running with
    weights_only=False, which is wrong for a corrupt file and unsafe for an unknown one: keep only the cause."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    text = " ".join(text.split())
    if not text:
        return f"{type(e).__name__} (empty or truncated file)"
    first = text.split(". ", 1)[0].rstrip(".")
    return f"{type(e).__name__}: {first[:200]}"


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)`` (no code execution)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as e:  # truncated / corrupt / not a checkpoint
        raise CheckpointError(f"cannot load checkpoint {path}: {_load_failure(e)}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a glowfast checkpoint (got {type(state).__name__})")
    return state


def _usable(path: Path, map_location: Any, check: Callable[[dict], None] | None) -> dict:
    """load_checkpoint, then the checks that make a loaded file usable: finite weights (save_checkpoint never
    writes non-finite ones, so NaN/Inf here is damage) and the caller's ``check`` (CheckpointError when unfit)."""
    state = load_checkpoint(path, map_location)
    for key in ("model", "optimizer", "ema"):
        try:
            assert_finite_state(state.get(key), key)
        except NonFiniteStateError as e:
            raise CheckpointError(f"{path} is damaged: {e}") from None
    if check is not None:
        try:
            check(state)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
    return state


def find_checkpoint(run_or_dir: str | os.PathLike, map_location: Any = "cpu",
                    check: Callable[[dict], None] | None = None) -> tuple[Path, dict]:
    """The newest usable checkpoint of a run folder (or a checkpoints/ folder, or a file).

    Tries ``last.pt`` then ``prev.pt``; returns ``(path, state)``. A file is unusable when it does not load, holds
    non-finite weights, optimizer or moving-average state, or fails ``check(state)`` (which raises
    CheckpointError, e.g. a checkpoint of another model). Raises CheckpointError if none is usable.
    """
    p = Path(run_or_dir)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_file():
        return p, _usable(p, map_location, check)
    directory = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    errors = []
    for name in (LAST, PREV):
        candidate = directory / name
        if not candidate.exists():
            continue
        try:
            return candidate, _usable(candidate, map_location, check)
        except CheckpointError as e:
            errors.append(str(e))
            if name == LAST and (directory / PREV).exists():  # else the error below says it all
                warnings.warn(f"{e}; trying the previous checkpoint", stacklevel=2)
    detail = ("; ".join(errors)) if errors else f"no {LAST} or {PREV} in {directory}"
    raise CheckpointError(f"no usable checkpoint in {p}: {detail}")


# ------------------------------------------------------------------------------------------------ RNG state
def get_rng_state() -> dict:
    """All global RNG states as weights_only-loadable values (tensors, lists of ints, plain scalars)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` returned (CUDA states only when CUDA is available)."""
    torch.set_rng_state(state["torch"].cpu())
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
        else:
            for i, s in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s.cpu(), i)
