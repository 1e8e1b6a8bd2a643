"""Optimizer step time: fusedecay AdamHD / AdamC on every usable backend vs torch AdamW (fused, foreach).

Run (CPU or GPU, whichever ``FUSEDECAY_BENCH_DEVICE`` or the machine selects):

    python -m pytest bench/test_bench_step.py --benchmark-json=bench/results/raw.json
    python bench/to_results.py bench/results/raw.json

What is timed: ``optimizer.step()`` only. Params, grads and moments hold random values (grads are
filled once, before timing); the optimizer takes one untimed step to create its state, whose moments
are then overwritten with random values in the dtype under test. Each case: warm-up, then many
rounds of one step (plus ``torch.cuda.synchronize()`` inside the round on GPU); the median is the
figure (see bench/timing.py). Nothing here asserts a time; bench/to_results.py turns the JSON into
rows, a table and a plot.

Cases, per parameter set (bench/param_sets.py) and dtype:
  kernels  adamhd-prox-ema (AdamHD, proximal Huber decay, EMA δ), adamhd-euler (EMA δ), adamc,
           adamw (torch, backends "torch-fused" and "torch-foreach": the baseline);
  backends every entry of ``fusedecay.available_backends()`` that supports the device and dtype —
           except "reference" on GPU or on sets over 20 M params (it is an eager per-tensor loop), and
           "triton" on CPU (only the interpreter runs there);
  dtypes   fp32 (28 B/param moved: read θ, g, m, v, write θ, m, v), bf16 params + grads with fp32
           moments ("bf16-fp32state", 22 B/param; torch AdamW has no such mode) and bf16 everything
           (14 B/param).
Plus ``test_copy_bandwidth`` (the ceiling, same run) and the time-vs-number-of-tensors sweep
(``many-small-N``: fixed total size in N tensors, fp32, AdamHD prox/EMA and torch AdamW).

Environment: FUSEDECAY_BENCH_DEVICE (cpu|cuda), FUSEDECAY_BENCH_SETS (comma list; default cpu-small
on CPU, gpt2-124m on GPU), FUSEDECAY_BENCH_DTYPES (default fp32,bf16-fp32state,bf16),
FUSEDECAY_BENCH_SWEEP (0 to skip the sweep), FUSEDECAY_BENCH_ROUNDS, FUSEDECAY_BENCH_DEADLINE (a Unix
time after which remaining cases are skipped, so that a time-boxed run still ends and writes its JSON).
"""
from __future__ import annotations

import os
import time
from typing import List, NamedTuple

import pytest
import torch

import fusedecay
import param_sets as PS
from copy_bandwidth import copy_case
from run_info import bench_device, device_name
from timing import run_case

DEVICE = bench_device()

# dtype name -> (param and grad dtype, moment dtype, bytes moved per param per step)
DTYPES = {
    "fp32": (torch.float32, torch.float32, 28),            # 7 × 4 B
    "bf16-fp32state": (torch.bfloat16, torch.float32, 22),  # θ r/w 2+2, g 2, m r/w 4+4, v r/w 4+4
    "bf16": (torch.bfloat16, torch.bfloat16, 14),           # 7 × 2 B
}
FUSEDECAY_KERNELS = ("adamhd-prox-ema", "adamhd-euler", "adamc")
TORCH_BACKENDS = ("torch-fused", "torch-foreach")
REFERENCE_MAX_NUMEL = 20_000_000
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


class Case(NamedTuple):
    param_set: str
    dtype: str
    kernel: str
    backend: str

    @property
    def id(self) -> str:
        return f"{self.param_set}-{self.dtype}-{self.kernel}-{self.backend}"


def _env_list(name: str, default: str) -> List[str]:
    return [s.strip() for s in os.environ.get(name, default).split(",") if s.strip()]


def fusedecay_backends(numel: int, dtype: str) -> List[str]:
    out = []
    for name, b in fusedecay.available_backends().items():
        if b.adam_decay is None or not b.supports(DEVICE, DTYPES[dtype][0]):
            continue
        if name == "reference" and (DEVICE.type != "cpu" or numel > REFERENCE_MAX_NUMEL):
            continue
        if name == "triton" and DEVICE.type == "cpu":
            continue
        out.append(name)
    return out


def build_cases() -> List[Case]:
    cases = []
    sets = _env_list("FUSEDECAY_BENCH_SETS", "gpt2-124m" if DEVICE.type == "cuda" else "cpu-small")
    for ps in sets:
        size = PS.numel(PS.shapes(ps, DEVICE.type))
        for dt in _env_list("FUSEDECAY_BENCH_DTYPES", ",".join(DTYPES)):
            backends = fusedecay_backends(size, dt)
            cases += [Case(ps, dt, "adamw", b) for b in TORCH_BACKENDS]
            cases += [Case(ps, dt, k, b) for k in FUSEDECAY_KERNELS for b in backends]
    if os.environ.get("FUSEDECAY_BENCH_SWEEP", "1") != "0":
        for n in PS.SWEEP_COUNTS:
            ps = PS.sweep_name(n)
            cases += [Case(ps, "fp32", "adamw", b) for b in TORCH_BACKENDS]
            cases += [Case(ps, "fp32", "adamhd-prox-ema", b)
                      for b in fusedecay_backends(PS.SWEEP_NUMEL.get(DEVICE.type, 0), "fp32")]
    return cases


def make_optimizer(case: Case, params, state_bits: int = 32):
    """The case's optimizer; ``state_bits=8`` gives fusedecay's optimizers 8-bit moments (docs/state8.md)."""
    if case.kernel == "adamw":
        if state_bits != 32:
            raise ValueError("torch AdamW has only full-precision state")
        return torch.optim.AdamW(params, **HYPER, fused=case.backend == "torch-fused",
                                 foreach=case.backend == "torch-foreach")
    if case.kernel == "adamc":
        return fusedecay.AdamC(params, **HYPER, state_bits=state_bits, backend=case.backend)
    update = {"adamhd-prox-ema": "prox", "adamhd-euler": "euler"}[case.kernel]
    return fusedecay.AdamHD(params, **HYPER, update=update, delta_mode="ema", state_bits=state_bits,
                            backend=case.backend)


def randomize_state(opt, params, moment_dtype: torch.dtype, seed: int = 1) -> None:
    """Replace zero-initialised moments with random ones (m ~ N(0, 1e-3²), v = m'² with m' another
    draw), in ``moment_dtype`` — or encoded, for 8-bit state; everything else (step, δ's μ) stays as the
    optimizer made it."""
    from fusedecay.reference import state8
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    for p in params:
        st = opt.state[p]
        m = torch.randn(p.shape, generator=gen, device=DEVICE) * 1e-3
        v = (torch.randn(p.shape, generator=gen, device=DEVICE) * 1e-3).square_()
        if "exp_avg_codes" in st:
            st["exp_avg_codes"], st["exp_avg_scales"] = state8.quantize_exp_avg(m)
            st["exp_avg_sq_codes"], st["exp_avg_sq_scales"] = state8.quantize_exp_avg_sq(v)
        else:
            st["exp_avg"] = m.to(moment_dtype)
            st["exp_avg_sq"] = v.to(moment_dtype)


def moved_bytes_per_param(dtype: str, state_bits: int = 32) -> float:
    """Bytes an ideal one-pass step moves per param: read θ, g, m, v and write θ, m, v; 8-bit moments are
    one byte each way per moment plus their float32 block scales (4 B per 128 elements, read and written)."""
    if state_bits == 32:
        return DTYPES[dtype][2]
    return 3 * DTYPES[dtype][0].itemsize + 2 * 2 * (1 + 4 / 128)


def state_bytes_per_param(opt, params) -> float:
    """Bytes of every state tensor the optimizer holds (moments or codes + scales, step, μ) per param."""
    nbytes = sum(t.numel() * t.element_size() for p in params for t in opt.state[p].values()
                 if isinstance(t, torch.Tensor))
    return nbytes / max(sum(p.numel() for p in params), 1)


def setup_case(case: Case):
    deadline = float(os.environ.get("FUSEDECAY_BENCH_DEADLINE", "inf"))
    if time.time() > deadline:
        pytest.skip("FUSEDECAY_BENCH_DEADLINE passed: suite time budget spent")
    param_dtype, moment_dtype, bpp = DTYPES[case.dtype]
    if case.backend == "torch-fused" and DEVICE.type == "cpu" and not hasattr(torch, "_fused_adamw_"):
        pytest.skip("this torch has no CPU fused AdamW")
    if case.kernel == "adamw" and moment_dtype != param_dtype:
        pytest.skip("torch AdamW keeps moments in the param dtype (no bf16 params + fp32 moments mode)")
    shapes = PS.shapes(case.param_set, DEVICE.type)
    params = PS.make_params(shapes, DEVICE, param_dtype)
    try:
        opt = make_optimizer(case, params)
        opt.step()  # creates the state (untimed)
        randomize_state(opt, params, moment_dtype)
        opt.step()  # the state as replaced must run too
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
        pytest.skip(f"{case.backend} cannot run {case.kernel}/{case.dtype}: {type(e).__name__}: {e}")
    numel = PS.numel(shapes)
    info = dict(kernel=case.kernel, backend=case.backend, param_set=case.param_set, dtype=case.dtype,
                param_dtype=str(param_dtype).replace("torch.", ""),
                moment_dtype=str(moment_dtype).replace("torch.", ""),
                device=DEVICE.type, device_name=device_name(DEVICE), n_tensors=len(shapes), numel=numel,
                bytes_per_param=bpp, bytes_per_step=numel * bpp)
    return opt, info


def test_copy_bandwidth(benchmark):
    fn, nbytes = copy_case(DEVICE)
    extra = run_case(benchmark, fn, DEVICE)
    benchmark.extra_info.update(kernel="copy", backend="torch", param_set=f"{nbytes // 2 >> 20}MiB",
                                dtype="fp32", device=DEVICE.type, device_name=device_name(DEVICE),
                                bytes_per_step=nbytes, loadavg_1min=os.getloadavg()[0], **extra)


@pytest.mark.parametrize("case", build_cases(), ids=lambda c: c.id)
def test_step(benchmark, case: Case):
    opt, info = setup_case(case)
    slow = case.backend == "reference"
    benchmark.extra_info.update(info)
    benchmark.extra_info.update(run_case(benchmark, opt.step, DEVICE, slow=slow))
    benchmark.extra_info["loadavg_1min"] = os.getloadavg()[0]  # other load on the machine, for reading the row
