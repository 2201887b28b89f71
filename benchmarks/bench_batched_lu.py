"""Batched LU log-determinants / inverses (glowfast.ops) against torch.linalg, CPU always and CUDA when present.

Sets
- cifar96: the 96 weights of the CIFAR-10 Glow's invertible 1x1 convolutions (32 each of 12x12, 24x24, 48x48),
  float32, as a list (what the model passes).
- batch4096x48: one (4096, 48, 48) float32 tensor.
Implementations (extra_info["impl"]; variant names as benchmarks/report.py knows them)
- loop (variant "reference"): torch.linalg.slogdet / inv per matrix in a Python loop.
- grouped (variant "peer"): torch.linalg.* once per distinct size on a stacked batch (one call for the batch).
- glowfast (variant "fused"): glowfast.ops.batched_slogdet / batched_inverse, one op call for all.
Modes: slogdet fwd, slogdet fwdbwd (backward of sum(logabsdet) to every matrix), inverse fwd.
Group names: `batched_lu/<op>-<mode>/<set>`. CUDA rounds are synchronised (cuda_timer in conftest.py).
CPU: few rounds (the 4096-matrix loop is ~0.1 s per call here).
"""

from __future__ import annotations

import pytest
import torch

from glowfast.ops import batched_inverse, batched_slogdet

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA"))]
IMPLS = {"loop": "reference", "grouped": "peer", "glowfast": "fused"}
TIMING = {
    ("cpu", "cifar96"): dict(n_rounds=10, warmup=2, iterations=5),
    ("cpu", "batch4096x48"): dict(n_rounds=3, warmup=1, iterations=1),
    ("cuda", "cifar96"): dict(n_rounds=20, warmup=5, iterations=50),
    ("cuda", "batch4096x48"): dict(n_rounds=20, warmup=3, iterations=10),
}


def _matrices(which: str, device: str):
    gen = torch.Generator().manual_seed(0)

    def well_conditioned(*shape):
        n = shape[-1]
        return torch.randn(*shape, generator=gen) / n**0.5 + torch.eye(n)

    if which == "cifar96":
        return [well_conditioned(n, n).to(device) for n in [12] * 32 + [24] * 32 + [48] * 32]
    return well_conditioned(4096, 48, 48).to(device)


def _groups(mats):
    if isinstance(mats, torch.Tensor):
        return [mats]
    by_size: dict[int, list[torch.Tensor]] = {}
    for m in mats:
        by_size.setdefault(m.shape[0], []).append(m)
    return [torch.stack(g) for g in by_size.values()]


def _slogdet(impl: str, mats):
    if impl == "glowfast":
        return batched_slogdet(mats)[1]
    if impl == "loop":
        return torch.stack([torch.linalg.slogdet(m)[1] for m in mats])
    return torch.cat([torch.linalg.slogdet(g)[1] for g in _groups(mats)])


def _inverse(impl: str, mats):
    if impl == "glowfast":
        return batched_inverse(mats)
    if impl == "loop":
        return [torch.linalg.inv(m) for m in mats]
    return [torch.linalg.inv(g) for g in _groups(mats)]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("which", ["cifar96", "batch4096x48"])
@pytest.mark.parametrize("mode", ["slogdet-fwd", "slogdet-fwdbwd", "inverse-fwd"])
@pytest.mark.parametrize("device", DEVICES)
def test_batched_lu(cuda_timer, device, mode, which, impl):
    benchmark = cuda_timer.benchmark
    benchmark.group = f"batched_lu/{mode}/{which}"
    mats = _matrices(which, device)
    if mode == "slogdet-fwd":

        def fn():
            with torch.no_grad():
                return _slogdet(impl, mats)
    elif mode == "inverse-fwd":

        def fn():
            with torch.no_grad():
                return _inverse(impl, mats)
    else:
        if isinstance(mats, torch.Tensor):
            mats.requires_grad_()
        else:
            for m in mats:
                m.requires_grad_()
        leaves = [mats] if isinstance(mats, torch.Tensor) else mats

        def fn():
            # Gradients go straight to `leaves` (no .grad accumulation): the backward itself is timed.
            return torch.autograd.grad(_slogdet(impl, mats).sum(), leaves)

    if mode.startswith("slogdet"):  # all three implementations agree before anything is timed
        with torch.no_grad():
            ref = torch.cat([torch.linalg.slogdet(g.double())[1] for g in _groups(mats)])
            torch.testing.assert_close(_slogdet(impl, mats).double(), ref, rtol=1e-2, atol=1e-2)
    cuda_timer(fn, device=device, variant=IMPLS[impl], impl=impl, set=which, mode=mode, **TIMING[(device, which)])
