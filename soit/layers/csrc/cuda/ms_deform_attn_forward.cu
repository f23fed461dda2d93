// Multi-scale deformable attention, CUDA forward launch (kernel: ms_deform_attn_kernels.cuh).
#include <cuda_runtime.h>

#include <limits>

#include "ms_deform_attn_kernels.cuh"

namespace soit {
namespace msda {

const char* launch_forward(DType value_type, DType coord_type, const KernelDims& d, const ForwardArgs& a,
                           void* stream) {
  const char* error = nullptr;
  const bool known = dispatch_dtypes(value_type, coord_type, [&](auto s_tag, auto c_tag) {
    using scalar_t = decltype(s_tag);
    using coord_t = decltype(c_tag);
    const LaunchConfig cfg = make_config(d, sizeof(scalar_t), sizeof(acc_type_t<scalar_t>), 1, {a.value, a.out});
    if (cfg.blocks > std::numeric_limits<int32_t>::max()) {
      error = "ms_deform_attn: too many queries for one launch";
      return;
    }
    dispatch_vec<scalar_t>(cfg.vec, [&](auto V) {
      forward_kernel<scalar_t, coord_t, decltype(V)::value>
          <<<static_cast<unsigned>(cfg.blocks), kThreads, cfg.smem, static_cast<cudaStream_t>(stream)>>>(
              static_cast<const scalar_t*>(a.value), a.shapes, a.starts, static_cast<const coord_t*>(a.loc),
              static_cast<const coord_t*>(a.attw), a.vindex, static_cast<scalar_t*>(a.out), d, cfg.group,
              cfg.tile);
    });
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) error = cudaGetErrorString(status);
  });
  return known ? error : "ms_deform_attn: unsupported dtype combination";
}

int compiled_arch_list(int64_t* out, int max) {
#ifdef __CUDA_ARCH_LIST__
  const int archs[] = {__CUDA_ARCH_LIST__};
  int n = 0;
  for (int a : archs)
    if (n < max) out[n++] = a / 10;
  return n;
#else
  (void)out;
  (void)max;
  return 0;
#endif
}

int64_t compiled_cuda_version() {
  return CUDART_VERSION;
}

}  // namespace msda
}  // namespace soit
