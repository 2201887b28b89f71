"""The block-size sweep (glowfast.kernels.tune) and the launch override it measures with.

The sweep's own output check is what makes its timings trustworthy on a GPU: every candidate tile must give
the default tile's numbers. Here it runs where the kernels run (CPU interpreter in CI, CUDA on a GPU) at
tiny shapes, so each kernel is launched with several tile sizes and warp counts and compared.
"""

import json
import types

import pytest
import torch

from glowfast.kernels import _utils, tune
from glowfast.kernels.coupling import coupling_block_pixels

from conftest import KERNEL_DEVICE
from tolerances import assert_exact

TINY = [(2, 6, 8, 8), (1, 3, 5, 7)]  # C even/odd, H*W a multiple of the tile / not
# On a GPU each candidate is a Triton compilation (~1 s): there the sweep test keeps one shape and one extra
# tile (the tune stage of gpu_check.sh sweeps the real shapes with the same output check).
SWEEP_SHAPES, SWEEP_BLOCKS, SWEEP_WARPS = (TINY, "16,32", "2,4") if KERNEL_DEVICE == "cpu" else \
    (TINY[1:], "16", "4")


@pytest.mark.parametrize("block_p", [0, 8, 24, 100])
def test_override_rejects_bad_block_sizes(block_p):
    with pytest.raises(ValueError, match="power of two >= 16"), _utils.launch_override(block_p=block_p):
        pass


def test_override_rejects_no_programs():
    with pytest.raises(ValueError, match="programs_per_sm must be >= 1"), _utils.launch_override(programs_per_sm=0):
        pass


@pytest.mark.parametrize("num_warps", [0, 3, 32])
def test_override_rejects_bad_warp_counts(num_warps):
    with pytest.raises(ValueError, match="num_warps must be one of"), _utils.launch_override(num_warps=num_warps):
        pass


def test_override_applies_inside_and_is_restored_after_an_error():
    before = (_utils.block_pixels(16, 4096), coupling_block_pixels(16, 4096), _utils.launch_options(16))
    with pytest.raises(RuntimeError, match="boom"), _utils.launch_override(block_p=32, num_warps=2):
        assert _utils.block_pixels(16, 4096) == 32
        assert coupling_block_pixels(16, 4096) == 32
        assert _utils.launch_options(16)["num_warps"] == 2
        raise RuntimeError("boom")
    assert (_utils.block_pixels(16, 4096), coupling_block_pixels(16, 4096), _utils.launch_options(16)) == before


def test_candidates_start_with_the_default_and_have_no_duplicates():
    for kernel, mode in tune.KERNELS:
        for shape in (*tune.BANDWIDTH_SHAPES, *tune.CIFAR_SHAPES):
            cands = tune.candidates(kernel, shape, mode=mode)
            assert cands[0] == tune.default_config(kernel, shape, mode)
            assert len(set(cands)) == len(cands)
            for bp, nw in cands:
                assert bp >= 16 and bp & (bp - 1) == 0 and nw in tune.NUM_WARPS + (cands[0][1],)


def test_max_rel_diff_sees_a_difference_in_any_output():
    a = (torch.ones(3), torch.full((2,), 4.0), None)
    assert tune.max_rel_diff(a, a) == 0.0
    b = (torch.ones(3), torch.tensor([4.0, 4.004]), None)
    assert tune.max_rel_diff(b, a) == pytest.approx(1e-3, rel=1e-3)


def test_sweep_every_candidate_matches_the_default_on_every_kernel(tmp_path):
    """Each kernel at tiles of 16/32/64 pixels (several tiles per image, a partial last tile) and 2/4 warps;
    the reducing backward kernels also with one program per sample (1 per SM; on CPU the device is one SM)
    instead of one per tile, so each program loops over tiles and the partial sums regroup."""
    rc = tune.main(["--device", KERNEL_DEVICE, "--shapes", ",".join("x".join(map(str, s)) for s in SWEEP_SHAPES),
                    "--block-p", SWEEP_BLOCKS, "--num-warps", SWEEP_WARPS, "--programs-per-sm", "1", "--rounds", "1",
                    "--iterations", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "tune.json").read_text())
    records = data["records"]
    assert rc == 0
    seen = {(r["kernel"], r["mode"], tuple(r["shape"])) for r in records}
    assert seen == {(k, m, s) for k, m in tune.KERNELS for s in SWEEP_SHAPES}
    for r in records:
        assert r["match"] and "error" not in r, r
        assert r["max_rel_diff"] <= tune.MATCH_RTOL and r["us"] > 0
    # per case: the default + the tiles x warp counts (minus a candidate equal to the default); the reducing
    # kernels twice (rule, 1 program per SM)
    for k, m, shape in seen:
        n = len(tune.candidates(k, shape, tuple(map(int, SWEEP_WARPS.split(","))),
                                list(map(int, SWEEP_BLOCKS.split(","))), m))
        got = [r for r in records if (r["kernel"], r["mode"], tuple(r["shape"])) == (k, m, shape)]
        assert len(got) == n * (2 if (k, m) in tune.REDUCING else 1), (k, m, shape)
    assert {r["programs_per_sm"] for r in records if (r["kernel"], r["mode"]) in tune.REDUCING} == {None, 1}
    table = (tmp_path / "tune.md").read_text()
    for k, m in tune.KERNELS:
        assert f"| {k}/{m} | {tune.shape_tag(SWEEP_SHAPES[0])} |" in table
    assert "did not match" not in table


def test_sweep_tries_other_dot_precisions_on_the_kernels_with_a_dot(tmp_path):
    """--precisions: each kernel with a 1x1-conv dot also runs at the other dot precision (its own default tile
    and candidates: on a GPU the exact-fp32 default tile differs from 3xTF32's), recorded as such and compared with
    the default's outputs; the current precision is not run twice, and the coupling kernel (no dot) gets no extra
    candidates."""
    from glowfast.kernels import dot_precision

    current = dot_precision(torch.device(KERNEL_DEVICE))
    other = "tf32x3" if current == "ieee" else "ieee"
    shape = (1, 12, 8, 8)
    rc = tune.main(["--device", KERNEL_DEVICE, "--shapes", "1x12x8x8", "--kernels", "actnorm_invconv/bwd,coupling/fwd",
                    "--block-p", "32", "--num-warps", "4", "--precisions", f"{other},{current}", "--rounds", "1",
                    "--iterations", "1", "--out", str(tmp_path)])
    assert rc == 0
    records = json.loads((tmp_path / "tune.json").read_text())["records"]
    dot = [r for r in records if r["kernel"] == "actnorm_invconv"]
    n = len(tune.candidates("actnorm_invconv", shape, (4,), [32], "bwd"))
    with _utils.use_dot_precision(other):
        n_other = len(tune.candidates("actnorm_invconv", shape, (4,), [32], "bwd"))
    assert [r.get("precision") for r in dot] == [None] * n + [other] * n_other
    assert dot[0]["default"] and not any(r["default"] for r in dot[1:])
    assert all(r["match"] and r["max_rel_diff"] <= tune.MATCH_RTOL for r in dot)
    # the other precision did compute: its outputs differ from the default's by rounding alone
    assert all(0 < r["max_rel_diff"] <= 1e-5 for r in dot if r.get("precision"))
    assert not any("precision" in r for r in records if r["kernel"] == "coupling")
    assert tune.config_text(dot[-1]) == f"({dot[-1]['block_p']}, 4, {other})"


def test_an_unknown_dot_precision_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tune.main(["--device", KERNEL_DEVICE, "--precisions", "fp16", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "unknown dot precision ['fp16']" in capsys.readouterr().err


def test_markdown_reports_a_mismatching_candidate():
    base = dict(kernel="coupling", mode="fwd", shape=[2, 6, 8, 8], bytes=100, us=10.0, GBps=1.0)
    records = [dict(base, block_p=64, num_warps=4, default=True, max_rel_diff=0.0, match=True),
               dict(base, block_p=16, num_warps=4, default=False, max_rel_diff=0.5, match=False, us=1.0),
               dict(base, block_p=32, num_warps=4, default=False, max_rel_diff=0.0, match=True, us=5.0)]
    table = tune.markdown(records, "test")
    row = next(line for line in table.splitlines() if line.startswith("| coupling/fwd"))
    assert "(32, 4)" in row and "2.00x" in row  # the faster mismatching (16, 4) is never "best"
    assert "(16, 4): max rel diff 5.00e-01" in table


def test_sweep_and_exit_code_report_a_candidate_whose_outputs_differ(tmp_path, monkeypatch):
    """A fake case (it stands in for a GPU kernel; `tune.kernel_case` is monkeypatched) whose output is the tile
    size it runs with: every candidate tile other than the default's gives different numbers, so the sweep must
    compare each candidate with the default's output (not with its own), flag it, and exit 1."""
    def fake_case(kernel, mode, shape, device):
        return (lambda: torch.full((4,), float(_utils.block_pixels(16, 4096)))), 1000

    monkeypatch.setattr(tune, "kernel_case", fake_case)
    # coupling/fwd at 1x12x16x16: cp 16, 256 pixels, so the default tile is 256 (interpreter and GPU alike)
    assert tune.default_config("coupling", (1, 12, 16, 16))[0] == 256
    rc = tune.main(["--device", "cpu", "--shapes", "1x12x16x16", "--kernels", "coupling/fwd", "--block-p", "16,32",
                    "--num-warps", "4", "--rounds", "1", "--iterations", "1", "--out", str(tmp_path)])
    records = json.loads((tmp_path / "tune.json").read_text())["records"]
    assert [(r["block_p"], r["default"], r["match"]) for r in records] == [(256, True, True), (16, False, False),
                                                                          (32, False, False)]
    assert records[1]["max_rel_diff"] == pytest.approx(240 / 256)  # |16 - 256| / 256
    assert records[2]["max_rel_diff"] == pytest.approx(224 / 256)
    table = (tmp_path / "tune.md").read_text()
    assert "did not match the default's outputs" in table
    assert "(16, 4): max rel diff 9.38e-01" in table
    assert rc == 1


def test_time_call_on_cpu_is_the_median_seconds_per_call(monkeypatch):
    """Rounds of 2 calls taking 10 ms, 30 ms, 2 ms each: the median per call is 10 ms (per round, not per call:
    20 ms; the minimum: 2 ms; the mean: 14 ms). The calls advance a clock that tune reads instead of perf_counter
    (no sleeping, so no jitter on a loaded machine)."""
    now = [0.0]
    monkeypatch.setattr(tune, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    durations = iter([0.0] * 3 + [10e-3] * 2 + [30e-3] * 2 + [2e-3] * 2)  # 3 warm-up calls first

    def call():
        now[0] += next(durations)

    sec = tune.time_call(call, torch.device("cpu"), rounds=3, iterations=2, warmup=3)
    assert sec == pytest.approx(10e-3, rel=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_call_that_cannot_be_captured_is_timed_eagerly_and_said_so():
    """time_call_graphed falls back to eager calls with a warning, says the time is not a replay's, and leaves the
    GPU's random generator usable for the next benchmark (a failed capture used to break every later randn)."""
    x = torch.ones(1000, device="cuda")

    def call():
        return float(x.sum())  # a host sync: cannot be captured

    with pytest.warns(UserWarning, match="CUDA-graph capture failed"):
        sec, graphed = tune.time_call_graphed(call, torch.device("cuda"), rounds=3, iterations=2)
    assert sec > 0 and graphed is False
    torch.randn(8, device="cuda")
    sec, graphed = tune.time_call_graphed(lambda: x.mul(2), torch.device("cuda"), rounds=3, iterations=2)
    assert sec > 0 and graphed is True


def test_sweep_reports_gb_per_s_of_the_bytes_moved(monkeypatch):
    """A fake case (standing in for a GPU kernel; `tune.kernel_case` monkeypatched) moving 1e6 bytes, timed (fake
    `time_call`) at 1 ms per call: 1e6 B / 1e-3 s = 1e9 B/s = 1.0 GB/s, and 1000 µs."""
    monkeypatch.setattr(tune, "kernel_case", lambda *a, **k: ((lambda: torch.ones(4)), 10**6))
    monkeypatch.setattr(tune, "time_call", lambda *a, **k: 1e-3)
    records = tune.sweep([(1, 12, 16, 16)], (("coupling", "fwd"),), device="cpu", block_ps=[], num_warps=(),
                         log=lambda *_: None)
    assert len(records) == 1 and records[0]["default"] and records[0]["bytes"] == 10**6
    assert records[0]["GBps"] == 1.0
    assert records[0]["us"] == 1000.0


@pytest.mark.parametrize("kernel", ["actnorm_invconv", "cross_step"])
def test_backward_variant_cases_compute_the_backwards_gradients(kernel):
    """bwd_nodw is the backward launch with need_dw=False: no weight gradient, every other gradient as bwd's;
    bwd_dwgemm (dw_outside=True) returns every gradient as bwd's, the weight gradient from its GEMM. As bwd's up to
    summation order (their tiles differ: on the H100, 2e-6 in one of 12 per-channel sums): the exact gradient
    tolerance."""
    with_dw = tune.kernel_case(kernel, "bwd", (2, 12, 8, 8), KERNEL_DEVICE)[0]()
    without = tune.kernel_case(kernel, "bwd_nodw", (2, 12, 8, 8), KERNEL_DEVICE)[0]()
    gemm = tune.kernel_case(kernel, "bwd_dwgemm", (2, 12, 8, 8), KERNEL_DEVICE)[0]()
    assert with_dw[-1] is not None and without[-1] is None
    for a, b in zip(with_dw[:-1], without[:-1], strict=True):
        if a is not None:
            assert_exact(b, a, "grad")
    for a, b in zip(with_dw, gemm, strict=True):
        if a is not None:
            assert_exact(b, a, "grad")


def test_backward_case_counts_x_and_dy_read_and_dx_written():
    """Compulsory traffic of actnorm_invconv's backward: x and dy read, dx written, each 1*12*8*8 fp32 values
    (768 x 4 B = 3072 B): 3 x 3072 = 9216 B (the per-channel parameters and their gradients are not counted); the
    forward reads x and writes y: 6144 B."""
    _, nbytes = tune.kernel_case("actnorm_invconv", "bwd", (1, 12, 8, 8), "cpu")
    assert nbytes == 9216
    assert tune.kernel_case("actnorm_invconv", "fwd", (1, 12, 8, 8), "cpu")[1] == 6144


def test_coupling_candidates_at_cifar_level_one_follow_the_documented_rule():
    """coupling at 256x12x16x16: cp = 16, 256 pixels, default tile 256 (the GPU table's; the interpreter's whole
    image). The rule: default/4 ... default*8 = 64, 128, 256, 512, 1024, 2048, kept if <= the
    image (256) and 512 <= 16 * BLOCK_P <= 16384 (32 ... 1024): BLOCK_P 64, 128 and 256, each with 4 and 8 warps."""
    cands = tune.candidates("coupling", (256, 12, 16, 16))
    assert cands[0] == tune.default_config("coupling", (256, 12, 16, 16)) and cands[0][0] == 256
    assert sorted(cands) == [(64, 4), (64, 8), (128, 4), (128, 8), (256, 4), (256, 8)]


def test_candidates_reach_a_quarter_of_the_cp64_forward_tiles():
    """At 64x48x64x64 (cp 64) the plain-TF32 forward's tile (128, 8) holds one program per SM; the sweep also tries
    a quarter of it, 32 pixels (cp x 32 = 2048 elements), on 4 and 8 warps: under 3xTF32, (32, 4) ran 2.6x faster
    than (128, 8) on the H100 and is that precision's tile now. (From the GPU table's tile: the interpreter's
    default is the whole image.)"""
    gpu_default = _utils.gpu_tile("fwd", 64, "tf32")
    assert gpu_default == (128, 8) and _utils.gpu_tile("fwd", 64, "tf32x3") == (32, 4)
    cands = tune.candidates("actnorm_invconv", (64, 48, 64, 64), mode="fwd", default=gpu_default)
    assert cands[0] == gpu_default and {(32, 4), (32, 8), (64, 4), (64, 8)} <= set(cands), cands
    assert min(bp for bp, _ in cands) == 32


def _warpgroup_pixel_share(cp: int, block_p: int, num_warps: int) -> int:
    """Pixels per warpgroup in a (cp x cp) @ (cp x block_p) wgmma dot, as Triton lays it out on sm_90 (read off the
    PTX of every tile: tests/test_triton_compile_sm90.py): warpgroups take 64 rows of cp each first, the rest
    split the pixels."""
    groups = max(1, num_warps // 4)
    over_rows = max(1, min(groups, cp // 64))
    return block_p // (groups // over_rows)


def test_dot_tiles_clipped_to_small_images_keep_16_pixels_per_warpgroup(monkeypatch):
    """CIFAR-10's third level (48 channels, 4x4) clips every cp-64 tile to 16 pixels; on the table's 8 warps that is
    8 pixels per warpgroup, an N=8 wgmma that Triton miscompiles (triton-lang/triton#10629; the H100 sweep crashed
    on one). The launch then runs fewer warps. Unclipped tiles keep the table's warps, and the coupling kernels
    (no dot) are untouched."""
    monkeypatch.setattr(_utils, "is_interpret", lambda: False)
    assert _utils.gpu_tile("fwd", 64, "tf32") == (128, 8)
    assert _utils.launch_options(64, "fwd", "tf32", _utils.block_pixels(64, 16, "fwd", "tf32")) == \
        dict(num_warps=4, num_stages=_utils.NUM_STAGES)
    for prec in ("tf32", "tf32x3", "ieee"):
        for kind in _utils.DOT_KINDS:
            for cp in _utils.GPU_TILES[kind]:
                bp, nw = _utils.gpu_tile(kind, cp, prec)
                assert _utils.launch_options(cp, kind, prec, bp)["num_warps"] == nw  # the table's tile as it is
                for hw in (1, 16, 24, 64, 256, 1024):
                    clipped = _utils.block_pixels(cp, hw, kind, prec)
                    warps = _utils.launch_options(cp, kind, prec, clipped)["num_warps"]
                    assert warps <= nw and (cp < 64 or _warpgroup_pixel_share(cp, clipped, warps) >= 16), \
                        (kind, prec, cp, hw, clipped, warps)
    assert _utils.launch_options(16, "coupling", None, 16)["num_warps"] == _utils.gpu_tile("coupling", 16)[1]


def test_a_forced_warp_count_that_splits_the_pixels_below_16_is_an_error(kernel_device):
    """`launch_override(num_warps=8)` on a 16-pixel cp-64 tile (what crashed the H100 sweep) raises before any
    launch, naming the problem, on every device; 4 warps run."""
    from glowfast.kernels import cross_step_backward

    with pytest.raises(ValueError, match=r"num_warps=8 is too many for a 64-channel tile of 16 pixels"), \
            _utils.launch_override(num_warps=8):
        _utils.launch_options(64, "cross_step_bwd", "tf32x3", 16)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 48, 4, 4, generator=g).to(kernel_device)
    h = (0.1 * torch.randn(2, 48, 4, 4, generator=g)).to(kernel_device)
    params = [(0.1 * torch.randn(48, generator=g)).to(kernel_device) for _ in range(2)]
    weight = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=torch.float64))[0].float().to(kernel_device)
    args = (z, h, torch.randn_like(z), torch.randn(2, device=kernel_device), *params, weight)
    with pytest.raises(ValueError, match="too many"), _utils.launch_override(num_warps=8):
        cross_step_backward(*args, block_p=16)
    with _utils.launch_override(num_warps=4):
        assert all(torch.isfinite(t).all() for t in cross_step_backward(*args, block_p=16) if t is not None)


def test_candidates_leave_out_tiles_that_split_the_pixels_below_16_per_warpgroup():
    """At 64x48x64x64 (cp 64) the cross-step backward's 16-pixel tile is tried on 4 warps, not 8 (the H100 sweep's
    crash); at cp 32 (C = 24: no wgmma) 16 pixels still run on 8 warps, and the coupling kernels (no dot) keep every
    candidate."""
    cands = tune.candidates("cross_step", (64, 48, 64, 64), mode="bwd", default=(16, 4))
    assert (16, 4) in cands and (16, 8) not in cands and (32, 8) in cands, cands
    assert (16, 8) in tune.candidates("cross_step", (64, 24, 64, 64), mode="bwd", default=(32, 4))
    assert (64, 8) in tune.candidates("coupling", (64, 48, 64, 64), default=(64, 8))


# ------------------------------------------------------------------ gaps found by mutation testing (12th session)
def test_candidates_reach_the_rules_largest_tile_of_16k_elements():
    """The documented rule keeps tiles of 512 ... 16384 elements (cp x BLOCK_P): at the issue's bandwidth shape
    64x12x128x128 (cp 16, 16384 pixels per image) a 1024-pixel tile is exactly 16384 elements, a candidate wherever
    it lies within default/4 ... default*8 -- for the interpreter's defaults (2048) and the GPU table's forward
    ones (512); the GPU's spill-free backward tiles (64 for cross_step) reach 512 only."""
    for kernel, mode in (("coupling", "fwd"), ("actnorm_invconv", "fwd"), ("cross_step", "bwd")):
        cands = tune.candidates(kernel, (64, 12, 128, 128), mode=mode)
        if cands[0][0] * 8 >= 1024:
            assert any(bp == 1024 for bp, _ in cands[1:]), (kernel, mode, cands)
        else:
            assert max(bp for bp, _ in cands) == cands[0][0] * 8, (kernel, mode, cands)
        assert all(512 <= 16 * bp <= 16384 for bp, _ in cands[1:]), (kernel, mode, cands)


@pytest.mark.parametrize("kernel, mode, n_reads, n_writes, h_reads, h_writes", [
    ("coupling", "fwd", 1, 1, 1, 0),        # z, h read; y written
    ("coupling", "bwd", 2, 1, 1, 1),        # z, h, dy read; dz, dh written
    ("cross_step", "fwd", 1, 1, 1, 0),
    ("cross_step", "bwd", 2, 1, 1, 1),
    ("cross_step", "bwd_nodw", 2, 1, 1, 1),  # the same traffic (the weight gradient's partials are not counted)
    ("cross_step", "bwd_dwgemm", 2, 1, 1, 1),  # the same compulsory traffic (u is the variant's own cost)
    ("step_inverse", "fwd", 1, 1, 1, 0),
    ("actnorm_invconv", "inv", 1, 1, 0, 0),
])
def test_bytes_moved_are_every_input_read_and_every_output_written_once(kernel, mode, n_reads, n_writes, h_reads,
                                                                        h_writes):
    """Compulsory traffic (module docstring): every input read once, every output written once. At 1x12x8x8 fp32
    the activations are 3072 B and the network output h (2 x 6 channels) 3072 B too."""
    n = nh = 1 * 12 * 8 * 8 * 4
    _, nbytes = tune.kernel_case(kernel, mode, (1, 12, 8, 8), "cpu")
    assert nbytes == (n_reads + n_writes) * n + (h_reads + h_writes) * nh


def test_a_default_tile_that_fails_is_a_failure_of_the_sweep(tmp_path, monkeypatch):
    """A default configuration that raises (e.g. out of resources) leaves nothing to compare with: it is recorded
    with its error, the case stops, and the exit code says so (1)."""
    def failing_case(kernel, mode, shape, device):
        def call():
            raise RuntimeError("out of resources")
        return call, 1000

    monkeypatch.setattr(tune, "kernel_case", failing_case)
    rc = tune.main(["--device", "cpu", "--shapes", "1x12x16x16", "--kernels", "coupling/fwd", "--block-p", "16,32",
                    "--num-warps", "4", "--rounds", "1", "--iterations", "1", "--out", str(tmp_path)])
    records = json.loads((tmp_path / "tune.json").read_text())["records"]
    assert len(records) == 1 and records[0]["default"] and "out of resources" in records[0]["error"]
    assert rc == 1


def test_a_spent_budget_starts_no_new_case(monkeypatch):
    started, logged = [], []
    monkeypatch.setattr(tune, "kernel_case", lambda *a, **k: started.append(a) or ((lambda: torch.ones(1)), 1))
    monkeypatch.setattr(tune, "time_call", lambda *a, **k: 1e-3)
    records = tune.sweep([(1, 12, 16, 16)], (("coupling", "fwd"),), device="cpu", budget_s=-1.0, block_ps=[],
                         num_warps=(), log=logged.append)
    assert records == [] and started == [] and "budget" in logged[0]


@pytest.mark.parametrize("args, message", [
    (["--shapes", "2x6x8"], "not BxCxHxW"),
    (["--kernels", "coupling/sideways"], "unknown kernel/mode"),
])
def test_bad_shapes_and_kernels_are_refused(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        tune.main(["--device", "cpu", "--out", str(tmp_path / "o"), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ gaps found by mutation testing (12th session)
def test_exactly_max_channels_is_supported():
    """MAX_CHANNELS is the widest tile compiled and tested (C up to 128 per flow step): 128 itself is accepted."""
    _utils.check_channels(_utils.MAX_CHANNELS)
    assert _utils.channel_pad(_utils.MAX_CHANNELS) == _utils.MAX_CHANNELS
    with pytest.raises(ValueError, match="at most"):
        _utils.check_channels(_utils.MAX_CHANNELS + 1)


def test_exactly_max_channels_runs_through_a_kernel(kernel_device):
    from glowfast.kernels import actnorm_invconv_forward

    c = _utils.MAX_CHANNELS
    x = torch.randn(1, c, 1, 2, device=kernel_device)
    w = torch.eye(c, device=kernel_device)
    y = actnorm_invconv_forward(x, torch.zeros(c, device=kernel_device), torch.zeros(c, device=kernel_device), w)
    torch.testing.assert_close(y, x)


@pytest.mark.parametrize("kind", ["fwd", "cross_step_fwd", "actnorm_invconv_bwd", "cross_step_bwd", "coupling"])
def test_gpu_tile_takes_each_dot_precisions_table(kind):
    """GPU_TILES_IEEE holds the exact-fp32 tiles of the forward families (and lists the backward tiles that
    use_exact_backward_dots runs exact, for the sm_90 check), GPU_TILES_TF32X3 the 3xTF32 tiles (the
    GPU default) of every family with a dot; "tf32" launches, the coupling kernels (no dot) and cp values without
    an entry use GPU_TILES. With no precision given: the default's, i.e. 3xTF32 under PyTorch's default flags."""
    ieee, tf32x3 = _utils.GPU_TILES_IEEE.get(kind, {}), _utils.GPU_TILES_TF32X3.get(kind, {})
    for cp, tile in _utils.GPU_TILES[kind].items():
        assert _utils.gpu_tile(kind, cp, "tf32") == tile
        assert _utils.gpu_tile(kind, cp, "ieee") == ieee.get(cp, tile)
        assert _utils.gpu_tile(kind, cp, "tf32x3") == tf32x3.get(cp, tile)
        with _utils.use_dot_precision(None):
            if torch.backends.cudnn.allow_tf32:
                assert _utils.gpu_tile(kind, cp) == tf32x3.get(cp, tile)
    if kind != "coupling":
        assert set(tf32x3) == set(_utils.GPU_TILES[kind]), "every dot family has a 3xTF32 tile for every cp"
        assert any(tf32x3[cp] != _utils.GPU_TILES[kind][cp] for cp in tf32x3)


def test_gpu_block_pixels_is_the_table_tile_clipped_to_the_image(monkeypatch):
    """Off the interpreter: BLOCK_P = the table's tile, at most the image's pixels (rounded up to a power of two),
    at least 16 (the K of the grad-W dot); num_warps = the table's."""
    monkeypatch.setattr(_utils, "is_interpret", lambda: False)
    for kind, table in _utils.GPU_TILES.items():
        for cp, (bp, nw) in table.items():
            assert _utils.block_pixels(cp, 1 << 20, kind, "tf32") == bp
            assert _utils.block_pixels(cp, 24, kind, "tf32") == min(bp, 32)  # 24 pixels: a 32-pixel tile
            assert _utils.block_pixels(cp, 4, kind, "tf32") == 16
            assert _utils.launch_options(cp, kind, "tf32")["num_warps"] == nw


def test_reduction_programs_per_sample_follow_programs_per_sm():
    """Programs per sample = ceil(programs_per_sm x SMs / batch), at most one per pixel tile, at least 1; off a GPU
    the device counts as one SM (launch_override's docstring). Without an override, off a GPU: one per tile."""
    cpu = torch.device("cpu")
    assert _utils.reduction_programs(batch=3, n_ptiles=10, device=cpu) == 10
    with _utils.launch_override(programs_per_sm=8):
        assert _utils.reduction_programs(batch=2, n_ptiles=100, device=cpu) == 4   # 8 x 1 SM / 2 samples
        assert _utils.reduction_programs(batch=3, n_ptiles=100, device=cpu) == 3   # ceil(8 / 3)
        assert _utils.reduction_programs(batch=2, n_ptiles=3, device=cpu) == 3     # clipped to the tiles
        assert _utils.reduction_programs(batch=64, n_ptiles=100, device=cpu) == 1  # at least one
        assert _utils.reduction_programs(batch=0, n_ptiles=100, device=cpu) == 8   # empty batch: no division by 0


def test_host_side_power_of_two_and_cdiv_match_tritons():
    """The launch wrappers' plain-Python next_power_of_2 / cdiv (Triton's are ConstexprFunctions costing
    microseconds per host call) give Triton's values."""
    import triton

    assert [_utils.next_power_of_2(n) for n in range(0, 70_000)] == [triton.next_power_of_2(n) for n in range(70_000)]
    assert all(_utils.cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 600) for b in range(1, 70))


# ------------------------------------------------------------------------------ the coupling networks' kernels
def test_network_sweep_every_candidate_matches_the_default(tmp_path):
    from glowfast.kernels.coupling_net import uses_flat_k, uses_flat_wgrad, wgrad_tile

    """--networks: every launch kind of glowfast.kernels.coupling_net at every candidate tile gives the default
    tile's outputs (a small hidden width and image keep the interpreter quick; on a GPU, one launch kind)."""
    launches = tune.NETWORK_LAUNCHES if KERNEL_DEVICE == "cpu" else ("conv_out",)
    rc = tune.main(["--networks", "--device", KERNEL_DEVICE, "--shapes", "1x4x2x3", "--hidden", "24",
                    "--kernels", ",".join(launches), "--rounds", "1", "--iterations", "1", "--out", str(tmp_path)])
    records = json.loads((tmp_path / "tune.json").read_text())["records"]
    assert rc == 0
    for launch in launches:
        got = [r for r in records if r["mode"] == launch]
        first = tune.network_candidates(launch, (1, 4, 2, 3), 24)
        assert [tuple(r["tile"]) for r in got[:len(first)]] == first
        # then the fastest NETWORK_STAGE_TOP at each deeper pipeline
        second = [tuple(r["tile"]) for r in got[len(first):] if "flat_k" not in r]
        assert len(second) == tune.NETWORK_STAGE_TOP * len(tune.NETWORK_STAGES)
        assert sorted({t[4] for t in second}) == list(tune.NETWORK_STAGES)
        fastest = sorted(got[:len(first)], key=lambda r: r["us"])[:tune.NETWORK_STAGE_TOP]
        assert {t[:4] for t in second} == {tuple(r["tile"][:4]) for r in fastest}
        # then the other K order: for a conv at the fastest tile of all; for a weight gradient that runs flat, the
        # tap-by-tap kernel at its own default tile
        third = [r for r in got if "flat_k" in r]
        cin, cout = tune.network_channels(launch, (1, 4, 2, 3), 24)
        if launch.startswith("conv"):
            best = min(got[:-1], key=lambda r: r["us"])
            assert third == [got[-1]] and third[0]["tile"] == best["tile"]
            assert third[0]["flat_k"] == (not uses_flat_k(cin, best["tile"][2]))
        elif uses_flat_wgrad(cin):
            assert third == [got[-1]] and third[0]["flat_k"] is False
            assert tuple(third[0]["tile"]) == wgrad_tile(cin, cout, 6, flat=False)
        else:
            assert third == []
        assert all(r["match"] and "error" not in r and r["us"] > 0 for r in got), got
    assert any(uses_flat_wgrad(tune.network_channels(launch, (1, 4, 2, 3), 24)[0]) for launch in launches
               if launch.startswith("wgrad")) == (KERNEL_DEVICE == "cpu")  # the flat kind ran (CPU: all launches)
    table = (tmp_path / "tune.md").read_text()
    assert all(f"| coupling_net/{launch} | B1_C4_2x3 |" in table for launch in launches)


def test_network_candidates_start_with_the_default_and_have_no_duplicates():
    from glowfast.kernels.coupling_net import conv_tile, uses_flat_wgrad, wgrad_tile

    for launch in tune.NETWORK_LAUNCHES:
        for shape in tune.CIFAR_SHAPES:
            cands = tune.network_candidates(launch, shape)
            b, _, h, w = shape
            cin, cout = tune.network_channels(launch, shape)
            default = conv_tile(cin, cout, b * h * w) if launch.startswith("conv") else \
                wgrad_tile(cin, cout, b * h * w, uses_flat_wgrad(cin))  # the tile the wrapper launches
            assert cands[0] == default and len(set(cands)) == len(cands) > 1
            for *blocks, warps, stages in cands[1:]:
                assert all(v >= 16 and v & (v - 1) == 0 for v in blocks) and warps in tune.NUM_WARPS
                assert stages == 1


@pytest.mark.parametrize("tile", [(8, 64, 16, 4), (64, 96, 16, 4), (64, 64, 16, 3), (64, 64, 16),
                                  (64, 64, 16, 4, 0), (64, 64, 16, 4, 5), (64, 64, 16, 4, 2, 1)])
def test_network_tile_override_rejects_bad_tiles(tile):
    from glowfast.kernels.coupling_net import tile_override

    with pytest.raises(ValueError, match="powers of two"), tile_override(conv=tile):
        pass


def test_network_tile_override_applies_inside_and_is_restored_after_an_error():
    from glowfast.kernels.coupling_net import conv_tile, tile_override, wgrad_tile

    before = conv_tile(16, 512, 4096), wgrad_tile(16, 512, 4096)
    with pytest.raises(RuntimeError, match="boom"), tile_override(conv=(32, 64, 16, 2)):
        # a 4-tuple is one pipeline stage
        assert conv_tile(16, 512, 4096) == (32, 64, 16, 2, 1) and wgrad_tile(16, 512, 4096) == before[1]
        with tile_override(wgrad=(16, 32, 64, 4, 3)):
            assert wgrad_tile(16, 512, 4096) == (16, 32, 64, 4, 3) and conv_tile(16, 512, 4096)[4] == 1
        raise RuntimeError("boom")
    assert (conv_tile(16, 512, 4096), wgrad_tile(16, 512, 4096)) == before
