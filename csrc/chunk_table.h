// The multi-tensor work split and the order of the two-level Σ|θ| reduction, shared by the CPU
// kernel and the CUDA launcher (torch-free; nvcc compiles it too).
//
// Every tensor of a launch is cut into chunks of `chunk_size` elements (the last one shorter); the
// chunk table lists them tensor by tensor, in order. One CUDA block, or one CPU task, processes one
// chunk and writes one partial sum Σ|θ_t| for it (level 1). Level 2 then adds the partials of each
// tensor in chunk order, left to right, in double (`sum_partials`). The table, and therefore the
// summation order, depends only on the tensor sizes and chunk_size — never on the thread count or
// scheduling — so the per-layer sums are bit-identical from run to run.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "adam_decay_math.h"

namespace fusedecay {

// 64 Ki elements: 256 KiB of fp32 per stream per chunk; a multiple of every vector width (so each
// chunk starts 16-byte aligned when the tensor does).
constexpr int64_t kDefaultChunkSize = 65536;
constexpr int64_t kChunkSizeMultiple = 64;

// One tensor of a launch, as the kernels see it. Pointers are to the first element; the four data
// tensors are dense with one shared layout (the glue guarantees it).
struct TensorMeta {
  void* param;
  const void* grad;
  void* exp_avg;        // moments, or their 8-bit codes (kStoreQ8)
  void* exp_avg_sq;
  float* exp_avg_scale;     // kStoreQ8: one fp32 scale per state8::kBlock elements; else null
  float* exp_avg_sq_scale;
  const float* step;   // t, float32, already incremented
  void* mu;            // μ^(l) in the math type, or null when δ is fixed / decay is l2
  double mu_numel;     // n^(l) of the fused μ update μ ← β·μ + (1 − β)·Σ|θ_t|/n (global size when sharded)
  int64_t numel;
  int64_t first_chunk;  // index of this tensor's first entry in the chunk table
  int64_t num_chunks;
  int64_t out_index;    // slot of this tensor in abs_sums
};

// One unit of work: elements [chunk*chunk_size, min((chunk+1)*chunk_size, numel)) of `tensor`.
struct ChunkRef {
  int32_t tensor;
  int32_t chunk;
};

inline int64_t num_chunks_of(int64_t numel, int64_t chunk_size) {
  return numel <= 0 ? 0 : (numel + chunk_size - 1) / chunk_size;
}

inline void check_chunk_size(int64_t chunk_size) {
  if (chunk_size <= 0 || chunk_size % kChunkSizeMultiple != 0 || chunk_size > (int64_t(1) << 30)) {
    throw std::invalid_argument("chunk_size must be a positive multiple of " + std::to_string(kChunkSizeMultiple) +
                                " and at most 2^30, got " + std::to_string(chunk_size));
  }
}

// Fills first_chunk / num_chunks of every meta and returns the chunk table (tensor-major order).
// Empty tensors get no chunk (their sum is 0).
inline std::vector<ChunkRef> build_chunk_table(std::vector<TensorMeta>& metas, int64_t chunk_size) {
  check_chunk_size(chunk_size);
  if (metas.size() > static_cast<size_t>(INT32_MAX)) throw std::invalid_argument("too many tensors in one launch");
  int64_t total = 0;
  for (auto& t : metas) {
    t.first_chunk = total;
    t.num_chunks = num_chunks_of(t.numel, chunk_size);
    if (t.num_chunks > INT32_MAX) throw std::invalid_argument("tensor too large for chunk_size");
    total += t.num_chunks;
  }
  if (total > INT32_MAX) throw std::invalid_argument("too many chunks in one launch; raise chunk_size");
  std::vector<ChunkRef> table;
  table.reserve(static_cast<size_t>(total));
  for (size_t i = 0; i < metas.size(); ++i) {
    for (int64_t c = 0; c < metas[i].num_chunks; ++c) {
      table.push_back(ChunkRef{static_cast<int32_t>(i), static_cast<int32_t>(c)});
    }
  }
  return table;
}

// Element range of one chunk.
FD_HD int64_t chunk_begin(const ChunkRef& c, int64_t chunk_size) { return static_cast<int64_t>(c.chunk) * chunk_size; }
FD_HD int64_t chunk_length(const ChunkRef& c, int64_t numel, int64_t chunk_size) {
  const int64_t rest = numel - chunk_begin(c, chunk_size);
  return rest < chunk_size ? rest : chunk_size;
}

// Level 2 of the reduction: the partials of one tensor, added in chunk order.
FD_HD double sum_partials(const double* partials, int64_t first, int64_t count) {
  double s = 0.0;
  for (int64_t i = 0; i < count; ++i) s += partials[first + i];
  return s;
}

}  // namespace fusedecay
