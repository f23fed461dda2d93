// Runs the CUDA kernels of soit/layers/csrc/cuda/ms_deform_attn_kernels.cuh on the CPU, so that
// machines without a GPU test their indexing, shared-memory staging, tiling, lane split and
// warp reductions.
//
// Every thread of a block is an OS thread. __syncthreads() is a barrier over the block and each
// warp shuffle is a pair of barriers over the warp's 32 threads: a thread that skips a barrier
// its neighbours reach (divergent control flow around __syncthreads or a full-mask shuffle)
// makes the barrier time out, which is reported as an error. Shared memory starts filled with
// NaNs, atomics are real atomics, and vector accesses are checked for alignment. Launch shapes
// come from the same make_config the CUDA launchers use.
//
// Built by tests/layers/test_ms_deform_attn_emulated.py with the host compiler; called through
// ctypes (a C interface: no Python or torch libraries are linked).

// c10 headers first, while __CUDA_ARCH__ is still undefined (they must see a host compile).
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

// ---- CUDA built-ins -------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
// The kernels take the Hopper paths (vector atomics).
#define __CUDA_ARCH__ 900

struct Dim3 {
  unsigned x = 0, y = 1, z = 1;
};
thread_local Dim3 threadIdx, blockIdx, blockDim;

struct float2 {
  float x, y;
};
struct float4 {
  float x, y, z, w;
};
inline float2 make_float2(float x, float y) {
  return {x, y};
}
inline float4 make_float4(float x, float y, float z, float w) {
  return {x, y, z, w};
}

template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}

namespace emu {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A reusable barrier for n threads. It gives up when the block has failed (a thread threw) or
// after a timeout, which means some thread never arrives.
class Barrier {
 public:
  Barrier(int n, const std::atomic<bool>* aborted) : n_(n), aborted_(aborted) {}
  void wait(const char* what) {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++count_ == n_) {
      count_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    const bool done = cv_.wait_for(lock, std::chrono::seconds(10), [&] { return generation_ != generation || *aborted_; });
    if (*aborted_) throw Error("aborted");
    if (!done) throw Error(std::string(what) + ": not every thread arrived (divergent control flow)");
  }
  void wake() {
    std::lock_guard<std::mutex> lock(mutex_);
    cv_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  uint64_t generation_ = 0;
  const std::atomic<bool>* aborted_;
};

struct Block {
  Block(int threads, size_t smem) : sync(threads, &aborted), exchange(threads), shared(smem / 4 + 8) {
    for (int w = 0; w < threads / 32; ++w) warp_sync.emplace_back(new Barrier(32, &aborted));
    // NaN everywhere: reading a shared value nobody wrote shows up in the results
    std::fill(shared.begin(), shared.end(), std::numeric_limits<float>::quiet_NaN());
  }
  std::atomic<bool> aborted{false};
  Barrier sync;
  std::vector<std::unique_ptr<Barrier>> warp_sync;
  std::vector<uint64_t> exchange;
  std::vector<float> shared;  // float-aligned storage; aligned to 16 bytes at launch
  std::mutex error_mutex;
  std::string error;
  // The first error is kept; threads waiting at a barrier give up.
  void fail(const std::string& what) {
    {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (error.empty() && what != "aborted") error = what;
    }
    aborted = true;
    sync.wake();
    for (auto& b : warp_sync) b->wake();
  }
};

thread_local Block* tl_block = nullptr;
thread_local unsigned char* tl_shared = nullptr;

inline void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0)
    throw Error("misaligned vector access of " + std::to_string(bytes) + " bytes");
}

}  // namespace emu

inline void __syncthreads() {
  emu::tl_block->sync.wait("__syncthreads");
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a wide type");
  if (mask != 0xffffffffu) throw emu::Error("shuffle with a partial mask");
  emu::Block& b = *emu::tl_block;
  const int t = static_cast<int>(threadIdx.x), lane = t & 31, warp = t >> 5;
  std::memcpy(&b.exchange[t], &v, sizeof(T));
  b.warp_sync[warp]->wait("__shfl_xor_sync");
  int src = lane ^ lane_mask;
  if (src / width != lane / width) src = lane;  // outside the segment: own value
  T r;
  std::memcpy(&r, &b.exchange[warp * 32 + src], sizeof(T));
  b.warp_sync[warp]->wait("__shfl_xor_sync");
  return r;
}

inline float atomicAdd(float* p, float v) {
  return std::atomic_ref<float>(*p).fetch_add(v);
}
inline double atomicAdd(double* p, double v) {
  return std::atomic_ref<double>(*p).fetch_add(v);
}
inline float2 atomicAdd(float2* p, float2 v) {
  emu::check_aligned(p, 8);
  float* f = reinterpret_cast<float*>(p);
  return {atomicAdd(f, v.x), atomicAdd(f + 1, v.y)};
}
inline float4 atomicAdd(float4* p, float4 v) {
  emu::check_aligned(p, 16);
  float* f = reinterpret_cast<float*>(p);
  return {atomicAdd(f, v.x), atomicAdd(f + 1, v.y), atomicAdd(f + 2, v.z), atomicAdd(f + 3, v.w)};
}

#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) \
  if (!(cond)) throw emu::Error("device assertion failed: " #cond)
#define SOIT_ASSERT_ALIGNED(ptr, bytes) emu::check_aligned(ptr, bytes)
#define SOIT_DYNAMIC_SHARED(name) unsigned char* name = emu::tl_shared

#include "../../../soit/layers/csrc/cuda/ms_deform_attn_kernels.cuh"

// ---- launches -------------------------------------------------------------------------------

namespace emu {

template <typename F>
void launch(const soit::msda::LaunchConfig& cfg, F&& kernel) {
  for (int64_t bi = 0; bi < cfg.blocks; ++bi) {
    Block block(soit::msda::kThreads, cfg.smem);
    unsigned char* shared = reinterpret_cast<unsigned char*>(block.shared.data());
    shared += (16 - reinterpret_cast<uintptr_t>(shared) % 16) % 16;
    std::vector<std::thread> threads;
    threads.reserve(soit::msda::kThreads);
    for (int t = 0; t < soit::msda::kThreads; ++t) {
      threads.emplace_back([&, t] {
        threadIdx.x = t;
        blockIdx.x = static_cast<unsigned>(bi);
        blockDim.x = soit::msda::kThreads;
        tl_block = &block;
        tl_shared = shared;
        try {
          kernel();
        } catch (const std::exception& e) {
          block.fail(e.what());
        }
      });
    }
    for (auto& th : threads) th.join();
    if (!block.error.empty()) throw Error("block " + std::to_string(bi) + ": " + block.error);
  }
}

soit::msda::KernelDims dims(int64_t B, int64_t S, int64_t M, int64_t D, int64_t N, int64_t Lq, int64_t L,
                            int64_t P) {
  soit::msda::KernelDims d;
  d.num_items = N * Lq * M;
  d.B = B;
  d.MLq = M * Lq;
  d.S = static_cast<int>(S);
  d.M = static_cast<int>(M);
  d.D = static_cast<int>(D);
  d.L = static_cast<int>(L);
  d.P = static_cast<int>(P);
  d.LP = static_cast<int>(L * P);
  d.MD = static_cast<int>(M * D);
  return d;
}

// dtype codes: those of soit::msda::DType (0 float32, 1 float64, 2 float16, 3 bfloat16)
template <typename F>
void dispatch_or_throw(int vtype, int ctype, F&& f) {
  using soit::msda::DType;
  if (!soit::msda::dispatch_dtypes(static_cast<DType>(vtype), static_cast<DType>(ctype), f))
    throw Error("unsupported dtype combination");
}

thread_local std::string last_error;

const char* report(const std::exception& e) {
  last_error = e.what();
  return last_error.c_str();
}

}  // namespace emu

extern "C" {

// The launch shape make_config picks: out = {vec, group, items_per_block, tile, smem, blocks}.
void emu_msda_config(int64_t D, int64_t L, int64_t P, int64_t num_items, int elem_size, int acc_size, int copies,
                     const void* aligned_like, int64_t* out) {
  soit::msda::KernelDims d = emu::dims(1, 1, 1, D, num_items, 1, L, P);
  const soit::msda::LaunchConfig c = soit::msda::make_config(d, elem_size, acc_size, copies, {aligned_like});
  out[0] = c.vec;
  out[1] = c.group;
  out[2] = c.items_per_block;
  out[3] = c.tile;
  out[4] = static_cast<int64_t>(c.smem);
  out[5] = c.blocks;
}

// Returns nullptr on success, else an error message.
const char* emu_msda_forward(int vtype, int ctype, const void* value, const int64_t* shapes, const int64_t* starts,
                             const void* loc, const void* attw, const int64_t* vindex, void* out, int64_t B,
                             int64_t S, int64_t M, int64_t D, int64_t N, int64_t Lq, int64_t L, int64_t P) {
  try {
    const soit::msda::KernelDims d = emu::dims(B, S, M, D, N, Lq, L, P);
    emu::dispatch_or_throw(vtype, ctype, [&](auto s_tag, auto c_tag) {
      using scalar_t = decltype(s_tag);
      using coord_t = decltype(c_tag);
      using acc_t = soit::msda::acc_type_t<scalar_t>;
      const auto cfg = soit::msda::make_config(d, sizeof(scalar_t), sizeof(acc_t), 1, {value, out});
      soit::msda::dispatch_vec<scalar_t>(cfg.vec, [&](auto V) {
        emu::launch(cfg, [&] {
          soit::msda::forward_kernel<scalar_t, coord_t, decltype(V)::value>(
              static_cast<const scalar_t*>(value), shapes, starts, static_cast<const coord_t*>(loc),
              static_cast<const coord_t*>(attw), vindex, static_cast<scalar_t*>(out), d, cfg.group, cfg.tile);
        });
      });
    });
    return nullptr;
  } catch (const std::exception& e) {
    return emu::report(e);
  }
}

// grad_value: accumulation buffer (float32, or float64 for a float64 value), zero-filled.
const char* emu_msda_backward(int vtype, int ctype, const void* value, const int64_t* shapes, const int64_t* starts,
                              const void* loc, const void* attw, const int64_t* vindex, const void* grad_out,
                              void* grad_value, void* grad_loc, void* grad_attw, int64_t B, int64_t S, int64_t M,
                              int64_t D, int64_t N, int64_t Lq, int64_t L, int64_t P) {
  try {
    const soit::msda::KernelDims d = emu::dims(B, S, M, D, N, Lq, L, P);
    emu::dispatch_or_throw(vtype, ctype, [&](auto s_tag, auto c_tag) {
      using scalar_t = decltype(s_tag);
      using coord_t = decltype(c_tag);
      using acc_t = soit::msda::acc_type_t<scalar_t>;
      const auto cfg =
          soit::msda::make_config(d, sizeof(scalar_t), sizeof(acc_t), 2, {value, grad_out, grad_value});
      soit::msda::dispatch_vec<scalar_t>(cfg.vec, [&](auto V) {
        emu::launch(cfg, [&] {
          soit::msda::backward_kernel<scalar_t, coord_t, decltype(V)::value>(
              static_cast<const scalar_t*>(value), shapes, starts, static_cast<const coord_t*>(loc),
              static_cast<const coord_t*>(attw), vindex, static_cast<const scalar_t*>(grad_out),
              static_cast<acc_t*>(grad_value), static_cast<coord_t*>(grad_loc), static_cast<coord_t*>(grad_attw), d,
              cfg.group, cfg.tile);
        });
      });
    });
    return nullptr;
  } catch (const std::exception& e) {
    return emu::report(e);
  }
}

}  // extern "C"
