"""benchmarks/report.py: pytest-benchmark JSON -> Markdown tables with the fused speed-up ratios.

The input JSON is produced for real: pytest-benchmark runs a few toy benchmarks in a subprocess (about a
second), so the test follows the plugin's actual schema. A copy with the medians overwritten by chosen
numbers then checks the ratios exactly.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "report.py"

TOY_BENCH = textwrap.dedent('''
    import pytest

    WORK = {"reference": 40, "compiled": 20, "fused": 10, "peer": 80}

    @pytest.mark.parametrize("variant", list(WORK))
    def test_toy_op(benchmark, variant):
        benchmark.group = "toy_op/fwd/B2_C4_8x8"
        benchmark.extra_info.update(variant=variant, images_per_s=100.0 * WORK[variant], peak_mem_mib=12.5)
        benchmark.pedantic(lambda: sum(range(WORK[variant] * 100)), rounds=3, iterations=2)

    @pytest.mark.parametrize("impl", ["torch_loop", "glowfast"])
    def test_lu(benchmark, impl):
        # no extra_info["variant"]: the report must fall back to params and map the aliases
        benchmark.group = "batched_slogdet/fwd/n96"
        benchmark.pedantic(lambda: sum(range(100)), rounds=2)

    IMG_S = {"reference": 300.0, "fused": 3000.0, "graphed": 2000.0}

    @pytest.mark.parametrize("variant", list(IMG_S))
    def test_train(benchmark, variant):
        benchmark.group = "train_step/cifar10_K32_B64"
        benchmark.extra_info.update(variant=variant, images_per_s=IMG_S[variant], first_call_s=5.0,
                                    peak_mem_mib=1000.0)
        if variant == "graphed":
            benchmark.extra_info["capture_s"] = 16.0
        benchmark.pedantic(lambda: None, rounds=2)
''')


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bench")
    (tmp / "test_toy_bench.py").write_text(TOY_BENCH)
    out = tmp / "bench.json"
    # a plain serial run even when this suite runs under pytest-xdist (benchmarks are disabled under xdist)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "--rootdir", str(tmp),
         "--benchmark-only", f"--benchmark-json={out}", "test_toy_bench.py"],
        cwd=tmp, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def run_report(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPORT), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc


def table_row(md: str, first_cell: str) -> list[str]:
    """The cells of the first Markdown table row starting with `first_cell`."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r} in:\n{md}")


def with_medians(src: Path, dst: Path, medians: dict[str, float]) -> Path:
    """Copy of a real pytest-benchmark JSON whose per-variant medians (toy_op group) are set exactly."""
    data = json.loads(src.read_text())
    for b in data["benchmarks"]:
        if b["group"] == "toy_op/fwd/B2_C4_8x8":
            b["stats"]["median"] = medians[b["extra_info"]["variant"]]
    dst.write_text(json.dumps(data))
    return dst


def test_real_json_has_the_fields_the_report_reads(bench_json):
    data = json.loads(bench_json.read_text())
    assert {"machine_info", "commit_info", "benchmarks", "datetime", "version"} <= data.keys()
    b = data["benchmarks"][0]
    assert {"group", "name", "param", "params", "extra_info", "stats"} <= b.keys()
    assert {"median", "min", "iqr", "rounds", "iterations"} <= b["stats"].keys()


def test_ratios_are_exact_speedups(bench_json, tmp_path):
    src = with_medians(bench_json, tmp_path / "b.json",
                       {"reference": 4e-3, "compiled": 2e-3, "fused": 1e-3, "peer": 8e-3})
    out = tmp_path / "RESULTS.md"
    run_report(src, "--out", out)
    md = out.read_text()
    row = table_row(md, "toy_op/fwd/B2_C4_8x8")
    # group | reference | compiled | fused | peer | fused vs reference | fused vs compiled | fused vs peer
    assert row[1:5] == ["4 ms", "2 ms", "1 ms", "8 ms"]
    assert row[5:8] == ["4.00×", "2.00×", "8.00×"]


def test_ratios_follow_the_measured_medians(bench_json):
    data = json.loads(bench_json.read_text())
    med = {b["extra_info"]["variant"]: b["stats"]["median"] for b in data["benchmarks"]
           if b["group"] == "toy_op/fwd/B2_C4_8x8"}
    md = run_report(bench_json).stdout
    row = table_row(md, "toy_op/fwd/B2_C4_8x8")
    assert row[5] == f"{med['reference'] / med['fused']:.2f}×"
    assert row[7] == f"{med['peer'] / med['fused']:.2f}×"


def test_aliases_header_details_and_targets(bench_json):
    md = run_report(bench_json).stdout
    # params-only variants ("torch_loop", "glowfast") are mapped to reference / fused
    row = table_row(md, "batched_slogdet/fwd/n96")
    assert row[1] != "—" and row[3] != "—" and row[5].endswith("×")
    # header: device, versions, commit and date from the JSON
    data = json.loads(bench_json.read_text())
    assert "| device | CPU only:" in md or "| device | GPU:" in md
    assert f"| python | {data['machine_info']['python_version']} |" in md
    assert f"| date | {data['datetime']} |" in md
    assert "| commit |" in md
    # the detail table carries images/s and peak memory from extra_info
    assert re.search(r"\| toy_op/fwd/B2_C4_8x8 \| fused \| [^|]+ \| [^|]+ \| 3 × 2 \| 1,000 \| 12 \|", md), md
    # issue 6's targets, the issue's absolute numbers: 3000 img/s >= 2,400 (met); the CUDA-graph variant is checked
    # on its own: 2000 < 2,400 (missed)
    assert re.search(r"fused ≥ 2,400 img/s.*\| yes \| 3,000 img/s", md), md
    assert re.search(r"graphed ≥ 2,400 img/s.*\| NO \| 2,000 img/s", md), md
    assert "capture 16 s" in md
    # without a startup.py record, start-up falls back to the first fused step in the benchmark process, and says
    # that this underestimates a cold start
    assert re.search(r"start-up < 20 s, approximated by the first fused step.*underestimates.*\| yes \| 5.0 s", md)


def test_threshold_is_the_issues_absolute_number(bench_json, tmp_path):
    """2,420 img/s meets "≥ 2,400" (10 x 244 = 2,440 would have called it a miss)."""
    data = json.loads(bench_json.read_text())
    for b in data["benchmarks"]:
        if b["group"] == "train_step/cifar10_K32_B64" and b["extra_info"]["variant"] == "fused":
            b["extra_info"]["images_per_s"] = 2420.0
    src = tmp_path / "b.json"
    src.write_text(json.dumps(data))
    assert re.search(r"fused ≥ 2,400 img/s.*\| yes \| 2,420 img/s", run_report(src).stdout)


def test_cold_start_up_records(bench_json, tmp_path):
    records = [
        {"config": "cifar10_K32", "batch": 64, "backend": "fused", "compute_path": "fused", "import_s": 4.0,
         "build_s": 1.0, "first_step_s": 17.5, "second_step_s": 0.03, "to_first_step_s": 22.5},
        {"config": "cifar10_K32", "batch": 64, "backend": "reference", "compute_path": "reference",
         "import_s": 4.0, "build_s": 1.0, "first_step_s": 3.0, "second_step_s": 0.3, "to_first_step_s": 8.0},
    ]
    st = tmp_path / "startup.json"
    st.write_text(json.dumps(records))
    md = run_report(bench_json, "--startup", st).stdout
    # the cold record decides the target (22.5 s: missed), not the warm in-process first call (5 s)
    assert re.search(r"start-up \(fresh process, empty Triton cache\).*\| NO \| 22.5 s \(first step 17.5 s\)", md)
    assert "approximated by the first fused step" not in md
    assert table_row(md, "cifar10_K32")[1:8] == ["64", "fused", "4 s", "1 s", "17.5 s", "22.5 s", "30 ms"]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    proc = subprocess.run([sys.executable, str(REPORT), str(bench_json), "--startup", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "startup.py" in proc.stderr


def test_refuses_to_mix_machines(bench_json, tmp_path):
    data = json.loads(bench_json.read_text())
    data["machine_info"]["cuda_device"] = "NVIDIA H200"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, str(REPORT), str(bench_json), str(other)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "another machine" in proc.stderr
    assert "## " in run_report(bench_json, other, "--allow-mixed").stdout


def test_append_keeps_the_previous_section(bench_json, tmp_path):
    out = tmp_path / "RESULTS.md"
    run_report(bench_json, "--out", out, "--title", "First run")
    run_report(bench_json, "--out", out, "--append", "--title", "Second run", "--note", "GPU numbers owed")
    md = out.read_text()
    assert md.count("# glowfast benchmark results") == 1
    assert md.index("## First run") < md.index("## Second run") < md.index("GPU numbers owed")


def test_rejects_non_benchmark_json(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    proc = subprocess.run([sys.executable, str(REPORT), str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "not a pytest-benchmark JSON" in proc.stderr


def test_startup_script_records_a_real_run(bench_json, tmp_path):
    """benchmarks/startup.py in a fresh process (CPU, the smoke-size config): one record per run, appended."""
    out = tmp_path / "startup.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for _ in range(2):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "startup.py"), "--config", "mnist_K4_h128",
                               "--batch", "4", "--backend", "reference", "--device", "cpu", "--out", str(out)],
                              capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
    records = json.loads(out.read_text())
    assert len(records) == 2
    for r in records:
        assert r["compute_path"] == "reference" and r["loss"] > 0
        parts = r["import_s"] + r["build_s"] + r["first_step_s"]
        assert 0 < r["first_step_s"] and abs(parts - r["to_first_step_s"]) < 0.01
    assert table_row(run_report(bench_json, "--startup", out).stdout, "mnist_K4_h128")[2] == "reference"


def test_issue4_kernel_targets(bench_json, tmp_path):
    """Bandwidth rows are checked against 70% of the copy bandwidth, the K-step chain against 3x the reference."""
    data = json.loads(bench_json.read_text())
    toy = [b for b in data["benchmarks"] if b["group"] == "toy_op/fwd/B2_C4_8x8"]
    extra = []
    for frac, variant in ((0.82, "fused-tf32"), (0.55, "fused-ieee")):
        b = json.loads(json.dumps(toy[0]))
        b["group"] = "bandwidth/coupling/fwd/B64_C12_128x128"
        b["extra_info"] = {"variant": variant, "fraction_of_copy_bw": frac, "effective_GBps": frac * 3000}
        extra.append(b)
    for variant, median in (("reference", 3.3e-3), ("fused", 1e-3)):
        b = json.loads(json.dumps(toy[0]))
        b["group"] = "step_nonnet/fwdbwd/B64_C12_16x16"
        b["extra_info"] = {"variant": variant}
        b["stats"]["median"] = median
        extra.append(b)
    data["benchmarks"] += extra
    src = tmp_path / "b.json"
    src.write_text(json.dumps(data))
    md = run_report(src).stdout
    assert "### Issue 4 targets" in md
    assert re.search(r"coupling/fwd/B64_C12_128x128 \(fused-tf32\) ≥ 70% of copy bandwidth \| yes \| 82%", md), md
    assert re.search(r"\(fused-ieee\) ≥ 70% of copy bandwidth \| NO \| 55%", md), md
    assert re.search(r"step_nonnet/fwdbwd/B64_C12_16x16: fused ≥ 3× the reference \| yes \| 3.30×", md), md


def test_issue3_lu_targets_from_gpu_rows_only(bench_json, tmp_path):
    """The 96-matrix set against 30 / 80 µs and the 4096-matrix batch against torch's batched slogdet, on GPU rows
    (peak_mem_mib); the same groups measured on a CPU are not checked against H100 targets."""
    data = json.loads(bench_json.read_text())
    toy = [b for b in data["benchmarks"] if b["group"] == "toy_op/fwd/B2_C4_8x8"][0]

    def row(group, variant, median, gpu=True):
        b = json.loads(json.dumps(toy))
        b["group"], b["stats"]["median"] = group, median
        b["extra_info"] = {"variant": variant, **({"peak_mem_mib": 1.0} if gpu else {})}
        return b

    gpu_rows = [row("batched_lu/slogdet-fwd/cifar96", "fused", 25e-6),
                row("batched_lu/slogdet-fwdbwd/cifar96", "fused", 95e-6),
                row("batched_lu/slogdet-fwd/batch4096x48", "fused", 0.9e-3),
                row("batched_lu/slogdet-fwd/batch4096x48", "peer", 1.15e-3)]
    src = tmp_path / "gpu.json"
    src.write_text(json.dumps({**data, "benchmarks": data["benchmarks"] + gpu_rows}))
    md = run_report(src).stdout
    assert "### Issue 3 targets" in md
    assert table_row(md, "batched_lu/slogdet-fwd/cifar96 (fused): 96 matrices ≤ 30 µs")[1] == "yes"
    assert table_row(md, "batched_lu/slogdet-fwdbwd/cifar96 (fused): 96 matrices ≤ 80 µs")[1] == "NO"
    assert table_row(md, "batched_lu/slogdet-fwd/batch4096x48: fused faster than torch.linalg.slogdet "
                         "(one call)")[1] == "yes"
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({**data, "benchmarks": data["benchmarks"] + [
        row("batched_lu/slogdet-fwd/cifar96", "fused", 25e-6, gpu=False)]}))
    assert "Issue 3 targets" not in run_report(cpu).stdout


def test_start_up_records_alone(tmp_path):
    """A session whose benchmarks did not run still reports its start-up records (and the target on them)."""
    st = tmp_path / "startup.json"
    st.write_text(json.dumps([{"config": "cifar10_K32", "batch": 64, "backend": "fused", "compute_path": "fused",
                               "device": "NVIDIA H100", "torch": "2.11.0", "glowfast": "0.1.0", "import_s": 3.0,
                               "build_s": 1.0, "first_step_s": 9.0, "second_step_s": 0.03,
                               "to_first_step_s": 13.0}]))
    md = run_report("--startup", st).stdout
    assert md.startswith("## Start-up on NVIDIA H100")
    assert re.search(r"CIFAR-10 B64 fused, to the end of the first step < 20 s \| yes \| 13.0 s", md), md
    proc = subprocess.run([sys.executable, str(REPORT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--startup" in proc.stderr
