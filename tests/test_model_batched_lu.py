"""The model's plain-W 1x1 convolutions go through the batched LU op: one call per forward / per decode."""

import copy

import pytest
import torch

import glowfast._extension as ext
from glowfast import Glow

from helpers import randomize_


def _plain_glow(backend):
    torch.manual_seed(0)
    model = Glow((3, 8, 8), K=3, L=2, hidden_channels=8, permutation="invconv", lu=False, backend=backend)
    return randomize_(model, 0.1).double().eval()


def _count_ops(fn, name):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(e.count for e in prof.key_averages() if e.key == name)


def test_one_lu_call_per_forward_and_per_sampling():
    model = _plain_glow("auto")
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    _, n_factor = _count_ops(lambda: model(images), "glowfast::lu_factor_packed")
    assert n_factor == 1
    _, n_inverse = _count_ops(lambda: model.sample(2), "glowfast::inverse_packed")
    assert n_inverse == 1
    reference = _plain_glow("reference")
    _, n_factor = _count_ops(lambda: reference(images), "glowfast::lu_factor_packed")
    assert n_factor == 0


def test_batched_lu_path_matches_reference_outputs_and_gradients():
    reference = _plain_glow("reference")
    batched = copy.deepcopy(reference)
    batched.backend = "auto"  # resolves to the reference layers on CPU, with the batched LU op for W
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    outs = []
    for model in (reference, batched):
        out = model(images, generator=torch.Generator().manual_seed(2))
        out.bits_per_dim.sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1].log_prob, outs[0].log_prob, rtol=1e-12, atol=1e-10)
    for (name, p_ref), p_fast in zip(reference.named_parameters(), batched.parameters()):
        torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=1e-9, atol=1e-10, msg=name)
    x = reference.preprocess(images)
    latents, _ = reference.encode(x)
    torch.testing.assert_close(batched.decode(latents), reference.decode(latents), rtol=1e-10, atol=1e-12)


def test_decode_inverts_w_in_float64_like_the_reference():
    """decode's one batched-LU call inverts every plain W in float64, as the reference layers (and glowfast.fused)
    do: with ill-conditioned weights (condition numbers up to ~600 here) an fp32 inverse made the round trip's error
    6x the reference's (0.146 vs 0.023)."""
    from tolerances import assert_roundtrip

    torch.manual_seed(0)
    model = randomize_(Glow((12, 8, 8), K=2, L=3, hidden_channels=8, permutation="invconv", lu=False), 0.1).eval()
    assert max(float(torch.linalg.cond(s.permute.weight.detach())) for s in model.steps()) > 300
    x = model.preprocess(torch.randint(0, 256, (2, 12, 8, 8), dtype=torch.uint8))
    err = {}
    with torch.no_grad():
        for backend in ("reference", "auto"):  # auto on the CPU: the reference layers, W^-1 from the batched op
            model.backend = backend
            latents, _ = model.encode(x)
            decoded, n_inverse = _count_ops(lambda lat=latents: model.decode(lat), "glowfast::inverse_packed")
            assert n_inverse == (backend == "auto")
            err[backend] = float((decoded - x).abs().max())
    assert_roundtrip(err["auto"], err["reference"])


def test_fused_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = Glow((3, 8, 8), K=1, L=1, hidden_channels=8, backend="fused")
    images = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="backend='fused' cannot run on cpu") as info:
        model(images)
    assert str(info.value).count("backend='reference'") == 1  # the advice once (it was given twice)


def test_plain_w_without_the_extension_falls_back_to_torch_linalg(monkeypatch):
    """An install without glowfast._C (likewise CUDA weights with a glowfast._C built without its CUDA kernels)
    still runs plain-W models with backend auto: torch.linalg per step, the same function, no error."""
    import sys

    import glowfast._extension as extension

    reference = _plain_glow("reference")
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    expected = reference(images, generator=torch.Generator().manual_seed(2)).log_prob
    monkeypatch.setattr(extension, "_BATCHED_LU", None)
    monkeypatch.setitem(sys.modules, "glowfast.ops", None)  # what importing it gives without the extension
    without = _plain_glow("auto")
    out, n_factor = _count_ops(lambda: without(images, generator=torch.Generator().manual_seed(2)),
                               "glowfast::lu_factor_packed")
    assert n_factor == 0
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-12, atol=1e-10)
    x = reference.preprocess(images, dequantize=False)
    latents, _ = reference.encode(x)
    torch.testing.assert_close(without.decode(latents), x, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ gaps found by mutation testing (12th session)
def test_a_build_without_cuda_kernels_serves_cpu_only(monkeypatch):
    """glowfast._C built without nvcc: the batched-LU op runs on CPU tensors; CUDA callers get None (and use
    torch.linalg) instead of an op that raises on their tensors."""
    ops = object()
    monkeypatch.setattr(ext, "_BATCHED_LU", (ops, False))
    assert ext.batched_lu_ops("cpu") is ops
    assert ext.batched_lu_ops("cuda") is None
    monkeypatch.setattr(ext, "_BATCHED_LU", (ops, True))
    assert ext.batched_lu_ops("cuda") is ops
    monkeypatch.setattr(ext, "_BATCHED_LU", (None, False))
    assert ext.batched_lu_ops("cpu") is None
