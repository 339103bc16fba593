// GroupNorm with an optional fused SiLU on the CPU, for NCHW and channels_last tensors without a layout copy.
//
// NCHW: each (sample, group) is one contiguous run, handled by one task: its shifted moments in one pass, then
// normalise + affine, then SiLU — the run stays in cache between passes, so memory sees one read and one write. channels_last: the H*W positions are split across threads; each accumulates
// per-channel partial sums for the pass it is in, then the apply loop runs over contiguous channels.
// Statistics are accumulated in float within blocks and in double across blocks. SiLU is applied to each
// normalised run while it is still in cache, with ATen's vectorised silu_.
#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <vector>

namespace diffusion_fast {
namespace {

constexpr int64_t kBlock = 4096;

// SiLU in place on a run that is still in cache: ATen's vectorised (Sleef) silu, one thread per call.
template <typename scalar_t>
void silu_inplace(scalar_t* data, int64_t len) {
  at::Tensor view = at::from_blob(data, {len}, at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value));
  at::silu_(view);
}

// Mean and variance of one contiguous run in a single pass: sums of (x - shift) and (x - shift)^2, shifted by the
// run's first element so the variance does not cancel; float within blocks, double across blocks.
template <typename scalar_t>
void run_moments(const scalar_t* x, int64_t len, float* mean, float* var) {
  const float shift = static_cast<float>(x[0]);
  double sum = 0.0, sq = 0.0;
  for (int64_t s = 0; s < len; s += kBlock) {
    const int64_t e = std::min(len, s + kBlock);
    float a = 0.0f, a2 = 0.0f;
#pragma omp simd reduction(+ : a, a2)
    for (int64_t i = s; i < e; ++i) {
      const float d = static_cast<float>(x[i]) - shift;
      a += d;
      a2 += d * d;
    }
    sum += a;
    sq += a2;
  }
  const double m = sum / len;
  *mean = static_cast<float>(m + shift);
  *var = static_cast<float>(std::max(sq / len - m * m, 0.0));
}

template <typename scalar_t>
void nchw(const scalar_t* x, scalar_t* y, const float* w, const float* b, int64_t N, int64_t C, int64_t HW,
          int64_t G, double eps, bool apply_silu) {
  const int64_t cpg = C / G, len = cpg * HW;
  at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t base = ng * len;
      float mean, var;
      run_moments(x + base, len, &mean, &var);
      const float rstd = 1.0f / std::sqrt(var + static_cast<float>(eps));
      const int64_t g = ng % G;
      for (int64_t cl = 0; cl < cpg; ++cl) {
        const int64_t c = g * cpg + cl;
        const float scale = rstd * (w ? w[c] : 1.0f);
        const float shift = b ? b[c] : 0.0f;
        const scalar_t* xi = x + base + cl * HW;
        scalar_t* yi = y + base + cl * HW;
#pragma omp simd
        for (int64_t i = 0; i < HW; ++i) yi[i] = static_cast<scalar_t>((static_cast<float>(xi[i]) - mean) * scale + shift);
      }
      if (apply_silu) silu_inplace(y + base, len);
    }
  });
}

// Per-channel sums over all positions of one sample, parallel over positions: sum(x - shift[c]) or sum((x - mu[c])^2).
template <typename scalar_t>
std::vector<double> channel_sums(const scalar_t* x, int64_t HW, int64_t C, const std::vector<float>& center,
                                 bool squared) {
  const int threads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(threads) * C, 0.0);
  at::parallel_for(0, HW, 256, [&](int64_t begin, int64_t end) {
    double* out = partial.data() + static_cast<int64_t>(at::get_thread_num()) * C;
    std::vector<float> acc(C, 0.0f);
    for (int64_t p = begin; p < end; ++p) {
      const scalar_t* row = x + p * C;
      if (squared) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const float d = static_cast<float>(row[c]) - center[c];
          acc[c] += d * d;
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<float>(row[c]) - center[c];
      }
      if ((p - begin) % 1024 == 1023 || p == end - 1) {  // fold into double every 1024 positions
        for (int64_t c = 0; c < C; ++c) {
          out[c] += acc[c];
          acc[c] = 0.0f;
        }
      }
    }
  });
  std::vector<double> sums(C, 0.0);
  for (int t = 0; t < threads; ++t)
    for (int64_t c = 0; c < C; ++c) sums[c] += partial[static_cast<size_t>(t) * C + c];
  return sums;
}

template <typename scalar_t>
void channels_last(const scalar_t* x, scalar_t* y, const float* w, const float* b, int64_t N, int64_t C, int64_t HW,
                   int64_t G, double eps, bool apply_silu) {
  const int64_t cpg = C / G;
  std::vector<float> scale(C), shift(C), mean(C);
  for (int64_t n = 0; n < N; ++n) {
    const scalar_t* xn = x + n * HW * C;
    scalar_t* yn = y + n * HW * C;
    std::vector<float> center(C, 0.0f);
    const std::vector<double> sums = channel_sums(xn, HW, C, center, false);
    for (int64_t g = 0; g < G; ++g) {
      double s = 0.0;
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) s += sums[c];
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) center[c] = static_cast<float>(s / (cpg * HW));
    }
    const std::vector<double> sq = channel_sums(xn, HW, C, center, true);
    for (int64_t g = 0; g < G; ++g) {
      double s = 0.0;
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) s += sq[c];
      const float rstd = 1.0f / std::sqrt(static_cast<float>(s / (cpg * HW)) + static_cast<float>(eps));
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
        scale[c] = rstd * (w ? w[c] : 1.0f);
        shift[c] = b ? b[c] : 0.0f;
        mean[c] = center[c];
      }
    }
    at::parallel_for(0, HW, 256, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const scalar_t* xr = xn + p * C;
        scalar_t* yr = yn + p * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) yr[c] = static_cast<scalar_t>((static_cast<float>(xr[c]) - mean[c]) * scale[c] + shift[c]);
      }
      if (apply_silu) silu_inplace(yn + begin * C, (end - begin) * C);
    });
  }
}

}  // namespace

at::Tensor group_norm_silu_cpu(const at::Tensor& x_in, int64_t num_groups, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, double eps, bool apply_silu) {
  TORCH_CHECK_TYPE(at::isFloatingType(x_in.scalar_type()), "x must be a floating-point tensor, got ", x_in.scalar_type());
  TORCH_CHECK_VALUE(x_in.dim() >= 2 && x_in.numel() > 0, "x must be a non-empty (N, C, *spatial) tensor");
  const int64_t N = x_in.size(0), C = x_in.size(1);
  TORCH_CHECK_VALUE(num_groups > 0 && C % num_groups == 0, "num_groups=", num_groups,
                    " must be positive and divide the channel count ", C, " of x");
  TORCH_CHECK_VALUE(eps > 0, "eps must be > 0");
  at::Tensor w, b;
  if (weight.has_value()) {
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == C, "weight must have ", C, " elements");
    w = weight->to(at::kFloat).contiguous();
  }
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == C, "bias must have ", C, " elements");
    b = bias->to(at::kFloat).contiguous();
  }
  const bool cl = x_in.dim() == 4 && !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = cl ? x_in : x_in.contiguous();
  at::Tensor y = at::empty_like(x);  // keeps the memory format
  const int64_t HW = x.numel() / (N * C);
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_cpu", [&] {
    if (cl) {
      channels_last<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), wp, bp, N, C, HW, num_groups, eps, apply_silu);
    } else {
      nchw<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), wp, bp, N, C, HW, num_groups, eps, apply_silu);
    }
  });
  return y;
}

}  // namespace diffusion_fast
