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

// What this process's CPU kernel runs, read as the kernel reads it (once per process; see adam_decay_cpu.cpp): whether
// its AVX-512 vector form (else the split-register form), and the software prefetch distance in elements of the loop
// with element-wise moments (FUSEDECAY_CPU_PREFETCH; an invalid value throws std::invalid_argument).
bool runs_avx512_form();
int64_t software_prefetch_distance();

}  // namespace cpu
}  // namespace fusedecay
