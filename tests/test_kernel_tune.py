"""The block-size sweep (glowfast.kernels.tune) and the launch override it measures with.

The sweep's own output check is what makes its timings trustworthy on a GPU: every candidate tile must give
the default tile's numbers. Here it runs where the kernels run (CPU interpreter in CI, CUDA on a GPU) at
tiny shapes, so each kernel is launched with several tile sizes and warp counts and compared.
"""

import json

import pytest
import torch

from glowfast.kernels import _utils, tune
from glowfast.kernels.coupling import coupling_block_pixels

from conftest import KERNEL_DEVICE

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


def test_markdown_reports_a_mismatching_candidate():
    base = dict(kernel="coupling", mode="fwd", shape=[2, 6, 8, 8], bytes=100, us=10.0, GBps=1.0)
    records = [dict(base, block_p=64, num_warps=4, default=True, max_rel_diff=0.0, match=True),
               dict(base, block_p=16, num_warps=4, default=False, max_rel_diff=0.5, match=False, us=1.0),
               dict(base, block_p=32, num_warps=4, default=False, max_rel_diff=0.0, match=True, us=5.0)]
    table = tune.markdown(records, "test")
    row = next(line for line in table.splitlines() if line.startswith("| coupling/fwd"))
    assert "(32, 4)" in row and "2.00x" in row  # the faster mismatching (16, 4) is never "best"
    assert "(16, 4): max rel diff 5.00e-01" in table
