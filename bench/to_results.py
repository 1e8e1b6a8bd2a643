"""Turn pytest-benchmark JSON from bench/test_bench_step.py into result rows, a Markdown table and a plot.

    python bench/to_results.py RAW.json [--out-dir bench/results] [--name NAME]

Writes ``<out-dir>/<device>-<date>.json`` (one row per case), ``.md`` and ``.png``; ``<device>`` is the
device name made file-safe and ``<date>`` the run's UTC date. Every figure comes from RAW.json:

* ``median_ms``: pytest-benchmark's median round (one ``optimizer.step()``, synchronised on GPU);
* ``gbps``: ``bytes_per_param × numel / median`` — the bytes an ideal fused step must move (fp32: read θ,
  g, m, v and write θ, m, v = 28 B; bf16 params with fp32 moments 22 B; all bf16 14 B), whatever the
  implementation actually moves;
* ``pct_copy_bw``: ``gbps`` over the copy bandwidth measured by ``test_copy_bandwidth`` in the same run;
* ``ratio_vs_torch_fused``: median over torch ``AdamW(fused=True)``'s median for the same parameter set
  and dtype in the same run (for bf16 params with fp32 moments, which torch cannot do, over torch fused
  in fp32 — the mixed-precision setup a torch user would run instead; ``baseline`` names it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_info import slug  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RUN_KEYS = ("device_name", "threads", "torch", "triton", "cuda", "python", "commit", "date")
# (device type, backend) -> (max ratio to torch fused AdamW, min % of copy bandwidth or None, param sets
# the target is stated for (None: every non-sweep set)). For the table only; nothing asserts them.
TARGETS = {("cpu", "cpu"): (1.0, None, None),
           ("cuda", "cuda"): (0.85, 85.0, ("gpt2-124m",)),
           ("cuda", "triton"): (1.0, None, None)}
SWEEP_PREFIX = "many-small-"


def load(paths: List[str]) -> Tuple[Dict[str, object], List[dict]]:
    run: Dict[str, object] = {}
    benches: List[dict] = []
    for p in paths:
        with open(p) as f:
            data = json.load(f)
        run = run or data.get("fusedecay_run", {})
        benches += data["benchmarks"]
    if not run:
        raise SystemExit(f"{paths}: no 'fusedecay_run' block (was it written by pytest bench/ ?)")
    return run, benches


def target_of(row: dict) -> Tuple[str, str]:
    t = TARGETS.get((row["device"], row["backend"]))
    if t is None or not row["kernel"].startswith("adamhd") or row["param_set"].startswith(SWEEP_PREFIX):
        return "", ""
    max_ratio, min_pct, sets = t
    if sets is not None and row["param_set"] not in sets:
        return "", ""
    text = f"≤{max_ratio:.2f}×" + (f", ≥{min_pct:.0f}% copy" if min_pct else "")
    # On GPU the target is judged on device time (CUDA events, steps issued back to back: the host's Python
    # work overlaps the kernels), the wall-clock figures stay beside it in the table.
    if row.get("device_ratio_vs_torch_fused") is not None:
        ratio, pct = row["device_ratio_vs_torch_fused"], row.get("device_pct_copy_bw")
    else:
        ratio, pct = row.get("ratio_vs_torch_fused"), row.get("pct_copy_bw")
    if ratio is None:
        return text, "no baseline"
    ok = ratio <= max_ratio and (min_pct is None or (pct is not None and pct >= min_pct))
    return text, "met" if ok else "not met"


def make_rows(run: Dict[str, object], benches: List[dict]) -> List[dict]:
    rows = []
    for b in benches:
        x = dict(b.get("extra_info", {}))
        if "kernel" not in x:
            continue
        s = b["stats"]
        row = {k: x.get(k) for k in ("kernel", "backend", "param_set", "dtype", "param_dtype", "moment_dtype",
                                     "device", "n_tensors", "numel", "bytes_per_param", "bytes_per_step")}
        row.update({k: run.get(k) for k in RUN_KEYS})
        row["device_name"] = x.get("device_name", row["device_name"])
        row.update(median_ms=s["median"] * 1e3, iqr_ms=s["iqr"] * 1e3, min_ms=s["min"] * 1e3, rounds=s["rounds"],
                   cuda_event_median_ms=x.get("cuda_event_median_ms"), loadavg_1min=x.get("loadavg_1min"))
        row["gbps"] = row["bytes_per_step"] / (row["median_ms"] * 1e-3) / 1e9
        ev = row["cuda_event_median_ms"]
        row["device_gbps"] = row["bytes_per_step"] / (ev * 1e-3) / 1e9 if ev else None
        rows.append(row)
    copy = next((r for r in rows if r["kernel"] == "copy"), None)
    fused = {(r["param_set"], r["dtype"]): r for r in rows if r["backend"] == "torch-fused"}
    for r in rows:
        r["copy_gbps"] = copy["gbps"] if copy else None
        r["pct_copy_bw"] = 100 * r["gbps"] / copy["gbps"] if copy else None
        r["device_pct_copy_bw"] = (100 * r["device_gbps"] / copy["device_gbps"]
                                   if copy and r["device_gbps"] and copy.get("device_gbps") else None)
        if r["kernel"] == "copy":
            r["ratio_vs_torch_fused"], r["device_ratio_vs_torch_fused"], r["baseline"] = None, None, None
            continue
        base_dtype = "fp32" if r["dtype"] == "bf16-fp32state" else r["dtype"]
        base = fused.get((r["param_set"], base_dtype))
        r["ratio_vs_torch_fused"] = r["median_ms"] / base["median_ms"] if base else None
        r["device_ratio_vs_torch_fused"] = (r["cuda_event_median_ms"] / base["cuda_event_median_ms"]
                                            if base and r["cuda_event_median_ms"] and base["cuda_event_median_ms"]
                                            else None)
        r["baseline"] = f"torch AdamW fused=True, {r['param_set']}, {base_dtype}, same run" if base else None
        r["target"], r["target_status"] = target_of(r)
    return rows


def _f(v: Optional[float], fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def markdown(run: Dict[str, object], rows: List[dict]) -> str:
    copy = next((r for r in rows if r["kernel"] == "copy"), None)
    out = [f"# Optimizer step time — {run['device_name']}", "",
           f"torch {run['torch']}, triton {run['triton']}, CUDA {run['cuda']}, Python {run['python']}, "
           f"commit `{run['commit']}`, {run['date']}.", ""]
    if copy:
        out += [f"Measured copy bandwidth (same run): **{copy['gbps']:.1f} GB/s** (read + write, "
                f"{copy['param_set']} buffer, median {copy['median_ms']:.3f} ms)"
                + (f"; by CUDA events **{copy['device_gbps']:.1f} GB/s**" if copy.get("device_gbps") else "")
                + ".", ""]
    main = [r for r in rows if r["kernel"] != "copy" and not r["param_set"].startswith(SWEEP_PREFIX)]
    if main:
        gpu = run.get("cuda") != "none" and any(r["device"] == "cuda" for r in main)
        out += ["| set | dtype | kernel | backend | median ms | IQR ms | GB/s | % copy BW | × torch fused |"
                + (" event ms | event GB/s | event % copy | event × fused |" if gpu else "") + " target |",
                "|---|---|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|---:|---:|" if gpu else "") + "---|"]
        for r in main:
            dag = "†" if r["dtype"] == "bf16-fp32state" else ""
            ratio = _f(r["ratio_vs_torch_fused"], ".2f") + dag
            tgt = f"{r['target']} {r['target_status']}".strip()
            out.append(f"| {r['param_set']} | {r['dtype']} | {r['kernel']} | {r['backend']} | {r['median_ms']:.3f} "
                       f"| {r['iqr_ms']:.3f} | {r['gbps']:.1f} | {_f(r['pct_copy_bw'], '.0f')} | {ratio} |"
                       + (f" {_f(r['cuda_event_median_ms'], '.3f')} | {_f(r['device_gbps'], '.1f')} | "
                          f"{_f(r['device_pct_copy_bw'], '.0f')} | {_f(r['device_ratio_vs_torch_fused'], '.2f')}{dag} |"
                          if gpu else "") + f" {tgt} |")
        out += ["", "Bytes per param per step: fp32 28 (read θ, g, m, v; write θ, m, v), bf16-fp32state 22, "
                "bf16 14. † torch AdamW cannot keep fp32 moments for bf16 params; ratio is against torch "
                "fused AdamW in fp32 on the same set."
                + (" \"median ms\" is wall clock per step with a device sync inside (host work included); "
                   "\"event\" columns are CUDA-event times of steps issued back to back (device time: the host's "
                   "Python work overlaps the kernels). The GPU targets are judged on the event figures." if gpu else ""),
                ""]
    sweep = [r for r in rows if r["param_set"].startswith(SWEEP_PREFIX)]
    if sweep:
        counts = sorted({r["n_tensors"] for r in sweep})
        out += [f"Time vs number of tensors (fp32, {sweep[0]['numel']:,} params in total), median ms:", "",
                "| kernel | backend | " + " | ".join(str(c) for c in counts) + " |",
                "|---|---|" + "---:|" * len(counts)]
        for kb in dict.fromkeys((r["kernel"], r["backend"]) for r in sweep):
            cells = {r["n_tensors"]: r["median_ms"] for r in sweep if (r["kernel"], r["backend"]) == kb}
            out.append(f"| {kb[0]} | {kb[1]} | " + " | ".join(_f(cells.get(c), ".3f") for c in counts) + " |")
        out.append("")
    threads = run.get("threads") or 0
    busy = [r for r in rows if r.get("loadavg_1min") is not None and r["device"] == "cpu"
            and r["loadavg_1min"] > threads + 0.5]
    if busy:
        out += [f"Note: for {len(busy)} of {len(rows)} rows the machine's 1-minute load average exceeded its "
                f"{threads} threads by more than 0.5 (other processes were running); those medians include "
                f"contention (max load {max(r['loadavg_1min'] for r in busy):.1f}).", ""]
    return "\n".join(out)


def plot(run: Dict[str, object], rows: List[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in rows if r["kernel"] != "copy" and not r["param_set"].startswith(SWEEP_PREFIX)
            and r["ratio_vs_torch_fused"] is not None]
    sweep = [r for r in rows if r["param_set"].startswith(SWEEP_PREFIX)]
    fig, axes = plt.subplots(1, 2, figsize=(14, max(4.0, 0.28 * len(main) + 1.5)))
    ax = axes[0]
    labels = [f"{r['param_set']} {r['dtype']} {r['kernel']} [{r['backend']}]" for r in main]
    ax.barh(range(len(main)), [r["ratio_vs_torch_fused"] for r in main],
            color=["tab:gray" if r["backend"].startswith("torch") else "tab:blue" for r in main])
    ax.set_yticks(range(len(main)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("step time / torch AdamW(fused=True) (same set, dtype, run); log scale")
    ax = axes[1]
    for kb in dict.fromkeys((r["kernel"], r["backend"]) for r in sweep):
        pts = sorted((r["n_tensors"], r["median_ms"]) for r in sweep if (r["kernel"], r["backend"]) == kb)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{kb[0]} [{kb[1]}]")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("number of tensors (same total numel)")
    ax.set_ylabel("median step ms")
    if sweep:
        ax.set_title(f"fp32, {sweep[0]['numel']:,} params", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{run['device_name']} — torch {run['torch']}, commit {str(run['commit'])[:12]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description="pytest-benchmark JSON -> bench/results rows, table, plot")
    ap.add_argument("raw", nargs="+")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--name", default=None, help="file stem (default <device>-<date>)")
    a = ap.parse_args()
    run, benches = load(a.raw)
    rows = make_rows(run, benches)
    stem = a.name or f"{slug(str(run['device_name']))}-{str(run['date'])[:10]}"
    os.makedirs(a.out_dir, exist_ok=True)
    base = os.path.join(a.out_dir, stem)
    with open(base + ".json", "w") as f:
        json.dump({"run": run, "rows": rows}, f, indent=1)
    md = markdown(run, rows)
    with open(base + ".md", "w") as f:
        f.write(md + "\n")
    try:
        plot(run, rows, base + ".png")
    except ImportError as e:  # matplotlib is optional
        print(f"no plot: {e}")
    print(md)
    print(f"\nwrote {base}.json, .md, .png")


if __name__ == "__main__":
    main()
