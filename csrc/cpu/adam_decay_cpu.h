// CPU multi-tensor AdamHD/AdamC kernel (see adam_decay_cpu.cpp).
#pragma once

#include <cstdint>

#include "../adam_decay_math.h"
#include "../chunk_table.h"

namespace fusedecay {
namespace cpu {

// The tensors of one launch whose moments share a storage format (moment_kind, a StorageKind), with their chunk table;
// Σ|θ_t| of chunk c goes to partials[c] when partials is not null.
struct LaunchPart {
  int moment_kind;
  const TensorMeta* metas;
  const ChunkRef* chunks;
  int64_t num_chunks;
  double* partials;
};

// Runs every chunk of every part, in one parallel region over all of them (param_kind: a StorageKind).
template <typename T>
void run_adam_decay(const KernelScalars<T>& ks, int param_kind, const LaunchPart* parts, int64_t num_parts,
                    int64_t chunk_size);

// The same for a single part.
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
