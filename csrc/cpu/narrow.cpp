// Narrow path (max(C, D) <= kNarrowMax): the ATen-facing half. Pads the parameters to N for the
// active instruction-set path (isa_kernels.h, where the design is described), splits the batch over
// threads with at::parallel_for, and sums the per-thread parameter gradients.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include "cpu/kernels.h"

namespace ser_lightning::cpu {
namespace {

// Minimum multiply-adds per parallel chunk of utterances, so small batches do not wake threads.
constexpr int64_t kChunkWork = int64_t(1) << 18;

// The padded copies of the parameters a NarrowProblem points into.
template <typename T>
struct NarrowParams {
  std::vector<T> wt, wp, bias, u;
  NarrowProblem<T> problem;

  NarrowParams(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& bias_in, const at::Tensor& u_in,
               double lam, const at::Tensor& lengths, int block, bool backward) {
    const int64_t L = a.size(1), C = a.size(2), D = weight.size(0);
    const int64_t N = (std::max(C, D) + block - 1) / block * block;
    const T* w = weight.data_ptr<T>();
    wt.assign(static_cast<size_t>(C * N), T(0));
    for (int64_t d = 0; d < D; ++d)
      for (int64_t c = 0; c < C; ++c) wt[c * N + d] = w[d * C + c];
    if (backward) {
      wp.assign(static_cast<size_t>(D * N), T(0));
      for (int64_t d = 0; d < D; ++d) std::copy(w + d * C, w + (d + 1) * C, wp.data() + d * N);
    }
    bias.assign(static_cast<size_t>(N), T(0));
    u.assign(static_cast<size_t>(N), T(0));
    std::copy(bias_in.data_ptr<T>(), bias_in.data_ptr<T>() + D, bias.data());
    std::copy(u_in.data_ptr<T>(), u_in.data_ptr<T>() + D, u.data());
    problem = {L, C, D, N, a.data_ptr<T>(), lengths.data_ptr<int64_t>(), wt.data(), wp.data(), bias.data(),
               u.data(), static_cast<T>(lam)};
  }
};

}  // namespace

template <typename T>
void narrow_forward(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& u,
                    double lam, const at::Tensor& lengths, at::Tensor& context, at::Tensor& alpha) {
  const IsaKernels<T>& kernels = active_kernels<T>();
  const NarrowParams<T> params(a, weight, bias, u, lam, lengths, kernels.block, /*backward=*/false);
  const NarrowProblem<T>& p = params.problem;
  T* context_ptr = context.data_ptr<T>();
  T* alpha_ptr = alpha.data_ptr<T>();
  const int64_t work = std::max<int64_t>(1, p.L * p.C * p.N);
  at::parallel_for(0, a.size(0), std::max<int64_t>(1, kChunkWork / work), [&](int64_t b0, int64_t b1) {
    kernels.narrow_forward(p, b0, b1, context_ptr, alpha_ptr);
  });
}

template <typename T>
void narrow_backward(const at::Tensor& grad_context, const at::Tensor& grad_alpha, const at::Tensor& a,
                     const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& u, const at::Tensor& alpha,
                     double lam, const at::Tensor& lengths, at::Tensor& grad_a, at::Tensor& grad_weight,
                     at::Tensor& grad_bias, at::Tensor& grad_u) {
  const IsaKernels<T>& kernels = active_kernels<T>();
  const NarrowParams<T> params(a, weight, bias, u, lam, lengths, kernels.block, /*backward=*/true);
  const NarrowProblem<T>& p = params.problem;
  const int64_t C = p.C, D = p.D, N = p.N, per_thread = (C + 2) * N;
  const int64_t threads = at::get_num_threads();
  std::vector<T> sums(static_cast<size_t>(threads * per_thread), T(0));
  const T* dc = grad_context.data_ptr<T>();
  const T* dalpha = grad_alpha.data_ptr<T>();
  const T* alpha_ptr = alpha.data_ptr<T>();
  T* ga = grad_a.data_ptr<T>();
  const int64_t work = std::max<int64_t>(1, 3 * p.L * C * N);
  at::parallel_for(0, a.size(0), std::max<int64_t>(1, kChunkWork / work), [&](int64_t b0, int64_t b1) {
    T* mine = sums.data() + at::get_thread_num() * per_thread;
    const NarrowGrads<T> g{mine, mine + C * N, mine + (C + 1) * N};
    std::vector<T> scratch(static_cast<size_t>(p.L * (N + 1)));
    kernels.narrow_backward(p, b0, b1, dc, dalpha, alpha_ptr, ga, g, scratch.data(), scratch.data() + p.L * N);
  });
  T* gw = grad_weight.data_ptr<T>();
  T* gb = grad_bias.data_ptr<T>();
  T* gu = grad_u.data_ptr<T>();
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t c = 0; c < C; ++c) {
      T total = 0;
      for (int64_t t = 0; t < threads; ++t) total += sums[t * per_thread + c * N + d];
      gw[d * C + c] = total;
    }
    T total_b = 0, total_u = 0;
    for (int64_t t = 0; t < threads; ++t) {
      total_b += sums[t * per_thread + C * N + d];
      total_u += sums[t * per_thread + (C + 1) * N + d];
    }
    gb[d] = total_b;
    gu[d] = total_u;
  }
}

#define SL_INSTANTIATE(T)                                                                                        \
  template void narrow_forward<T>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,   \
                                  double, const at::Tensor&, at::Tensor&, at::Tensor&);                         \
  template void narrow_backward<T>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,  \
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, double,             \
                                   const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&);
SL_INSTANTIATE(float)
SL_INSTANTIATE(double)
#undef SL_INSTANTIATE

}  // namespace ser_lightning::cpu
