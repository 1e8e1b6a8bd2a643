// Nanoseconds per element of the CPU kernel called directly from C++ (no Python, no op dispatch, no chunk-table
// build per call): the arithmetic of one step, without the ~20-50 µs a Python-level call adds (which is 0.1-0.2
// ns/element on an in-cache tensor; bench/kernel_ns_per_element.py includes it). Build and run with
// bench/kernel_direct.sh, which compiles csrc/cpu/adam_decay_cpu.cpp with the extension's flags.
//
//   kernel_direct [elements=131072] [threads=1] [rounds=15] [cold=0]
//
// One fp32 tensor of `elements` (a multiple of 128), AdamHD's prox step with the per-chunk Σ|θ_t| (what its default
// δ tracking needs; the μ update itself is a few scalar operations per tensor after the kernel) and the plain l2 step
// without sums, moments in fp32 and in 8 bits (docs/state8.md). Each figure is the
// best of `rounds` timings of 50 calls (5 above 2^20 elements). The state starts from zero moments and is stepped
// in place, so the 8-bit codes are the kernel's own after the warm-up calls. With cold=1 every call is timed on its
// own after 512 MiB of other memory was written (so no level of cache holds the tensor, as in the paired
// benchmark's interleaved rounds, where the other optimizers' steps run in between), and the figure is the median of
// `rounds` such calls.
#include "cpu/adam_decay_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

using namespace fusedecay;

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? std::atoll(argv[1]) : (int64_t(1) << 17);
  const int threads = argc > 2 ? std::atoi(argv[2]) : 1;
  const int rounds = argc > 3 ? std::atoi(argv[3]) : 15;
  const bool cold = argc > 4 && std::atoi(argv[4]) != 0;
  if (n <= 0 || n % 128 != 0) {
    std::fprintf(stderr, "elements must be a positive multiple of 128\n");
    return 2;
  }
  if (threads < 1 || rounds < 1) {
    std::fprintf(stderr, "threads and rounds must be at least 1\n");
    return 2;
  }
  at::set_num_threads(threads);
  const int calls = n > (int64_t(1) << 20) ? 5 : 50;

  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  std::vector<float> p(n), g(n), m(n, 0.0f), v(n, 0.0f), m_scale(n / 128, 0.0f), v_scale(n / 128, 0.0f);
  std::vector<int8_t> m_codes(n, 0);
  std::vector<uint8_t> v_codes(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    p[i] = 0.1f * normal(rng);
    g[i] = 1e-2f * normal(rng);
  }
  float step = 1.0f, mu = 0.1f;
  std::vector<float> flush(cold ? (size_t(128) << 20) : 0, 0.0f);  // 512 MiB written before each cold call

  std::printf("| elements | threads | moments | step | ns/element%s |\n|---:|---:|---|---|---:|\n",
              cold ? " (cold, median)" : "");
  for (int q8 = 0; q8 < 2; ++q8) {
    for (int prox = 1; prox >= 0; --prox) {
      KernelScalars<float> ks{};
      Hyper<float>& h = ks.hyper;
      h.beta1 = 0.9f;
      h.beta2 = 0.999f;
      h.one_minus_beta1 = 0.1f;
      h.one_minus_beta2 = 0.001f;
      h.eps = 1e-8f;
      h.weight_decay = 0.1f;
      h.delta_scale = 1.0f;
      h.lr = 1e-3f;
      h.decay = prox ? kDecayProx : kDecayL2;
      h.bias_correction = 1;
      std::vector<TensorMeta> metas(1);
      TensorMeta& t = metas[0];
      t.param = p.data();
      t.grad = g.data();
      t.exp_avg = q8 ? static_cast<void*>(m_codes.data()) : static_cast<void*>(m.data());
      t.exp_avg_sq = q8 ? static_cast<void*>(v_codes.data()) : static_cast<void*>(v.data());
      t.exp_avg_scale = q8 ? m_scale.data() : nullptr;
      t.exp_avg_sq_scale = q8 ? v_scale.data() : nullptr;
      t.step = &step;
      t.mu = prox ? &mu : nullptr;
      t.mu_numel = static_cast<double>(n);
      t.numel = n;
      t.out_index = 0;
      const std::vector<ChunkRef> table = build_chunk_table(metas, kDefaultChunkSize);
      std::vector<double> partials(table.size());
      auto call = [&] {
        cpu::run_adam_decay<float>(ks, kStoreF32, q8 ? kStoreQ8 : kStoreF32, metas.data(), table.data(),
                                   static_cast<int64_t>(table.size()), kDefaultChunkSize,
                                   prox ? partials.data() : nullptr);
      };
      for (int k = 0; k < 3; ++k) call();
      double figure = 1e30;  // ns/element: best of the warm rounds, or median of the cold calls
      if (cold) {
        std::vector<double> times;
        for (int r = 0; r < rounds; ++r) {
          for (float& x : flush) x += 1.0f;
          const auto t0 = std::chrono::steady_clock::now();
          call();
          times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        }
        std::sort(times.begin(), times.end());
        figure = times[times.size() / 2] / static_cast<double>(n);
      }
      for (int r = 0; r < (cold ? 0 : rounds); ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        for (int k = 0; k < calls; ++k) call();
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        figure = std::min(figure, s / calls / static_cast<double>(n));
      }
      std::printf("| %lld | %d | %s | %s | %.3f |\n", static_cast<long long>(n), threads, q8 ? "8-bit" : "fp32",
                  prox ? "prox + sums" : "l2", figure * 1e9);
    }
  }
  return 0;
}
