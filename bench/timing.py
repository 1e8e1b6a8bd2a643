"""How one benchmark case is timed (shared by the step and copy benchmarks).

* The timed call is the operation itself plus, on GPU, ``torch.cuda.synchronize()`` inside the call,
  so the wall-clock time pytest-benchmark records covers the kernels, not only their launch.
* Warm-up rounds first (allocator, Triton compilation, caches of torch's foreach grouping), then many
  rounds of one call each; the figure reported is the median round.
* On GPU the same operation is then timed again with CUDA events (one event pair per call, no host
  sync between calls); that median goes into the row beside the wall-clock one as a cross-check.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Dict, Optional

import torch


def rounds_for(device: torch.device, slow: bool = False) -> int:
    """Rounds per case: ``FUSEDECAY_BENCH_ROUNDS`` if set; else 200 on GPU, 25 on CPU (8 for slow cases)."""
    if os.environ.get("FUSEDECAY_BENCH_ROUNDS"):
        n = int(os.environ["FUSEDECAY_BENCH_ROUNDS"])
        return max(3, n // 3) if slow else n
    if device.type == "cuda":
        return 200
    return 8 if slow else 25


def warmup_for(device: torch.device, slow: bool = False) -> int:
    return 2 if slow else (20 if device.type == "cuda" else 3)


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    if device.type != "cuda":
        return fn

    def call():
        fn()
        torch.cuda.synchronize(device)
    return call


def cuda_event_median_ms(fn: Callable[[], object], rounds: int) -> float:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
    torch.cuda.synchronize()
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def run_case(benchmark, fn: Callable[[], object], device: torch.device, *, slow: bool = False) -> Dict[str, float]:
    """Time ``fn`` under pytest-benchmark; returns extra figures to put in ``extra_info``."""
    rounds, warmup = rounds_for(device, slow), warmup_for(device, slow)
    benchmark.pedantic(synced(fn, device), rounds=rounds, warmup_rounds=warmup, iterations=1)
    extra: Dict[str, float] = {"rounds": rounds, "warmup_rounds": warmup}
    if device.type == "cuda":
        extra["cuda_event_median_ms"] = cuda_event_median_ms(fn, rounds)
    return extra


def median_ms(fn: Callable[[], object], device: torch.device, rounds: Optional[int] = None,
              warmup: Optional[int] = None) -> float:
    """The same measurement without pytest (for the scripts' own command lines)."""
    rounds = rounds or rounds_for(device)
    call = synced(fn, device)
    for _ in range(warmup if warmup is not None else warmup_for(device)):
        call()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3
