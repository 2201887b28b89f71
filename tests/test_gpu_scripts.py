"""The GPU session's shell scripts, checked where CI can: a GPU session has 15 minutes of device time in all, so a
script that breaks on its first line there costs the session. Parsed by bash, and gpu_check.sh's stage machinery
(presets, stage selection, side-by-side stages, the summary) run on this CPU, where the CUDA stages fail fast."""

from __future__ import annotations

import os
import re
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


def _stage_log(tmp_path, stage: str) -> str:
    """A stage's log from the logs.tar.gz gpu_check.sh wrote under tmp_path/out."""
    import tarfile

    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as tar:
        return tar.extractfile(f"logs/{stage}.log").read().decode()


def test_gpu_check_unknown_preset_is_refused(tmp_path):
    res = _gpu_check(tmp_path, "sesion")
    assert res.returncode == 2
    usage = "usage: bash benchmarks/gpu_check.sh [session|extra|check|bench|compile|nets|speed|kernels|all]"
    assert usage in res.stdout


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
    res = _gpu_check(tmp_path, "session", GPU_CHECK_STAGES="env sanitizer train tf32 profile report",
                     GLOWFAST_GIT_COMMIT="0123abcd")
    assert res.returncode == 0, res.stdout + res.stderr
    summary = (out / "summary.md").read_text()
    assert "commit: 0123abcd\n" in summary or "commit: 0123abcd " in summary  # the given commit, nothing added
    assert "0123abcd (dirty tree)" not in summary
    table = [line.split("|") for line in summary.splitlines()
             if line.startswith("| ") and not line.startswith(("| stage", "| ---"))]
    rows = {cells[1].strip(): cells[2].strip() for cells in table}
    assert len(rows) == len(table) == 13  # one row per stage
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
    # the profile stage ran (after the side-by-side ones) and failed with profile_step.py's one-line reason
    assert rows["profile"].startswith("FAIL") and "no CUDA device" in summary
    for name in ("build", "tests", "startup", "bench_model", "bench_ops", "tune", "bench_compile"):
        assert rows[name] == "not selected", name
    assert rows["report"] == "skipped (no benchmark JSON)"
    # an earlier run's RESULTS.md in the same $OUT is removed, never quoted as this run's headline
    assert not (out / "RESULTS.md").exists()
    assert "stale" not in summary
    assert (out / "logs.tar.gz").stat().st_size > 0


def test_gpu_check_reruns_only_the_named_tests(tmp_path):
    node = "tests/test_gpu_scripts.py::test_gpu_check_unknown_preset_is_refused"
    res = _gpu_check(tmp_path, "session", GPU_CHECK_STAGES="tests", GPU_TESTS=node, GPU_TEST_WORKERS="2")
    assert res.returncode == 0, res.stdout + res.stderr
    junit = (tmp_path / "out" / "junit.xml").read_text()
    assert junit.count("<testcase ") == 1
    assert 'name="test_gpu_check_unknown_preset_is_refused"' in junit
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| tests | ok |" in summary
    # the workers asked for, through pytest-xdist (a dev dependency): the 22nd session's GPU run went serial because
    # the stage's fresh shell lacked the sourced pytest_workers function ("command not found")
    assert "- test workers: pytest workers: -n 2 --dist loadgroup" in summary, summary


# ------------------------------------------------------------------ gaps found by mutation testing (12th session)
def _fake_python(tmp_path, body: str) -> Path:
    py = tmp_path / "fakepython"
    py.write_text("#!/usr/bin/env bash\n" + body)
    py.chmod(0o755)
    return py


def _gpu_check_rows(tmp_path, budget: int, stages: str, hang: str = ""):
    """gpu_check.sh session with a stand-in python: `python -` (env_info's script on stdin) hangs when `hang` is
    "sleep" (stopped by the time limit's SIGINT) or "ignore-int" (ignores it: killed 20 s later); every other call
    (import probes, the training run) fails at once. Returns the summary's rows {stage: status} and its text."""
    hang_cmd = {"": "", "sleep": "sleep 60", "ignore-int": "trap '' INT; sleep 60"}[hang]
    py = _fake_python(tmp_path, f'if [ "${{1:-}}" = "-" ]; then {hang_cmd}; fi\nexit 1\n')
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": str(py), "GPU_CHECK_BUDGET": str(budget),
           "GPU_CHECK_STAGES": stages}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "session"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = (out / "summary.md").read_text()
    rows = {cells[1].strip(): cells[2].strip() for cells in
            (line.split("|") for line in summary.splitlines() if line.startswith("| ") and
             not line.startswith(("| stage", "| ---")))}
    return rows, summary


def test_gpu_check_times_out_a_stage_within_the_budget_less_its_reserve(tmp_path):
    """A 22 s budget keeps a 15 s reserve: the env stage (cap 30 s) gets ~7 s and is cut there, reported as a
    time-out, not as a failure."""
    rows, _ = _gpu_check_rows(tmp_path, 22, "env", hang="sleep")
    m = re.fullmatch(r"TIMEOUT after (\d+)s", rows["env"])
    assert m and 5 <= int(m.group(1)) <= 7, rows["env"]


def test_gpu_check_stage_ignoring_the_time_limits_sigint_is_killed_and_reported_as_a_timeout(tmp_path):
    rows, _ = _gpu_check_rows(tmp_path, 22, "env", hang="ignore-int")
    assert re.fullmatch(r"TIMEOUT after \d+s", rows["env"]), rows["env"]


def test_gpu_check_skips_a_stage_the_budget_left_cannot_hold(tmp_path):
    """50 s budget, 15 s reserve: ~35 s are left after a quick env stage, less than the training run's 40 s minimum:
    it is skipped (not started with what is left). A single functional stage runs on its own (no "side by side")."""
    rows, summary = _gpu_check_rows(tmp_path, 50, "env train")
    m = re.fullmatch(r"skipped \(budget: (\d+)s left, needs ≥ 40s\)", rows["train"])
    assert m and 25 <= int(m.group(1)) < 40, rows["train"]
    assert "side by side" not in summary


def _gpu_full(tmp_path, what, rc=0, budget=570, **env_extra):
    log = tmp_path / "calls.log"
    py = _fake_python(tmp_path, f'echo "$@" >> "{log}"\nexit {rc}\n')
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": str(py), "GPU_FULL_BUDGET": str(budget),
           **env_extra}
    res = subprocess.run(["bash", str(ROOT / "results" / "gpu_full.sh"), what], capture_output=True, text=True,
                         env=env, timeout=120)
    calls = log.read_text().splitlines() if log.exists() else []
    return res, calls


def test_gpu_full_runs_each_group_into_its_folder(tmp_path):
    """One process per group: a single experiment writes into results/full/<name>, a group of several into
    results/full (one folder each, made by glowfast.experiments)."""
    res, calls = _gpu_full(tmp_path, "ablations")
    assert res.returncode == 0, res.stdout + res.stderr
    assert [re.search(r"--out (\S+)", c).group(1) for c in calls] == [
        "results/full/ablation-permutation", "results/full/ablation-coupling"]
    (tmp_path / "m").mkdir()
    res, calls = _gpu_full(tmp_path / "m", "main")
    assert res.returncode == 0
    assert [c.split(" --config")[0] for c in calls] == ["-m glowfast.experiments samples interpolation attributes",
                                                        "-m glowfast.experiments ood typicality"]
    assert all("--out results/full " in c for c in calls)


def test_gpu_full_shared_trains_the_shared_model_alone_with_extra_options_into_its_folder(tmp_path):
    res, calls = _gpu_full(tmp_path, "shared", GPU_FULL_ARGS="--amp bf16 --channels-last",
                           GPU_FULL_OUT="results/full-bf16")
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(calls) == 1 and calls[0].startswith("-m glowfast.experiments samples --config full")
    assert "--out results/full-bf16/samples " in calls[0] and calls[0].endswith(" --amp bf16 --channels-last")


def test_gpu_full_reports_a_cut_group_and_a_spent_budget(tmp_path):
    res, calls = _gpu_full(tmp_path, "ablations", rc=124)
    assert res.returncode == 3 and len(calls) == 2
    assert "== ablation-permutation: exit 124 (time limit)" in res.stdout
    (tmp_path / "b").mkdir()
    res, calls = _gpu_full(tmp_path / "b", "ablations", budget=25)  # 25 - 10 s reserve < the 20 s a group needs
    assert res.returncode == 3 and calls == []
    assert "skipped" in res.stdout


def test_gpu_full_unknown_half_is_refused(tmp_path):
    res, calls = _gpu_full(tmp_path, "everything")
    assert res.returncode == 2 and calls == [] and "unknown: everything" in res.stdout


def test_cpp_exception_probe_passes_here_and_reports_a_crash():
    """The probe gpu_check.sh runs after its build: the extension's TORCH_CHECK arrives as a RuntimeError on this
    machine (exit 0), and a child killed by a signal is reported as a failure with the diagnosis (exit 1), not
    taken down with it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import cpp_exception_probe as probe
    finally:
        sys.path.pop(0)
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpp_exception_probe.py")], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "C++ exception probe: ok (raised RuntimeError: glowfast::lu_factor_packed: matrix 0" in res.stdout
    crash = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import cpp_exception_probe as p; " \
           f"p.RAISE = {crash!r}; raise SystemExit(p.main())"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "C++ exception probe: FAILED (killed by signal 11)" in res.stdout
    assert "cxx11 abi" in res.stdout and ("gdb backtrace:" in res.stdout or "gdb: not found" in res.stdout)
    assert probe.RAISE.count("lu_factor_packed") == 1  # the probe raises the op's own check, as the test does


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the preset where the CUDA stages fail fast")
def test_gpu_check_speed_preset_profiles_the_all_options_step_at_b256(tmp_path):
    """The `speed` preset's profile settings reach the profile stage (which runs in a shell of its own): the B256
    step with every untimed option, and nothing else."""
    res = _gpu_check(tmp_path, "speed", GPU_CHECK_STAGES="env profile")
    assert res.returncode == 0, res.stdout + res.stderr
    log = _stage_log(tmp_path, "profile")
    runs = [line for line in log.splitlines() if line.startswith("profile_step.py --batch")]
    assert runs == ["profile_step.py --batch 256 --bf16 --channels-last --compile-networks --thin-gemms "
                    "--relu-epilogue --fused-optimizer --exact-backward-dots"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the preset where the CUDA stages fail fast")
def test_gpu_check_kernels_preset_sweeps_the_backward_kernels_with_exact_dots(tmp_path):
    """The `kernels` preset's sweep settings reach the tune stage's own shell: the two backward kernels with a dot,
    at C = 12 and 24, with exact-fp32 candidates; the stage then fails with tune's one-line reason (no CUDA)."""
    res = _gpu_check(tmp_path, "kernels", GPU_CHECK_STAGES="env tune")
    assert res.returncode == 0, res.stdout + res.stderr
    log = _stage_log(tmp_path, "tune")
    assert log.splitlines()[0] == ("glowfast.kernels.tune --budget 60 --kernels cross_step/bwd,actnorm_invconv/bwd "
                                   "--shapes 64x12x128x128,256x12x16x16,256x24x8x8 --programs-per-sm 16 "
                                   "--precisions ieee")
    assert "no CUDA device" in (tmp_path / "out" / "summary.md").read_text()
