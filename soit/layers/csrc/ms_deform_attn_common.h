// Sampling arithmetic shared by the CPU and the CUDA implementation of multi-scale
// deformable attention. Everything here is compiled both by the host compiler and by nvcc
// (host and device), so the CPU build checks the same per-sample code the GPU runs.
//
// Conventions (identical to F.grid_sample(mode="bilinear", padding_mode="zeros",
// align_corners=False) on a level of H x W pixels):
//   a location (x, y) in [0, 1] maps to the continuous pixel position
//   (w_im, h_im) = (x * W - 0.5, y * H - 0.5); the four neighbouring pixels are blended
//   bilinearly, and neighbours outside the level contribute zero.
#pragma once

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__CUDACC__)
#define SOIT_HD __host__ __device__ __forceinline__
#define SOIT_UNROLL _Pragma("unroll")
#else
#define SOIT_HD inline
#define SOIT_UNROLL
#endif

// Hook for checking the alignment of vector accesses (a misaligned one faults on the GPU); a
// no-op unless the includer defines it.
#ifndef SOIT_ASSERT_ALIGNED
#define SOIT_ASSERT_ALIGNED(ptr, bytes)
#endif

namespace soit {
namespace msda {

// Accumulation type: float for float16 / bfloat16 / float32, double for double.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_type_t = typename AccType<T>::type;

// VEC consecutive elements moved as one aligned access (up to 16 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int VEC, typename scalar_t, typename acc_t>
SOIT_HD void load_vec(const scalar_t* p, acc_t (&r)[VEC]) {
  SOIT_ASSERT_ALIGNED(p, sizeof(Pack<scalar_t, VEC>));
  const Pack<scalar_t, VEC> pk = *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
  SOIT_UNROLL
  for (int i = 0; i < VEC; ++i) r[i] = static_cast<acc_t>(pk.v[i]);
}

template <int VEC, typename scalar_t, typename acc_t>
SOIT_HD void store_vec(scalar_t* p, const acc_t (&r)[VEC]) {
  SOIT_ASSERT_ALIGNED(p, sizeof(Pack<scalar_t, VEC>));
  Pack<scalar_t, VEC> pk;
  SOIT_UNROLL
  for (int i = 0; i < VEC; ++i) pk.v[i] = static_cast<scalar_t>(r[i]);
  *reinterpret_cast<Pack<scalar_t, VEC>*>(p) = pk;
}

// dst[0:VEC] += v[0:VEC]. On the GPU this is an atomic add (several threads sample the same
// pixel); Hopper and newer add 2 or 4 floats with one instruction. On the host the caller
// guarantees exclusive access.
template <int VEC, typename acc_t>
SOIT_HD void add_vec(acc_t* dst, const acc_t (&v)[VEC]) {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 900
  constexpr bool kFloat = std::is_same<acc_t, float>::value;
  if constexpr (kFloat && VEC % 4 == 0) {
    SOIT_UNROLL
    for (int i = 0; i < VEC; i += 4)
      atomicAdd(reinterpret_cast<float4*>(dst + i), make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]));
  } else if constexpr (kFloat && VEC % 2 == 0) {
    SOIT_UNROLL
    for (int i = 0; i < VEC; i += 2) atomicAdd(reinterpret_cast<float2*>(dst + i), make_float2(v[i], v[i + 1]));
  } else {
    SOIT_UNROLL
    for (int i = 0; i < VEC; ++i) atomicAdd(dst + i, v[i]);
  }
#else
  SOIT_UNROLL
  for (int i = 0; i < VEC; ++i) atomicAdd(dst + i, v[i]);
#endif
#else
  for (int i = 0; i < VEC; ++i) dst[i] += v[i];
#endif
}

SOIT_HD float floor_(float v) {
  return floorf(v);
}
SOIT_HD double floor_(double v) {
  return ::floor(v);
}

// One bilinear sample: pixel index (y * W + x, relative to the level) of each corner, or -1
// when that corner lies outside the level, and the fractional position inside the cell.
// Corner order: (top, left), (top, right), (bottom, left), (bottom, right).
template <typename acc_t>
struct Bilinear {
  int32_t off[4];
  acc_t lh, lw;
};

// bilinear_setup from the continuous pixel position (w_im, h_im) of a level of H x W pixels.
// Returns false when no corner lies inside the level (the sample is zero, and so are its
// gradients).
template <typename acc_t>
SOIT_HD bool bilinear_setup_pixel(acc_t w_im, acc_t h_im, int H, int W, Bilinear<acc_t>& s) {
  // written so that NaN fails the test
  if (!(H > 0 && W > 0 && h_im > static_cast<acc_t>(-1) && w_im > static_cast<acc_t>(-1) &&
        h_im < static_cast<acc_t>(H) && w_im < static_cast<acc_t>(W)))
    return false;
  const acc_t hf = floor_(h_im);
  const acc_t wf = floor_(w_im);
  const int h0 = static_cast<int>(hf);
  const int w0 = static_cast<int>(wf);
  s.lh = h_im - hf;
  s.lw = w_im - wf;
  const bool top = h0 >= 0, bottom = h0 + 1 < H, left = w0 >= 0, right = w0 + 1 < W;
  s.off[0] = (top && left) ? h0 * W + w0 : -1;
  s.off[1] = (top && right) ? h0 * W + w0 + 1 : -1;
  s.off[2] = (bottom && left) ? (h0 + 1) * W + w0 : -1;
  s.off[3] = (bottom && right) ? (h0 + 1) * W + w0 + 1 : -1;
  return true;
}

// The same from a location (x, y) in [0, 1] of the level.
template <typename acc_t>
SOIT_HD bool bilinear_setup(acc_t x, acc_t y, int H, int W, Bilinear<acc_t>& s) {
  return bilinear_setup_pixel<acc_t>(x * static_cast<acc_t>(W) - static_cast<acc_t>(0.5),
                                     y * static_cast<acc_t>(H) - static_cast<acc_t>(0.5), H, W, s);
}

// Bilinear weights of the four corners (order of Bilinear::off).
template <typename acc_t>
SOIT_HD void corner_weights(const Bilinear<acc_t>& s, acc_t (&cw)[4]) {
  const acc_t hh = static_cast<acc_t>(1) - s.lh, hw = static_cast<acc_t>(1) - s.lw;
  cw[0] = hh * hw;
  cw[1] = hh * s.lw;
  cw[2] = s.lh * hw;
  cw[3] = s.lh * s.lw;
}

// Derivatives of the corner weights with respect to h_im (dh) and w_im (dw).
template <typename acc_t>
SOIT_HD void corner_weight_derivatives(const Bilinear<acc_t>& s, acc_t (&dh)[4], acc_t (&dw)[4]) {
  const acc_t hh = static_cast<acc_t>(1) - s.lh, hw = static_cast<acc_t>(1) - s.lw;
  dh[0] = -hw;
  dh[1] = -s.lw;
  dh[2] = hw;
  dh[3] = s.lw;
  dw[0] = -hh;
  dw[1] = hh;
  dw[2] = -s.lh;
  dw[3] = s.lh;
}

// acc[0:VEC] += aw * bilinear(v) for the VEC channels at v (v points at channel c of pixel 0 of
// the level for this (value map, head); consecutive pixels are `stride` elements apart).
template <int VEC, typename scalar_t, typename acc_t>
SOIT_HD void sample_forward(const scalar_t* v, int stride, const Bilinear<acc_t>& s, acc_t aw, acc_t (&acc)[VEC]) {
  acc_t cw[4];
  corner_weights(s, cw);
  SOIT_UNROLL
  for (int k = 0; k < 4; ++k) {
    if (s.off[k] >= 0) {
      acc_t x[VEC];
      load_vec<VEC>(v + static_cast<int64_t>(s.off[k]) * stride, x);
      const acc_t wk = aw * cw[k];
      SOIT_UNROLL
      for (int i = 0; i < VEC; ++i) acc[i] += wk * x[i];
    }
  }
}

// Backward of one sample for VEC channels. Adds aw * (corner weight) * go into the value
// gradient (gv, same indexing as v), and accumulates the channel sums the location and weight
// gradients need:
//   g_aw += sum_c go_c * bilinear(v)_c
//   g_h  += sum_c go_c * d bilinear(v)_c / d h_im     (times aw * H gives d/dy)
//   g_w  += sum_c go_c * d bilinear(v)_c / d w_im     (times aw * W gives d/dx)
template <int VEC, typename scalar_t, typename acc_t>
SOIT_HD void sample_backward(const scalar_t* v, acc_t* gv, int stride, const Bilinear<acc_t>& s, acc_t aw,
                             const acc_t (&go)[VEC], acc_t& g_aw, acc_t& g_h, acc_t& g_w) {
  acc_t cw[4], dh[4], dw[4];
  corner_weights(s, cw);
  corner_weight_derivatives(s, dh, dw);
  SOIT_UNROLL
  for (int k = 0; k < 4; ++k) {
    if (s.off[k] >= 0) {
      const int64_t o = static_cast<int64_t>(s.off[k]) * stride;
      acc_t x[VEC];
      load_vec<VEC>(v + o, x);
      acc_t dot = 0;
      SOIT_UNROLL
      for (int i = 0; i < VEC; ++i) dot += go[i] * x[i];
      g_aw += cw[k] * dot;
      g_h += dh[k] * dot;
      g_w += dw[k] * dot;
      const acc_t wk = aw * cw[k];
      acc_t add[VEC];
      SOIT_UNROLL
      for (int i = 0; i < VEC; ++i) add[i] = wk * go[i];
      add_vec<VEC>(gv + o, add);
    }
  }
}

// ---- launch shape, shared by both implementations ----

// Channels handled by one lane: the widest access (at most 16 bytes) that divides D and keeps
// every pointer aligned. The widths instantiated are 8 (16-bit types only), 4 (32-bit types
// only), 2 and 1; a 16-bit head of 4 channels uses 2.
inline int choose_vec(int64_t D, int64_t elem_size, std::initializer_list<const void*> ptrs) {
  for (int v : {8, 4, 2}) {
    if (v * elem_size > 16 || D % v != 0 || (v == 4 && elem_size != 4)) continue;
    bool aligned = true;
    for (const void* p : ptrs) aligned = aligned && (reinterpret_cast<uintptr_t>(p) % (v * elem_size) == 0);
    if (aligned) return v;
  }
  return 1;
}

// Lanes sharing one (query, head): enough to cover D channels with VEC each, a power of two,
// at most a warp. Wider heads loop over chunks of group * VEC channels.
inline int choose_group(int64_t D, int vec) {
  const int64_t lanes = (D + vec - 1) / vec;
  int g = 1;
  while (g < lanes && g < 32) g *= 2;
  return g;
}

// Calls f(std::integral_constant<int, VEC>) for a width returned by choose_vec.
template <typename scalar_t, typename F>
void dispatch_vec(int vec, F&& f) {
  if constexpr (sizeof(scalar_t) == 2) {
    if (vec == 8) return f(std::integral_constant<int, 8>());
  }
  if constexpr (sizeof(scalar_t) == 4) {
    if (vec == 4) return f(std::integral_constant<int, 4>());
  }
  if (vec == 2) return f(std::integral_constant<int, 2>());
  return f(std::integral_constant<int, 1>());
}

}  // namespace msda
}  // namespace soit
