// soit._C: input checks, device dispatch and the Python binding of multi-scale deformable
// attention. Compiles without CUDA; the CUDA entry points then raise a clear error.
// torch/csrc/utils/pybind.h (pybind11 with the Tensor and optional casters) rather than
// torch/extension.h or torch/python.h, which take about three times as long to compile.
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <limits>
#include <utility>
#include <vector>

#include "ms_deform_attn.h"

namespace soit {

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

MSDAShape check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                       const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                       const std::optional<at::Tensor>& value_index) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (B, S, M, D), got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5, "ms_deform_attn: attention_weights must be (N, Lq, M, L, P), got ",
              attention_weights.sizes());
  MSDAShape d;
  d.B = value.size(0);
  d.S = value.size(1);
  d.M = value.size(2);
  d.D = value.size(3);
  d.N = sampling_locations.size(0);
  d.Lq = sampling_locations.size(1);
  d.L = sampling_locations.size(3);
  d.P = sampling_locations.size(4);
  TORCH_CHECK(sampling_locations.size(2) == d.M, "ms_deform_attn: sampling_locations has ", sampling_locations.size(2),
              " heads, value has ", d.M);
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights ", attention_weights.sizes(),
              " does not match sampling_locations ", sampling_locations.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == d.L && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2) with L = ", d.L, ", got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == d.L,
              "ms_deform_attn: level_start_index must be (L,) with L = ", d.L, ", got ", level_start_index.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");

  TORCH_CHECK(is_supported_float(value.scalar_type()),
              "ms_deform_attn: value must be float32, float64, float16 or bfloat16, got ", value.scalar_type());
  TORCH_CHECK(sampling_locations.scalar_type() == attention_weights.scalar_type(),
              "ms_deform_attn: sampling_locations (", sampling_locations.scalar_type(), ") and attention_weights (",
              attention_weights.scalar_type(), ") must have the same dtype");
  const auto coord = sampling_locations.scalar_type();
  const bool low = value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16;
  TORCH_CHECK(coord == value.scalar_type() || (low && coord == at::kFloat),
              "ms_deform_attn: sampling_locations / attention_weights must have value's dtype (",
              value.scalar_type(), ") or, for a float16/bfloat16 value, float32; got ", coord);

  const auto dev = value.device();
  TORCH_CHECK(sampling_locations.device() == dev && attention_weights.device() == dev &&
                  spatial_shapes.device() == dev && level_start_index.device() == dev,
              "ms_deform_attn: all tensors must be on one device; value is on ", dev, ", sampling_locations on ",
              sampling_locations.device(), ", attention_weights on ", attention_weights.device(),
              ", spatial_shapes on ", spatial_shapes.device(), ", level_start_index on ", level_start_index.device());
  TORCH_CHECK(value.is_contiguous(), "ms_deform_attn: value must be contiguous");
  TORCH_CHECK(sampling_locations.is_contiguous(), "ms_deform_attn: sampling_locations must be contiguous");
  TORCH_CHECK(attention_weights.is_contiguous(), "ms_deform_attn: attention_weights must be contiguous");
  TORCH_CHECK(spatial_shapes.is_contiguous() && level_start_index.is_contiguous(),
              "ms_deform_attn: spatial_shapes and level_start_index must be contiguous");

  if (value_index.has_value()) {
    const at::Tensor& vi = *value_index;
    TORCH_CHECK(vi.dim() == 1 && vi.size(0) == d.N, "ms_deform_attn: value_index must be (N,) with N = ", d.N,
                ", got ", vi.sizes());
    TORCH_CHECK(vi.scalar_type() == at::kLong, "ms_deform_attn: value_index must be int64, got ", vi.scalar_type());
    TORCH_CHECK(vi.device() == dev, "ms_deform_attn: value_index is on ", vi.device(), ", value on ", dev);
    TORCH_CHECK(vi.is_contiguous(), "ms_deform_attn: value_index must be contiguous");
  } else {
    TORCH_CHECK(d.B == d.N, "ms_deform_attn: value has batch ", d.B, " but sampling_locations has ", d.N,
                " (pass value_index to share value maps between groups)");
  }
  // Offsets inside one value map are 32-bit.
  TORCH_CHECK(d.S * d.M * d.D < std::numeric_limits<int32_t>::max(),
              "ms_deform_attn: one value map holds more than 2^31 elements (S * M * D = ", d.S * d.M * d.D, ")");
  TORCH_CHECK(d.L * d.P < std::numeric_limits<int32_t>::max() && d.D < std::numeric_limits<int32_t>::max() &&
                  d.Lq < std::numeric_limits<int32_t>::max(),
              "ms_deform_attn: sizes out of range");
  return d;
}

namespace {

#ifndef WITH_CUDA
void no_cuda() {
  TORCH_CHECK(false,
              "soit._C was built without CUDA, so ms_deform_attn cannot run on CUDA tensors with it. Rebuild with a "
              "CUDA compiler present (CUDA_HOME=/usr/local/cuda pip install -e . --no-build-isolation) or use the "
              "PyTorch path (soit.layers.ms_deform_attn.force_pytorch()).");
}
#endif

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                   const std::optional<at::Tensor>& value_index) {
  const MSDAShape d =
      check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index);
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_forward_cuda(value, spatial_shapes, level_start_index, sampling_locations,
                                       attention_weights, value_index, d);
#else
    no_cuda();
#endif
  }
  TORCH_CHECK(value.is_cpu(), "ms_deform_attn: unsupported device ", value.device());
  return ms_deform_attn_forward_cpu(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                    value_index, d);
}

std::vector<at::Tensor> backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights, const std::optional<at::Tensor>& value_index,
                                 const at::Tensor& grad_output) {
  const MSDAShape d =
      check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index);
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == d.N && grad_output.size(1) == d.Lq &&
                  grad_output.size(2) == d.M * d.D,
              "ms_deform_attn: grad_output must be (N, Lq, M * D) = (", d.N, ", ", d.Lq, ", ", d.M * d.D, "), got ",
              grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(), "ms_deform_attn: grad_output dtype ",
              grad_output.scalar_type(), " differs from value dtype ", value.scalar_type());
  TORCH_CHECK(grad_output.device() == value.device(), "ms_deform_attn: grad_output is on ", grad_output.device(),
              ", value on ", value.device());
  TORCH_CHECK(grad_output.is_contiguous(), "ms_deform_attn: grad_output must be contiguous");
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_backward_cuda(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights, value_index, grad_output, d);
#else
    no_cuda();
#endif
  }
  TORCH_CHECK(value.is_cpu(), "ms_deform_attn: unsupported device ", value.device());
  return ms_deform_attn_backward_cpu(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                     value_index, grad_output, d);
}

// The forward from reference points and offsets in pixels (CPU, inference): the locations
// reference_points + offsets / (W_l, H_l) are formed inside the kernel, as the composition in
// soit/layers/ms_deform_attn/module.py forms them, never stored.
at::Tensor forward_from_offsets(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                const at::Tensor& level_start_index, const at::Tensor& reference_points,
                                const at::Tensor& offsets, const at::Tensor& attention_weights,
                                const std::optional<at::Tensor>& value_index) {
  const MSDAShape d = check_inputs(value, spatial_shapes, level_start_index, offsets, attention_weights, value_index);
  TORCH_CHECK(value.is_cpu(), "ms_deform_attn_forward_offsets: CPU tensors only, got ", value.device());
  TORCH_CHECK(offsets.scalar_type() == value.scalar_type(), "ms_deform_attn_forward_offsets: offsets (",
              offsets.scalar_type(), ") must have value's dtype (", value.scalar_type(), ")");
  TORCH_CHECK(reference_points.dim() == 4 && reference_points.size(0) == d.N && reference_points.size(1) == d.Lq &&
                  reference_points.size(2) == d.L && reference_points.size(3) == 2,
              "ms_deform_attn_forward_offsets: reference_points must be (N, Lq, L, 2) = (", d.N, ", ", d.Lq, ", ",
              d.L, ", 2), got ", reference_points.sizes());
  TORCH_CHECK(reference_points.scalar_type() == offsets.scalar_type(), "ms_deform_attn_forward_offsets: "
              "reference_points (", reference_points.scalar_type(), ") must have the offsets' dtype (",
              offsets.scalar_type(), ")");
  TORCH_CHECK(reference_points.is_cpu() && reference_points.is_contiguous(),
              "ms_deform_attn_forward_offsets: reference_points must be a contiguous CPU tensor");
  return ms_deform_attn_forward_cpu(value, spatial_shapes, level_start_index, offsets, attention_weights, value_index,
                                    d, reference_points);
}

// Checks the fused mask-head sampling's inputs (see mask_head_sample_cpu) and runs it.
at::Tensor mask_head_sample(const at::Tensor& offsets, const at::Tensor& logits, const at::Tensor& value,
                            const at::Tensor& batch_index, int64_t H, int64_t W) {
  TORCH_CHECK(value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble,
              "mask_head_sample: float32 or float64 inputs, got ", value.scalar_type());
  for (const auto& [name, t] : {std::make_pair("offsets", &offsets), std::make_pair("logits", &logits),
                                std::make_pair("value", &value)}) {
    TORCH_CHECK(t->is_cpu(), "mask_head_sample: ", name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK(t->scalar_type() == value.scalar_type(), "mask_head_sample: ", name, " is ", t->scalar_type(),
                ", value is ", value.scalar_type());
    TORCH_CHECK(t->is_contiguous(), "mask_head_sample: ", name, " must be contiguous");
  }
  TORCH_CHECK(batch_index.is_cpu() && batch_index.scalar_type() == at::kLong && batch_index.is_contiguous(),
              "mask_head_sample: batch_index must be a contiguous CPU int64 tensor");
  TORCH_CHECK(offsets.dim() == 3 && logits.dim() == 3 && value.dim() == 4 && H >= 0 && W >= 0,
              "mask_head_sample: offsets must be (n, H * W, 2MK), logits (n, H * W, MK), value (B, H * W, M, Dh)");
  const int64_t n = offsets.size(0), S = H * W, B = value.size(0), M = value.size(2), MK = logits.size(2);
  TORCH_CHECK(value.size(1) == S && offsets.size(1) == S && logits.size(1) == S,
              "mask_head_sample: offsets ", offsets.sizes(), ", logits ", logits.sizes(), " and value ",
              value.sizes(), " do not fit a ", H, " x ", W, " map");
  TORCH_CHECK(M > 0 && MK % M == 0 && logits.size(0) == n && offsets.size(2) == 2 * MK,
              "mask_head_sample: logits must be (n, H * W, M * K) and offsets (n, H * W, 2 * M * K) with M = ", M,
              " heads; got offsets ", offsets.sizes(), ", logits ", logits.sizes());
  TORCH_CHECK(batch_index.dim() == 1 && batch_index.size(0) == n, "mask_head_sample: batch_index must be (", n,
              ",), got ", batch_index.sizes());
  if (n > 0) {
    TORCH_CHECK(batch_index.min().item<int64_t>() >= 0 && batch_index.max().item<int64_t>() < B,
                "mask_head_sample: batch_index out of range [0, ", B, ")");
  }
  return mask_head_sample_cpu(offsets, logits, value, batch_index, H, W);
}

bool with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::vector<int64_t> arch_list() {
#ifdef WITH_CUDA
  return cuda_arch_list();
#else
  return {};
#endif
}

int64_t compiled_cuda_version() {
#ifdef WITH_CUDA
  return cuda_version();
#else
  return -1;
#endif
}

}  // namespace
}  // namespace soit

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SOIT compiled ops (multi-scale deformable attention)";
  m.def("with_cuda", &soit::with_cuda, "True when the CUDA kernels were compiled in.");
  m.def("cuda_arch_list", &soit::arch_list,
        "Compute capabilities (e.g. [80, 90]) the CUDA kernels were compiled for; empty without CUDA.");
  m.def("cuda_version", &soit::compiled_cuda_version, "CUDA version compiled against (e.g. 13000), -1 without CUDA.");
  m.def("ms_deform_attn_forward", &soit::forward, "Multi-scale deformable attention, forward (CPU or CUDA).",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"), py::arg("value_index") = py::none());
  m.def("ms_deform_attn_backward", &soit::backward,
        "Multi-scale deformable attention, backward: returns [grad_value, grad_sampling_locations, "
        "grad_attention_weights].",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"), py::arg("value_index"), py::arg("grad_output"));
  m.def("ms_deform_attn_forward_offsets", &soit::forward_from_offsets,
        "The forward (CPU, inference) from reference points (N, Lq, L, 2) in [0, 1] and sampling offsets "
        "(N, Lq, M, L, P, 2) in pixels of each level: locations reference_points + offsets / (W_l, H_l).",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("reference_points"),
        py::arg("offsets"), py::arg("attention_weights"), py::arg("value_index") = py::none());
  m.def("mask_head_sample", &soit::mask_head_sample,
        "The mask head's sampling at every pixel of an H x W map, fused (CPU, inference): from raw offsets "
        "(n, H * W, 2MK) in pixels and attention logits (n, H * W, MK), returns ReLU(sampled) (n, H * W, M * Dh).",
        py::arg("offsets"), py::arg("logits"), py::arg("value"), py::arg("batch_index"), py::arg("H"), py::arg("W"));
}
