// Multi-scale deformable attention on the CPU.
//
// Laid out for the CPU rather than after the GPU's lanes: for each (query, head) every sampling
// point's bilinear corners and weights are computed once (bilinear_setup_pixel, shared with the
// CUDA kernels; the pixel position is computed with grid_sample's arithmetic, so that the
// results match the PyTorch path to the last bits wherever they can), then all D channels of
// the head are accumulated in contiguous loops the compiler vectorises (value is (B, S, M, D):
// a pixel's D channels of one head are adjacent).
//
// Work split:
//   forward   parallel over (image, query) pairs; each writes its own output row.
//   backward  parallel over (value map, head) pairs; each owns that head's slice of the value
//             gradient, and every location / weight gradient belongs to exactly one head, so no
//             two threads write the same element: no atomics, no per-thread buffers, and the
//             result does not depend on the number of threads (every sum runs in a fixed order).
// Instruction sets: the loops (ms_deform_attn_cpu_kernels.h) are compiled twice with GCC on x86,
// for the baseline and for AVX2 + FMA, and the AVX2 copy runs where the CPU has it (about twice
// as fast at D = 32); other compilers and machines build the baseline copy only.
// The OpenMP pragmas (parallel_for's backend and `omp simd`) need -fopenmp, which setup.py
// passes on Linux; without it the same code runs on one thread.
// per-operator headers rather than ATen.h: half the compile time
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_common.h"

#if defined(_OPENMP)
#define SOIT_PRAGMA(x) _Pragma(#x)
#define SOIT_SIMD SOIT_PRAGMA(omp simd)
// a vectorised loop that also sums into the listed variables
#define SOIT_SIMD_SUM(...) SOIT_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#else
#define SOIT_SIMD
#define SOIT_SIMD_SUM(...)
#endif

namespace soit {
// level l is H[l] x W[l] pixels starting at value token start[l]
struct CpuLevels {
  const int* H;
  const int* W;
  const int64_t* start;
};

// the baseline copy
#define SOIT_CPU_NAMESPACE cpu_baseline
#include "ms_deform_attn_cpu_kernels.h"
#undef SOIT_CPU_NAMESPACE
}  // namespace soit

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SOIT_CPU_AVX2 1
// everything this copy calls from a header was compiled above or in the headers for the
// baseline; only the functions defined between push and pop use AVX2 + FMA
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace soit {
#define SOIT_CPU_NAMESPACE cpu_avx2
#include "ms_deform_attn_cpu_kernels.h"
#undef SOIT_CPU_NAMESPACE
}  // namespace soit
#pragma GCC pop_options
#endif

namespace soit {

namespace {

using namespace msda;

// Calls run(kernel) with the copy K's forward (or backward) for these types; for float32 the
// channel counts SOIT uses (32 in the encoder and decoder, 2 in the mask head) are fixed at
// compile time, so that their loops unroll completely.
template <typename K, bool kBackward, typename scalar_t, typename coord_t, typename Run>
void run_kernel(int64_t D, Run&& run) {
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (D == 32) return run(K::template get<kBackward, scalar_t, coord_t, 32>());
    if (D == 2) return run(K::template get<kBackward, scalar_t, coord_t, 2>());
  }
  run(K::template get<kBackward, scalar_t, coord_t, 0>());
}

bool use_avx2() {
#ifdef SOIT_CPU_AVX2
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// The level sizes and starts of one call (the kernels read them through plain pointers).
struct LevelTable {
  std::vector<int> H, W;
  std::vector<int64_t> start;
};

LevelTable read_levels(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, const MSDAShape& d) {
  LevelTable lv;
  const int64_t* sh = spatial_shapes.data_ptr<int64_t>();
  const int64_t* st = level_start_index.data_ptr<int64_t>();
  for (int64_t l = 0; l < d.L; ++l) {
    const int64_t H = sh[2 * l], W = sh[2 * l + 1], s0 = st[l];
    TORCH_CHECK(H >= 0 && W >= 0 && s0 >= 0 && s0 + H * W <= d.S, "ms_deform_attn: level ", l, " (", H, " x ", W,
                " starting at ", s0, ") does not fit in the ", d.S, " value tokens");
    lv.H.push_back(static_cast<int>(H));
    lv.W.push_back(static_cast<int>(W));
    lv.start.push_back(s0);
  }
  return lv;
}

const int64_t* checked_value_index(const std::optional<at::Tensor>& value_index, const MSDAShape& d) {
  if (!value_index.has_value()) return nullptr;
  const at::Tensor& vi = *value_index;
  if (vi.numel() > 0) {
    TORCH_CHECK(vi.min().item<int64_t>() >= 0 && vi.max().item<int64_t>() < d.B,
                "ms_deform_attn: value_index out of range [0, ", d.B, ")");
  }
  return vi.data_ptr<int64_t>();
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights, const std::optional<at::Tensor>& value_index,
                                      const MSDAShape& d, const std::optional<at::Tensor>& reference_points) {
  if (d.N * d.Lq * d.M == 0 || d.D == 0) return at::zeros({d.N, d.Lq, d.M * d.D}, value.options());
  // every element is written below
  at::Tensor out = at::empty({d.N, d.Lq, d.M * d.D}, value.options());
  const LevelTable table = read_levels(spatial_shapes, level_start_index, d);
  const CpuLevels lv{table.H.data(), table.W.data(), table.start.data()};
  const int64_t* vindex = checked_value_index(value_index, d);
  dispatch_types(value.scalar_type(), sampling_locations.scalar_type(), [&](auto s_tag, auto c_tag) {
    using scalar_t = decltype(s_tag);
    using coord_t = decltype(c_tag);
    auto run = [&](auto kernel) {
      const coord_t* ref = reference_points.has_value() ? reference_points->data_ptr<coord_t>() : nullptr;
      kernel(value.data_ptr<scalar_t>(), sampling_locations.data_ptr<coord_t>(), attention_weights.data_ptr<coord_t>(),
             vindex, ref, out.data_ptr<scalar_t>(), d, lv);
    };
#ifdef SOIT_CPU_AVX2
    if (use_avx2()) return run_kernel<cpu_avx2::Kernels, false, scalar_t, coord_t>(d.D, run);
#endif
    run_kernel<cpu_baseline::Kernels, false, scalar_t, coord_t>(d.D, run);
  });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_backward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                    const at::Tensor& level_start_index,
                                                    const at::Tensor& sampling_locations,
                                                    const at::Tensor& attention_weights,
                                                    const std::optional<at::Tensor>& value_index,
                                                    const at::Tensor& grad_output, const MSDAShape& d) {
  const auto acc_type = at::toOpMathType(value.scalar_type());
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  if (d.N * d.Lq * d.M == 0 || d.D == 0)
    return {grad_value.to(value.scalar_type()), at::zeros_like(sampling_locations), at::zeros_like(attention_weights)};
  // the kernel writes every location and weight gradient (each group belongs to one value map)
  at::Tensor grad_loc = at::empty_like(sampling_locations);
  at::Tensor grad_attw = at::empty_like(attention_weights);
  {
    const LevelTable table = read_levels(spatial_shapes, level_start_index, d);
    const CpuLevels lv{table.H.data(), table.W.data(), table.start.data()};
    const int64_t* vindex = checked_value_index(value_index, d);
    dispatch_types(value.scalar_type(), sampling_locations.scalar_type(), [&](auto s_tag, auto c_tag) {
      using scalar_t = decltype(s_tag);
      using coord_t = decltype(c_tag);
      using acc_t = acc_type_t<scalar_t>;
      auto run = [&](auto kernel) {
        kernel(value.data_ptr<scalar_t>(), sampling_locations.data_ptr<coord_t>(),
               attention_weights.data_ptr<coord_t>(), vindex, grad_output.data_ptr<scalar_t>(),
               grad_value.data_ptr<acc_t>(), grad_loc.data_ptr<coord_t>(), grad_attw.data_ptr<coord_t>(), d, lv);
      };
#ifdef SOIT_CPU_AVX2
      if (use_avx2()) return run_kernel<cpu_avx2::Kernels, true, scalar_t, coord_t>(d.D, run);
#endif
      run_kernel<cpu_baseline::Kernels, true, scalar_t, coord_t>(d.D, run);
    });
  }
  if (grad_value.scalar_type() != value.scalar_type()) grad_value = grad_value.to(value.scalar_type());
  return {grad_value, grad_loc, grad_attw};
}

at::Tensor mask_head_sample_cpu(const at::Tensor& offsets, const at::Tensor& logits, const at::Tensor& value,
                                const at::Tensor& batch_index, int64_t H, int64_t W) {
  const int64_t n = offsets.size(0), M = value.size(2), Dh = value.size(3), K = logits.size(2) / M;
  at::Tensor out = at::empty({n, H * W, M * Dh}, value.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "mask_head_sample", [&] {
    // float32 with 2 channels per head (SOIT's C = 8, M = 4) fixed at compile time, as in the forward
    const bool two = std::is_same<scalar_t, float>::value && Dh == 2;
    auto kernel = two ? cpu_baseline::Kernels::mask_head<scalar_t, 2>() : cpu_baseline::Kernels::mask_head<scalar_t, 0>();
#ifdef SOIT_CPU_AVX2
    if (use_avx2())
      kernel = two ? cpu_avx2::Kernels::mask_head<scalar_t, 2>() : cpu_avx2::Kernels::mask_head<scalar_t, 0>();
#endif
    kernel(offsets.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
           batch_index.data_ptr<int64_t>(), n, M, K, Dh, H, W, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace soit
