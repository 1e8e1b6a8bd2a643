// Torch-side argument checking and launch preparation shared by the CPU op (csrc/ops.cpp) and the
// CUDA op (csrc/cuda/adam_decay_cuda_glue.cpp). Header-only: each extension compiles its own copy.
//
// The op's contract is fusedecay.reference.adam_decay_reference; errors name the bad argument and
// are raised as ValueError (TORCH_CHECK_VALUE) before anything is written.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "adam_decay_math.h"
#include "chunk_table.h"
#include "state8.h"

namespace fusedecay {

// The op schema, shared by both extensions (the CPU extension defines it).
constexpr const char* kAdamDecaySchema =
    "adam_decay_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(h!)[] state_steps, Tensor(e!)[]? delta_mus, Tensor(d!)? abs_sums, *, float lr, Tensor? lr_tensor, "
    "float beta1, float beta2, float eps, float weight_decay, str decay, float? delta_fixed, "
    "float delta_scale, float? max_lr, Tensor? max_lr_tensor, bool bias_correction, bool maximize, "
    "Tensor? grad_scale, Tensor? found_inf, int chunk_size=0, Tensor(f!)[]? exp_avg_scales=None, "
    "Tensor(g!)[]? exp_avg_sq_scales=None, float? delta_beta=None, int[]? mu_numels=None, "
    "bool increment_steps=False) -> ()";

inline int parse_decay(const std::string& decay) {
  if (decay == "l2") return kDecayL2;
  if (decay == "prox") return kDecayProx;
  if (decay == "euler") return kDecayEuler;
  TORCH_CHECK_VALUE(false, "Invalid decay: '", decay, "' (expected one of 'l2', 'prox', 'euler')");
  return -1;
}

inline at::ScalarType math_dtype_of(at::ScalarType param_dtype) {
  return param_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline int storage_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kStoreF32;
    case at::kBFloat16: return kStoreBF16;
    case at::kDouble: return kStoreF64;
    default: return -1;
  }
}

// Storage kind of a moment pair: its dtype's, or kStoreQ8 for int8 exp_avg codes (uint8 exp_avg_sq codes).
inline int moment_kind(at::ScalarType m) { return m == at::kChar ? kStoreQ8 : storage_kind(m); }

// (param dtype, exp_avg dtype) pairs the kernels are instantiated for.
inline bool supported_pair(at::ScalarType p, at::ScalarType m) {
  if (p == at::kDouble) return m == at::kDouble;
  return (p == at::kFloat || p == at::kBFloat16) && (m == at::kFloat || m == at::kBFloat16 || m == at::kChar);
}

// The four data tensors of one param can be walked as one flat array when they are dense and
// share the param's layout (contiguous, channels_last, a transposed weight with matching grad…).
inline bool same_dense_layout(const at::Tensor& p, const at::Tensor& other) {
  return other.sizes().equals(p.sizes()) && other.strides().equals(p.strides());
}

struct LaunchGroup {
  at::ScalarType moment_dtype;
  std::vector<TensorMeta> metas;
  std::vector<ChunkRef> chunks;
};

struct Prepared {
  at::ScalarType param_dtype = at::kFloat;
  at::ScalarType math_dtype = at::kFloat;
  c10::Device device = c10::Device(c10::kCPU);
  int decay = kDecayL2;
  int64_t chunk_size = kDefaultChunkSize;
  std::vector<LaunchGroup> groups;
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;  // (user tensor, dense working copy)
  std::vector<at::Tensor> keep_alive;                        // working copies the metas point into
  bool needs_mu = false;
  size_t num_params = 0;

  // Writes the working copies of params/moments back into non-dense user tensors (after the kernel).
  void finish() {
    for (auto& pr : copy_back) pr.first.copy_(pr.second);
  }
};

inline void check_scalar_tensor(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.numel() == 1, "Invalid ", name, ": expected a tensor with one element, got shape ", t.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), "Invalid ", name, ": expected a floating-point tensor, got ",
                    t.scalar_type());
}

// 8-bit state of params[i] (csrc/state8.h): int8/uint8 codes shaped like the param and fp32 block scales.
// k: the entry's index in the scale lists (params[i] is the k-th param with 8-bit state of the launch).
inline void check_state8(size_t i, size_t k, const at::Tensor& p, const at::Tensor& m, const at::Tensor& v,
                         const at::Tensor& ms, const at::Tensor& vs, int64_t chunk_size) {
  TORCH_CHECK_VALUE(m.scalar_type() == at::kChar && v.scalar_type() == at::kByte, "Invalid exp_avgs[", i,
                    "]: 8-bit state needs int8 exp_avg and uint8 exp_avg_sq codes, got ", m.scalar_type(), " and ",
                    v.scalar_type());
  TORCH_CHECK_VALUE(p.numel() % state8::kBlock == 0, "Invalid params[", i, "]: 8-bit state needs a multiple of ",
                    state8::kBlock, " elements, got ", p.numel());
  TORCH_CHECK_VALUE(m.is_contiguous() && v.is_contiguous(), "Invalid exp_avgs[", i,
                    "]: 8-bit codes must be contiguous (blocks are defined in row-major order)");
  const int64_t blocks = p.numel() / state8::kBlock;
  for (const at::Tensor* sc : {&ms, &vs}) {
    TORCH_CHECK_VALUE(sc->scalar_type() == at::kFloat && sc->device() == p.device() && sc->numel() == blocks &&
                          sc->is_contiguous(),
                      "Invalid ", sc == &ms ? "exp_avg_scales[" : "exp_avg_sq_scales[", k, "] (of params[", i,
                      "]): expected a contiguous float32 tensor of ", blocks, " elements on ", p.device(), ", got ",
                      sc->scalar_type(), " of shape ", sc->sizes(), " on ", sc->device());
  }
  TORCH_CHECK_VALUE(chunk_size % state8::kBlock == 0, "Invalid chunk_size: ", chunk_size,
                    " (8-bit state needs a multiple of ", state8::kBlock, ")");
}

inline Prepared prepare_adam_decay(const at::TensorList params, const at::TensorList grads,
                                   const at::TensorList exp_avgs, const at::TensorList exp_avg_sqs,
                                   const at::TensorList state_steps,
                                   const std::optional<at::TensorList>& delta_mus,
                                   const std::optional<at::Tensor>& abs_sums, const std::string& decay,
                                   std::optional<double> delta_fixed, int64_t chunk_size,
                                   c10::DeviceType expected_device,
                                   const std::optional<at::TensorList>& exp_avg_scales = std::nullopt,
                                   const std::optional<at::TensorList>& exp_avg_sq_scales = std::nullopt,
                                   std::optional<double> delta_beta = std::nullopt,
                                   const std::optional<c10::IntArrayRef>& mu_numels = std::nullopt) {
  Prepared out;
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n, "Invalid grads: ", grads.size(), " entries for ", n, " params");
  TORCH_CHECK_VALUE(exp_avgs.size() == n, "Invalid exp_avgs: ", exp_avgs.size(), " entries for ", n, " params");
  TORCH_CHECK_VALUE(exp_avg_sqs.size() == n, "Invalid exp_avg_sqs: ", exp_avg_sqs.size(), " entries for ", n,
                    " params");
  TORCH_CHECK_VALUE(state_steps.size() == n, "Invalid state_steps: ", state_steps.size(), " entries for ", n,
                    " params");
  out.decay = parse_decay(decay);
  out.chunk_size = chunk_size == 0 ? kDefaultChunkSize : chunk_size;
  TORCH_CHECK_VALUE(out.chunk_size > 0 && out.chunk_size % kChunkSizeMultiple == 0 && out.chunk_size <= (1 << 30),
                    "Invalid chunk_size: ", chunk_size, " (0 for the default, else a positive multiple of ",
                    kChunkSizeMultiple, ")");
  out.needs_mu = out.decay != kDecayL2 && !delta_fixed.has_value();
  // 8-bit state is per tensor: the entries whose exp_avgs are int8 codes. The scale lists hold their block scales,
  // in order, one per such entry (so a launch may mix 8-bit and full-precision moments).
  const bool has_scales = exp_avg_scales.has_value();
  TORCH_CHECK_VALUE(has_scales == exp_avg_sq_scales.has_value(),
                    "Invalid exp_avg_scales: exp_avg_scales and exp_avg_sq_scales must be given together");
  size_t num_state8 = 0;
  for (size_t i = 0; i < n; ++i) num_state8 += exp_avgs[i].scalar_type() == at::kChar;
  if (has_scales) {
    TORCH_CHECK_VALUE(exp_avg_scales->size() == num_state8 && exp_avg_sq_scales->size() == num_state8,
                      "Invalid exp_avg_scales: ", exp_avg_scales->size(), " and ", exp_avg_sq_scales->size(),
                      " entries for ", num_state8, " params with 8-bit (int8) exp_avgs");
  }
  if (delta_beta.has_value()) {
    TORCH_CHECK_VALUE(out.needs_mu, "Invalid delta_beta: the fused μ update needs decay 'prox' or 'euler' "
                      "without delta_fixed");
    TORCH_CHECK_VALUE(*delta_beta >= 0.0 && *delta_beta < 1.0, "Invalid delta_beta: ", *delta_beta,
                      " (must lie in [0, 1))");
  }
  if (mu_numels.has_value()) {
    TORCH_CHECK_VALUE(delta_beta.has_value() && mu_numels->size() == n, "Invalid mu_numels: expected one size per "
                      "param, and only with delta_beta");
  }
  out.num_params = n;
  if (n == 0) return out;

  out.device = params[0].device();
  out.param_dtype = params[0].scalar_type();
  out.math_dtype = math_dtype_of(out.param_dtype);
  TORCH_CHECK_VALUE(out.device.type() == expected_device, "Invalid params: expected ",
                    c10::DeviceTypeName(expected_device), " tensors, got ", out.device);
  TORCH_CHECK_VALUE(storage_kind(out.param_dtype) >= 0, "Invalid params: dtype ", out.param_dtype,
                    " is not supported (float32, bfloat16, float64)");
  if (out.needs_mu) {
    TORCH_CHECK_VALUE(delta_mus.has_value() && delta_mus->size() == n,
                      "Invalid delta_mus: decay '", decay, "' without delta_fixed needs one delta_mu per param");
  }
  if (abs_sums.has_value()) {
    const at::Tensor& s = *abs_sums;
    TORCH_CHECK_VALUE(s.device() == out.device, "Invalid abs_sums: on ", s.device(), ", params on ", out.device);
    TORCH_CHECK_VALUE(s.scalar_type() == out.math_dtype, "Invalid abs_sums: dtype ", s.scalar_type(),
                      ", expected ", out.math_dtype);
    TORCH_CHECK_VALUE(s.dim() == 1 && s.numel() >= static_cast<int64_t>(n) && s.stride(0) == 1,
                      "Invalid abs_sums: expected a contiguous 1-D tensor with at least ", n, " entries, got shape ",
                      s.sizes());
  }

  size_t next_scale = 0;  // index into the scale lists of the next 8-bit entry
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    const at::Tensor& m = exp_avgs[i];
    const at::Tensor& v = exp_avg_sqs[i];
    const bool is_state8 = m.scalar_type() == at::kChar;
    const at::Tensor* m_scale = nullptr;
    const at::Tensor* v_scale = nullptr;
    TORCH_CHECK_VALUE(p.device() == out.device && p.scalar_type() == out.param_dtype,
                      "Invalid params[", i, "]: all params of one launch must share device and dtype (", out.device,
                      ", ", out.param_dtype, "), got ", p.device(), ", ", p.scalar_type());
    TORCH_CHECK_VALUE(g.device() == out.device && g.scalar_type() == out.param_dtype,
                      "Invalid grads[", i, "]: expected ", out.param_dtype, " on ", out.device, ", got ",
                      g.scalar_type(), " on ", g.device());
    TORCH_CHECK_VALUE(g.sizes().equals(p.sizes()), "Invalid grads[", i, "]: shape ", g.sizes(), " != param shape ",
                      p.sizes());
    TORCH_CHECK_VALUE(m.device() == out.device && m.sizes().equals(p.sizes()), "Invalid exp_avgs[", i,
                      "]: expected shape ", p.sizes(), " on ", out.device);
    TORCH_CHECK_VALUE(v.device() == out.device && v.sizes().equals(p.sizes()), "Invalid exp_avg_sqs[", i,
                      "]: expected shape ", p.sizes(), " on ", out.device);
    if (is_state8) {
      TORCH_CHECK_VALUE(has_scales, "Invalid exp_avgs[", i,
                        "]: int8 moments are 8-bit state and need exp_avg_scales / exp_avg_sq_scales");
      m_scale = &(*exp_avg_scales)[next_scale];
      v_scale = &(*exp_avg_sq_scales)[next_scale];
      ++next_scale;
      check_state8(i, next_scale - 1, p, m, v, *m_scale, *v_scale, out.chunk_size);
    } else {
      TORCH_CHECK_VALUE(m.scalar_type() == v.scalar_type(), "Invalid exp_avg_sqs[", i, "]: dtype ", v.scalar_type(),
                        " differs from exp_avgs[", i, "] (", m.scalar_type(), ")");
    }
    TORCH_CHECK_VALUE(supported_pair(out.param_dtype, m.scalar_type()), "Invalid exp_avgs[", i, "]: moments of dtype ",
                      m.scalar_type(), " are not supported for ", out.param_dtype, " params");
    const at::Tensor& st = state_steps[i];
    TORCH_CHECK_VALUE(st.numel() == 1 && st.scalar_type() == at::kFloat && st.device() == out.device,
                      "Invalid state_steps[", i, "]: expected a one-element float32 tensor on ", out.device, ", got ",
                      st.scalar_type(), " shape ", st.sizes(), " on ", st.device());
    void* mu_ptr = nullptr;
    if (out.needs_mu) {
      const at::Tensor& mu = (*delta_mus)[i];
      TORCH_CHECK_VALUE(mu.numel() == 1 && mu.scalar_type() == out.math_dtype && mu.device() == out.device,
                        "Invalid delta_mus[", i, "]: expected a one-element ", out.math_dtype, " tensor on ",
                        out.device, ", got ", mu.scalar_type(), " shape ", mu.sizes(), " on ", mu.device());
      mu_ptr = mu.data_ptr();
    }

    at::Tensor pw = p, gw = g, mw = m, vw = v;
    // 8-bit blocks are defined in row-major order: such tensors are walked in place only when contiguous.
    const bool dense = is_state8 ? p.is_contiguous() : p.is_non_overlapping_and_dense();
    const bool direct = dense && same_dense_layout(p, g) && same_dense_layout(p, m) && same_dense_layout(p, v);
    if (!direct && p.numel() > 0) {
      // Walk contiguous copies and write params/moments back afterwards (rare: sliced or
      // mismatched-layout tensors). Costs one extra read+write of those tensors.
      pw = p.contiguous();
      gw = g.contiguous();
      mw = m.contiguous();
      vw = v.contiguous();
      if (!pw.is_same(p)) out.copy_back.emplace_back(p, pw);
      if (!mw.is_same(m)) out.copy_back.emplace_back(m, mw);
      if (!vw.is_same(v)) out.copy_back.emplace_back(v, vw);
      out.keep_alive.insert(out.keep_alive.end(), {pw, gw, mw, vw});
    }
    TensorMeta meta{};
    meta.param = pw.data_ptr();
    meta.grad = gw.data_ptr();
    meta.exp_avg = mw.data_ptr();
    meta.exp_avg_sq = vw.data_ptr();
    meta.exp_avg_scale = is_state8 ? m_scale->data_ptr<float>() : nullptr;
    meta.exp_avg_sq_scale = is_state8 ? v_scale->data_ptr<float>() : nullptr;
    meta.step = st.data_ptr<float>();
    meta.mu = mu_ptr;
    meta.mu_numel = static_cast<double>(std::max<int64_t>(mu_numels.has_value() ? (*mu_numels)[i] : p.numel(), 1));
    meta.numel = p.numel();
    meta.out_index = static_cast<int64_t>(i);

    LaunchGroup* grp = nullptr;
    for (auto& gr : out.groups) {
      if (gr.moment_dtype == m.scalar_type()) grp = &gr;
    }
    if (grp == nullptr) {
      out.groups.push_back(LaunchGroup{m.scalar_type(), {}, {}});
      grp = &out.groups.back();
    }
    grp->metas.push_back(meta);
  }
  for (auto& gr : out.groups) {
    try {
      gr.chunks = build_chunk_table(gr.metas, out.chunk_size);
    } catch (const std::invalid_argument& e) {
      TORCH_CHECK_VALUE(false, "Invalid params: ", e.what());
    }
  }
  return out;
}

// Scalar tensors (lr, max_lr, grad_scale, found_inf) as tensors of `dtype` on `device`, kept alive
// in `keep`. A CPU lr/max_lr for device params is read on the host instead (no device sync).
struct ScalarInputs {
  std::vector<at::Tensor> keep;
  const void* lr = nullptr;
  const void* max_lr = nullptr;
  const void* grad_scale = nullptr;
  const float* found_inf = nullptr;
  double lr_value = 0.0;
  std::optional<double> max_lr_value;
};

inline ScalarInputs prepare_scalars(const Prepared& prep, double lr, const std::optional<at::Tensor>& lr_tensor,
                                    const std::optional<double>& max_lr,
                                    const std::optional<at::Tensor>& max_lr_tensor,
                                    const std::optional<at::Tensor>& grad_scale,
                                    const std::optional<at::Tensor>& found_inf) {
  ScalarInputs s;
  s.lr_value = lr;
  s.max_lr_value = max_lr;
  const bool host_params = prep.device.is_cpu();
  auto on_device = [&](const at::Tensor& t, at::ScalarType dt) {
    at::Tensor x = t.reshape({}).to(prep.device, dt);
    s.keep.push_back(x);
    return x.data_ptr();
  };
  // lr / max_lr: a CPU tensor with device params is read on the host (no device sync), else read in the kernel.
  auto learning_rate = [&](const char* name, const std::optional<at::Tensor>& t, const void*& ptr, auto& value) {
    if (!t.has_value()) return;
    check_scalar_tensor(name, *t);
    if (t->is_cpu() && !host_params) {
      value = t->item<double>();
    } else {
      ptr = on_device(*t, prep.math_dtype);
    }
  };
  learning_rate("lr", lr_tensor, s.lr, s.lr_value);
  learning_rate("max_lr", max_lr_tensor, s.max_lr, s.max_lr_value);
  // grad_scale / found_inf live where GradScaler keeps them, on the params' device: reading them from
  // another device would be a synchronous copy (and is illegal inside a CUDA-graph capture).
  if (grad_scale.has_value()) {
    check_scalar_tensor("grad_scale", *grad_scale);
    TORCH_CHECK_VALUE(grad_scale->device() == prep.device, "Invalid grad_scale: on ", grad_scale->device(),
                      ", params on ", prep.device);
    s.grad_scale = on_device(*grad_scale, prep.math_dtype);
  }
  if (found_inf.has_value()) {
    check_scalar_tensor("found_inf", *found_inf);
    TORCH_CHECK_VALUE(found_inf->device() == prep.device, "Invalid found_inf: on ", found_inf->device(),
                      ", params on ", prep.device);
    s.found_inf = static_cast<const float*>(on_device(*found_inf, at::kFloat));
  }
  return s;
}

template <typename T>
inline KernelScalars<T> make_kernel_scalars(const Prepared& prep, const ScalarInputs& in, double beta1, double beta2,
                                            double eps, double weight_decay, std::optional<double> delta_fixed,
                                            double delta_scale, bool bias_correction, bool maximize,
                                            std::optional<double> delta_beta = std::nullopt) {
  KernelScalars<T> ks{};
  Hyper<T>& h = ks.hyper;
  h.beta1 = static_cast<T>(beta1);
  h.beta2 = static_cast<T>(beta2);
  h.one_minus_beta1 = static_cast<T>(1.0 - beta1);
  h.one_minus_beta2 = static_cast<T>(1.0 - beta2);
  h.eps = static_cast<T>(eps);
  h.weight_decay = static_cast<T>(weight_decay);
  h.use_delta_fixed = delta_fixed.has_value() ? 1 : 0;
  h.delta_fixed = static_cast<T>(delta_fixed.value_or(0.0));
  h.delta_scale = static_cast<T>(delta_scale);
  h.lr = static_cast<T>(in.lr_value);
  const bool corrected = in.max_lr != nullptr || in.max_lr_value.has_value();
  h.corrected = corrected ? 1 : 0;
  h.max_lr = static_cast<T>(in.max_lr_value.value_or(1.0));
  h.decay = prep.decay;
  h.bias_correction = bias_correction ? 1 : 0;
  h.maximize = maximize ? 1 : 0;
  h.update_mu = delta_beta.has_value() ? 1 : 0;
  h.mu_beta = static_cast<T>(delta_beta.value_or(0.0));  // rounded as torch rounds a Python-float scalar
  h.mu_one_minus_beta = static_cast<T>(1.0 - delta_beta.value_or(0.0));
  ks.lr_ptr = static_cast<const T*>(in.lr);
  ks.max_lr_ptr = static_cast<const T*>(in.max_lr);
  ks.grad_scale_ptr = static_cast<const T*>(in.grad_scale);
  ks.found_inf_ptr = in.found_inf;
  return ks;
}

inline void check_hyper(double beta1, double beta2, double eps, double weight_decay, double delta_scale,
                        std::optional<double> delta_fixed, std::optional<double> max_lr) {
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "Invalid beta1: ", beta1, " (must lie in [0, 1))");
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "Invalid beta2: ", beta2, " (must lie in [0, 1))");
  TORCH_CHECK_VALUE(eps >= 0.0, "Invalid eps: ", eps, " (must be >= 0)");
  TORCH_CHECK_VALUE(weight_decay >= 0.0, "Invalid weight_decay: ", weight_decay, " (must be >= 0)");
  TORCH_CHECK_VALUE(delta_scale >= 0.0, "Invalid delta_scale: ", delta_scale, " (must be >= 0)");
  if (delta_fixed.has_value()) {
    TORCH_CHECK_VALUE(*delta_fixed >= 0.0, "Invalid delta_fixed: ", *delta_fixed, " (must be >= 0)");
  }
  if (max_lr.has_value()) {
    TORCH_CHECK_VALUE(*max_lr > 0.0, "Invalid max_lr: ", *max_lr, " (must be > 0)");
  }
}

}  // namespace fusedecay
