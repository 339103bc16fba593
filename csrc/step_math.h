// The sampler-step arithmetic shared by the CPU (csrc/step_ops.cpp) and CUDA (csrc/cuda/step_ops.cu) kernels.
//
// For each prediction type, x0 and epsilon are linear in (sample, model_output), and so is prev given x0, so one
// sample's update is
//   x0   = clamp(cx * x + cm * m, -clip, clip)
//   prev = p0 * x0 + px * x + pm * m + std * noise
// with six per-sample coefficients computed once from that sample's alphas (epsilon = ex * x + em * m + e0 * x0 is
// folded into p0, px and pm). Semantics: diffusers' DDIMScheduler.step, DDPMScheduler.step and
// EulerDiscreteScheduler.step (see diffusion_fast/reference.py).
#pragma once
#include <cmath>

#ifdef __CUDACC__
#define DF_HD __host__ __device__ __forceinline__
#else
#define DF_HD inline
#endif

namespace diffusion_fast {

enum Prediction { kEpsilon = 0, kVPrediction = 1, kSample = 2 };

struct StepCoeffs {
  float cx, cm;      // x0 from (sample, model_output)
  float p0, px, pm;  // prev from (x0, sample, model_output)
  float std;         // noise scale
};

// The unfolded form: epsilon from (x, m, x0), prev from (x0, epsilon, x).
struct LinearForms {
  float cx, cm, ex, em, e0, px0, peps, px;
};

// x0 and epsilon as linear forms of (x, m), per prediction type; sa = sqrt(alpha_t), sb = sqrt(1 - alpha_t).
DF_HD void x0_eps_forms(int pred, float sa, float sb, LinearForms& f) {
  if (pred == kEpsilon) {
    f.cx = 1.0f / sa; f.cm = -sb / sa; f.ex = 0.0f; f.em = 1.0f;
  } else if (pred == kVPrediction) {
    f.cx = sa; f.cm = -sb; f.ex = sb; f.em = sa;
  } else {
    f.cx = 0.0f; f.cm = 1.0f; f.ex = 1.0f / sb; f.em = -sa / sb;
  }
  f.e0 = 0.0f;
}

// prev = px0 * x0 + peps * (ex * x + em * m + e0 * x0) + px * x, regrouped by x0, x and m. For epsilon prediction
// without use_clipped (SD's case) ex = e0 = px = 0 and em = 1, so p0 = px0, px = 0, pm = peps exactly.
DF_HD StepCoeffs fold(const LinearForms& f, float std) {
  StepCoeffs c;
  c.cx = f.cx; c.cm = f.cm;
  c.p0 = f.px0 + f.peps * f.e0;
  c.px = f.peps * f.ex + f.px;
  c.pm = f.peps * f.em;
  c.std = std;
  return c;
}

DF_HD StepCoeffs ddim_coeffs(float a_t, float a_prev, float eta, int pred, bool use_clipped) {
  LinearForms f;
  const float sa = sqrtf(a_t), sb = sqrtf(1.0f - a_t);
  x0_eps_forms(pred, sa, sb, f);
  if (use_clipped) {  // epsilon re-derived from the clipped x0
    f.ex = 1.0f / sb; f.em = 0.0f; f.e0 = -sa / sb;
  }
  const float variance = (1.0f - a_prev) / (1.0f - a_t) * (1.0f - a_t / a_prev);
  const float std = eta * sqrtf(variance);
  f.px0 = sqrtf(a_prev);
  f.peps = sqrtf(1.0f - a_prev - std * std);
  f.px = 0.0f;
  return fold(f, std);
}

DF_HD StepCoeffs ddpm_coeffs(float a_t, float a_prev, float std, int pred) {
  LinearForms f;
  x0_eps_forms(pred, sqrtf(a_t), sqrtf(1.0f - a_t), f);
  f.ex = f.em = f.e0 = 0.0f;
  const float current_alpha = a_t / a_prev, beta_t = 1.0f - a_t;
  f.px0 = sqrtf(a_prev) * (1.0f - current_alpha) / beta_t;
  f.px = sqrtf(current_alpha) * (1.0f - a_prev) / beta_t;
  f.peps = 0.0f;
  return fold(f, std);
}

DF_HD float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// One element of a DDIM/DDPM step: returns prev, writes x0. CLIP = false skips the clamp (the same result as clip =
// inf, NaN included) and NOISE = false the noise term, so the CPU loop's common case is five FMAs per element.
template <bool CLIP = true, bool NOISE = true>
DF_HD float apply_step(const StepCoeffs& c, float x, float m, float noise, float clip, float* x0_out) {
  float x0 = c.cx * x + c.cm * m;
  if (CLIP) x0 = clampf(x0, -clip, clip);
  *x0_out = x0;
  const float prev = c.p0 * x0 + c.px * x + c.pm * m;
  return NOISE ? prev + c.std * noise : prev;
}

// An Euler step (Karras Algorithm 2, diffusers' EulerDiscreteScheduler.step) in the same linear form, so it runs
// through the DDIM/DDPM loops. x0 = cx * x + cm * m, and diffusers' prev = x + (x - x0) / sigma_hat * dt with
// dt = sigma_next - sigma_hat is (1 + k) * x - k * x0 with k = dt / sigma_hat, in [-1, 0] for a descending schedule.
// With gamma > 0 the sample is churned first (euler_churn); x here is the churned sample.
DF_HD StepCoeffs euler_coeffs(float sigma, float sigma_next, float gamma, int pred) {
  const float sigma_hat = sigma * (gamma + 1.0f);
  LinearForms f;
  if (pred == kEpsilon) {
    f.cx = 1.0f; f.cm = -sigma_hat;  // diffusers uses sigma_hat here...
  } else if (pred == kVPrediction) {
    f.cx = 1.0f / (sigma * sigma + 1.0f); f.cm = -sigma / sqrtf(sigma * sigma + 1.0f);  // ...and sigma here
  } else {
    f.cx = 0.0f; f.cm = 1.0f;
  }
  const float k = (sigma_next - sigma_hat) / sigma_hat;
  f.px0 = -k; f.px = 1.0f + k;
  f.peps = f.ex = f.em = f.e0 = 0.0f;
  return fold(f, 0.0f);
}

// The churn's noise scale: the sample becomes x + euler_churn * noise (s_noise * sqrt(sigma_hat^2 - sigma^2)).
DF_HD float euler_churn(float sigma, float gamma, float s_noise) {
  const float sigma_hat = sigma * (gamma + 1.0f);
  return gamma > 0.0f ? s_noise * sqrtf(sigma_hat * sigma_hat - sigma * sigma) : 0.0f;
}

// An ancestral Euler step (diffusers' EulerAncestralDiscreteScheduler.step): the Euler step from sigma down to
// sigma_down, then sigma_up * noise, where sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 and
// sigma_up^2 + sigma_down^2 = sigma_next^2, so sigma_down = sigma_next^2 / sigma. diffusers takes
// sqrt(sigma_next^2 - sigma_up^2), which cancels when sigma >> sigma_next (zero-SNR or cosine schedules' first step,
// sigma ~ 2e4): in fp32 that difference can round below zero, and its square root is NaN.
DF_HD StepCoeffs euler_ancestral_coeffs(float sigma, float sigma_next, int pred) {
  const float sigma_up = sqrtf(sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next) / (sigma * sigma));
  const float sigma_down = sigma_next * sigma_next / sigma;
  StepCoeffs c = euler_coeffs(sigma, sigma_down, 0.0f, pred);
  c.std = sigma_up;
  return c;
}

}  // namespace diffusion_fast
