"""benchmarks/compile_overlap.py, the start-up probe that gpu_check.sh's startup stage runs: it must compile for real
(into empty caches it removes, without the interpreter conftest sets) and refuse settings that would measure
nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compile_overlap.py"


def _run(args, tmp: Path, interpret: bool = False):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TMPDIR"] = str(tmp)  # where the script's empty Triton caches go
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_compiles_the_specs_serially_and_on_threads_from_empty_caches(tmp_path):
    out, tmp = tmp_path / "overlap.json", tmp_path / "tmp"
    tmp.mkdir()
    for _ in range(2):  # the second run appends
        res = _run(["--specs", "2", "--threads", "2", "--out", str(out)], tmp)
        assert res.returncode == 0, res.stderr
    records = json.loads(out.read_text())
    assert len(records) == 2 and json.loads(res.stdout) == records[-1]
    rec = records[-1]
    assert (rec["specs"], rec["threads"], rec["triton"]) == (2, 2, triton.__version__)
    # a spec compiles for sm_90 in 0.2-1 s here, a cache hit in milliseconds: both timed runs compiled
    assert rec["serial_s"] > 0.2 and rec["threaded_s"] > 0.1
    assert rec["speedup"] == pytest.approx(rec["serial_s"] / rec["threaded_s"], abs=0.01)
    assert 0 <= rec["counter_speed_while_compiling"] < 3
    assert not list(tmp.iterdir())  # every cache removed


@pytest.mark.parametrize(("args", "interpret", "message"), [
    (["--specs", "2", "--threads", "1"], False, "--specs must be >= 1 and --threads >= 2"),
    (["--specs", "0", "--threads", "2"], False, "--specs must be >= 1 and --threads >= 2"),
    (["--specs", "2", "--threads", "2"], True, "TRITON_INTERPRET=1 is set: the interpreter compiles nothing"),
    (["--specs", "100000", "--threads", "2"], False, "--specs 100000: the flow kernels have "),
])
def test_settings_that_would_measure_nothing_are_refused(tmp_path, args, interpret, message):
    res = _run(args, tmp_path, interpret)
    assert res.returncode == 2 and message in res.stderr, res.stderr
