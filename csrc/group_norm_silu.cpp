// GroupNorm with an optional fused SiLU on the CPU, for NCHW and channels_last tensors without a layout copy.
//
// Statistics are fp32 per chunk (a chunk small enough to stay in L1: its mean, then the sum of squared deviations
// from that mean, i.e. two passes over cached data) merged across chunks in double with Chan's parallel formula —
// robust when |mean| >> std, unlike sum(x^2) - n*mean^2. The output pass computes silu(x * scale[c] + shift[c])
// in one vectorised loop (a polynomial exp the compiler vectorises; no intermediate tensor).
//
// NCHW: each (sample, group) is one contiguous run. With at least as many runs as threads, one task owns a run: its
// statistics, then the output pass while the run is still in L2 — memory sees one read and one write. With fewer
// runs (a batch-1 model with few groups) the chunks and the output elements are spread over the threads instead.
// channels_last: per sample, the H*W positions are split over the threads; each thread merges per-channel chunk
// statistics of its positions, channels are merged into groups, then the output pass runs over the positions again
// with the channels contiguous in the inner loop.
#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace diffusion_fast {
namespace {

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

// exp(x) for fp32 in plain arithmetic the compiler vectorises (Cephes' degree-6 polynomial on x - n ln2, relative
// error < 1e-7 over the fp32 range). n is rounded with the 1.5 * 2^23 trick and clamped as an integer: that keeps
// the loop branch-free (no float clamp the compiler would split into denormal-producing paths).
inline float exp_approx(float x) {
  const float t = x * 1.44269504088896341f + 12582912.0f;
  int32_t n;
  std::memcpy(&n, &t, sizeof(n));
  n -= 0x4B400000;
  n = n < -126 ? -126 : n;
  n = n > 127 ? 127 : n;
  const float nf = static_cast<float>(n);
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float xc = std::min(std::max(x, -88.0f), 88.0f);  // beyond this, exp is 0 or inf either way
  const float r = (xc - nf * 0.693359375f) + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * scale;
}

// y[i] = f((x[i] - mean) * scale + shift), f = SiLU or identity, computed in fp32. (Subtracting the mean first
// avoids the cancellation of x * scale - mean * scale when |mean| >> std and scale is large.)
template <typename scalar_t, bool SILU>
void affine_run(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t len, float mean, float scale,
                float shift) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    float v = (static_cast<float>(x[i]) - mean) * scale + shift;
    if (SILU) v = v / (1.0f + exp_approx(-v));
    y[i] = static_cast<scalar_t>(v);
  }
}

// Mean and M2 of one chunk of a contiguous run, in fp32 (two passes over L1-resident data). kLanes independent
// partial sums (four 8-wide vectors) so the adds are not serialised on one accumulator's latency.
constexpr int64_t kLanes = 32;

template <typename scalar_t>
void chunk_moments(const scalar_t* __restrict__ x, int64_t len, float* mean, float* m2) {
  const int64_t whole = len - len % kLanes;
  float acc[kLanes] = {};
  for (int64_t i = 0; i < whole; i += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) acc[k] += static_cast<float>(x[i + k]);
  float s = 0.0f;
  for (int64_t k = 0; k < kLanes; ++k) s += acc[k];
  for (int64_t i = whole; i < len; ++i) s += static_cast<float>(x[i]);
  const float mu = s / static_cast<float>(len);
  float sq[kLanes] = {};
  for (int64_t i = 0; i < whole; i += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) {
      const float d = static_cast<float>(x[i + k]) - mu;
      sq[k] += d * d;
    }
  float q = 0.0f;
  for (int64_t k = 0; k < kLanes; ++k) q += sq[k];
  for (int64_t i = whole; i < len; ++i) {
    const float d = static_cast<float>(x[i]) - mu;
    q += d * d;
  }
  *mean = mu;
  *m2 = q;
}

template <typename scalar_t>
Moments run_moments(const scalar_t* x, int64_t len) {
  Moments m;
  for (int64_t s = 0; s < len; s += kChunk) {
    const int64_t e = std::min(len, s + kChunk);
    float mu, q;
    chunk_moments(x + s, e - s, &mu, &q);
    m.merge(static_cast<double>(e - s), mu, q);
  }
  return m;
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

template <typename scalar_t, bool SILU>
void nchw(const scalar_t* x, scalar_t* y, const float* w, const float* b, int64_t N, int64_t C, int64_t HW, int64_t G,
          double eps) {
  const int64_t cpg = C / G, len = cpg * HW;
  Affine af(N * C);
  if (N * G >= at::get_num_threads()) {  // one task per run: statistics, then the output pass while it is in L2
    at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ng = begin; ng < end; ++ng) {
        const int64_t n = ng / G, g = ng % G;
        af.set_group(run_moments(x + ng * len, len), g, cpg, eps, w, b, n * C);
        for (int64_t r = n * C + g * cpg; r < n * C + (g + 1) * cpg; ++r) {
          affine_run<scalar_t, SILU>(x + r * HW, y + r * HW, HW, af.mean[r], af.scale[r], af.shift[r]);
        }
      }
    });
    return;
  }
  // Few runs: chunk statistics in parallel, merged per run, then the output pass over all elements in parallel.
  const int64_t chunks = (len + kChunk - 1) / kChunk;
  std::vector<float> mu(N * G * chunks), q(N * G * chunks);
  at::parallel_for(0, N * G * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t ng = k / chunks, s = (k % chunks) * kChunk;
      chunk_moments(x + ng * len + s, std::min(kChunk, len - s), &mu[k], &q[k]);
    }
  });
  for (int64_t ng = 0; ng < N * G; ++ng) {
    Moments m;
    for (int64_t k = 0; k < chunks; ++k) {
      m.merge(static_cast<double>(std::min(kChunk, len - k * kChunk)), mu[ng * chunks + k], q[ng * chunks + k]);
    }
    af.set_group(m, ng % G, cpg, eps, w, b, (ng / G) * C);
  }
  at::parallel_for(0, N * C * HW, kChunk, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t row = i / HW, stop = std::min(end, (row + 1) * HW);
      affine_run<scalar_t, SILU>(x + i, y + i, stop - i, af.mean[row], af.scale[row], af.shift[row]);
      i = stop;
    }
  });
}

template <typename scalar_t, bool SILU>
void channels_last(const scalar_t* x, scalar_t* y, const float* w, const float* b, int64_t N, int64_t C, int64_t HW,
                   int64_t G, double eps) {
  const int64_t cpg = C / G;
  // positions per statistics chunk: ~64 KiB of fp32 (stays in L2 for the second pass; few per-chunk merges)
  const int64_t block = std::max<int64_t>(1, 8 * kChunk / C);
  const int threads = at::get_num_threads();
  Affine af(C);
  const float *mean = af.mean.data(), *scale = af.scale.data(), *shift = af.shift.data();
  for (int64_t n = 0; n < N; ++n) {
    const scalar_t* xn = x + n * HW * C;
    scalar_t* yn = y + n * HW * C;
    std::vector<Moments> per_thread(static_cast<size_t>(threads) * C);
    at::parallel_for(0, HW, block, [&](int64_t begin, int64_t end) {
      Moments* acc = per_thread.data() + static_cast<int64_t>(at::get_thread_num()) * C;
      std::vector<float> sum(C), m2(C);
      for (int64_t p0 = begin; p0 < end; p0 += block) {
        const int64_t p1 = std::min(end, p0 + block), count = p1 - p0;
        std::fill(sum.begin(), sum.end(), 0.0f);
        std::fill(m2.begin(), m2.end(), 0.0f);
        for (int64_t p = p0; p < p1; ++p) {
          const scalar_t* row = xn + p * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) sum[c] += static_cast<float>(row[c]);
        }
        for (int64_t c = 0; c < C; ++c) sum[c] /= static_cast<float>(count);  // now the chunk's channel means
        for (int64_t p = p0; p < p1; ++p) {
          const scalar_t* row = xn + p * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const float d = static_cast<float>(row[c]) - sum[c];
            m2[c] += d * d;
          }
        }
        for (int64_t c = 0; c < C; ++c) acc[c].merge(static_cast<double>(count), sum[c], m2[c]);
      }
    });
    for (int64_t g = 0; g < G; ++g) {
      Moments m;
      for (int t = 0; t < threads; ++t)
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
          const Moments& part = per_thread[static_cast<size_t>(t) * C + c];
          m.merge(part.n, part.mean, part.m2);
        }
      af.set_group(m, g, cpg, eps, w, b, 0);
    }
    at::parallel_for(0, HW, block, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const scalar_t* __restrict__ xr = xn + p * C;
        scalar_t* __restrict__ yr = yn + p * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          float v = (static_cast<float>(xr[c]) - mean[c]) * scale[c] + shift[c];
          if (SILU) v = v / (1.0f + exp_approx(-v));
          yr[c] = static_cast<scalar_t>(v);
        }
      }
    });
  }
}

}  // namespace

at::Tensor group_norm_silu_cpu(const at::Tensor& x_in, int64_t num_groups, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, double eps, bool apply_silu) {
  TORCH_CHECK_TYPE(at::isFloatingType(x_in.scalar_type()), "x must be a floating-point tensor, got ", x_in.scalar_type());
  TORCH_CHECK_VALUE(x_in.dim() >= 2 && x_in.numel() > 0, "x must be a non-empty (N, C, *spatial) tensor, got shape ",
                    x_in.sizes());
  const int64_t N = x_in.size(0), C = x_in.size(1);
  TORCH_CHECK_VALUE(num_groups > 0 && C % num_groups == 0, "num_groups=", num_groups,
                    " must be positive and divide the channel count ", C, " of x");
  TORCH_CHECK_VALUE(eps > 0, "eps must be > 0, got ", eps);
  at::Tensor w, b;
  if (weight.has_value()) {
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == C, "weight must have ", C, " elements, got shape ",
                      weight->sizes());
    w = weight->to(at::kFloat).contiguous();
  }
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == C, "bias must have ", C, " elements, got shape ",
                      bias->sizes());
    b = bias->to(at::kFloat).contiguous();
  }
  if (x_in.scalar_type() == at::kDouble) {  // fp64 keeps fp64 arithmetic: ATen's GroupNorm, then SiLU in place
    at::Tensor y = at::group_norm(x_in, num_groups, w.defined() ? w.to(at::kDouble) : w,
                                  b.defined() ? b.to(at::kDouble) : b, eps);
    return apply_silu ? at::silu_(y) : y;
  }
  // channels_last is read in place; any other strides are made contiguous (NCHW) first.
  const bool cl = x_in.dim() == 4 && !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = cl ? x_in : x_in.contiguous();
  at::Tensor y = at::empty_like(x);  // keeps the memory format
  const int64_t HW = x.numel() / (N * C);
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    if (cl && apply_silu) channels_last<scalar_t, true>(xp, yp, wp, bp, N, C, HW, num_groups, eps);
    else if (cl) channels_last<scalar_t, false>(xp, yp, wp, bp, N, C, HW, num_groups, eps);
    else if (apply_silu) nchw<scalar_t, true>(xp, yp, wp, bp, N, C, HW, num_groups, eps);
    else nchw<scalar_t, false>(xp, yp, wp, bp, N, C, HW, num_groups, eps);
  });
  return y;
}

}  // namespace diffusion_fast
