"""benchmarks/profile_step.py, where CI can check it: the kernel names it sorts (as torch.profiler reports them on
an H200: glowfast's Triton launches, its LU op, cuDNN / cuBLAS, torch's optimiser and reductions) and a CPU run of
the tiny configuration end to end. A GPU session has no time for a profile that fails on its first record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ on the path only for this import (it holds a conftest.py of its own, and model_configs)
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import profile_step
finally:
    sys.path.remove(str(ROOT / "benchmarks"))

NAMES = {
    "_cross_step_bwd_kernel": "flow kernels (Triton)",
    "_actnorm_invconv_fwd_kernel": "flow kernels (Triton)",
    "_coupling_inv_kernel": "flow kernels (Triton)",
    "_step_inverse_kernel": "flow kernels (Triton)",
    "_lu_weights_fwd_kernel": "flow kernels (Triton)",
    "_lu_weights_bwd_kernel": "flow kernels (Triton)",
    "_conv3x3_wgrad_kernel": "coupling networks (Triton)",
    "_conv3x3_kernel": "coupling networks (Triton)",
    "_relu_backward_kernel": "coupling networks (Triton)",
    "void glowfast::cuda::(anonymous namespace)::lu_factor_kernel<float>(float const*, float*, int*, float*, "
    "float*, int*, glowfast::cuda::PackedLayoutDev, int)": "batched LU op",
    "void glowfast::cuda::(anonymous namespace)::lu_factor_rows_kernel<float, 64>(float const*, float*, int*, "
    "float*, float*, int*, glowfast::cuda::PackedLayoutDev)": "batched LU op",
    "void glowfast::cuda::(anonymous namespace)::lu_inverse_cols_kernel<float, 64>(float const*, int const*, "
    "float const*, bool, float*, glowfast::cuda::PackedLayoutDev)": "batched LU op",
    "sm90_xmma_fprop_implicit_gemm_f32f32_tf32f32_f32_nchwkcrs_nchw_tilesize128x128x32_warpgroupsize1x1x1_"
    "execute_segment_k_off_kernel__5x_cudnn": "convolutions and GEMMs (cuDNN, cuBLAS)",
    "void cudnn::engines_precompiled::nchwToNhwcKernel<float, float, float, false, true, (cudnnKernelDataType_t)2>":
        "convolutions and GEMMs (cuDNN, cuBLAS)",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
    "TensorListMetadata<4>>": "optimiser",
    "Optimizer.step#Adamax.step": "optimiser",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float>>>":
        "reductions",
    "void at::native::vectorized_elementwise_kernel<4, at::native::sigmoid_kernel_cuda>": "elementwise and other",
    # inductor's names (torch 2.11's scheme; --compile-networks): pointwise, reduction and persistent reduction
    "triton_poi_fused__to_copy_add_convolution_relu_0": "compiled networks' fused ops (inductor)",
    "triton_red_fused_convolution_backward_sum_threshold_backward_3": "compiled networks' fused ops (inductor)",
    "triton_per_fused__to_copy_mul_sum_1": "compiled networks' fused ops (inductor)",
}


@pytest.mark.parametrize("name", list(NAMES))
def test_kernel_names_sort_into_their_parts(name):
    assert profile_step.category(name) == NAMES[name]


def test_gpu_user_annotations_are_not_counted_as_kernels():
    """Profiler records as torch.profiler gives them on a GPU (name, device type, user-annotation flag, time
    range): the GPU-side range of "Optimizer.step#Adamax.step" covers its kernels and the gaps between them, so
    only the kernels count (the H100's first profile counted the range too: 12.9 of 70.8 ms)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(name, us, device=DeviceType.CUDA, annotation=False):
        span = SimpleNamespace(elapsed_us=lambda: us)
        return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation, time_range=span)

    adam = "void at::native::multi_tensor_apply_kernel<TensorListMetadata<4>>"
    events = [event("Optimizer.step#Adamax.step", 12936.0, annotation=True), event(adam, 300.0), event(adam, 200.0),
              event("aten::_foreach_add_", 40.0, device=DeviceType.CPU)]
    assert profile_step.device_kernel_times_us(events) == {adam: (500.0, 2)}


def test_cpu_run_writes_parts_that_sum_to_the_step_and_appends_records(tmp_path):
    """Two runs into one folder: two records; each one's parts add up to its busy time, the top operators are
    sorted, and the markdown has a section per record."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--config", "mnist_K4_h128", "--batch", "2",
           "--device", "cpu", "--backend", "reference", "--steps", "1", "--warmup", "0", "--out", str(tmp_path)]
    for _ in range(2):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
    records = json.loads((tmp_path / "profile.json").read_text())
    assert len(records) == 2
    for r in records:
        assert r["busy_ms_per_step"] > 0 and r["wall_ms_per_step"] > 0
        assert sum(r["categories"].values()) == pytest.approx(r["busy_ms_per_step"], rel=1e-3)
        # the reference model's step on the CPU is mostly its coupling networks' convolutions
        assert max(r["categories"], key=r["categories"].get) == "convolutions and GEMMs (cuDNN, cuBLAS)"
        times = [t["ms_per_step"] for t in r["top"]]
        assert times == sorted(times, reverse=True) and len(times) == 15
    md = (tmp_path / "profile.md").read_text()
    assert md.count("## mnist_K4_h128, batch 2, reference (fp32 networks) on cpu") == 2


def test_fused_optimizer_run_is_recorded_and_named(tmp_path):
    """--fused-optimizer profiles the step with FusedAdamax (here its kernel under the interpreter): the record says
    so, the heading names it, and the optimiser's part is there; --exact-backward-dots is recorded and named too."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--config", "mnist_K4_h128", "--batch", "2",
           "--device", "cpu", "--backend", "reference", "--steps", "1", "--warmup", "0", "--fused-optimizer",
           "--exact-backward-dots", "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    (r,) = json.loads((tmp_path / "profile.json").read_text())
    assert r["fused_optimizer"] is True and r["thin_gemms"] is False and r["relu_epilogue"] is False
    assert r["exact_backward_dots"] is True and r["categories"]["optimiser"] > 0
    heading = "## mnist_K4_h128, batch 2, reference (FusedAdamax, exact-fp32 backward dots) on cpu"
    assert heading in (tmp_path / "profile.md").read_text()


def test_no_cuda_device_is_a_one_line_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the error on a machine without CUDA; this one has a CUDA device")
    with pytest.raises(SystemExit) as exit_info:
        profile_step.main(["--device", "cuda", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err
