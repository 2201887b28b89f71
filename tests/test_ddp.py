"""Multi-process training (DDP, gloo on CPU): identical parameters on every rank after ActNorm's
data-dependent init and after optimisation steps; the torchrun command line end to end."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from glowfast.checkpoint import LAST, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "-K", "2", "-L", "2", "--hidden-channels", "16", "--batch-size", "32",
        "--init-batch-size", "32", "--warmup-steps", "2", "--log-interval", "2", "--temperatures", "0.7",
        "--n-samples", "4", "--threads", "1", "--no-progress", "--device", "cpu", "--backend", "reference"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def _worker(rank: int, world: int, port: int, out: str, argv: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from glowfast.train import main

    record = {}

    def cb(event, trainer):
        if event == "start":
            record["init"] = _flat(trainer.model)
            record["actnorm_bias"] = trainer.model.levels[0].steps[0].actnorm.bias.detach().clone()
        elif event == "before_step" and trainer.step == 0:
            record["first_batch"] = trainer.batch[0].clone()
            # this rank's own bits/dim of the first step: the same forward with the same noise (RNG restored)
            rng = torch.get_rng_state()
            with torch.no_grad():
                record["local_bpd_step1"] = trainer.model(trainer.batch[0]).bits_per_dim.mean().item()
            torch.set_rng_state(rng)
        elif event == "before_step" and trainer.step == 1 and rank == 1:
            # a non-finite loss on one rank only: every rank must skip that update together
            record["top0"] = trainer.model.prior.top.data[0].item()
            trainer.model.prior.top.data[0] = float("inf")
        elif event == "after_step" and trainer.step == 2 and rank == 1:
            trainer.model.prior.top.data[0] = record.pop("top0")
        elif event == "after_step" and trainer.step == 3:
            record["step3"] = _flat(trainer.model)
        elif event == "end":
            record["final"] = _flat(trainer.model)
            record["ema"] = torch.cat([t.reshape(-1) for t in trainer.ema.shadow])
            record["test_bpd"] = trainer.last_test_bpd
            record["nonfinite_total"] = trainer.nonfinite_total

    rc = main(argv, callbacks=[cb])
    record["rc"] = rc
    torch.save(record, Path(out) / f"rank{rank}.pt")


def test_ddp_two_gloo_ranks_stay_identical(tmp_path):
    run = tmp_path / "run"
    argv = TINY + ["--steps", "5", "--eval-interval", "5", "--ema-decay", "0.9", "--run-dir", str(run)]
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), argv), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["rc"] == r1["rc"] == 0
    assert not torch.equal(r0["first_batch"], r1["first_batch"]), "each rank must see its own data shard"
    assert not torch.equal(r0["actnorm_bias"], torch.zeros_like(r0["actnorm_bias"])), "ActNorm was initialised"
    for key in ("init", "step3", "final", "ema"):  # the weights' moving average too (--ema-decay)
        assert torch.equal(r0[key], r1[key]), f"parameters differ across ranks at {key}"
    assert not torch.equal(r0["ema"], r0["final"])
    assert not torch.equal(r0["init"], r0["final"]), "training changed the parameters"
    assert r0["nonfinite_total"] == r1["nonfinite_total"] == 1
    assert r0["test_bpd"] == r1["test_bpd"]  # all-reduced over the whole test split
    # the logged training bits/dim are the mean over the ranks' shards (they were rank 0's): the record at step 2
    # holds step 1 only, since step 2 was skipped (non-finite on rank 1)
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in train if r["type"] == "train" and r["step"] == 2)["bpd"]
    assert abs(r0["local_bpd_step1"] - r1["local_bpd_step1"]) > 1e-4  # the shards differ
    assert logged == pytest.approx((r0["local_bpd_step1"] + r1["local_bpd_step1"]) / 2, abs=1e-6)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 5
    ckpt = load_checkpoint(run / "checkpoints" / LAST)
    assert len(ckpt["rng"]) == 2  # one RNG state per rank, restored per rank on resume
    params = dict(ckpt["model"])
    from glowfast.sample import load_model

    model = load_model(ckpt, torch.device("cpu"), "reference", raw_weights=True)
    assert torch.equal(_flat(model), r0["final"]) and params
    assert torch.equal(_flat(load_model(ckpt, torch.device("cpu"), "reference")), r0["ema"])  # the average
    assert not (tmp_path / "run" / "rank1").exists()


def test_torchrun_cli_two_processes(tmp_path, capsys):
    run = tmp_path / "tr"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "glowfast.train", *TINY, "--steps", "4", "--eval-interval", "2",
           "--run-dir", str(run)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "broadcast_buffers" not in out.stderr  # torch >= 2.14 deprecates it with a warning from every rank
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed" and summary["step"] == 4
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["world_size"] == 2
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["type"] == "eval"] == [2, 4]  # one writer: no duplicated lines
    # resume the 2-process run to step 6
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "glowfast.train", "--resume", str(run), "--steps", "6", "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert load_checkpoint(run / "checkpoints" / LAST)["step"] == 6
    assert "note: this run was trained with" not in out.stderr  # the same world size: the same run
    # resumed by one process: allowed, but no longer the same run, and it says so (it was silent: an API audit)
    from glowfast.train import main

    capsys.readouterr()
    assert main(["--resume", str(run), "--steps", "7", "--no-progress"]) == 0
    assert ("note: this run was trained with 2 process(es) and resumes with 1: the global batch"
            in capsys.readouterr().err)


def _spawn_within(fn, args, nprocs: int, seconds: float) -> None:
    """mp.spawn that fails (and kills the workers) instead of hanging when a rank waits forever."""
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.time() + seconds
    while not ctx.join(timeout=2):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ranks still running after {seconds} s (one is waiting for the others)")


def _rc_worker(rank: int, world: int, port: int, out: str, argv: list[str], sigint_rank: int, sigint_step: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from glowfast.train import main

    def cb(event, trainer):
        if event == "start":
            signal.signal(signal.SIGINT, signal.default_int_handler)  # fit() defers Python's default handler
        if event == "before_step" and rank == sigint_rank and trainer.step == sigint_step:
            os.kill(os.getpid(), signal.SIGINT)

    rc = main(argv, callbacks=[cb])
    torch.save({"rc": rc}, Path(out) / f"rc{rank}.pt")


def test_ddp_every_rank_refuses_an_occupied_run_folder_and_stops_together_on_ctrl_c(tmp_path):
    """Ctrl-C on rank 1 only, in step 3: both ranks finish step 3, write one checkpoint there and exit 130 (the
    stop request travels in the step's all-reduce). Then a fresh run into the same folder: both ranks refuse
    (exit 2); only rank 0 used to, leaving rank 1 waiting in a collective."""
    run = tmp_path / "run"
    argv = TINY + ["--steps", "8", "--eval-interval", "100", "--ckpt-interval", "100", "--run-dir", str(run)]
    _spawn_within(_rc_worker, (2, _free_port(), str(tmp_path), argv, 1, 2), 2, 240)
    assert [torch.load(tmp_path / f"rc{r}.pt")["rc"] for r in (0, 1)] == [130, 130]
    assert load_checkpoint(run / "checkpoints" / LAST)["step"] == 3
    _spawn_within(_rc_worker, (2, _free_port(), str(tmp_path), argv, -1, -1), 2, 240)
    assert [torch.load(tmp_path / f"rc{r}.pt")["rc"] for r in (0, 1)] == [2, 2]
    assert load_checkpoint(run / "checkpoints" / LAST)["step"] == 3



def test_resumable_sampler_skips_this_ranks_batches_only():
    """set_position(epoch, batches_done, batch_size) drops the batches_done * batch_size indices this rank has
    already used (its own share of the epoch's permutation), not the other ranks' as well; no process group
    needed: the sampler takes num_replicas and rank."""
    from torch.utils.data.distributed import DistributedSampler

    from glowfast.distributed import ResumableDistributedSampler

    data = list(range(40))
    for rank in (0, 1):
        reference = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=3, drop_last=True)
        reference.set_epoch(1)
        full = list(reference)
        sampler = ResumableDistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=3)
        sampler.set_position(1, 2, 4)
        assert list(sampler) == full[8:] and len(sampler) == len(full) - 8 == 12
