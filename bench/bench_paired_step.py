"""Paired step-time ratios: fusedecay vs torch ``AdamW(fused=True)``, interleaved round by round.

bench/test_bench_step.py (pytest-benchmark) times one case after the other, so a machine whose speed
drifts between cases (a shared VM's memory bandwidth, GPU clocks) moves the ratios: on the 2-core CI
box the same AdamHD kernel measured 0.74× and 1.15× torch fused in two runs. Here every round runs
one ``optimizer.step()`` of *every* candidate, in an order rotated from round to round, each timed on
its own; a candidate's ratio is taken within each round against the torch fused step of the same
round, and the figure is the median of those per-round ratios, with a bootstrap 95 % interval.

Before every timed call the host writes ``--flush-mib`` (default 512) MiB of other memory, untimed, so that every
candidate starts from the caches a training step finds after its forward and backward pass: neither the
optimizer's data nor its code (Python, dispatch, kernels) in them. Without it (``--flush-mib 0``) each candidate
found what the one before it in the rotation left: torch's step always came after the rmw reference, each of ours
after another fusedecay step, whose code was then still cached. At 20dd7a0 that made our ratios 8–13 % lower than
with the flush (docs/bench.md, bench/results/ab-flush/).

The same rounds also time two bandwidth references (fp32 buffers of 256 MiB on CPU, 1 GiB on GPU):
  * copy:  ``dst.copy_(src)``, 2 × bytes (read + write), the "copy bandwidth" of the issue;
  * rmw:   ``a.add_(b)``, 3 × bytes (read a, b, write a). On CPUs a copy's destination is also read
           (write-allocate) and that traffic is not counted, so copy GB/s under-states what a
           read-modify-write stream such as an optimizer step can reach; rmw moves memory the way
           the step does. On GPUs the two agree closely.
"% copy" / "% rmw" are per-round ratios of the step's GB/s (bytes an ideal fused step moves: 28 B/param
fp32, 14 B/param bf16, 16.1 B/param fp32 params with 8-bit state; see bench/to_results.py and
test_bench_step.moved_bytes_per_param) to the reference's GB/s in the same round.

State precision: every fusedecay kernel runs with full-precision moments ("32") and, with ``--state-bits``
including 8, with 8-bit moments (``state_bits=8``, docs/state8.md). "state B/param" is measured: the bytes of
every tensor in the optimizer's state (moments or codes + scales, step, μ) over the number of params.

``--sweep`` adds the time-vs-number-of-tensors runs: 1M fp32 params as 10 × 100k, 100 × 10k, 1000 × 1k and
4000 × 250 (``--sweep-counts``), where per-tensor host work and per-step launches weigh most.

    python bench/bench_paired_step.py                       # GPU: gpt2-124m; CPU: cpu-small
    python bench/bench_paired_step.py --rounds 60 --dtypes fp32,bf16 --param-set cpu-small
    python bench/bench_paired_step.py --dtypes fp32 --state-bits 32,8 --sweep

Writes bench/results/paired-<device>-<date>T<HHMM>.json (rows + run info) and .md. Asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))

import torch  # noqa: E402

BASELINE = ("adamw", "torch-fused")
KERNELS = ("adamhd-prox-ema", "adamhd-euler", "adamc")


def bootstrap_median_ci(xs: List[float], n_boot: int = 2000, seed: int = 0) -> Tuple[float, float]:
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n_boot))
    return meds[int(0.025 * n_boot)], meds[int(0.975 * n_boot) - 1]


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds for one call, the device idle before and drained after (wall clock around syncs)."""
    if device.type == "cuda":
        def run(fn):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            return time.perf_counter() - t0
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def bandwidth_refs(device: torch.device) -> Dict[str, Tuple[Callable[[], object], int]]:
    """copy and rmw references over fp32 buffers of bench/copy_bandwidth.py's size per device (256 MiB on
    CPU, 1 GiB on GPU: far past any last-level cache)."""
    from copy_bandwidth import DEFAULT_MIB
    n = DEFAULT_MIB.get(device.type, 256) * (1 << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    a = torch.randn(n, device=device)
    b = torch.randn(n, device=device)
    return {"copy": (lambda: dst.copy_(src), 2 * 4 * n), "rmw": (lambda: a.add_(b), 3 * 4 * n)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")
    ap.add_argument("--param-set", default=None, help="bench/param_sets.py name (default: gpt2-124m on GPU, "
                    "cpu-small on CPU)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16, bf16-fp32state")
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--state-bits", default="32,8", help="comma list of 32 and 8 (fusedecay kernels only)")
    ap.add_argument("--sweep", action="store_true", help="also the tensor-count sweep (fp32, 32-bit state)")
    ap.add_argument("--sweep-counts", default="10,100,1000,4000")
    ap.add_argument("--sweep-total", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--flush-mib", type=int, default=512,
                    help="host memory written before every timed call, untimed (0: none)")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    a = ap.parse_args()
    if a.device:
        os.environ["FUSEDECAY_BENCH_DEVICE"] = a.device

    import fusedecay  # noqa: F401
    import param_sets as PS
    import test_bench_step as TB  # the step benchmark's optimizer construction and state setup
    from run_info import run_info, slug

    dev = TB.DEVICE
    main_set = a.param_set or ("gpt2-124m" if dev.type == "cuda" else "cpu-small")
    rounds = a.rounds
    kernels = [k for k in a.kernels.split(",") if k]
    state_bits = [int(b) for b in a.state_bits.split(",") if b]
    run = timer(dev)
    if a.flush_mib < 0 or rounds < 1:
        ap.error("--flush-mib must be 0 or more, --rounds at least 1")
    flush = torch.empty(a.flush_mib * (1 << 20) // 4) if a.flush_mib else None
    info = run_info(dev)
    rows: List[dict] = []
    # (param set, dtype, state precisions of the fusedecay kernels)
    configs = [(main_set, dt, state_bits) for dt in a.dtypes.split(",") if dt]
    if a.sweep:
        configs += [(f"split-{a.sweep_total}-{n}", "fp32", [32]) for n in a.sweep_counts.split(",") if n]

    for ps_name, dt, bits_list in configs:
        shapes = PS.shapes(ps_name, dev.type)
        numel = PS.numel(shapes)
        param_dtype, moment_dtype, _ = TB.DTYPES[dt]
        # torch AdamW keeps moments in the param dtype: bf16 params + fp32 moments compare with fp32
        base_dt = "fp32" if dt == "bf16-fp32state" else dt
        # candidate key (kernel, backend, state bits) → (step, bytes moved per step, state bytes per param)
        cands: Dict[Tuple[str, str, int], Tuple[Callable[[], object], float, float]] = {}
        keep = []
        bp = PS.make_params(shapes, dev, TB.DTYPES[base_dt][0])
        base_opt = TB.make_optimizer(TB.Case(ps_name, base_dt, *BASELINE), bp)
        base_opt.step()
        TB.randomize_state(base_opt, bp, TB.DTYPES[base_dt][1])
        base_key = BASELINE + (32,)
        cands[base_key] = (base_opt.step, numel * TB.DTYPES[base_dt][2], TB.state_bytes_per_param(base_opt, bp))
        keep.append((base_opt, bp))
        for k in kernels:
            for b in TB.fusedecay_backends(numel, dt):
                if b == "reference":
                    continue  # an eager per-tensor loop: bench/test_bench_step.py times it
                for bits in bits_list:
                    params = PS.make_params(shapes, dev, param_dtype)
                    opt = TB.make_optimizer(TB.Case(ps_name, dt, k, b), params, state_bits=bits)
                    opt.step()
                    TB.randomize_state(opt, params, moment_dtype)
                    cands[(k, b, bits)] = (opt.step, numel * TB.moved_bytes_per_param(dt, bits),
                                           TB.state_bytes_per_param(opt, params))
                    keep.append((opt, params))
        refs = bandwidth_refs(dev)
        for name, (fn, nb) in refs.items():
            cands[(name, "torch", 32)] = (fn, nb, 0.0)
        order = list(cands)
        for _ in range(a.warmup):
            for key in order:
                run(cands[key][0])
        times: Dict[Tuple[str, str, int], List[float]] = {key: [] for key in order}
        for r in range(rounds):
            rot = order[r % len(order):] + order[:r % len(order)]
            for key in rot:
                if flush is not None:
                    flush.fill_(1.0)
                times[key].append(run(cands[key][0]))
        # GPU: device time as well (CUDA events around steps issued back to back, so the host's Python work
        # overlaps the kernels); not interleaved, one candidate after the other.
        dev_ms: Dict[Tuple[str, str, int], float] = {}
        if dev.type == "cuda":
            from timing import cuda_event_median_ms
            for key in order:
                dev_ms[key] = cuda_event_median_ms(cands[key][0], rounds)
        base_t = times[base_key]
        ref_gbps = {name: [nb / t / 1e9 for t in times[(name, "torch", 32)]] for name, (_, nb) in refs.items()}
        for key in order:
            kernel, backend, bits = key
            _, bytes_per_step, state_bpp = cands[key]
            ts = times[key]
            row = dict(param_set=ps_name, dtype=dt, kernel=kernel, backend=backend, state_bits=bits,
                       device=dev.type, n_tensors=len(shapes), numel=numel, rounds=rounds,
                       median_ms=statistics.median(ts) * 1e3)
            if key in dev_ms:
                row["device_ms"] = dev_ms[key]
            if kernel in refs:
                row.update(bytes_per_call=refs[kernel][1], gbps=statistics.median(ref_gbps[kernel]))
                if key in dev_ms:
                    row["device_gbps"] = refs[kernel][1] / (dev_ms[key] * 1e-3) / 1e9
            else:
                ratios = [t / tb for t, tb in zip(ts, base_t)]
                lo, hi = bootstrap_median_ci(ratios)
                gbps = [bytes_per_step / t / 1e9 for t in ts]
                row.update(bytes_per_step=bytes_per_step, gbps=statistics.median(gbps), state_bytes_per_param=state_bpp,
                           ratio_vs_torch_fused=statistics.median(ratios), ratio_ci95=[lo, hi],
                           baseline=f"adamw torch-fused {base_dt}",
                           pct_copy_bw=100 * statistics.median(g / c for g, c in zip(gbps, ref_gbps["copy"])),
                           pct_rmw_bw=100 * statistics.median(g / c for g, c in zip(gbps, ref_gbps["rmw"])))
                if key in dev_ms:
                    copy_dev_gbps = refs["copy"][1] / (dev_ms[("copy", "torch", 32)] * 1e-3) / 1e9
                    row.update(device_gbps=bytes_per_step / (dev_ms[key] * 1e-3) / 1e9,
                               device_ratio_vs_torch_fused=dev_ms[key] / dev_ms[base_key])
                    row["device_pct_copy_bw"] = 100 * row["device_gbps"] / copy_dev_gbps
            rows.append(row)
        del keep, cands
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    os.makedirs(a.out_dir, exist_ok=True)
    # Date and time in the name: repeated runs (the spread between runs is part of the result) are all kept.
    when = info["date"][:19].replace(":", "")  # to the second: runs of the CPU set take ~15 s
    stem = os.path.join(a.out_dir, f"paired-{slug(info['device_name'])}-{when}")
    with open(stem + ".json", "w") as f:
        json.dump({"fusedecay_run": info, "loadavg_1min_end": os.getloadavg()[0], "flush_mib": a.flush_mib,
                   "rows": rows}, f, indent=1)
    gpu = dev.type == "cuda"
    lines = [f"# Paired step-time ratios — {info['device_name']}", "",
             f"torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, Python {info['python']}, "
             f"commit `{info['commit']}`, {info['date']}. `python {' '.join(sys.argv)}` "
             f"(param set {main_set}{', tensor-count sweep' if a.sweep else ''}, {rounds} interleaved rounds, "
             f"{a.flush_mib} MiB written before each timed call; ratio = "
             f"median of per-round ratios to torch fused AdamW in the same round, 95 % bootstrap interval; state B/param "
             f"measured from the optimizer's state tensors).", "",
             "| param set | dtype | kernel | backend | state | state B/param | median ms | GB/s | % copy BW | % rmw BW "
             "| × torch fused | 95 % CI |"
             + (" event ms | event GB/s | event % copy | event × fused |" if gpu else ""),
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|" + ("---:|---:|---:|---:|" if gpu else "")]
    for r in rows:
        ev = ""
        if gpu:
            ev = (f" {r['device_ms']:.3f} | {r['device_gbps']:.1f} | "
                  + (f"{r['device_pct_copy_bw']:.0f} | {r['device_ratio_vs_torch_fused']:.3f} |"
                     if "device_ratio_vs_torch_fused" in r else " | |"))
        head = f"| {r['param_set']} | {r['dtype']} | "
        if "ratio_vs_torch_fused" in r:
            lo, hi = r["ratio_ci95"]
            state = "8-bit" if r["state_bits"] == 8 else "full"
            lines.append(head + f"{r['kernel']} | {r['backend']} | {state} | {r['state_bytes_per_param']:.3f} | "
                         f"{r['median_ms']:.3f} | {r['gbps']:.1f} | {r['pct_copy_bw']:.0f} | {r['pct_rmw_bw']:.0f} | "
                         f"{r['ratio_vs_torch_fused']:.3f} | {lo:.3f}–{hi:.3f} |" + ev)
        else:
            lines.append(head + f"{r['kernel']} (reference) | {r['backend']} | | | {r['median_ms']:.3f} | "
                         f"{r['gbps']:.1f} | | | | |" + ev)
    if gpu:
        lines += ["", "\"median ms\": wall clock per step with a device sync before and after (host work included), "
                  "interleaved; \"event\" columns: CUDA-event device time of steps issued back to back (the host's "
                  "Python work overlaps the kernels), one candidate after the other."]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {stem}.json, .md")


if __name__ == "__main__":
    main()
