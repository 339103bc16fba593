// CUDA implementations of the sampler-step ops (the schemas are in csrc/step_ops.cpp). Each is one elementwise
// launch on the current stream; per-sample alphas/sigmas are read on the device (no host sync), so the ops can be
// captured in CUDA graphs. The arithmetic is csrc/step_math.h, shared with the CPU code.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <string>

#include "../message.h"
#include "../step_math.h"

namespace diffusion_fast {

int prediction_index(const std::string& prediction_type);                            // step_ops.cpp
at::Tensor per_sample(const at::Tensor& a, const char* name, const at::Tensor& sample);  // step_ops.cpp

namespace {

constexpr int kThreads = 256;

enum Kind { kDDIM = 0, kDDPM = 1, kEulerAncestral = 2 };  // Euler ancestral: a_t = sigma, a_prev = sigma_next

template <typename scalar_t>
__global__ void step_kernel(const scalar_t* __restrict__ m, const scalar_t* __restrict__ t,
                            const scalar_t* __restrict__ x, const scalar_t* __restrict__ noise,
                            scalar_t* __restrict__ prev, scalar_t* __restrict__ x0,
                            const float* __restrict__ a_t, const float* __restrict__ a_prev,
                            const float* __restrict__ std_t, int kind, int pred, bool use_clipped, bool cfg,
                            bool has_noise, float guidance, float eta, float clip, int64_t per_sample, int64_t numel) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / per_sample;
    const StepCoeffs c = kind == kDDIM   ? ddim_coeffs(a_t[b], a_prev[b], eta, pred, use_clipped)
                         : kind == kDDPM ? ddpm_coeffs(a_t[b], a_prev[b], std_t[b], pred)
                                         : euler_ancestral_coeffs(a_t[b], a_prev[b], pred);
    float mo = static_cast<float>(m[i]);
    if (cfg) mo = mo + guidance * (static_cast<float>(t[i]) - mo);
    float x0v;
    const float p = apply_step(c, static_cast<float>(x[i]), mo, has_noise ? static_cast<float>(noise[i]) : 0.0f,
                               clip, &x0v);
    prev[i] = static_cast<scalar_t>(p);
    x0[i] = static_cast<scalar_t>(x0v);
  }
}

__global__ void euler_kernel(const float* __restrict__ m, const float* __restrict__ x, const float* __restrict__ noise,
                             float* __restrict__ prev, float* __restrict__ x0, const float* __restrict__ sigma,
                             const float* __restrict__ sigma_next, float gamma, float s_noise, int pred,
                             bool churn, int64_t per_sample, int64_t numel) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / per_sample;
    const StepCoeffs c = euler_coeffs(sigma[b], sigma_next[b], gamma, pred);
    const float xc = churn ? x[i] + euler_churn(sigma[b], gamma, s_noise) * noise[i] : x[i];
    prev[i] = apply_step<false, false>(c, xc, m[i], 0.0f, 0.0f, &x0[i]);
  }
}

template <typename scalar_t>
__global__ void linear_kernel(const scalar_t* __restrict__ m, const scalar_t* __restrict__ x,
                              const scalar_t* __restrict__ extra, scalar_t* __restrict__ prev,
                              scalar_t* __restrict__ x0, StepCoeffs c, bool has_extra, int64_t numel) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float x0v;
    const float p = apply_step<false, true>(c, static_cast<float>(x[i]), static_cast<float>(m[i]),
                                            has_extra ? static_cast<float>(extra[i]) : 0.0f, 0.0f, &x0v);
    prev[i] = static_cast<scalar_t>(p);
    x0[i] = static_cast<scalar_t>(x0v);
  }
}

int blocks_for(int64_t numel) {
  const int64_t max_blocks = 65535LL * 32;
  return static_cast<int>(std::min<int64_t>((numel + kThreads - 1) / kThreads, max_blocks));
}

void check_cuda_like(const at::Tensor& t, const char* name, const at::Tensor& sample) {
  TORCH_CHECK_VALUE(t.sizes() == sample.sizes(), message(name, " has shape ", t.sizes(), " but sample has shape ",
                                                         sample.sizes()));
  TORCH_CHECK_VALUE(t.device() == sample.device(), message(name, " is on ", t.device(), " but sample is on ",
                                                           sample.device()));
  TORCH_CHECK_TYPE(t.scalar_type() == sample.scalar_type(), message(name, " has dtype ", t.scalar_type(),
                   " but sample has dtype ", sample.scalar_type()));
}

at::Tensor coeff(const at::Tensor& a, const char* name, const at::Tensor& sample) {
  // (B,) float32 on sample's device (alphas on the host are copied over); one value broadcast to every sample
  return per_sample(a.to(sample.device()), name, sample);
}

std::tuple<at::Tensor, at::Tensor> launch_step(int kind, const at::Tensor& m_in, const c10::optional<at::Tensor>& t_in,
                                               const at::Tensor& x_in, const c10::optional<at::Tensor>& n_in,
                                               const at::Tensor& a_t, const at::Tensor& a_prev, const at::Tensor& std_t,
                                               double guidance, double eta, const std::string& prediction_type,
                                               c10::optional<double> clip, bool use_clipped) {
  check_cuda_like(m_in, t_in.has_value() ? "noise_pred_uncond" : "model_output", x_in);
  if (t_in.has_value()) check_cuda_like(*t_in, "noise_pred_text", x_in);
  if (n_in.has_value()) check_cuda_like(*n_in, "variance_noise", x_in);
  const int pred = prediction_index(prediction_type);
  const at::Tensor m = m_in.contiguous(), x = x_in.contiguous();
  const at::Tensor t = t_in.has_value() ? t_in->contiguous() : m;
  const at::Tensor n = n_in.has_value() ? n_in->contiguous() : x;
  const at::Tensor at_f = coeff(a_t, "alpha_prod_t", x), ap_f = coeff(a_prev, "alpha_prod_t_prev", x);
  const at::Tensor sd_f = coeff(std_t, "std", x);
  at::Tensor prev = at::empty_like(x), x0 = at::empty_like(x);
  const int64_t numel = x.numel(), per_sample = numel / x.size(0);
  const float clip_f = clip.has_value() ? static_cast<float>(*clip) : std::numeric_limits<float>::infinity();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "diffusion_fast_step_cuda", [&] {
    step_kernel<scalar_t><<<blocks_for(numel), kThreads, 0, stream>>>(
        m.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), n.data_ptr<scalar_t>(),
        prev.data_ptr<scalar_t>(), x0.data_ptr<scalar_t>(), at_f.data_ptr<float>(), ap_f.data_ptr<float>(),
        sd_f.data_ptr<float>(), kind, pred, use_clipped, t_in.has_value(), n_in.has_value(),
        static_cast<float>(guidance), static_cast<float>(eta), clip_f, per_sample, numel);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {prev, x0};
}

std::tuple<at::Tensor, at::Tensor> ddim_step_cuda(const at::Tensor& model_output, const at::Tensor& sample,
                                                  const at::Tensor& a_t, const at::Tensor& a_prev, double eta,
                                                  const c10::optional<at::Tensor>& noise,
                                                  c10::string_view prediction_type, c10::optional<double> clip,
                                                  bool use_clipped) {
  TORCH_CHECK_VALUE(eta == 0.0 || noise.has_value(), message("variance_noise is required when eta > 0"));
  return launch_step(kDDIM, model_output, c10::nullopt, sample, eta > 0 ? noise : c10::nullopt, a_t, a_prev, a_t,
                     0.0, eta, std::string(prediction_type), clip, use_clipped);
}

std::tuple<at::Tensor, at::Tensor> cfg_ddim_step_cuda(const at::Tensor& uncond, const at::Tensor& text,
                                                      double guidance, const at::Tensor& sample, const at::Tensor& a_t,
                                                      const at::Tensor& a_prev, double eta,
                                                      const c10::optional<at::Tensor>& noise,
                                                      c10::string_view prediction_type, c10::optional<double> clip,
                                                      bool use_clipped) {
  TORCH_CHECK_VALUE(eta == 0.0 || noise.has_value(), message("variance_noise is required when eta > 0"));
  return launch_step(kDDIM, uncond, text, sample, eta > 0 ? noise : c10::nullopt, a_t, a_prev, a_t, guidance, eta,
                     std::string(prediction_type), clip, use_clipped);
}

std::tuple<at::Tensor, at::Tensor> ddpm_step_cuda(const at::Tensor& model_output, const at::Tensor& sample,
                                                  const at::Tensor& a_t, const at::Tensor& a_prev,
                                                  const at::Tensor& std_t, const c10::optional<at::Tensor>& noise,
                                                  c10::string_view prediction_type, c10::optional<double> clip) {
  return launch_step(kDDPM, model_output, c10::nullopt, sample, noise, a_t, a_prev, std_t, 0.0, 0.0,
                     std::string(prediction_type), clip, false);
}

std::tuple<at::Tensor, at::Tensor> euler_step_cuda(const at::Tensor& model_output, const at::Tensor& sample,
                                                   const at::Tensor& sigma, const at::Tensor& sigma_next, double gamma,
                                                   double s_noise, const c10::optional<at::Tensor>& noise,
                                                   c10::string_view prediction_type) {
  TORCH_CHECK_VALUE(model_output.sizes() == sample.sizes(), message("model_output has shape ", model_output.sizes(),
                    " but sample has shape ", sample.sizes()));
  TORCH_CHECK_VALUE(gamma == 0.0 || noise.has_value(), message("noise is required when gamma > 0"));
  const int pred = prediction_index(std::string(prediction_type));
  const at::Tensor m = model_output.to(at::kFloat).contiguous(), x = sample.to(at::kFloat).contiguous();
  const at::Tensor n = noise.has_value() ? noise->to(at::kFloat).contiguous() : x;
  const at::Tensor s = coeff(sigma, "sigma", x), sn = coeff(sigma_next, "sigma_next", x);
  at::Tensor prev = at::empty_like(x), x0 = at::empty_like(x);
  const int64_t numel = x.numel();
  euler_kernel<<<blocks_for(numel), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      m.data_ptr<float>(), x.data_ptr<float>(), n.data_ptr<float>(), prev.data_ptr<float>(), x0.data_ptr<float>(),
      s.data_ptr<float>(), sn.data_ptr<float>(), static_cast<float>(gamma), static_cast<float>(s_noise), pred,
      noise.has_value() && gamma > 0.0, numel / x.size(0), numel);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {prev.to(model_output.scalar_type()), x0.to(model_output.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> euler_ancestral_step_cuda(const at::Tensor& model_output, const at::Tensor& sample,
                                                             const at::Tensor& sigma, const at::Tensor& sigma_next,
                                                             const at::Tensor& noise,
                                                             c10::string_view prediction_type) {
  TORCH_CHECK_VALUE(model_output.sizes() == sample.sizes(), message("model_output has shape ", model_output.sizes(),
                    " but sample has shape ", sample.sizes()));
  TORCH_CHECK_VALUE(noise.sizes() == sample.sizes(), message("noise has shape ", noise.sizes(), " but sample has shape ",
                                                             sample.sizes()));
  // named here, so a bad sigma's error names it; (B,) float32 on the device afterwards
  const at::Tensor s = coeff(sigma, "sigma", sample), sn = coeff(sigma_next, "sigma_next", sample);
  const bool fp32 = model_output.scalar_type() != sample.scalar_type() || noise.scalar_type() != sample.scalar_type();
  const auto f = [&](const at::Tensor& t) { return fp32 ? t.to(at::kFloat) : t; };
  auto [prev, x0] = launch_step(kEulerAncestral, f(model_output), c10::nullopt, f(sample), f(noise), s, sn, s, 0.0,
                                0.0, std::string(prediction_type), c10::nullopt, false);
  return {prev.to(model_output.scalar_type()), x0.to(model_output.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> linear_step_cuda(const at::Tensor& model_output, const at::Tensor& sample,
                                                    const c10::optional<at::Tensor>& extra, double cx, double cm,
                                                    double p0, double px, double pm, double pe) {
  TORCH_CHECK_VALUE(model_output.sizes() == sample.sizes(), message("model_output has shape ", model_output.sizes(),
                    " but sample has shape ", sample.sizes()));
  if (extra.has_value()) {
    TORCH_CHECK_VALUE(extra->sizes() == sample.sizes(), message("extra has shape ", extra->sizes(),
                                                                " but sample has shape ",
                      sample.sizes()));
  }
  for (const double v : {cx, cm, p0, px, pm, pe}) {
    TORCH_CHECK_VALUE(std::isfinite(v), message("linear_step: coefficients must be finite, got ", v));
  }
  const bool fp32 = model_output.scalar_type() != sample.scalar_type() ||
                    (extra.has_value() && extra->scalar_type() != sample.scalar_type());
  const auto f = [&](const at::Tensor& t) { return (fp32 ? t.to(at::kFloat) : t).contiguous(); };
  const at::Tensor m = f(model_output), x = f(sample), e = extra.has_value() ? f(*extra) : x;
  at::Tensor prev = at::empty_like(x), x0 = at::empty_like(x);
  const StepCoeffs c{static_cast<float>(cx), static_cast<float>(cm), static_cast<float>(p0),
                     static_cast<float>(px), static_cast<float>(pm), static_cast<float>(pe)};
  const int64_t numel = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "diffusion_fast_linear_step", [&] {
    linear_kernel<scalar_t><<<blocks_for(numel), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        m.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(), prev.data_ptr<scalar_t>(),
        x0.data_ptr<scalar_t>(), c, extra.has_value(), numel);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {prev.to(model_output.scalar_type()), x0.to(model_output.scalar_type())};
}

}  // namespace
}  // namespace diffusion_fast

TORCH_LIBRARY_IMPL(diffusion_fast, CUDA, m) {
  m.impl("ddim_step", &diffusion_fast::ddim_step_cuda);
  m.impl("cfg_ddim_step", &diffusion_fast::cfg_ddim_step_cuda);
  m.impl("ddpm_step", &diffusion_fast::ddpm_step_cuda);
  m.impl("euler_step", &diffusion_fast::euler_step_cuda);
  m.impl("euler_ancestral_step", &diffusion_fast::euler_ancestral_step_cuda);
  m.impl("linear_step", &diffusion_fast::linear_step_cuda);
}
