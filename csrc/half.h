// fp16 and bf16 storage for the CPU loops: chunks converted to and from fp32 in vectorised passes.
//
// Element-wise c10::Half/c10::BFloat16 conversions do not vectorise inside the loops (and neither do the compiler's
// _Float16 ones), so a loop over them ran several times slower than in fp32. Instead a loop converts a chunk that
// stays in L1 into an fp32 buffer, runs the fp32 code on it, and converts its output back:
// - bf16 -> fp32 is a 16-bit shift, and fp32 -> bf16 rounds to nearest even with integer ops, exactly as
//   c10::BFloat16 does (NaN becomes 0x7FC0, overflow rounds to inf). The compiler vectorises both.
// - fp16 uses F16C (vcvtph2ps / vcvtps2ph, round to nearest even), 8 values per instruction, where the build has it
//   (-mf16c: every AVX2 CPU). Without it DIFFUSION_FAST_FP16 is unset and callers convert through fp32 tensors.
// The tag types have c10's 2-byte layout, so a tensor's data pointer is read as an array of them.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__F16C__)
#include <immintrin.h>
#define DIFFUSION_FAST_FP16 1
#endif

namespace diffusion_fast {

struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

template <typename T>
constexpr bool is_half_v = std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;

inline void to_float(const bf16* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(x[i].bits) << 16;
    std::memcpy(&y[i], &u, sizeof u);
  }
}

inline void from_float(const float* __restrict x, bf16* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, &x[i], sizeof u);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    y[i].bits = static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
  }
}

#if defined(DIFFUSION_FAST_FP16)
inline void to_float(const fp16* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
  for (; i < n; ++i) y[i] = _cvtsh_ss(x[i].bits);
}

inline void from_float(const float* x, fp16* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), h);
  }
  for (; i < n; ++i) y[i].bits = _cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
}
#endif

}  // namespace diffusion_fast
