// 8-bit blockwise moment codec: the one definition of how exp_avg and exp_avg_sq are stored in 8 bits,
// shared by the CPU kernel, the CUDA kernel and (re-expressed in tl ops) the Triton kernel. The contract
// is docs/state8.md; the readable reference is python/fusedecay/reference/state8.py. Torch-free.
//
// A block is kBlock consecutive elements of the tensor in row-major order (blocks never straddle a
// dim-0 row; see eligibility in docs/state8.md). Per block one fp32 scale per moment:
//   exp_avg:    s_m = max |m|,   int8 code  c = sign(m)·rne(min(127·sqrt(|m|·r_m), 127)),  m = ((c·|c|)·K_m)·s_m
//   exp_avg_sq: s_w = max √v,    uint8 code c = rne(min(255·sqrt(√v·r_w), 255)),          √v = ((c·c)·K_v)·s_w
// with K_m = fp32(1/127²), K_v = fp32(1/255²) (127²·K_m and 255²·K_v round to exactly 1, so the largest code
// decodes to its scale and decode → encode gives back the same codes and scales), r = 1/s for a normal
// s ≥ 2^−126 and 0 otherwise (an all-zero block, a NaN scale, a block of subnormals: stored as zeros),
// rne = round to nearest, ties to even. Both codes are square-root
// companded: m's code is linear in sqrt|m|, v's in sqrt(√v) = v^¼, so the quantity the update divides by
// (√v) gets the same relative resolution m gets. Encoding is arithmetic (sqrt, multiply, round): no table
// search. The maxima are taken on the bit patterns of |x| (integer max: exact, order-independent, and a
// NaN anywhere in a block makes its scale NaN, so the block decodes to NaN as fp32 state would stay NaN).
//
// Every formula below is a fixed sequence of IEEE-rounded fp32 operations, so any implementation that
// performs the same sequence (no FMA contraction) produces the same codes and scales bit for bit.
#pragma once

#include <cstdint>

#include "adam_decay_math.h"

namespace fusedecay {
namespace state8 {

constexpr int kBlock = 128;            // elements per scale
constexpr int64_t kMinNumel = 4096;    // smaller tensors keep full-precision state (bitsandbytes' min_8bit_size)
constexpr float kMaxCodeM = 127.0f;    // exp_avg codes lie in [−127, 127] (−128 is never written)
constexpr float kMaxCodeV = 255.0f;    // exp_avg_sq codes lie in [0, 255]
constexpr float kRoundMagic = 8388608.0f;  // 2^23: (t + 2^23) − 2^23 rounds 0 ≤ t < 2^23 to nearest even
constexpr float kDecodeM = 1.0f / 16129.0f;  // K_m = fp32(1/127²)
constexpr float kDecodeV = 1.0f / 65025.0f;  // K_v = fp32(1/255²)
constexpr float kMinScale = 1.17549435e-38f;  // 2^−126: 1/s is finite for every normal s

// Product that is never contracted into an FMA with a following add (nvcc contracts a·b + c by default;
// the host builds use -ffp-contract=off). The CPU SIMD type takes the generic form.
FD_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
template <typename V>
FD_HD V mul_rn(V a, float b) {
  return a * b;
}

// Per-block encode factor r (scalar, once per block).
FD_HD float encode_factor(float s) { return s >= kMinScale ? 1.0f / s : 0.0f; }  // NaN, 0, subnormal → 0

// |x| as bits: the integer order of these is the float order of |x|, with NaNs above +inf.
FD_HD uint32_t abs_bits(float x) { return float_to_bits(x) & 0x7fffffffu; }

// Scalar helpers of the element formulas; the CPU SIMD type provides the same names lane by lane.
FD_HD float fd_min_code(float t, float hi) { return t < hi ? t : hi; }  // NaN → hi
FD_HD float fd_round_even(float t) { return (t + kRoundMagic) - kRoundMagic; }
FD_HD float fd_neg_if_negative(float m, float c) { return m < 0.0f ? -c : c; }

// Element formulas. V is float (CUDA, scalar CPU) or the CPU's 16-lane SIMD type; codes travel as
// integer-valued V. s = the block's scale, r = its encode factor.
template <typename V>
FD_HD V decode_exp_avg(V c, float s) {
  return ((c * fd_abs(c)) * kDecodeM) * s;  // c·|c| is exact (≤ 127²)
}

template <typename V>
FD_HD V decode_exp_avg_sq(V c, float s) {
  const V w = ((c * c) * kDecodeV) * s;  // √v; c·c is exact (≤ 255²)
  return w * w;
}

template <typename V>
FD_HD V encode_exp_avg(V m, float r) {
  const V t = fd_min_code(mul_rn(fd_sqrt(fd_abs(m) * r), kMaxCodeM), kMaxCodeM);
  return fd_neg_if_negative(m, fd_round_even(t));
}

// w = √v of the updated v.
template <typename V>
FD_HD V encode_exp_avg_sq(V w, float r) {
  return fd_round_even(fd_min_code(mul_rn(fd_sqrt(w * r), kMaxCodeV), kMaxCodeV));
}

}  // namespace state8
}  // namespace fusedecay
