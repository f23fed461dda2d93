// The interface between the ATen side (ms_deform_attn_cuda.cpp, host compiler) and the CUDA
// sources (*.cu): raw pointers and sizes only, so that nvcc never parses the ATen headers (they
// would make up most of the build time).
#pragma once

#include <cstdint>

namespace soit {
namespace msda {

enum class DType : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

struct KernelDims {
  int64_t num_items;  // N * Lq * M
  int64_t B;          // value maps
  int64_t MLq;        // M * Lq: items per group n
  int S, M, D, L, P, LP, MD;
};

struct ForwardArgs {
  const void* value;         // (B, S, M, D), value dtype
  const int64_t* shapes;     // (L, 2)
  const int64_t* starts;     // (L,)
  const void* loc;           // (N, Lq, M, L, P, 2), coordinate dtype
  const void* attw;          // (N, Lq, M, L, P), coordinate dtype
  const int64_t* vindex;     // (N,) or nullptr
  void* out;                 // (N, Lq, M * D), value dtype
};

struct BackwardArgs {
  const void* value;
  const int64_t* shapes;
  const int64_t* starts;
  const void* loc;
  const void* attw;
  const int64_t* vindex;
  const void* grad_out;  // (N, Lq, M * D), value dtype
  void* grad_value;      // (B, S, M, D), float32 (float64 for a float64 value), zero-filled
  void* grad_loc;        // like loc, fully written
  void* grad_attw;       // like attw, fully written
};

constexpr int kMaxLevels = 1024;

// Launch on `stream` (a cudaStream_t). Return nullptr, or a message on failure. The coordinate
// dtype is the value's or, for a float16 / bfloat16 value, kFloat.
const char* launch_forward(DType value_type, DType coord_type, const KernelDims& d, const ForwardArgs& a,
                           void* stream);
const char* launch_backward(DType value_type, DType coord_type, const KernelDims& d, const BackwardArgs& a,
                            void* stream);

// Compute capabilities compiled for (e.g. 80, 90), at most `max` of them; returns the count.
int compiled_arch_list(int64_t* out, int max);
// CUDA runtime version compiled against (e.g. 13000).
int64_t compiled_cuda_version();

}  // namespace msda
}  // namespace soit
