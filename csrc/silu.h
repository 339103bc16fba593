// SiLU for the output pass of group_norm_silu.cpp: a portable exp the compiler vectorises, and fp32 SiLU in AVX-512
// intrinsics for y = silu((x - mean) * scale + shift).
//
// The output pass is compute-bound, so on AVX-512 it is written in intrinsics rather than left to the vectoriser:
// exp(-v) = 2^n * 2^f with n = round(-v log2 e), f = -v log2 e - n in [-1/2, 1/2], 2^f by its degree-6 Taylor
// polynomial (relative error < 1.3e-7) and 2^n applied by scalef; then v / (1 + exp(-v)) with an IEEE divide.
// -v log2 e is clamped to [-150, 200] first, so inf - inf never happens inside: exp(-v) underflows to 0 (v = +inf
// gives inf) or overflows to inf (v = -1e30 gives -0, like v * sigmoid(v)); the clamps keep NaN, as max/min return
// their second operand, the input, when either is NaN.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace diffusion_fast {

// exp(x) for fp32 in plain arithmetic the compiler vectorises (Cephes' degree-6 polynomial on x - n ln2, relative
// error < 1e-7 over the fp32 range). n is rounded with the 1.5 * 2^23 trick and clamped as an integer: that keeps
// the loop branch-free (no float clamp the compiler would split into denormal-producing paths). 2^n is applied as
// 2^(n-1) * 2 so that n reaches 128: exp(x) overflows to inf above ~88.72 as expf does (SiLU's limits depend on it:
// v = -1e30 gives -0 and v = -inf gives NaN, as v * sigmoid(v) does), instead of stopping at a finite 2^127.
inline float exp_approx(float x) {
  const float t = x * 1.44269504088896341f + 12582912.0f;
  int32_t n;
  std::memcpy(&n, &t, sizeof(n));
  n -= 0x4B400000;
  n = n < -125 ? -125 : n;
  n = n > 128 ? 128 : n;
  const float nf = static_cast<float>(n);
  const int32_t bits = (n - 1 + 127) << 23;
  float half_scale;
  std::memcpy(&half_scale, &bits, sizeof(half_scale));
  const float xc = std::min(std::max(x, -88.0f), 89.0f);  // beyond this, exp is 0 or inf either way
  const float r = (xc - nf * 0.693359375f) + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * half_scale * 2.0f;
}

}  // namespace diffusion_fast

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DIFFUSION_FAST_SILU_AVX512 1
#include <immintrin.h>

namespace diffusion_fast {

__attribute__((target("avx512f"), always_inline)) inline __m512 silu16(__m512 v) {
  const __m512 t = _mm512_min_ps(_mm512_set1_ps(200.0f),
                                 _mm512_max_ps(_mm512_set1_ps(-150.0f),
                                               _mm512_mul_ps(v, _mm512_set1_ps(-1.44269504088896341f))));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381609954e-4f);  // ln(2)^k / k!, k = 6 .. 0
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443423e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284771620e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821579953e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071233e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994530942e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_scalef_ps(p, n)));
}

__attribute__((target("avx512f"), always_inline)) inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

// y[i] = silu((x[i] - mean) * scale + shift) with one (mean, scale, shift) for the row (STRIDE 0) or one per element
// (STRIDE 1: the channels of a channels_last row).
template <int STRIDE>
__attribute__((target("avx512f"), noinline)) void silu_affine_avx512(const float* x, float* y, int64_t len,
                                                                      const float* mean, const float* scale,
                                                                      const float* shift) {
  __m512 m = _mm512_set1_ps(mean[0]), s = _mm512_set1_ps(scale[0]), b = _mm512_set1_ps(shift[0]);
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 k = tail_mask(len - i);
    if (STRIDE) {
      m = _mm512_maskz_loadu_ps(k, mean + i);
      s = _mm512_maskz_loadu_ps(k, scale + i);
      b = _mm512_maskz_loadu_ps(k, shift + i);
    }
    const __m512 v = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), m), s, b);
    _mm512_mask_storeu_ps(y + i, k, silu16(v));
  }
}

// The NCHW output pass of one run fused with the sum of the next run's elements (its statistics pass): returns
// sum(next[0..len)), accumulated in four vectors.
__attribute__((target("avx512f"), noinline)) inline float silu_affine_and_sum_avx512(const float* x, float* y,
                                                                                      int64_t len, float mean,
                                                                                      float scale, float shift,
                                                                                      const float* next) {
  const __m512 m = _mm512_set1_ps(mean), s = _mm512_set1_ps(scale), b = _mm512_set1_ps(shift);
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t i = 0, j = 0; i < len; i += 16, j = (j + 1) & 3) {
    const __mmask16 k = tail_mask(len - i);
    const __m512 v = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), m), s, b);
    _mm512_mask_storeu_ps(y + i, k, silu16(v));
    acc[j] = _mm512_add_ps(acc[j], _mm512_maskz_loadu_ps(k, next + i));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

}  // namespace diffusion_fast
#endif
