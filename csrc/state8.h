// 8-bit blockwise moment codec: the one definition of how exp_avg and exp_avg_sq are stored in 8 bits,
// shared by the CPU kernel, the CUDA kernel and (re-expressed in tl ops) the Triton kernel. The contract
// is docs/state8.md; the readable reference is python/fusedecay/reference/state8.py. Torch-free.
//
// A block is kBlock consecutive elements of the tensor in row-major order (blocks never straddle a
// dim-0 row; see eligibility in docs/state8.md). Per block one fp32 scale per moment, its largest
// magnitude, and per element an 8-bit float of the element relative to that scale:
//   exp_avg m:     s_m = max |m|,  int8 code  c = sign(m)·F8(|m|·r_m; E=4, M=3),   m  = sign(c)·V(|c|)·s_m
//   exp_avg_sq v:  s_w = max √v,   uint8 code c = F8(√v·r_w; E=5, M=3),           √v = V(c)·s_w,  v = (√v)²
// r = 1/s for a normal s ≥ 2^−126, else 0 (an all-zero block, a NaN scale, a block of subnormals: stored
// as zeros). F8(x; E, M) is x ∈ [0, 1] as a float with E exponent bits (bias 2^E − 1, so 1.0 is the code
// (2^E − 1)·2^M), M mantissa bits and subnormals, rounded to nearest even — computed on the fp32 bit pattern
// of x with integer adds and shifts (no table, no division, no square root); V is its exact inverse.
// m's code spans 2^−14…1 (+ subnormals to 2^−17) with 3 mantissa bits; √v's spans 2^−30…1 (to 2^−33), so
// v is 0 only when it is below 2^−66 of its block's largest: Adam's denominator is never lost to rounding.
// The maxima are taken on the bit patterns of |x| (integer max: exact and order-independent; a NaN in a
// block makes its scale NaN, so the block decodes to NaN, as fp32 state would stay NaN).
//
// Every formula is integer arithmetic on bit patterns or IEEE-rounded fp32 multiplications, so every
// implementation produces the same codes and scales bit for bit.
#pragma once

#include <cstdint>

#include "adam_decay_math.h"

namespace fusedecay {
namespace state8 {

constexpr int kBlock = 128;            // elements per scale
constexpr int kMantissaBits = 3;       // both codes
constexpr int kExpBitsM = 4;           // exp_avg:    bias 15, codes 0…120 in use (121…127 encode x > 1)
constexpr int kExpBitsV = 5;           // exp_avg_sq: bias 31, codes 0…248 in use
constexpr float kMinScale = 1.17549435e-38f;  // 2^−126: 1/s is finite for every normal s

// Per-block encode factor r (scalar, once per block).
FD_HD float encode_factor(float s) { return s >= kMinScale ? 1.0f / s : 0.0f; }  // NaN, 0, subnormal → 0

// |x| as bits: the integer order of these is the float order of |x|, with NaNs above +inf.
FD_HD uint32_t abs_bits(float x) { return float_to_bits(x) & 0x7fffffffu; }

// 2^k as a float (exact), for |k| < 127.
constexpr float exp2i(int k) {
  float r = 1.0f;
  for (; k > 0; --k) r *= 2.0f;
  for (; k < 0; ++k) r *= 0.5f;
  return r;
}

// Constants of the F8 format with E exponent bits (M = kMantissaBits).
template <int E>
struct F8Format {
  static constexpr int kBias = (1 << E) - 1;
  static constexpr int kMaxCode = (1 << (E + kMantissaBits)) - 1;
  static constexpr int kShift = 23 - kMantissaBits;                  // fp32 mantissa bits dropped
  static constexpr int32_t kExpOffset = (127 - kBias) << kMantissaBits;  // fp32 exponent bias − F8's, in code units
  static constexpr int32_t kHalf = (1 << (kShift - 1)) - 1;          // round-half-even bias, less the lsb
  static constexpr int kSubExp = kBias - 1 + kMantissaBits;          // subnormal codes: rne(x·2^kSubExp)
  static constexpr float kMinNormal = exp2i(1 - kBias);
  static constexpr int32_t kMinNormalBits = (127 + 1 - kBias) << 23;  // its float32 bit pattern
  static constexpr float kSubStep = exp2i(-kSubExp);
  // Normal codes in one add: the rounding bias less the exponent rebase. Wraps (mod 2^32) only for x below
  // kMinNormal, whose result the subnormal branch replaces.
  static constexpr uint32_t kNormalAdd = static_cast<uint32_t>(kHalf) - (static_cast<uint32_t>(kExpOffset) << kShift);
  // Subnormal codes by a float addition: the ulp of kSubMagic = 2^(23 − kSubExp) is 2^−kSubExp, so for
  // 0 ≤ x < kMinNormal (8 ulps), x + kSubMagic rounds (nearest even) to kSubMagic + rne(x·2^kSubExp)·ulp, and
  // its bit pattern exceeds kSubMagic's by exactly that code.
  static constexpr float kSubMagic = exp2i(23 - kSubExp);
  static constexpr int32_t kSubMagicBits = (127 + 23 - kSubExp) << 23;
  // Normal codes decoded with the exponent rebase folded into the scale (f8_decode_prescaled): bits(c << kShift) is
  // V(c)·2^−(127−bias), and s·kPrescale = s·2^(127−bias) is exact for s < kPrescaleLimit.
  static constexpr float kPrescale = exp2i(127 - kBias);
  static constexpr float kPrescaleLimit = exp2i(kBias + 1);
};

// Scalar building blocks; the CPU SIMD types provide the same names lane by lane. Codes travel as int32,
// bit patterns as uint32.
FD_HD uint32_t fd_bits(float x) { return float_to_bits(x); }
FD_HD int32_t fd_u2i(uint32_t u) { return static_cast<int32_t>(u); }
FD_HD float fd_from_bits(int32_t b) { return bits_to_float(static_cast<uint32_t>(b)); }
FD_HD float fd_to_float(int32_t c) { return static_cast<float>(c); }
FD_HD int32_t fd_select(bool c, int32_t a, int32_t b) { return c ? a : b; }
FD_HD float fd_select(bool c, float a, float b) { return c ? a : b; }
FD_HD int32_t fd_min(int32_t a, int32_t b) { return a < b ? a : b; }
FD_HD int32_t fd_abs_code(int32_t c) { return c < 0 ? -c : c; }
FD_HD float fd_negate_if(int32_t c, float a) { return c < 0 ? -a : a; }  // the SIMD form flips the sign bit
FD_HD bool fd_is_negative(float m) { return m < 0.0f; }  // the split SIMD form compares bit patterns
// x < c for x ≥ +0, −0 or NaN and c > 0 with bit pattern c_bits (the split SIMD form compares |x|'s bits).
FD_HD bool fd_less_nonneg(float x, float c, int32_t) { return x < c; }

// F8(x) for x ≥ 0 (x = |moment|·r or √v·r: +0, −0, positive, or NaN of either sign; NaN → kMaxCode whatever
// its sign bit, so every platform writes the same code). V is float or the SIMD float type. The same codes as
// the rule in docs/state8.md, with fewer operations: the exponent rebase is folded into the rounding add (NaN
// and ±inf still land above kMaxCode, whatever their sign bit) and the subnormal rounding is one float add
// (kSubMagic) instead of a multiply and a round-to-integer.
// f8_encode_unclamped is F8 before the clamp: the same code for x ≤ 1 (and the values just above 1 that round to it),
// a larger one (below 2^12, never negative) for NaN and larger x — so an unsigned saturating narrowing to kMaxCode
// (for E = 5 the AVX-512 form's vpmovusdb, or its vpackusdw/vpackuswb packs where it stores four vectors at once) is the
// clamp.
// kNormal: the caller knows that every x is finite and at least kMinNormal, so the normal branch alone gives the same
// codes (the CPU's vector loop, for a block whose smallest x it has checked: Q8Codec).
template <int E, bool kNormal = false, typename V>
FD_HD auto f8_encode_unclamped(V x) {
  using F = F8Format<E>;
  const auto u = fd_bits(x);
  const auto normal = fd_u2i((u + F::kNormalAdd + ((u >> F::kShift) & 1u)) >> F::kShift);
  if constexpr (kNormal) {
    return normal;
  } else {
    const auto subnormal = fd_u2i(fd_bits(x + F::kSubMagic)) - F::kSubMagicBits;
    // x < kMinNormal: true for −0 (whose x + kSubMagic = kSubMagic gives code 0), false for NaN.
    const auto tiny = fd_less_nonneg(x, F::kMinNormal, F::kMinNormalBits);
    return fd_select(tiny, subnormal, normal);
  }
}

// kNormal: besides, every x is at most 1 + 2^−20 (x = |m|·r or √v·r of a block with a finite normal scale, r = 1/s
// rounded: at most 1 + 2^−20 even where r is subnormal), which rounds to code 1.0 at most: no clamp.
template <int E, bool kNormal = false, typename V>
FD_HD auto f8_encode(V x) {
  if constexpr (kNormal) {
    return f8_encode_unclamped<E, true>(x);
  } else {
    return fd_min(f8_encode_unclamped<E>(x), F8Format<E>::kMaxCode);
  }
}

// V(c) for 0 ≤ c ≤ kMaxCode: the exact value of the code.
template <int E, typename I>
FD_HD auto f8_decode(I c) {
  using F = F8Format<E>;
  const auto normal = fd_from_bits((c + F::kExpOffset) << F::kShift);
  const auto subnormal = fd_to_float(c) * F::kSubStep;  // exact
  return fd_select(c < (1 << kMantissaBits), subnormal, normal);
}

// V(c)·2^−(127−bias) for a normal code c (2^kMantissaBits ≤ c ≤ kMaxCode): its bit pattern, a normal float. So
// V(c)·s = f8_decode_prescaled(c)·(s·kPrescale) — the same real product, rounded once — when s·kPrescale is exact:
// s < kPrescaleLimit (2^16 for m's format, 2^32 for √v's; a NaN or infinite s fails the test). One integer operation
// fewer than f8_decode's normal branch (the CPU's vector loop, for blocks whose codes and scales allow it: Q8Codec).
template <int E, typename I>
FD_HD auto f8_decode_prescaled(I c) {
  return fd_from_bits(c << F8Format<E>::kShift);
}

// The moments. s = the block's scale, r = its encode factor. kNormal as for f8_encode: the block's scale is finite and
// normal and every |m|·r (√v·r) at least the format's kMinNormal.
template <typename V, bool kNormal = false>
FD_HD auto encode_exp_avg(V m, float r) {  // int8 code as int32: sign(m)·F8(|m|·r)
  const auto q = f8_encode<kExpBitsM, kNormal>(fd_abs(m) * r);
  return fd_select(fd_is_negative(m), -q, q);
}

template <typename I>
FD_HD auto decode_exp_avg(I c, float s) {
  return fd_negate_if(c, f8_decode<kExpBitsM>(fd_abs_code(c)) * s);  // −a for c < 0
}

// w = √v of the updated v (the value the update divided by).
template <typename V, bool kNormal = false>
FD_HD auto encode_exp_avg_sq(V w, float r) {
  return f8_encode<kExpBitsV, kNormal>(w * r);
}
template <typename V>
FD_HD auto encode_exp_avg_sq_unclamped(V w, float r) {  // to be narrowed with unsigned saturation at 255
  static_assert(F8Format<kExpBitsV>::kMaxCode == 255, "the saturation is the clamp");
  return f8_encode_unclamped<kExpBitsV>(w * r);
}

template <typename I>
FD_HD auto decode_exp_avg_sq(I c, float s) {
  const auto w = f8_decode<kExpBitsV>(c) * s;  // √v
  return w * w;
}

// decode_exp_avg / decode_exp_avg_sq of normal codes, given s·kPrescale of a scale s below kPrescaleLimit: the same
// values.
template <typename I>
FD_HD auto decode_exp_avg_prescaled(I c, float s_prescaled) {
  return fd_negate_if(c, f8_decode_prescaled<kExpBitsM>(fd_abs_code(c)) * s_prescaled);
}
template <typename I>
FD_HD auto decode_exp_avg_sq_prescaled(I c, float s_prescaled) {
  const auto w = f8_decode_prescaled<kExpBitsV>(c) * s_prescaled;  // √v
  return w * w;
}

}  // namespace state8
}  // namespace fusedecay
