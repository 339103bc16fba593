// GroupNorm with an optional fused SiLU on the CPU, for NCHW and channels_last tensors without a layout copy.
//
// Statistics are fp32 per chunk or block, merged in double with Chan's parallel formula, and robust when
// |mean| >> std (no sum(x^2) - n*mean^2). The output pass computes silu((x - mean) * scale[c] + shift[c]) in one
// vectorised loop with no intermediate tensor. It is compute-bound (an exp and a divide per element), so fp32 SiLU
// uses AVX-512 or AVX2 intrinsics (silu.h), and the other loops run an AVX-512 build of the same code where the CPU
// has it (vectorize.h).
//
// NCHW: each (sample, group) is one contiguous run. With at least as many runs as threads, each task owns
// consecutive runs and pipelines them. One pass writes run r's output, whose input is still in L2 from its
// statistics pass, while it reads run r + 1 for its own statistics (a chunk's mean, then its squared deviations from
// L1). So the memory-bound reads overlap the compute-bound output, and memory sees one read and one write. Maps under
// kSmallMap positions skip the pipelining, where per-row costs would dominate. With fewer runs than threads (a
// batch-1 model with few groups), the chunks and the output elements are spread over the threads instead.
// channels_last: the blocks of positions of all samples are split over the threads (a block never spans two samples).
// Each thread accumulates per-channel statistics per sample, block by block, as sums shifted by its running means
// (close to the mean, so they do not cancel; a thread's first block of a sample is shifted by its own means, from a
// first pass over the L2-resident block), the sums of 64 channels at a time held in registers across the block's
// rows. Channels are merged into groups, then one output pass runs over all positions with the channels contiguous.
// In both layouts, fp32 SiLU outputs of kStreamBytes and more are written with streaming stores (silu.h).
#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "group_norm_rows.h"
#include "message.h"

namespace diffusion_fast {
namespace {

constexpr int64_t kSmallMap = 512;  // NCHW maps with fewer positions take the unpipelined path
// fp32 SiLU outputs of at least this many bytes are written with streaming stores (silu.h), which skip reading the
// output's lines into the cache before writing them: a third of the memory traffic when the input comes from memory.
// Smaller outputs may still be in cache when the next op reads them.
constexpr int64_t kStreamBytes = 4 << 20;

using namespace gn;  // the row-level blocks: group_norm_rows.h

template <typename scalar_t, bool SILU, bool STREAM>
void nchw(const scalar_t* x, scalar_t* y, const float* w, const float* b, int64_t N, int64_t C, int64_t HW, int64_t G,
          double eps) {
  const int64_t cpg = C / G, len = cpg * HW;
  Affine af(N * C);
  if (N * G >= at::get_num_threads()) {
    // Each task owns consecutive runs and pipelines them: one pass writes run r's output (compute-bound, its input
    // still in L2 from the statistics pass) while it reads run r + 1 for its statistics (memory-bound).
    // at least ~32K elements per task: a small tensor runs inline, without waking the thread pool
    at::parallel_for(0, N * G, std::max<int64_t>(1, (1 << 15) / len), [&](int64_t begin, int64_t end) {
      // output pass of run `out` (if >= 0) + statistics of run `in` (if < end)
      auto pass = [&](int64_t out, int64_t in) DIFFUSION_FAST_INLINE_LAMBDA {
        Moments m;
        for (int64_t c = 0; c < cpg; ++c) {
          const int64_t row = out * cpg + c;  // a run's rows are its group's channels: af row == run * cpg + c
          for (int64_t s = 0; s < HW; s += kChunk) {
            const int64_t n = std::min(kChunk, HW - s), off = c * HW + s;
            if (in >= end) {
              affine_row<scalar_t, SILU, 0, STREAM>(x + out * len + off, y + out * len + off, n, &af.mean[row],
                                                    &af.scale[row], &af.shift[row]);
              continue;
            }
            float mu, q;
            affine_and_moments_body<scalar_t, SILU, STREAM>(
                out >= 0 ? x + out * len + off : nullptr, out >= 0 ? y + out * len + off : nullptr, n,
                out >= 0 ? af.mean[row] : 0.0f, out >= 0 ? af.scale[row] : 0.0f, out >= 0 ? af.shift[row] : 0.0f,
                x + in * len + off, &mu, &q);
            m.merge(static_cast<double>(n), mu, q);
          }
        }
        if (in < end) af.set_group(m, in % G, cpg, eps, w, b, (in / G) * C);
      };
      // Small maps (rows shorter than a vector loop's worth): statistics over the whole contiguous run at once,
      // then the rows, instead of per-row fused calls whose fixed cost would dominate.
      auto small_maps = [&]() DIFFUSION_FAST_INLINE_LAMBDA {
        for (int64_t ng = begin; ng < end; ++ng) {
          Moments m;
          for (int64_t s = 0; s < len; s += kChunk) {
            const int64_t n = std::min(kChunk, len - s);
            float mu, q;
            affine_and_moments_body<scalar_t, false>(nullptr, nullptr, n, 0.0f, 0.0f, 0.0f, x + ng * len + s, &mu, &q);
            m.merge(static_cast<double>(n), mu, q);
          }
          af.set_group(m, ng % G, cpg, eps, w, b, (ng / G) * C);
          for (int64_t r = ng * cpg; r < (ng + 1) * cpg; ++r)
            affine_row<scalar_t, SILU, 0, STREAM>(x + r * HW, y + r * HW, HW, &af.mean[r], &af.scale[r],
                                                  &af.shift[r]);
        }
      };
      widest([&]() DIFFUSION_FAST_INLINE_LAMBDA {  // one dispatch per task: the passes inline into it
        if (HW < kSmallMap) return small_maps();
        pass(-1, begin);
        for (int64_t ng = begin; ng < end; ++ng) pass(ng, ng + 1);
      });
      if (STREAM) streaming_stores_done();
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
    widest([&]() DIFFUSION_FAST_INLINE_LAMBDA {
      for (int64_t i = begin; i < end;) {
        const int64_t row = i / HW, stop = std::min(end, (row + 1) * HW);
        affine_row<scalar_t, SILU, 0, STREAM>(x + i, y + i, stop - i, &af.mean[row], &af.scale[row],
                                              &af.shift[row]);
        i = stop;
      }
    });
    if (STREAM) streaming_stores_done();
  });
}

// Per-channel mean and M2 of channels [c0, c0 + T) over `rows` channels_last rows (C wide, fp32), as shifted sums,
// sum(x - k) and sum((x - k)^2), that do not cancel because k is close to the mean: k is the running means of the
// thread's earlier blocks, or for its first block (k null) the block's own means, from a first pass over the
// L2-resident block. The tile's 2 * T sums stay in registers across the rows, so each element costs one load.
template <int T, typename scalar_t>
__attribute__((always_inline)) inline void cl_tile_moments(const scalar_t* __restrict__ x, int64_t rows, int64_t C,
                                                           int64_t c0, const float* __restrict__ k,
                                                           float* __restrict__ mu, float* __restrict__ m2) {
  float s[T] = {}, q[T] = {}, shift[T];
  if (k != nullptr) {
    for (int j = 0; j < T; ++j) shift[j] = k[c0 + j];
  } else {
    for (int64_t p = 0; p < rows; ++p) {
      const scalar_t* __restrict__ row = x + p * C + c0;
#pragma omp simd
      for (int j = 0; j < T; ++j) s[j] += static_cast<float>(row[j]);
    }
    for (int j = 0; j < T; ++j) {
      shift[j] = s[j] / static_cast<float>(rows);
      s[j] = 0.0f;
    }
  }
  for (int64_t p = 0; p < rows; ++p) {
    const scalar_t* __restrict__ row = x + p * C + c0;
#pragma omp simd
    for (int j = 0; j < T; ++j) {
      const float d = static_cast<float>(row[j]) - shift[j];
      s[j] += d;
      q[j] += d * d;
    }
  }
  for (int j = 0; j < T; ++j) {
    const float d = s[j] / static_cast<float>(rows);
    m2[c0 + j] = std::max(0.0f, q[j] - s[j] * d);
    mu[c0 + j] = shift[j] + d;
  }
}

// Per-channel mean and M2 of `rows` channels_last rows: tiles of 64 channels, then of 16, then one at a time.
template <typename scalar_t>
__attribute__((always_inline)) inline void cl_block_moments_native(const scalar_t* x, int64_t rows, int64_t C,
                                                                  const float* k, float* mu, float* m2) {
  int64_t c0 = 0;
  for (; c0 + 64 <= C; c0 += 64) cl_tile_moments<64>(x, rows, C, c0, k, mu, m2);
  for (; c0 + 16 <= C; c0 += 16) cl_tile_moments<16>(x, rows, C, c0, k, mu, m2);
  for (; c0 < C; ++c0) cl_tile_moments<1>(x, rows, C, c0, k, mu, m2);
}


// cl_block_moments_native for any storage; a fp16/bf16 block (<= 8 * kChunk values) is converted once first.
template <typename scalar_t>
__attribute__((always_inline)) inline void cl_block_moments_body(const scalar_t* x, int64_t rows, int64_t C,
                                                                  const float* k, float* mu, float* m2) {
  if constexpr (is_half_v<scalar_t>) {
    thread_local std::vector<float> block;
    block.resize(static_cast<size_t>(rows * C));
    to_float(x, block.data(), rows * C);
    cl_block_moments_native<float>(block.data(), rows, C, k, mu, m2);
  } else {
    cl_block_moments_native<scalar_t>(x, rows, C, k, mu, m2);
  }
}
// Per-channel moments of a run of channels_last rows, accumulated block by block. Every channel of a block has the
// same count, so merging a block costs one shared pair of factors and a vectorised loop (no divide per channel).
struct ChannelMoments {
  double n = 0.0;
  std::vector<double> mean, m2;
  explicit ChannelMoments(int64_t C) : mean(C, 0.0), m2(C, 0.0) {}
  void merge(double nb, const float* mean_b, const float* m2_b, int64_t C) {
    if (nb == 0.0) return;
    const double total = n + nb, f_mean = nb / total, f_m2 = n * nb / total;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const double delta = static_cast<double>(mean_b[c]) - mean[c];
      mean[c] += delta * f_mean;
      m2[c] += static_cast<double>(m2_b[c]) + delta * delta * f_m2;
    }
    n = total;
  }
};

template <typename scalar_t, bool SILU, bool STREAM>
void channels_last(const scalar_t* x, scalar_t* y, const float* w, const float* b, int64_t N, int64_t C, int64_t HW,
                   int64_t G, double eps) {
  const int64_t cpg = C / G;
  // positions per statistics block: ~64 KiB of fp32, and few enough values per channel that fp32 block sums are exact
  // enough; merging a block is one vectorised loop over the channels
  const int64_t block = std::max<int64_t>(1, 8 * kChunk / C);
  const int threads = at::get_num_threads();
  // Two parallel passes over all samples at once (one wake-up and one barrier each, not two per sample): per-channel
  // statistics of blocks of positions, each thread keeping one running ChannelMoments per sample it meets, then the
  // output pass. A block never spans two samples.
  const int64_t blocks = (HW + block - 1) / block;  // per sample
  std::vector<ChannelMoments> per_thread(static_cast<size_t>(threads * N), ChannelMoments(C));
  // at least ~32K elements per task, as in NCHW: a small tensor runs inline, without waking the thread pool
  at::parallel_for(0, N * blocks, std::max<int64_t>(1, (1 << 15) / (block * C)), [&](int64_t begin, int64_t end) {
    std::vector<float> mu(C), m2(C), k(C);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / blocks, p0 = (i % blocks) * block, rows = std::min(HW - p0, block);
      ChannelMoments& acc = per_thread[at::get_thread_num() * N + n];
      const bool shifted = acc.n > 0;  // the running means so far shift this block's sums
      if (shifted)
        for (int64_t c = 0; c < C; ++c) k[c] = static_cast<float>(acc.mean[c]);
      widest([&]() DIFFUSION_FAST_INLINE_LAMBDA {
        cl_block_moments_body(x + (n * HW + p0) * C, rows, C, shifted ? k.data() : nullptr, mu.data(), m2.data());
      });
      acc.merge(static_cast<double>(rows), mu.data(), m2.data(), C);
    }
  });
  Affine af(N * C);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      Moments m;
      for (int t = 0; t < threads; ++t) {
        const ChannelMoments& part = per_thread[t * N + n];
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) m.merge(part.n, part.mean[c], part.m2[c]);
      }
      af.set_group(m, g, cpg, eps, w, b, n * C);
    }
  }
  // positions of all samples in one range: position P (sample P / HW) is the C values at x + P * C
  at::parallel_for(0, N * HW, block, [&](int64_t begin, int64_t end) {
    widest([&]() DIFFUSION_FAST_INLINE_LAMBDA {
      for (int64_t p = begin; p < end;) {
        const int64_t n = p / HW, stop = std::min(end, (n + 1) * HW);
        const float *mean = &af.mean[n * C], *scale = &af.scale[n * C], *shift = &af.shift[n * C];
        for (; p < stop; ++p) affine_row<scalar_t, SILU, 1, STREAM>(x + p * C, y + p * C, C, mean, scale, shift);
      }
    });
    if (STREAM) streaming_stores_done();
  });
}

}  // namespace

at::Tensor group_norm_silu_cpu(const at::Tensor& x_in, int64_t num_groups, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, double eps, bool apply_silu) {
  TORCH_CHECK_TYPE(at::isFloatingType(x_in.scalar_type()), message("x must be a floating-point tensor, got ",
                                                                   x_in.scalar_type()));
  TORCH_CHECK_VALUE(x_in.dim() >= 2 && x_in.numel() > 0,
                    message("x must be a non-empty (N, C, *spatial) tensor, got shape ", x_in.sizes()));
  const int64_t N = x_in.size(0), C = x_in.size(1);
  TORCH_CHECK_VALUE(num_groups > 0 && C % num_groups == 0, message("num_groups=", num_groups,
                    " must be positive and divide the channel count ", C, " of x"));
  TORCH_CHECK_VALUE(eps > 0, message("eps must be > 0, got ", eps));
  at::Tensor w, b;
  if (weight.has_value()) {
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == C,
                      message("weight must have ", C, " elements, got shape ", weight->sizes()));
    // a meta weight (sequential CPU offload keeps weights there between calls) would be read as garbage
    TORCH_CHECK_VALUE(weight->device() == x_in.device(), message("weight is on ", weight->device(), " but x is on ",
                      x_in.device()));
    w = weight->to(at::kFloat).contiguous();
  }
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == C, message("bias must have ", C, " elements, got shape ",
                      bias->sizes()));
    TORCH_CHECK_VALUE(bias->device() == x_in.device(), message("bias is on ", bias->device(), " but x is on ",
                                                               x_in.device()));
    b = bias->to(at::kFloat).contiguous();
  }
  if (x_in.scalar_type() == at::kDouble) {  // fp64 keeps fp64 arithmetic: ATen's GroupNorm, then SiLU in place
    at::Tensor y = at::group_norm(x_in, num_groups, w.defined() ? w.to(at::kDouble) : w,
                                  b.defined() ? b.to(at::kDouble) : b, eps);
    return apply_silu ? at::silu_(y) : y;
  }
#if !defined(DIFFUSION_FAST_FP16)
  if (x_in.scalar_type() == at::kHalf) {
    // A build without F16C has no vectorised fp16 conversion: convert with ATen's copy, run the fp32 kernel, round
    // once on the way back (the same fp32 arithmetic, at the cost of two conversion passes).
    const at::Tensor y = group_norm_silu_cpu(x_in.to(at::kFloat), num_groups, weight, bias, eps, apply_silu);
    return y.to(x_in.scalar_type());
  }
#endif
  // channels_last is read in place; any other strides are made contiguous (NCHW) first.
  const bool cl = x_in.dim() == 4 && !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = cl ? x_in : x_in.contiguous();
  at::Tensor y = at::empty_like(x);  // keeps the memory format and the dtype
  const int64_t HW = x.numel() / (N * C);
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  // fp16/bf16 stay in their storage and are converted chunk by chunk in L1 (half.h): the same fp32 arithmetic as
  // for fp32 input, with half its memory traffic.
  auto run = [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const auto* xp = static_cast<const scalar_t*>(x.data_ptr());
    auto* yp = static_cast<scalar_t*>(y.data_ptr());
    const bool stream = std::is_same_v<scalar_t, float> && y.nbytes() >= kStreamBytes;
    if (cl && apply_silu && stream) channels_last<scalar_t, true, true>(xp, yp, wp, bp, N, C, HW, num_groups, eps);
    else if (cl && apply_silu) channels_last<scalar_t, true, false>(xp, yp, wp, bp, N, C, HW, num_groups, eps);
    else if (cl) channels_last<scalar_t, false, false>(xp, yp, wp, bp, N, C, HW, num_groups, eps);
    else if (apply_silu && stream) nchw<scalar_t, true, true>(xp, yp, wp, bp, N, C, HW, num_groups, eps);
    else if (apply_silu) nchw<scalar_t, true, false>(xp, yp, wp, bp, N, C, HW, num_groups, eps);
    else nchw<scalar_t, false, false>(xp, yp, wp, bp, N, C, HW, num_groups, eps);
  };
  if (x.scalar_type() == at::kBFloat16) run(static_cast<bf16*>(nullptr));
#if defined(DIFFUSION_FAST_FP16)
  else if (x.scalar_type() == at::kHalf) run(static_cast<fp16*>(nullptr));
#endif
  else run(static_cast<float*>(nullptr));
  return y;
}

}  // namespace diffusion_fast
