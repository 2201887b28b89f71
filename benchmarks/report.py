#!/usr/bin/env python3
"""pytest-benchmark JSON -> Markdown tables with fused/reference, fused/compiled and fused/peer ratios.

    python -m pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.json [more.json ...] [--out benchmarks/RESULTS.md] [--append]
                                [--title TEXT] [--note TEXT] [--stat median|min]

Conventions (shared by bench_model.py, bench_flow_ops.py, bench_fused_step.py, bench_batched_lu.py)
- A benchmark's group (`--benchmark-group-by=group`, set per test) names one measured thing, e.g.
  `train_step/cifar10_K32_B64` or `actnorm_invconv/fwd/B64_C12_16x16`; its first path component is the
  section the table goes in.
- Its variant is `extra_info["variant"]`, else `params["variant"]` / `params["impl"]` / `params["backend"]`,
  else the last `-`-separated part of the parameter id; synonyms are mapped by VARIANT_ALIASES to
  `reference`, `compiled`, `fused` or `peer`.
- Ratios are speed-ups: "fused vs X" = t_X / t_fused (the median time per call, or `--stat min`), so 10×
  means fused is ten times faster. Throughput (images/s) and peak memory come from extra_info
  (`images_per_s`, `peak_mem_mib`), compile time from `compile_s`, start-up from `first_call_s`.
Without --out the Markdown goes to stdout. --append adds the new section to the end of an existing file.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import math
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

MAIN_VARIANTS = ("reference", "compiled", "fused", "peer")
VARIANT_ALIASES = {
    "ref": "reference", "eager": "reference", "torch": "reference", "loop": "reference",
    "torch_loop": "reference", "python_loop": "reference", "reference_loop": "reference",
    "compile": "compiled", "torch_compile": "compiled", "compiled_reference": "compiled",
    "glowfast": "fused", "op": "fused", "batched": "fused", "cpp": "fused",
    "glowfast_op": "fused", "batched_lu": "fused",
    "normflows": "peer", "y0ast": "peer",
}
SECTION_ORDER = ("train_step", "compile", "sample64", "sample")
SECTION_TITLES = {
    "train_step": "Whole model: one training step (forward, backward, Adamax step)",
    "compile": "Compile time of torch.compile(reference) (first call of a fresh compile)",
    "sample64": "Whole model: sampling 64 images",
    "actnorm_invconv": "Per op: actnorm + 1x1 conv",
    "coupling": "Per op: affine coupling (given the network output)",
    "cross_step": "Per op: cross-step (coupling of step k + actnorm/1x1 conv of step k+1)",
    "batched_lu": "Per op: batched LU slogdet / inverse",
    "bandwidth": "Fused kernels: effective memory bandwidth (large shapes)",
    "step_nonnet": "K=4 flow steps without their coupling networks, forward + backward",
    "step_params": "Parameter-side ops of all 96 CIFAR-10 flow steps (W = P L U, parameter log-determinants)",
    "coupling_net": "One coupling network (hidden 512), forward + backward",
}
SECTION_NOTES = {
    "batched_lu": "Here `reference` = torch.linalg per matrix in a Python loop, `peer` = torch.linalg once per "
                  "distinct size (stacked), `fused` = glowfast.ops (one call for all matrices; C++ on CPU).",
    "train_step": "images/s = batch / median step time; peak GPU memory after reset_peak_memory_stats over one "
                  "step (parameters, optimiser state and activations; for `graphed*` over the capture too, whose "
                  "activations stay in the graph's pool); first call = the first step in the benchmark process "
                  "(data-dependent init, JIT/autotuning; the cold start-up is startup.py's table). "
                  "`graphed` = the fused model with forward + backward replayed from a "
                  "CUDA graph (`--cuda-graphs`); its warm-up + capture time is in the notes. `graphed_bf16_nhwc` = "
                  "that plus the coupling networks in bf16 and channels_last (`--amp bf16 --channels-last`); "
                  "`graphed_bf16_nhwc_compiled` = that with each network one torch.compile'd function "
                  "(`--compile-networks`; its compile_s: the first, compiling, step), `_opt` with the Adamax step "
                  "compiled too, `_pad0` without the thin convs' channels padded to multiples of 8 in the graph "
                  "(the default since the 25th session; that run's `_pad8` was the padded one), `_fusedopt` with "
                  "glowfast's FusedAdamax, `_gemm3x3` with the thin 3x3 convs as GEMMs in the graph, `_epilogue` "
                  "with the ReLUs after the networks' GEMMs in the GEMMs' epilogues, `_exactbwd` with the flow's "
                  "backward kernels at up to 32 channels on exact-fp32 dots; "
                  "`graphed_gemm` / `graphed_bf16_gemm` = graphs with the networks' convs as GEMMs "
                  "(`--gemm-networks`); `graphed_triton` / `graphed_bf16_triton` = graphs with glowfast's Triton "
                  "coupling networks (`--triton-networks`; fp32 or bf16 activations); `graphed_bf16_triton_dots` = "
                  "the bf16 one with bf16 tensor-core dots in its 3x3 convs (`use_bf16_dots`).",
    "coupling_net": "`reference` = the NCHW module on cuDNN; `fused` = glowfast's channels_last path with the 1x1 "
                    "conv as one GEMM over pixels (`--channels-last`); `fused_bf16` = that under bf16 autocast "
                    "(`--amp bf16`); `gemm` / `gemm_bf16` = every conv as a GEMM over pixels (`--gemm-networks`); "
                    "`triton` / `triton_bf16` = glowfast's Triton network, thin 3x3 convs as fused implicit-GEMM "
                    "kernels (`--triton-networks`; fp32 or bf16 activations); `triton_bf16_dots` = triton_bf16 "
                    "with bf16 tensor-core dots in its 3x3 convs (`use_bf16_dots`); `compiled` = torch.compile of "
                    "the NCHW module; `fused_bf16_compiled` = fused_bf16 as one torch.compile'd function "
                    "(`--compile-networks`), `_gemm3x3` with its thin 3x3 convs as GEMMs, `_epilogue` with its "
                    "ReLUs in the GEMMs' epilogues.",
    "step_params": "`reference` = each step builds its own W and log-determinant (the reference layers); "
                   "`batched_torch` = all steps of a level in batched torch ops "
                   "(glowfast.fused.lu_level_weights_torch); `fused` = glowfast.fused.level_weights (on a GPU the "
                   "lu_weights kernels: one copy and one kernel per level forward, one backward). Host-bound in eager "
                   "mode; on a GPU `graph_replay_us` is the device time.",
}
# Issue 6 targets (H100): group -> list of (description, check(rows) -> (ok | None, detail))
PEER_ANCHOR_IMG_S = {"train_step/cifar10_K32_B64": 244.0, "train_step/cifar10_K32_B256": 952.0}
TARGET_IMG_S = {"train_step/cifar10_K32_B64": 2400.0, "train_step/cifar10_K32_B256": 5700.0}  # the numbers
STARTUP_TARGET_S = 20.0
TRAINING_PATHS = ("fused", "memory_saving", "graphed", "graphed_gemm", "graphed_triton", "graphed_bf16_nhwc",
                  "graphed_bf16_nhwc_compiled", "graphed_bf16_nhwc_compiled_opt", "graphed_bf16_nhwc_compiled_pad0",
                  "graphed_bf16_nhwc_compiled_pad8", "graphed_bf16_nhwc_compiled_fusedopt",
                  "graphed_bf16_nhwc_compiled_gemm3x3", "graphed_bf16_nhwc_compiled_gemm3x3_fusedopt",
                  "graphed_bf16_nhwc_compiled_epilogue", "graphed_bf16_nhwc_compiled_epilogue_fusedopt",
                  "graphed_bf16_nhwc_compiled_gemm3x3_epilogue_fusedopt",
                  "graphed_bf16_nhwc_compiled_epilogue_fusedopt_exactbwd",
                  "graphed_bf16_triton", "graphed_bf16_triton_dots",
                  "graphed_bf16_gemm")


def canonical_variant(bench: dict) -> str:
    info = bench.get("extra_info") or {}
    params = bench.get("params") or {}
    name = info.get("variant") or params.get("variant") or params.get("impl") or params.get("backend")
    if not name:
        param = bench.get("param") or ""
        name = param.split("-")[-1] if param else bench.get("name", "?")
    name = str(name)
    return VARIANT_ALIASES.get(name.lower(), name)


def fmt_time(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    if seconds >= 1:
        return f"{seconds:.3g} s" if seconds < 100 else f"{seconds:.0f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def fmt_ratio(num: float | None, den: float | None) -> str:
    if not num or not den:
        return "—"
    return f"{num / den:.2f}×"


def fmt_num(x, digits: int = 0) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and not math.isfinite(x):
        return "—"
    return f"{x:,.{digits}f}"


def git_commit(cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except Exception:
        return None


def _machine(data: dict) -> tuple:
    mi = data.get("machine_info") or {}
    return mi.get("cuda_device"), mi.get("torch"), mi.get("triton"), (mi.get("cpu") or {}).get("brand_raw")


def load(paths: list[Path], allow_mixed: bool = False) -> tuple[dict, list[dict]]:
    """(metadata of the first file, every benchmark of all files). Files from different machines (GPU, torch,
    triton or CPU) are refused unless `allow_mixed`: one table must not compare numbers from two devices."""
    meta, benches, first = None, [], None
    for p in paths:
        data = json.loads(Path(p).read_text())
        if "benchmarks" not in data:
            raise SystemExit(f"{p}: not a pytest-benchmark JSON file (no 'benchmarks' key)")
        if meta is None:
            meta, first = {k: v for k, v in data.items() if k != "benchmarks"}, (p, _machine(data))
        elif _machine(data) != first[1] and not allow_mixed:
            raise SystemExit(f"{p} comes from another machine than {first[0]} (GPU, torch, triton, CPU: "
                             f"{_machine(data)} vs {first[1]}); report them separately or pass --allow-mixed")
        benches.extend(data["benchmarks"])
    return meta or {}, benches


# the fields startup_table and the start-up target read from every benchmarks/startup.py record
STARTUP_FIELDS = ("config", "batch", "import_s", "build_s", "first_step_s", "to_first_step_s", "second_step_s")


def load_startup(paths: list[Path]) -> list[dict]:
    """The records of benchmarks/startup.py (one non-empty JSON list per file); SystemExit naming the file and the
    missing fields otherwise."""
    records = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        if not isinstance(data, list) or not data or not all(isinstance(r, dict) for r in data):
            raise SystemExit(f"{p}: not a benchmarks/startup.py output (a non-empty list of records)")
        for i, r in enumerate(data):
            missing = [k for k in STARTUP_FIELDS if k not in r]
            if missing:
                raise SystemExit(f"{p}: record {i} is not a benchmarks/startup.py record (no {', '.join(missing)})")
        records += data
    return records


def startup_table(records: list[dict]) -> list[str]:
    if not records:
        return []
    lines = ["### Start-up: a fresh process with empty kernel caches (benchmarks/startup.py)", "",
             "Seconds from the script's start: import (torch, glowfast, CUDA context), build (model on the device), "
             "ActNorm's init, the kernels compiled in parallel from a dry step (precompile), the first training "
             "step (without precompile: every Triton compile, one after another; cuDNN autotuning), then a warm "
             "step. Records from before the init and precompile columns have `—` there (their first step was the "
             "init, which compiles no kernel).", "",
             "| config | batch | path | import | build | init | precompile | first step | to first step | warm step |",
             "| --- | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in records:
        init = fmt_time(r["init_s"]) if "init_s" in r else "—"
        lines.append(f"| {r['config']} | {r['batch']} | {startup_path(r)} | "
                     f"{fmt_time(r['import_s'])} | {fmt_time(r['build_s'])} | {init} | {precompile_cell(r)} | "
                     f"{fmt_time(r['first_step_s'])} | {fmt_time(r['to_first_step_s'])} | "
                     f"{fmt_time(r['second_step_s'])} |")
    return lines + [""]


def startup_path(r: dict) -> str:
    """A startup.py record's compute path, with its network options and optimiser when not the plain ones."""
    extra = [r["networks"]] if r.get("networks", "plain") != "plain" else []
    extra += ["FusedAdamax"] if r.get("fused_optimizer") else []
    path = str(r.get("compute_path", r.get("backend")))
    return f"{path} ({', '.join(extra)})" if extra else path


def precompile_cell(r: dict) -> str:
    """How a startup.py record compiled its kernels: off, or the parallel precompile's time and variant count."""
    if "init_s" not in r:
        return "—"
    pre = r.get("precompile")
    if pre is None:
        return "off"
    if pre.get("skipped"):
        return f"nothing compiled ({pre['skipped']})"
    cell = f"{fmt_time(r['precompile_s'])}, {pre['compiled']} kernels"
    if "dry_seconds" in pre:  # the dry step's own share (torch ops, cuDNN autotuning) vs waiting for the compiles
        cell += f" (dry step {fmt_time(pre['dry_seconds'])})"
    if r.get("first_step_compiles"):  # the real step compiled variants the dry step's keys missed
        cell += f"; the first step compiled {r['first_step_compiles']} more"
    return cell


def header(meta: dict, title: str, note: str | None, benches: list[dict] = ()) -> list[str]:
    mi = meta.get("machine_info") or {}
    ci = meta.get("commit_info") or {}
    cpu = mi.get("cpu") or {}
    cpu_name = cpu.get("brand_raw") or mi.get("processor") or mi.get("machine") or "CPU"
    gpu = mi.get("cuda_device")
    device = f"GPU: {gpu}" if gpu else f"CPU only: {cpu_name} ({cpu.get('count', '?')} cores)"
    if "torch" not in mi:  # a JSON written without benchmarks/conftest.py's machine-info hook
        for pkg in ("torch", "triton"):
            try:
                mi[pkg] = f"{importlib.metadata.version(pkg)} (installed where the report ran)"
            except importlib.metadata.PackageNotFoundError:
                pass
    # GLOWFAST_GIT_COMMIT, when the caller gives it, names the commit: the GPU machine's copy of the tree has no
    # .git of its own (pytest-benchmark writes "unversioned") or a stale one (it recorded an older commit, "dirty",
    # on the first GPU run); else what pytest-benchmark recorded; else git at report time
    recorded = ci.get("id") not in (None, "", "unversioned")
    given = os.environ.get("GLOWFAST_GIT_COMMIT")
    commit = given or \
        ((ci["id"][:12] + (" (dirty tree)" if ci.get("dirty") else "")) if recorded else
         (git_commit(Path(__file__).resolve().parent) or "unknown") + " (git rev-parse at report time)")
    date = meta.get("datetime") or _dt.datetime.now(_dt.UTC).isoformat()
    lines = [f"## {title}", ""]
    if note:
        lines += [note, ""]
    rows = [
        ("device", device),
        ("torch", mi.get("torch", "?")),
        ("triton", mi.get("triton") or "—"),
        ("CUDA (torch build)", mi.get("cuda_version") or "—"),
        ("python", mi.get("python_version", "?")),
        ("commit", f"{commit} on {ci['branch']}" if recorded and ci.get("branch") and not given else commit),
        ("date", date),
        ("pytest-benchmark", meta.get("version", "?")),
        ("torch CPU threads", ", ".join(str(t) for t in sorted(
            {b.get("extra_info", {}).get("torch_threads") for b in benches} - {None}))
            or mi.get("torch_threads", "?")),
    ]
    if mi.get("env"):
        rows.append(("switches", ", ".join(f"{k}={v}" for k, v in mi["env"].items())))
    lines += ["| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    return lines


def is_gpu_row(bench: dict) -> bool:
    """A row measured on CUDA: run_timed records peak_mem_mib (and the CUDA-event cross-check) there only."""
    info = bench.get("extra_info") or {}
    return "peak_mem_mib" in info or "cuda_event_median_ms" in info


def group_rows(benches: list[dict], stat: str) -> OrderedDict:
    """group -> variant -> row dict (time, info, bench).

    A group measured on both a GPU and a CPU is split by device, whatever the order of the rows: the GPU rows keep
    the group's name (the one the target checks look up), the CPU rows go to "<group> (CPU)", so ratios never
    compare a GPU row with a CPU row."""
    def base(b: dict) -> str:
        return b.get("group") or b.get("name", "?").split("[")[0]

    gpu_groups = {base(b) for b in benches if is_gpu_row(b)}
    groups: dict = {}
    for b in benches:
        group = base(b)
        if group in gpu_groups and not is_gpu_row(b):
            group = f"{group} (CPU)"
        variant = canonical_variant(b)
        stats = b.get("stats") or {}
        t = stats.get(stat)
        row = {"time": t, "info": b.get("extra_info") or {}, "bench": b, "stats": stats}
        groups.setdefault(group, {})
        if variant in groups[group]:  # the same variant twice on one device: keep both, suffixed
            variant = f"{variant} ({b.get('param') or b.get('name')})"
        groups[group][variant] = row

    def key(g: str):
        section = g.split("/")[0]
        order = SECTION_ORDER.index(section) if section in SECTION_ORDER else len(SECTION_ORDER)
        return (order, section, g)

    return OrderedDict((g, groups[g]) for g in sorted(groups, key=key))


def variant_order(variants) -> list[str]:
    main = [v for v in MAIN_VARIANTS if v in variants]
    return main + sorted(v for v in variants if v not in MAIN_VARIANTS)


def summary_table(groups) -> list[str]:
    lines = ["| group | reference | compiled | fused | peer | fused vs reference | fused vs compiled | "
             "fused vs peer |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for g, rows in groups:
        t = {v: rows[v]["time"] if v in rows else None for v in MAIN_VARIANTS}
        lines.append(f"| {g} | " + " | ".join(fmt_time(t[v]) for v in MAIN_VARIANTS) + " | "
                     + " | ".join(fmt_ratio(t[v], t["fused"]) for v in ("reference", "compiled", "peer")) + " |")
    return lines + [""]


def detail_table(items, stat: str) -> list[str]:
    lines = [f"| group | variant | {stat} | IQR | rounds × iters | images/s | peak GPU MiB | first call | "
             "compile | fused speed-up | notes |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for g, rows in items:
        t_fused = rows["fused"]["time"] if "fused" in rows else None
        for v in variant_order(rows):
            r = rows[v]
            info, st = r["info"], r["stats"]
            ips = info.get("images_per_s")
            if ips is None and r["time"] and info.get("images"):
                ips = info["images"] / r["time"]
            speed = fmt_ratio(r["time"], t_fused) if v != "fused" and t_fused else ""
            first = info.get("first_call_s")
            comp = info.get("compile_s")
            notes = []
            if info.get("effective_GBps") is not None:
                frac = info.get("fraction_of_copy_bw")
                notes.append(f"{info['effective_GBps']:,.0f} GB/s" + (f" = {frac:.0%} of copy" if frac else ""))
            if info.get("cuda_event_median_ms") is not None:
                notes.append(f"events {fmt_time(info['cuda_event_median_ms'] / 1e3)}")
            if info.get("capture_s") is not None:
                notes.append(f"capture {fmt_time(info['capture_s'])}")
            if info.get("compile_cache"):
                notes.append(str(info["compile_cache"]).split(" ")[0] + " compile")
            lines.append(
                f"| {g} | {v} | {fmt_time(r['time'])} | {fmt_time(st.get('iqr'))} | "
                f"{st.get('rounds', '?')} × {st.get('iterations', 1)} | {fmt_num(ips)} | "
                f"{fmt_num(info.get('peak_mem_mib'))} | {fmt_time(first) if first is not None else '—'} | "
                f"{fmt_time(comp) if comp is not None else '—'} | {speed} | {'; '.join(notes)} |")
    return lines + [""]


def sections(groups: OrderedDict, stat: str) -> list[str]:
    """Per section (first component of the group name): title, note, summary table, detail table."""
    by_section: OrderedDict = OrderedDict()
    for g, rows in groups.items():
        by_section.setdefault(g.split("/")[0], []).append((g, rows))
    lines = [f"Times are the {stat} per call; speed-up `fused vs X` = t_X / t_fused (> 1: fused is faster); "
             "`—`: not measured (skipped on this machine or not installed).", ""]
    for section, items in by_section.items():
        lines += [f"### {SECTION_TITLES.get(section, section)}", ""]
        if section in SECTION_NOTES:
            lines += [SECTION_NOTES[section], ""]
        if section != "compile" and any(v in rows for _, rows in items for v in MAIN_VARIANTS):
            lines += summary_table(items)
        lines += detail_table(items, stat)
    return lines


def target_table(groups: OrderedDict, startup: list[dict] = (), gpu: str | None = None) -> list[str]:
    """Issue 6's targets (then issue 4's and 3's), checked where the groups they need were measured (CIFAR-10
    config on a GPU); `gpu` names the device, which gets a caveat when it is not the H100 the targets were set on."""
    checks = []
    for g, anchor in PEER_ANCHOR_IMG_S.items():
        rows = groups.get(g) or {}
        for variant in TRAINING_PATHS:
            if variant not in rows:
                continue
            fused = rows[variant]
            ips = fused["info"].get("images_per_s")
            want = TARGET_IMG_S[g]
            if ips is not None:
                checks.append((f"{g}: {variant} ≥ {want:,.0f} img/s ({want / anchor:.1f}× the peer's {anchor:.0f})",
                               ips >= want, f"{ips:,.0f} img/s = {ips / anchor:.1f}× the anchor"))
            if g.endswith("B256") and "reference" in rows:
                pf, pr = fused["info"].get("peak_mem_mib"), rows["reference"]["info"].get("peak_mem_mib")
                if pf is not None and pr is not None:
                    checks.append((f"{g}: {variant} peak memory ≤ reference", pf <= pr,
                                   f"{pf:,.0f} vs {pr:,.0f} MiB"))
    cold = [r for r in startup if r.get("compute_path") == "fused" and r.get("config") == "cifar10_K32"]
    for r in cold:
        how = f", precompile {precompile_cell(r)}" if "init_s" in r else ""
        checks.append((f"start-up (fresh process, empty Triton cache): CIFAR-10 B{r['batch']} {startup_path(r)}{how}, "
                       f"to the end of the first step < {STARTUP_TARGET_S:.0f} s",
                       r["to_first_step_s"] < STARTUP_TARGET_S,
                       f"{r['to_first_step_s']:.1f} s (first step {r['first_step_s']:.1f} s)"))
    first_fused = (groups.get("train_step/cifar10_K32_B64") or {}).get("fused")
    if not cold and first_fused and first_fused["info"].get("first_call_s") is not None:
        first = first_fused["info"]["first_call_s"]
        checks.append((f"start-up < {STARTUP_TARGET_S:.0f} s, approximated by the first fused step inside the "
                       "benchmark process (no startup.py record: CUDA context and cuDNN were already warm, so "
                       "this underestimates a cold start)", first < STARTUP_TARGET_S, f"{first:.1f} s"))
    lines = checks_table("Issue 6 targets (H100; peer anchor y0ast/Glow-PyTorch: 244 img/s at B64, 952 img/s at B256)",
                         checks) + kernel_target_table(groups) + lu_target_table(groups)
    return (other_gpu_caveat(gpu) if lines else []) + lines


def other_gpu_caveat(gpu: str | None) -> list[str]:
    """The issues' targets and the peer anchor were measured on an H100; the device tool may lend an H200 (same
    compute, ~1.4x the HBM bandwidth), whose rows are no verdict on them."""
    if not gpu or gpu == "cpu" or "H100" in gpu:
        return []
    return [f"**Measured on {gpu}, not on the H100 that the targets and the peer anchor below were set on**: "
            "read the met/NO columns as indicative only (an H200 has the H100's compute and about 1.4× its memory "
            "bandwidth, so bandwidth-bound rows run faster there).", ""]


def checks_table(title: str, checks: list[tuple[str, bool, str]]) -> list[str]:
    """A `### title` section with one row per (target, met, measured); nothing when there are no checks."""
    if not checks:
        return []
    return ([f"### {title}", "", "| target | met | measured |", "| --- | --- | --- |"]
            + [f"| {d} | {'yes' if ok else 'NO'} | {m} |" for d, ok, m in checks] + [""])


# The backward kernels' variants timed beside them (glowfast.kernels.tune.BWD_VARIANTS), shown, never graded: without
# the weight gradient (what the rest of the loop costs), with it as one GEMM after the kernel (an experiment)
BWD_VARIANT_LABELS = {"bwd_nodw": "without the weight gradient",
                      "bwd_dwgemm": "the weight gradient as a GEMM after the kernel"}


def kernel_target_table(groups: OrderedDict) -> list[str]:
    """Issue 4's targets: every fused kernel >= 70% of the measured copy bandwidth at the large shapes, and the
    non-network part of K flow steps (forward + backward) >= 3x faster than the reference at CIFAR-10 shapes."""
    checks, exact = [], []
    for g, rows in groups.items():
        if g.startswith("bandwidth/"):
            for variant, row in rows.items():
                frac = row["info"].get("fraction_of_copy_bw")
                if frac is None:
                    continue
                measured = f"{frac:.0%} ({row['info'].get('effective_GBps', 0):,.0f} GB/s)"
                if "eager_call_us" in row["info"]:  # cuda_timer.device_time could not capture the call
                    measured += ", from eager calls (the CUDA-graph capture failed: a lower bound)"
                bwd_variant = next((label for m, label in BWD_VARIANT_LABELS.items() if f"/{m}/" in g), None)
                if bwd_variant:
                    exact.append(f"{g} ({variant}, {bwd_variant}): {measured}")
                elif variant == "fused-tf32x3":  # the kernels as training runs them (3xTF32 dots, the GPU default)
                    checks.append((f"{g} ({variant}) ≥ 70% of copy bandwidth", frac >= 0.7, measured))
                else:  # plain TF32 (opt-in), exact fp32 dots (evaluation: CUDA-core FMAs): for information
                    exact.append(f"{g} ({variant}): {measured}")
        elif g.startswith("step_nonnet/") and "fused" in rows and "reference" in rows:
            tf, tr = rows["fused"]["time"], rows["reference"]["time"]
            if tf and tr:
                checks.append((f"{g}: fused ≥ 3× the reference", tr / tf >= 3, f"{tr / tf:.2f}×"))
            # the same chains replayed from CUDA graphs (device time: what the kernels cost without the host's
            # launch overhead, which bounds the eager rows; bench_fused_step records graph_replay_us)
            gf, gr = (rows[v]["info"].get("graph_replay_us") for v in ("fused", "reference"))
            if gf and gr:
                checks.append((f"{g}: fused ≥ 3× the reference, CUDA-graph replays (device time)", gr / gf >= 3,
                               f"{gr / gf:.2f}× ({gr:,.0f} vs {gf:,.0f} µs)"))
            # the chain's other fused variants, not graded: the weight gradients as GEMMs (use_weight_grad("gemm")),
            # exact-fp32 dots (use_dot_precision("ieee")), or in the backward kernels only (use_exact_backward_dots)
            for name, label in (("fused_dwgemm", "weight gradients as GEMMs"), ("fused_ieee", "exact-fp32 dots"),
                                ("fused_exactbwd", "exact-fp32 dots in the backward kernels up to 32 channels")):
                other = rows.get(name)
                go = other and other["info"].get("graph_replay_us")
                if other and other["time"] and tr:
                    exact.append(f"{g} (fused, {label}): {tr / other['time']:.2f}× the reference"
                                 + (f", {gr / go:.2f}× on device time ({go:,.0f} µs)" if go and gr else ""))
    lines = checks_table("Issue 4 targets (fused kernels; bandwidth from CUDA-graph replays)", checks)
    if exact:
        lines += ["For information, not graded: other dot precisions -- plain TF32 (`tf32`, opt-in) and exact fp32 "
                  "(`ieee`, likelihood evaluation; its `tl.dot` runs on CUDA cores, ~20-40 FLOP per byte at 48 "
                  "channels: compute-bound, not a bandwidth target) -- and the backward kernels without their weight "
                  "gradient (`bwd_nodw`) or with it as one GEMM after the kernel (`bwd_dwgemm`; in the K-step chain "
                  "`fused_dwgemm`), and the K-step chain with exact-fp32 dots (`fused_ieee`), or in its backward "
                  "kernels up to 32 channels (`fused_exactbwd`): "
                  + "; ".join(exact), ""]
    return lines


# Issue 3's targets for the batched LU op on an H100: the 96 matrices of a CIFAR-10 Glow (32 each of 12, 24, 48)
LU_TARGET_S = {"slogdet-fwd": 30e-6, "slogdet-fwdbwd": 80e-6}


def lu_target_table(groups: OrderedDict) -> list[str]:
    """Issue 3's targets, from GPU rows only (CUDA rows carry peak_mem_mib): the 96-matrix CIFAR-10 set forward
    <= 30 us and forward+backward <= 80 us, and the 4096 x 48x48 batch faster than torch.linalg.slogdet."""
    def gpu(row):
        return row is not None and is_gpu_row(row["bench"]) and row["time"]

    checks = []
    for mode, limit in LU_TARGET_S.items():
        for variant in ("fused", "packed"):
            row = (groups.get(f"batched_lu/{mode}/cifar96") or {}).get(variant)
            if gpu(row):
                target = f"batched_lu/{mode}/cifar96 ({variant}): 96 matrices ≤ {limit * 1e6:.0f} µs"
                checks.append((target, row["time"] <= limit, fmt_time(row["time"])))
                # the same call replayed from a CUDA graph (bench_batched_lu records graph_replay_us): the device
                # time, without the host's Python / dispatcher / autograd work that bounded the eager rows on the H200
                replay_us = row["info"].get("graph_replay_us")
                if replay_us:
                    checks.append((f"{target}, CUDA-graph replays (device time)", replay_us * 1e-6 <= limit,
                                   fmt_time(replay_us * 1e-6)))
    rows = groups.get("batched_lu/slogdet-fwd/batch4096x48") or {}
    fused, torch_batched = rows.get("fused"), rows.get("peer")
    if gpu(fused) and gpu(torch_batched):
        checks.append(("batched_lu/slogdet-fwd/batch4096x48: fused faster than torch.linalg.slogdet (one call)",
                       fused["time"] < torch_batched["time"],
                       f"{fmt_time(fused['time'])} vs {fmt_time(torch_batched['time'])}"))
    return checks_table("Issue 3 targets (batched LU op on the GPU)", checks)


def render(paths: list[Path], title: str | None = None, note: str | None = None, stat: str = "median",
           startup_paths: list[Path] = (), allow_mixed: bool = False) -> str:
    meta, benches = load(paths, allow_mixed)
    startup = load_startup(list(startup_paths))
    if not paths:  # start-up records only: their own device and versions, no pytest-benchmark header
        r = startup[0]
        lines = [f"## {title or 'Start-up on ' + r.get('device', '?')}", ""] + ([note, ""] if note else [])
        lines += [f"torch {r.get('torch', '?')}, glowfast {r.get('glowfast', '?')}, commit "
                  f"{os.environ.get('GLOWFAST_GIT_COMMIT') or git_commit(Path(__file__).resolve().parent) or '?'} "
                  "(at report time)", ""]
        return "\n".join(lines + target_table(OrderedDict(), startup, r.get("device")) + startup_table(startup))
    mi = meta.get("machine_info") or {}
    if title is None:
        title = f"Results on {mi['cuda_device']}" if mi.get("cuda_device") else "Results on CPU (no GPU)"
    groups = group_rows(benches, stat)
    lines = header(meta, title, note, benches)
    if not groups:
        lines += target_table(groups, startup, mi.get("cuda_device")) + startup_table(startup)
        lines += ["No benchmarks in the input (all skipped?).", ""]
        return "\n".join(lines)
    lines += target_table(groups, startup, mi.get("cuda_device")) + startup_table(startup) + sections(groups, stat)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", nargs="*", type=Path, help="pytest-benchmark JSON file(s) (--benchmark-json)")
    ap.add_argument("--out", type=Path, help="Markdown file to write (default: stdout)")
    ap.add_argument("--append", action="store_true", help="append to --out instead of overwriting it")
    ap.add_argument("--title", help="section title (default: 'Results on <device>')")
    ap.add_argument("--note", help="a paragraph under the title")
    ap.add_argument("--stat", default="median", choices=("median", "min", "mean"),
                    help="the statistic of the per-call times that tables and ratios use")
    ap.add_argument("--startup", type=Path, nargs="*", default=[],
                    help="benchmarks/startup.py output(s): the cold start-up table and target")
    ap.add_argument("--allow-mixed", action="store_true",
                    help="accept JSON files from different machines (GPU, torch, triton or CPU) in one report")
    args = ap.parse_args(argv)
    if not args.json and not args.startup:
        ap.error("give pytest-benchmark JSON file(s) and/or --startup file(s)")
    text = render(args.json, args.title, args.note, args.stat, args.startup, args.allow_mixed)
    if args.out is None:
        sys.stdout.write(text + "\n")
        return 0
    if args.append and args.out.exists():
        old = args.out.read_text().rstrip("\n")
        args.out.write_text(old + "\n\n" + text + "\n")
    else:
        args.out.write_text("# glowfast benchmark results\n\n"
                            "Generated by `benchmarks/report.py` from pytest-benchmark JSON; see "
                            "benchmarks/README.md for how to reproduce.\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
