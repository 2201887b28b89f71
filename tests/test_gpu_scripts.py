"""The GPU session's shell scripts, checked where CI can: a GPU session has 15 minutes of device time in all, so a
script that breaks on its first line there costs the session. Parsed by bash, and gpu_check.sh's stage machinery
(presets, stage selection, side-by-side stages, the summary) run on this CPU, where the CUDA stages fail fast."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("benchmarks/*.sh"), *ROOT.glob("results/*.sh"), ROOT / ".ci" / "run"])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_script_parses(script):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def _gpu_check(tmp_path, *args, **env):
    full_env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], capture_output=True,
                          text=True, env=full_env, timeout=120)


def test_gpu_check_unknown_preset_is_refused(tmp_path):
    res = _gpu_check(tmp_path, "sesion")
    assert res.returncode == 2
    assert "usage: bash benchmarks/gpu_check.sh [session|extra|check|bench|compile|all]" in res.stdout


def test_gpu_check_unknown_stage_is_refused_before_anything_runs(tmp_path):
    res = _gpu_check(tmp_path, "session", GPU_CHECK_STAGES="env bench_op report")
    assert res.returncode == 2
    assert "unknown stage 'bench_op'" in res.stdout
    assert not (tmp_path / "out" / "summary.md").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the sanitizer stage runs for minutes")
def test_gpu_check_session_runs_selected_stages_and_summarises(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "RESULTS.md").write_text("### Issue 6 targets\n| stale | row from an earlier run |\n")
    res = _gpu_check(tmp_path, "session", GPU_CHECK_STAGES="env sanitizer train tf32 report",
                     GLOWFAST_GIT_COMMIT="0123abcd")
    assert res.returncode == 0, res.stdout + res.stderr
    summary = (out / "summary.md").read_text()
    assert "commit: 0123abcd" in summary
    table = [line.split("|") for line in summary.splitlines()
             if line.startswith("| ") and not line.startswith(("| stage", "| ---"))]
    rows = {cells[1].strip(): cells[2].strip() for cells in table}
    assert len(rows) == len(table) == 12  # one row per stage
    assert rows["env"] == "ok"
    # both sanitizer scripts ran (side by side) and each failed with its one-line reason: no CUDA device
    assert rows["sanitizer"] == "FAIL (rc=1)"
    assert "gpu_check_kernels.sh needs a CUDA device" in summary
    assert "gpu_check_lu.sh needs a CUDA device" in summary
    # the functional stages selected ran side by side, the training run failed with its one-line CUDA error, and
    # its TF32 check, run after it in the same job, found no checkpoint
    assert "- side by side (functional, no timings): sanitizer train tf32" in summary
    assert rows["train"].startswith("FAIL"), rows["train"]
    assert "CUDA is not available" in summary
    assert rows["tf32"].startswith("FAIL") and "no training run checkpoint" in summary
    assert [name for name in rows if name in ("train", "tf32")] == ["train", "tf32"]
    for name in ("build", "tests", "startup", "bench_model", "bench_ops", "tune", "bench_compile"):
        assert rows[name] == "not selected", name
    assert rows["report"] == "skipped (no benchmark JSON)"
    # an earlier run's RESULTS.md in the same $OUT is removed, never quoted as this run's headline
    assert not (out / "RESULTS.md").exists()
    assert "stale" not in summary
    assert (out / "logs.tar.gz").stat().st_size > 0


def test_gpu_check_reruns_only_the_named_tests(tmp_path):
    node = "tests/test_gpu_scripts.py::test_gpu_check_unknown_preset_is_refused"
    res = _gpu_check(tmp_path, "session", GPU_CHECK_STAGES="tests", GPU_TESTS=node, GPU_TEST_WORKERS="1")
    assert res.returncode == 0, res.stdout + res.stderr
    junit = (tmp_path / "out" / "junit.xml").read_text()
    assert junit.count("<testcase ") == 1
    assert 'name="test_gpu_check_unknown_preset_is_refused"' in junit
    assert "| tests | ok |" in (tmp_path / "out" / "summary.md").read_text()
