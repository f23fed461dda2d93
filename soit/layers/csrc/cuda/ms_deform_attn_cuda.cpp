// Multi-scale deformable attention on CUDA tensors: outputs, device guard and stream around the
// kernel launches of ms_deform_attn_forward.cu / ms_deform_attn_backward.cu. Compiled by the
// host compiler (the ATen headers stay out of nvcc's way), only in the CUDA build.
// per-operator headers rather than ATen.h: half the compile time
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../ms_deform_attn.h"
#include "ms_deform_attn_launch.h"

namespace soit {

namespace {

msda::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return msda::DType::kFloat;
    case at::kDouble:
      return msda::DType::kDouble;
    case at::kHalf:
      return msda::DType::kHalf;
    case at::kBFloat16:
      return msda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "ms_deform_attn: unsupported dtype ", t);
  }
}

msda::KernelDims make_dims(const MSDAShape& d) {
  msda::KernelDims k;
  k.num_items = d.N * d.Lq * d.M;
  k.B = d.B;
  k.MLq = d.M * d.Lq;
  k.S = static_cast<int>(d.S);
  k.M = static_cast<int>(d.M);
  k.D = static_cast<int>(d.D);
  k.L = static_cast<int>(d.L);
  k.P = static_cast<int>(d.P);
  k.LP = static_cast<int>(d.L * d.P);
  k.MD = static_cast<int>(d.M * d.D);
  return k;
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights,
                                       const std::optional<at::Tensor>& value_index, const MSDAShape& shape) {
  const c10::cuda::CUDAGuard device_guard(value.device());
  at::Tensor out = at::empty({shape.N, shape.Lq, shape.M * shape.D}, value.options());
  const msda::KernelDims d = make_dims(shape);
  if (d.num_items == 0 || d.D == 0) return out;
  TORCH_CHECK(d.L <= msda::kMaxLevels, "ms_deform_attn: at most ", msda::kMaxLevels, " levels, got ", d.L);
  msda::ForwardArgs a;
  a.value = value.data_ptr();
  a.shapes = spatial_shapes.data_ptr<int64_t>();
  a.starts = level_start_index.data_ptr<int64_t>();
  a.loc = sampling_locations.data_ptr();
  a.attw = attention_weights.data_ptr();
  a.vindex = value_index.has_value() ? value_index->data_ptr<int64_t>() : nullptr;
  a.out = out.data_ptr();
  const char* error = msda::launch_forward(to_dtype(value.scalar_type()),
                                           to_dtype(sampling_locations.scalar_type()), d, a,
                                           c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(error == nullptr, "ms_deform_attn forward: ", error);
  return out;
}

std::vector<at::Tensor> ms_deform_attn_backward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_locations,
                                                     const at::Tensor& attention_weights,
                                                     const std::optional<at::Tensor>& value_index,
                                                     const at::Tensor& grad_output, const MSDAShape& shape) {
  const c10::cuda::CUDAGuard device_guard(value.device());
  const msda::KernelDims d = make_dims(shape);
  // float32 accumulation (float64 for a float64 value), rounded once at the end
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(at::toOpMathType(value.scalar_type())));
  if (d.num_items == 0 || d.D == 0) {
    return {grad_value.to(value.scalar_type()), at::zeros_like(sampling_locations),
            at::zeros_like(attention_weights)};
  }
  TORCH_CHECK(d.L <= msda::kMaxLevels, "ms_deform_attn: at most ", msda::kMaxLevels, " levels, got ", d.L);
  // every element of these is written by the kernel
  at::Tensor grad_loc = at::empty_like(sampling_locations);
  at::Tensor grad_attw = at::empty_like(attention_weights);
  msda::BackwardArgs a;
  a.value = value.data_ptr();
  a.shapes = spatial_shapes.data_ptr<int64_t>();
  a.starts = level_start_index.data_ptr<int64_t>();
  a.loc = sampling_locations.data_ptr();
  a.attw = attention_weights.data_ptr();
  a.vindex = value_index.has_value() ? value_index->data_ptr<int64_t>() : nullptr;
  a.grad_out = grad_output.data_ptr();
  a.grad_value = grad_value.data_ptr();
  a.grad_loc = grad_loc.data_ptr();
  a.grad_attw = grad_attw.data_ptr();
  const char* error = msda::launch_backward(to_dtype(value.scalar_type()),
                                            to_dtype(sampling_locations.scalar_type()), d, a,
                                            c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(error == nullptr, "ms_deform_attn backward: ", error);
  return {grad_value.to(value.scalar_type()), grad_loc, grad_attw};
}

std::vector<int64_t> cuda_arch_list() {
  int64_t archs[32];
  const int n = msda::compiled_arch_list(archs, 32);
  return std::vector<int64_t>(archs, archs + n);
}

int64_t cuda_version() {
  return msda::compiled_cuda_version();
}

}  // namespace soit
