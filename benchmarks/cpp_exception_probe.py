"""Does a TORCH_CHECK raised inside glowfast._C reach Python as a RuntimeError on this machine?

On the first GPU machine (H200, Python 3.12, torch 2.11, its own g++; 13th session) the one test in which the C++
CPU op itself raises (tests/test_batched_lu.py::test_op_rejects_inconsistent_layout: a matrix offset past the
packed buffer) killed the pytest process with a segfault, while CI's machine raises the RuntimeError. This probe
raises the same check in a child process, so a crash is reported instead of taken, and on a crash prints what a
diagnosis needs: the signal, the compilers, torch's C++ ABI and build flags, the extension's linked C++ runtime,
and a native backtrace when gdb is installed. Exit 0 when the error arrives as a RuntimeError, 1 otherwise.

Found in the 16th session (H200 machine, Ubuntu 24.04, g++ 13.3, torch 2.11 wheel): there ANY `ostream << number`
compiled into an extension segfaults (a 6-line load_inline extension did too, also without an exception; strings
stream fine, std::to_string works), and TORCH_CHECK streams its message arguments. glowfast's checks now format
their messages with std::to_string (csrc/batched_lu.h: glowfast::message; tests/test_csrc_messages.py). The probe
also reports whether this machine's toolchain still has the defect (`toolchain:` line; informational, it builds a
tiny extension with torch.utils.cpp_extension.load_inline, ~20 s).

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


# Streams an integer inside an extension built here: the toolchain defect itself, independent of glowfast.
STREAM_AN_INT = r"""
import torch.utils.cpp_extension as ext
src = ("#include <sstream>\n#include <string>\n"
       "int64_t streamed_length(int64_t n) { std::ostringstream s; s << n; return s.str().size(); }")
mod = ext.load_inline("glowfast_stream_probe", cpp_sources=[src], functions=["streamed_length"])
print("streamed", mod.streamed_length(12345), "characters")
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


def toolchain_line() -> str:
    """Does `ostream << int` in an extension built on this machine work? (the segfault's cause; informational)"""
    try:
        r = subprocess.run([sys.executable, "-c", STREAM_AN_INT], capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired:
        return "toolchain: the stream probe's build timed out"
    if r.returncode == 0:
        return "toolchain: `ostream << int` in an extension built here works"
    if r.returncode < 0:
        return (f"toolchain: `ostream << int` in an extension built here is killed by signal {-r.returncode} "
                "(the defect glowfast.message avoids)")
    return f"toolchain: the stream probe failed to build or run: {(r.stdout + r.stderr).strip()[-300:]}"


def main() -> int:
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", RAISE], capture_output=True, text=True,
                       timeout=120)
    out = (r.stdout + r.stderr).strip()
    if r.returncode == 0:
        print(f"C++ exception probe: ok ({out.splitlines()[-1]})")
        print(toolchain_line())
        return 0
    how = f"killed by signal {-r.returncode}" if r.returncode < 0 else f"exit {r.returncode}"
    print(f"C++ exception probe: FAILED ({how}): a TORCH_CHECK in glowfast._C did not arrive as a RuntimeError")
    print(out[-4000:])
    print(toolchain_line())
    diagnose()
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
