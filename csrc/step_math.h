// The sampler-step arithmetic shared by the CPU (csrc/step_ops.cpp) and CUDA (csrc/cuda/step_ops.cu) kernels.
//
// For each prediction type, x0 and epsilon are linear in (sample, model_output), so one sample's update is
//   x0   = clamp(cx * x + cm * m, -clip, clip)
//   eps  = ex * x + em * m + e0 * x0
//   prev = px0 * x0 + peps * eps + px * x + std * noise
// with per-sample coefficients computed once from that sample's alphas. Semantics: diffusers' DDIMScheduler.step,
// DDPMScheduler.step and EulerDiscreteScheduler.step (see diffusion_fast/reference.py).
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
  float cx, cm;        // x0 from (sample, model_output)
  float ex, em, e0;    // epsilon from (sample, model_output, x0)
  float px0, peps, px; // prev from (x0, epsilon, sample)
  float std;           // noise scale
};

// x0 and epsilon as linear forms of (x, m), per prediction type; sa = sqrt(alpha_t), sb = sqrt(1 - alpha_t).
DF_HD void x0_eps_coeffs(int pred, float sa, float sb, StepCoeffs& c) {
  if (pred == kEpsilon) {
    c.cx = 1.0f / sa; c.cm = -sb / sa; c.ex = 0.0f; c.em = 1.0f;
  } else if (pred == kVPrediction) {
    c.cx = sa; c.cm = -sb; c.ex = sb; c.em = sa;
  } else {
    c.cx = 0.0f; c.cm = 1.0f; c.ex = 1.0f / sb; c.em = -sa / sb;
  }
  c.e0 = 0.0f;
}

DF_HD StepCoeffs ddim_coeffs(float a_t, float a_prev, float eta, int pred, bool use_clipped) {
  StepCoeffs c;
  const float sa = sqrtf(a_t), sb = sqrtf(1.0f - a_t);
  x0_eps_coeffs(pred, sa, sb, c);
  if (use_clipped) {  // epsilon re-derived from the clipped x0
    c.ex = 1.0f / sb; c.em = 0.0f; c.e0 = -sa / sb;
  }
  const float variance = (1.0f - a_prev) / (1.0f - a_t) * (1.0f - a_t / a_prev);
  c.std = eta * sqrtf(variance);
  c.px0 = sqrtf(a_prev);
  c.peps = sqrtf(1.0f - a_prev - c.std * c.std);
  c.px = 0.0f;
  return c;
}

DF_HD StepCoeffs ddpm_coeffs(float a_t, float a_prev, float std, int pred) {
  StepCoeffs c;
  x0_eps_coeffs(pred, sqrtf(a_t), sqrtf(1.0f - a_t), c);
  c.ex = c.em = c.e0 = 0.0f;
  const float current_alpha = a_t / a_prev, beta_t = 1.0f - a_t;
  c.px0 = sqrtf(a_prev) * (1.0f - current_alpha) / beta_t;
  c.px = sqrtf(current_alpha) * (1.0f - a_prev) / beta_t;
  c.peps = 0.0f;
  c.std = std;
  return c;
}

DF_HD float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// One element of a DDIM/DDPM step: returns prev, writes x0.
DF_HD float apply_step(const StepCoeffs& c, float x, float m, float noise, float clip, float* x0_out) {
  const float x0 = clampf(c.cx * x + c.cm * m, -clip, clip);
  const float eps = c.ex * x + c.em * m + c.e0 * x0;
  *x0_out = x0;
  return c.px0 * x0 + c.peps * eps + c.px * x + c.std * noise;
}

// One element of an Euler step (Karras Algorithm 2); gamma > 0 churns the sample with `noise` first.
DF_HD float euler_element(float x, float m, float noise, float sigma, float sigma_next, float gamma, float s_noise,
                          int pred, float* x0_out) {
  const float sigma_hat = sigma * (gamma + 1.0f);
  if (gamma > 0.0f) x += noise * s_noise * sqrtf(sigma_hat * sigma_hat - sigma * sigma);
  float x0;
  if (pred == kEpsilon) {
    x0 = x - sigma_hat * m;  // diffusers uses sigma_hat here...
  } else if (pred == kVPrediction) {
    x0 = m * (-sigma / sqrtf(sigma * sigma + 1.0f)) + x / (sigma * sigma + 1.0f);  // ...and sigma here
  } else {
    x0 = m;
  }
  *x0_out = x0;
  return x + (x - x0) / sigma_hat * (sigma_next - sigma_hat);
}

}  // namespace diffusion_fast
