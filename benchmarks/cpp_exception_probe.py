"""Does a TORCH_CHECK raised inside glowfast._C reach Python as a RuntimeError on this machine?

On the first GPU machine (H200, Python 3.12, torch 2.11, its own g++; 13th session) the one test in which the C++
CPU op itself raises (tests/test_batched_lu.py::test_op_rejects_inconsistent_layout: a matrix offset past the
packed buffer) killed the pytest process with a segfault, while CI's machine raises the RuntimeError. This probe
raises the same check in a child process, so a crash is reported instead of taken, and on a crash prints what a
diagnosis needs: the signal, the compilers, torch's C++ ABI and build flags, the extension's linked C++ runtime,
and a native backtrace when gdb is installed. Exit 0 when the error arrives as a RuntimeError, 1 otherwise.

    python benchmarks/cpp_exception_probe.py          # benchmarks/gpu_check.sh runs it after its build stage
"""

from __future__ import annotations

import shutil
import subprocess
import sys

RAISE = """
import torch
import glowfast._C  # noqa: F401  (registers torch.ops.glowfast)
packed = torch.zeros(35, dtype=torch.float64)
try:
    torch.ops.glowfast.lu_factor_packed(packed, torch.tensor([30, 39, 40]), torch.tensor([3, 1, 5]), 5)
except RuntimeError as exc:
    print("raised RuntimeError:", str(exc).splitlines()[0])
else:
    raise SystemExit("no error: the op accepted a layout that overruns its buffer")
"""


def _run(cmd: list[str], timeout: int = 60) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"({' '.join(cmd[:2])}: {exc})"


def diagnose() -> None:
    """What a crash's diagnosis needs, printed (never raises)."""
    for tool in ("g++", "c++", "nvcc"):
        path = shutil.which(tool)
        lines = _run([path, "--version"]).splitlines() if path else ["not found"]
        print(f"{tool}: {next((x for x in lines if 'release' in x), lines[0])}")
    print(_run([sys.executable, "-c", "import torch, sys; print('python', sys.version.split()[0], 'torch', "
                "torch.__version__, 'cxx11 abi', torch._C._GLIBCXX_USE_CXX11_ABI); "
                "print(torch.__config__.show())"]))
    so = _run([sys.executable, "-c", "import glowfast._C as c; print(c.__file__)"]).splitlines()[-1]
    if shutil.which("ldd"):
        print("\n".join(line for line in _run(["ldd", so]).splitlines() if "c++" in line or "gcc_s" in line))
    gdb = shutil.which("gdb")
    if gdb:
        print("gdb backtrace:")
        print("\n".join(_run([gdb, "-batch", "-ex", "run", "-ex", "bt", "--args", sys.executable, "-c", RAISE],
                             timeout=120).splitlines()[-60:]))
    else:
        print("gdb: not found (no native backtrace)")


def main() -> int:
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", RAISE], capture_output=True, text=True,
                       timeout=120)
    out = (r.stdout + r.stderr).strip()
    if r.returncode == 0:
        print(f"C++ exception probe: ok ({out.splitlines()[-1]})")
        return 0
    how = f"killed by signal {-r.returncode}" if r.returncode < 0 else f"exit {r.returncode}"
    print(f"C++ exception probe: FAILED ({how}): a TORCH_CHECK in glowfast._C did not arrive as a RuntimeError")
    print(out[-4000:])
    diagnose()
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
