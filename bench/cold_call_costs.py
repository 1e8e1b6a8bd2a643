"""What a few per-step Python/torch calls cost with cold caches, each timed alone around an empty body: what
fusedecay/_step_wrapper.py and the CPU path of fusedecay.functional avoid or replace, and, for scale, one trivial
ATen op and one trivial fusedecay op (the floor of any op call made after the caches were overwritten).

    python bench/cold_call_costs.py            # 512 MiB written before each call, median of 25, µs

"cold": 512 MiB of other memory were written just before the call (as a training step's forward and backward do);
"warm": the same call again right after. Prints a Markdown table; writes nothing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--flush-mib", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.rounds < 1 or a.flush_mib < 1:
        ap.error("--rounds and --flush-mib must be at least 1")
    torch.set_num_threads(a.threads)
    flush = torch.empty(a.flush_mib * (1 << 20) // 4)
    cpu = torch.device("cpu")

    def record_function():
        with torch.autograd.profiler.record_function("Optimizer.step#X.step"):
            pass

    def no_grad():
        with torch.no_grad():
            pass

    def set_grad_enabled():   # what the step wrapper does instead
        prev = torch._C.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            pass
        finally:
            torch._C._set_grad_enabled(prev)

    def profiler_check():     # the step wrapper's test for an active profiler
        return torch.autograd.profiler._is_profiler_enabled or torch._C._autograd._profiler_enabled()

    cases = [("empty function", lambda: None),
             ("record_function(...) around nothing (torch's step wrapper)", record_function),
             ("torch.no_grad() around nothing", no_grad),
             ("torch._C._set_grad_enabled off and back", set_grad_enabled),
             ("profiler check (_is_profiler_enabled or _profiler_enabled())", profiler_check),
             ("torch.compiler.is_compiling()", torch.compiler.is_compiling),
             ("torch.empty(52) (the per-step abs_sums tensor)", lambda: torch.empty(52, dtype=torch.float32,
                                                                                      device=cpu))]
    counter = torch.zeros(())
    cases.append(("counter.add_(1) on a 0-d tensor (one ATen op)", lambda: counter.add_(1)))
    try:
        from fusedecay import _cpp_backend  # noqa: F401  (registers torch.ops.fusedecay)
        steps = [torch.zeros(())]
        inc = torch.ops.fusedecay._increment_steps_
        cases.append(("torch.ops.fusedecay._increment_steps_ of one 0-d tensor (one fusedecay op)", lambda: inc(steps)))
    except ImportError as e:   # no compiled CPU kernels: the row is left out
        print(f"(fusedecay op row left out: {e})")
    print(f"{a.threads} threads, {a.flush_mib} MiB written before each cold call, medians of {a.rounds}, µs")
    print()
    print("| call | cold | warm |")
    print("|---|---:|---:|")
    for name, fn in cases:
        cold, warm = [], []
        for _ in range(a.rounds):
            flush.fill_(1.0)
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            fn()
            t2 = time.perf_counter()
            cold.append(t1 - t0)
            warm.append(t2 - t1)
        print(f"| {name} | {statistics.median(cold) * 1e6:.1f} | {statistics.median(warm) * 1e6:.1f} |")


if __name__ == "__main__":
    main()
