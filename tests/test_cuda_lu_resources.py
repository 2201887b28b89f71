"""The CUDA batched-LU kernels compiled for sm_90 without a GPU (nvcc -Xptxas -v): every kernel, float and
double, and the register kernels at both widths (NB 32 and 64), compiles with no register spills (a spill would
add local-memory traffic to every elimination step; the register kernels keep a row or column of NB values in
registers). Skipped where nvcc is missing."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "batched_lu_kernels.cu"
KERNELS = ("lu_factor_kernel", "lu_inverse_kernel", "inverse_backward_kernel", "lu_factor_rows_kernel",
           "lu_inverse_cols_kernel")
REGISTER_KERNELS = ("lu_factor_rows_kernel", "lu_inverse_cols_kernel")  # templated on NB too


def _nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
def test_lu_kernels_compile_for_sm90_without_spills(tmp_path):
    r = subprocess.run([_nvcc(), "-arch=sm_90", "-O3", "-Xptxas", "-v", "-c", str(SOURCE), "-o",
                        str(tmp_path / "k.o")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # ptxas prints, per entry function: "Compiling entry function '<mangled>'", then its stack/spill line and
    # its "Used N registers" line
    blocks = re.split(r"Compiling entry function '", r.stderr)[1:]
    found = {}
    for block in blocks:
        name = block.split("'", 1)[0]
        # the kernel's name as it appears mangled: its length, then the name (lu_factor_kernel is not a prefix of
        # lu_factor_rows_kernel there)
        kernel = next((k for k in KERNELS if f"{len(k)}{k}I" in name), None)
        dtype = "double" if re.search(r"I[d](E|Li)", name) else "float"
        width = re.search(r"Li(\d+)EE", name)
        spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", block)]
        regs = re.search(r"Used (\d+) registers", block)
        assert kernel and spills and regs, f"unparsed ptxas output for {name}:\n{block[:500]}"
        found[(kernel, dtype, int(width.group(1)) if width else None)] = (int(regs.group(1)), sum(spills))
    expected = {(k, d, None) for k in KERNELS if k not in REGISTER_KERNELS for d in ("float", "double")}
    expected |= {(k, d, nb) for k in REGISTER_KERNELS for d in ("float", "double") for nb in (32, 64)}
    assert set(found) == expected, found
    spilled = {k: v for k, v in found.items() if v[1]}
    assert not spilled, f"(registers, spill bytes) of spilling kernels: {spilled}"
