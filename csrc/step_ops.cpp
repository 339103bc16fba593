// Sampler-step ops registered as torch ops (torch.ops.diffusion_fast.*): schemas and CPU implementations.
//
// Each op makes one parallel pass over the latents: inputs of any strides are read contiguously (a copy only when
// they are not contiguous already), per-sample coefficients are computed once per sample from that sample's
// alphas, and the inner loop over a sample's elements is branch-free so the compiler vectorises it. Storage may be
// fp32, fp16, bf16 (converted to fp32 in L1-sized chunks around the loop: csrc/half.h) or fp64; the arithmetic is
// fp32.
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <string>

#include "half.h"
#include "message.h"
#include "step_math.h"
#include "vectorize.h"

namespace diffusion_fast {

int prediction_index(const std::string& prediction_type) {
  if (prediction_type == "epsilon") return kEpsilon;
  if (prediction_type == "v_prediction") return kVPrediction;
  if (prediction_type == "sample") return kSample;
  TORCH_CHECK_VALUE(false, message("prediction_type must be one of ('epsilon', 'v_prediction', 'sample'), got '",
                    prediction_type, "'"));
  return -1;
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& sample, bool same_dtype = true) {
  TORCH_CHECK_VALUE(t.sizes() == sample.sizes(), message(name, " has shape ", t.sizes(), " but sample has shape ",
                    sample.sizes()));
  TORCH_CHECK_VALUE(t.device() == sample.device(), message(name, " is on ", t.device(), " but sample is on ",
                                                           sample.device()));
  if (same_dtype) {
    TORCH_CHECK_TYPE(t.scalar_type() == sample.scalar_type(), message(name, " has dtype ", t.scalar_type(),
                     " but sample has dtype ", sample.scalar_type()));
  }
}

// A per-sample coefficient: a (B,) tensor, or one value for every sample (0-d or (1,)). Returns its values as a
// contiguous float32 tensor of B or 1 elements (read with value_at); nothing is copied when it is float32 already.
at::Tensor coeff_values(const at::Tensor& a, const char* name, const at::Tensor& sample) {
  const int64_t batch = sample.size(0);
  TORCH_CHECK_VALUE((a.dim() <= 1 && a.numel() == 1) || (a.dim() == 1 && a.size(0) == batch),
                    message(name, " must be a (", batch, ",) tensor (one value per sample) or a single value (0-d or ",
                            "(1,)), got shape ", a.sizes()));
  TORCH_CHECK_VALUE(a.device() == sample.device(), message(name, " is on ", a.device(), " but sample is on ",
                    sample.device()));
  return a.to(at::kFloat).contiguous();
}

// Sample b's value of a coeff_values tensor (host memory).
inline float value_at(const at::Tensor& f, int64_t b) { return f.data_ptr<float>()[f.numel() == 1 ? 0 : b]; }

// coeff_values as a (B,) tensor, for kernels that index it by sample (the CUDA ops).
at::Tensor per_sample(const at::Tensor& a, const char* name, const at::Tensor& sample) {
  const at::Tensor f = coeff_values(a, name, sample);
  return f.dim() == 1 && f.size(0) == sample.size(0) ? f : f.reshape({1}).expand({sample.size(0)}).contiguous();
}

at::Tensor check_coeff(const at::Tensor& a, const char* name, const at::Tensor& sample) {
  at::Tensor f = coeff_values(a, name, sample);
  if (f.device().is_cpu()) {  // a plain loop: B values, far cheaper than isfinite().all().item()
    const float* p = f.data_ptr<float>();
    for (int64_t i = 0; i < f.numel(); ++i) {
      TORCH_CHECK_VALUE(std::isfinite(p[i]), message(name, " contains NaN or inf (element ", i, " is ", p[i], ")"));
    }
  }
  return f;
}

void check_sample(const at::Tensor& sample) {
  TORCH_CHECK_TYPE(at::isFloatingType(sample.scalar_type()), message("sample must be a floating-point tensor, got ",
                   sample.scalar_type()));
  TORCH_CHECK_VALUE(sample.dim() >= 1 && sample.numel() > 0,
                    message("sample must be a non-empty tensor with a batch dim"));
}

// One sample's stretch of a DDIM/DDPM step: apply_step per element (five FMAs, plus the CFG combine, the clamp and
// the noise term where the call has them), in fp32 whatever the storage.
template <typename scalar_t, bool CFG, bool NOISE, bool CLIP>
__attribute__((always_inline)) inline void step_elements(const StepCoeffs& k, float g, float lim,
                                                          const scalar_t* __restrict__ m,
                                                          const scalar_t* __restrict__ t,
                                                          const scalar_t* __restrict__ x,
                                                          const scalar_t* __restrict__ n, scalar_t* __restrict__ prev,
                                                          scalar_t* __restrict__ x0, int64_t len) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    float mo = static_cast<float>(m[j]);
    if (CFG) mo = mo + g * (static_cast<float>(t[j]) - mo);
    float x0v;
    const float p = apply_step<CLIP, NOISE>(k, static_cast<float>(x[j]), mo, NOISE ? static_cast<float>(n[j]) : 0.0f,
                                            lim, &x0v);
    prev[j] = static_cast<scalar_t>(p);
    x0[j] = static_cast<scalar_t>(x0v);
  }
}

constexpr int64_t kStepChunk = 512;  // fp16/bf16 values converted per chunk: six fp32 buffers, 12 KiB, stay in L1

// DDIM and DDPM share one loop: per sample, coefficients; per element, step_elements. fp16/bf16 storage is converted
// chunk by chunk into L1 buffers around the fp32 loop (csrc/half.h).
template <typename scalar_t, bool CFG, bool NOISE, bool CLIP>
void step_loop(const scalar_t* m, const scalar_t* t, const scalar_t* x, const scalar_t* n, scalar_t* prev,
               scalar_t* x0, const StepCoeffs* coeffs, float guidance, float clip, int64_t per_sample, int64_t numel) {
  at::parallel_for(0, numel, 8192, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t b = i / per_sample;
      const int64_t stop = std::min(end, (b + 1) * per_sample);
      const StepCoeffs c = coeffs[b];
      widest([&]() DIFFUSION_FAST_INLINE_LAMBDA {
        const StepCoeffs k = c;  // a copy local to the vectorised body, so its fields stay in registers
        if constexpr (is_half_v<scalar_t>) {
          alignas(64) float fm[kStepChunk], ft[kStepChunk], fx[kStepChunk], fn[kStepChunk], fp[kStepChunk],
              f0[kStepChunk];
          for (int64_t s = i; s < stop; s += kStepChunk) {
            const int64_t len = std::min(kStepChunk, stop - s);
            to_float(m + s, fm, len);
            if (CFG) to_float(t + s, ft, len);
            to_float(x + s, fx, len);
            if (NOISE) to_float(n + s, fn, len);
            step_elements<float, CFG, NOISE, CLIP>(k, guidance, clip, fm, ft, fx, fn, fp, f0, len);
            from_float(fp, prev + s, len);
            from_float(f0, x0 + s, len);
          }
        } else {
          step_elements<scalar_t, CFG, NOISE, CLIP>(k, guidance, clip, m + i, t + i, x + i, n + i, prev + i, x0 + i,
                                                    stop - i);
        }
      });
      i = stop;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> run_step(const at::Tensor& m_in, const c10::optional<at::Tensor>& t_in,
                                            const at::Tensor& x_in, const c10::optional<at::Tensor>& noise_in,
                                            const std::vector<StepCoeffs>& coeffs, double guidance,
                                            c10::optional<double> clip) {
#if !defined(DIFFUSION_FAST_FP16)
  if (x_in.scalar_type() == at::kHalf) {
    // A build without F16C has no vectorised fp16 conversion: convert with ATen's copies, step in fp32, round once.
    const auto f32 = [](const at::Tensor& t) { return t.to(at::kFloat); };
    const auto opt = [&](const c10::optional<at::Tensor>& t) {
      return t.has_value() ? c10::optional<at::Tensor>(f32(*t)) : c10::nullopt;
    };
    auto [prev, x0] = run_step(f32(m_in), opt(t_in), f32(x_in), opt(noise_in), coeffs, guidance, clip);
    return {prev.to(x_in.scalar_type()), x0.to(x_in.scalar_type())};
  }
#endif
  const at::Tensor m = m_in.contiguous(), x = x_in.contiguous();
  const at::Tensor t = t_in.has_value() ? t_in->contiguous() : m;
  const at::Tensor n = noise_in.has_value() ? noise_in->contiguous() : x;
  at::Tensor prev = at::empty_like(x), x0 = at::empty_like(x);
  const float clip_f = clip.has_value() ? static_cast<float>(*clip) : std::numeric_limits<float>::infinity();
  const int64_t numel = x.numel(), per_sample = numel / x.size(0);
  auto run = [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const auto ptr = [](const at::Tensor& v) { return static_cast<const scalar_t*>(v.data_ptr()); };
    auto go = [&](auto cfg, auto noise, auto clipped) {
      step_loop<scalar_t, decltype(cfg)::value, decltype(noise)::value, decltype(clipped)::value>(
          ptr(m), ptr(t), ptr(x), ptr(n), static_cast<scalar_t*>(prev.data_ptr()),
          static_cast<scalar_t*>(x0.data_ptr()), coeffs.data(), static_cast<float>(guidance), clip_f, per_sample,
          numel);
    };
    auto with_clip = [&](auto cfg, auto noise) {
      if (clip.has_value()) go(cfg, noise, std::true_type{});
      else go(cfg, noise, std::false_type{});
    };
    const bool cfg = t_in.has_value(), noise = noise_in.has_value();
    if (cfg && noise) with_clip(std::true_type{}, std::true_type{});
    else if (cfg) with_clip(std::true_type{}, std::false_type{});
    else if (noise) with_clip(std::false_type{}, std::true_type{});
    else with_clip(std::false_type{}, std::false_type{});
  };
  switch (x.scalar_type()) {
    case at::kFloat: run(static_cast<float*>(nullptr)); break;
    case at::kDouble: run(static_cast<double*>(nullptr)); break;
    case at::kBFloat16: run(static_cast<bf16*>(nullptr)); break;
#if defined(DIFFUSION_FAST_FP16)
    case at::kHalf: run(static_cast<fp16*>(nullptr)); break;
#endif
    default: TORCH_CHECK_TYPE(false, message("sample must be fp16, bf16, fp32 or fp64, got ", x.scalar_type()));
  }
  return {prev, x0};
}

std::vector<StepCoeffs> ddim_coeff_table(const at::Tensor& a_t, const at::Tensor& a_prev, int64_t batch, double eta,
                                         int pred, bool use_clipped) {
  std::vector<StepCoeffs> out(batch);
  for (int64_t b = 0; b < batch; ++b) {
    out[b] = ddim_coeffs(value_at(a_t, b), value_at(a_prev, b), static_cast<float>(eta), pred, use_clipped);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> cfg_ddim_step_cpu(const at::Tensor& uncond, const c10::optional<at::Tensor>& text,
                                                     double guidance, const at::Tensor& sample,
                                                     const at::Tensor& alpha_t, const at::Tensor& alpha_prev,
                                                     double eta, const c10::optional<at::Tensor>& noise,
                                                     const std::string& prediction_type, c10::optional<double> clip,
                                                     bool use_clipped) {
  check_sample(sample);
  check_like(uncond, text.has_value() ? "noise_pred_uncond" : "model_output", sample);
  if (text.has_value()) check_like(*text, "noise_pred_text", sample);
  if (noise.has_value()) check_like(*noise, "variance_noise", sample);
  TORCH_CHECK_VALUE(eta == 0.0 || noise.has_value(), message("variance_noise is required when eta > 0"));
  const int pred = prediction_index(prediction_type);
  const at::Tensor a_t = check_coeff(alpha_t, "alpha_prod_t", sample);
  const at::Tensor a_p = check_coeff(alpha_prev, "alpha_prod_t_prev", sample);
  auto coeffs = ddim_coeff_table(a_t, a_p, sample.size(0), eta, pred, use_clipped);
  return run_step(uncond, text, sample, eta > 0 ? noise : c10::nullopt, coeffs, guidance, clip);
}

std::tuple<at::Tensor, at::Tensor> ddim_step_cpu(const at::Tensor& model_output, const at::Tensor& sample,
                                                 const at::Tensor& alpha_t, const at::Tensor& alpha_prev, double eta,
                                                 const c10::optional<at::Tensor>& noise,
                                                 c10::string_view prediction_type, c10::optional<double> clip,
                                                 bool use_clipped) {
  return cfg_ddim_step_cpu(model_output, c10::nullopt, 0.0, sample, alpha_t, alpha_prev, eta, noise,
                           std::string(prediction_type), clip, use_clipped);
}

std::tuple<at::Tensor, at::Tensor> cfg_ddim_step_cpu_op(const at::Tensor& uncond, const at::Tensor& text,
                                                        double guidance, const at::Tensor& sample,
                                                        const at::Tensor& alpha_t, const at::Tensor& alpha_prev,
                                                        double eta, const c10::optional<at::Tensor>& noise,
                                                        c10::string_view prediction_type, c10::optional<double> clip,
                                                        bool use_clipped) {
  return cfg_ddim_step_cpu(uncond, text, guidance, sample, alpha_t, alpha_prev, eta, noise,
                           std::string(prediction_type), clip, use_clipped);
}

std::tuple<at::Tensor, at::Tensor> ddpm_step_cpu(const at::Tensor& model_output, const at::Tensor& sample,
                                                 const at::Tensor& alpha_t, const at::Tensor& alpha_prev,
                                                 const at::Tensor& std_t, const c10::optional<at::Tensor>& noise,
                                                 c10::string_view prediction_type, c10::optional<double> clip) {
  check_sample(sample);
  check_like(model_output, "model_output", sample);
  if (noise.has_value()) check_like(*noise, "variance_noise", sample);
  const int pred = prediction_index(std::string(prediction_type));
  const at::Tensor a_t = check_coeff(alpha_t, "alpha_prod_t", sample);
  const at::Tensor a_p = check_coeff(alpha_prev, "alpha_prod_t_prev", sample);
  const at::Tensor s = check_coeff(std_t, "std", sample);
  std::vector<StepCoeffs> coeffs(sample.size(0));
  for (int64_t b = 0; b < sample.size(0); ++b) {
    coeffs[b] = ddpm_coeffs(value_at(a_t, b), value_at(a_p, b), value_at(s, b), pred);
  }
  return run_step(model_output, c10::nullopt, sample, noise, coeffs, 0.0, clip);
}

// The steps that return model_output's dtype (Euler, ancestral Euler, linear), as diffusers' Euler steps do: when
// every tensor shares the sample's dtype the shared loop runs on the storage (computing in fp32 whatever it is);
// mixed dtypes run on fp32 copies.
std::tuple<at::Tensor, at::Tensor> run_step_in_model_dtype(const at::Tensor& model_output, const at::Tensor& sample,
                                                           const c10::optional<at::Tensor>& extra,
                                                           const std::vector<StepCoeffs>& coeffs) {
  const bool fp32 = model_output.scalar_type() != sample.scalar_type() ||
                    (extra.has_value() && extra->scalar_type() != sample.scalar_type());
  const auto f = [&](const at::Tensor& t) { return fp32 ? t.to(at::kFloat) : t; };
  const c10::optional<at::Tensor> e = extra.has_value() ? c10::optional<at::Tensor>(f(*extra)) : c10::nullopt;
  auto [prev, x0] = run_step(f(model_output), c10::nullopt, f(sample), e, coeffs, 0.0, c10::nullopt);
  const auto out_type = model_output.scalar_type();
  return {prev.to(out_type), x0.to(out_type)};
}

std::tuple<at::Tensor, at::Tensor> euler_step_cpu(const at::Tensor& model_output, const at::Tensor& sample,
                                                  const at::Tensor& sigma, const at::Tensor& sigma_next, double gamma,
                                                  double s_noise, const c10::optional<at::Tensor>& noise,
                                                  c10::string_view prediction_type) {
  check_sample(sample);
  check_like(model_output, "model_output", sample, /*same_dtype=*/false);
  if (noise.has_value()) check_like(*noise, "noise", sample, false);
  TORCH_CHECK_VALUE(gamma == 0.0 || noise.has_value(), message("noise is required when gamma > 0"));
  const int pred = prediction_index(std::string(prediction_type));
  const at::Tensor sg = check_coeff(sigma, "sigma", sample), sn = check_coeff(sigma_next, "sigma_next", sample);
  const int64_t batch = sample.size(0);
  const float g = static_cast<float>(gamma);
  std::vector<StepCoeffs> coeffs(batch);
  std::vector<float> churn(batch);
  for (int64_t b = 0; b < batch; ++b) {
    coeffs[b] = euler_coeffs(value_at(sg, b), value_at(sn, b), g, pred);
    churn[b] = euler_churn(value_at(sg, b), g, static_cast<float>(s_noise));
  }
  if (gamma == 0.0) return run_step_in_model_dtype(model_output, sample, c10::nullopt, coeffs);
  // the churned sample, formed first and kept in fp32 as diffusers keeps it
  std::vector<int64_t> shape(sample.dim(), 1);
  shape[0] = batch;
  const at::Tensor churned = sample.to(at::kFloat) + noise->to(at::kFloat) * at::tensor(churn).view(shape);
  return run_step_in_model_dtype(model_output, churned, c10::nullopt, coeffs);
}

std::tuple<at::Tensor, at::Tensor> euler_ancestral_step_cpu(const at::Tensor& model_output, const at::Tensor& sample,
                                                            const at::Tensor& sigma, const at::Tensor& sigma_next,
                                                            const at::Tensor& noise,
                                                            c10::string_view prediction_type) {
  check_sample(sample);
  check_like(model_output, "model_output", sample, /*same_dtype=*/false);
  check_like(noise, "noise", sample, false);
  const int pred = prediction_index(std::string(prediction_type));
  const at::Tensor sg = check_coeff(sigma, "sigma", sample), sn = check_coeff(sigma_next, "sigma_next", sample);
  std::vector<StepCoeffs> coeffs(sample.size(0));
  for (int64_t b = 0; b < sample.size(0); ++b) {
    coeffs[b] = euler_ancestral_coeffs(value_at(sg, b), value_at(sn, b), pred);
  }
  return run_step_in_model_dtype(model_output, sample, noise, coeffs);
}

// A step whose update is linear in (sample, model_output, one extra tensor) with coefficients the caller computed:
// x0 = cx * x + cm * m, prev = p0 * x0 + px * x + pm * m + pe * extra (DPM-Solver++ multistep: extra is the previous
// step's x0). The same for every sample, so a CUDA graph can capture it with its values.
std::tuple<at::Tensor, at::Tensor> linear_step_cpu(const at::Tensor& model_output, const at::Tensor& sample,
                                                   const c10::optional<at::Tensor>& extra, double cx, double cm,
                                                   double p0, double px, double pm, double pe) {
  check_sample(sample);
  check_like(model_output, "model_output", sample, /*same_dtype=*/false);
  if (extra.has_value()) check_like(*extra, "extra", sample, false);
  for (const double v : {cx, cm, p0, px, pm, pe}) {
    TORCH_CHECK_VALUE(std::isfinite(v), message("linear_step: coefficients must be finite, got ", v));
  }
  const StepCoeffs c{static_cast<float>(cx), static_cast<float>(cm), static_cast<float>(p0),
                     static_cast<float>(px), static_cast<float>(pm), static_cast<float>(pe)};
  return run_step_in_model_dtype(model_output, sample, extra, std::vector<StepCoeffs>(sample.size(0), c));
}

at::Tensor group_norm_silu_cpu(const at::Tensor& x, int64_t num_groups, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, double eps, bool silu);

}  // namespace diffusion_fast

TORCH_LIBRARY(diffusion_fast, m) {
  m.def("ddim_step(Tensor model_output, Tensor sample, Tensor alpha_prod_t, Tensor alpha_prod_t_prev, float eta, "
        "Tensor? variance_noise, str prediction_type, float? clip_sample_range, bool use_clipped_model_output) "
        "-> (Tensor, Tensor)");
  m.def("cfg_ddim_step(Tensor noise_pred_uncond, Tensor noise_pred_text, float guidance_scale, Tensor sample, "
        "Tensor alpha_prod_t, Tensor alpha_prod_t_prev, float eta, Tensor? variance_noise, str prediction_type, "
        "float? clip_sample_range, bool use_clipped_model_output) -> (Tensor, Tensor)");
  m.def("ddpm_step(Tensor model_output, Tensor sample, Tensor alpha_prod_t, Tensor alpha_prod_t_prev, Tensor std, "
        "Tensor? variance_noise, str prediction_type, float? clip_sample_range) -> (Tensor, Tensor)");
  m.def("euler_step(Tensor model_output, Tensor sample, Tensor sigma, Tensor sigma_next, float gamma, "
        "float s_noise, Tensor? noise, str prediction_type) -> (Tensor, Tensor)");
  m.def("euler_ancestral_step(Tensor model_output, Tensor sample, Tensor sigma, Tensor sigma_next, Tensor noise, "
        "str prediction_type) -> (Tensor, Tensor)");
  m.def("linear_step(Tensor model_output, Tensor sample, Tensor? extra, float cx, float cm, float p0, float px, "
        "float pm, float pe) -> (Tensor, Tensor)");
  m.def("group_norm_silu(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, bool silu) -> Tensor");
}

TORCH_LIBRARY_IMPL(diffusion_fast, CPU, m) {
  m.impl("ddim_step", &diffusion_fast::ddim_step_cpu);
  m.impl("cfg_ddim_step", &diffusion_fast::cfg_ddim_step_cpu_op);
  m.impl("ddpm_step", &diffusion_fast::ddpm_step_cpu);
  m.impl("euler_step", &diffusion_fast::euler_step_cpu);
  m.impl("euler_ancestral_step", &diffusion_fast::euler_ancestral_step_cpu);
  m.impl("linear_step", &diffusion_fast::linear_step_cpu);
  m.impl("group_norm_silu", &diffusion_fast::group_norm_silu_cpu);
}

// `import diffusion_fast._C` loads this library (registering the ops above); it defines no Python functions.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
