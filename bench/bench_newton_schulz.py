"""Newton–Schulz throughput: per-layer reference loop vs batched (and the Triton symmetric kernel on GPU).

Writes JSON rows (one per kernel × backend × shape set) with the median time, TFLOP/s and % of a
matmul peak measured in the same run (bf16 on GPU, fp32 on CPU).

    python bench/bench_newton_schulz.py                 # GPU: 768…8192 squares + GPT-2 124M shapes
    python bench/bench_newton_schulz.py --cpu-small     # CPU: scaled-down sizes (auto on a GPU-less machine)

GPU timings: triton.testing.do_bench (median). CPU: time.perf_counter, median of --reps runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))

import torch  # noqa: E402

import run_info  # noqa: E402  (bench/run_info.py)
from fusedecay.newton_schulz import newton_schulz_batched, ns_flops  # noqa: E402
from fusedecay.reference.scion import newton_schulz  # noqa: E402

GPT2_LAYER = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]   # qkv, attn proj, mlp fc, mlp proj (out, in)


# ---------------------------------------------------------------------------------------------- shared helpers

def environment(device: torch.device) -> dict:
    """Device, versions and commit for every row (the same facts as the step benchmark's rows)."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU: {run_info.cpu_model()}, {torch.get_num_threads()} threads"
        try:
            name += f", load average {os.getloadavg()[0]:.1f} at start"
        except OSError:
            pass
    return dict(device=name, torch=torch.__version__, triton=triton_version, git_commit=run_info.git_commit(),
                python=platform.python_version())


def time_all(fns: dict, device: torch.device, reps: int = 10, warmup: int = 2) -> dict:
    """name → median ms. GPU: do_bench each. CPU: rounds that run every fn once, so a shared machine's
    load changes hit all candidates alike; median over the rounds."""
    if device.type == "cuda":
        import triton.testing
        return {k: float(triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")) for k, f in fns.items()}
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_matmul(device: torch.device, n: int):
    """(fn, flops, dtype name): a dense n×n matmul (bf16 on GPU, fp32 on CPU), timed beside each
    candidate as the run's 100% line."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return (lambda: a @ b), 2 * n ** 3, str(dtype).replace("torch.", "")


def write_rows(rows, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {len(rows)} rows to {path}")


def pick_device(args) -> torch.device:
    if args.device:
        return torch.device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------- NS benchmark

def shape_sets(small: bool):
    """name → list of (d_out, d_in) matrices."""
    if small:
        sets = {f"square-{n}": [(n, n)] for n in (128, 256, 512, 768)}
        k = 4   # GPT-2 dims / 4, 12 layers: same shape mix and batch sizes, 64× fewer FLOPs
        sets["gpt2-124m/4 (12 layers)"] = [(a // k, b // k) for a, b in GPT2_LAYER] * 12
    else:
        sets = {f"square-{n}": [(n, n)] for n in (768, 1024, 2048, 4096, 8192)}
        sets["gpt2-124m (12 layers)"] = GPT2_LAYER * 12
    return sets


def set_flops(shapes, steps: int) -> int:
    return sum(ns_flops(min(s), max(s), steps) for s in shapes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-small", action="store_true", help="scaled-down sizes (default on a machine without CUDA)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--ns", default="classic", choices=["classic", "polar_express"])
    ap.add_argument("--reps", type=int, default=7, help="CPU repetitions (median)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/newton_schulz_<device>.json)")
    args = ap.parse_args()
    device = pick_device(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    small = args.cpu_small or device.type != "cuda"
    env = environment(device)
    peak_n = 4096 if device.type == "cuda" else 1024
    peak_fn, peak_flops, peak_dtype = peak_matmul(device, peak_n)
    ns_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []

    def emit(kernel, set_name, shapes, times, flops):
        peak = peak_flops / (times.pop("peak") * 1e-3) / 1e12
        for backend, ms in times.items():
            tf = flops / (ms * 1e-3) / 1e12
            r = dict(kernel=kernel, backend=backend, shape_set=set_name, shapes=[list(s) for s in sorted(set(shapes))],
                     n_matrices=len(shapes), dtype=str(ns_dtype).replace("torch.", ""), ns=args.ns,
                     ns_steps=args.steps, median_ms=round(ms, 4), tflops=round(tf, 4),
                     pct_of_peak=round(100 * tf / peak, 2), peak_tflops=round(peak, 4), peak_dtype=peak_dtype,
                     peak_n=peak_n, **env)
            rows.append(r)
            print(f"{kernel:14s} {backend:26s} {set_name:26s} {ms:10.3f} ms {tf:8.4f} TFLOP/s "
                  f"{r['pct_of_peak']:6.1f}% of {peak:.4f}")

    g = torch.Generator().manual_seed(0)
    for set_name, shapes in shape_sets(small).items():
        mats = [torch.randn(s, generator=g).to(device) for s in shapes]
        fns = {"peak": peak_fn,
               "reference-per-layer": lambda: [newton_schulz(m, args.steps, args.ns, ns_dtype) for m in mats]}
        if device.type == "cpu":
            fns["batched-exact"] = lambda: newton_schulz_batched(mats, args.steps, args.ns, ns_dtype, exact=True)
        fns["batched-fused"] = lambda: newton_schulz_batched(mats, args.steps, args.ns, ns_dtype, exact=False)
        if device.type == "cuda":
            fns["batched-fused+triton-sym"] = lambda: newton_schulz_batched(mats, args.steps, args.ns, ns_dtype,
                                                                            symmetric_min_rows=0)
        emit("newton_schulz", set_name, shapes, time_all(fns, device, args.reps), set_flops(shapes, args.steps))

    if device.type == "cuda":   # the symmetric kernel alone: where does it beat bmm? (sets SYMMETRIC_MIN_ROWS)
        from fusedecay.triton_kernels.symmetric_matmul import symmetric_matmul
        crossover = None
        for n in (256, 512, 768, 1024, 2048, 4096, 8192):
            x = torch.randn(4, n, n, device=device, dtype=ns_dtype)
            t = time_all({"peak": peak_fn, "torch.bmm": lambda: torch.bmm(x, x.mT),
                          "triton-symmetric": lambda: symmetric_matmul(x)}, device)
            if crossover is None and t["triton-symmetric"] < t["torch.bmm"]:
                crossover = n
            emit("x_xT", f"4x{n}x{n}", [(n, n)] * 4, t, 2 * 4 * n ** 3)
        print(f"symmetric kernel first beats bmm at n = {crossover} "
              f"(set FUSEDECAY_SYMMETRIC_MIN_ROWS={crossover} to use it from there)")

    # GPU files carry the device name (an H100 run and an H200 run must not overwrite each other).
    tag = run_info.slug(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu"
    write_rows(rows, args.out or os.path.join(HERE, "results", f"newton_schulz_{tag}.json"))


if __name__ == "__main__":
    main()
