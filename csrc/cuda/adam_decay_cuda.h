// Host API of the CUDA AdamHD/AdamC launcher (torch-free: plain C++ types, so the .cu needs only
// cuda_runtime.h and our headers; the torch glue is adam_decay_cuda_glue.cpp).
#pragma once

#include <cstddef>
#include <cstdint>

#include "../chunk_table.h"

namespace fusedecay {
namespace cuda {

struct LaunchParams {
  int param_kind = kStoreF32;   // StorageKind of params and grads
  int moment_kind = kStoreF32;  // StorageKind of exp_avg and exp_avg_sq
  int device = 0;
  void* stream = nullptr;       // cudaStream_t
  int64_t chunk_size = kDefaultChunkSize;
  // Host copy of the table: num_tensors TensorMeta, then num_chunks ChunkRef (see table_bytes()).
  const TensorMeta* metas = nullptr;
  int64_t num_tensors = 0;
  const ChunkRef* chunks = nullptr;
  int64_t num_chunks = 0;
  void* device_table = nullptr;  // device buffer of at least table_bytes() bytes, 16-byte aligned
  double* partials = nullptr;    // device, num_chunks doubles; null when no sums are wanted
  void* abs_sums = nullptr;      // device, math type; null when no sums are wanted
  const void* scalars = nullptr;  // host KernelScalars<float> (fp32/bf16 params) or <double> (fp64)
};

inline size_t table_bytes(int64_t num_tensors, int64_t num_chunks) {
  return static_cast<size_t>(num_tensors) * sizeof(TensorMeta) + static_cast<size_t>(num_chunks) * sizeof(ChunkRef);
}

// Uploads the table (one async copy from pinned memory, capture-safe), launches the update kernel
// (one block per chunk) and, when sums are wanted, the per-tensor reduction kernel. Returns null on
// success, else a message.
const char* launch_adam_decay(const LaunchParams& lp);

}  // namespace cuda
}  // namespace fusedecay
