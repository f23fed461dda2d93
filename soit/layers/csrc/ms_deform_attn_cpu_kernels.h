// The CPU implementation's loops (see ms_deform_attn_cpu.cpp). This file has no include guard on
// purpose: ms_deform_attn_cpu.cpp includes it twice, into two namespaces, once compiled for the
// baseline instruction set and once for AVX2 + FMA, and picks one at run time. It must therefore
// define only templates and functions private to its namespace, and include nothing itself
// (every header it needs is included by ms_deform_attn_cpu.cpp before it).

namespace SOIT_CPU_NAMESPACE {

using namespace soit::msda;
using soit::MSDAShape;
using Levels = soit::CpuLevels;

// One sampling point: the element offsets of its (up to four) valid corners from the level's
// first pixel, their bilinear weights and those times the attention weight (what the backward
// scatters). `count` corners are valid.
template <typename acc_t>
struct Corners {
  int64_t off[4];
  acc_t w[4];
  acc_t cw[4];  // bilinear weights alone (for the attention-weight gradient)
  int idx[4];   // corner number 0..3 (top-left, top-right, bottom-left, bottom-right)
  int count;
};

template <typename acc_t>
inline bool corners(acc_t x, acc_t y, int H, int W, acc_t aw, int64_t stride, Corners<acc_t>& c, Bilinear<acc_t>& s) {
  // grid_sample's arithmetic: g = 2x - 1 in [-1, 1], then (g + 1) * W / 2 - 0.5 (equal to
  // x * W - 0.5 up to rounding; computed this way the results match the PyTorch path's bits)
  const acc_t half = static_cast<acc_t>(0.5);
  const acc_t gx = x * 2 - 1, gy = y * 2 - 1;
  if (!bilinear_setup_pixel<acc_t>((gx + 1) * (static_cast<acc_t>(W) * half) - half,
                                   (gy + 1) * (static_cast<acc_t>(H) * half) - half, H, W, s))
    return false;
  acc_t cw[4];
  corner_weights(s, cw);
  c.count = 0;
  for (int k = 0; k < 4; ++k) {
    if (s.off[k] < 0) continue;
    c.off[c.count] = static_cast<int64_t>(s.off[k]) * stride;
    c.cw[c.count] = cw[k];
    c.w[c.count] = aw * cw[k];
    c.idx[c.count] = k;
    ++c.count;
  }
  return true;
}

// acc[0:D] += aw * bilinear(v)[0:D]: the bilinear sample first, then its attention weight (the
// order of grid_sample followed by the weighted sum, and of the reference CUDA implementation,
// so that results agree to the last bits as far as possible).
template <typename scalar_t, typename acc_t>
inline void gather_corners(const scalar_t* v, const Corners<acc_t>& c, acc_t aw, int64_t D, acc_t* __restrict acc) {
  if (c.count == 4) {
    const scalar_t* __restrict v0 = v + c.off[0];
    const scalar_t* __restrict v1 = v + c.off[1];
    const scalar_t* __restrict v2 = v + c.off[2];
    const scalar_t* __restrict v3 = v + c.off[3];
    const acc_t w0 = c.cw[0], w1 = c.cw[1], w2 = c.cw[2], w3 = c.cw[3];
    SOIT_SIMD
    for (int64_t i = 0; i < D; ++i)
      acc[i] += aw * (w0 * static_cast<acc_t>(v0[i]) + w1 * static_cast<acc_t>(v1[i]) +
                      w2 * static_cast<acc_t>(v2[i]) + w3 * static_cast<acc_t>(v3[i]));
    return;
  }
  for (int64_t i = 0; i < D; ++i) {
    acc_t sample = 0;
    for (int k = 0; k < c.count; ++k) sample += c.cw[k] * static_cast<acc_t>(v[c.off[k] + i]);
    acc[i] += aw * sample;
  }
}

// For each valid corner k: dot[k] = sum_i go[i] * v[off_k + i], and gv[off_k + i] += w_k * go[i].
template <typename scalar_t, typename acc_t>
inline void scatter_corners(const scalar_t* v, acc_t* gv, const Corners<acc_t>& c, const acc_t* __restrict go,
                            int64_t D, acc_t (&dot)[4]) {
  if (c.count == 4) {
    acc_t d0 = 0, d1 = 0, d2 = 0, d3 = 0;
    // four distinct pixels: the four gradient rows never overlap
    const scalar_t* __restrict v0 = v + c.off[0];
    const scalar_t* __restrict v1 = v + c.off[1];
    const scalar_t* __restrict v2 = v + c.off[2];
    const scalar_t* __restrict v3 = v + c.off[3];
    acc_t* __restrict g0 = gv + c.off[0];
    acc_t* __restrict g1 = gv + c.off[1];
    acc_t* __restrict g2 = gv + c.off[2];
    acc_t* __restrict g3 = gv + c.off[3];
    const acc_t w0 = c.w[0], w1 = c.w[1], w2 = c.w[2], w3 = c.w[3];
    SOIT_SIMD_SUM(d0, d1, d2, d3)
    for (int64_t i = 0; i < D; ++i) {
      const acc_t g = go[i];
      d0 += g * static_cast<acc_t>(v0[i]);
      d1 += g * static_cast<acc_t>(v1[i]);
      d2 += g * static_cast<acc_t>(v2[i]);
      d3 += g * static_cast<acc_t>(v3[i]);
      g0[i] += w0 * g;
      g1[i] += w1 * g;
      g2[i] += w2 * g;
      g3[i] += w3 * g;
    }
    dot[0] = d0;
    dot[1] = d1;
    dot[2] = d2;
    dot[3] = d3;
    return;
  }
  for (int k = 0; k < c.count; ++k) {
    const scalar_t* __restrict vk = v + c.off[k];
    acc_t* __restrict gk = gv + c.off[k];
    const acc_t wk = c.w[k];
    acc_t dk = 0;
    SOIT_SIMD_SUM(dk)
    for (int64_t i = 0; i < D; ++i) {
      const acc_t g = go[i];
      dk += g * static_cast<acc_t>(vk[i]);
      gk[i] += wk * g;
    }
    dot[k] = dk;
  }
}

// kD > 0: the channel count D fixed at compile time (the loops then unroll completely);
// kD = 0: D read from the shape.
// ref == nullptr: loc holds the sampling locations (N, Lq, M, L, P, 2) in [0, 1]. Otherwise loc
// holds offsets in pixels of each level and ref (N, Lq, L, 2) the reference points: the location
// is ref + offset / (W_l, H_l), computed here as the composition computes it (in coord_t, divide
// then add), so both give the same bits without the (N, Lq, M, L, P, 2) locations in memory.
template <typename scalar_t, typename coord_t, int kD>
void forward_impl(const scalar_t* value, const coord_t* loc, const coord_t* attw, const int64_t* vindex,
                  const coord_t* ref, scalar_t* out, const MSDAShape& d, const Levels& lv) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t M = d.M, D = kD > 0 ? kD : d.D, L = d.L, P = d.P, MD = d.M * d.D;
  const int64_t per_item = M * L * P * std::max<int64_t>(D, 8);
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, per_item));
  at::parallel_for(0, d.N * d.Lq, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(static_cast<size_t>(D));
    // one (query, head)'s points: with a head's channels spanning a cache line or more, every
    // point's corners are found (and their pixels prefetched) before the first is read, so that
    // the memory accesses overlap; narrower heads (the mask head's 2 channels) read each point at
    // once. The points are summed in the same order either way.
    const bool staged = D * static_cast<int64_t>(sizeof(scalar_t)) >= 64;
    std::vector<Corners<acc_t>> pts(static_cast<size_t>(L * P));
    std::vector<acc_t> pw(static_cast<size_t>(L * P));
    std::vector<const scalar_t*> pv(static_cast<size_t>(L * P));
    Corners<acc_t> c;
    Bilinear<acc_t> s;
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / d.Lq;
      const int64_t b = vindex ? vindex[n] : n;
      for (int64_t m = 0; m < M; ++m) {
        const int64_t item = nq * M + m;
        const coord_t* lp = loc + item * L * P * 2;
        const coord_t* wp = attw + item * L * P;
        const scalar_t* vhead = value + (b * d.S * M + m) * D;
        std::fill(acc.begin(), acc.end(), static_cast<acc_t>(0));
        int64_t found = 0;
        for (int64_t l = 0; l < L; ++l) {
          const scalar_t* vl = vhead + lv.start[l] * MD;
          const coord_t* rp = ref ? ref + (nq * L + l) * 2 : nullptr;
          const coord_t Wl = static_cast<coord_t>(lv.W[l]), Hl = static_cast<coord_t>(lv.H[l]);
          for (int64_t p = 0; p < P; ++p) {
            const int64_t t = l * P + p;
            const acc_t aw = static_cast<acc_t>(wp[t]);
            coord_t x = lp[2 * t], y = lp[2 * t + 1];
            if (rp) {
              x = rp[0] + x / Wl;
              y = rp[1] + y / Hl;
            }
            if (!staged) {
              if (corners<acc_t>(static_cast<acc_t>(x), static_cast<acc_t>(y), lv.H[l], lv.W[l], aw, MD, c, s))
                gather_corners(vl, c, aw, D, acc.data());
              continue;
            }
            Corners<acc_t>& cs = pts[static_cast<size_t>(found)];
            if (corners<acc_t>(static_cast<acc_t>(x), static_cast<acc_t>(y), lv.H[l], lv.W[l], aw, MD, cs, s)) {
              for (int k = 0; k < cs.count; ++k) {  // the head's D channels: one or two cache lines
                __builtin_prefetch(vl + cs.off[k]);
                __builtin_prefetch(vl + cs.off[k] + D - 1);
              }
              pw[static_cast<size_t>(found)] = aw;
              pv[static_cast<size_t>(found)] = vl;
              ++found;
            }
          }
        }
        for (int64_t t = 0; t < found; ++t)
          gather_corners(pv[static_cast<size_t>(t)], pts[static_cast<size_t>(t)], pw[static_cast<size_t>(t)], D,
                         acc.data());
        scalar_t* op = out + item * D;
        for (int64_t i = 0; i < D; ++i) op[i] = static_cast<scalar_t>(acc[i]);
      }
    }
  });
}

template <typename scalar_t, typename coord_t, int kD>
void backward_impl(const scalar_t* value, const coord_t* loc, const coord_t* attw, const int64_t* vindex,
                   const scalar_t* grad_out, acc_type_t<scalar_t>* grad_value, coord_t* grad_loc,
                   coord_t* grad_attw, const MSDAShape& d, const Levels& lv) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t M = d.M, D = kD > 0 ? kD : d.D, L = d.L, P = d.P, MD = d.M * d.D;
  // the groups that sample each value map, in order
  std::vector<std::vector<int64_t>> groups(static_cast<size_t>(d.B));
  for (int64_t n = 0; n < d.N; ++n) groups[static_cast<size_t>(vindex ? vindex[n] : n)].push_back(n);
  at::parallel_for(0, d.B * M, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> go(static_cast<size_t>(D));
    // as in the forward: with wide heads one (query, head)'s corners first, their pixels
    // prefetched, then read and written; narrow heads take each point at once
    const bool staged = D * static_cast<int64_t>(sizeof(scalar_t)) >= 64;
    std::vector<Corners<acc_t>> pts(static_cast<size_t>(L * P));
    std::vector<Bilinear<acc_t>> setups(static_cast<size_t>(L * P));
    std::vector<char> valid(static_cast<size_t>(L * P));
    Bilinear<acc_t> s;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / M, m = task % M;
      const scalar_t* vhead = value + (b * d.S * M + m) * D;
      acc_t* gvhead = grad_value + (b * d.S * M + m) * D;
      for (const int64_t n : groups[static_cast<size_t>(b)]) {
        for (int64_t q = 0; q < d.Lq; ++q) {
          const int64_t item = (n * d.Lq + q) * M + m;
          const scalar_t* gop = grad_out + item * D;
          for (int64_t i = 0; i < D; ++i) go[i] = static_cast<acc_t>(gop[i]);
          const coord_t* lp = loc + item * L * P * 2;
          const coord_t* wp = attw + item * L * P;
          coord_t* glp = grad_loc + item * L * P * 2;
          coord_t* gwp = grad_attw + item * L * P;
          for (int64_t l = 0; staged && l < L; ++l) {
            const int64_t lvl = lv.start[l] * MD;
            for (int64_t p = 0; p < P; ++p) {
              const size_t t = static_cast<size_t>(l * P + p);
              Corners<acc_t>& c = pts[t];
              valid[t] = corners<acc_t>(static_cast<acc_t>(lp[2 * t]), static_cast<acc_t>(lp[2 * t + 1]), lv.H[l],
                                        lv.W[l], static_cast<acc_t>(wp[t]), MD, c, setups[t]);
              if (!valid[t]) continue;
              for (int k = 0; k < c.count; ++k) {
                __builtin_prefetch(vhead + lvl + c.off[k]);
                __builtin_prefetch(vhead + lvl + c.off[k] + D - 1);
                __builtin_prefetch(gvhead + lvl + c.off[k], 1);
                __builtin_prefetch(gvhead + lvl + c.off[k] + D - 1, 1);
              }
            }
          }
          for (int64_t l = 0; l < L; ++l) {
            const int64_t lvl = lv.start[l] * MD;
            for (int64_t p = 0; p < P; ++p) {
              const int64_t t = l * P + p;
              const acc_t aw = static_cast<acc_t>(wp[t]);
              acc_t g_aw = 0, g_h = 0, g_w = 0;
              Corners<acc_t>& c = pts[static_cast<size_t>(t)];
              if (staged) {
                s = setups[static_cast<size_t>(t)];
              } else {
                valid[static_cast<size_t>(t)] = corners<acc_t>(static_cast<acc_t>(lp[2 * t]),
                                                               static_cast<acc_t>(lp[2 * t + 1]), lv.H[l], lv.W[l],
                                                               aw, MD, c, s);
              }
              if (valid[static_cast<size_t>(t)]) {
                acc_t dot[4];
                scatter_corners(vhead + lvl, gvhead + lvl, c, go.data(), D, dot);
                acc_t dh[4], dw[4];
                corner_weight_derivatives(s, dh, dw);
                for (int k = 0; k < c.count; ++k) {
                  g_aw += c.cw[k] * dot[k];
                  g_h += dh[c.idx[k]] * dot[k];
                  g_w += dw[c.idx[k]] * dot[k];
                }
              }
              gwp[t] = static_cast<coord_t>(g_aw);
              glp[2 * t] = static_cast<coord_t>(aw * g_w * static_cast<acc_t>(lv.W[l]));
              glp[2 * t + 1] = static_cast<coord_t>(aw * g_h * static_cast<acc_t>(lv.H[l]));
            }
          }
        }
      }
    }
  });
}

// The mask head's sampling at every pixel of its (H, W) map, for inference (no gradients),
// fused: from each instance's raw sampling offsets (pixels) and attention logits at a pixel,
// the softmax over each head's K points, the locations (pixel centre + offset / (W, H)), the
// bilinear samples, their weighted sum and the ReLU, without the intermediate tensors of the
// composition in soit/modeling/mask_head.py (normalised offsets, locations, weights: about 50
// values per instance and pixel, each written and read again). The same arithmetic as that
// composition, operation for operation.
//   off (n, S, 2MK) and logits (n, S, MK), S = H * W, ordered (head, point[, xy]); value
//   (B, S, M, Dh); bidx[i] the value map of instance i. Writes out (n, S, M * Dh).
// kD > 0: Dh fixed at compile time, as in forward_impl (the same loops, the same rounding).
template <typename scalar_t, int kD>
void mask_head_impl(const scalar_t* off, const scalar_t* logits, const scalar_t* value, const int64_t* bidx,
                    int64_t n, int64_t M, int64_t K, int64_t dh, int64_t H, int64_t W, scalar_t* out) {
  using acc_t = scalar_t;
  const int64_t Dh = kD > 0 ? kD : dh, S = H * W, MK = M * K, MD = M * Dh;
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, MK));
  at::parallel_for(0, n * S, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> weight(static_cast<size_t>(K));
    Corners<acc_t> c;
    Bilinear<acc_t> s;
    for (int64_t iq = begin; iq < end; ++iq) {
      const int64_t i = iq / S, q = iq % S;
      const scalar_t* op = off + iq * 2 * MK;
      const scalar_t* lp = logits + iq * MK;
      const scalar_t* vmap = value + bidx[i] * S * MD;
      scalar_t* outp = out + iq * MD;
      // the pixel centre, as (arange(W) + 0.5) / W
      const acc_t rx = (static_cast<acc_t>(q % W) + static_cast<acc_t>(0.5)) / static_cast<acc_t>(W);
      const acc_t ry = (static_cast<acc_t>(q / W) + static_cast<acc_t>(0.5)) / static_cast<acc_t>(H);
      for (int64_t m = 0; m < M; ++m) {
        // softmax over the head's K points: exp(x - max) / sum
        acc_t mx = -std::numeric_limits<acc_t>::infinity();
        for (int64_t k = 0; k < K; ++k) mx = std::max(mx, static_cast<acc_t>(lp[m * K + k]));
        acc_t sum = 0;
        for (int64_t k = 0; k < K; ++k) {
          weight[k] = std::exp(static_cast<acc_t>(lp[m * K + k]) - mx);
          sum += weight[k];
        }
        acc_t* acc = outp + m * Dh;
        for (int64_t d = 0; d < Dh; ++d) acc[d] = 0;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t o = 2 * (m * K + k);
          const acc_t x = rx + static_cast<acc_t>(op[o]) / static_cast<acc_t>(W);
          const acc_t y = ry + static_cast<acc_t>(op[o + 1]) / static_cast<acc_t>(H);
          const acc_t aw = weight[k] / sum;
          if (corners<acc_t>(x, y, static_cast<int>(H), static_cast<int>(W), aw, MD, c, s))
            gather_corners(vmap + m * Dh, c, aw, Dh, acc);
        }
        for (int64_t d = 0; d < Dh; ++d) acc[d] = std::max(acc[d], static_cast<acc_t>(0));
      }
    }
  });
}

// This copy's entry points as a type, so that the caller can choose a copy as a template argument.
struct Kernels {
  template <bool kBackward, typename scalar_t, typename coord_t, int kD>
  static auto get() {
    if constexpr (kBackward)
      return &backward_impl<scalar_t, coord_t, kD>;
    else
      return &forward_impl<scalar_t, coord_t, kD>;
  }
  template <typename scalar_t, int kD>
  static auto mask_head() {
    return &mask_head_impl<scalar_t, kD>;
  }
};

}  // namespace SOIT_CPU_NAMESPACE
