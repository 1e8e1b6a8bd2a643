"""Run many (optimizer, seed, hyperparameters) jobs, in this process or in a pool of worker processes.

A job trains one model and then measures it (weight statistics, magnitude pruning, the claim measures). The
jobs are independent, so on a CPU they run side by side: the tiny model's matmuls do not keep two threads
busy (one process with 2 threads is ~1.2× faster than with 1), while two single-thread processes nearly
double the throughput. On CUDA they run one after another in this process. Results do not depend on the
order in which jobs finish; they can depend on the number of CPU threads per run (the matmul reductions
split differently), which the metrics record.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .corpus import Corpus, load_corpus, val_batches
from .measures import run_measures
from .. import param_roles
from .model import GPTConfig
from .optimizers import LABELS, Hyper, describe
from .prune import pruned_losses, weight_stats
from .train import evaluate, train_one


SLOW_ON_CPU = ("scionc", "scion")


@dataclass(frozen=True)
class RunConfig:
    """Everything a job needs besides its optimizer, seed and hyperparameters."""
    model: GPTConfig
    steps: int
    batch_size: int
    seq_len: int
    eval_every: int
    val_batches: int
    device: str
    corpus_dir: Optional[str]
    layer_sparsities: Tuple[float, ...]
    global_sparsities: Tuple[float, ...]


@dataclass(frozen=True)
class Job:
    name: str      # optimizer
    seed: int
    hp: Hyper


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        return os.cpu_count() or 1


def scion_target_ratio(model, norm_target: float) -> float:
    """Mean over block matrices of ‖θ‖_F² / (C²·‖spectral lmo‖_F²), with ‖lmo‖_F² = (d_out/d_in)·min(d_out,
    d_in); 1 is ScionC's steady state."""
    ratios = []
    for _, p in param_roles(model)["hidden"]:
        d_out, d_in = p.shape
        ratios.append(float(p.detach().double().square().sum()) / (norm_target * d_out / d_in * min(d_out, d_in)))
    return sum(ratios) / len(ratios)


def run_job(rc: RunConfig, job: Job, corpus: Corpus, progress: bool) -> Dict:
    """Train ``job``'s model and measure it; returns its history with the measures under "measures"."""
    device = torch.device(rc.device)
    val_set = [(x.to(device), y.to(device)) for x, y in val_batches(corpus.val, rc.batch_size, rc.seq_len,
                                                                      rc.val_batches)]
    model, hist = train_one(job.name, rc.model, job.hp, corpus.train, val_set, steps=rc.steps,
                            batch_size=rc.batch_size, seq_len=rc.seq_len, seed=job.seed,
                            eval_every=rc.eval_every, device=device, progress=progress)
    hist["seed"] = job.seed
    hist["hyperparameters"] = describe(job.name, job.hp)
    hist["weights"] = weight_stats(model)
    ev = lambda m: evaluate(m, val_set)  # noqa: E731
    hist["pruning"] = pruned_losses(model, ev, rc.layer_sparsities, ("layer",))
    hist["pruning"].update(pruned_losses(model, ev, rc.global_sparsities, ("global",)))
    if job.name == "scionc":
        hist["norm_target_ratio"] = scion_target_ratio(model, job.hp.scion_norm_target)
    hist["measures"] = run_measures(hist, job.hp.warmup_frac)
    return hist


# Worker-process state: the corpus is read once per worker, not once per job.
_WORKER: Dict[str, object] = {}


def _init_worker(rc: RunConfig, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["rc"] = rc
    _WORKER["corpus"] = load_corpus(Path(rc.corpus_dir) if rc.corpus_dir else None, min_bytes=rc.seq_len + 2)


def _worker_job(job: Job) -> Dict:
    return run_job(_WORKER["rc"], job, _WORKER["corpus"], progress=False)


def _done_line(i: int, n: int, job: Job, hist: Dict, t0: float) -> str:
    return (f"[{i}/{n}] {LABELS[job.name]} seed {job.seed}: val loss {hist['final_val_loss']:.4f} "
            f"({hist['wall_time_s']:.0f} s; {time.perf_counter() - t0:.0f} s elapsed)")


def run_jobs(rc: RunConfig, jobs: Sequence[Job], corpus: Corpus, workers: int, progress: bool) -> List[Dict]:
    """Histories of ``jobs`` in the order given. ``workers`` > 1 runs them in that many spawned processes with
    ``available_cpus() // workers`` torch threads each (CPU only)."""
    t0 = time.perf_counter()
    n = len(jobs)
    if workers <= 1 or n <= 1:
        out = []
        for i, job in enumerate(jobs, 1):
            out.append(run_job(rc, job, corpus, progress))
            print(_done_line(i, n, job, out[-1], t0), flush=True)
        return out
    threads = max(1, available_cpus() // workers)
    results: List[Optional[Dict]] = [None] * n
    ctx = multiprocessing.get_context("spawn")
    # The Scion family's steps cost more on a CPU (per-tensor Newton–Schulz): submitted first, so that the last
    # jobs, which run while other workers already idle, are the short ones.
    order = sorted(range(n), key=lambda k: jobs[k].name not in SLOW_ON_CPU)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(rc, threads)) as pool:
        futures = {pool.submit(_worker_job, jobs[k]): k for k in order}
        try:
            for i, fut in enumerate(as_completed(futures), 1):
                k = futures[fut]
                results[k] = fut.result()
                print(_done_line(i, n, jobs[k], results[k], t0), flush=True)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)   # a failed job stops the queued ones
            raise
    return results  # type: ignore[return-value]
