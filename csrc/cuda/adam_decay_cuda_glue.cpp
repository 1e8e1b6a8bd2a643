// CUDA kernel registration of fusedecay::adam_decay_ (the op is defined by the CPU extension,
// csrc/ops.cpp; load fusedecay._C first). Validation, the work table and the scalar handling are the
// shared csrc/glue.h; the kernels are the torch-free adam_decay_cuda.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../glue.h"
#include "adam_decay_cuda.h"

namespace fusedecay {
namespace {

template <typename T>
void launch_cuda(Prepared& prep, const ScalarInputs& sc, const std::optional<at::Tensor>& abs_sums, double beta1,
                 double beta2, double eps, double weight_decay, std::optional<double> delta_fixed, double delta_scale,
                 bool bias_correction, bool maximize, std::optional<double> delta_beta, cudaStream_t stream) {
  const KernelScalars<T> ks = make_kernel_scalars<T>(prep, sc, beta1, beta2, eps, weight_decay, delta_fixed,
                                                     delta_scale, bias_correction, maximize, delta_beta);
  const auto on_device = at::TensorOptions().device(prep.device);
  for (const LaunchGroup& gr : prep.groups) {
    const int64_t n = static_cast<int64_t>(gr.metas.size());
    const int64_t nc = static_cast<int64_t>(gr.chunks.size());
    // Device buffers come from torch's caching allocator on the current stream (a CUDA graph's
    // private pool during capture), so they stay valid for the kernels that use them.
    at::Tensor table = at::empty({static_cast<int64_t>(cuda::table_bytes(n, nc))}, on_device.dtype(at::kByte));
    at::Tensor partials;
    if (abs_sums.has_value()) partials = at::empty({std::max<int64_t>(nc, 1)}, on_device.dtype(at::kDouble));
    cuda::LaunchParams lp;
    lp.param_kind = storage_kind(prep.param_dtype);
    lp.moment_kind = moment_kind(gr.moment_dtype);
    lp.device = prep.device.index();
    lp.stream = stream;
    lp.chunk_size = prep.chunk_size;
    lp.metas = gr.metas.data();
    lp.num_tensors = n;
    lp.chunks = gr.chunks.data();
    lp.num_chunks = nc;
    lp.device_table = table.data_ptr();
    lp.partials = abs_sums.has_value() ? partials.data_ptr<double>() : nullptr;
    lp.abs_sums = abs_sums.has_value() ? abs_sums->data_ptr() : nullptr;
    lp.scalars = &ks;
    const char* err = cuda::launch_adam_decay(lp);
    TORCH_CHECK(err == nullptr, "fusedecay adam_decay_ (CUDA): ", err);
  }
}

void adam_decay_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList state_steps, std::optional<at::TensorList> delta_mus,
                     const std::optional<at::Tensor>& abs_sums, double lr, const std::optional<at::Tensor>& lr_tensor,
                     double beta1, double beta2, double eps, double weight_decay, c10::string_view decay,
                     std::optional<double> delta_fixed, double delta_scale, std::optional<double> max_lr,
                     const std::optional<at::Tensor>& max_lr_tensor, bool bias_correction, bool maximize,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                     int64_t chunk_size, std::optional<at::TensorList> exp_avg_scales,
                     std::optional<at::TensorList> exp_avg_sq_scales, std::optional<double> delta_beta,
                     std::optional<c10::IntArrayRef> mu_numels, bool increment_steps) {
  // The CPU kernel's shortcut (on a GPU the steps are incremented by one foreach launch before this op).
  TORCH_CHECK_VALUE(!increment_steps, "Invalid increment_steps: the CUDA kernel does not increment the steps; "
                    "increment them before the call");
  // (The CPU kernel keeps the sums of a fused μ update in host memory of its own when abs_sums is None.)
  TORCH_CHECK_VALUE(!delta_beta.has_value() || abs_sums.has_value(), "Invalid abs_sums: delta_beta needs abs_sums");
  check_hyper(beta1, beta2, eps, weight_decay, delta_scale, delta_fixed, max_lr);
  Prepared prep = prepare_adam_decay(params, grads, exp_avgs, exp_avg_sqs, state_steps, delta_mus, abs_sums,
                                     std::string(decay), delta_fixed, chunk_size, c10::DeviceType::CUDA,
                                     exp_avg_scales, exp_avg_sq_scales, delta_beta, mu_numels);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(prep.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(prep.device.index()).stream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) {
    // A CPU lr is read on the host (no device sync); inside a capture that value would be frozen
    // into the graph and later changes silently ignored at replay.
    TORCH_CHECK_VALUE(!(lr_tensor.has_value() && lr_tensor->is_cpu()),
                      "Invalid lr: a CPU tensor while the step is being captured in a CUDA graph (its value would "
                      "be frozen into the graph); put lr on ", prep.device);
    TORCH_CHECK_VALUE(!(max_lr_tensor.has_value() && max_lr_tensor->is_cpu()),
                      "Invalid max_lr: a CPU tensor while the step is being captured in a CUDA graph (its value "
                      "would be frozen into the graph); put max_lr on ", prep.device);
  }
  const ScalarInputs sc = prepare_scalars(prep, lr, lr_tensor, max_lr, max_lr_tensor, grad_scale, found_inf);
  if (prep.math_dtype == at::kDouble) {
    launch_cuda<double>(prep, sc, abs_sums, beta1, beta2, eps, weight_decay, delta_fixed, delta_scale,
                        bias_correction, maximize, delta_beta, stream);
  } else {
    launch_cuda<float>(prep, sc, abs_sums, beta1, beta2, eps, weight_decay, delta_fixed, delta_scale,
                       bias_correction, maximize, delta_beta, stream);
  }
  prep.finish();
}

}  // namespace
}  // namespace fusedecay

TORCH_LIBRARY_IMPL(fusedecay, CUDA, m) { m.impl("adam_decay_", &fusedecay::adam_decay_cuda); }

#include <Python.h>
static struct PyModuleDef fusedecay_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda", "fusedecay CUDA kernels", -1, nullptr, nullptr, nullptr, nullptr, nullptr};
PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&fusedecay_cuda_module); }
