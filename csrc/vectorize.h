// Run a hot loop in a 16-wide AVX-512 build where the CPU has AVX-512, else in the build's baseline (AVX2 here).
//
// The extension is built for the baseline ISA so it loads on any x86-64 CPU of its kind; loops that are
// compute-bound in fp32 (the GroupNorm output pass: an exp and a divide per element; the sampler steps: a dozen
// FMAs) gain from the wider vectors. widest(f) calls f, an always_inline lambda, from a function compiled for
// AVX-512, into which the compiler inlines and re-vectorises it, or calls it directly on other CPUs.
// DIFFUSION_FAST_NO_AVX512=1 forces the baseline build (to test it on an AVX-512 CPU).
#pragma once

#include <cstdlib>

namespace diffusion_fast {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__AVX512F__)
#define DIFFUSION_FAST_INLINE_LAMBDA __attribute__((always_inline))
#define DIFFUSION_FAST_AVX512_BUILDS 1
template <typename F>
__attribute__((target("avx512f"), noinline)) void on_avx512(const F& f) {
  f();
}
inline bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && std::getenv("DIFFUSION_FAST_NO_AVX512") == nullptr;
  return yes;
}
template <typename F>
inline void widest(const F& f) {
  if (has_avx512()) on_avx512(f);
  else f();
}
#else
#define DIFFUSION_FAST_INLINE_LAMBDA
template <typename F>
inline void widest(const F& f) {
  f();
}
#endif

}  // namespace diffusion_fast
