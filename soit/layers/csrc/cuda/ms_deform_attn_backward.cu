// Multi-scale deformable attention, CUDA backward launch (kernel: ms_deform_attn_kernels.cuh).
#include <cuda_runtime.h>

#include <limits>

#include "ms_deform_attn_kernels.cuh"

namespace soit {
namespace msda {

const char* launch_backward(DType value_type, DType coord_type, const KernelDims& d, const BackwardArgs& a,
                            void* stream) {
  const char* error = nullptr;
  const bool known = dispatch_dtypes(value_type, coord_type, [&](auto s_tag, auto c_tag) {
    using scalar_t = decltype(s_tag);
    using coord_t = decltype(c_tag);
    using acc_t = acc_type_t<scalar_t>;
    const LaunchConfig cfg =
        make_config(d, sizeof(scalar_t), sizeof(acc_t), 2, {a.value, a.grad_out, a.grad_value});
    if (cfg.blocks > std::numeric_limits<int32_t>::max()) {
      error = "ms_deform_attn: too many queries for one launch";
      return;
    }
    dispatch_vec<scalar_t>(cfg.vec, [&](auto V) {
      backward_kernel<scalar_t, coord_t, decltype(V)::value>
          <<<static_cast<unsigned>(cfg.blocks), kThreads, cfg.smem, static_cast<cudaStream_t>(stream)>>>(
              static_cast<const scalar_t*>(a.value), a.shapes, a.starts, static_cast<const coord_t*>(a.loc),
              static_cast<const coord_t*>(a.attw), a.vindex, static_cast<const scalar_t*>(a.grad_out),
              static_cast<acc_t*>(a.grad_value), static_cast<coord_t*>(a.grad_loc),
              static_cast<coord_t*>(a.grad_attw), d, cfg.group, cfg.tile);
    });
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) error = cudaGetErrorString(status);
  });
  return known ? error : "ms_deform_attn: unsupported dtype combination";
}

}  // namespace msda
}  // namespace soit
