// CPU multi-tensor AdamHD/AdamC kernel (see adam_decay_cpu.cpp).
#pragma once

#include <cstdint>

#include "../adam_decay_math.h"
#include "../chunk_table.h"

namespace fusedecay {
namespace cpu {

// Runs every chunk of the table (in parallel over chunks) and, when `partials` is not null, writes
// Σ|θ_t| of chunk c to partials[c]. param_kind / moment_kind are StorageKinds.
template <typename T>
void run_adam_decay(const KernelScalars<T>& ks, int param_kind, int moment_kind, const TensorMeta* metas,
                    const ChunkRef* chunks, int64_t num_chunks, int64_t chunk_size, double* partials);

}  // namespace cpu
}  // namespace fusedecay
