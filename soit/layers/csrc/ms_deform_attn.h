// Multi-scale deformable attention: the entry points of soit._C.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>

#include <optional>
#include <type_traits>
#include <vector>

namespace soit {

// Sizes of one call, checked once by check_inputs:
//   value (B, S, M, D); sampling_locations (N, Lq, M, L, P, 2); attention_weights (N, Lq, M, L, P).
struct MSDAShape {
  int64_t B, S, M, D, N, Lq, L, P;
};

// Calls f(scalar_t(), coord_t()) with the C++ types of value and of the locations / weights:
// coord_t is scalar_t, or float for a float16 / bfloat16 value (check_inputs allows no other mix).
template <typename F>
void dispatch_types(at::ScalarType value_type, at::ScalarType coord_type, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value_type, "ms_deform_attn", [&] {
    if constexpr (std::is_same<scalar_t, at::Half>::value || std::is_same<scalar_t, at::BFloat16>::value) {
      if (coord_type == at::kFloat) {
        f(scalar_t(), float());
        return;
      }
    }
    f(scalar_t(), scalar_t());
  });
}

MSDAShape check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                       const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                       const std::optional<at::Tensor>& value_index);

// With reference_points (N, Lq, L, 2), sampling_locations holds offsets in pixels of each level
// and the locations are reference_points + offsets / (W_l, H_l) (see forward_impl).
at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights, const std::optional<at::Tensor>& value_index,
                                      const MSDAShape& d,
                                      const std::optional<at::Tensor>& reference_points = std::nullopt);

// Returns {grad_value, grad_sampling_locations, grad_attention_weights}.
std::vector<at::Tensor> ms_deform_attn_backward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                    const at::Tensor& level_start_index,
                                                    const at::Tensor& sampling_locations,
                                                    const at::Tensor& attention_weights,
                                                    const std::optional<at::Tensor>& value_index,
                                                    const at::Tensor& grad_output, const MSDAShape& d);

// The mask head's sampling at every pixel, fused, for inference (ms_deform_attn_cpu.cpp); the
// inputs were checked by the caller (mask_head_sample).
at::Tensor mask_head_sample_cpu(const at::Tensor& offsets, const at::Tensor& logits, const at::Tensor& value,
                                const at::Tensor& batch_index, int64_t H, int64_t W);

#ifdef WITH_CUDA
at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights,
                                       const std::optional<at::Tensor>& value_index, const MSDAShape& d);

std::vector<at::Tensor> ms_deform_attn_backward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_locations,
                                                     const at::Tensor& attention_weights,
                                                     const std::optional<at::Tensor>& value_index,
                                                     const at::Tensor& grad_output, const MSDAShape& d);

// Compute capabilities the CUDA sources were compiled for (e.g. {80, 90}).
std::vector<int64_t> cuda_arch_list();
// CUDA runtime version the module was compiled against (e.g. 13000).
int64_t cuda_version();
#endif

}  // namespace soit
