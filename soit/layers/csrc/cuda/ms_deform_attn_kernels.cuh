// The CUDA kernels of multi-scale deformable attention and their launch shape (launched from
// ms_deform_attn_forward.cu / ms_deform_attn_backward.cu). This header needs nothing but the
// CUDA built-ins, ms_deform_attn_common.h and ms_deform_attn_launch.h.
//
// Work split (both directions): one "item" is one (group n, query q, head m); items are numbered
// in the memory order of sampling_locations, item = (n * Lq + q) * M + m. A group of `group`
// consecutive lanes (a power of two, at most a warp) owns an item; each lane handles VEC
// consecutive channels with one vector access (16 bytes at most) and loops when the head has
// more than group * VEC channels. A block of kThreads threads owns kThreads / group consecutive
// items, so their locations and weights form one contiguous range that the block stages in
// shared memory with coalesced loads (in tiles of `tile` samples per item when L * P is large).
// Every thread of a block runs the same loops (tiles, samples, channel chunks), whether or not
// it owns an item: the barriers and the shuffles need it.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "../ms_deform_attn_common.h"
#include "ms_deform_attn_launch.h"

// Dynamic shared memory of a block.
#ifndef SOIT_DYNAMIC_SHARED
#define SOIT_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace soit {
namespace msda {

constexpr int kThreads = 256;
// Shared memory a block may use for staged locations / weights (and their gradients): one tile
// holds all samples at SOIT's shapes (16 per item with 4 or 8 lanes per item, 4 with one lane),
// and seven 256-thread blocks still fit on a Hopper multiprocessor.
constexpr int kSmemBudget = 32 * 1024;

// Calls f(scalar_t(), coord_t()) with the C++ types of the value and of the locations / weights
// (coord_t is scalar_t, or float for a float16 / bfloat16 value). Returns false for an unknown
// combination.
template <typename F>
bool dispatch_dtypes(DType value_type, DType coord_type, F&& f) {
  const bool float_coord = coord_type == DType::kFloat;
  switch (value_type) {
    case DType::kFloat:
      if (!float_coord) return false;
      f(float(), float());
      return true;
    case DType::kDouble:
      if (coord_type != DType::kDouble) return false;
      f(double(), double());
      return true;
    case DType::kHalf:
      if (float_coord)
        f(c10::Half(), float());
      else if (coord_type == DType::kHalf)
        f(c10::Half(), c10::Half());
      else
        return false;
      return true;
    case DType::kBFloat16:
      if (float_coord)
        f(c10::BFloat16(), float());
      else if (coord_type == DType::kBFloat16)
        f(c10::BFloat16(), c10::BFloat16());
      else
        return false;
      return true;
  }
  return false;
}

// Staged layout: item `it` of the block keeps its (x, y) pairs in row it of s_loc and its weights
// in row it of s_w. The row strides are odd, so that the items of one warp, which read the same
// sample index at the same time, hit different shared-memory banks.
__host__ __device__ __forceinline__ int loc_stride(int tile) {
  return 2 * tile + 1;
}
__host__ __device__ __forceinline__ int w_stride(int tile) {
  return tile | 1;
}

// Bytes of shared memory a block uses: `copies` pairs of (locations, weights) arrays (1 in the
// forward; 2 in the backward, for their gradients) and the level table.
inline size_t smem_bytes(int items_per_block, int tile, int copies, int acc_size, int L) {
  return static_cast<size_t>(items_per_block) * (loc_stride(tile) + w_stride(tile)) * copies * acc_size +
         3 * sizeof(int) * static_cast<size_t>(L);
}

// Samples per item staged at once: all of them when the staging buffers fit kSmemBudget.
inline int choose_tile(int LP, int items_per_block, int copies, int acc_size) {
  auto bytes = [&](int t) {
    return static_cast<size_t>(items_per_block) * (loc_stride(t) + w_stride(t)) * copies * acc_size;
  };
  int t = std::max(1, LP);
  if (bytes(t) > static_cast<size_t>(kSmemBudget)) {
    t = std::max(1, static_cast<int>(kSmemBudget / (static_cast<size_t>(items_per_block) * copies * acc_size) - 2) / 3);
    while (t > 1 && bytes(t) > static_cast<size_t>(kSmemBudget)) --t;
  }
  return std::min(t, std::max(1, LP));
}

// (H, W, start) of every level into shared memory; the caller synchronises afterwards.
__device__ __forceinline__ void load_levels(const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                                            const KernelDims& d, int* s_lvl) {
  for (int i = threadIdx.x; i < d.L; i += blockDim.x) {
    const int64_t H = shapes[2 * i], W = shapes[2 * i + 1], s0 = starts[i];
    CUDA_KERNEL_ASSERT(H >= 0 && W >= 0 && s0 >= 0 && s0 + H * W <= d.S);
    s_lvl[3 * i] = static_cast<int>(H);
    s_lvl[3 * i + 1] = static_cast<int>(W);
    s_lvl[3 * i + 2] = static_cast<int>(s0);
  }
}

// Copies samples [t0, t0 + nt) of the block's items (item0 .. item0 + nblk - 1) into shared
// memory. Consecutive threads read consecutive elements: one contiguous range when the tile
// holds all samples, runs of 2 * nt (locations) and nt (weights) elements otherwise.
template <typename coord_t, typename acc_t>
__device__ __forceinline__ void stage_tile(const coord_t* __restrict__ loc, const coord_t* __restrict__ attw,
                                           acc_t* s_loc, acc_t* s_w, int64_t item0, int nblk, int LP, int t0, int nt,
                                           int tile) {
  const int rl = loc_stride(tile), rw = w_stride(tile);
  const int row2 = 2 * nt;
  const coord_t* lsrc = loc + (item0 * LP + t0) * 2;
  for (int i = threadIdx.x; i < nblk * row2; i += blockDim.x) {
    const int it = i / row2, r = i - it * row2;
    s_loc[it * rl + r] = static_cast<acc_t>(lsrc[static_cast<int64_t>(it) * LP * 2 + r]);
  }
  const coord_t* wsrc = attw + item0 * LP + t0;
  for (int i = threadIdx.x; i < nblk * nt; i += blockDim.x) {
    const int it = i / nt, r = i - it * nt;
    s_w[it * rw + r] = static_cast<acc_t>(wsrc[static_cast<int64_t>(it) * LP + r]);
  }
}

// The reverse of stage_tile, for the gradients of the locations and weights.
template <typename coord_t, typename acc_t>
__device__ __forceinline__ void unstage_tile(coord_t* __restrict__ grad_loc, coord_t* __restrict__ grad_attw,
                                             const acc_t* s_gloc, const acc_t* s_gw, int64_t item0, int nblk, int LP,
                                             int t0, int nt, int tile) {
  const int rl = loc_stride(tile), rw = w_stride(tile);
  const int row2 = 2 * nt;
  coord_t* ldst = grad_loc + (item0 * LP + t0) * 2;
  for (int i = threadIdx.x; i < nblk * row2; i += blockDim.x) {
    const int it = i / row2, r = i - it * row2;
    ldst[static_cast<int64_t>(it) * LP * 2 + r] = static_cast<coord_t>(s_gloc[it * rl + r]);
  }
  coord_t* wdst = grad_attw + item0 * LP + t0;
  for (int i = threadIdx.x; i < nblk * nt; i += blockDim.x) {
    const int it = i / nt, r = i - it * nt;
    wdst[static_cast<int64_t>(it) * LP + r] = static_cast<coord_t>(s_gw[it * rw + r]);
  }
}

// Sum over the `group` lanes that own one item (group is a power of two <= 32 and every lane of
// the warp calls this). Afterwards every lane of the group holds the total.
template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, int group) {
  for (int off = group >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off, group);
  return v;
}

// Launch shape of one call, computed on the host.
struct LaunchConfig {
  int vec;              // channels per lane and access
  int group;            // lanes per item
  int items_per_block;  // kThreads / group
  int tile;             // samples per item staged at once
  size_t smem;          // dynamic shared memory, bytes
  int64_t blocks;
};

// `copies`: 1 for the forward, 2 for the backward (gradients of the staged arrays). `ptrs`: the
// value-like tensors accessed VEC channels at a time, whose alignment bounds VEC.
inline LaunchConfig make_config(const KernelDims& d, int elem_size, int acc_size, int copies,
                                std::initializer_list<const void*> ptrs) {
  LaunchConfig c;
  c.vec = choose_vec(d.D, elem_size, ptrs);
  c.group = choose_group(d.D, c.vec);
  c.items_per_block = kThreads / c.group;
  c.tile = choose_tile(d.LP, c.items_per_block, copies, acc_size);
  c.smem = smem_bytes(c.items_per_block, c.tile, copies, acc_size, d.L);
  c.blocks = (d.num_items + c.items_per_block - 1) / c.items_per_block;
  return c;
}

// out[item, c] = sum over levels and points of weight * bilinear(value[b, level, m], location)[c],
// accumulated in acc_t (float for float16 / bfloat16 / float32).
template <typename scalar_t, typename coord_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                   const int64_t* __restrict__ starts, const coord_t* __restrict__ loc,
                   const coord_t* __restrict__ attw, const int64_t* __restrict__ vindex, scalar_t* __restrict__ out,
                   const KernelDims d, const int group, const int tile) {
  using acc_t = acc_type_t<scalar_t>;
  SOIT_DYNAMIC_SHARED(smem_raw);
  const int ipb = blockDim.x / group;
  const int rl = loc_stride(tile), rw = w_stride(tile);
  acc_t* s_loc = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* s_w = s_loc + ipb * rl;
  int* s_lvl = reinterpret_cast<int*>(s_w + ipb * rw);

  load_levels(shapes, starts, d, s_lvl);

  const int64_t item0 = static_cast<int64_t>(blockIdx.x) * ipb;
  const int nblk = static_cast<int>(min(static_cast<int64_t>(ipb), d.num_items - item0));
  const int li = threadIdx.x / group;
  const int lane = threadIdx.x - li * group;
  const bool active = li < nblk;

  const scalar_t* vbase = value;
  scalar_t* obase = out;
  if (active) {
    const int64_t item = item0 + li;
    const int m = static_cast<int>(item % d.M);
    const int64_t n = item / d.MLq;
    const int64_t b = vindex != nullptr ? vindex[n] : n;
    CUDA_KERNEL_ASSERT(b >= 0 && b < d.B);
    vbase = value + (b * d.S * d.M + m) * d.D;
    obase = out + item * d.D;
  }

  const int cstride = group * VEC;
  for (int c0 = 0; c0 < d.D; c0 += cstride) {
    const int c = c0 + lane * VEC;
    const bool work = active && c < d.D;
    acc_t acc[VEC];
    SOIT_UNROLL
    for (int i = 0; i < VEC; ++i) acc[i] = 0;
    for (int t0 = 0; t0 < d.LP; t0 += tile) {
      const int nt = min(tile, d.LP - t0);
      __syncthreads();  // levels loaded / previous tile consumed
      stage_tile(loc, attw, s_loc, s_w, item0, nblk, d.LP, t0, nt, tile);
      __syncthreads();
      if (work) {
        const acc_t* my_loc = s_loc + li * rl;
        const acc_t* my_w = s_w + li * rw;
        int l = t0 / d.P, p = t0 - l * d.P;  // level and point of sample t0 + k
        for (int k = 0; k < nt; ++k) {
          const int H = s_lvl[3 * l], W = s_lvl[3 * l + 1], start = s_lvl[3 * l + 2];
          Bilinear<acc_t> s;
          if (bilinear_setup<acc_t>(my_loc[2 * k], my_loc[2 * k + 1], H, W, s))
            sample_forward<VEC>(vbase + static_cast<int64_t>(start) * d.MD + c, d.MD, s, my_w[k], acc);
          if (++p == d.P) {
            p = 0;
            ++l;
          }
        }
      }
    }
    if (work) store_vec<VEC>(obase + c, acc);
  }
}

// Backward. Each (item, level, point) gradient of the locations and weights is owned by the
// lanes of one item: every lane sums its channels, a butterfly over the group's lanes (warp
// shuffles) adds the lanes up, and the result goes to shared memory and then, coalesced, to
// global memory: no atomics for them. Only the value gradient needs atomics (one vector atomic
// per corner and lane on Hopper), into an accumulation buffer in float (double for a double
// value) that the launcher casts to value's dtype.
template <typename scalar_t, typename coord_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                    const int64_t* __restrict__ starts, const coord_t* __restrict__ loc,
                    const coord_t* __restrict__ attw, const int64_t* __restrict__ vindex,
                    const scalar_t* __restrict__ grad_out, acc_type_t<scalar_t>* __restrict__ grad_value,
                    coord_t* __restrict__ grad_loc, coord_t* __restrict__ grad_attw, const KernelDims d,
                    const int group, const int tile) {
  using acc_t = acc_type_t<scalar_t>;
  SOIT_DYNAMIC_SHARED(smem_raw);
  const int ipb = blockDim.x / group;
  const int rl = loc_stride(tile), rw = w_stride(tile);
  acc_t* s_loc = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* s_w = s_loc + ipb * rl;
  acc_t* s_gloc = s_w + ipb * rw;
  acc_t* s_gw = s_gloc + ipb * rl;
  int* s_lvl = reinterpret_cast<int*>(s_gw + ipb * rw);

  load_levels(shapes, starts, d, s_lvl);

  const int64_t item0 = static_cast<int64_t>(blockIdx.x) * ipb;
  const int nblk = static_cast<int>(min(static_cast<int64_t>(ipb), d.num_items - item0));
  const int li = threadIdx.x / group;
  const int lane = threadIdx.x - li * group;
  const bool active = li < nblk;

  const scalar_t* vbase = value;
  acc_t* gvbase = grad_value;
  const scalar_t* gobase = grad_out;
  if (active) {
    const int64_t item = item0 + li;
    const int m = static_cast<int>(item % d.M);
    const int64_t n = item / d.MLq;
    const int64_t b = vindex != nullptr ? vindex[n] : n;
    CUDA_KERNEL_ASSERT(b >= 0 && b < d.B);
    vbase = value + (b * d.S * d.M + m) * d.D;
    gvbase = grad_value + (b * d.S * d.M + m) * d.D;
    gobase = grad_out + item * d.D;
  }

  // Usually a lane has a single chunk of VEC channels: keep its output gradient in registers.
  const int cstride = group * VEC;
  const bool single_chunk = cstride >= d.D;
  const int c_first = lane * VEC;
  acc_t go0[VEC];
  SOIT_UNROLL
  for (int i = 0; i < VEC; ++i) go0[i] = 0;
  if (single_chunk && active && c_first < d.D) load_vec<VEC>(gobase + c_first, go0);

  for (int t0 = 0; t0 < d.LP; t0 += tile) {
    const int nt = min(tile, d.LP - t0);
    __syncthreads();  // levels loaded / previous tile written back
    stage_tile(loc, attw, s_loc, s_w, item0, nblk, d.LP, t0, nt, tile);
    __syncthreads();
    int l = t0 / d.P, p = t0 - l * d.P;  // level and point of sample t0 + k
    for (int k = 0; k < nt; ++k) {  // the same trip count for every lane: the shuffles below need it
      const int H = s_lvl[3 * l], W = s_lvl[3 * l + 1], start = s_lvl[3 * l + 2];
      if (++p == d.P) {
        p = 0;
        ++l;
      }
      acc_t aw = 0, g_aw = 0, g_h = 0, g_w = 0;
      Bilinear<acc_t> s;
      bool inside = false;
      if (active) {
        aw = s_w[li * rw + k];
        inside = bilinear_setup<acc_t>(s_loc[li * rl + 2 * k], s_loc[li * rl + 2 * k + 1], H, W, s);
      }
      if (inside) {
        const int64_t lvl = static_cast<int64_t>(start) * d.MD;
        if (single_chunk) {
          if (c_first < d.D)
            sample_backward<VEC>(vbase + lvl + c_first, gvbase + lvl + c_first, d.MD, s, aw, go0, g_aw, g_h, g_w);
        } else {
          for (int c = c_first; c < d.D; c += cstride) {
            acc_t go[VEC];
            load_vec<VEC>(gobase + c, go);
            sample_backward<VEC>(vbase + lvl + c, gvbase + lvl + c, d.MD, s, aw, go, g_aw, g_h, g_w);
          }
        }
      }
      g_aw = group_sum(g_aw, group);
      g_h = group_sum(g_h, group);
      g_w = group_sum(g_w, group);
      if (active && lane == 0) {
        s_gw[li * rw + k] = g_aw;
        s_gloc[li * rl + 2 * k] = aw * g_w * static_cast<acc_t>(W);
        s_gloc[li * rl + 2 * k + 1] = aw * g_h * static_cast<acc_t>(H);
      }
    }
    __syncthreads();
    unstage_tile(grad_loc, grad_attw, s_gloc, s_gw, item0, nblk, d.LP, t0, nt, tile);
  }
}

}  // namespace msda
}  // namespace soit
