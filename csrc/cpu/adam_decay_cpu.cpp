// CPU multi-tensor AdamHD/AdamC kernel: one pass over θ, g, m, v per step, per-chunk Σ|θ_t|.
//
// Moments reach the shared element function (adam_decay_element) through a codec, a template parameter
// beside the param storage type: ElementwiseCodec<M> for fp32/bf16/fp64 moments (load/store per element)
// and Q8Codec for 8-bit blockwise state (csrc/state8.h: decode per element, keep the block's updated
// moments in registers, encode once its maxima are known) — one update loop for every state format.
//
// Work split: the shared chunk table (chunk_table.h); a launch's tables for its moment formats (8-bit and full
// precision) run in one parallel region. The chunks are divided among threads by element count (contiguous runs of
// chunks, so a thread streams through memory), and a thread done with its run claims chunks left in the others';
// each chunk's partial sum is computed by exactly one thread in a fixed order, so results do not depend on the
// number of threads or on who ran which chunk. The element loop is plain C++ over fixed-width lane blocks that GCC/Clang
// vectorise at -O3 (-fno-math-errno lets sqrt vectorise); on GCC/x86-64 the loop is additionally
// cloned for AVX2 (target_clones) and compiled for AVX-512 (x86-64-v4) as separate functions, one of which is picked
// at load time, since -march is not assumed. -ffp-contract=off keeps every variant's rounding identical.
#include "adam_decay_cpu.h"

#include "../state8.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__)
// All inline helpers taking 64-byte vectors are inlined into the clones; the ABI notes do not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(FUSEDECAY_NO_CLONES)
// The split-vector form is cloned for AVX2 and the baseline; the AVX-512 form is compiled once more, as its own
// functions for x86-64-v4 (FD_ZMM_TARGET), so that it can use AVX-512 instructions GCC does not derive from generic
// vector code (vrangeps, masked operations, saturating narrowing).
#define FD_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#if defined(FUSEDECAY_NO_AVX512)  // the build a CPU without AVX-512 runs, for measuring it on one that has it
#define FD_CPU_ALL_CLONES FD_CPU_CLONES
#else
#define FD_CPU_ALL_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#define FD_CPU_ZMM_CLONE 1
#define FD_ZMM_TARGET __attribute__((target("arch=x86-64-v4")))
#endif
#else
#define FD_CPU_CLONES
#define FD_CPU_ALL_CLONES
#endif

#if defined(FD_CPU_ZMM_CLONE)
#include <immintrin.h>
#endif

#if defined(__GNUC__)
#define FD_ALWAYS_INLINE inline __attribute__((always_inline))
// On the entry points: inline everything they call (adam_decay_element included), so the vector
// code is compiled inside each target_clones variant with that variant's ISA.
#define FD_FLATTEN __attribute__((flatten))
// On a lambda in such code: flatten alone leaves the AVX-512 helpers it calls out of line (a call per vector).
#define FD_LAMBDA_INLINE __attribute__((always_inline))
#else
#define FD_ALWAYS_INLINE inline
#define FD_FLATTEN
#define FD_LAMBDA_INLINE
#endif

namespace fusedecay {
namespace cpu {
namespace {

// How the 16-lane values are written (S, a template parameter of the SIMD types and the codecs). GCC handles a
// 64-byte generic vector badly wherever no register holds one (the AVX2 and baseline clones, other architectures):
// kept in a struct it lives in memory and moves through the stack and general registers; a compare feeding a select
// (`m ? a : b`, or the same with &, |) becomes a scalar compare and branch per lane; 16 bytes widened to int32 lanes
// go through the stack in pieces (a stalled store forward); int32 lanes narrowed to bytes are assembled byte by
// byte. 8-bit state ran 12× slower there than with AVX-512, fp32 moments ~1.4×. kSplitVectors holds two 32-byte
// halves, makes masks from the sign of a difference (an arithmetic shift), selects with bit operations, widens
// bytes from 4-byte words by variable shifts and narrows in two packing steps. kZmmVectors (the AVX-512 functions)
// holds one 64-byte vector and keeps compares into mask registers, blends and one-instruction widening and
// narrowing, plus a few AVX-512 instructions written as intrinsics (marked "AVX-512 form"). Both give the same lanes,
// bit for bit.
enum VectorForm : int { kSplitVectors = 0, kZmmVectors = 1 };

// Whether the AVX-512 form runs here (the CPU has x86-64-v4's AVX-512 subsets); read once. Without clones or in a
// build without the AVX-512 form: the split form. FUSEDECAY_CPU_VECTORS=split runs the split form's clones on an
// AVX-512 CPU (its AVX2 clone: what a CPU without AVX-512 runs), so that they are tested there.
FD_ALWAYS_INLINE bool zmm_clones() {
#if defined(FD_CPU_ZMM_CLONE)
  static const bool v = [] {
    const char* forced = std::getenv("FUSEDECAY_CPU_VECTORS");
    if (forced != nullptr && std::strcmp(forced, "split") == 0) return false;
    __builtin_cpu_init();
    // x86-64-v4's AVX-512 subsets, named one by one (GCC 11 has no "x86-64-v4" in __builtin_cpu_supports).
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return v;
#else
  return false;
#endif
}

// Lanes per inner block: 64 bytes of math values (one AVX-512 register, two AVX2, four SSE).
template <typename T>
constexpr int kLanes = 64 / static_cast<int>(sizeof(T));
// Elements per sub-block: the update loop runs over one sub-block, then |θ| of it is summed per
// lane in T (at most kSub/kLanes terms a lane) and joins the chunk's partial in double, which keeps
// fp32 sums accurate. 1024 elements: the sub-block's θ is still in L1 when it is summed.
constexpr int64_t kSub = 1024;

// Raw element type and conversions of a storage type (bf16 is walked as uint16_t so the compiler
// sees plain integer loads/stores it can vectorise).
template <typename S>
struct Io {
  using raw = S;
  static FD_ALWAYS_INLINE S load(S x) { return x; }
  template <typename T>
  static FD_ALWAYS_INLINE S store(T x) { return static_cast<S>(x); }
};
template <>
struct Io<BF16> {
  using raw = uint16_t;
  static FD_ALWAYS_INLINE float load(uint16_t x) { return bf16_bits_to_float(x); }
  static FD_ALWAYS_INLINE uint16_t store(float x) { return float_to_bf16_bits(x); }
};

#if defined(__GNUC__) && !defined(__clang__) && !defined(FUSEDECAY_NO_SIMD)
#define FD_CPU_SIMD 1
// 16 float lanes (64 bytes) as GCC generic vectors: one 64-byte vector in the AVX-512 form, two 32-byte halves in the
// split form (a 64-byte aggregate that no register holds is kept in memory by GCC and moved through the stack and
// general registers; 32-byte halves stay in ymm registers on AVX2 and become xmm pairs on the baseline). The
// arithmetic is lane-wise IEEE (no FMA under -ffp-contract=off, no reciprocal tricks), so each lane rounds exactly
// as the scalar code.
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef int16_t i16x16 __attribute__((vector_size(32)));
constexpr int kVecLanes = 16;
static_assert(kVecLanes == kLanes<float>, "the vector accumulators must match abs_sum_block's lanes");

// The registers of one 16-lane value: kParts vectors of kPartLanes lanes.
template <int S>
struct Parts;
template <>
struct Parts<kZmmVectors> {
  static constexpr int kParts = 1;
  typedef f32x16 F;
  typedef i32x16 I;
  typedef u32x16 U;
};
template <>
struct Parts<kSplitVectors> {
  static constexpr int kParts = 2;
  typedef f32x8 F;
  typedef i32x8 I;
  typedef u32x8 U;
};
template <int S>
constexpr int kPartLanes = kVecLanes / Parts<S>::kParts;

template <int S>
struct F16 {
  typename Parts<S>::F v[Parts<S>::kParts];
};
// 16 int32 lanes (8-bit codes, lane masks of 0 / −1) and 16 uint32 lanes (fp32 bit patterns), with the lane-wise
// forms of the state8.h building blocks (the same integer and IEEE operations as the scalar ones).
template <int S>
struct I16 {
  typename Parts<S>::I v[Parts<S>::kParts];
};
template <int S>
struct U16 {
  typename Parts<S>::U v[Parts<S>::kParts];
};

// r.v[h] = fn(h) for every part h.
template <typename R, typename Fn>
FD_ALWAYS_INLINE R per_part(Fn fn) {
  R r;
  for (int h = 0; h < static_cast<int>(sizeof(r.v) / sizeof(r.v[0])); ++h) r.v[h] = fn(h);
  return r;
}
#define FD_PARTS(R, EXPR) per_part<R>([&](int h) { return EXPR; })

template <int S>
FD_ALWAYS_INLINE F16<S> operator+(F16<S> a, F16<S> b) { return FD_PARTS(F16<S>, a.v[h] + b.v[h]); }
template <int S>
FD_ALWAYS_INLINE F16<S> operator-(F16<S> a, F16<S> b) { return FD_PARTS(F16<S>, a.v[h] - b.v[h]); }
template <int S>
FD_ALWAYS_INLINE F16<S> operator*(F16<S> a, F16<S> b) { return FD_PARTS(F16<S>, a.v[h] * b.v[h]); }
template <int S>
FD_ALWAYS_INLINE F16<S> operator/(F16<S> a, F16<S> b) { return FD_PARTS(F16<S>, a.v[h] / b.v[h]); }
template <int S>
FD_ALWAYS_INLINE F16<S> operator+(F16<S> a, float b) { return FD_PARTS(F16<S>, a.v[h] + b); }
template <int S>
FD_ALWAYS_INLINE F16<S> operator-(F16<S> a, float b) { return FD_PARTS(F16<S>, a.v[h] - b); }
template <int S>
FD_ALWAYS_INLINE F16<S> operator*(F16<S> a, float b) { return FD_PARTS(F16<S>, a.v[h] * b); }
template <int S>
FD_ALWAYS_INLINE F16<S> operator*(float a, F16<S> b) { return FD_PARTS(F16<S>, a * b.v[h]); }
template <int S>
FD_ALWAYS_INLINE F16<S> operator-(F16<S> a) { return FD_PARTS(F16<S>, -a.v[h]); }
template <int S>
FD_ALWAYS_INLINE F16<S> fd_sqrt(F16<S> a) {
  F16<S> r;
  for (int h = 0; h < Parts<S>::kParts; ++h) {
    for (int k = 0; k < kPartLanes<S>; ++k) r.v[h][k] = __builtin_sqrtf(a.v[h][k]);  // one vsqrtps per register
  }
  return r;
}
template <int S>
FD_ALWAYS_INLINE U16<S> fd_bits(F16<S> x) { return FD_PARTS(U16<S>, (typename Parts<S>::U)x.v[h]); }
template <int S>
FD_ALWAYS_INLINE I16<S> fd_u2i(U16<S> u) { return FD_PARTS(I16<S>, (typename Parts<S>::I)u.v[h]); }
template <int S>
FD_ALWAYS_INLINE F16<S> fd_from_bits(I16<S> b) { return FD_PARTS(F16<S>, (typename Parts<S>::F)b.v[h]); }
template <int S>
FD_ALWAYS_INLINE F16<S> fd_from_bits(U16<S> b) { return FD_PARTS(F16<S>, (typename Parts<S>::F)b.v[h]); }
template <int S>
FD_ALWAYS_INLINE F16<S> fd_to_float(I16<S> c) {
  return FD_PARTS(F16<S>, __builtin_convertvector(c.v[h], typename Parts<S>::F));
}
template <int S>
FD_ALWAYS_INLINE F16<S> fd_abs(F16<S> x) { return fd_from_bits(fd_bits(x) & 0x7fffffffu); }
template <int S>
FD_ALWAYS_INLINE I16<S> operator-(I16<S> a) { return FD_PARTS(I16<S>, -a.v[h]); }
template <int S>
FD_ALWAYS_INLINE I16<S> operator+(I16<S> a, int32_t b) { return FD_PARTS(I16<S>, a.v[h] + b); }
template <int S>
FD_ALWAYS_INLINE I16<S> operator-(I16<S> a, int32_t b) { return FD_PARTS(I16<S>, a.v[h] - b); }
template <int S>
FD_ALWAYS_INLINE I16<S> operator<<(I16<S> a, int b) { return FD_PARTS(I16<S>, a.v[h] << b); }
template <int S>
FD_ALWAYS_INLINE U16<S> operator&(U16<S> a, uint32_t b) { return FD_PARTS(U16<S>, a.v[h] & b); }
template <int S>
FD_ALWAYS_INLINE U16<S> operator|(U16<S> a, U16<S> b) { return FD_PARTS(U16<S>, a.v[h] | b.v[h]); }
template <int S>
FD_ALWAYS_INLINE U16<S> operator+(U16<S> a, uint32_t b) { return FD_PARTS(U16<S>, a.v[h] + b); }
template <int S>
FD_ALWAYS_INLINE U16<S> operator+(U16<S> a, U16<S> b) { return FD_PARTS(U16<S>, a.v[h] + b.v[h]); }
template <int S>
FD_ALWAYS_INLINE U16<S> operator>>(U16<S> a, int b) { return FD_PARTS(U16<S>, a.v[h] >> b); }
template <int S>
FD_ALWAYS_INLINE U16<S> operator<<(U16<S> a, int b) { return FD_PARTS(U16<S>, a.v[h] << b); }
// Lane-wise minimum and maximum (vpminsd/vpminud/vpmaxud: GCC recognises the compare-and-select as one). The
// constant is compared on the left: GCC 12 rewrites `a < 255 ? a : 255` as `a <= 254 ? a : 255`, which it no longer
// sees as a minimum (a compare and a blend).
template <int S>
FD_ALWAYS_INLINE I16<S> fd_min(I16<S> a, int32_t b) {
  const typename Parts<S>::I bv = typename Parts<S>::I{} + b;
  return FD_PARTS(I16<S>, bv < a.v[h] ? bv : a.v[h]);
}
template <int S>
FD_ALWAYS_INLINE U16<S> fd_min(U16<S> a, U16<S> b) { return FD_PARTS(U16<S>, a.v[h] < b.v[h] ? a.v[h] : b.v[h]); }
template <int S>
FD_ALWAYS_INLINE U16<S> fd_max(U16<S> a, U16<S> b) { return FD_PARTS(U16<S>, b.v[h] > a.v[h] ? b.v[h] : a.v[h]); }
template <int S>
FD_ALWAYS_INLINE I16<S> fd_abs_code(I16<S> c) { return FD_PARTS(I16<S>, c.v[h] < 0 ? -c.v[h] : c.v[h]); }
// clip(x, −d, d) for d ≥ 0 as sign(x)·min(|x|, d), the minimum taken on the bit patterns (non-negative floats order
// like their bits): an integer min, where a float compare and select would be scalarised in the split form. Equal to
// the scalar fd_clip for every non-NaN x (and d NaN or +inf leave x as it is, as there); for a NaN x it gives ±d
// where fd_clip keeps the NaN, which the callers subtract from an expression already holding that NaN, so θ_t is the
// same NaN.
#if defined(FD_CPU_ZMM_CLONE)
FD_ZMM_TARGET inline f32x16 clip_zmm(f32x16 x, float d) {
  return (f32x16)_mm512_range_ps((__m512)x, _mm512_set1_ps(d), 0x02);
}
#endif
template <int S>
FD_ALWAYS_INLINE F16<S> fd_clip(F16<S> x, float d) {
#if defined(FD_CPU_ZMM_CLONE)
  if constexpr (S == kZmmVectors) {
    // AVX-512 form: vrangeps 0b0010, the smaller magnitude of x and d with x's sign, in one instruction. Like the
    // integer minimum below, it returns the other operand where one is a (quiet) NaN: x for a NaN d, ±d for a NaN x.
    return F16<S>{{clip_zmm(x.v[0], d)}};
  }
#endif
  const U16<S> xb = fd_bits(x);
  const U16<S> db = FD_PARTS(U16<S>, typename Parts<S>::U{} + (float_to_bits(d) & 0x7fffffffu));  // −0.0 clips to ±0
  return fd_from_bits(fd_min(xb & 0x7fffffffu, db) | (xb & 0x80000000u));
}
// a < b as a lane mask; split form: the sign of a − b, for operands whose difference fits in int32 (the codec
// compares codes and non-negative bit patterns).
template <int S>
FD_ALWAYS_INLINE I16<S> operator<(I16<S> a, int32_t b) {
  if constexpr (S == kZmmVectors) {
    return FD_PARTS(I16<S>, a.v[h] < b);
  } else {
    return FD_PARTS(I16<S>, (a.v[h] - b) >> 31);
  }
}
// mask ? a : b lane by lane (a blend, or bit operations).
template <int S>
FD_ALWAYS_INLINE I16<S> fd_select(I16<S> mask, I16<S> a, I16<S> b) {
  if constexpr (S == kZmmVectors) {
    return FD_PARTS(I16<S>, mask.v[h] ? a.v[h] : b.v[h]);
  } else {
    return FD_PARTS(I16<S>, (a.v[h] & mask.v[h]) | (b.v[h] & ~mask.v[h]));
  }
}
template <int S>
FD_ALWAYS_INLINE F16<S> fd_select(I16<S> mask, F16<S> a, F16<S> b) {
  return fd_from_bits(fd_select(mask, fd_u2i(fd_bits(a)), fd_u2i(fd_bits(b))));
}
// m < 0 as a lane mask, as the scalar m < 0.0f (a negative NaN is not below 0). Split form: the negative non-NaN
// floats are the int32 patterns t ≤ that of −inf, −2^23 (−0 included too, whose code is 0 either way); min(t, 0)
// keeps t + 2^23 − 1 from overflowing.
template <int S>
FD_ALWAYS_INLINE I16<S> fd_is_negative(F16<S> m) {
  if constexpr (S == kZmmVectors) {
    return FD_PARTS(I16<S>, m.v[h] < 0.0f);
  } else {
    const I16<S> t = fd_u2i(fd_bits(m));
    return FD_PARTS(I16<S>, ((t.v[h] < 0 ? t.v[h] : typename Parts<S>::I{}) + ((1 << 23) - 1)) >> 31);
  }
}
// x < c for x ≥ +0, −0 or NaN and c > 0 (c_bits: its bit pattern), as a lane mask. Split form: |x|'s bits below
// c's (a NaN of either sign lies above every finite value's pattern).
template <int S>
FD_ALWAYS_INLINE I16<S> fd_less_nonneg(F16<S> x, float c, int32_t c_bits) {
  if constexpr (S == kZmmVectors) {
    return FD_PARTS(I16<S>, x.v[h] < c);
  } else {
    const I16<S> mag = fd_u2i(fd_bits(x) & 0x7fffffffu);
    return FD_PARTS(I16<S>, (mag.v[h] - c_bits) >> 31);
  }
}
// The lanes of float bit patterns u that hold a NaN (|x|'s bits above those of inf).
template <int S>
FD_ALWAYS_INLINE I16<S> nan_mask(U16<S> u) {
  const I16<S> mag = fd_u2i(u & 0x7fffffffu);
  if constexpr (S == kZmmVectors) {
    return FD_PARTS(I16<S>, mag.v[h] > 0x7f800000);
  } else {
    return FD_PARTS(I16<S>, (0x7f800000 - mag.v[h]) >> 31);
  }
}
// −a where c < 0: the sign bit of c flipped into a (one vpternlogd; the scalar form's c < 0 ? −a : a, NaNs included).
template <int S>
FD_ALWAYS_INLINE F16<S> fd_negate_if(I16<S> c, F16<S> a) {
  const U16<S> ab = fd_bits(a);
  return FD_PARTS(F16<S>, (typename Parts<S>::F)(ab.v[h] ^ ((typename Parts<S>::U)c.v[h] & 0x80000000u)));
}
// The largest lane (of |x| bits: state8::abs_bits).
template <int S>
FD_ALWAYS_INLINE uint32_t hmax(U16<S> x) {
  typename Parts<S>::U m = x.v[0];
  for (int h = 1; h < Parts<S>::kParts; ++h) m = x.v[h] > m ? x.v[h] : m;
  uint32_t r = 0;
  for (int k = 0; k < kPartLanes<S>; ++k) r = m[k] > r ? m[k] : r;
  return r;
}
// Whether any lane of x is below c (x and c as for fd_less_nonneg: a NaN lane is not).
#if defined(FD_CPU_ZMM_CLONE)
FD_ZMM_TARGET inline bool any_below_zmm(f32x16 x, float c) {
  return _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(c), _CMP_LT_OQ) != 0;
}
#endif
template <int S>
FD_ALWAYS_INLINE bool any_below(F16<S> x, float c, int32_t c_bits) {
#if defined(FD_CPU_ZMM_CLONE)
  if constexpr (S == kZmmVectors) return any_below_zmm(x.v[0], c);
#endif
  const I16<S> mask = fd_less_nonneg(x, c, c_bits);
  typename Parts<S>::I a = mask.v[0];
  for (int h = 1; h < Parts<S>::kParts; ++h) a |= mask.v[h];
  int32_t r = 0;
  for (int k = 0; k < kPartLanes<S>; ++k) r |= a[k];
  return r != 0;
}
// The scalar overloads stay visible next to the lane-wise ones declared in this namespace.
using ::fusedecay::fd_abs;
using ::fusedecay::fd_sqrt;
// 16 codes to and from bytes (int8 codes sign-extended, uint8 zero-extended).
template <int S, typename B>
FD_ALWAYS_INLINE I16<S> load_codes(const B* p) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  if constexpr (S == kSplitVectors) {
    // Lane k is byte k%4 of word k/4, shifted to the top and back (vpshufd, vpsllvd, vpsrad/vpsrld per 8 lanes):
    // a lane loop compiles to narrower pieces put together through the stack, which stalls store forwarding.
    uint32_t q[4];
    std::memcpy(q, p, sizeof q);
    I16<S> r;
    for (int h = 0; h < 2; ++h) {
      const u32x8 w = {q[2 * h], q[2 * h], q[2 * h], q[2 * h], q[2 * h + 1], q[2 * h + 1], q[2 * h + 1], q[2 * h + 1]};
      const u32x8 top = w << u32x8{24, 16, 8, 0, 24, 16, 8, 0};
      if constexpr (std::is_signed<B>::value) {
        r.v[h] = (i32x8)top >> 24;
      } else {
        r.v[h] = (i32x8)(top >> 24);
      }
    }
    return r;
  }
#endif
  I16<S> w;
  for (int k = 0; k < kVecLanes; ++k) w.v[k / kPartLanes<S>][k % kPartLanes<S>] = p[k];  // vpmovsxbd / vpmovzxbd
  return w;
}
template <int S, typename B>
FD_ALWAYS_INLINE void store_codes(B* p, I16<S> c) {  // c in B's range
  typedef B b16 __attribute__((vector_size(16)));
  b16 b;
  if constexpr (S == kSplitVectors) {
    i32x16 whole;  // the two halves side by side (two 32-byte stores and loads), then two packs and their fix-ups
    std::memcpy(&whole, &c.v[0], sizeof c.v[0]);
    std::memcpy(reinterpret_cast<char*>(&whole) + sizeof c.v[0], &c.v[1], sizeof c.v[1]);
    b = __builtin_convertvector(__builtin_convertvector(whole, i16x16), b16);
  } else {
    b = __builtin_convertvector(c.v[0], b16);  // vpmovdb
  }
  std::memcpy(p, &b, sizeof b);
}

#if defined(FD_CPU_ZMM_CLONE)
// AVX-512 form of state8::f8_decode (0 ≤ c ≤ kMaxCode), the same values: a normal code is the bit pattern
// (c + rebase) << 20; a subnormal one (c = f < 8) is decoded as the normal code 8 + f, 2^(1−bias)·(1 + f/8), less
// 2^(1−bias) — exactly f·2^(1−bias−3) (Sterbenz) — by two masked operations (state8.h's int→float conversion,
// multiplication and select take one more).
template <int E>
FD_ZMM_TARGET inline f32x16 f8_decode_zmm(i32x16 c) {
  using F = state8::F8Format<E>;
  const __mmask16 sub = _mm512_cmplt_epi32_mask((__m512i)c, _mm512_set1_epi32(1 << state8::kMantissaBits));
  __m512i b = _mm512_slli_epi32(_mm512_add_epi32((__m512i)c, _mm512_set1_epi32(F::kExpOffset)), F::kShift);
  b = _mm512_mask_add_epi32(b, sub, b, _mm512_set1_epi32(1 << 23));  // exponent field 0 → 1
  const __m512 x = _mm512_castsi512_ps(b);
  return (f32x16)_mm512_mask_sub_ps(x, sub, x, _mm512_set1_ps(F::kMinNormal));
}
// f8_decode_zmm of |c| (vpabsd).
template <int E>
FD_ZMM_TARGET inline f32x16 f8_decode_abs_zmm(i32x16 c) {
  return f8_decode_zmm<E>((i32x16)_mm512_abs_epi32((__m512i)c));
}
// block_codes_normal (below) 64 bytes at a time: the smallest |m code| and v code of the block, compared with 8.
FD_ZMM_TARGET inline bool block_codes_normal_zmm(const int8_t* m, const uint8_t* v) {
  const __m512i am = _mm512_min_epu8(_mm512_abs_epi8(_mm512_loadu_si512(m)), _mm512_abs_epi8(_mm512_loadu_si512(m + 64)));
  const __m512i av = _mm512_min_epu8(_mm512_loadu_si512(v), _mm512_loadu_si512(v + 64));
  return _mm512_cmplt_epu8_mask(_mm512_min_epu8(am, av), _mm512_set1_epi8(1 << state8::kMantissaBits)) == 0;
}
// state8::f8_decode_prescaled<E> of |c|, |c| by vpabsd: from state8's fd_abs_code GCC takes |c| on the bytes and
// widens them a second time (one operation more).
template <int E>
FD_ZMM_TARGET inline f32x16 f8_decode_prescaled_abs_zmm(i32x16 c) {
  return state8::f8_decode_prescaled<E>(I16<kZmmVectors>{{(i32x16)_mm512_abs_epi32((__m512i)c)}}).v[0];
}
// state8::f8_encode<E, kNormal = true>: (u + kNormalAdd + ((u >> kShift) & 1)) >> kShift on the bits u of x, with the
// round-to-even bit tested into a mask (vptestmd) and added by a masked add: four operations instead of five, one
// shift fewer.
template <int E>
FD_ZMM_TARGET inline i32x16 f8_encode_normal_zmm(f32x16 x) {
  using F = state8::F8Format<E>;
  const __m512i u = _mm512_castps_si512((__m512)x);
  const __mmask16 odd = _mm512_test_epi32_mask(u, _mm512_set1_epi32(1 << F::kShift));
  const __m512i even = _mm512_add_epi32(u, _mm512_set1_epi32(static_cast<int32_t>(F::kNormalAdd)));
  const __m512i t = _mm512_mask_add_epi32(even, odd, u, _mm512_set1_epi32(static_cast<int32_t>(F::kNormalAdd + 1u)));
  return (i32x16)_mm512_srli_epi32(t, F::kShift);
}
// 16 codes in 0…2^31 to bytes with unsigned saturation at 255 (vpmovusdb).
FD_ZMM_TARGET inline void store_codes_saturated(uint8_t* p, I16<kZmmVectors> c) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtusepi32_epi8((__m512i)c.v[0]));
}
// 64 codes, four vectors' int32 lanes, stored as bytes in order by two in-lane packs with saturation and one dword
// permutation: four shuffle operations where four vpmovdb (or vpmovusdb) take eight. Signed (m): the codes are in
// −127…127, so the signed saturation changes nothing. Unsigned (v): codes in 0…2^12 (f8_encode_unclamped; never
// negative), saturated at 255 — the clamp, as vpmovusdb does it. In each 128-bit lane L the packs leave the dwords
// (a, b, c, d)[4L…4L+3]; vpermd puts the four lanes' pieces of a first, then b, c, d.
template <bool kSigned>
FD_ZMM_TARGET inline void store_codes4_zmm(void* p, const i32x16 (&c)[4]) {
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  __m512i bytes;
  if constexpr (kSigned) {
    bytes = _mm512_packs_epi16(_mm512_packs_epi32((__m512i)c[0], (__m512i)c[1]),
                               _mm512_packs_epi32((__m512i)c[2], (__m512i)c[3]));
  } else {
    bytes = _mm512_packus_epi16(_mm512_packus_epi32((__m512i)c[0], (__m512i)c[1]),
                                _mm512_packus_epi32((__m512i)c[2], (__m512i)c[3]));
  }
  _mm512_storeu_si512(p, _mm512_permutexvar_epi32(order, bytes));
}
#endif

// Vector load / store of 16 elements of storage type T; store returns the stored value widened
// back to float (what Σ|θ_t| sums).
template <typename T>
struct VecIo;
template <>
struct VecIo<float> {
  template <int S>
  static FD_ALWAYS_INLINE F16<S> load(const float* p) {
    F16<S> r;
    for (int h = 0; h < Parts<S>::kParts; ++h) std::memcpy(&r.v[h], p + h * kPartLanes<S>, sizeof r.v[h]);
    return r;
  }
  template <int S>
  static FD_ALWAYS_INLINE F16<S> store(float* p, F16<S> x) {
    for (int h = 0; h < Parts<S>::kParts; ++h) std::memcpy(p + h * kPartLanes<S>, &x.v[h], sizeof x.v[h]);
    return x;
  }
};
template <>
struct VecIo<BF16> {
  template <int S>
  static FD_ALWAYS_INLINE F16<S> load(const uint16_t* p) {
    // A lane loop rather than __builtin_convertvector: GCC 12 turns it into one zero-extending
    // load per register (vpmovzxwd) where the convertvector lowering splits it into halves.
    U16<S> w;
    for (int k = 0; k < kVecLanes; ++k) w.v[k / kPartLanes<S>][k % kPartLanes<S>] = static_cast<uint32_t>(p[k]) << 16;
    return fd_from_bits(w);
  }
  // float_to_bf16_bits lane by lane: round to nearest even, NaN (|x| bits above 0x7f800000) → 0x7FC0.
  template <int S>
  static FD_ALWAYS_INLINE F16<S> store(uint16_t* p, F16<S> x) {
    const U16<S> u = fd_bits(x);
    const U16<S> rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const U16<S> nan = FD_PARTS(U16<S>, typename Parts<S>::U{} + 0x7fc0u);
    const U16<S> bits = FD_PARTS(U16<S>, (typename Parts<S>::U)fd_select(nan_mask(u), fd_u2i(nan), fd_u2i(rounded)).v[h]);
    for (int h = 0; h < Parts<S>::kParts; ++h) {
      typedef uint16_t h16 __attribute__((vector_size(2 * kPartLanes<S>)));
      const h16 half = __builtin_convertvector(bits.v[h], h16);
      std::memcpy(p + h * kPartLanes<S>, &half, sizeof half);
    }
    return fd_from_bits(bits << 16);
  }
};

// Whether every code of the 8-bit block at m, v is a normal one (|m code| ≥ 8, v code ≥ 8: no subnormal value; the
// int8 code −128, never written, counts as 128 here and in fd_abs_code), so that the block decodes with
// state8's normal-code decode (with scales in range: state8::f8_decode_prescaled).
template <int S>
FD_ALWAYS_INLINE bool block_codes_normal(const int8_t* __restrict m, const uint8_t* __restrict v) {
#if defined(FD_CPU_ZMM_CLONE)
  if constexpr (S == kZmmVectors) return block_codes_normal_zmm(m, v);
#endif
  unsigned lo = 255;
  for (int k = 0; k < state8::kBlock; ++k) {
    const unsigned am = static_cast<uint8_t>(m[k] < 0 ? -m[k] : m[k]);
    lo = std::min(lo, std::min(am, static_cast<unsigned>(v[k])));
  }
  return lo >= (1u << state8::kMantissaBits);
}
#undef FD_PARTS
#endif

// Σ|θ| of n stored values: per-lane accumulators in T (a fixed, ISA-independent order), folded
// lane 0..L-1 then the tail.
template <typename P, typename T>
FD_ALWAYS_INLINE T abs_sum_block(const typename Io<P>::raw* __restrict p, int64_t n) {
  constexpr int L = kLanes<T>;
  T acc[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int k = 0; k < L; ++k) acc[k] += fd_abs(static_cast<T>(Io<P>::load(p[i + k])));
  }
  T tail = T(0);
  for (; i < n; ++i) tail += fd_abs(static_cast<T>(Io<P>::load(p[i])));
  T sum = T(0);
  for (int k = 0; k < L; ++k) sum += acc[k];
  return sum + tail;
}

// Pointers and length of one chunk (the scales are null unless the moments are 8-bit).
struct ChunkArgs {
  void* p;
  const void* g;
  void* m;
  void* v;
  float* m_scale;
  float* v_scale;
  int64_t n;
  int64_t prefetch;  // software prefetch distance in elements for element-wise moments (0: none); see update_chunk
};

// Moments stored element by element (fp32, bf16, fp64): kGroup = 1, keep() stores at once. S: the VectorForm of the
// vector path (only bf16 stores make a mask).
template <typename M, typename T, int S>
struct ElementwiseCodec {
  using MR = typename Io<M>::raw;
  static constexpr int kForm = S;
  static constexpr int kGroup = 1;  // lane blocks per group
  static constexpr int64_t kPrefetch = 0;  // the distance is the run-time ChunkArgs::prefetch (see update_chunk)
  MR* __restrict m;
  MR* __restrict v;
  explicit ElementwiseCodec(const ChunkArgs& a) : m(static_cast<MR*>(a.m)), v(static_cast<MR*>(a.v)) {}
  // The moments of the vector at element i (one cache line or half of one).
  FD_ALWAYS_INLINE void prefetch(int64_t i) const {
    __builtin_prefetch(m + i, 1);
    __builtin_prefetch(v + i, 1);
  }
  FD_ALWAYS_INLINE void begin_group(int64_t) {}
  FD_ALWAYS_INLINE T load_m1(int64_t i) const { return Io<M>::load(m[i]); }
  FD_ALWAYS_INLINE T load_v1(int64_t i) const { return Io<M>::load(v[i]); }
  FD_ALWAYS_INLINE void keep1(int, int64_t i, T mm, T vv) {
    m[i] = Io<M>::store(mm);
    v[i] = Io<M>::store(vv);
  }
  FD_ALWAYS_INLINE void end_group1(int64_t) {}
#if defined(FD_CPU_SIMD)
  FD_ALWAYS_INLINE F16<S> load_m(int64_t i) const { return VecIo<M>::template load<S>(m + i); }
  FD_ALWAYS_INLINE F16<S> load_v(int64_t i) const { return VecIo<M>::template load<S>(v + i); }
  FD_ALWAYS_INLINE void keep(int, int64_t i, F16<S> mm, F16<S> vv) {
    VecIo<M>::store(m + i, mm);
    VecIo<M>::store(v + i, vv);
  }
#endif
};

// 8-bit blockwise moments (csrc/state8.h): a group is one block of state8::kBlock elements. begin_group
// reads the block's old scales; loads decode; keep() holds the updated m and √v; end_group1 (on the vector path
// finish_group, then encode per vector) takes the block maxima, writes the new scales and encodes the codes. Chunks
// start on block boundaries and 8-bit tensors have a multiple of kBlock elements (the glue checks both), so there is
// never a partial group.
template <int S>
struct Q8Codec {
  static constexpr int kForm = S;
  static constexpr int kGroup = state8::kBlock / kLanes<float>;
  static constexpr int64_t kPrefetch = 512;  // elements ahead (see update_chunk)
  int8_t* __restrict m;
  uint8_t* __restrict v;
  float* __restrict m_scale;
  float* __restrict v_scale;
  float sm = 0.0f, sv = 0.0f;  // scales of the current block
  float km1[state8::kBlock], kw1[state8::kBlock];  // scalar path: the block's updated m and √v
  explicit Q8Codec(const ChunkArgs& a)
      : m(static_cast<int8_t*>(a.m)), v(static_cast<uint8_t*>(a.v)), m_scale(a.m_scale), v_scale(a.v_scale) {}
  // The codes of the block at element i (one cache line per 64 codes).
  FD_ALWAYS_INLINE void prefetch(int64_t i) const {
    for (int c = 0; c < state8::kBlock; c += 64) {
      __builtin_prefetch(m + i + c, 1);
      __builtin_prefetch(v + i + c, 1);
    }
  }
  FD_ALWAYS_INLINE void begin_group(int64_t i) {
    sm = m_scale[i / state8::kBlock];
    sv = v_scale[i / state8::kBlock];
  }
  FD_ALWAYS_INLINE float load_m1(int64_t i) const { return state8::decode_exp_avg<int32_t>(m[i], sm); }
  FD_ALWAYS_INLINE float load_v1(int64_t i) const { return state8::decode_exp_avg_sq<int32_t>(v[i], sv); }
  FD_ALWAYS_INLINE void keep1(int slot, int64_t, float mm, float vv) {
    km1[slot] = mm;
    kw1[slot] = fd_sqrt(vv);
  }
  FD_ALWAYS_INLINE void end_group1(int64_t i) {
    uint32_t bm = 0, bw = 0;
    for (int k = 0; k < state8::kBlock; ++k) {
      bm = std::max(bm, state8::abs_bits(km1[k]));
      bw = std::max(bw, state8::abs_bits(kw1[k]));
    }
    float rm, rw;
    finish_scales(i, bm, bw, rm, rw);
    for (int k = 0; k < state8::kBlock; ++k) {
      m[i + k] = static_cast<int8_t>(state8::encode_exp_avg<float>(km1[k], rm));
      v[i + k] = static_cast<uint8_t>(state8::encode_exp_avg_sq<float>(kw1[k], rw));
    }
  }
  // Stores the block's scales from the maxima' bits and gives their encode factors.
  FD_ALWAYS_INLINE void finish_scales(int64_t i, uint32_t bm, uint32_t bw, float& rm, float& rw) {
    const float new_sm = bits_to_float(bm), new_sw = bits_to_float(bw);
    m_scale[i / state8::kBlock] = new_sm;
    v_scale[i / state8::kBlock] = new_sw;
    rm = state8::encode_factor(new_sm);
    rw = state8::encode_factor(new_sw);
  }
#if defined(FD_CPU_SIMD)
  // Vector path. Subnormal codes are rare (a value below 2^−14 of its block's largest |m|, 2^−30 of the largest √v;
  // exact zeros), so each block is checked once, and a block without them decodes and encodes with the normal
  // branches of state8.h alone (kNormal: the same codes and values, ~10 fewer vector operations per 16 elements).
  // Decoding: every code of the block normal and both scales below the formats' kPrescaleLimit (begin_vector_group),
  // then the decode folds the exponent rebase into the scale (state8::f8_decode_prescaled; one integer operation
  // fewer per code). Encoding: every new |m|·r_m and √v·r_w at least
  // the format's smallest normal, known from the lane-wise minima of |m| and √v (finish_group; r ≥ 0 and rounding
  // is monotonic, so the smallest product is the product of the smallest).
  F16<S> km[kGroup], kw[kGroup];  // the block's updated m and √v
  bool codes_normal = false, values_normal = false;
  float sm_prescaled = 0.0f, sv_prescaled = 0.0f;  // the scales times the formats' kPrescale (for codes_normal blocks)
  FD_ALWAYS_INLINE void begin_vector_group(int64_t i) {
    using FM = state8::F8Format<state8::kExpBitsM>;
    using FV = state8::F8Format<state8::kExpBitsV>;
    begin_group(i);
    // The normal-code decode folds the exponent rebase into the scales (state8::f8_decode_prescaled), exact for scales
    // below the formats' kPrescaleLimit (2^16 for m, 2^32 for √v; NaN fails): larger ones take the general decode.
    codes_normal = sm < FM::kPrescaleLimit && sv < FV::kPrescaleLimit && block_codes_normal<S>(m + i, v + i);
    sm_prescaled = sm * FM::kPrescale;
    sv_prescaled = sv * FV::kPrescale;
  }
  // Decoding (kNormal: codes_normal holds).
  template <bool kNormal>
  FD_ALWAYS_INLINE F16<S> load_m(int64_t i) const {
    const I16<S> c = load_codes<S>(m + i);
#if defined(FD_CPU_ZMM_CLONE)
    if constexpr (kNormal && S == kZmmVectors) {
      return fd_negate_if(c, F16<S>{{f8_decode_prescaled_abs_zmm<state8::kExpBitsM>(c.v[0])}} * sm_prescaled);
    }
#endif
    if constexpr (kNormal) return state8::decode_exp_avg_prescaled<I16<S>>(c, sm_prescaled);
#if defined(FD_CPU_ZMM_CLONE)
    if constexpr (S == kZmmVectors) {  // state8::decode_exp_avg with the AVX-512 form's f8_decode
      return fd_negate_if(c, F16<S>{{f8_decode_abs_zmm<state8::kExpBitsM>(c.v[0])}} * sm);
    }
#endif
    return state8::decode_exp_avg<I16<S>>(c, sm);
  }
  template <bool kNormal>
  FD_ALWAYS_INLINE F16<S> load_v(int64_t i) const {
    const I16<S> c = load_codes<S>(v + i);
    if constexpr (kNormal) return state8::decode_exp_avg_sq_prescaled<I16<S>>(c, sv_prescaled);
#if defined(FD_CPU_ZMM_CLONE)
    if constexpr (S == kZmmVectors) {  // state8::decode_exp_avg_sq with the AVX-512 form's f8_decode
      const F16<S> w = F16<S>{{f8_decode_zmm<state8::kExpBitsV>(c.v[0])}} * sv;
      return w * w;
    }
#endif
    return state8::decode_exp_avg_sq<I16<S>>(c, sv);
  }
  FD_ALWAYS_INLINE void keep(int k, int64_t, F16<S> mm, F16<S> vv) {
    km[k] = mm;
    kw[k] = fd_sqrt(vv);  // the same √v the element function divided by
  }
  // The block's new scales from the kept m and √v; encode(k) then writes the codes of its vector k.
  float rm = 0.0f, rw = 0.0f;
  FD_ALWAYS_INLINE void finish_group(int64_t i) {
    // Lane-wise largest and smallest |m|, √v (as bits: state8::abs_bits).
    U16<S> bm = fd_bits(km[0]) & 0x7fffffffu, bw = fd_bits(kw[0]) & 0x7fffffffu, lm = bm, lw = bw;
    for (int k = 1; k < kGroup; ++k) {
      const U16<S> am = fd_bits(km[k]) & 0x7fffffffu, aw = fd_bits(kw[k]) & 0x7fffffffu;
      bm = fd_max(bm, am);
      bw = fd_max(bw, aw);
      lm = fd_min(lm, am);
      lw = fd_min(lw, aw);
    }
    finish_scales(i, hmax(bm), hmax(bw), rm, rw);
    using FM = state8::F8Format<state8::kExpBitsM>;
    using FV = state8::F8Format<state8::kExpBitsV>;
    values_normal = rm > 0.0f && rw > 0.0f &&  // finite normal scales: no NaN or inf in the block
                    !any_below(fd_from_bits(lm) * rm, FM::kMinNormal, FM::kMinNormalBits) &&
                    !any_below(fd_from_bits(lw) * rw, FV::kMinNormal, FV::kMinNormalBits);
  }
  // Encoding (kNormal: values_normal holds). kPacked (AVX-512 form, a block's vectors unrolled: for_each_vector): the
  // codes of four vectors are kept and stored packed after the fourth (store_codes4_zmm); else each vector's codes
  // are narrowed and stored on their own.
#if defined(FD_CPU_ZMM_CLONE)
  i32x16 cm[4], cv[4];
#endif
  template <bool kNormal, bool kPacked>
  FD_ALWAYS_INLINE void encode(int k, int64_t i) {
#if defined(FD_CPU_ZMM_CLONE)
    if constexpr (S == kZmmVectors && kPacked) {
      static_assert(kGroup % 4 == 0, "codes are stored four vectors at a time");
      if constexpr (kNormal) {  // state8::encode_exp_avg(_sq) with the AVX-512 normal encode
        const I16<S> q{{f8_encode_normal_zmm<state8::kExpBitsM>((fd_abs(km[k]) * rm).v[0])}};
        cm[k % 4] = fd_select(fd_is_negative(km[k]), -q, q).v[0];
        cv[k % 4] = f8_encode_normal_zmm<state8::kExpBitsV>((kw[k] * rw).v[0]);
      } else {  // the clamp of v's codes to 255 is the packing's saturation
        cm[k % 4] = state8::encode_exp_avg<F16<S>, false>(km[k], rm).v[0];
        cv[k % 4] = state8::encode_exp_avg_sq_unclamped<F16<S>>(kw[k], rw).v[0];
      }
      if (k % 4 == 3) {
        store_codes4_zmm<true>(m + i + (k - 3) * kVecLanes, cm);
        store_codes4_zmm<false>(v + i + (k - 3) * kVecLanes, cv);
      }
      return;
    }
    if constexpr (S == kZmmVectors) {
      if constexpr (kNormal) {  // state8::encode_exp_avg(_sq) with the AVX-512 normal encode
        const I16<S> q{{f8_encode_normal_zmm<state8::kExpBitsM>((fd_abs(km[k]) * rm).v[0])}};
        store_codes(m + i + k * kVecLanes, fd_select(fd_is_negative(km[k]), -q, q));
        store_codes_saturated(v + i + k * kVecLanes, I16<S>{{f8_encode_normal_zmm<state8::kExpBitsV>((kw[k] * rw).v[0])}});
      } else {  // the clamp to 255 is the narrowing's saturation
        store_codes(m + i + k * kVecLanes, state8::encode_exp_avg<F16<S>, false>(km[k], rm));
        store_codes_saturated(v + i + k * kVecLanes, state8::encode_exp_avg_sq_unclamped<F16<S>>(kw[k], rw));
      }
      return;
    }
#endif
    store_codes(m + i + k * kVecLanes, state8::encode_exp_avg<F16<S>, kNormal>(km[k], rm));
    store_codes(v + i + k * kVecLanes, state8::encode_exp_avg_sq<F16<S>, kNormal>(kw[k], rw));
  }
#endif
};

// fn(k) for k = 0…N−1, the vectors of a block: unrolled (kUnroll) or a loop. Unrolled where it was measured faster:
// the AVX-512 form with fp32 params (its 32 registers hold a block's kept m and √v, and the packed code stores need
// the vector index at compile time; 8-bit prox + Σ|θ| 0.61 → 0.58 ns/element in cache). The split form unrolled
// spills AVX2's 16 registers (1.13 → 1.17, medians of six), and the AVX-512 form with bf16 params ran its step ~15 % slower unrolled
// (bench/bench_paired_step.py, bf16 params, 8-bit state). bench/results/ab-packed-codes/.
template <int N, bool kUnroll, typename Fn>
FD_ALWAYS_INLINE void for_each_vector(Fn&& fn) {
  if constexpr (kUnroll) {
#pragma GCC unroll 16
    for (int k = 0; k < N; ++k) fn(k);
  } else {
#pragma GCC unroll 1
    for (int k = 0; k < N; ++k) fn(k);
  }
}

// One element on the scalar path (fp64, tails of the vector path, non-GNU compilers); returns the
// stored θ_t widened back to T. `slot` is the element's place in its codec group.
template <typename P, typename Codec, typename T, int D>
FD_ALWAYS_INLINE T update_one(typename Io<P>::raw* __restrict p, const typename Io<P>::raw* __restrict g,
                              Codec& codec, int64_t i, int slot, const StepScalars<T>& s) {
  T mm = codec.load_m1(i);
  T vv = codec.load_v1(i);
  const T th = adam_decay_element<D, T>(Io<P>::load(p[i]), Io<P>::load(g[i]), mm, vv, s);
  p[i] = Io<P>::store(th);
  codec.keep1(slot, i, mm, vv);
  return static_cast<T>(Io<P>::load(p[i]));
}

// One chunk, in sub-blocks of kSub elements. Each element is read once and written once; when Sum,
// Σ|θ_t| of the stored, rounded θ_t (as the reference computes it) is accumulated on the way in
// kLanes per-lane accumulators (lane k takes elements k, k+L, k+2L, … of the sub-block), the
// elements past the last full lane block go into `tail`, and the sub-block's sum is
// ((acc[0] + acc[1]) + … + acc[L−1]) + tail, added to the chunk's total in double. That order is
// the same on the vector path and the scalar path, on every ISA and for every codec, so sums never
// depend on the CPU or on how the moments are stored.
template <typename P, typename Codec, typename T, int D, bool Sum>
FD_ALWAYS_INLINE double update_chunk(const ChunkArgs& a, const StepScalars<T>& s) {
  using PR = typename Io<P>::raw;
  PR* __restrict p = static_cast<PR*>(a.p);
  const PR* __restrict g = static_cast<const PR*>(a.g);
  Codec codec(a);
  const StepScalars<T> sc = s;  // local copy: lets the compiler keep the scalars in registers
  constexpr int L = kLanes<T>;
  constexpr int G = Codec::kGroup;
  const int64_t n = a.n;
  double total = 0.0;
  for (int64_t base = 0; base < n; base += kSub) {
    const int64_t len = std::min(kSub, n - base);
    int64_t i = 0;
    T sum = T(0);
#if defined(FD_CPU_SIMD)
    constexpr bool kVector = std::is_same<T, float>::value;
#else
    constexpr bool kVector = false;
#endif
    if constexpr (kVector) {
#if defined(FD_CPU_SIMD)
      using V = F16<Codec::kForm>;
      V acc{};
      for (; i + G * kVecLanes <= len; i += G * kVecLanes) {
        // Software prefetch. The 8-bit loop does ~3× the arithmetic per byte and left memory idle: prefetching the
        // group 512 elements ahead took it from 1.45 to 0.95 ns/element (1 thread, 2^23 elements, Intel Xeon), on
        // every CPU (Codec::kPrefetch). With fp32/bf16 moments the loop is memory-bound and whether prefetching
        // helps depends on the CPU, so the distance comes at run time (cpu_prefetch_distance()): on a 2-core EPYC
        // prefetches 512 elements ahead were measured ~5 % slower at 2 threads and 5–25 % slower at 1 thread
        // (interleaved A/B against torch's fused AdamW, cpu-small); on the Intel Xeon VM 15 % (2 threads) and
        // 23 % (1 thread) faster (bench/kernel_direct.sh, 2^26 elements; docs/kernels.md).
        const int64_t distance = Codec::kPrefetch > 0 ? Codec::kPrefetch : a.prefetch;
        if (distance > 0) {
          const int64_t ahead = base + i + distance;
          for (int c = 0; c < G * kVecLanes; c += 64 / static_cast<int>(sizeof(PR))) {
            __builtin_prefetch(p + ahead + c, 1);
            __builtin_prefetch(g + ahead + c, 0);
          }
          codec.prefetch(ahead);
        }
        if constexpr (G == 1) {
          codec.begin_group(base + i);
          const int64_t j = base + i;
          V mm = codec.load_m(j);
          V vv = codec.load_v(j);
          const V th = adam_decay_element<D, float, V>(VecIo<P>::template load<Codec::kForm>(p + j),
                                                       VecIo<P>::template load<Codec::kForm>(g + j), mm, vv, sc);
          const V stored = VecIo<P>::store(p + j, th);
          codec.keep(0, j, mm, vv);
          if (Sum) acc = acc + fd_abs(stored);
        } else {
          // Blockwise codec, in two passes over the block's vectors (the arithmetic of adam_decay_element, split
          // in its two halves): (1) decode, moments, √v; (2) once the block's scales are known, the parameter
          // update (the division) beside each vector's encoding. The divider's work is then spread over both
          // passes, each with integer work to overlap, instead of the encoder's pass leaving the divider idle.
          // Each pass is compiled twice, for blocks with and without subnormal codes (see Q8Codec).
          constexpr bool kUnroll = Codec::kForm == kZmmVectors && std::is_same<P, float>::value;
          const auto decode_pass = [&](auto normal) FD_LAMBDA_INLINE {
            for_each_vector<G, kUnroll>([&](int k) FD_LAMBDA_INLINE {
              const int64_t j = base + i + k * kVecLanes;
              V mm = codec.template load_m<decltype(normal)::value>(j);
              V vv = codec.template load_v<decltype(normal)::value>(j);
              adam_moments<float, V>(VecIo<P>::template load<Codec::kForm>(g + j), mm, vv, sc);
              codec.keep(k, j, mm, vv);
            });
          };
          const auto encode_pass = [&](auto normal) FD_LAMBDA_INLINE {
            for_each_vector<G, kUnroll>([&](int k) FD_LAMBDA_INLINE {
              const int64_t j = base + i + k * kVecLanes;
              const V th = adam_param<D, float, V>(VecIo<P>::template load<Codec::kForm>(p + j), codec.km[k],
                                                   codec.kw[k], sc);
              const V stored = VecIo<P>::store(p + j, th);
              codec.template encode<decltype(normal)::value, kUnroll>(k, base + i);
              if (Sum) acc = acc + fd_abs(stored);
            });
          };
          codec.begin_vector_group(base + i);
          if (codec.codes_normal) {
            decode_pass(std::true_type{});
          } else {
            decode_pass(std::false_type{});
          }
          codec.finish_group(base + i);
          if (codec.values_normal) {
            encode_pass(std::true_type{});
          } else {
            encode_pass(std::false_type{});
          }
        }
      }
      if (Sum) {
        for (int k = 0; k < L; ++k) sum += acc.v[k / kPartLanes<Codec::kForm>][k % kPartLanes<Codec::kForm>];
      }
#endif
    } else {  // scalar path: the same lane order, in plain C++ the compiler may vectorise
      T acc[L] = {};
      for (; i + G * L <= len; i += G * L) {
        codec.begin_group(base + i);
        for (int k = 0; k < G; ++k) {
          for (int lane = 0; lane < L; ++lane) {
            const T th = update_one<P, Codec, T, D>(p, g, codec, base + i + k * L + lane, k * L + lane, sc);
            if (Sum) acc[lane] += fd_abs(th);
          }
        }
        codec.end_group1(base + i);
      }
      if (Sum) {
        for (int k = 0; k < L; ++k) sum += acc[k];
      }
    }
    T tail = T(0);
    if constexpr (G == 1) {  // blockwise codecs never see a partial group (see Q8Codec)
      for (; i < len; ++i) {
        const T th = update_one<P, Codec, T, D>(p, g, codec, base + i, 0, sc);
        if (Sum) tail += fd_abs(th);
      }
    }
    if (Sum) total += static_cast<double>(sum + tail);
  }
  return total;
}

// found_inf set: nothing is written; the sum is of the unchanged θ.
template <typename P, typename T>
FD_ALWAYS_INLINE double abs_sum_chunk(const void* pv, int64_t n) {
  const typename Io<P>::raw* p = static_cast<const typename Io<P>::raw*>(pv);
  double total = 0.0;
  for (int64_t base = 0; base < n; base += kSub) {
    total += static_cast<double>(abs_sum_block<P, T>(p + base, std::min(kSub, n - base)));
  }
  return total;
}

template <typename T>
using UpdateFn = double (*)(const ChunkArgs&, const StepScalars<T>&);

template <int S>
using CodecF32 = ElementwiseCodec<float, float, S>;
template <int S>
using CodecBF16 = ElementwiseCodec<BF16, float, S>;
template <int S>
using CodecF64 = ElementwiseCodec<double, double, S>;

// Non-template entry points (target_clones needs plain functions); one per (P, codec, decay, Σ|θ| or not): the split
// form's clones (NAME##_split) and, where built, the AVX-512 form (NAME##_zmm); NAME runs the one zmm_clones() picks.
#if defined(FD_CPU_ZMM_CLONE)
#define FD_DEFINE_UPDATE_1(NAME, P, C, T, D, SUM)                                                           \
  FD_ZMM_TARGET FD_FLATTEN double NAME##_zmm(const ChunkArgs& a, const StepScalars<T>& s) {                  \
    return update_chunk<P, C<kZmmVectors>, T, D, SUM>(a, s);                                                \
  }                                                                                                         \
  FD_CPU_CLONES FD_FLATTEN double NAME##_split(const ChunkArgs& a, const StepScalars<T>& s) {               \
    return update_chunk<P, C<kSplitVectors>, T, D, SUM>(a, s);                                              \
  }                                                                                                         \
  double NAME(const ChunkArgs& a, const StepScalars<T>& s) { return zmm_clones() ? NAME##_zmm(a, s) : NAME##_split(a, s); }
#else
#define FD_DEFINE_UPDATE_1(NAME, P, C, T, D, SUM)                                                           \
  FD_CPU_CLONES FD_FLATTEN double NAME(const ChunkArgs& a, const StepScalars<T>& s) {                       \
    return update_chunk<P, C<kSplitVectors>, T, D, SUM>(a, s);                                              \
  }
#endif
#define FD_DEFINE_UPDATE(NAME, P, C, T, D)      \
  FD_DEFINE_UPDATE_1(NAME, P, C, T, D, true)     \
  FD_DEFINE_UPDATE_1(NAME##_nosum, P, C, T, D, false)
#define FD_DEFINE_UPDATE_3(NAME, P, C, T)          \
  FD_DEFINE_UPDATE(NAME##_l2, P, C, T, kDecayL2)     \
  FD_DEFINE_UPDATE(NAME##_prox, P, C, T, kDecayProx) \
  FD_DEFINE_UPDATE(NAME##_euler, P, C, T, kDecayEuler)

FD_DEFINE_UPDATE_3(upd_f32_f32, float, CodecF32, float)
FD_DEFINE_UPDATE_3(upd_f32_bf16, float, CodecBF16, float)
FD_DEFINE_UPDATE_3(upd_f32_q8, float, Q8Codec, float)
FD_DEFINE_UPDATE_3(upd_bf16_f32, BF16, CodecF32, float)
FD_DEFINE_UPDATE_3(upd_bf16_bf16, BF16, CodecBF16, float)
FD_DEFINE_UPDATE_3(upd_bf16_q8, BF16, Q8Codec, float)
FD_DEFINE_UPDATE_3(upd_f64_f64, double, CodecF64, double)

FD_CPU_ALL_CLONES double abs_f32(const void* p, int64_t n) { return abs_sum_chunk<float, float>(p, n); }
FD_CPU_ALL_CLONES double abs_bf16(const void* p, int64_t n) { return abs_sum_chunk<BF16, float>(p, n); }
FD_CPU_ALL_CLONES double abs_f64(const void* p, int64_t n) { return abs_sum_chunk<double, double>(p, n); }

template <typename T>
struct Kernels;

// update(pk, mk, decay, sum): the entry point for a storage pair and decay kind; `sum` selects the
// variant that accumulates Σ|θ_t| (the other one skips it: AdamC / fixed δ need no sums).
#define FD_UPD_ROW(NAME) {NAME##_l2, NAME##_prox, NAME##_euler}, {NAME##_l2_nosum, NAME##_prox_nosum, NAME##_euler_nosum}

template <>
struct Kernels<float> {
  static UpdateFn<float> update(int pk, int mk, int decay, bool sum) {
    static const UpdateFn<float> table[2][3][2][3] = {
        {{FD_UPD_ROW(upd_f32_f32)}, {FD_UPD_ROW(upd_f32_bf16)}, {FD_UPD_ROW(upd_f32_q8)}},
        {{FD_UPD_ROW(upd_bf16_f32)}, {FD_UPD_ROW(upd_bf16_bf16)}, {FD_UPD_ROW(upd_bf16_q8)}}};
    const int m = mk == kStoreQ8 ? 2 : (mk == kStoreBF16 ? 1 : 0);
    return table[pk == kStoreBF16][m][sum ? 0 : 1][decay];
  }
  static double (*abs_sum(int pk))(const void*, int64_t) { return pk == kStoreBF16 ? abs_bf16 : abs_f32; }
};

template <>
struct Kernels<double> {
  static UpdateFn<double> update(int, int, int decay, bool sum) {
    static const UpdateFn<double> table[2][3] = {FD_UPD_ROW(upd_f64_f64)};
    return table[sum ? 0 : 1][decay];
  }
  static double (*abs_sum(int))(const void*, int64_t) { return abs_f64; }
};
#undef FD_UPD_ROW

inline int64_t storage_size(int kind) {
  switch (kind) {
    case kStoreBF16: return 2;
    case kStoreF64: return 8;
    case kStoreQ8: return 1;
    default: return 4;
  }
}

// The software prefetch distance (elements) of the update loop with element-wise (fp32/bf16) moments: 512 on Intel
// CPUs, none elsewhere (see update_chunk); FUSEDECAY_CPU_PREFETCH=N (0 ≤ N ≤ 65536) sets it, for measuring. Read once,
// on the calling thread (an invalid value throws there, before any work).
int64_t cpu_prefetch_distance() {
  static const int64_t v = [] {
    const char* env = std::getenv("FUSEDECAY_CPU_PREFETCH");
    if (env != nullptr && *env != '\0') {
      char* end = nullptr;
      const long long x = std::strtoll(env, &end, 10);
      if (*end != '\0' || x < 0 || x > 65536) {
        throw std::invalid_argument(std::string("FUSEDECAY_CPU_PREFETCH must be an element count from 0 to 65536, got '") +
                                    env + "'");
      }
      return static_cast<int64_t>(x);
    }
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_is("intel")) return int64_t{512};
#endif
    return int64_t{0};
  }();
  return v;
}

// Below this many elements per thread the OpenMP fork costs more than it saves.
constexpr int64_t kMinElementsPerThread = 32768;

}  // namespace

bool runs_avx512_form() { return zmm_clones(); }
int64_t software_prefetch_distance() { return cpu_prefetch_distance(); }

template <typename T>
void run_adam_decay(const KernelScalars<T>& ks, int param_kind, const LaunchPart* parts, int64_t num_parts,
                    int64_t chunk_size) {
  // The parts' chunk tables, end to end, as one list of work (index g: part `part_of(g)`, its chunk g − first[part]).
  std::vector<int64_t> first(static_cast<size_t>(num_parts) + 1, 0);
  for (int64_t q = 0; q < num_parts; ++q) first[q + 1] = first[q] + parts[q].num_chunks;
  const int64_t num_chunks = first.back();
  if (num_chunks == 0) return;
  const bool skip = should_skip(ks);
  std::vector<UpdateFn<T>> update(static_cast<size_t>(num_parts));
  for (int64_t q = 0; q < num_parts; ++q) {
    update[q] = Kernels<T>::update(param_kind, parts[q].moment_kind, ks.hyper.decay, parts[q].partials != nullptr);
  }
  const auto abs_sum = Kernels<T>::abs_sum(param_kind);
  const int64_t ps = storage_size(param_kind);
  const int64_t prefetch = cpu_prefetch_distance();
  const auto part_of = [&](int64_t g) {
    int64_t q = 0;
    while (g >= first[q + 1]) ++q;
    return q;
  };

  auto run_chunk = [&](int64_t g) {
    const int64_t q = part_of(g);
    const LaunchPart& part = parts[q];
    const int64_t c = g - first[q];
    const ChunkRef& ch = part.chunks[c];
    const TensorMeta& t = part.metas[ch.tensor];
    const int64_t start = chunk_begin(ch, chunk_size);
    const int64_t len = chunk_length(ch, t.numel, chunk_size);
    const int64_t ms = storage_size(part.moment_kind);
    char* p = static_cast<char*>(t.param) + start * ps;
    double sum;
    if (skip) {
      sum = abs_sum(p, len);
    } else {
      const T mu = t.mu != nullptr ? *static_cast<const T*>(t.mu) : T(0);
      const StepScalars<T> s = make_step_scalars<T>(ks, *t.step, mu);
      const int64_t block = start / state8::kBlock;  // scales: 8-bit state only (start is then a block multiple)
      const ChunkArgs args{p,
                           static_cast<const char*>(t.grad) + start * ps,
                           static_cast<char*>(t.exp_avg) + start * ms,
                           static_cast<char*>(t.exp_avg_sq) + start * ms,
                           t.exp_avg_scale != nullptr ? t.exp_avg_scale + block : nullptr,
                           t.exp_avg_sq_scale != nullptr ? t.exp_avg_sq_scale + block : nullptr,
                           len,
                           prefetch};
      sum = update[q](args, s);
    }
    if (part.partials != nullptr) part.partials[c] = sum;
  };

  // Element-balanced split of the list into contiguous runs, one per task (a thread streams through memory).
  std::vector<int64_t> prefix(static_cast<size_t>(num_chunks) + 1, 0);
  for (int64_t g = 0; g < num_chunks; ++g) {
    const int64_t q = part_of(g);
    const ChunkRef& ch = parts[q].chunks[g - first[q]];
    prefix[g + 1] = prefix[g] + chunk_length(ch, parts[q].metas[ch.tensor].numel, chunk_size);
  }
  const int64_t total = prefix.back();
  int64_t tasks = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, total / kMinElementsPerThread));
  tasks = std::min(tasks, num_chunks);
  if (tasks <= 1) {
    for (int64_t g = 0; g < num_chunks; ++g) run_chunk(g);
    return;
  }
  std::vector<int64_t> bounds(static_cast<size_t>(tasks) + 1, num_chunks);
  bounds[0] = 0;
  for (int64_t k = 1; k < tasks; ++k) {
    const int64_t target = total / tasks * k + (total % tasks) * k / tasks;
    bounds[k] = std::lower_bound(prefix.begin(), prefix.end(), target) - prefix.begin();
    bounds[k] = std::max(bounds[k], bounds[k - 1]);
  }
  // Each task claims the chunks of its own run in order, then helps the others with what is left of theirs (equal
  // element counts do not take equal times: the memory a run lives in, 8-bit against full-precision chunks, a core
  // that is interrupted). A chunk is claimed by exactly one fetch_add, so each partial is written by one thread and
  // the sums do not depend on who ran what.
  struct alignas(64) Cursor {
    std::atomic<int64_t> next;
  };
  std::vector<Cursor> cursor(static_cast<size_t>(tasks));
  for (int64_t k = 0; k < tasks; ++k) cursor[k].next.store(bounds[k], std::memory_order_relaxed);
  at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      for (int64_t j = 0; j < tasks; ++j) {
        const int64_t owner = (k + j) % tasks;
        for (int64_t g; (g = cursor[owner].next.fetch_add(1, std::memory_order_relaxed)) < bounds[owner + 1];) {
          run_chunk(g);
        }
      }
    }
  });
}

template <typename T>
void run_adam_decay(const KernelScalars<T>& ks, int param_kind, int moment_kind, const TensorMeta* metas,
                    const ChunkRef* chunks, int64_t num_chunks, int64_t chunk_size, double* partials) {
  const LaunchPart part{moment_kind, metas, chunks, num_chunks, partials};
  run_adam_decay<T>(ks, param_kind, &part, 1, chunk_size);
}

template void run_adam_decay<float>(const KernelScalars<float>&, int, int, const TensorMeta*, const ChunkRef*, int64_t,
                                    int64_t, double*);
template void run_adam_decay<float>(const KernelScalars<float>&, int, const LaunchPart*, int64_t, int64_t);
template void run_adam_decay<double>(const KernelScalars<double>&, int, const LaunchPart*, int64_t, int64_t);
template void run_adam_decay<double>(const KernelScalars<double>&, int, int, const TensorMeta*, const ChunkRef*,
                                     int64_t, int64_t, double*);

}  // namespace cpu
}  // namespace fusedecay
