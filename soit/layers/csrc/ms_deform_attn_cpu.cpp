// Multi-scale deformable attention on the CPU. It runs the same per-sample code as the CUDA
// kernels (ms_deform_attn_common.h) with the same split of channels into lanes and vectors,
// so the CPU build exercises that arithmetic. The package's default CPU path is the PyTorch
// formulation; this one is reached with impl="kernel".
// per-operator headers rather than ATen.h: half the compile time
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_common.h"

namespace soit {

namespace {

using namespace msda;

struct Levels {
  std::vector<int> H, W, start;
};

Levels read_levels(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, const MSDAShape& d) {
  Levels lv;
  const int64_t* sh = spatial_shapes.data_ptr<int64_t>();
  const int64_t* st = level_start_index.data_ptr<int64_t>();
  for (int64_t l = 0; l < d.L; ++l) {
    const int64_t H = sh[2 * l], W = sh[2 * l + 1], s0 = st[l];
    TORCH_CHECK(H >= 0 && W >= 0 && s0 >= 0 && s0 + H * W <= d.S, "ms_deform_attn: level ", l, " (", H, " x ", W,
                " starting at ", s0, ") does not fit in the ", d.S, " value tokens");
    lv.H.push_back(static_cast<int>(H));
    lv.W.push_back(static_cast<int>(W));
    lv.start.push_back(static_cast<int>(s0));
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

template <typename scalar_t, typename coord_t, int VEC>
void forward_impl(const scalar_t* value, const coord_t* loc, const coord_t* attw, const int64_t* vindex,
                  scalar_t* out, const MSDAShape& d, const Levels& lv, int group) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t items = d.N * d.Lq * d.M;
  const int LP = static_cast<int>(d.L * d.P);
  const int P = static_cast<int>(d.P);
  const int MD = static_cast<int>(d.M * d.D);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, LP * d.D));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t m = item % d.M;
      const int64_t n = item / d.M / d.Lq;
      const int64_t b = vindex ? vindex[n] : n;
      const scalar_t* vbase = value + (b * d.S * d.M + m) * d.D;
      const coord_t* lp = loc + item * LP * 2;
      const coord_t* wp = attw + item * LP;
      scalar_t* op = out + item * d.D;
      for (int lane = 0; lane < group; ++lane) {
        for (int64_t c = static_cast<int64_t>(lane) * VEC; c < d.D; c += static_cast<int64_t>(group) * VEC) {
          acc_t acc[VEC] = {};
          for (int t = 0; t < LP; ++t) {
            const int l = t / P;
            Bilinear<acc_t> s;
            if (bilinear_setup<acc_t>(static_cast<acc_t>(lp[2 * t]), static_cast<acc_t>(lp[2 * t + 1]), lv.H[l],
                                      lv.W[l], s))
              sample_forward<VEC>(vbase + static_cast<int64_t>(lv.start[l]) * MD + c, MD, s,
                                  static_cast<acc_t>(wp[t]), acc);
          }
          store_vec<VEC>(op + c, acc);
        }
      }
    }
  });
}

template <typename scalar_t, typename coord_t, int VEC>
void backward_impl(const scalar_t* value, const coord_t* loc, const coord_t* attw, const int64_t* vindex,
                   const scalar_t* grad_out, acc_type_t<scalar_t>* grad_value, coord_t* grad_loc,
                   coord_t* grad_attw, const MSDAShape& d, const Levels& lv, int group) {
  using acc_t = acc_type_t<scalar_t>;
  const int LP = static_cast<int>(d.L * d.P);
  const int P = static_cast<int>(d.P);
  const int MD = static_cast<int>(d.M * d.D);
  // Heads write disjoint parts of grad_value, so they run in parallel without atomics.
  at::parallel_for(0, d.M, 1, [&](int64_t m_begin, int64_t m_end) {
    for (int64_t m = m_begin; m < m_end; ++m) {
      for (int64_t nq = 0; nq < d.N * d.Lq; ++nq) {
        const int64_t item = nq * d.M + m;
        const int64_t n = nq / d.Lq;
        const int64_t b = vindex ? vindex[n] : n;
        const scalar_t* vbase = value + (b * d.S * d.M + m) * d.D;
        acc_t* gvbase = grad_value + (b * d.S * d.M + m) * d.D;
        const scalar_t* gop = grad_out + item * d.D;
        const coord_t* lp = loc + item * LP * 2;
        const coord_t* wp = attw + item * LP;
        coord_t* glp = grad_loc + item * LP * 2;
        coord_t* gwp = grad_attw + item * LP;
        for (int t = 0; t < LP; ++t) {
          const int l = t / P;
          const acc_t aw = static_cast<acc_t>(wp[t]);
          acc_t g_aw = 0, g_h = 0, g_w = 0;
          Bilinear<acc_t> s;
          if (bilinear_setup<acc_t>(static_cast<acc_t>(lp[2 * t]), static_cast<acc_t>(lp[2 * t + 1]), lv.H[l],
                                    lv.W[l], s)) {
            const int64_t lvl = static_cast<int64_t>(lv.start[l]) * MD;
            for (int lane = 0; lane < group; ++lane) {
              for (int64_t c = static_cast<int64_t>(lane) * VEC; c < d.D; c += static_cast<int64_t>(group) * VEC) {
                acc_t go[VEC];
                load_vec<VEC>(gop + c, go);
                sample_backward<VEC>(vbase + lvl + c, gvbase + lvl + c, MD, s, aw, go, g_aw, g_h, g_w);
              }
            }
          }
          gwp[t] = static_cast<coord_t>(g_aw);
          glp[2 * t] = static_cast<coord_t>(aw * g_w * static_cast<acc_t>(lv.W[l]));
          glp[2 * t + 1] = static_cast<coord_t>(aw * g_h * static_cast<acc_t>(lv.H[l]));
        }
      }
    }
  });
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights, const std::optional<at::Tensor>& value_index,
                                      const MSDAShape& d) {
  at::Tensor out = at::zeros({d.N, d.Lq, d.M * d.D}, value.options());
  if (d.N * d.Lq * d.M == 0 || d.D == 0) return out;
  const Levels lv = read_levels(spatial_shapes, level_start_index, d);
  const int64_t* vindex = checked_value_index(value_index, d);
  dispatch_types(value.scalar_type(), sampling_locations.scalar_type(),
                 [&](auto s_tag, auto c_tag) {
                   using scalar_t = decltype(s_tag);
                   using coord_t = decltype(c_tag);
                   const int vec = choose_vec(d.D, sizeof(scalar_t), {value.data_ptr(), out.data_ptr()});
                   const int group = choose_group(d.D, vec);
                   dispatch_vec<scalar_t>(vec, [&](auto V) {
                     forward_impl<scalar_t, coord_t, decltype(V)::value>(
                         value.data_ptr<scalar_t>(), sampling_locations.data_ptr<coord_t>(),
                         attention_weights.data_ptr<coord_t>(), vindex, out.data_ptr<scalar_t>(), d, lv, group);
                   });
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
  at::Tensor grad_loc = at::zeros_like(sampling_locations);
  at::Tensor grad_attw = at::zeros_like(attention_weights);
  if (d.N * d.Lq * d.M > 0 && d.D > 0) {
    const Levels lv = read_levels(spatial_shapes, level_start_index, d);
    const int64_t* vindex = checked_value_index(value_index, d);
    dispatch_types(value.scalar_type(), sampling_locations.scalar_type(),
                   [&](auto s_tag, auto c_tag) {
                     using scalar_t = decltype(s_tag);
                     using coord_t = decltype(c_tag);
                     using acc_t = acc_type_t<scalar_t>;
                     const int vec = choose_vec(d.D, sizeof(scalar_t),
                                                {value.data_ptr(), grad_output.data_ptr(), grad_value.data_ptr()});
                     const int group = choose_group(d.D, vec);
                     dispatch_vec<scalar_t>(vec, [&](auto V) {
                       backward_impl<scalar_t, coord_t, decltype(V)::value>(
                           value.data_ptr<scalar_t>(), sampling_locations.data_ptr<coord_t>(),
                           attention_weights.data_ptr<coord_t>(), vindex, grad_output.data_ptr<scalar_t>(),
                           grad_value.data_ptr<acc_t>(), grad_loc.data_ptr<coord_t>(),
                           grad_attw.data_ptr<coord_t>(), d, lv, group);
                     });
                   });
  }
  return {grad_value.to(value.scalar_type()), grad_loc, grad_attw};
}

}  // namespace soit
