// Wide path (max(C, D) > kNarrowMax): ATen/BLAS GEMMs over the valid positions only, in waves.
//
// Design. The valid positions of utterance b are the prefix [0, n_b) of its L rows, contiguous in the
// (B L, C) view of a. Padding is never projected: the valid rows are grouped into chunks of at most
// wave_rows = wave_elements / max(C, D) rows. A long prefix (>= kDirectRows) forms chunks of its own,
// GEMMs on a view of a; short prefixes are packed together into a reused buffer (one copy of their
// rows) so that the GEMMs stay large. Per forward chunk, one GEMM, the shared tanh (active
// instruction-set path) and one GEMV give h = tanh(a W^T + bias) and the scores; at::parallel_for over
// the chunk's segments then runs the online softmax (SoftmaxState::merge, the state carried across
// chunks) and the context sums. The backward first forms de_i for every valid position (S needs the
// whole utterance), then per chunk recomputes h (the activation is not saved: memory stays at the
// inputs plus alpha), turns it into dz in place (dz_rows, per-thread du and dbias sums), and applies
// dW += dz^T a_chunk and da_chunk = dz W as GEMMs, then alpha_i dc; padding rows of grad_a are zero.
// No ATen call runs inside a parallel region (which would nest thread pools).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "attention_pool.h"
#include "cpu/kernels.h"
#include "waves.h"

namespace ser_lightning::cpu {
namespace {

// A valid prefix at least this long gets GEMMs of its own (no packing copy).
constexpr int64_t kDirectRows = 128;
// Minimum work (multiply-adds or elements) per parallel chunk, so small loops do not wake threads.
constexpr int64_t kMinChunkWork = int64_t(1) << 15;

int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinChunkWork / std::max<int64_t>(1, work_per_item));
}

// Positions [i0, i1) of utterance b, at row `row` of their chunk.
struct Segment {
  int64_t b, i0, i1, row;
};

// The chunks of valid rows, in order; see the design note above.
std::vector<std::vector<Segment>> plan_chunks(const int64_t* len, int64_t B, int64_t wave_rows) {
  std::vector<std::vector<Segment>> chunks;
  std::vector<Segment> current;
  int64_t rows = 0;
  const auto flush = [&] {
    if (!current.empty()) chunks.push_back(std::move(current));
    current.clear();
    rows = 0;
  };
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = len[b];
    if (n >= kDirectRows) {
      flush();
      for (int64_t i0 = 0; i0 < n; i0 += wave_rows) {
        current.push_back({b, i0, std::min(n, i0 + wave_rows), 0});
        flush();
      }
      continue;
    }
    for (int64_t i0 = 0; i0 < n;) {
      const int64_t take = std::min(n - i0, wave_rows - rows);
      current.push_back({b, i0, i0 + take, rows});
      rows += take;
      i0 += take;
      if (rows == wave_rows) flush();
    }
  }
  flush();
  return chunks;
}

int64_t chunk_rows(const std::vector<Segment>& chunk) { return chunk.back().row + chunk.back().i1 - chunk.back().i0; }

// The rows of a chunk of a2d (B L, C): a view for a single segment, else a packed copy in `buffer`
// (allocated on first use with `capacity` rows).
template <typename T>
at::Tensor chunk_input(const at::Tensor& a2d, int64_t L, const std::vector<Segment>& chunk, int64_t capacity,
                       at::Tensor& buffer) {
  const int64_t rows = chunk_rows(chunk), C = a2d.size(1);
  if (chunk.size() == 1) return a2d.narrow(0, chunk[0].b * L + chunk[0].i0, rows);
  if (!buffer.defined()) buffer = at::empty({capacity, C}, a2d.options());
  at::Tensor packed = buffer.narrow(0, 0, rows);
  const T* src = a2d.data_ptr<T>();
  T* dst = packed.data_ptr<T>();
  at::parallel_for(0, static_cast<int64_t>(chunk.size()), grain(C * kDirectRows / 2), [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const Segment& g = chunk[s];
      std::copy(src + (g.b * L + g.i0) * C, src + (g.b * L + g.i1) * C, dst + g.row * C);
    }
  });
  return packed;
}

// h = tanh(a_rows W^T + bias) in `buffer` (rows, D), with the active path's tanh.
template <typename T>
at::Tensor project(const at::Tensor& a_rows, const at::Tensor& weight_t, const at::Tensor& bias, at::Tensor& buffer,
                   const IsaKernels<T>& kernels) {
  at::Tensor h = buffer.narrow(0, 0, a_rows.size(0));
  at::addmm_out(h, bias, a_rows, weight_t);
  T* h_ptr = h.data_ptr<T>();
  at::parallel_for(0, h.numel(), kMinChunkWork, [&](int64_t k0, int64_t k1) { kernels.tanh(h_ptr + k0, k1 - k0); });
  return h;
}

int64_t wave_rows_for(int64_t C, int64_t D) {
  return std::max<int64_t>(1, wave_elements(kCpuWaveElements) / std::max(C, D));
}

}  // namespace

template <typename T>
void wide_forward(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& u,
                  double lam_d, const at::Tensor& lengths, at::Tensor& context, at::Tensor& alpha) {
  const IsaKernels<T>& kernels = active_kernels<T>();
  const int64_t B = a.size(0), L = a.size(1), C = a.size(2), D = weight.size(0);
  const T* a_ptr = a.data_ptr<T>();
  const int64_t* len = lengths.data_ptr<int64_t>();
  T* alpha_ptr = alpha.data_ptr<T>();
  T* context_ptr = context.data_ptr<T>();
  const T lam = static_cast<T>(lam_d);
  const int64_t wave_rows = wave_rows_for(C, D);
  // Per utterance: the online-softmax state and the exp-weighted context sum (in `context`).
  std::vector<SoftmaxState<T>> state(static_cast<size_t>(B), SoftmaxState<T>::empty());
  context.zero_();
  const at::Tensor a2d = a.view({B * L, C}), weight_t = weight.t();
  const int64_t capacity = std::min(wave_rows, B * L);
  at::Tensor packed, h_buffer = at::empty({capacity, D}, a.options()), scores_buffer = at::empty({capacity}, a.options());
  for (const std::vector<Segment>& chunk : plan_chunks(len, B, wave_rows)) {
    const at::Tensor a_rows = chunk_input<T>(a2d, L, chunk, capacity, packed);
    const at::Tensor h = project<T>(a_rows, weight_t, bias, h_buffer, kernels);
    at::Tensor scores = scores_buffer.narrow(0, 0, a_rows.size(0));
    at::mv_out(scores, h, u);  // e_i = u . h_i
    const T* e = scores.data_ptr<T>();
    at::parallel_for(0, static_cast<int64_t>(chunk.size()), grain(std::min(L, wave_rows) * C),
                     [&](int64_t s0, int64_t s1) {
      std::vector<T> weights;
      for (int64_t s = s0; s < s1; ++s) {
        const Segment& g = chunk[s];
        T* x = alpha_ptr + g.b * L;  // scaled scores; normalised once the utterance is complete
        T seg_max = neg_infinity<T>();
        for (int64_t i = g.i0; i < g.i1; ++i) {
          x[i] = lam * e[g.row + i - g.i0];
          seg_max = std::max(seg_max, x[i]);
        }
        weights.resize(static_cast<size_t>(g.i1 - g.i0));
        T seg_sum = 0;
        for (int64_t i = g.i0; i < g.i1; ++i) seg_sum += (weights[i - g.i0] = sl_exp(x[i] - seg_max));
        T scale_old, scale_new;
        state[g.b].merge(seg_max, seg_sum, &scale_old, &scale_new);
        T* ctx = context_ptr + g.b * C;
        for (int64_t c = 0; c < C; ++c) ctx[c] *= scale_old;
        for (int64_t i = g.i0; i < g.i1; ++i) kernels.axpy(ctx, scale_new * weights[i - g.i0], a_ptr + (g.b * L + i) * C, C);
      }
    });
  }
  at::parallel_for(0, B, grain(L + C), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      T* al = alpha_ptr + b * L;
      for (int64_t i = 0; i < len[b]; ++i) al[i] = state[b].weight(al[i]);
      std::fill(al + len[b], al + L, T(0));
      const T inv = T(1) / state[b].sum;
      for (int64_t c = 0; c < C; ++c) context_ptr[b * C + c] *= inv;
    }
  });
}

template <typename T>
void wide_backward(const at::Tensor& grad_context, const at::Tensor& grad_alpha, const at::Tensor& a,
                   const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& u, const at::Tensor& alpha,
                   double lam_d, const at::Tensor& lengths, at::Tensor& grad_a, at::Tensor& grad_weight,
                   at::Tensor& grad_bias, at::Tensor& grad_u) {
  const IsaKernels<T>& kernels = active_kernels<T>();
  const int64_t B = a.size(0), L = a.size(1), C = a.size(2), D = weight.size(0);
  const T* a_ptr = a.data_ptr<T>();
  const T* u_ptr = u.data_ptr<T>();
  const T* alpha_ptr = alpha.data_ptr<T>();
  const T* dc_ptr = grad_context.data_ptr<T>();
  const T* dalpha_ptr = grad_alpha.data_ptr<T>();
  const int64_t* len = lengths.data_ptr<int64_t>();
  T* ga_ptr = grad_a.data_ptr<T>();
  const T lam = static_cast<T>(lam_d);
  const int64_t wave_rows = wave_rows_for(C, D);

  // de_i for the valid positions (s_i = dc . a_i + dalpha_i, S = sum_i alpha_i s_i); padding rows of
  // grad_a are zero.
  std::vector<T> de(static_cast<size_t>(B * L));
  at::parallel_for(0, B, grain(L * C), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      T* de_b = de.data() + b * L;
      const T* al = alpha_ptr + b * L;
      T s_mean = 0;
      for (int64_t i = 0; i < len[b]; ++i) {
        de_b[i] = kernels.dot(dc_ptr + b * C, a_ptr + (b * L + i) * C, C) + dalpha_ptr[b * L + i];
        s_mean += al[i] * de_b[i];
      }
      for (int64_t i = 0; i < len[b]; ++i) de_b[i] = score_grad<T>(lam, al[i], de_b[i], s_mean);
      std::fill(ga_ptr + (b * L + len[b]) * C, ga_ptr + (b + 1) * L * C, T(0));
    }
  });

  // du and dbias: one accumulator row per thread, summed at the end.
  const int64_t threads = at::get_num_threads();
  std::vector<T> du(static_cast<size_t>(threads * D), T(0)), db(du);
  const at::Tensor a2d = a.view({B * L, C}), weight_t = weight.t();
  const at::Tensor ga2d = grad_a.view({B * L, C});
  const int64_t capacity = std::min(wave_rows, B * L);
  at::Tensor packed, h_buffer = at::empty({capacity, D}, a.options()), da_buffer;
  std::vector<T> de_rows(static_cast<size_t>(capacity));
  grad_weight.zero_();
  for (const std::vector<Segment>& chunk : plan_chunks(len, B, wave_rows)) {
    const at::Tensor a_rows = chunk_input<T>(a2d, L, chunk, capacity, packed);
    const int64_t rows = a_rows.size(0);
    for (const Segment& g : chunk) std::copy(de.data() + g.b * L + g.i0, de.data() + g.b * L + g.i1, de_rows.data() + g.row);
    const at::Tensor h = project<T>(a_rows, weight_t, bias, h_buffer, kernels);
    T* dz_ptr = h.data_ptr<T>();  // h becomes dz in place
    at::parallel_for(0, rows, grain(D), [&](int64_t r0, int64_t r1) {
      const int64_t t = at::get_thread_num();
      kernels.dz_rows(dz_ptr + r0 * D, de_rows.data() + r0, u_ptr, r1 - r0, D, du.data() + t * D, db.data() + t * D);
    });
    grad_weight.addmm_(h.t(), a_rows);
    const bool direct = chunk.size() == 1;
    at::Tensor da;
    if (direct) {
      da = ga2d.narrow(0, chunk[0].b * L + chunk[0].i0, rows);
    } else {
      if (!da_buffer.defined()) da_buffer = at::empty({capacity, C}, a.options());
      da = da_buffer.narrow(0, 0, rows);
    }
    at::mm_out(da, h, weight);
    const T* da_ptr = da.data_ptr<T>();
    at::parallel_for(0, static_cast<int64_t>(chunk.size()), grain(kDirectRows * C), [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const Segment& g = chunk[s];
        for (int64_t i = g.i0; i < g.i1; ++i) {
          T* ga_row = ga_ptr + (g.b * L + i) * C;
          if (!direct) std::copy(da_ptr + (g.row + i - g.i0) * C, da_ptr + (g.row + i - g.i0 + 1) * C, ga_row);
          kernels.axpy(ga_row, alpha_ptr[g.b * L + i], dc_ptr + g.b * C, C);
        }
      }
    });
  }
  T* gu = grad_u.data_ptr<T>();
  T* gb = grad_bias.data_ptr<T>();
  for (int64_t d = 0; d < D; ++d) {
    T su = 0, sb = 0;
    for (int64_t t = 0; t < threads; ++t) {
      su += du[t * D + d];
      sb += db[t * D + d];
    }
    gu[d] = su;
    gb[d] = sb;
  }
}

template <typename T>
void tanh_inplace(T* x, int64_t n) {
  const IsaKernels<T>& kernels = active_kernels<T>();
  at::parallel_for(0, n, kMinChunkWork, [&](int64_t k0, int64_t k1) { kernels.tanh(x + k0, k1 - k0); });
}

#define SL_INSTANTIATE(T)                                                                                        \
  template void wide_forward<T>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,     \
                                double, const at::Tensor&, at::Tensor&, at::Tensor&);                           \
  template void wide_backward<T>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,    \
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, double,               \
                                 const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&);        \
  template void tanh_inplace<T>(T*, int64_t);
SL_INSTANTIATE(float)
SL_INSTANTIATE(double)
#undef SL_INSTANTIATE

}  // namespace ser_lightning::cpu
