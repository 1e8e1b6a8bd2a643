// CPU multi-tensor AdamHD/AdamC kernel: one pass over θ, g, m, v per step, per-chunk Σ|θ_t|.
//
// Work split: the shared chunk table (chunk_table.h). The chunks are divided among threads by
// element count (contiguous runs of chunks, so a thread streams through memory); each chunk's
// partial sum is computed by exactly one thread in a fixed order, so results do not depend on the
// number of threads. The element loop is plain C++ over fixed-width lane blocks that GCC/Clang
// vectorise at -O3 (-fno-math-errno lets sqrt vectorise); on GCC/x86-64 the loop is additionally
// cloned for AVX2 and AVX-512 and picked at load time (target_clones), since -march is not assumed.
// -ffp-contract=off keeps every clone's rounding identical.
#include "adam_decay_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(FUSEDECAY_NO_CLONES)
#define FD_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FD_CPU_CLONES
#endif

#if defined(__GNUC__)
#define FD_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FD_ALWAYS_INLINE inline
#endif

namespace fusedecay {
namespace cpu {
namespace {

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

// One chunk: the update loop over a sub-block (streams θ, g, m, v from memory once), then Σ|θ_t|
// of the sub-block just written (re-read from L1, no extra memory traffic). The sum is of the
// stored, rounded θ_t, as the reference computes it.
template <typename P, typename M, typename T, int D>
FD_ALWAYS_INLINE double update_chunk(void* pv, const void* gv, void* mv, void* vv, int64_t n,
                                     const StepScalars<T>& s) {
  using PR = typename Io<P>::raw;
  using MR = typename Io<M>::raw;
  PR* __restrict p = static_cast<PR*>(pv);
  const PR* __restrict g = static_cast<const PR*>(gv);
  MR* __restrict m = static_cast<MR*>(mv);
  MR* __restrict v = static_cast<MR*>(vv);
  const StepScalars<T> sc = s;  // local copy: lets the compiler keep the scalars in registers
  double total = 0.0;
  for (int64_t base = 0; base < n; base += kSub) {
    const int64_t len = std::min(kSub, n - base);
    PR* __restrict pb = p + base;
    const PR* __restrict gb = g + base;
    MR* __restrict mb = m + base;
    MR* __restrict vb = v + base;
    for (int64_t i = 0; i < len; ++i) {
      T mm = Io<M>::load(mb[i]);
      T vv2 = Io<M>::load(vb[i]);
      const T th = adam_decay_element<D, T>(Io<P>::load(pb[i]), Io<P>::load(gb[i]), mm, vv2, sc);
      pb[i] = Io<P>::store(th);
      mb[i] = Io<M>::store(mm);
      vb[i] = Io<M>::store(vv2);
    }
    total += static_cast<double>(abs_sum_block<P, T>(pb, len));
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
using UpdateFn = double (*)(void*, const void*, void*, void*, int64_t, const StepScalars<T>&);

// Non-template entry points (target_clones needs plain functions); one per (P, M, decay).
#define FD_DEFINE_UPDATE(NAME, P, M, T, D)                                                                  \
  FD_CPU_CLONES double NAME(void* p, const void* g, void* m, void* v, int64_t n, const StepScalars<T>& s) { \
    return update_chunk<P, M, T, D>(p, g, m, v, n, s);                                                     \
  }
#define FD_DEFINE_UPDATE_3(NAME, P, M, T)          \
  FD_DEFINE_UPDATE(NAME##_l2, P, M, T, kDecayL2)     \
  FD_DEFINE_UPDATE(NAME##_prox, P, M, T, kDecayProx) \
  FD_DEFINE_UPDATE(NAME##_euler, P, M, T, kDecayEuler)

FD_DEFINE_UPDATE_3(upd_f32_f32, float, float, float)
FD_DEFINE_UPDATE_3(upd_f32_bf16, float, BF16, float)
FD_DEFINE_UPDATE_3(upd_bf16_f32, BF16, float, float)
FD_DEFINE_UPDATE_3(upd_bf16_bf16, BF16, BF16, float)
FD_DEFINE_UPDATE_3(upd_f64_f64, double, double, double)

FD_CPU_CLONES double abs_f32(const void* p, int64_t n) { return abs_sum_chunk<float, float>(p, n); }
FD_CPU_CLONES double abs_bf16(const void* p, int64_t n) { return abs_sum_chunk<BF16, float>(p, n); }
FD_CPU_CLONES double abs_f64(const void* p, int64_t n) { return abs_sum_chunk<double, double>(p, n); }

template <typename T>
struct Kernels;

template <>
struct Kernels<float> {
  static UpdateFn<float> update(int pk, int mk, int decay) {
    static const UpdateFn<float> table[2][2][3] = {
        {{upd_f32_f32_l2, upd_f32_f32_prox, upd_f32_f32_euler}, {upd_f32_bf16_l2, upd_f32_bf16_prox, upd_f32_bf16_euler}},
        {{upd_bf16_f32_l2, upd_bf16_f32_prox, upd_bf16_f32_euler},
         {upd_bf16_bf16_l2, upd_bf16_bf16_prox, upd_bf16_bf16_euler}}};
    return table[pk == kStoreBF16][mk == kStoreBF16][decay];
  }
  static double (*abs_sum(int pk))(const void*, int64_t) { return pk == kStoreBF16 ? abs_bf16 : abs_f32; }
};

template <>
struct Kernels<double> {
  static UpdateFn<double> update(int, int, int decay) {
    static const UpdateFn<double> table[3] = {upd_f64_f64_l2, upd_f64_f64_prox, upd_f64_f64_euler};
    return table[decay];
  }
  static double (*abs_sum(int))(const void*, int64_t) { return abs_f64; }
};

inline int64_t storage_size(int kind) { return kind == kStoreBF16 ? 2 : (kind == kStoreF64 ? 8 : 4); }

// Below this many elements per thread the OpenMP fork costs more than it saves.
constexpr int64_t kMinElementsPerThread = 32768;

}  // namespace

template <typename T>
void run_adam_decay(const KernelScalars<T>& ks, int param_kind, int moment_kind, const TensorMeta* metas,
                    const ChunkRef* chunks, int64_t num_chunks, int64_t chunk_size, double* partials) {
  if (num_chunks == 0) return;
  const bool skip = should_skip(ks);
  const UpdateFn<T> update = Kernels<T>::update(param_kind, moment_kind, ks.hyper.decay);
  const auto abs_sum = Kernels<T>::abs_sum(param_kind);
  const int64_t ps = storage_size(param_kind), ms = storage_size(moment_kind);

  auto run_chunk = [&](int64_t c) {
    const ChunkRef& ch = chunks[c];
    const TensorMeta& t = metas[ch.tensor];
    const int64_t start = chunk_begin(ch, chunk_size);
    const int64_t len = chunk_length(ch, t.numel, chunk_size);
    char* p = static_cast<char*>(t.param) + start * ps;
    double part;
    if (skip) {
      part = abs_sum(p, len);
    } else {
      const T mu = t.mu != nullptr ? *static_cast<const T*>(t.mu) : T(0);
      const StepScalars<T> s = make_step_scalars<T>(ks, *t.step, mu);
      part = update(p, static_cast<const char*>(t.grad) + start * ps, static_cast<char*>(t.exp_avg) + start * ms,
                    static_cast<char*>(t.exp_avg_sq) + start * ms, len, s);
    }
    if (partials != nullptr) partials[c] = part;
  };

  // Element-balanced split of the chunk list into contiguous runs, one per task.
  std::vector<int64_t> prefix(static_cast<size_t>(num_chunks) + 1, 0);
  for (int64_t c = 0; c < num_chunks; ++c) {
    prefix[c + 1] = prefix[c] + chunk_length(chunks[c], metas[chunks[c].tensor].numel, chunk_size);
  }
  const int64_t total = prefix.back();
  int64_t tasks = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, total / kMinElementsPerThread));
  tasks = std::min(tasks, num_chunks);
  if (tasks <= 1) {
    for (int64_t c = 0; c < num_chunks; ++c) run_chunk(c);
    return;
  }
  std::vector<int64_t> bounds(static_cast<size_t>(tasks) + 1, num_chunks);
  bounds[0] = 0;
  for (int64_t k = 1; k < tasks; ++k) {
    const int64_t target = total / tasks * k + (total % tasks) * k / tasks;
    bounds[k] = std::lower_bound(prefix.begin(), prefix.end(), target) - prefix.begin();
    bounds[k] = std::max(bounds[k], bounds[k - 1]);
  }
  at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      for (int64_t c = bounds[k]; c < bounds[k + 1]; ++c) run_chunk(c);
    }
  });
}

template void run_adam_decay<float>(const KernelScalars<float>&, int, int, const TensorMeta*, const ChunkRef*, int64_t,
                                    int64_t, double*);
template void run_adam_decay<double>(const KernelScalars<double>&, int, int, const TensorMeta*, const ChunkRef*,
                                     int64_t, int64_t, double*);

}  // namespace cpu
}  // namespace fusedecay
