// Per-element AdamHD / AdamC update: the one definition of the arithmetic that both the CUDA kernel
// (csrc/cuda/adam_decay_cuda.cu) and the CPU kernel (csrc/cpu/adam_decay_cpu.cpp) run, so the CPU
// tests in CI exercise the same math the GPU executes. Torch-free: includes only the C++ standard
// library (and is compiled by nvcc as __host__ __device__).
//
// The math follows python/fusedecay/reference/adam_decay.py (spec §1–§3):
//   g ← g·sign/scale                       (GradScaler unscale, maximize)
//   m ← β1 m + (1−β1) g,  v ← β2 v + (1−β2) g²
//   u = (m / bc1) / (sqrt(v)/sqrt(bc2) + ε)  (bc = 1 without bias correction)
//   l2:    θ ← θ(1−τ) − γu
//   prox:  y = θ − γu;  θ ← y/(1+τ) if |y| ≤ (1+τ)δ else y − τδ·sign(y)     (AdamHD Eq. 13–14, 18)
//          computed as y − τ·clip(y/(1+τ), −δ, δ) (the same function, branch-free)
//   euler: θ ← θ − γu − τ·clip(θ, −δ, δ)                                     (AdamHD Eq. 12)
// with τ = γλ (uncorrected) or γλ·γ/γ_max (AdamC's corrected decay). Math runs in T (float for
// fp32/bf16 storage, double for fp64); storage keeps the tensor's own dtype.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FD_HD __host__ __device__ __forceinline__
#else
#define FD_HD inline
#endif

namespace fusedecay {

enum DecayKind : int { kDecayL2 = 0, kDecayProx = 1, kDecayEuler = 2 };

// Storage formats the kernels understand (the glue maps torch dtypes onto these). kStoreQ8 is the 8-bit
// blockwise moment state of csrc/state8.h (int8 exp_avg and uint8 exp_avg_sq codes + fp32 block scales).
enum StorageKind : int { kStoreF32 = 0, kStoreBF16 = 1, kStoreF64 = 2, kStoreQ8 = 3 };

// bfloat16 storage: the raw 16 bits. Conversion is done by hand so host and device round the same
// way (round-to-nearest-even, NaN → canonical 0x7FC0, as c10::BFloat16 does).
struct BF16 {
  uint16_t bits;
};

FD_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

FD_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

FD_HD float bf16_bits_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

FD_HD uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_to_bits(f);
  // NaN test written on the bits so the CPU loop stays branch-free and vectorisable.
  const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(is_nan ? 0x7fc0u : rounded);
}

FD_HD float widen(BF16 x) { return bf16_bits_to_float(x.bits); }
FD_HD float widen(float x) { return x; }
FD_HD double widen(double x) { return x; }
FD_HD BF16 to_bf16(float f) { return BF16{float_to_bf16_bits(f)}; }

// narrow<S>(x): round a math-typed value to storage type S.
template <typename S>
struct Narrow;
template <>
struct Narrow<float> {
  template <typename T>
  FD_HD static float from(T x) { return static_cast<float>(x); }
};
template <>
struct Narrow<double> {
  template <typename T>
  FD_HD static double from(T x) { return static_cast<double>(x); }
};
template <>
struct Narrow<BF16> {
  FD_HD static BF16 from(float x) { return to_bf16(x); }
};
template <typename S, typename T>
FD_HD S narrow(T x) { return Narrow<S>::from(x); }

FD_HD float fd_sqrt(float x) { return sqrtf(x); }
FD_HD double fd_sqrt(double x) { return sqrt(x); }
FD_HD float fd_abs(float x) { return fabsf(x); }
FD_HD double fd_abs(double x) { return fabs(x); }
FD_HD float fd_pow(float a, float b) { return powf(a, b); }
FD_HD double fd_pow(double a, double b) { return pow(a, b); }
// clip(x, −d, d) written with comparisons so a NaN x propagates (as torch.clamp does).
FD_HD float fd_clip(float x, float d) { return x < -d ? -d : (x > d ? d : x); }
FD_HD double fd_clip(double x, double d) { return x < -d ? -d : (x > d ? d : x); }

// Step-invariant hyperparameters of one launch, already rounded to the math type T on the host
// (as torch rounds a Python-float scalar to the tensor's dtype).
template <typename T>
struct Hyper {
  T beta1, beta2;
  T one_minus_beta1, one_minus_beta2;  // computed in double on the host, then rounded
  T eps;
  T weight_decay;   // λ
  T delta_fixed;    // δ when use_delta_fixed
  T delta_scale;    // c: δ = c·μ otherwise
  T lr;             // γ when lr_ptr is null
  T max_lr;         // γ_max when max_lr_ptr is null (only read when corrected)
  T mu_beta;        // β0 of the fused μ update (when update_mu)
  T mu_one_minus_beta;
  int decay;        // DecayKind
  int bias_correction, maximize, corrected, use_delta_fixed;
  int update_mu;    // after the step: μ ← β0·μ + (1 − β0)·Σ|θ_t|/n per tensor (delta_mu_next)
};

// Everything a kernel needs that is not per-tensor. Pointers are device pointers on CUDA and host
// pointers on the CPU; null means "use the value in hyper" (lr, max_lr) or "absent" (grad_scale,
// found_inf). Reading them in the kernel keeps a step free of host syncs and CUDA-graph safe.
template <typename T>
struct KernelScalars {
  Hyper<T> hyper;
  const T* lr_ptr;
  const T* max_lr_ptr;
  const T* grad_scale_ptr;      // grads are divided by it (GradScaler)
  const float* found_inf_ptr;   // nonzero → no writes at all
};

// Per-tensor, per-step scalars derived once per chunk (CPU) or per block (CUDA).
template <typename T>
struct StepScalars {
  T grad_mul;          // ±1/grad_scale
  T beta1, beta2, one_minus_beta1, one_minus_beta2, eps;
  T inv_bc1;           // 1/(1−β1^t)
  T inv_sqrt_bc2;      // 1/sqrt(1−β2^t)
  T lr;                // γ_t
  T tau;               // τ = γ_t λ_t
  T one_minus_tau;     // l2
  T inv_one_plus_tau;  // prox: 1/(1+τ)
  T delta;             // δ (the Huber clip)
};

template <typename T>
FD_HD bool should_skip(const KernelScalars<T>& ks) {
  return ks.found_inf_ptr != nullptr && *ks.found_inf_ptr != 0.0f;
}

// step: t (already incremented), mu: μ^(l) (ignored when δ is fixed or for l2).
template <typename T>
FD_HD StepScalars<T> make_step_scalars(const KernelScalars<T>& ks, float step, T mu) {
  const Hyper<T>& h = ks.hyper;
  StepScalars<T> s;
  const T scale = ks.grad_scale_ptr != nullptr ? *ks.grad_scale_ptr : T(1);
  s.grad_mul = (h.maximize ? T(-1) : T(1)) / scale;
  s.beta1 = h.beta1;
  s.beta2 = h.beta2;
  s.one_minus_beta1 = h.one_minus_beta1;
  s.one_minus_beta2 = h.one_minus_beta2;
  s.eps = h.eps;
  if (h.bias_correction) {
    const T t = static_cast<T>(step);
    s.inv_bc1 = T(1) / (T(1) - fd_pow(h.beta1, t));
    s.inv_sqrt_bc2 = T(1) / fd_sqrt(T(1) - fd_pow(h.beta2, t));
  } else {
    s.inv_bc1 = T(1);
    s.inv_sqrt_bc2 = T(1);
  }
  const T lr = ks.lr_ptr != nullptr ? *ks.lr_ptr : h.lr;
  s.lr = lr;
  T tau = lr * h.weight_decay;  // τ = γλ
  if (h.corrected) {
    const T max_lr = ks.max_lr_ptr != nullptr ? *ks.max_lr_ptr : h.max_lr;
    tau = tau * (lr / max_lr);  // λ_t = λ·γ_t/γ_max (AdamC)
  }
  s.tau = tau;
  s.one_minus_tau = T(1) - tau;
  s.inv_one_plus_tau = T(1) / (T(1) + tau);
  const T delta = h.use_delta_fixed ? h.delta_fixed : h.delta_scale * mu;  // δ_t^(l)
  s.delta = delta;
  return s;
}

// The fused δ-tracking update of one tensor, after its Σ|θ_t| is known (AdamHD Eq. 8–9; β0 = 0 is Eq. 7):
// μ ← β0·μ + (1 − β0)·(Σ|θ_t| / n), with the roundings of fusedecay.functional.update_delta_mu on the CPU
// (-ffp-contract=off); nvcc and Triton may contract the multiply-add into an FMA, so a GPU's μ can differ in the
// last bit.
template <typename T>
FD_HD T delta_mu_next(T mu, T abs_sum, T n, const Hyper<T>& h) {
  return mu * h.mu_beta + (abs_sum / n) * h.mu_one_minus_beta;
}

// The moment half of one element: scales g, updates m and v in place.
template <typename T, typename V = T>
FD_HD void adam_moments(V g, V& m, V& v, const StepScalars<T>& s) {
  g = g * s.grad_mul;
  m = s.beta1 * m + s.one_minus_beta1 * g;
  v = s.beta2 * v + s.one_minus_beta2 * (g * g);
}

// The parameter half: θ_t from θ_{t−1}, the updated m and w = sqrt(v) (the updated v's square root).
template <int D, typename T, typename V = T>
FD_HD V adam_param(V theta, V m, V w, const StepScalars<T>& s) {
  const V denom = w * s.inv_sqrt_bc2 + s.eps;
  const V step = s.lr * ((m * s.inv_bc1) / denom);  // γ_t u_t
  if (D == kDecayL2) {
    return theta * s.one_minus_tau - step;
  } else if (D == kDecayProx) {
    // prox_{τH_δ}(y) = y/(1+τ) if |y| ≤ (1+τ)δ else y − τδ·sign(y), written in the equivalent
    // branch-free form y − τ·clip(y/(1+τ), −δ, δ) (both zones agree with Eq. 13–14 exactly in real
    // arithmetic; in floating point they differ from the two-branch form by about one ulp).
    const V y = theta - step;  // θ̃_t (Eq. 17)
    const V q = y * s.inv_one_plus_tau;
    return y - s.tau * fd_clip(q, s.delta);
  } else {
    return theta - step - s.tau * fd_clip(theta, s.delta);
  }
}

// One element: updates m and v in place and returns θ_t (math type). D is a DecayKind.
// V is the value type: T itself (CUDA, scalar CPU tails) or a CPU SIMD type holding several lanes
// of T (csrc/cpu/adam_decay_cpu.cpp) that provides +, −, ·, / (also with a T operand), fd_sqrt and
// fd_clip lane by lane with the same IEEE rounding, so every lane is bit-identical to the scalar path.
// The two halves can also be called apart (the CPU's 8-bit loop does, see update_chunk): same operations.
template <int D, typename T, typename V = T>
FD_HD V adam_decay_element(V theta, V g, V& m, V& v, const StepScalars<T>& s) {
  adam_moments<T, V>(g, m, v, s);
  return adam_param<D, T, V>(theta, m, fd_sqrt(v), s);
}

}  // namespace fusedecay
