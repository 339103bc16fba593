// SiLU for the output pass of group_norm_silu.cpp: a portable exp the compiler vectorises, and fp32 SiLU in AVX-512
// and AVX2 intrinsics for y = silu((x - mean) * scale + shift).
//
// The output pass is compute-bound, so it is written in intrinsics rather than left to the vectoriser:
// exp(-v) = 2^n * 2^f with n = round(-v log2 e), f = -v log2 e - n in [-1/2, 1/2], 2^f by its degree-6 Taylor
// polynomial (relative error < 1.3e-7) and 2^n applied by scalef (AVX-512) or built in the exponent bits (AVX2);
// then v / (1 + exp(-v)) with an IEEE divide. -v log2 e is clamped first, so inf - inf never happens inside:
// exp(-v) underflows to ~0 (v = +inf gives inf) or overflows to inf (v = -1e30 gives -0 and v = -inf gives NaN, like
// v * sigmoid(v)); the clamps keep NaN, as max/min return their second operand, the input, when either is NaN.
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

// 2^f for f in [-1/2, 1/2] by its degree-6 Taylor polynomial, in Horner order: ln(2)^k / k! for k = 6 .. 0. Shared by
// the AVX-512 and AVX2 SiLU below.
constexpr float kExp2Taylor[7] = {1.5403530393381609954e-4f, 1.3333558146428443423e-3f, 9.6181291076284771620e-3f,
                                  5.5504108664821579953e-2f, 2.4022650695910071233e-1f, 6.9314718055994530942e-1f,
                                  1.0f};

}  // namespace diffusion_fast

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DIFFUSION_FAST_SILU_AVX512 1
#include <immintrin.h>

namespace diffusion_fast {
// Streaming stores are weakly ordered: a thread that made them fences before its output is handed on.
inline void streaming_stores_done() { _mm_sfence(); }
}  // namespace diffusion_fast
#else
namespace diffusion_fast {
inline void streaming_stores_done() {}
}  // namespace diffusion_fast
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

namespace diffusion_fast {

__attribute__((target("avx512f"), always_inline)) inline __m512 silu16(__m512 v) {
  const __m512 t = _mm512_min_ps(_mm512_set1_ps(200.0f),
                                 _mm512_max_ps(_mm512_set1_ps(-150.0f),
                                               _mm512_mul_ps(v, _mm512_set1_ps(-1.44269504088896341f))));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(kExp2Taylor[0]);
  for (int k = 1; k < 7; ++k) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Taylor[k]));
  return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_scalef_ps(p, n)));
}

__attribute__((target("avx512f"), always_inline)) inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

// Lanes of y before its first `bytes`-aligned address (streaming stores write whole aligned vectors), at most len.
inline int64_t lanes_to_alignment(const float* y, int64_t len, int64_t bytes) {
  const int64_t misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(y) % static_cast<uintptr_t>(bytes));
  return std::min(len, misaligned == 0 ? 0 : (bytes - misaligned) / static_cast<int64_t>(sizeof(float)));
}

// The lanes k of y[i..i+16) = silu((x - mean) * scale + shift); STRIDE 1 loads the per-element parameters. A
// streaming store (stream: all 16 lanes, y + i 64-byte aligned) writes past the caches, saving the read of y's lines.
template <int STRIDE>
__attribute__((target("avx512f"), always_inline)) inline void silu_affine16(const float* x, float* y, int64_t i,
                                                                            __mmask16 k, const float* mean,
                                                                            const float* scale, const float* shift,
                                                                            bool stream) {
  const __m512 m = STRIDE ? _mm512_maskz_loadu_ps(k, mean + i) : _mm512_set1_ps(mean[0]);
  const __m512 s = STRIDE ? _mm512_maskz_loadu_ps(k, scale + i) : _mm512_set1_ps(scale[0]);
  const __m512 b = STRIDE ? _mm512_maskz_loadu_ps(k, shift + i) : _mm512_set1_ps(shift[0]);
  const __m512 v = silu16(_mm512_fmadd_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), m), s, b));
  if (stream) _mm512_stream_ps(y + i, v);
  else _mm512_mask_storeu_ps(y + i, k, v);
}

// y[i] = silu((x[i] - mean) * scale + shift) with one (mean, scale, shift) for the row (STRIDE 0) or one per element
// (STRIDE 1: the channels of a channels_last row). STREAM: the whole vectors from y's first 64-byte boundary on are
// written with streaming stores (the caller fences before the output is read: group_norm_silu.cpp).
template <int STRIDE, bool STREAM>
__attribute__((target("avx512f"), noinline)) void silu_affine_avx512(const float* x, float* y, int64_t len,
                                                                      const float* mean, const float* scale,
                                                                      const float* shift) {
  const float m0 = mean[0], s0 = scale[0], b0 = shift[0];  // STRIDE 0: read once (y's stores could alias them)
  if (!STRIDE) mean = &m0, scale = &s0, shift = &b0;
  int64_t i = STREAM ? lanes_to_alignment(y, len, 64) : 0;
  if (i > 0) silu_affine16<STRIDE>(x, y, 0, tail_mask(i), mean, scale, shift, false);
  for (; i < len; i += 16) {
    const __mmask16 k = tail_mask(len - i);
    silu_affine16<STRIDE>(x, y, i, k, mean, scale, shift, STREAM && k == static_cast<__mmask16>(0xFFFF));
  }
}

// The NCHW output pass of one run fused with the sum of the next run's elements (its statistics pass): returns
// sum(next[0..len)), accumulated in four vectors. STREAM as in silu_affine_avx512.
template <bool STREAM>
__attribute__((target("avx512f"), noinline)) inline float silu_affine_and_sum_avx512(const float* x, float* y,
                                                                                      int64_t len, float mean,
                                                                                      float scale, float shift,
                                                                                      const float* next) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t i = STREAM ? lanes_to_alignment(y, len, 64) : 0;
  if (i > 0) {
    silu_affine16<0>(x, y, 0, tail_mask(i), &mean, &scale, &shift, false);
    acc[3] = _mm512_maskz_loadu_ps(tail_mask(i), next);
  }
  for (int64_t j = 0; i < len; i += 16, j = (j + 1) & 3) {
    const __mmask16 k = tail_mask(len - i);
    silu_affine16<0>(x, y, i, k, &mean, &scale, &shift, STREAM && k == static_cast<__mmask16>(0xFFFF));
    acc[j] = _mm512_add_ps(acc[j], _mm512_maskz_loadu_ps(k, next + i));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

}  // namespace diffusion_fast
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__AVX2__) && defined(__FMA__)
#define DIFFUSION_FAST_SILU_AVX2 1
#include <immintrin.h>

namespace diffusion_fast {

// silu16 in 8 lanes, for CPUs with AVX2 but not AVX-512 (the build's baseline when setup.py passes -mavx2 -mfma).
// No scalef: -v log2 e is clamped to [-125, 128] and 2^n is built in the exponent bits as 2^(n-1), times 2, so that
// n = 128 still overflows to inf (exp(-v) for v < -88.7); at -125, exp(-v) is 2^-125 instead of smaller, which
// leaves v / (1 + exp(-v)) = v unchanged in fp32.
__attribute__((always_inline)) inline __m256 silu8(__m256 v) {
  const __m256 t = _mm256_min_ps(_mm256_set1_ps(128.0f),
                                 _mm256_max_ps(_mm256_set1_ps(-125.0f),
                                               _mm256_mul_ps(v, _mm256_set1_ps(-1.44269504088896341f))));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(kExp2Taylor[0]);
  for (int k = 1; k < 7; ++k) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Taylor[k]));
  const __m256 half_scale = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(126)), 23));  // 2^(n-1)
  const __m256 e = _mm256_mul_ps(p, half_scale);
  return _mm256_div_ps(v, _mm256_fmadd_ps(e, _mm256_set1_ps(2.0f), _mm256_set1_ps(1.0f)));
}

// Lanes [0, left) of a vector (left < 8) for the masked tail: maskload/maskstore are slow on some CPUs, so whole
// vectors go unmasked.
__attribute__((always_inline)) inline __m256i tail_mask8(int64_t left) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The lanes [0, left) of y[i..i+8) = silu((x - mean) * scale + shift) (left >= 8: all, unmasked); as silu_affine16.
template <int STRIDE>
__attribute__((always_inline)) inline void silu_affine8(const float* x, float* y, int64_t i, int64_t left,
                                                        const float* mean, const float* scale, const float* shift,
                                                        bool stream) {
  if (left >= 8) {
    const __m256 m = STRIDE ? _mm256_loadu_ps(mean + i) : _mm256_set1_ps(mean[0]);
    const __m256 s = STRIDE ? _mm256_loadu_ps(scale + i) : _mm256_set1_ps(scale[0]);
    const __m256 b = STRIDE ? _mm256_loadu_ps(shift + i) : _mm256_set1_ps(shift[0]);
    const __m256 v = silu8(_mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), m), s, b));
    if (stream) _mm256_stream_ps(y + i, v);
    else _mm256_storeu_ps(y + i, v);
    return;
  }
  const __m256i k = tail_mask8(left);
  const __m256 m = STRIDE ? _mm256_maskload_ps(mean + i, k) : _mm256_set1_ps(mean[0]);
  const __m256 s = STRIDE ? _mm256_maskload_ps(scale + i, k) : _mm256_set1_ps(scale[0]);
  const __m256 b = STRIDE ? _mm256_maskload_ps(shift + i, k) : _mm256_set1_ps(shift[0]);
  _mm256_maskstore_ps(y + i, k, silu8(_mm256_fmadd_ps(_mm256_sub_ps(_mm256_maskload_ps(x + i, k), m), s, b)));
}

// silu_affine_avx512 in 8 lanes (streaming from y's first 32-byte boundary on).
template <int STRIDE, bool STREAM>
__attribute__((noinline)) void silu_affine_avx2(const float* x, float* y, int64_t len, const float* mean,
                                                const float* scale, const float* shift) {
  const float m0 = mean[0], s0 = scale[0], b0 = shift[0];  // STRIDE 0: read once (y's stores could alias them)
  if (!STRIDE) mean = &m0, scale = &s0, shift = &b0;
  int64_t i = STREAM ? lanes_to_alignment(y, len, 32) : 0;
  if (i > 0) silu_affine8<STRIDE>(x, y, 0, i, mean, scale, shift, false);
  for (; i < len; i += 8) silu_affine8<STRIDE>(x, y, i, len - i, mean, scale, shift, STREAM && len - i >= 8);
}

// silu_affine_and_sum_avx512 in 8 lanes: returns sum(next[0..len)).
template <bool STREAM>
__attribute__((noinline)) inline float silu_affine_and_sum_avx2(const float* x, float* y, int64_t len, float mean,
                                                                float scale, float shift, const float* next) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = STREAM ? lanes_to_alignment(y, len, 32) : 0;
  if (i > 0) {
    silu_affine8<0>(x, y, 0, i, &mean, &scale, &shift, false);
    acc[3] = _mm256_maskload_ps(next, tail_mask8(i));
  }
  for (int64_t j = 0; i < len; i += 8, j = (j + 1) & 3) {
    silu_affine8<0>(x, y, i, len - i, &mean, &scale, &shift, STREAM && len - i >= 8);
    acc[j] = _mm256_add_ps(acc[j], len - i >= 8 ? _mm256_loadu_ps(next + i)
                                                : _mm256_maskload_ps(next + i, tail_mask8(len - i)));
  }
  const __m256 a = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
}

}  // namespace diffusion_fast
#endif
