"""Every Triton kernel compiles for the GPU (sm_90, PTX and cubin through Triton's own ptxas), without a GPU.

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python, not Triton's GPU compiler, so a construct it accepts
can still fail to lower, and a GPU session (a few minutes of device time) would find that first. Here a subprocess
with the interpreter off calls the real launchers of the Adam kernel, of the ScionC element-wise kernels and of the
symmetric Newton–Schulz product on small CPU tensors, with each kernel swapped for a recorder that keeps the launch
(argument types, constexprs, num_warps/num_stages — the symmetric product's tile configuration taken as on a CUDA
device), and compiles every recorded launch for sm_90; the Σ|θ|/μ reduction is compiled from an explicit signature
in all four variants. (The Adam kernel's unaligned variant and its 128-bit accesses are checked by
test_adam_kernel_lowers_with_vector_accesses_and_ieee_division below.)

Checked besides compiling: the fp32 symmetric product keeps IEEE fp32 dot products (no tensor-core mma, which
would be TF32) and the bf16 one uses tensor cores (wgmma on sm_90); the Adam kernel's launches compile every flag
both ways and divide and take square roots IEEE-rounded (div.rn / sqrt.rn, no div.full or sqrt.approx), as does
the μ update.
"""
import os
import subprocess
import sys

import pytest
import torch

from snippets import require  # noqa: E402

triton = require("triton")  # skipped without triton locally; CI must have it
pytestmark = pytest.mark.triton

_PTX_CHECK = r"""
import re, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
sys.path.insert(0, sys.argv[1])
from fusedecay.triton_kernels import adam_decay as K
scalars = ("lr_value", "max_lr_value", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps",
           "weight_decay", "delta_fixed", "delta_scale")
for p_dt, m_dt, v_dt, aligned in ((tl.float32, tl.float32, tl.float32, True), (tl.bfloat16, tl.float32, tl.float32, True),
                                  (tl.bfloat16, tl.bfloat16, tl.bfloat16, True), (tl.float32, tl.int8, tl.uint8, True),
                                  (tl.float32, tl.float32, tl.float32, False)):
    const = dict(P_DTYPE=p_dt, G_DTYPE=p_dt, M_DTYPE=m_dt, V_DTYPE=v_dt, DECAY=1, DELTA_FROM_MU=True, LR_IS_PTR=True,
                 CORRECTED=True, MAX_LR_IS_PTR=False, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, BIAS_CORRECTION=True,
                 LOG2_BETA1=-0.152, LOG2_BETA2=-0.00144, MAXIMIZE=False, WRITE_ABS=True, ALIGNED=aligned,
                 QUANT=m_dt == tl.int8, BLOCK=K.DEFAULT_BLOCK)
    sig = {a: ("fp32" if a in scalars else "i32" if a in ("n_tensors", "block_map_offset") else
               "*i64" if a == "meta_ptr" else "*fp32") for a in K._adam_decay_kernel.arg_names if a not in const}
    sig.update({k: "constexpr" for k in const})
    src = triton.compiler.ASTSource(fn=K._adam_decay_kernel, signature=sig, constexprs=const)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": K.DEFAULT_NUM_WARPS}).asm["ptx"]
    print(aligned, "ld.global.v4" in ptx and "st.global.v4" in ptx)
    # IEEE-rounded division and square root (no div.full / sqrt.approx, no subnormal flush in them).
    ops = set(re.findall(r"\b(div|sqrt)\.([a-z]+)(?:\.ftz)?\.f32", ptx))
    print("ieee", sorted(ops) == [("div", "rn"), ("sqrt", "rn")], sorted(ops))
"""


_LOWER_ALL = r"""
import re, sys
import torch
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
sys.path.insert(0, sys.argv[1])
from fusedecay.triton_kernels import adam_decay as A, scion_update as S, symmetric_matmul as SM

TARGET = GPUTarget("cuda", 90, 32)
PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int8: "*i8",
       torch.uint8: "*u8", torch.int32: "*i32", torch.int64: "*i64"}


def compile_ptx(kernel, types, const, num_warps=4, num_stages=3):
    names = kernel.arg_names
    unknown = (set(types) | set(const)) - set(names)
    missing = [a for a in names if a not in types and a not in const]
    if unknown or missing:
        raise SystemExit(f"{kernel.__name__}: unknown {sorted(unknown)}, missing {missing}")
    sig = {a: ("constexpr" if a in const else types[a]) for a in names}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=dict(const))
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages}).asm["ptx"]


class Recorder:
    # Stands in for a @triton.jit kernel in its module: kernel[grid](*args, **kwargs) records the launch.
    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def arg_type(name, x):
    if isinstance(x, torch.Tensor):
        return PTR[x.dtype]
    if isinstance(x, bool):
        return "i1"
    if isinstance(x, int):
        return "i32" if -2**31 <= x < 2**31 else "i64"
    if isinstance(x, float):
        return "fp32"
    raise SystemExit(f"argument {name}: no Triton type for {type(x).__name__}")


def lower_recorded(rec, label):
    params = {p.name: p for p in rec.kernel.params}
    for args, kwargs in rec.launches:
        names = rec.kernel.arg_names
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in params})
        options = {k: v for k, v in kwargs.items() if k not in params}
        const = {k: v for k, v in bound.items() if params[k].is_constexpr}
        types = {k: arg_type(k, v) for k, v in bound.items() if not params[k].is_constexpr}
        ptx = compile_ptx(rec.kernel, types, const, **options)
        print(label, "ok", sorted(types.items()), sorted(const.items()), sorted(options.items()),
              "mma" in ptx, "wgmma" in ptx, ieee(ptx))
    if not rec.launches:
        raise SystemExit(f"{label}: the launcher launched nothing")


def ieee(ptx):
    # ieee=True: fp32 division / square root present, all IEEE-rounded; ieee=False: some are not; ieee=none.
    ops = set(re.findall(r"\b(div|sqrt)\.([a-z]+)(?:\.ftz)?\.f32", ptx))
    return "ieee=" + ("none" if not ops else str(ops <= {("div", "rn"), ("sqrt", "rn")}))


# ScionC element-wise kernels, through their launchers: float and tensor keep/step, Nesterov or not, param /
# momentum / Newton–Schulz-stack dtypes as ScionC combines them (a momentum buffer may be narrower than its param).
recs = {name: Recorder(getattr(S, name)) for name in ("_momentum_to_stack_kernel", "_apply_direction_kernel",
                                                     "_sign_step_kernel")}
for name, rec in recs.items():
    setattr(S, name, rec)
f32, bf16 = torch.float32, torch.bfloat16
for p_dt, m_dt, ns_dt in ((f32, f32, f32), (bf16, bf16, bf16), (f32, bf16, bf16), (bf16, f32, bf16)):
    for tall in (False, True):
        shape = (48, 16) if tall else (16, 48)
        p, g, m = torch.zeros(shape, dtype=p_dt), torch.zeros(shape, dtype=p_dt), torch.zeros(shape, dtype=m_dt)
        slot = torch.zeros(min(shape), max(shape), dtype=ns_dt)
        for nesterov in (False, True):
            S.momentum_to_stack(g, m, slot, alpha=0.1, nesterov=nesterov, maximize=nesterov)
        for keep, step in ((0.99, 0.01), (torch.tensor(0.99), torch.tensor(0.01))):
            S.apply_direction(p, slot, keep=keep, step=step, step_mul=1.5)
            S.sign_step(p, g, m, alpha=0.1, keep=keep, step=step, nesterov=not tall, maximize=tall, step_mul=0.25)
for name, rec in recs.items():
    lower_recorded(rec, name)

# The symmetric product of Newton-Schulz, through its launcher, with the tile configuration of a CUDA device.
rec = Recorder(SM._symmetric_matmul_kernel)
SM._symmetric_matmul_kernel = rec
config = SM._config
SM._config = lambda M, dtype, device: config(M, dtype, torch.device("cuda"))
for dt in (f32, bf16):
    for M, K in ((96, 160), (1024, 1536)):
        x = torch.zeros(2, M, K, dtype=dt)
        a = SM.symmetric_matmul(x)
        SM.symmetric_matmul(a, alpha=2.0, beta=-1.0, add=a)
lower_recorded(rec, "_symmetric_matmul_kernel")

# The ordered Σ|θ| reduction with the μ update (explicit signature, every constexpr combination).
sum_types = dict(partials_ptr="*fp32", meta_ptr="*i64", n_tensors="i32", first_block_offset="i32",
                 out_index_offset="i32", out_ptr="*fp32", found_inf_ptr="*fp32", mu_beta="fp32",
                 mu_one_minus_beta="fp32")
for update_mu in (False, True):
    for has_found_inf in (False, True):
        ptx = compile_ptx(A._ordered_abs_sum_kernel, sum_types,
                          dict(UPDATE_MU=update_mu, HAS_FOUND_INF=has_found_inf, RBLOCK=A.REDUCE_BLOCK))
        print("_ordered_abs_sum_kernel ok", update_mu, has_found_inf, ieee(ptx))

# The Adam kernel through its launcher (adam_decay.adam_decay, as the optimizers call it) on CPU tensors: fp32 and
# bf16 params with full-precision and 8-bit state under each decay rule, then calls with every optional input
# flipped (tensor lr and max_lr, grad scale and found_inf, δ fixed, no bias correction, maximize, no Σ|θ|).
rec = Recorder(A._adam_decay_kernel)
A._adam_decay_kernel = rec
A._ordered_abs_sum_kernel = Recorder(A._ordered_abs_sum_kernel)  # launched, not compiled (all variants above)


def adam_step(dt, q8, decay, flipped=False):
    shapes = [(256, 128), (4, 384)] + ([] if q8 else [(37,), ()])
    ps = [torch.randn(s, dtype=dt) for s in shapes]
    gs = [torch.randn(s, dtype=dt) for s in shapes]
    if q8:
        ms = [torch.zeros(s, dtype=torch.int8) for s in shapes]
        vs = [torch.zeros(s, dtype=torch.uint8) for s in shapes]
        scales = dict(exp_avg_scales=[torch.zeros(s[0], s[1] // 128) for s in shapes],
                      exp_avg_sq_scales=[torch.zeros(s[0], s[1] // 128) for s in shapes])
    else:
        ms, vs, scales = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps], {}
    steps = [torch.tensor(3.0) for _ in shapes]
    tracked = decay != "l2" and not flipped
    mus = [torch.tensor(0.02) for _ in shapes] if tracked else None
    sums = None if flipped else torch.zeros(len(shapes))
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decay=decay,
              delta_fixed=0.01 if decay != "l2" and flipped else None, delta_scale=1.0, max_lr=None,
              bias_correction=True, maximize=False, delta_beta=0.9 if tracked else None)
    if flipped:
        kw.update(lr=torch.tensor(1e-3), max_lr=torch.tensor(2e-3), grad_scale=torch.tensor(0.5),
                  found_inf=torch.tensor(0.0), bias_correction=False, maximize=True)
    A.adam_decay(ps, gs, ms, vs, steps, mus, sums, **kw, **scales)


for dt in (f32, bf16):
    for q8 in (False, True):
        for decay in ("l2", "prox", "euler"):
            adam_step(dt, q8, decay)
adam_step(f32, False, "prox", flipped=True)
adam_step(bf16, True, "euler", flipped=True)
adam_step(f32, True, "l2", flipped=True)
lower_recorded(rec, "_adam_decay_kernel")
"""


def _run_with_the_gpu_compiler(script_text: str, tmp_path) -> str:
    """Runs ``script_text`` in a subprocess with the interpreter off (fresh Triton cache); returns its stdout."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the cuda tests compile and run the real kernels")
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this triton has no NVIDIA backend to compile with")
    script = tmp_path / "lower.py"
    script.write_text(script_text)
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    python_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")
    out = subprocess.run([sys.executable, str(script), python_dir], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_adam_kernel_lowers_with_vector_accesses_and_ieee_division(tmp_path):
    """The Adam kernel for fp32, bf16 (fp32 or bf16 moments) and 8-bit state, aligned, and fp32 unaligned: 16-byte
    loads/stores exactly when aligned, IEEE-rounded division and square root."""
    lines = _run_with_the_gpu_compiler(_PTX_CHECK, tmp_path).splitlines()
    assert [ln.split()[:2] for ln in lines if not ln.startswith("ieee")] == [["True", "True"]] * 4 + [["False", "False"]]
    ieee = [ln for ln in lines if ln.startswith("ieee")]
    assert len(ieee) == 5 and all(ln.split()[1] == "True" for ln in ieee), ieee


@pytest.mark.slow
def test_every_triton_kernel_compiles_for_sm90(tmp_path):
    lines = _run_with_the_gpu_compiler(_LOWER_ALL, tmp_path).splitlines()
    by_kernel = {}
    for ln in lines:
        by_kernel.setdefault(ln.split()[0], []).append(ln)
    # Launches recorded: 4 dtype sets × 2 orientations × (2 Nesterov | 2 keep/step kinds) per ScionC kernel;
    # 2 dtypes × 2 sizes × 2 calls of the symmetric product; 4 reduction variants (explicit); Adam: 2 param dtypes ×
    # 2 state formats × 3 decay rules + 3 calls with the optional inputs flipped, one launch each.
    assert {k: len(v) for k, v in by_kernel.items()} == {
        "_momentum_to_stack_kernel": 16, "_apply_direction_kernel": 16, "_sign_step_kernel": 16,
        "_symmetric_matmul_kernel": 8, "_ordered_abs_sum_kernel": 4, "_adam_decay_kernel": 15}, lines[-40:]
    for ln in by_kernel["_symmetric_matmul_kernel"]:
        mma, wgmma = ln.split()[-3:-1]
        if "'IEEE', True" in ln:   # fp32: IEEE fp32 dot products (FMA), never TF32 tensor-core mma
            assert "('x_ptr', '*fp32')" in ln and mma == "False", ln
        else:                      # bf16: tensor cores, Hopper's wgmma
            assert "('x_ptr', '*bf16')" in ln and wgmma == "True", ln
    # The Adam kernel (division, square root) and the μ update (division) round as IEEE. (The symmetric product's
    # approximate square root only picks a tile index, corrected in integers after it.)
    mu_updates = [ln for ln in by_kernel["_ordered_abs_sum_kernel"] if ln.split()[2] == "True"]
    for ln in by_kernel["_adam_decay_kernel"] + mu_updates:
        assert ln.split()[-1] == "ieee=True", ln
    adam = " ".join(by_kernel["_adam_decay_kernel"])
    for flag in ("LR_IS_PTR", "CORRECTED", "HAS_GRAD_SCALE", "HAS_FOUND_INF", "BIAS_CORRECTION", "MAXIMIZE",
                 "WRITE_ABS", "DELTA_FROM_MU", "QUANT"):   # every flag compiled both ways
        assert f"('{flag}', True)" in adam and f"('{flag}', False)" in adam, flag
    for decay in range(3):
        assert f"('DECAY', {decay})" in adam
    # The symmetric product's launches carry the GPU tile configuration (not the interpreter's 32×32, 1 warp).
    assert all("('num_warps', 1)" not in ln for ln in by_kernel["_symmetric_matmul_kernel"])
