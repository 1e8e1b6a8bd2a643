"""Run named checks in WORLD spawned gloo processes and collect, per rank, which passed (used by the distributed
tests). A file rendezvous in ``out_dir``: no port to pick, so no race with other jobs on the machine."""
import json
import os
import sys
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_checks(rank: int, world: int, out_dir: str, checks) -> None:
    """Inside a worker: join the group, run every ``name -> fn(rank)`` of ``checks``, write rank<r>.json with "ok" or
    the traceback per name (also when a check hangs the group or raises outside its own try), then leave the process
    without interpreter finalization (below)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(out_dir, "rendezvous"), rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    results = {}
    try:
        for name, check in checks.items():
            try:
                check(rank)
                results[name] = "ok"
            except (Exception, pytest.fail.Exception):   # pytest.raises/fail raise a BaseException
                results[name] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()
    # A worker has now and then died with "terminate called without an active exception" (SIGABRT), which errored
    # every test of its module: seen twice in this project's CI runs, the second under torch 2.11. That message is
    # std::terminate from a std::thread destroyed while joinable, the likely place being interpreter finalization,
    # which tears down what torch still holds after destroy_process_group (device meshes' cached groups, work
    # handles) while gloo threads may be alive. So the worker skips finalization: its results are on disk, a failing
    # check is reported through them, and a failure before this line still exits non-zero.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(worker, out_dir: str, world: int, timeout_s: float):
    """Start ``worker(rank, out_dir)`` on ``world`` processes, wait at most ``timeout_s`` (a hang fails the module
    instead of blocking CI) and return the per-rank result dicts. A worker that exits non-zero raises torch's
    ProcessExitedException / ProcessRaisedException, whose message names the rank and the exit code or signal."""
    ctx = mp.spawn(worker, args=(out_dir,), nprocs=world, join=False)
    try:
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed workers did not finish in {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    per_rank = []
    for r in range(world):
        with open(os.path.join(out_dir, f"rank{r}.json")) as f:
            per_rank.append(json.load(f))
    return per_rank


def local_slice(full, dt):
    """The part of ``full`` this rank holds for a DTensor laid out like ``dt`` (sharded on <= 1 mesh dim)."""
    from fusedecay import distributed as fd
    for mesh_dim, pl in enumerate(dt.placements):
        if pl.is_shard():
            sizes = fd._chunk_sizes(full.shape[pl.dim], dt.device_mesh.size(mesh_dim))
            r = dt.device_mesh.get_local_rank(mesh_dim)
            return full.narrow(pl.dim, sum(sizes[:r]), sizes[r])
    return full
