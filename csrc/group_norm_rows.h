// The row-level building blocks of the CPU GroupNorm (group_norm_silu.cpp), shared by its NCHW and channels_last
// paths: running moments, the output pass over a row (fp32 SiLU in intrinsics, fp16/bf16 through L1 chunks) and a
// chunk's statistics fused with another chunk's output pass.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "half.h"
#include "silu.h"
#include "vectorize.h"

namespace diffusion_fast {
namespace gn {

constexpr int64_t kChunk = 2048;  // elements per statistics chunk (8 KiB of fp32: stays in L1 between the passes)

// Running statistics of a set of values: count, mean and M2 = sum((x - mean)^2), merged with Chan et al.'s formula.
struct Moments {
  double n = 0.0, mean = 0.0, m2 = 0.0;
  void merge(double nb, double mean_b, double m2_b) {
    if (nb == 0.0) return;
    const double total = n + nb, delta = mean_b - mean;
    mean += delta * nb / total;
    m2 += m2_b + delta * delta * n * nb / total;
    n = total;
  }
};

// y[i] = f((x[i] - mean[i]) * scale[i] + shift[i]), f = SiLU or identity, computed in fp32; the parameters are per
// row (STRIDE 0: one value for the whole row, NCHW) or per element (STRIDE 1: the channels of a channels_last row).
// Subtracting the mean first avoids the cancellation of x * scale - mean * scale when |mean| >> std.
template <bool SILU>
__attribute__((always_inline)) inline float affine_one(float x, float mean, float scale, float shift) {
  float v = (x - mean) * scale + shift;
  if (SILU) v = v / (1.0f + exp_approx(-v));
  return v;
}

template <typename scalar_t, bool SILU, int STRIDE>
__attribute__((always_inline)) inline void affine_body(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                                        int64_t len, const float* __restrict__ mean,
                                                        const float* __restrict__ scale,
                                                        const float* __restrict__ shift) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    y[i] = static_cast<scalar_t>(
        affine_one<SILU>(static_cast<float>(x[i]), mean[i * STRIDE], scale[i * STRIDE], shift[i * STRIDE]));
  }
}

// The output pass over one row, for use inside widest(): fp32 SiLU takes the AVX-512 intrinsics where the CPU has
// them, else the AVX2 ones where the build targets AVX2. STREAM: those write y with streaming stores (silu.h), for
// outputs too large to stay in cache anyway; the caller fences before the output is read.
template <typename scalar_t, bool SILU, int STRIDE, bool STREAM = false>
__attribute__((always_inline)) inline void affine_row_native(const scalar_t* x, scalar_t* y, int64_t len,
                                                              const float* mean, const float* scale,
                                                              const float* shift) {
#if defined(DIFFUSION_FAST_SILU_AVX512) && defined(DIFFUSION_FAST_AVX512_BUILDS)
  if constexpr (SILU && std::is_same<scalar_t, float>::value) {
    if (has_avx512()) return silu_affine_avx512<STRIDE, STREAM>(x, y, len, mean, scale, shift);
  }
#endif
#if defined(DIFFUSION_FAST_SILU_AVX2)
  if constexpr (SILU && std::is_same<scalar_t, float>::value) {
    return silu_affine_avx2<STRIDE, STREAM>(x, y, len, mean, scale, shift);
  }
#endif
  affine_body<scalar_t, SILU, STRIDE>(x, y, len, mean, scale, shift);
}

// The output pass over one row; fp16/bf16 rows run the fp32 code on converted chunks that stay in L1 (half.h), so
// STREAM applies to fp32 only.
template <typename scalar_t, bool SILU, int STRIDE, bool STREAM = false>
__attribute__((always_inline)) inline void affine_row(const scalar_t* x, scalar_t* y, int64_t len, const float* mean,
                                                       const float* scale, const float* shift) {
  if constexpr (is_half_v<scalar_t>) {
    alignas(64) float in[kChunk], out[kChunk];
    for (int64_t s = 0; s < len; s += kChunk) {
      const int64_t n = std::min(kChunk, len - s);
      to_float(x + s, in, n);
      affine_row_native<float, SILU, STRIDE>(in, out, n, mean + s * STRIDE, scale + s * STRIDE, shift + s * STRIDE);
      from_float(out, y + s, n);
    }
  } else {
    affine_row_native<scalar_t, SILU, STRIDE, STREAM>(x, y, len, mean, scale, shift);
  }
}

// sum(f(x[i])) in fp32 with kLanes independent partial sums (several vectors), so a loop that does little else is
// not serialised on one accumulator's add latency.
constexpr int64_t kLanes = 64;

template <typename scalar_t, typename F>
__attribute__((always_inline)) inline float lane_sum(const scalar_t* __restrict__ x, int64_t len, F f) {
  const int64_t whole = len - len % kLanes;
  float acc[kLanes] = {};
  for (int64_t i = 0; i < whole; i += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) acc[k] += f(static_cast<float>(x[i + k]));
  float total = 0.0f;
  for (int64_t k = 0; k < kLanes; ++k) total += acc[k];
  for (int64_t i = whole; i < len; ++i) total += f(static_cast<float>(x[i]));
  return total;
}

// Mean and M2 of a chunk of `next` (fp32; its mean, then the squared deviations in a second pass over the now
// L1-resident chunk), fused with the output pass over as many elements of x -> y (skipped when x is null): one
// stream is compute-bound, the other memory-bound, so they overlap. STREAM as in affine_row_native.
template <typename scalar_t, bool SILU, bool STREAM = false>
__attribute__((always_inline)) inline void affine_and_moments_native(const scalar_t* __restrict__ x,
                                                                    scalar_t* __restrict__ y, int64_t len,
                                                                    float mean, float scale, float shift,
                                                                    const scalar_t* __restrict__ next,
                                                                    float* mu_out, float* m2_out) {
  float s = 0.0f;
  bool summed = false;
#if defined(DIFFUSION_FAST_SILU_AVX512) && defined(DIFFUSION_FAST_AVX512_BUILDS)
  if constexpr (SILU && std::is_same<scalar_t, float>::value) {
    if (x != nullptr && has_avx512()) {
      s = silu_affine_and_sum_avx512<STREAM>(x, y, len, mean, scale, shift, next);
      summed = true;
    }
  }
#endif
#if defined(DIFFUSION_FAST_SILU_AVX2)
  if constexpr (SILU && std::is_same<scalar_t, float>::value) {
    if (x != nullptr && !summed) {
      s = silu_affine_and_sum_avx2<STREAM>(x, y, len, mean, scale, shift, next);
      summed = true;
    }
  }
#endif
  if (!summed && x != nullptr) {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < len; ++i) {
      y[i] = static_cast<scalar_t>(affine_one<SILU>(static_cast<float>(x[i]), mean, scale, shift));
      s += static_cast<float>(next[i]);
    }
  } else if (!summed) {
    s = lane_sum(next, len, [](float v) { return v; });
  }
  const float mu = s / static_cast<float>(len);
  *mu_out = mu;
  *m2_out = lane_sum(next, len, [mu](float v) { return (v - mu) * (v - mu); });
}

// affine_and_moments_native for any storage; fp16/bf16 chunks (len <= kChunk at every call) are converted first.
template <typename scalar_t, bool SILU, bool STREAM = false>
__attribute__((always_inline)) inline void affine_and_moments_body(const scalar_t* x, scalar_t* y, int64_t len,
                                                                    float mean, float scale, float shift,
                                                                    const scalar_t* next, float* mu_out,
                                                                    float* m2_out) {
  if constexpr (is_half_v<scalar_t>) {
    alignas(64) float nx[kChunk], in[kChunk], out[kChunk];
    to_float(next, nx, len);
    if (x != nullptr) to_float(x, in, len);
    affine_and_moments_native<float, SILU>(x ? in : nullptr, x ? out : nullptr, len, mean, scale, shift, nx, mu_out,
                                           m2_out);
    if (x != nullptr) from_float(out, y, len);
  } else {
    affine_and_moments_native<scalar_t, SILU, STREAM>(x, y, len, mean, scale, shift, next, mu_out, m2_out);
  }
}

template <typename scalar_t>
void chunk_moments(const scalar_t* x, int64_t len, float* mean, float* m2) {
  widest([&]() DIFFUSION_FAST_INLINE_LAMBDA {
    affine_and_moments_body<scalar_t, false>(nullptr, nullptr, len, 0.0f, 0.0f, 0.0f, x, mean, m2);
  });
}

// Per-channel mean, scale and shift of the output pass, from one group's moments: y = (x - mean) * scale + shift.
struct Affine {
  std::vector<float> mean, scale, shift;
  explicit Affine(int64_t n) : mean(n), scale(n), shift(n) {}
  void set_group(const Moments& m, int64_t g, int64_t cpg, double eps, const float* w, const float* b, int64_t base) {
    const float rstd = static_cast<float>(1.0 / std::sqrt(m.m2 / m.n + eps));
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      mean[base + c] = static_cast<float>(m.mean);
      scale[base + c] = rstd * (w ? w[c] : 1.0f);
      shift[base + c] = b ? b[c] : 0.0f;
    }
  }
};

}  // namespace gn
}  // namespace diffusion_fast
