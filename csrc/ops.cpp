// torch.library registration of the fusedecay ops (namespace `fusedecay`) and their CPU and Meta
// kernels. The CUDA kernel of the same op lives in the separate CUDA extension
// (csrc/cuda/adam_decay_cuda_glue.cpp), which registers it when it is loaded.
//
//   fusedecay::adam_decay_        the multi-tensor AdamHD/AdamC step (contract:
//                                 fusedecay.reference.adam_decay_reference)
//   fusedecay::_chunk_table       the work split a launch uses, for tests: int64 [num_chunks, 4] rows of
//                                 (tensor, chunk, begin, length)
//   fusedecay::_sum_partials      level 2 of the Σ|θ| reduction, exactly as the kernels do it, for tests
//   fusedecay::abs_sums_          Σ|x| per tensor by the kernels' own two-level reduction (AdamHD's μ_0 = mean|θ_0|)
//   fusedecay::_increment_steps_  t ← t + 1 for a list of float32 CPU step counters in one call (torch's foreach
//                                 add runs one small op per tensor on the CPU: ~1.4 µs each)
//   fusedecay::_cpu_kernel_config [AVX-512 form runs (1/0), software prefetch distance] of this process, for tests
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "adam_decay_math.h"
#include "chunk_table.h"
#include "cpu/adam_decay_cpu.h"
#include "glue.h"

namespace fusedecay {
namespace {

template <typename T>
void run_cpu(Prepared& prep, const ScalarInputs& sc, const std::optional<at::Tensor>& abs_sums, double beta1,
             double beta2, double eps, double weight_decay, std::optional<double> delta_fixed, double delta_scale,
             bool bias_correction, bool maximize, std::optional<double> delta_beta) {
  const KernelScalars<T> ks = make_kernel_scalars<T>(prep, sc, beta1, beta2, eps, weight_decay, delta_fixed,
                                                     delta_scale, bias_correction, maximize, delta_beta);
  T* sums = abs_sums.has_value() ? abs_sums->data_ptr<T>() : nullptr;
  const bool update_mu = ks.hyper.update_mu && !should_skip(ks);
  // A fused μ update without abs_sums (the caller does not want the sums): they go to host memory of our own, which
  // spares the caller a tensor allocation per step.
  std::vector<T> own_sums;
  if (sums == nullptr && ks.hyper.update_mu) {
    own_sums.resize(prep.num_params);
    sums = own_sums.data();
  }
  // Every moment format's tensors in one parallel region (a group of small full-precision tensors beside the 8-bit
  // ones would otherwise run alone, on one thread, after them).
  std::vector<std::vector<double>> partials(prep.groups.size());
  std::vector<cpu::LaunchPart> parts;
  parts.reserve(prep.groups.size());
  for (size_t k = 0; k < prep.groups.size(); ++k) {
    const LaunchGroup& gr = prep.groups[k];
    if (sums != nullptr) partials[k].assign(gr.chunks.size(), 0.0);
    parts.push_back(cpu::LaunchPart{moment_kind(gr.moment_dtype), gr.metas.data(), gr.chunks.data(),
                                    static_cast<int64_t>(gr.chunks.size()),
                                    sums != nullptr ? partials[k].data() : nullptr});
  }
  cpu::run_adam_decay<T>(ks, storage_kind(prep.param_dtype), parts.data(), static_cast<int64_t>(parts.size()),
                         prep.chunk_size);
  if (sums == nullptr) return;
  for (size_t k = 0; k < prep.groups.size(); ++k) {
    for (const TensorMeta& t : prep.groups[k].metas) {
      const T sum = static_cast<T>(sum_partials(partials[k].data(), t.first_chunk, t.num_chunks));
      sums[t.out_index] = sum;
      if (update_mu) {  // μ is read by every chunk of the step above: updated only after all of them ran
        T* mu = static_cast<T*>(t.mu);
        *mu = delta_mu_next<T>(*mu, sum, static_cast<T>(t.mu_numel), ks.hyper);
      }
    }
  }
}

void adam_decay_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList state_steps, std::optional<at::TensorList> delta_mus,
                    const std::optional<at::Tensor>& abs_sums, double lr, const std::optional<at::Tensor>& lr_tensor,
                    double beta1, double beta2, double eps, double weight_decay, c10::string_view decay,
                    std::optional<double> delta_fixed, double delta_scale, std::optional<double> max_lr,
                    const std::optional<at::Tensor>& max_lr_tensor, bool bias_correction, bool maximize,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    int64_t chunk_size, std::optional<at::TensorList> exp_avg_scales,
                    std::optional<at::TensorList> exp_avg_sq_scales, std::optional<double> delta_beta,
                    std::optional<c10::IntArrayRef> mu_numels, bool increment_steps) {
  check_hyper(beta1, beta2, eps, weight_decay, delta_scale, delta_fixed, max_lr);
  Prepared prep = prepare_adam_decay(params, grads, exp_avgs, exp_avg_sqs, state_steps, delta_mus, abs_sums,
                                     std::string(decay), delta_fixed, chunk_size, c10::DeviceType::CPU,
                                     exp_avg_scales, exp_avg_sq_scales, delta_beta, mu_numels);
  if (params.empty()) return;
  const ScalarInputs sc = prepare_scalars(prep, lr, lr_tensor, max_lr, max_lr_tensor, grad_scale, found_inf);
  // t ← t + 1 here, after every check, instead of in a call of its own before this one; a step with found_inf set
  // does not count (nothing is written).
  if (increment_steps && !(sc.found_inf != nullptr && *sc.found_inf != 0.0f)) {
    for (const at::Tensor& t : state_steps) *t.data_ptr<float>() += 1.0f;  // the same rounding as torch's add of 1
  }
  if (prep.math_dtype == at::kDouble) {
    run_cpu<double>(prep, sc, abs_sums, beta1, beta2, eps, weight_decay, delta_fixed, delta_scale, bias_correction,
                    maximize, delta_beta);
  } else {
    run_cpu<float>(prep, sc, abs_sums, beta1, beta2, eps, weight_decay, delta_fixed, delta_scale, bias_correction,
                   maximize, delta_beta);
  }
  prep.finish();
}

// Shape-only kernel so FakeTensor / torch.compile can trace the op (it mutates in place, returns nothing).
void adam_decay_meta(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                     std::optional<at::TensorList>, const std::optional<at::Tensor>&, double,
                     const std::optional<at::Tensor>&, double, double, double, double, c10::string_view,
                     std::optional<double>, double, std::optional<double>, const std::optional<at::Tensor>&, bool, bool,
                     const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t,
                     std::optional<at::TensorList>, std::optional<at::TensorList>, std::optional<double>,
                     std::optional<c10::IntArrayRef>, bool) {}

std::vector<TensorMeta> metas_of(c10::IntArrayRef numels) {
  std::vector<TensorMeta> metas(numels.size());
  for (size_t i = 0; i < numels.size(); ++i) {
    TORCH_CHECK_VALUE(numels[i] >= 0, "Invalid numels[", i, "]: ", numels[i]);
    metas[i].numel = numels[i];
    metas[i].out_index = static_cast<int64_t>(i);
  }
  return metas;
}

int64_t resolve_chunk_size(int64_t chunk_size) {
  const int64_t cs = chunk_size == 0 ? kDefaultChunkSize : chunk_size;
  try {
    check_chunk_size(cs);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, "Invalid chunk_size: ", e.what());
  }
  return cs;
}

at::Tensor chunk_table_op(c10::IntArrayRef numels, int64_t chunk_size) {
  const int64_t cs = resolve_chunk_size(chunk_size);
  std::vector<TensorMeta> metas = metas_of(numels);
  const std::vector<ChunkRef> table = build_chunk_table(metas, cs);
  at::Tensor out = at::empty({static_cast<int64_t>(table.size()), 4}, at::kLong);
  auto a = out.accessor<int64_t, 2>();
  for (size_t c = 0; c < table.size(); ++c) {
    a[c][0] = table[c].tensor;
    a[c][1] = table[c].chunk;
    a[c][2] = chunk_begin(table[c], cs);
    a[c][3] = chunk_length(table[c], metas[table[c].tensor].numel, cs);
  }
  return out;
}

void increment_steps_cpu(at::TensorList steps) {
  for (size_t i = 0; i < steps.size(); ++i) {
    const at::Tensor& t = steps[i];
    TORCH_CHECK_VALUE(t.numel() == 1 && t.scalar_type() == at::kFloat, "Invalid steps[", i,
                      "]: expected a one-element float32 tensor, got ", t.scalar_type(), " of shape ", t.sizes());
  }
  for (const at::Tensor& t : steps) *t.data_ptr<float>() += 1.0f;  // the same rounding as torch's add of 1
}

at::Tensor sum_partials_op(const at::Tensor& partials, c10::IntArrayRef numels, int64_t chunk_size) {
  const int64_t cs = resolve_chunk_size(chunk_size);
  std::vector<TensorMeta> metas = metas_of(numels);
  const std::vector<ChunkRef> table = build_chunk_table(metas, cs);
  TORCH_CHECK_VALUE(partials.scalar_type() == at::kDouble && partials.dim() == 1 &&
                        partials.numel() == static_cast<int64_t>(table.size()),
                    "Invalid partials: expected a float64 1-D tensor with ", table.size(), " entries");
  const at::Tensor pc = partials.contiguous().cpu();
  at::Tensor out = at::empty({static_cast<int64_t>(metas.size())}, at::kDouble);
  for (size_t i = 0; i < metas.size(); ++i) {
    out.data_ptr<double>()[i] = sum_partials(pc.data_ptr<double>(), metas[i].first_chunk, metas[i].num_chunks);
  }
  return out;
}

// Σ|x| of each tensor, written to out[i] (math dtype), by the update kernel's found_inf path: it writes
// nothing and reduces |θ| with the same chunk table, per-chunk partials and ordered level-2 sum as every
// step. So μ_0 = mean|θ_0| depends on the tensor sizes only, never on the thread count or the ISA, and is
// computed like every later Σ|θ_t|. A tensor that is not dense is summed from a contiguous copy.
void abs_sums_cpu(at::TensorList tensors, const at::Tensor& out, int64_t chunk_size) {
  const int64_t cs = resolve_chunk_size(chunk_size);
  const int64_t n = static_cast<int64_t>(tensors.size());
  TORCH_CHECK_VALUE(out.device().is_cpu() && out.dim() == 1 && out.numel() == n && out.is_contiguous(),
                    "Invalid out: expected a contiguous 1-D CPU tensor with ", n, " entries");
  if (n == 0) return;
  const at::ScalarType dtype = tensors[0].scalar_type();
  TORCH_CHECK_VALUE(storage_kind(dtype) >= 0, "Invalid tensors[0]: dtype ", dtype,
                    " (expected float32, bfloat16 or float64)");
  TORCH_CHECK_VALUE(out.scalar_type() == math_dtype_of(dtype), "Invalid out: dtype ", out.scalar_type(),
                    ", expected ", math_dtype_of(dtype));
  std::vector<at::Tensor> keep;
  std::vector<TensorMeta> metas(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == dtype, "Invalid tensors[", i, "]: ", t.device(),
                      " ", t.scalar_type(), " (all must be CPU tensors of dtype ", dtype, ")");
    keep.push_back(t.is_non_overlapping_and_dense() ? t : t.contiguous());
    metas[i] = TensorMeta{};
    metas[i].param = keep.back().data_ptr();
    metas[i].numel = t.numel();
    metas[i].out_index = i;
  }
  const std::vector<ChunkRef> table = build_chunk_table(metas, cs);
  std::vector<double> partials(table.size(), 0.0);
  const int kind = storage_kind(dtype);
  auto run = [&](auto math_zero) {  // math type: double for float64 tensors, float otherwise
    using T = decltype(math_zero);
    static const float kSkip = 1.0f;  // found_inf ≠ 0: the update writes nothing and only reduces |θ|
    KernelScalars<T> ks{};
    ks.found_inf_ptr = &kSkip;
    cpu::run_adam_decay<T>(ks, kind, kind, metas.data(), table.data(), static_cast<int64_t>(table.size()), cs,
                           partials.data());
    for (const TensorMeta& t : metas) {
      out.data_ptr<T>()[t.out_index] = static_cast<T>(sum_partials(partials.data(), t.first_chunk, t.num_chunks));
    }
  };
  if (dtype == at::kDouble) {
    run(0.0);
  } else {
    run(0.0f);
  }
}

// [1 if the AVX-512 vector form runs else 0, software prefetch distance]: what FUSEDECAY_CPU_VECTORS and
// FUSEDECAY_CPU_PREFETCH made of this process's CPU kernel, for tests that set them in a subprocess.
std::vector<int64_t> cpu_kernel_config_op() {
  return {cpu::runs_avx512_form() ? 1 : 0, cpu::software_prefetch_distance()};
}

}  // namespace
}  // namespace fusedecay

TORCH_LIBRARY(fusedecay, m) {
  m.def(fusedecay::kAdamDecaySchema);
  m.def("abs_sums_(Tensor[] tensors, Tensor(a!) out, int chunk_size=0) -> ()");
  // Test helpers: plain CPU functions, no dispatch.
  m.def("_chunk_table(int[] numels, int chunk_size=0) -> Tensor", &fusedecay::chunk_table_op);
  m.def("_sum_partials(Tensor partials, int[] numels, int chunk_size=0) -> Tensor", &fusedecay::sum_partials_op);
  m.def("_increment_steps_(Tensor(a!)[] steps) -> ()");
  m.def("_cpu_kernel_config() -> int[]", &fusedecay::cpu_kernel_config_op);
}

TORCH_LIBRARY_IMPL(fusedecay, CPU, m) {
  m.impl("adam_decay_", &fusedecay::adam_decay_cpu);
  m.impl("abs_sums_", &fusedecay::abs_sums_cpu);
  m.impl("_increment_steps_", &fusedecay::increment_steps_cpu);
}

TORCH_LIBRARY_IMPL(fusedecay, Meta, m) {
  m.impl("adam_decay_", &fusedecay::adam_decay_meta);
  m.impl("abs_sums_", [](at::TensorList, const at::Tensor&, int64_t) {});
}

// Module init so `import fusedecay._C` works (the ops are registered by the static initialisers above).
#include <Python.h>
static struct PyModuleDef fusedecay_c_module = {PyModuleDef_HEAD_INIT, "_C", "fusedecay CPU kernels", -1, nullptr, nullptr, nullptr, nullptr, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fusedecay_c_module); }
