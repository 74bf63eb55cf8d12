"""Worker for tests/test_fsdp.py (run by torch.distributed.run, 2 CPU processes, gloo): the sharded Checkpointer
on a small fully_shard model. Checks, on every rank: a save whose shard write fails on one rank leaves no
step-* folder and the last good checkpoint loads (weights, AdamW moments, scheduler, RNG) exactly; a checkpoint
of another model is refused naming the parameters. Writes OUT/ok-rank{R} when every check passed."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from attn_mod.trainers.checkpoint import Checkpointer


def build(extra: bool = False):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    if extra:
        m.add_module("extra", torch.nn.Linear(4, 4))
    m[1].requires_grad_(False)
    for layer in m:
        if any(p.numel() for p in layer.parameters()):
            fully_shard(layer)
    fully_shard(m)
    opt = torch.optim.AdamW(m.parameters(), lr=0.05)
    return m, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))


def train(m, opt, sched, steps, rank):
    for _ in range(steps):
        x = torch.randn(5, 6) + rank
        m(x).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def snapshot(m, opt):
    full = {n: p.full_tensor().clone() for n, p in m.named_parameters()}
    moments = {n: opt.state[p]["exp_avg"].full_tensor().clone() for n, p in m.named_parameters()}
    return full, moments


def main(out: Path):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ck = Checkpointer(out / "ck", keep=2, rank=rank, barrier=dist.barrier, sharded=True)
    m, opt, sched = build()
    train(m, opt, sched, 2, rank)
    ck.save(2, model=m, optimizer=opt, scheduler=sched, samples_seen=2, metrics=[{"step": 2}], config={})
    want, want_moments = snapshot(m, opt)
    want_lr, want_rng = sched.get_last_lr(), torch.get_rng_state()
    train(m, opt, sched, 1, rank)

    import torch.distributed.checkpoint.filesystem as fs

    real = fs._write_files_from_queue

    def failing(*args, **kwargs):
        raise OSError("disk full")

    if rank == 1:  # only one rank's shard write fails; DCP reports it to every rank
        fs._write_files_from_queue = failing
    try:
        ck.save(3, model=m, optimizer=opt, scheduler=sched, samples_seen=3, metrics=[], config={})
        raise AssertionError("the failed save did not raise")
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException derives from BaseException
        assert type(e).__name__ == "CheckpointException" and "disk full" in str(e), repr(e)
    finally:
        fs._write_files_from_queue = real
    dist.barrier()
    assert [p.name for p in ck.list()] == ["step-0000002"], ck.list()  # the interrupted write is invisible

    torch.manual_seed(123)  # disturb the RNG; load restores this rank's state
    m2, opt2, sched2 = build()
    train(m2, opt2, sched2, 1, rank)  # optimizer state exists, different values
    state = ck.load(ck.latest(), model=m2, optimizer=opt2, scheduler=sched2)
    got, got_moments = snapshot(m2, opt2)
    assert state.step == 2 and state.sharded and state.metrics == [{"step": 2}]
    assert all(torch.equal(got[n], want[n]) for n in want), "weights"
    assert all(torch.equal(got_moments[n], want_moments[n]) for n in want), "AdamW moments"
    assert sched2.get_last_lr() == want_lr and torch.equal(torch.get_rng_state(), want_rng)
    assert all(p.to_local().numel() < p.numel() for p in m2.parameters() if p.numel() > 1)  # still sharded

    m3, opt3, sched3 = build(extra=True)
    try:
        ck.load(ck.latest(), model=m3, optimizer=opt3, scheduler=sched3)
        raise AssertionError("a checkpoint of another model loaded")
    except ValueError as e:
        assert "missing ['extra.bias', 'extra.weight']" in str(e), str(e)
    ck.save(4, model=m2, optimizer=opt2, scheduler=sched2, samples_seen=4, metrics=[], config={})
    assert [p.name for p in ck.list()] == ["step-0000002", "step-0000004"]
    assert not list((out / "ck").glob(".tmp-*"))  # the next save cleared the failed temporary folder
    (out / f"ok-rank{rank}").write_text("ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
