// CUDA multi-tensor AdamHD/AdamC kernel. Torch-free: cuda_runtime.h and our own headers only.
//
// Launch structure (per (device, param dtype, moment dtype) group, per step):
//   1. one async H2D copy of the work table (TensorMeta per tensor + ChunkRef per chunk, built on the
//      host by chunk_table.h) from pinned memory into a device buffer;
//   2. adam_decay_kernel: one block per chunk (64 Ki elements by default) reads θ, g, m, v once,
//      writes θ, m, v, and writes the chunk's Σ|θ_t| to partials[chunk] (fixed-order block
//      reduction: no atomics);
//   3. reduce_abs_sums_kernel (only when sums are wanted): one thread per tensor adds its chunks'
//      partials in chunk order (sum_partials, the same function the CPU path calls).
// Three operations regardless of the tensor count. Scalars that may change between CUDA-graph
// replays (lr, max_lr, step, μ, grad_scale, found_inf) are read in the kernel from device memory.
// With the fused μ update (hyper.update_mu) step 3 also updates δ's μ from the sum it wrote.
// 8-bit moment state (csrc/state8.h) runs adam_decay_q8_kernel in step 2: one warp per 128-element block.
#include <cuda_runtime.h>

#include <cstring>
#include <mutex>
#include <type_traits>
#include <string>
#include <vector>

#include "../adam_decay_math.h"
#include "../chunk_table.h"
#include "../state8.h"
#include "adam_decay_cuda.h"

namespace fusedecay {
namespace cuda {
namespace {

constexpr int kBlock = 512;
constexpr int kReduceBlock = 256;

// N elements of S loaded/stored as one aligned access (16 bytes of params; the moments of bf16
// params are fp32: 32 bytes, two 16-byte accesses).
template <typename S, int N>
struct alignas(sizeof(S) * N) Vec {
  S val[N];
};

template <typename S, int N>
__device__ __forceinline__ bool vec_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % alignof(Vec<S, N>) == 0;
}

// Elements [0, len) of one chunk; returns this thread's Σ|θ_t| (of the stored values).
template <typename P, typename M, typename T, int D>
__device__ __forceinline__ T update_range(P* __restrict__ p, const P* __restrict__ g, M* __restrict__ m,
                                          M* __restrict__ v, int64_t len, const StepScalars<T>& s) {
  constexpr int N = 16 / static_cast<int>(sizeof(P));  // fp32: 4, bf16: 8, fp64: 2
  T acc = T(0);
  int64_t done = 0;
  if (vec_aligned<P, N>(p) && vec_aligned<P, N>(g) && vec_aligned<M, N>(m) && vec_aligned<M, N>(v)) {
    const int64_t nvec = len / N;
    for (int64_t k = threadIdx.x; k < nvec; k += kBlock) {
      Vec<P, N> pv = reinterpret_cast<const Vec<P, N>*>(p)[k];
      const Vec<P, N> gv = reinterpret_cast<const Vec<P, N>*>(g)[k];
      Vec<M, N> mv = reinterpret_cast<const Vec<M, N>*>(m)[k];
      Vec<M, N> vv = reinterpret_cast<const Vec<M, N>*>(v)[k];
#pragma unroll
      for (int j = 0; j < N; ++j) {
        T mj = widen(mv.val[j]);
        T vj = widen(vv.val[j]);
        const T th = adam_decay_element<D, T>(widen(pv.val[j]), widen(gv.val[j]), mj, vj, s);
        pv.val[j] = narrow<P>(th);
        mv.val[j] = narrow<M>(mj);
        vv.val[j] = narrow<M>(vj);
        acc += fd_abs(static_cast<T>(widen(pv.val[j])));
      }
      reinterpret_cast<Vec<P, N>*>(p)[k] = pv;
      reinterpret_cast<Vec<M, N>*>(m)[k] = mv;
      reinterpret_cast<Vec<M, N>*>(v)[k] = vv;
    }
    done = nvec * N;
  }
  for (int64_t i = done + threadIdx.x; i < len; i += kBlock) {  // unaligned tensors and the tail
    T mi = widen(m[i]);
    T vi = widen(v[i]);
    const T th = adam_decay_element<D, T>(widen(p[i]), widen(g[i]), mi, vi, s);
    const P stored = narrow<P>(th);
    p[i] = stored;
    m[i] = narrow<M>(mi);
    v[i] = narrow<M>(vi);
    acc += fd_abs(static_cast<T>(widen(stored)));
  }
  return acc;
}

// Sum over the block in a fixed order (warp shuffles, then warp 0 over the warp sums). The result
// is valid in thread 0.
__device__ __forceinline__ double block_sum(double x) {
  __shared__ double warp_sums[kBlock / 32];
  for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  x = 0.0;
  if (warp == 0) {
    x = lane < kBlock / 32 ? warp_sums[lane] : 0.0;
    for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
  }
  return x;
}

template <typename P, typename M, typename T>
__global__ void __launch_bounds__(kBlock)
    adam_decay_kernel(const TensorMeta* __restrict__ metas, const ChunkRef* __restrict__ chunks, int64_t chunk_size,
                      const KernelScalars<T> ks, double* __restrict__ partials) {
  const ChunkRef c = chunks[blockIdx.x];
  const TensorMeta& t = metas[c.tensor];
  const int64_t start = chunk_begin(c, chunk_size);  // 64-bit: tensors may exceed 2^31 elements
  const int64_t len = chunk_length(c, t.numel, chunk_size);
  P* p = static_cast<P*>(t.param) + start;
  T acc = T(0);
  if (should_skip(ks)) {
    // found_inf: write nothing; the sum is of the unchanged θ.
    for (int64_t i = threadIdx.x; i < len; i += kBlock) acc += fd_abs(static_cast<T>(widen(p[i])));
  } else {
    const T mu = t.mu != nullptr ? *static_cast<const T*>(t.mu) : T(0);
    const StepScalars<T> s = make_step_scalars<T>(ks, *t.step, mu);
    const P* g = static_cast<const P*>(t.grad) + start;
    M* m = static_cast<M*>(t.exp_avg) + start;
    M* v = static_cast<M*>(t.exp_avg_sq) + start;
    switch (ks.hyper.decay) {  // uniform over the grid
      case kDecayL2: acc = update_range<P, M, T, kDecayL2>(p, g, m, v, len, s); break;
      case kDecayProx: acc = update_range<P, M, T, kDecayProx>(p, g, m, v, len, s); break;
      default: acc = update_range<P, M, T, kDecayEuler>(p, g, m, v, len, s); break;
    }
  }
  if (partials != nullptr) {
    const double total = block_sum(static_cast<double>(acc));
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
  }
}

// 8-bit moments: each warp takes whole 128-element blocks of the chunk (4 consecutive elements per lane),
// decodes them with the block's scales, runs adam_decay_element, takes the block maxima of |m| and √v with
// warp shuffles (integer max of the bit patterns: the same value in any order) and encodes. Chunks start on
// block boundaries and 8-bit tensors hold whole blocks (the glue checks both).
template <typename P, int D>
__device__ __forceinline__ float update_range_q8(P* __restrict__ p, const P* __restrict__ g, int8_t* __restrict__ cm,
                                                 uint8_t* __restrict__ cv, float* __restrict__ sm,
                                                 float* __restrict__ sw, int64_t len, const StepScalars<float>& s) {
  constexpr int kPerLane = state8::kBlock / 32;
  constexpr int kWarps = kBlock / 32;
  const int lane = threadIdx.x & 31;
  float acc = 0.0f;
  for (int64_t b = threadIdx.x >> 5; b * state8::kBlock < len; b += kWarps) {
    const int64_t i0 = b * state8::kBlock + lane * kPerLane;
    const float old_sm = sm[b], old_sw = sw[b];
    float m[kPerLane], w[kPerLane];
    uint32_t bm = 0, bw = 0;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int64_t i = i0 + j;
      float mj = state8::decode_exp_avg<int32_t>(cm[i], old_sm);
      float vj = state8::decode_exp_avg_sq<int32_t>(cv[i], old_sw);
      const float th = adam_decay_element<D, float>(widen(p[i]), widen(g[i]), mj, vj, s);
      const P stored = narrow<P>(th);
      p[i] = stored;
      acc += fd_abs(widen(stored));
      m[j] = mj;
      w[j] = fd_sqrt(vj);
      bm = max(bm, state8::abs_bits(mj));
      bw = max(bw, state8::abs_bits(w[j]));
    }
    for (int off = 16; off > 0; off >>= 1) {
      bm = max(bm, __shfl_xor_sync(0xffffffffu, bm, off));
      bw = max(bw, __shfl_xor_sync(0xffffffffu, bw, off));
    }
    const float new_sm = bits_to_float(bm), new_sw = bits_to_float(bw);
    const float rm = state8::encode_factor(new_sm), rw = state8::encode_factor(new_sw);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      cm[i0 + j] = static_cast<int8_t>(state8::encode_exp_avg<float>(m[j], rm));
      cv[i0 + j] = static_cast<uint8_t>(state8::encode_exp_avg_sq<float>(w[j], rw));
    }
    __syncwarp();  // every lane has read the old scales before lane 0 overwrites them
    if (lane == 0) {
      sm[b] = new_sm;
      sw[b] = new_sw;
    }
  }
  return acc;
}

template <typename P>
__global__ void __launch_bounds__(kBlock)
    adam_decay_q8_kernel(const TensorMeta* __restrict__ metas, const ChunkRef* __restrict__ chunks,
                         int64_t chunk_size, const KernelScalars<float> ks, double* __restrict__ partials) {
  const ChunkRef c = chunks[blockIdx.x];
  const TensorMeta& t = metas[c.tensor];
  const int64_t start = chunk_begin(c, chunk_size);
  const int64_t len = chunk_length(c, t.numel, chunk_size);
  P* p = static_cast<P*>(t.param) + start;
  float acc = 0.0f;
  if (should_skip(ks)) {
    for (int64_t i = threadIdx.x; i < len; i += kBlock) acc += fd_abs(widen(p[i]));
  } else {
    const float mu = t.mu != nullptr ? *static_cast<const float*>(t.mu) : 0.0f;
    const StepScalars<float> s = make_step_scalars<float>(ks, *t.step, mu);
    const P* g = static_cast<const P*>(t.grad) + start;
    int8_t* cm = static_cast<int8_t*>(t.exp_avg) + start;
    uint8_t* cv = static_cast<uint8_t*>(t.exp_avg_sq) + start;
    float* sm = t.exp_avg_scale + start / state8::kBlock;
    float* sw = t.exp_avg_sq_scale + start / state8::kBlock;
    switch (ks.hyper.decay) {  // uniform over the grid
      case kDecayL2: acc = update_range_q8<P, kDecayL2>(p, g, cm, cv, sm, sw, len, s); break;
      case kDecayProx: acc = update_range_q8<P, kDecayProx>(p, g, cm, cv, sm, sw, len, s); break;
      default: acc = update_range_q8<P, kDecayEuler>(p, g, cm, cv, sm, sw, len, s); break;
    }
  }
  if (partials != nullptr) {
    const double total = block_sum(static_cast<double>(acc));
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
  }
}

// Level 2 of Σ|θ| per tensor and, with hyper.update_mu, δ's μ from it (unless found_inf): the step's
// update kernel has finished reading μ by the time this kernel runs (same stream).
template <typename T>
__global__ void reduce_abs_sums_kernel(const TensorMeta* __restrict__ metas, int64_t num_tensors,
                                       const double* __restrict__ partials, T* __restrict__ abs_sums,
                                       const KernelScalars<T> ks) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= num_tensors) return;
  const TensorMeta& t = metas[i];
  const T sum = static_cast<T>(sum_partials(partials, t.first_chunk, t.num_chunks));
  abs_sums[t.out_index] = sum;
  if (ks.hyper.update_mu && !should_skip(ks)) {
    T* mu = static_cast<T*>(t.mu);
    *mu = delta_mu_next<T>(*mu, sum, static_cast<T>(t.mu_numel), ks.hyper);
  }
}

// ---- work-table upload ----------------------------------------------------------------------
// Pinned staging buffers, reused once the copy that last read them has completed (event query, no
// host wait). During stream capture a fresh buffer is used and kept for the life of the process:
// a captured copy re-reads its source at every replay, so it must stay valid and unchanged.
struct PinnedSlot {
  void* host;
  size_t capacity;
  cudaEvent_t done;
  int device;
};

std::mutex g_staging_mutex;
std::vector<PinnedSlot> g_slots;
std::vector<void*> g_graph_tables;

thread_local std::string g_error;

const char* fail(const char* what, cudaError_t st) {
  g_error = std::string(what) + ": " + cudaGetErrorString(st);
  return g_error.c_str();
}

void fill_table(void* host, const LaunchParams& lp) {
  const size_t meta_bytes = static_cast<size_t>(lp.num_tensors) * sizeof(TensorMeta);
  std::memcpy(host, lp.metas, meta_bytes);
  if (lp.num_chunks > 0) {
    std::memcpy(static_cast<char*>(host) + meta_bytes, lp.chunks, static_cast<size_t>(lp.num_chunks) * sizeof(ChunkRef));
  }
}

const char* upload_table(const LaunchParams& lp, cudaStream_t stream, size_t bytes) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  cudaError_t st = cudaStreamIsCapturing(stream, &capture);
  if (st != cudaSuccess) return fail("cudaStreamIsCapturing", st);
  std::lock_guard<std::mutex> lock(g_staging_mutex);
  if (capture != cudaStreamCaptureStatusNone) {
    void* host = nullptr;
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;  // allocation is legal in relaxed mode
    cudaThreadExchangeStreamCaptureMode(&mode);
    st = cudaHostAlloc(&host, bytes, cudaHostAllocDefault);
    cudaThreadExchangeStreamCaptureMode(&mode);
    if (st != cudaSuccess) return fail("cudaHostAlloc (capture)", st);
    g_graph_tables.push_back(host);
    fill_table(host, lp);
    st = cudaMemcpyAsync(lp.device_table, host, bytes, cudaMemcpyHostToDevice, stream);
    return st == cudaSuccess ? nullptr : fail("cudaMemcpyAsync (capture)", st);
  }
  PinnedSlot* slot = nullptr;
  for (PinnedSlot& s : g_slots) {
    if (s.device != lp.device || s.capacity < bytes) continue;
    const cudaError_t q = cudaEventQuery(s.done);
    if (q == cudaSuccess) {
      slot = &s;
      break;
    }
    if (q == cudaErrorNotReady) {
      (void)cudaGetLastError();  // not an error: the copy is still in flight
    } else {
      return fail("cudaEventQuery", q);
    }
  }
  if (slot == nullptr) {
    size_t capacity = 64 * 1024;
    while (capacity < bytes) capacity *= 2;
    PinnedSlot fresh{nullptr, capacity, nullptr, lp.device};
    st = cudaHostAlloc(&fresh.host, capacity, cudaHostAllocDefault);
    if (st != cudaSuccess) return fail("cudaHostAlloc", st);
    st = cudaEventCreateWithFlags(&fresh.done, cudaEventDisableTiming);
    if (st != cudaSuccess) {
      cudaFreeHost(fresh.host);
      return fail("cudaEventCreateWithFlags", st);
    }
    g_slots.push_back(fresh);
    slot = &g_slots.back();
  }
  fill_table(slot->host, lp);
  st = cudaMemcpyAsync(lp.device_table, slot->host, bytes, cudaMemcpyHostToDevice, stream);
  if (st != cudaSuccess) return fail("cudaMemcpyAsync", st);
  st = cudaEventRecord(slot->done, stream);
  return st == cudaSuccess ? nullptr : fail("cudaEventRecord", st);
}

// Marker for the 8-bit moment state in launch_typed's M parameter.
struct Q8State {};

template <typename P, typename M, typename T>
void launch_typed(const LaunchParams& lp, const TensorMeta* d_metas, const ChunkRef* d_chunks, cudaStream_t stream) {
  const KernelScalars<T>& ks = *static_cast<const KernelScalars<T>*>(lp.scalars);
  double* partials = lp.abs_sums != nullptr ? lp.partials : nullptr;
  if (lp.num_chunks > 0) {
    const unsigned grid = static_cast<unsigned>(lp.num_chunks);
    if constexpr (std::is_same<M, Q8State>::value) {
      adam_decay_q8_kernel<P><<<grid, kBlock, 0, stream>>>(d_metas, d_chunks, lp.chunk_size, ks, partials);
    } else {
      adam_decay_kernel<P, M, T><<<grid, kBlock, 0, stream>>>(d_metas, d_chunks, lp.chunk_size, ks, partials);
    }
  }
  if (lp.abs_sums != nullptr) {
    const unsigned blocks = static_cast<unsigned>((lp.num_tensors + kReduceBlock - 1) / kReduceBlock);
    reduce_abs_sums_kernel<T><<<blocks, kReduceBlock, 0, stream>>>(d_metas, lp.num_tensors, lp.partials,
                                                                   static_cast<T*>(lp.abs_sums), ks);
  }
}

}  // namespace

const char* launch_adam_decay(const LaunchParams& lp) {
  if (lp.num_tensors == 0) return nullptr;
  if (lp.num_chunks > INT32_MAX) return "too many chunks for one launch";
  cudaStream_t stream = static_cast<cudaStream_t>(lp.stream);
  const size_t bytes = table_bytes(lp.num_tensors, lp.num_chunks);
  if (const char* err = upload_table(lp, stream, bytes)) return err;
  const TensorMeta* d_metas = static_cast<const TensorMeta*>(lp.device_table);
  const ChunkRef* d_chunks = reinterpret_cast<const ChunkRef*>(static_cast<const char*>(lp.device_table) +
                                                               static_cast<size_t>(lp.num_tensors) * sizeof(TensorMeta));
  const bool mb = lp.moment_kind == kStoreBF16;
  const bool q8 = lp.moment_kind == kStoreQ8;
  switch (lp.param_kind) {
    case kStoreF32:
      q8   ? launch_typed<float, Q8State, float>(lp, d_metas, d_chunks, stream)
      : mb ? launch_typed<float, BF16, float>(lp, d_metas, d_chunks, stream)
           : launch_typed<float, float, float>(lp, d_metas, d_chunks, stream);
      break;
    case kStoreBF16:
      q8   ? launch_typed<BF16, Q8State, float>(lp, d_metas, d_chunks, stream)
      : mb ? launch_typed<BF16, BF16, float>(lp, d_metas, d_chunks, stream)
           : launch_typed<BF16, float, float>(lp, d_metas, d_chunks, stream);
      break;
    case kStoreF64:
      if (lp.moment_kind != kStoreF64) return "float64 params need float64 moments";
      launch_typed<double, double, double>(lp, d_metas, d_chunks, stream);
      break;
    default:
      return "unsupported param dtype";
  }
  const cudaError_t st = cudaGetLastError();
  return st == cudaSuccess ? nullptr : fail("adam_decay kernel launch", st);
}

}  // namespace cuda
}  // namespace fusedecay
