"""The Triton launch wrappers reject bad input with a clear error before any kernel could read out of bounds."""

import pytest
import torch

from glowfast.kernels import (
    _utils,
    actnorm_invconv_backward,
    actnorm_invconv_forward,
    coupling_backward,
    coupling_forward,
    cross_step_backward,
    cross_step_forward,
    step_inverse,
)
from glowfast.kernels._utils import MAX_CHANNELS

C = 4

# every tensor a test creates lives where the kernels run here (CPU under the interpreter, else CUDA), so the
# errors checked are the launch wrappers' own, not "CPU tensors need the interpreter"
pytestmark = pytest.mark.usefixtures("kernel_device")


def params(c=C, **kw):
    return torch.zeros(c, **kw), torch.zeros(c, **kw), torch.eye(c, **kw)


def test_parameters_on_another_device():
    x = torch.randn(2, C, 3, 3)
    bias, log_scale, w = params(device="meta")
    with pytest.raises(ValueError, match="all tensors on one device"):
        actnorm_invconv_forward(x, bias, log_scale, w)
    with pytest.raises(ValueError, match="all tensors on one device"):
        cross_step_forward(x, torch.randn(2, C, 3, 3), bias, log_scale, w)


def test_non_floating_tensors():
    with pytest.raises(TypeError, match="floating-point"):
        actnorm_invconv_forward(torch.ones(2, C, 3, 3, dtype=torch.int32), *params())
    with pytest.raises(TypeError, match="floating-point"):
        coupling_forward(torch.randn(2, C, 3, 3), torch.ones(2, C, 3, 3, dtype=torch.long))


def test_wrong_parameter_shapes():
    bias, log_scale, w = params()
    with pytest.raises(ValueError, match=r"W \(4, 4\)"):
        actnorm_invconv_forward(torch.randn(2, C, 3, 3), bias, log_scale, torch.eye(3))
    with pytest.raises(ValueError, match="h must have shape"):
        step_inverse(torch.randn(2, C, 3, 3), torch.randn(2, C, 3, 2), bias, log_scale, w)


def test_gradients_that_do_not_match_the_saved_tensors():
    x = torch.randn(2, C, 3, 3)
    with pytest.raises(ValueError, match="gradient has shape"):
        actnorm_invconv_backward(x, torch.randn(2, C, 3, 2), *params())
    h = torch.randn(2, C, 3, 3)
    with pytest.raises(ValueError, match="gradient has shape"):
        coupling_backward(x, h, torch.randn(1, C, 3, 3), torch.ones(2))
    with pytest.raises(ValueError, match="logdet gradient has shape"):
        coupling_backward(x, h, torch.randn(2, C, 3, 3), torch.ones(3))
    with pytest.raises(ValueError, match="logdet gradient has shape"):
        cross_step_backward(x, h, torch.randn(2, C, 3, 3), torch.ones(2, 1), *params())


def test_too_many_channels():
    c = MAX_CHANNELS + 2
    x = torch.randn(1, c, 2, 2)
    with pytest.raises(ValueError, match=f"at most {MAX_CHANNELS} channels"):
        actnorm_invconv_forward(x, *params(c))
    with pytest.raises(ValueError, match=f"at most {MAX_CHANNELS} channels"):
        coupling_forward(x, torch.randn(1, c, 2, 2))


def test_not_nchw():
    with pytest.raises(ValueError, match="NCHW"):
        coupling_forward(torch.randn(2, C, 9), torch.randn(2, C, 9))


@pytest.mark.parametrize("block_p", [-16, 0, 24, 8, 16.0, True])
def test_explicit_pixel_tile_must_be_a_power_of_two_of_at_least_16(block_p):
    """block_p <= 0 used to launch no program at all and return the uninitialised output buffer."""
    x, h = torch.randn(2, C, 3, 3), torch.randn(2, C, 3, 3)
    bias, log_scale, w = params()
    for call in (lambda: actnorm_invconv_forward(x, bias, log_scale, w, block_p=block_p),
                 lambda: coupling_forward(x, h, block_p=block_p),
                 lambda: step_inverse(x, h, bias, log_scale, w, block_p=block_p)):
        with pytest.raises(ValueError, match="block_p must be a power of two >= 16"):
            call()


def test_batch_beyond_the_cuda_grid_limit_is_named():
    from glowfast.kernels._utils import MAX_BATCH

    x = torch.zeros(MAX_BATCH + 1, 2, 1, 1)
    with pytest.raises(ValueError, match=f"batch of {MAX_BATCH + 1} images"):
        actnorm_invconv_forward(x, *params(2))
    with pytest.raises(ValueError, match="split the batch"):
        coupling_forward(x, torch.zeros(MAX_BATCH + 1, 2, 1, 1))


def test_empty_batch_backward_under_the_gpu_reduction_rule():
    """An empty batch has nothing to reduce: zero parameter gradients, not a division by zero in the GPU's
    programs-per-sample rule (launch_override(programs_per_sm=...) applies that rule under the interpreter too)."""
    from glowfast.kernels._utils import launch_override

    x = torch.randn(0, C, 4, 4)
    h = torch.randn(0, C, 4, 4)  # [shift; raw] of the C/2 b channels
    with launch_override(programs_per_sm=4):
        dx, db, dls, dw = actnorm_invconv_backward(x, torch.randn_like(x), *params())
        dz, dh, db2, dls2, dw2 = cross_step_backward(x, h, torch.randn_like(x), torch.randn(0), *params())
    assert dx.shape == dz.shape == dh.shape == (0, C, 4, 4)
    for g in (db, dls, dw, db2, dls2, dw2):
        assert torch.equal(g, torch.zeros_like(g))


def test_float64_data_is_refused_not_computed_in_fp32():
    """The kernels load and compute in fp32: float64 data came back as float64 with fp32 error (found by an API
    audit). fused.steps_forward / steps_inverse and Glow run the reference layers for float64 instead."""
    x64 = torch.randn(2, C, 3, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="x is float64, but the glowfast Triton kernels compute in fp32"):
        actnorm_invconv_forward(x64, *params())
    with pytest.raises(TypeError, match="z is float64"):
        coupling_forward(x64, x64.float())
    with pytest.raises(TypeError, match="h is float64"):
        cross_step_forward(x64.float(), x64, *params())
    with pytest.raises(TypeError, match="float64"):
        step_inverse(x64, x64.float(), *params())


def test_coupling_logdet_takes_the_promoted_dtype_of_z_and_h():
    """A half-precision h made an fp32 z's logdet half precision too: -inf here, where the sum of log sigmoid over
    64x64 pixels passes fp16's range (found by an API audit). It is promote(z, h), as the reference's arithmetic."""
    z = torch.randn(1, 8, 64, 64)
    h = torch.randn(1, 8, 64, 64)
    h[:, 4:] = -30.0  # log sigmoid(-28) ~ -28 per element: ~ -4.6e5 in all, beyond fp16's 65504
    _, ld32 = coupling_forward(z, h)
    for h_half in (h.half(), h.bfloat16()):
        _, ld = coupling_forward(z, h_half)
        assert ld.dtype == torch.float32 and bool(torch.isfinite(ld).all())
        torch.testing.assert_close(ld, ld32, rtol=1e-2, atol=0)
        assert cross_step_forward(z, h_half, *params(8))[1].dtype == torch.float32
    assert coupling_forward(z.half(), h.half())[1].dtype == torch.float16  # both half: the reference's dtype


def test_interpreter_switched_on_after_import_is_named(tmp_path):
    """TRITON_INTERPRET=1 set after glowfast.kernels was imported: the kernels are GPU ones, and a CPU call died
    inside Triton with "0 active drivers" (Glow(backend="fused") already said why; the kernels' own entry points
    now do too)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import os, torch\n"
            "from glowfast.kernels import actnorm_invconv_forward\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "c = 4\n"
            "try:\n"
            "    actnorm_invconv_forward(torch.randn(2, c, 3, 3), torch.zeros(c), torch.zeros(c), torch.eye(c))\n"
            "except RuntimeError as e:\n"
            "    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("TRITON_INTERPRET=1 was set after glowfast.kernels was imported; set it before "
                                  "importing glowfast to run the kernels on CPU tensors")


@pytest.mark.skipif(not _utils.is_interpret(), reason="the interpreter's compatibility shim: TRITON_INTERPRET=1 only")
def test_the_interpreter_converts_a_program_id_of_shape_1_to_an_int():
    """Triton 3.6's interpreter did int(array of shape (1,)), which numpy 2.4 refuses: every kernel loop over
    range(program_id, n, G) failed (the GPU machine runs its CPU-side tests that way). glowfast.kernels installs
    triton 3.8's squeeze-first conversion; installed once, however often applied."""
    import numpy as np
    from triton.runtime import interpreter

    from glowfast.kernels import _interpreter_compat

    assert _interpreter_compat.apply() and getattr(interpreter._patch_lang_tensor, "glowfast_compat", False)
    hook = interpreter._patch_lang_tensor
    assert _interpreter_compat.apply() and interpreter._patch_lang_tensor is hook

    class Handle:
        data = np.array([7], dtype=np.int32)

    class Tensor:
        handle = Handle()

    scope = interpreter._LangPatchScope()
    interpreter._patch_lang_tensor(Tensor, scope)
    try:
        assert list(range(Tensor(), 10, 2)) == [7, 9]
    finally:
        scope.restore()
